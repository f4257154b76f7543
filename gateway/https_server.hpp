#pragma once
// HTTPS/1.1 server (Boost.Beast + Asio + OpenSSL) for the device and service
// APIs. TLS 1.2 and 1.3 only, keep-alive, bounded heads and bodies, and a
// per-request deadline against slow or stalled clients. Beast stays in the .cpp.

#include <cstdint>
#include <memory>
#include <string>

#include "gateway/http_types.hpp"
#include "messages/error.hpp"

namespace prov::metrics {
class instruments;
class diagnostic_log;
} // namespace prov::metrics

namespace prov::gateway {

class connection_slots;
class mqtt_server;

struct server_options {
  std::string listen = "0.0.0.0:8443"; ///< port 0 = ephemeral
  std::string cert_chain_file;         ///< PEM: leaf then intermediates
  std::string key_file;
  int threads = 0;                     ///< 0 = hardware concurrency
  std::size_t max_body_bytes = 96 * 1024;
  std::size_t max_header_bytes = 16 * 1024;
  int request_timeout_seconds = 30;    ///< handshake + one request must finish in this
  int idle_timeout_seconds = 120;      ///< keep-alive connection idle limit
  /// Open connections at most (0 = no cap); one more is accepted and closed
  /// at once, before any TLS work. Keep it below the descriptor limit, so
  /// the server refuses cheaply instead of running out of descriptors.
  int max_connections = 0;
  int max_connections_per_client = 0;     ///< the same per client address; 0 = no cap
  /// Optional: caps shared with other listeners (the MQTT one), which then
  /// replace the two above; must outlive the server.
  connection_slots* shared_slots = nullptr;
  /// Optional: serves MQTT over WebSocket on connections upgraded at
  /// /$iothub/websocket (null: such upgrades are refused with 404). Must
  /// outlive the server's connections; stop it before this server
  /// (app/main.cpp), so its answers in flight are written.
  mqtt_server* mqtt_ws = nullptr;
  metrics::instruments* metrics = nullptr; ///< optional: refusals, accept errors
  metrics::diagnostic_log* log = nullptr;  ///< optional: accept trouble, besides stderr
};

class https_server {
public:
  virtual ~https_server() = default;

  /// Binds, starts the I/O threads and begins accepting. `h` must outlive the
  /// server.
  [[nodiscard]] static error start(const server_options& opts, handler& h,
                                   std::unique_ptr<https_server>& out);

  /// The bound port (useful with port 0).
  virtual uint16_t port() const = 0;
  virtual std::string address() const = 0;
  /// Connections currently open (TLS sessions, handshakes included).
  virtual int open_connections() const = 0;

  /// Stops accepting, lets answers already handed to the handler be written
  /// (up to 2 s), closes connections, joins the threads. Idempotent.
  virtual void stop() = 0;
  /// Closes the listener only (connections go on), so that several
  /// listeners stop taking clients before stop() waits on any. Idempotent.
  virtual void stop_accepting() = 0;
};

} // namespace prov::gateway
