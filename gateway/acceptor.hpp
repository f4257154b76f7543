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

/// The client address of an accepted socket as quotas, caps and logs key
/// it: an IPv4 client of a dual-stack ("[::]") listener arrives as
/// ::ffff:a.b.c.d and is written a.b.c.d, so one client is one key on
/// every listener (the MQTT one may be IPv4 only). "" when unknown.
inline std::string client_address(const boost::asio::ip::tcp::socket& sock) {
  namespace net = boost::asio;
  boost::system::error_code ec;
  auto ep = sock.remote_endpoint(ec);
  if (ec)
    return {};
  auto a = ep.address();
  if (a.is_v6() && a.to_v6().is_v4_mapped())
    return net::ip::make_address_v4(net::ip::v4_mapped, a.to_v6()).to_string();
  return a.to_string();
}

} // namespace prov::gateway
