#pragma once
// Opening a listening socket from "HOST:PORT", shared by the HTTPS server and
// the operations listener. Internal to gateway/*.cpp (it pulls in Asio).

#include <string>

#include <boost/asio/ip/tcp.hpp>

#include "config/config.hpp"
#include "messages/error.hpp"

namespace prov::gateway {

/// Binds and listens `acceptor` on `listen` (IPv4/IPv6 literal and port, 0 =
/// ephemeral). `what` names the listener in error messages.
inline error open_acceptor(boost::asio::ip::tcp::acceptor& acceptor, const std::string& listen,
                           int backlog, const std::string& what) {
  namespace net = boost::asio;
  std::string host;
  uint16_t port = 0;
  if (!config::split_host_port(listen, host, port))
    return {error_code::bad_request, what + " listen address '" + listen + "' is not HOST:PORT"};
  boost::system::error_code ec;
  auto addr = net::ip::make_address(host, ec);
  if (ec)
    return {error_code::bad_request, what + " listen address '" + host + "': " + ec.message()};
  net::ip::tcp::endpoint ep{addr, port};
  acceptor.open(ep.protocol(), ec);
  if (!ec)
    acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec)
    acceptor.bind(ep, ec);
  if (!ec)
    acceptor.listen(backlog, ec);
  if (ec)
    return {error_code::unavailable, "cannot listen on " + listen + " (" + what + "): "
                                       + ec.message()};
  return {};
}

} // namespace prov::gateway
