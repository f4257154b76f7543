#pragma once
// The DPS MQTT device transport: MQTT 3.1.1 over TLS on its own listener,
// and over WebSocket on connections the HTTPS server upgrades at
// /$iothub/websocket; the second adapter of the transport-neutral device
// API (device_api.hpp).
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

class device_api;
struct upgraded_connection;

/// The MQTT listener's options. A request: CONNECT, the rest of a packet
/// once it started arriving, or a write. A client that asks for no
/// keep-alive (0) is closed after idle_timeout_seconds without a packet.
/// listen "" = no listener (MQTT over WebSocket only).
struct mqtt_server_options : listener_options {
  mqtt_server_options() : listener_options("0.0.0.0:8883") {}

  std::string id_scope;                ///< the instance's
  int retry_after_s = 1;               ///< device_api.retry_after_seconds
  std::size_t max_packet_bytes = 128 * 1024;
  int max_inflight = 16;               ///< unanswered requests per connection
  /// Optional: the device API and its [throttling] quotas, shared with the
  /// HTTPS routes (one budget per quota); null = an own one without quotas.
  /// Must outlive the server's connections.
  device_api* api = nullptr;
};

class mqtt_server : public device_listener {
public:
  /// Binds, starts the I/O threads and begins accepting. `eng` must outlive
  /// the server.
  [[nodiscard]] static error start(const mqtt_server_options& opts, engine& eng,
                                   std::unique_ptr<mqtt_server>& out);

  /// Serves MQTT on a connection the HTTPS server upgraded to WebSocket
  /// (gateway/upgraded_connection.hpp), on the thread it runs on. Thread-safe.
  virtual void adopt_websocket(upgraded_connection&& c) = 0;

  /// Open MQTT over WebSocket connections (open_connections() counts the
  /// MQTT listener's). They hold their slot under the shared caps.
  virtual int open_websocket_connections() const = 0;
};

} // namespace prov::gateway
