#include "gateway/https_server.hpp"

#include <pthread.h>
#include <array>
#include <atomic>
#include <chrono>
#include <optional>
#include <thread>
#include <vector>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include <openssl/ssl.h>

#include "config/config.hpp"
#include "gateway/acceptor.hpp"
#include "gateway/routes.hpp"
#include "messages/ascii.hpp"
#include "messages/crypto.hpp"
#include "messages/registration.hpp"

namespace prov::gateway {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
namespace ssl = net::ssl;
using tcp = net::ip::tcp;

namespace {

using body_t = http::string_body;

void fill_request(http::request<body_t>& in, const std::string& ip, http_request& out) {
  out.method = std::string(in.method_string());
  out.target = std::string(in.target());
  auto q = out.target.find('?');
  out.path = out.target.substr(0, q);
  if (q != std::string::npos) {
    std::string_view qs(out.target);
    qs.remove_prefix(q + 1);
    while (!qs.empty()) {
      auto amp = qs.find('&');
      auto part = qs.substr(0, amp);
      auto eq = part.find('=');
      auto k = crypto::url_decode(part.substr(0, eq));
      auto v = eq == std::string_view::npos ? std::optional<std::string>{""}
                                            : crypto::url_decode(part.substr(eq + 1));
      if (k && v && !k->empty())
        out.query.emplace(*k, *v);
      if (amp == std::string_view::npos)
        break;
      qs.remove_prefix(amp + 1);
    }
  }
  for (const auto& f : in) {
    auto n = f.name_string();
    std::string name(n.data(), n.size());
    for (auto& c : name)
      c = ascii::lower(c);
    auto v = f.value();
    out.headers.emplace_back(std::move(name), std::string(v.data(), v.size()));
  }
  out.body = std::move(in.body());
  out.client_ip = ip;
}

class session : public std::enable_shared_from_this<session> {
public:
  session(tcp::socket&& sock, ssl::context& ctx, handler& h, const server_options& opts,
          std::atomic<int>& answering)
    : stream_(std::move(sock), ctx), timer_(stream_.get_executor()), handler_(h),
      opts_(opts), answering_(answering) {
    beast::error_code ec;
    auto ep = beast::get_lowest_layer(stream_).socket().remote_endpoint(ec);
    if (!ec)
      ip_ = ep.address().to_string();
  }

  ~session() { answered(); }

  void run() {
    net::dispatch(stream_.get_executor(),
                  beast::bind_front_handler(&session::on_run, shared_from_this()));
  }

private:
  using clock = std::chrono::steady_clock;

  /// Sets the deadline of what the session is doing now (handshake, one
  /// request, a write, a drain). One timer per session that only re-arms
  /// when it fires early: re-arming an asio timer per request costs a
  /// cancellation handler and timer-queue work on every request.
  void arm(int seconds) {
    deadline_ = clock::now() + std::chrono::seconds(seconds);
    if (timer_armed_ && timer_.expiry() <= deadline_)
      return; // fires first, and re-arms for the rest then
    start_timer();
  }

  void disarm() { deadline_ = clock::time_point::max(); }

  /// A request handed to the handler has its answer written (or the
  /// connection is gone): the server's stop() waits for these.
  void answered() {
    if (handling_) {
      handling_ = false;
      answering_.fetch_sub(1);
    }
  }

  void start_timer() {
    timer_armed_ = true;
    timer_.expires_at(deadline_); // cancels a later pending wait (operation_aborted)
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec)
        return; // replaced by an earlier deadline, or the session closed
      self->timer_armed_ = false;
      if (self->deadline_ == clock::time_point::max())
        return; // nothing pending; the next arm() starts the timer again
      if (clock::now() < self->deadline_)
        return self->start_timer();
      self->timed_out_ = true;
      beast::error_code ignored;
      beast::get_lowest_layer(self->stream_).socket().cancel(ignored);
    });
  }

  void on_run() {
    arm(opts_.request_timeout_seconds);
    stream_.async_handshake(ssl::stream_base::server,
                            beast::bind_front_handler(&session::on_handshake,
                                                      shared_from_this()));
  }

  void on_handshake(beast::error_code ec) {
    if (ec)
      return close_now();
    read();
  }

  void read() {
    // A deadline that expired just as the previous write completed must not
    // fail this new request.
    timed_out_ = false;
    parser_.emplace();
    parser_->body_limit(opts_.max_body_bytes);
    parser_->header_limit(static_cast<std::uint32_t>(opts_.max_header_bytes));
    // Idle keep-alive wait and request transfer share one deadline per request.
    arm(requests_ == 0 ? opts_.request_timeout_seconds
                       : std::max(opts_.request_timeout_seconds, opts_.idle_timeout_seconds));
    http::async_read(stream_, buffer_, *parser_,
                     beast::bind_front_handler(&session::on_read, shared_from_this()));
  }

  void on_read(beast::error_code ec, std::size_t) {
    if (ec == http::error::end_of_stream || ec == net::error::eof
        || ec == ssl::error::stream_truncated)
      return shutdown();
    if (timed_out_) {
      // Only answer when a request had started arriving (slowloris); idle
      // keep-alive connections just close.
      if (parser_ && parser_->got_some())
        return fail_and_close({error_code::request_timeout,
                               "request not received within "
                                 + std::to_string(opts_.request_timeout_seconds) + " s"});
      return shutdown();
    }
    if (ec == http::error::body_limit)
      return fail_and_close({error_code::payload_too_large,
                             "body larger than " + std::to_string(opts_.max_body_bytes)
                               + " bytes"});
    if (ec == http::error::header_limit)
      return fail_and_close({error_code::headers_too_large, "request head too large"});
    if (ec) {
      if (parser_ && parser_->got_some())
        return fail_and_close({error_code::bad_request,
                               std::string("malformed HTTP request: ") + ec.message()});
      return close_now();
    }
    disarm();
    ++requests_;
    auto req = parser_->release();
    keep_alive_ = req.keep_alive();
    version_ = req.version();
    http_request hr;
    fill_request(req, ip_, hr);
    auto self = shared_from_this();
    handling_ = true;
    answering_.fetch_add(1);
    handler_.handle(std::move(hr), [self](http_response resp) {
      net::post(self->stream_.get_executor(), [self, resp = std::move(resp)]() mutable {
        self->write(std::move(resp));
      });
    });
  }

  void fail_and_close(const error& e) {
    keep_alive_ = false;
    drain_ = true; // the client may still be sending the rest of the request
    auto resp = error_response(e, crypto::uuid4());
    resp.close = true;
    write(std::move(resp));
  }

  void write(http_response r) {
    // Serialized by hand into one buffer: Beast's response object and
    // serializer cost a field allocation per header on every request.
    bool close = r.close || !keep_alive_;
    auto& out = write_buf_;
    out.clear();
    out += version_ == 10 ? "HTTP/1.0 " : "HTTP/1.1 ";
    out += std::to_string(r.status);
    out += ' ';
    auto reason = http::obsolete_reason(static_cast<http::status>(r.status));
    out.append(reason.data(), reason.size());
    out += "\r\nServer: provisiond\r\n";
    if (r.status != 204) {
      out += "Content-Type: application/json; charset=utf-8\r\nContent-Length: ";
      out += std::to_string(r.body.size());
      out += "\r\n";
    }
    for (auto& [k, v] : r.headers) {
      out += k;
      out += ": ";
      // Values are ours, but one may echo a client's token: never let it
      // split the head (response splitting).
      if (v.find_first_of("\r\n") == std::string::npos) {
        out += v;
      } else {
        for (char c : v)
          out += (c == '\r' || c == '\n') ? ' ' : c;
      }
      out += "\r\n";
    }
    if (close)
      out += "Connection: close\r\n";
    else if (version_ == 10)
      out += "Connection: keep-alive\r\n";
    out += "\r\n";
    if (r.status != 204)
      out += r.body;
    arm(opts_.request_timeout_seconds);
    net::async_write(stream_, net::buffer(out),
                     [self = shared_from_this(), close](beast::error_code ec, std::size_t) {
                       self->disarm();
                       self->answered();
                       if (ec)
                         return self->close_now();
                       if (close)
                         return self->drain_ ? self->drain() : self->shutdown();
                       self->read();
                     });
  }

  /// Lingering close: read and discard what the client is still sending
  /// (bounded in time and bytes) so closing does not reset the connection
  /// before the client has read our error response.
  void drain() {
    arm(2); // one deadline for the whole drain
    drain_some();
  }

  void drain_some() {
    stream_.async_read_some(
      net::buffer(discard_), [self = shared_from_this()](beast::error_code ec, std::size_t n) {
        self->drained_ += n;
        if (ec || self->timed_out_ || self->drained_ > (1u << 20))
          return self->shutdown();
        self->drain_some();
      });
  }

  void shutdown() {
    arm(2); // a peer that never answers close_notify: the timer cancels the socket
    stream_.async_shutdown([self = shared_from_this()](beast::error_code) {
      self->close_now();
    });
  }

  void close_now() {
    disarm();
    answered();
    timer_.cancel(); // releases the timer's reference to the session now
    beast::error_code ignored;
    beast::get_lowest_layer(stream_).socket().shutdown(tcp::socket::shutdown_both, ignored);
    beast::get_lowest_layer(stream_).socket().close(ignored);
  }

  beast::ssl_stream<beast::tcp_stream> stream_;
  net::steady_timer timer_;
  clock::time_point deadline_ = clock::time_point::max();
  bool timer_armed_ = false;
  std::string write_buf_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<body_t>> parser_;
  handler& handler_;
  const server_options& opts_;
  std::atomic<int>& answering_; ///< the server's count of requests being answered
  bool handling_ = false;       ///< this session's request counts in answering_
  std::string ip_;
  bool keep_alive_ = true;
  bool timed_out_ = false;
  unsigned version_ = 11;
  uint64_t requests_ = 0;
  bool drain_ = false;
  std::size_t drained_ = 0;
  std::array<char, 16384> discard_;
};

class server_impl final : public https_server {
public:
  server_impl(const server_options& opts, handler& h)
    : opts_(opts), handler_(h), ssl_(ssl::context::tls_server) {
    // One io_context per I/O thread, each connection pinned to one of them:
    // a shared io_context hands every completed read to whichever thread is
    // idle, a futex wake-up and a context switch per handler on 2 cores.
    int n = opts_.threads > 0 ? opts_.threads
                              : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    for (int i = 0; i < n; ++i)
      iocs_.push_back(std::make_unique<net::io_context>(1));
    acceptor_.emplace(*iocs_[0]);
  }

  ~server_impl() override { stop(); }

  error start() {
    SSL_CTX* raw = ssl_.native_handle();
    SSL_CTX_set_min_proto_version(raw, TLS1_2_VERSION);
    SSL_CTX_set_max_proto_version(raw, TLS1_3_VERSION);
    SSL_CTX_set_options(raw, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION
                               | SSL_OP_CIPHER_SERVER_PREFERENCE);
    // TLS 1.2: ECDHE with AEAD only (Mozilla "intermediate").
    SSL_CTX_set_cipher_list(raw, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                                 "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                                 "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305");
    // Resumption through session tickets only (stateless, TLS 1.2 and 1.3).
    // A server-side session cache keeps every new session (up to 20,480,
    // a few MB) and sweeps the whole table every 255 handshakes: measurable
    // CPU when every device opens a new connection, for a resumption path
    // (TLS 1.2 session ids) that ticket-capable clients do not need.
    SSL_CTX_set_session_cache_mode(raw, SSL_SESS_CACHE_OFF);
    beast::error_code ec;
    ssl_.use_certificate_chain_file(opts_.cert_chain_file, ec);
    if (ec)
      return {error_code::bad_request,
              "cannot load TLS certificate chain '" + opts_.cert_chain_file + "': "
                + ec.message()};
    ssl_.use_private_key_file(opts_.key_file, ssl::context::pem, ec);
    if (ec)
      return {error_code::bad_request,
              "cannot load TLS private key '" + opts_.key_file + "': " + ec.message()};
    if (auto err = open_acceptor(*acceptor_, opts_.listen,
                                 net::socket_base::max_listen_connections, "device API"))
      return err;
    bound_ = acceptor_->local_endpoint(ec);
    accept();
    for (auto& ioc : iocs_)
      threads_.emplace_back([ioc = ioc.get()] {
        pthread_setname_np(pthread_self(), "prov-http"); // names threads in perf and top
        auto work = net::make_work_guard(*ioc); // idle threads wait for connections
        ioc->run();
      });
    return {};
  }

  uint16_t port() const override { return bound_.port(); }
  std::string address() const override { return bound_.address().to_string(); }

  void stop() override {
    if (stopped_.exchange(true))
      return;
    net::post(*iocs_[0], [this] {
      beast::error_code ignored;
      acceptor_->close(ignored);
    });
    // Answers already on their way are written first (up to 2 s): a
    // register parked until the engine's drain gets the 202 the drain gave
    // it, not a dropped connection.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (answering_.load() > 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    for (auto& ioc : iocs_)
      ioc->stop();
    for (auto& t : threads_)
      if (t.joinable())
        t.join();
  }

private:
  void accept() {
    auto& target = *iocs_[next_ioc_++ % iocs_.size()];
    acceptor_->async_accept(target, [this](beast::error_code ec, tcp::socket sock) {
      if (ec == net::error::operation_aborted || !acceptor_->is_open())
        return;
      if (!ec) {
        sock.set_option(tcp::no_delay(true), ec);
        std::make_shared<session>(std::move(sock), ssl_, handler_, opts_, answering_)->run();
      }
      accept();
    });
  }

  server_options opts_;
  handler& handler_;
  /// Requests handed to the handler and not yet answered; declared before
  /// iocs_ so it outlives the sessions they own.
  std::atomic<int> answering_{0};
  std::vector<std::unique_ptr<net::io_context>> iocs_;
  std::size_t next_ioc_ = 0; ///< only touched by the acceptor's thread
  ssl::context ssl_;
  std::optional<tcp::acceptor> acceptor_;
  tcp::endpoint bound_;
  std::vector<std::thread> threads_;
  std::atomic<bool> stopped_{false};
};

} // namespace

error https_server::start(const server_options& opts, handler& h,
                          std::unique_ptr<https_server>& out) {
  auto impl = std::make_unique<server_impl>(opts, h);
  if (auto err = impl->start())
    return err;
  out = std::move(impl);
  return {};
}

} // namespace prov::gateway
