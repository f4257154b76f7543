#pragma once
// The DPS MQTT device transport: MQTT 3.1.1 over TLS on its own listener,
// the second adapter of the transport-neutral device API (device_api.hpp).
// Same TLS context and client-certificate handling as the HTTPS server
// (net/device_tls), its own I/O threads (never CAF's), the codec in
// net/mqtt_codec and the DPS topic rules in net/mqtt_dps. docs/mqtt.md.

#include <cstdint>
#include <memory>
#include <string>

#include "gateway/listener.hpp"
#include "messages/error.hpp"

namespace prov {
class engine;
} // namespace prov

namespace prov::gateway {

/// The MQTT listener's options. A request: CONNECT, the rest of a packet
/// once it started arriving, or a write. A client that asks for no
/// keep-alive (0) is closed after idle_timeout_seconds without a packet.
struct mqtt_server_options : listener_options {
  mqtt_server_options() : listener_options("0.0.0.0:8883") {}

  std::string id_scope;                ///< the instance's
  int retry_after_s = 1;               ///< device_api.retry_after_seconds
  std::size_t max_packet_bytes = 128 * 1024;
  int max_inflight = 16;               ///< unanswered requests per connection
};

class mqtt_server : public device_listener {
public:
  /// Binds, starts the I/O threads and begins accepting. `eng` must outlive
  /// the server.
  [[nodiscard]] static error start(const mqtt_server_options& opts, engine& eng,
                                   std::unique_ptr<mqtt_server>& out);
};

} // namespace prov::gateway
