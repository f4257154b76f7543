#include "gateway/metrics_server.hpp"

#include <pthread.h>
#include <atomic>
#include <thread>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "gateway/acceptor.hpp"

namespace prov::gateway {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

namespace {

/// One connection: read a request, answer, repeat while keep-alive. Every
/// read and write has a deadline, so a stalled client cannot pin the thread.
class metrics_session : public std::enable_shared_from_this<metrics_session> {
public:
  metrics_session(tcp::socket&& sock, const metrics_server_options& opts)
    : stream_(std::move(sock)), opts_(opts) {}

  void read() {
    parser_.emplace();
    parser_->header_limit(8192);
    parser_->body_limit(4096);
    stream_.expires_after(std::chrono::seconds(10));
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, std::size_t) {
                       if (ec)
                         return self->close();
                       self->answer(self->parser_->release());
                     });
  }

private:
  void answer(const http::request<http::string_body>& req) {
    auto res = std::make_shared<http::response<http::string_body>>();
    res->version(req.version());
    res->set(http::field::server, "provisiond");
    res->keep_alive(req.keep_alive());
    std::string_view target(req.target().data(), req.target().size());
    target = target.substr(0, target.find('?'));
    if (req.method() != http::verb::get && req.method() != http::verb::head) {
      res->result(http::status::method_not_allowed);
      res->set(http::field::allow, "GET, HEAD");
      res->set(http::field::content_type, "text/plain; charset=utf-8");
      res->body() = "use GET\n";
    } else if (target == "/metrics") {
      res->result(http::status::ok);
      res->set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
      res->body() = opts_.scrape ? opts_.scrape() : std::string();
    } else if (target == "/healthz") {
      res->result(http::status::ok);
      res->set(http::field::content_type, "application/json; charset=utf-8");
      res->body() = R"({"status":"ok"})";
    } else if (target == "/readyz") {
      auto reason = opts_.not_ready_reason ? opts_.not_ready_reason() : std::string();
      res->set(http::field::content_type, "application/json; charset=utf-8");
      if (reason.empty()) {
        res->result(http::status::ok);
        res->body() = R"({"status":"ready"})";
      } else {
        res->result(http::status::service_unavailable);
        std::string esc;
        for (char c : reason)
          if (c != '"' && c != '\\' && static_cast<unsigned char>(c) >= 0x20)
            esc.push_back(c);
        res->body() = R"({"status":"not ready","reason":")" + esc + "\"}";
      }
    } else {
      res->result(http::status::not_found);
      res->set(http::field::content_type, "text/plain; charset=utf-8");
      res->body() = "not found; try /metrics, /healthz or /readyz\n";
    }
    res->prepare_payload();
    if (req.method() == http::verb::head)
      res->body().clear(); // Content-Length stays that of the GET body
    stream_.expires_after(std::chrono::seconds(10));
    http::async_write(stream_, *res,
                      [self = shared_from_this(), res](beast::error_code ec, std::size_t) {
                        if (ec || !res->keep_alive())
                          return self->close();
                        self->read();
                      });
  }

  void close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.socket().close(ignored);
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  const metrics_server_options& opts_;
};

class metrics_server_impl final : public metrics_server {
public:
  explicit metrics_server_impl(metrics_server_options opts)
    : opts_(std::move(opts)), acceptor_(ioc_) {}
  ~metrics_server_impl() override { stop(); }

  error start() {
    if (auto err = open_acceptor(acceptor_, opts_.listen, 64, "metrics"))
      return err;
    beast::error_code ec;
    bound_ = acceptor_.local_endpoint(ec);
    accept();
    thread_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "prov-metrics");
      ioc_.run();
    });
    return {};
  }

  uint16_t port() const override { return bound_.port(); }
  std::string address() const override { return bound_.address().to_string(); }

  void stop() override {
    if (stopped_.exchange(true))
      return;
    ioc_.stop();
    if (thread_.joinable())
      thread_.join();
  }

private:
  void accept() {
    acceptor_.async_accept([this](beast::error_code ec, tcp::socket sock) {
      if (ec == net::error::operation_aborted || !acceptor_.is_open())
        return;
      if (!ec) {
        std::make_shared<metrics_session>(std::move(sock), opts_)->read();
        return accept();
      }
      // Out of descriptors and the like: back off instead of spinning.
      backoff_.expires_after(std::chrono::milliseconds(100));
      backoff_.async_wait([this](beast::error_code wait_ec) {
        if (!wait_ec)
          accept();
      });
    });
  }

  metrics_server_options opts_;
  net::io_context ioc_;
  tcp::acceptor acceptor_;
  net::steady_timer backoff_{ioc_};
  tcp::endpoint bound_;
  std::thread thread_;
  std::atomic<bool> stopped_{false};
};

} // namespace

error metrics_server::start(metrics_server_options opts, std::unique_ptr<metrics_server>& out) {
  auto impl = std::make_unique<metrics_server_impl>(std::move(opts));
  if (auto err = impl->start())
    return err;
  out = std::move(impl);
  return {};
}

} // namespace prov::gateway
