#pragma once
// A device connection the HTTPS server hands to the MQTT server once its
// request upgraded to MQTT over WebSocket (/$iothub/websocket): the socket,
// its TLS session (handshake done), what was read past the upgrade request,
// and the connection slot it holds. Included by https_server.cpp and
// mqtt_server.cpp only (it brings Asio).

#include <memory>
#include <string>
#include <vector>

#include <boost/asio/ip/tcp.hpp>

#include "messages/credential.hpp"
#include "net/openssl_handles.hpp"

namespace prov::gateway {

class listener_slots;

struct upgraded_connection {
  boost::asio::ip::tcp::socket sock; ///< non-blocking, on an HTTPS I/O thread
  net::ssl_ptr ssl;                  ///< OpenSSL drives the socket (SSL_set_fd)
  std::string ip;
  std::string leftover; ///< decrypted bytes after the request: WebSocket frames
  std::shared_ptr<const client_chain> chain; ///< client certificates, if any
  /// The slot the connection holds (the HTTPS listener's: it stays a
  /// connection of that port), released when the MQTT session ends.
  listener_slots* slots = nullptr;
};

} // namespace prov::gateway
