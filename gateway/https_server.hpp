#pragma once
// HTTPS/1.1 server (Boost.Beast + Asio + OpenSSL) for the device and service
// APIs. TLS 1.2 and 1.3 only, keep-alive, bounded heads and bodies, and a
// per-request deadline against slow or stalled clients. Beast stays in the .cpp.

#include <cstdint>
#include <memory>
#include <string>

#include "gateway/listener.hpp"
#include "net/http_types.hpp"
#include "messages/error.hpp"

namespace prov::gateway {

class device_api;
class mqtt_server;

/// The HTTPS listener's options; a request is a head and its body.
struct server_options : listener_options {
  server_options() : listener_options("0.0.0.0:8443") {}

  std::size_t max_body_bytes = 96 * 1024;
  std::size_t max_header_bytes = 16 * 1024;
  /// Optional: serves MQTT over WebSocket on connections upgraded at
  /// /$iothub/websocket (null: such upgrades are refused with 404). Must
  /// outlive the server's connections; stop it before this server
  /// (app/provisiond.cpp), so its answers in flight are written.
  mqtt_server* mqtt_ws = nullptr;
  /// Optional: the device API whose [throttling] per-address quota the
  /// server applies to the requests it answers itself (WebSocket upgrades),
  /// as the routes do to the others. Must outlive the server.
  device_api* api = nullptr;
};

class https_server : public device_listener {
public:
  /// Binds, starts the I/O threads and begins accepting. `h` must outlive the
  /// server.
  [[nodiscard]] static error start(const server_options& opts, handler& h,
                                   std::unique_ptr<https_server>& out);
};

} // namespace prov::gateway
