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

#include "messages/error.hpp"

namespace prov {
class engine;
namespace metrics {
class instruments;
class diagnostic_log;
} // namespace metrics
} // namespace prov

namespace prov::gateway {

class connection_slots;
class device_api;
struct upgraded_connection;

struct mqtt_server_options {
  /// Port 0 = ephemeral; "" = no listener (MQTT over WebSocket only).
  std::string listen = "0.0.0.0:8883";
  std::string cert_chain_file;         ///< PEM: leaf then intermediates
  std::string key_file;
  std::string id_scope;                ///< the instance's
  int retry_after_s = 1;               ///< device_api.retry_after_seconds
  int threads = 0;                     ///< 0 = hardware concurrency
  std::size_t max_packet_bytes = 128 * 1024;
  int max_inflight = 16;               ///< unanswered requests per connection
  /// Handshake + CONNECT, the rest of a packet once it started arriving, and
  /// a write must each finish within this (slow or stalled clients).
  int request_timeout_seconds = 30;
  /// A client that asks for no keep-alive (0) is closed after this long
  /// without a packet.
  int idle_timeout_seconds = 120;
  int max_connections = 0;            ///< 0 = no cap
  int max_connections_per_client = 0; ///< 0 = no cap
  /// Optional: caps shared with the HTTPS listener (one budget of
  /// descriptors for both), replacing the two above; must outlive the server.
  connection_slots* shared_slots = nullptr;
  /// Optional: the device API and its [throttling] quotas, shared with the
  /// HTTPS routes (one budget per quota); null = an own one without quotas.
  /// Must outlive the server's connections.
  device_api* api = nullptr;
  metrics::instruments* metrics = nullptr; ///< optional
  metrics::diagnostic_log* log = nullptr;  ///< optional: one line per request
};

class mqtt_server {
public:
  virtual ~mqtt_server() = default;

  /// Binds, starts the I/O threads and begins accepting. `eng` must outlive
  /// the server.
  [[nodiscard]] static error start(const mqtt_server_options& opts, engine& eng,
                                   std::unique_ptr<mqtt_server>& out);

  virtual uint16_t port() const = 0;
  virtual std::string address() const = 0;
  virtual int open_connections() const = 0; ///< on the MQTT listener

  /// Serves MQTT on a connection the HTTPS server upgraded to WebSocket
  /// (gateway/upgraded_connection.hpp), on the thread it runs on. Thread-safe.
  virtual void adopt_websocket(upgraded_connection&& c) = 0;

  /// Stops accepting, lets answers already on their way be written (up to
  /// 2 s), closes connections, joins the threads. Idempotent.
  virtual void stop() = 0;
  /// Closes the listener only (connections go on), so that several
  /// listeners stop taking clients before stop() waits on any. Idempotent.
  virtual void stop_accepting() = 0;
};

} // namespace prov::gateway
