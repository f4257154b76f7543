#pragma once
// What the two device listeners (HTTPS, MQTT) share: the options of a TLS
// listener with its own I/O threads and connection caps, and the interface
// to read its address and stop it. Light: no Asio, no OpenSSL.

#include <cstdint>
#include <string>
#include <utility>

namespace prov::metrics {
class instruments;
class diagnostic_log;
} // namespace prov::metrics

namespace prov::gateway {

class connection_slots;

struct listener_options {
  explicit listener_options(std::string default_listen) : listen(std::move(default_listen)) {}

  std::string listen;                  ///< HOST:PORT; port 0 = ephemeral
  std::string cert_chain_file;         ///< PEM: leaf then intermediates
  std::string key_file;
  int threads = 0;                     ///< 0 = hardware concurrency
  /// The TLS handshake and the first request must finish within this, and
  /// so must each request after it (slow or stalled clients); the
  /// transport's options say what a request is.
  int request_timeout_seconds = 30;
  int idle_timeout_seconds = 120;      ///< idle connection limit
  /// Open connections at most (0 = no cap); one more is accepted and closed
  /// at once, before any TLS work. Keep it below the descriptor limit, so
  /// the server refuses cheaply instead of running out of descriptors.
  int max_connections = 0;
  int max_connections_per_client = 0; ///< the same per client address; 0 = no cap
  /// Optional: caps shared with the other listeners (one budget of
  /// descriptors for all), replacing the two above; must outlive the server.
  connection_slots* shared_slots = nullptr;
  metrics::instruments* metrics = nullptr; ///< optional: refusals, accept errors
  metrics::diagnostic_log* log = nullptr;  ///< optional: one line per request, accept trouble
};

class device_listener {
public:
  virtual ~device_listener() = default;

  /// The bound port (useful with port 0).
  virtual uint16_t port() const = 0;
  virtual std::string address() const = 0;
  /// Connections currently open (TLS sessions, handshakes included).
  virtual int open_connections() const = 0;

  /// Stops accepting, lets answers already on their way be written (up to
  /// 2 s), closes connections, joins the threads. Idempotent.
  virtual void stop() = 0;
  /// Closes the listener only (connections go on), so that several
  /// listeners stop taking clients before stop() waits on any. Idempotent.
  virtual void stop_accepting() = 0;
};

} // namespace prov::gateway
