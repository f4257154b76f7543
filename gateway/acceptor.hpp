#pragma once
// Opening a listening socket from "HOST:PORT", shared by the HTTPS server,
// the MQTT server and the operations listener, and the I/O threads the two
// device listeners run on. Internal to gateway/*.cpp (it pulls in Asio).

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>

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

/// The name of an accept(2) failure that fails again at once when retried
/// at once (out of descriptors or memory), for the metric; null for any
/// other error, which concerns one client (accept(2) says to retry).
inline const char* exhausted_resource(int e) {
  switch (e) {
  case EMFILE: return "EMFILE";
  case ENFILE: return "ENFILE";
  case ENOBUFS: return "ENOBUFS";
  case ENOMEM: return "ENOMEM";
  default: return nullptr;
  }
}

/// A device listener's I/O threads and listening socket. One io_context per
/// thread, each connection pinned to one of them: a shared io_context hands
/// every completed read to whichever thread is idle, a futex wake-up and a
/// context switch per handler on 2 cores. The acceptor runs on the first.
/// Sessions live in the io_contexts: declare the pool after everything they
/// reference, so that it goes first.
class io_pool {
public:
  /// `threads` 0 = hardware concurrency.
  explicit io_pool(int threads) {
    int n = threads > 0 ? threads
                        : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    for (int i = 0; i < n; ++i)
      iocs_.push_back(std::make_unique<boost::asio::io_context>(1));
    acceptor_.emplace(*iocs_[0]);
  }
  io_pool(const io_pool&) = delete;
  io_pool& operator=(const io_pool&) = delete;
  ~io_pool() { stop_threads(); }

  boost::asio::io_context& first() { return *iocs_[0]; }
  /// The io_context for the next connection (the acceptor's thread only).
  boost::asio::io_context& next() { return *iocs_[next_++ % iocs_.size()]; }
  boost::asio::ip::tcp::acceptor& acceptor() { return *acceptor_; }

  /// Binds and listens (open_acceptor); `what` names the listener in errors.
  error listen(const std::string& listen, const std::string& what) {
    if (auto err = open_acceptor(*acceptor_, listen,
                                 boost::asio::socket_base::max_listen_connections, what))
      return err;
    boost::system::error_code ec;
    bound_ = acceptor_->local_endpoint(ec);
    return {};
  }

  /// Starts one thread per io_context; `name` names them in perf and top.
  void run(const char* name) {
    for (auto& ioc : iocs_)
      threads_.emplace_back([ioc = ioc.get(), name] {
        pthread_setname_np(pthread_self(), name);
        auto work = boost::asio::make_work_guard(*ioc); // idle threads wait for connections
        ioc->run();
      });
  }

  uint16_t port() const { return bound_.port(); }
  std::string address() const { return bound_.address().to_string(); }

  /// Closes the listening socket on its own thread (connections go on).
  void close_acceptor() {
    boost::asio::post(*iocs_[0], [this] {
      boost::system::error_code ignored;
      acceptor_->close(ignored);
    });
  }

  /// Lets answers already on their way be written (while `answering` is
  /// above 0, up to 2 s), then stops the io_contexts and joins the threads.
  void stop(const std::atomic<int>& answering) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (answering.load() > 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    stop_threads();
  }

private:
  void stop_threads() {
    for (auto& ioc : iocs_)
      ioc->stop();
    for (auto& t : threads_)
      if (t.joinable())
        t.join();
  }

  std::vector<std::unique_ptr<boost::asio::io_context>> iocs_;
  std::size_t next_ = 0; ///< only touched by the acceptor's thread
  std::optional<boost::asio::ip::tcp::acceptor> acceptor_;
  boost::asio::ip::tcp::endpoint bound_;
  std::vector<std::thread> threads_;
};

} // namespace prov::gateway
