#include "gateway/https_server.hpp"

#include <pthread.h>
#include <csignal>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <iostream>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/version.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/status.hpp>
#include <boost/beast/http/string_body.hpp>

#include "config/config.hpp"
#include "gateway/acceptor.hpp"
#include "gateway/connection_slots.hpp"
#include "gateway/device_api.hpp"
#include "gateway/mqtt_server.hpp"
#include "gateway/upgraded_connection.hpp"
#include "net/device_tls.hpp"
#include "net/http_feed.hpp"
#include "net/http_framing.hpp"
#include "net/openssl_handles.hpp"
#include "net/websocket.hpp"
#include "gateway/routes.hpp"
#include "messages/ascii.hpp"
#include "messages/crypto.hpp"
#include "messages/registration.hpp"
#include "metrics/diagnostic_log.hpp"
#include "metrics/instruments.hpp"

namespace prov::gateway {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

namespace {

using body_t = http::string_body;

void fill_request(http::request<body_t>& in, const std::string& ip, http_request& out) {
  out.method = std::string(in.method_string());
  out.target = std::string(in.target());
  split_target(out);
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


/// One TLS connection. OpenSSL reads and writes the socket itself
/// (SSL_set_fd); Asio only reports readiness (async_wait) and runs the
/// deadline. Asio's ssl::stream under Beast's read and write operations
/// copied every record through a BIO pair and ran five layers of composed
/// operations per request: 7.5% of the server's instructions per device,
/// about 10% of its CPU time (docs/performance.md, session 11).
///
/// A step is tried before waiting, and waits only on a want-read or
/// want-write from OpenSSL. The exception is the wait for the next request
/// when nothing is buffered: it starts at once, without a read that would
/// fail. That relies on Asio's epoll reactor re-arming the socket
/// (EPOLL_CTL_MOD) for every wait, which reports data that arrived before
/// the wait; the static_assert below makes a different Asio fail the build
/// instead of leaving such a request unread.
static_assert(BOOST_ASIO_VERSION == 101800,
              "session::start_request relies on Asio 1.18's epoll reactor re-arming the "
              "socket for every async_wait; check it still does, then update this");

class session : public std::enable_shared_from_this<session> {
public:
  /// Holds one of `slots` for `ip` (given back when the session ends).
  session(tcp::socket&& sock, std::string ip, SSL_CTX* ctx, handler& h,
          const server_options& opts, std::atomic<int>& answering, listener_slots& slots)
    : sock_(std::move(sock)), timer_(sock_.get_executor()), ssl_(SSL_new(ctx)), handler_(h),
      opts_(opts), answering_(answering), slots_(slots), ip_(std::move(ip)) {}

  ~session() {
    answered();
    if (!handed_over_)
      slots_.release(ip_);
  }

  void run() {
    net::dispatch(sock_.get_executor(), [self = shared_from_this()] { self->on_run(); });
  }

private:
  using clock = std::chrono::steady_clock;
  /// What the session is doing; a finished wait resumes it.
  enum class phase { handshake, reading, handling, writing, draining, closing, closed };

  /// Sets the deadline of what the session is doing now (handshake, one
  /// request, a write, a drain). One timer per session that only re-arms
  /// when it fires early: re-arming an asio timer per request costs a
  /// cancellation handler and timer-queue work on every request.
  void arm(int seconds) {
    timed_out_ = false; // an expired deadline is consumed by whatever it ended
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
      self->sock_.cancel(ignored); // the pending wait ends: on_interrupted()
    });
  }

  /// Waits until the socket is readable or writable, then resumes the phase.
  void wait(tcp::socket::wait_type w) {
    sock_.async_wait(w, [self = shared_from_this()](beast::error_code ec) {
      if (ec || self->timed_out_)
        return self->on_interrupted();
      self->resume();
    });
  }

  /// After an SSL call returned `r` <= 0: waits for what OpenSSL wants and
  /// returns true, or returns false when the connection failed.
  bool wait_for(int r) {
    switch (SSL_get_error(ssl_.get(), r)) {
    case SSL_ERROR_WANT_READ:
      wait(tcp::socket::wait_read);
      return true;
    case SSL_ERROR_WANT_WRITE:
      wait(tcp::socket::wait_write);
      return true;
    default:
      ERR_clear_error(); // the thread's queue must be empty for the next connection
      return false;
    }
  }

  void resume() {
    switch (phase_) {
    case phase::handshake: return handshake();
    case phase::reading: return read_request();
    case phase::writing: return write_some();
    case phase::draining: return drain_some();
    case phase::closing: return shutdown_some();
    case phase::handling:
    case phase::closed: return;
    }
  }

  /// A wait ended by the deadline, or by the socket closing under it.
  void on_interrupted() {
    if (timed_out_ && phase_ == phase::reading) {
      // Only answer when a request had started arriving (slowloris); idle
      // keep-alive connections just close.
      if (parser_ && parser_->got_some())
        return fail_and_close({error_code::request_timeout,
                               "request not received within "
                                 + std::to_string(opts_.request_timeout_seconds) + " s"});
      return shutdown();
    }
    if (timed_out_ && phase_ == phase::draining)
      return shutdown();
    close_now();
  }

  void on_run() {
    beast::error_code ec;
    sock_.non_blocking(true, ec);
    if (ec || !ssl_ || SSL_set_fd(ssl_.get(), static_cast<int>(sock_.native_handle())) != 1) {
      ERR_clear_error();
      return close_now();
    }
    SSL_set_accept_state(ssl_.get());
    phase_ = phase::handshake;
    arm(opts_.request_timeout_seconds);
    handshake();
  }

  void handshake() {
    ERR_clear_error();
    int r = SSL_do_handshake(ssl_.get());
    if (r == 1) {
      peer_chain_ = prov::net::peer_chain(ssl_.get());
      return start_request();
    }
    if (!wait_for(r))
      close_now();
  }

  void start_request() {
    phase_ = phase::reading;
    parser_.emplace();
    parser_->eager(true);
    parser_->body_limit(opts_.max_body_bytes);
    parser_->header_limit(static_cast<std::uint32_t>(opts_.max_header_bytes));
    // Idle keep-alive wait and request transfer share one deadline per request.
    arm(requests_ == 0 ? opts_.request_timeout_seconds
                       : std::max(opts_.request_timeout_seconds, opts_.idle_timeout_seconds));
    if (in_.size() == 0 && SSL_has_pending(ssl_.get()) == 0)
      return wait(tcp::socket::wait_read); // nothing buffered: a read now would only fail
    read_request();
  }

  /// Parses what is buffered (a pipelined request may be there already) and
  /// reads more until the request is complete.
  void read_request() {
    for (;;) {
      beast::error_code ec;
      switch (prov::net::feed(*parser_, in_, ec)) {
      case prov::net::feed_result::done: return on_request();
      case prov::net::feed_result::failed: return on_bad_request(ec);
      case prov::net::feed_result::need_more: break;
      }
      auto space = in_.prepare(read_chunk);
      ERR_clear_error();
      int n = SSL_read(ssl_.get(), space.data(), static_cast<int>(space.size()));
      if (n > 0) {
        in_.commit(static_cast<std::size_t>(n));
        continue;
      }
      int e = SSL_get_error(ssl_.get(), n);
      if (e == SSL_ERROR_ZERO_RETURN) {
        // close_notify. In the middle of a request the client still reads:
        // it learns why nothing was served (as with Beast's partial_message).
        if (parser_->got_some())
          return fail_and_close({error_code::bad_request,
                                 "malformed HTTP request: the connection was closed in the "
                                 "middle of the request"});
        return shutdown(); // answer with ours
      }
      if (!wait_for(n))
        return close_now(); // EOF without close_notify, reset, or a TLS error
      return;
    }
  }

  void on_bad_request(beast::error_code ec) {
    if (ec == http::error::body_limit)
      return fail_and_close({error_code::payload_too_large,
                             "body larger than " + std::to_string(opts_.max_body_bytes)
                               + " bytes"});
    if (ec == http::error::header_limit)
      return fail_and_close({error_code::headers_too_large, "request head too large"});
    fail_and_close({error_code::bad_request, std::string("malformed HTTP request: ") + ec.message()});
  }

  void on_request() {
    disarm();
    phase_ = phase::handling;
    ++requests_;
    auto req = parser_->release();
    keep_alive_ = req.keep_alive();
    version_ = req.version();
    http_request hr;
    fill_request(req, ip_, hr);
    if (peer_chain_)
      hr.client_chain_der = peer_chain_;
    bool unknown_coding = false;
    if (auto why = framing_ambiguity(hr.headers, version_, &unknown_coding); !why.empty())
      return fail_and_close(unknown_coding
                              ? error{error_code::not_implemented, why}
                              : error{error_code::bad_request, "malformed HTTP request: " + why});
    if (ws::is_upgrade(version_, hr.path, hr.headers))
      return upgrade(hr);
    auto self = shared_from_this();
    handling_ = true;
    answering_.fetch_add(1);
    handler_.handle(std::move(hr), [self](http_response resp) {
      net::post(self->sock_.get_executor(), [self, resp = std::move(resp)]() mutable {
        self->write(std::move(resp));
      });
    });
  }

  void fail_and_close(const error& e,
                      std::vector<std::pair<std::string, std::string>> headers = {}) {
    keep_alive_ = false;
    drain_ = true; // the client may still be sending the rest of the request
    auto resp = error_response(e, crypto::uuid4());
    resp.close = true;
    for (auto& h : headers)
      resp.headers.push_back(std::move(h));
    write(std::move(resp));
  }

  /// A request to switch to WebSocket: MQTT over WebSocket at
  /// /$iothub/websocket (the SDKs' MqttWs transports) is answered 101 and
  /// the connection handed to the MQTT server once that is written; any
  /// other upgrade gets an error saying why, and the connection closes.
  ///
  /// Like the routes' requests, an upgrade counts in [throttling]
  /// requests_per_minute_per_address (decided first: a flood of upgrades
  /// costs a map lookup, and a throttled one gets the 429 before any
  /// upgrade) and in dps_http_requests_total.
  void upgrade(const http_request& hr) {
    upgrade_route_ = hr.method == "GET" && hr.path == ws::mqtt_path
                       ? "GET " + std::string(ws::mqtt_path)
                       : "other";
    upgrade_started_ = clock::now();
    if (int wait = opts_.api != nullptr ? opts_.api->admit_address(ip_) : 0) {
      std::vector<std::pair<std::string, std::string>> retry;
      retry.emplace_back("Retry-After", std::to_string(wait));
      return fail_and_close({error_code::throttled,
                             "too many requests from this client address; retry after the "
                             "Retry-After interval"},
                            std::move(retry));
    }
    if (opts_.mqtt_ws == nullptr)
      return fail_and_close({error_code::not_found,
                             "MQTT over WebSocket is not served by this server ([mqtt] "
                             "websocket = false, or the gateway role is off)"});
    auto v = ws::check_upgrade(hr.method, version_, hr.path, hr.headers);
    if (v.status != 101) {
      const auto code = v.status == 404   ? error_code::not_found
                        : v.status == 405 ? error_code::method_not_allowed
                                          : error_code::bad_request;
      std::vector<std::pair<std::string, std::string>> extra;
      if (v.wrong_version)
        extra.emplace_back("Sec-WebSocket-Version", "13");
      return fail_and_close({code, v.why}, std::move(extra));
    }
    count_upgrade(101);
    upgrading_ = true;
    write_buf_ = ws::switching_protocols_response(v);
    phase_ = phase::writing;
    written_ = 0;
    arm(opts_.request_timeout_seconds);
    write_some();
  }

  /// The 101 is written: the socket, its TLS session and its connection
  /// slot go to the MQTT server; this session ends without closing them.
  void hand_over() {
    phase_ = phase::closed;
    disarm();
    timer_.cancel();
    upgraded_connection c{std::move(sock_), std::move(ssl_), ip_, {}, peer_chain_, &slots_};
    c.leftover = beast::buffers_to_string(in_.data());
    handed_over_ = true;
    opts_.mqtt_ws->adopt_websocket(std::move(c));
  }

  /// An upgrade request's answer, in the HTTP request metrics (the routes
  /// count the other requests).
  void count_upgrade(int status) {
    if (opts_.metrics != nullptr)
      opts_.metrics->http_request(
        upgrade_route_, status,
        std::chrono::duration<double>(clock::now() - upgrade_started_).count());
    upgrade_route_.clear();
  }

  void write(http_response r) {
    if (phase_ == phase::closed)
      return;
    if (!upgrade_route_.empty())
      count_upgrade(r.status); // a refused upgrade
    // Serialized by hand into one buffer: Beast's response object and
    // serializer cost a field allocation per header on every request.
    close_after_write_ = r.close || !keep_alive_;
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
    if (close_after_write_)
      out += "Connection: close\r\n";
    else if (version_ == 10)
      out += "Connection: keep-alive\r\n";
    out += "\r\n";
    if (r.status != 204)
      out += r.body;
    phase_ = phase::writing;
    written_ = 0;
    arm(opts_.request_timeout_seconds);
    write_some();
  }

  void write_some() {
    while (written_ < write_buf_.size()) {
      ERR_clear_error();
      // After a want-write, the same bytes again, as SSL_write requires.
      int n = SSL_write(ssl_.get(), write_buf_.data() + written_,
                        static_cast<int>(write_buf_.size() - written_));
      if (n <= 0) {
        if (!wait_for(n))
          close_now();
        return;
      }
      written_ += static_cast<std::size_t>(n);
    }
    disarm();
    answered();
    if (upgrading_)
      return hand_over();
    if (close_after_write_)
      return drain_ ? drain() : shutdown();
    start_request();
  }

  /// Lingering close: read and discard what the client is still sending
  /// (bounded in time and bytes) so closing does not reset the connection
  /// before the client has read our error response.
  void drain() {
    phase_ = phase::draining;
    arm(2); // one deadline for the whole drain
    drain_some();
  }

  void drain_some() {
    switch (discard_input()) {
    case discarded::limit:
    case discarded::peer_closed: return shutdown();
    case discarded::waiting: return;
    case discarded::failed: return close_now();
    }
  }

  enum class discarded { limit, peer_closed, waiting, failed };

  /// Reads and throws away what the client sends (up to 1 MiB over the
  /// connection's drain and close) until it closes, a wait starts, or the
  /// connection fails.
  discarded discard_input() {
    for (;;) {
      ERR_clear_error();
      int n = SSL_read(ssl_.get(), discard_.data(), static_cast<int>(discard_.size()));
      if (n > 0) {
        drained_ += static_cast<std::size_t>(n);
        if (drained_ > (1u << 20))
          return discarded::limit;
        continue;
      }
      if (SSL_get_error(ssl_.get(), n) == SSL_ERROR_ZERO_RETURN)
        return discarded::peer_closed;
      return wait_for(n) ? discarded::waiting : discarded::failed;
    }
  }

  /// Sends close_notify, then waits (up to 2 s) for the client's close_notify
  /// or EOF, discarding anything else it sends.
  void shutdown() {
    phase_ = phase::closing;
    arm(2); // a peer that never closes: the timer cancels the wait
    shutdown_some();
  }

  void shutdown_some() {
    if (!sent_close_notify_) {
      ERR_clear_error();
      int r = SSL_shutdown(ssl_.get());
      if (r < 0) {
        if (!wait_for(r))
          close_now();
        return;
      }
      sent_close_notify_ = true;
      if (r == 1)
        return close_now(); // the client's close_notify came first
    }
    if (discard_input() != discarded::waiting)
      close_now();
  }

  void close_now() {
    if (phase_ == phase::closed)
      return;
    phase_ = phase::closed;
    disarm();
    answered();
    timer_.cancel(); // releases the timer's reference to the session now
    beast::error_code ignored;
    sock_.shutdown(tcp::socket::shutdown_both, ignored);
    sock_.close(ignored);
  }

  /// SSL_read size: a whole TLS record (16 KiB of plaintext) fits.
  static constexpr std::size_t read_chunk = 16 * 1024;

  tcp::socket sock_;
  net::steady_timer timer_;
  prov::net::ssl_ptr ssl_; // after sock_: freed before the socket closes
  phase phase_ = phase::handshake;
  clock::time_point deadline_ = clock::time_point::max();
  bool timer_armed_ = false;
  std::string write_buf_;
  std::size_t written_ = 0;
  bool close_after_write_ = false;
  beast::flat_buffer in_; ///< decrypted bytes not parsed yet
  std::optional<http::request_parser<body_t>> parser_;
  handler& handler_;
  const server_options& opts_;
  std::atomic<int>& answering_; ///< the server's count of requests being answered
  bool handling_ = false;       ///< this session's request counts in answering_
  listener_slots& slots_;
  std::string ip_;
  std::shared_ptr<const client_chain> peer_chain_; ///< client certificates, if any
  bool keep_alive_ = true;
  bool timed_out_ = false;
  unsigned version_ = 11;
  uint64_t requests_ = 0;
  bool drain_ = false;
  bool upgrading_ = false;   ///< writing a 101: hand over when done
  std::string upgrade_route_; ///< an upgrade request not counted yet: its route label
  clock::time_point upgrade_started_;
  bool handed_over_ = false; ///< the MQTT server holds the socket and the slot
  bool sent_close_notify_ = false;
  std::size_t drained_ = 0;
  std::array<char, 16384> discard_;
};

class server_impl final : public https_server {
public:
  server_impl(const server_options& opts, handler& h)
    : opts_(opts), handler_(h), pool_(opts_.threads) {
    backoff_.emplace(pool_.first());
  }

  ~server_impl() override { stop(); }

  error start() {
    if (auto err = prov::net::make_device_tls_context(opts_.cert_chain_file, opts_.key_file,
                                                      "provisiond-device-api", ssl_))
      return err;
    // OpenSSL writes to the socket itself (write(2), not send with
    // MSG_NOSIGNAL): a peer gone mid-write must not kill the process.
    std::signal(SIGPIPE, SIG_IGN);
    if (auto err = pool_.listen(opts_.listen, "device API"))
      return err;
    accept();
    pool_.run("prov-http");
    return {};
  }

  uint16_t port() const override { return pool_.port(); }
  std::string address() const override { return pool_.address(); }
  int open_connections() const override { return slots_.open(); }

  void stop_accepting() override {
    if (accepting_stopped_.exchange(true))
      return;
    pool_.close_acceptor();
  }

  void stop() override {
    if (stopped_.exchange(true))
      return;
    stop_accepting();
    // Answers already on their way are written first (up to 2 s): a
    // register parked until the engine's drain gets the 202 the drain gave
    // it, not a dropped connection.
    pool_.stop(answering_);
  }

private:
  using clock = std::chrono::steady_clock;

  void accept() {
    pool_.acceptor().async_accept(pool_.next(), [this](beast::error_code ec, tcp::socket sock) {
      if (ec == net::error::operation_aborted || !pool_.acceptor().is_open())
        return;
      if (ec)
        return on_accept_error(ec);
      if (accept_failures_ > 0) {
        note("device API: accepting again after "
               + std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                  clock::now() - failing_since_)
                                  .count())
               + " ms (" + std::to_string(accept_failures_) + " failed accepts)",
             false);
        accept_failures_ = 0;
      }
      admit(std::move(sock));
      accept();
    });
  }

  /// Out of descriptors (EMFILE, ENFILE) or kernel memory: accepting again
  /// at once fails again at once, a busy loop that starves the I/O thread.
  /// Waits 100 ms instead; clients queue in the listen backlog meanwhile.
  void on_accept_error(const beast::error_code& ec) {
    const int e = ec.value();
    // Any other error (the client reset, a network error on its
    // connection) concerns one connection: retry at once.
    const char* name = exhausted_resource(e);
    if (name == nullptr)
      return accept();
    if (opts_.metrics != nullptr)
      opts_.metrics->accept_failed(name);
    if (accept_failures_++ == 0) { // once per episode
      failing_since_ = clock::now();
      std::string why = "device API: accept failed (" + ec.message() + ", "
                        + std::to_string(slots_.open_total()) + " connections open); ";
      if (e == EMFILE || e == ENFILE)
        why += "out of file descriptors: lower device_api.max_connections or raise the "
               "descriptor limit (LimitNOFILE=). ";
      note(why + "New clients wait in the listen backlog; retrying every 100 ms", true);
    }
    backoff_->expires_after(std::chrono::milliseconds(100));
    backoff_->async_wait([this](beast::error_code wait_ec) {
      if (!wait_ec && pool_.acceptor().is_open())
        accept();
    });
  }

  /// Starts a session, or closes the connection at once when a cap is
  /// reached: no TLS handshake, no buffers, one descriptor for a moment.
  void admit(tcp::socket sock) {
    beast::error_code ec;
    std::string ip = client_address(sock);
    switch (slots_.acquire(ip)) {
    case connection_slots::verdict::admitted:
      // The episode ends once well below the cap, so a server that sits at
      // it logs once, not on every connection that comes and goes.
      if (refusing_ && slots_.open_total() <= slots_.max_total() * 9 / 10) {
        refusing_ = false;
        note("device API: below max_connections again; refused " + std::to_string(refused_)
               + " connections at the cap",
             false);
        refused_ = 0;
      }
      sock.set_option(tcp::no_delay(true), ec);
      std::make_shared<session>(std::move(sock), std::move(ip), ssl_.get(), handler_, opts_,
                                answering_, slots_)
        ->run();
      return;
    case connection_slots::verdict::over_total:
      ++refused_;
      if (opts_.metrics != nullptr)
        opts_.metrics->connection_refused("max_connections");
      if (!refusing_) {
        refusing_ = true;
        note("device API: " + std::to_string(slots_.max_total())
               + " connections open (device_api.max_connections): new connections are "
                 "closed at once until some end",
             true);
      }
      break;
    case connection_slots::verdict::over_client:
      if (opts_.metrics != nullptr)
        opts_.metrics->connection_refused("max_connections_per_client");
      break;
    }
    sock.close(ec);
  }

  /// A line on stderr (the operator sees it under systemd too) and in the
  /// diagnostic log.
  void note(const std::string& line, bool warning) {
    std::cerr << "provisiond: " << (warning ? "WARNING: " : "") << line << std::endl;
    if (opts_.log != nullptr) {
      if (warning)
        opts_.log->warn(line);
      else
        opts_.log->info(line);
    }
  }

  server_options opts_;
  handler& handler_;
  /// Requests handed to the handler and not yet answered; declared before
  /// iocs_ so it outlives the sessions they own.
  std::atomic<int> answering_{0};
  /// Likewise: sessions give their slot back when the io_contexts free them.
  connection_slots own_slots_{opts_.max_connections, opts_.max_connections_per_client};
  listener_slots slots_{opts_.shared_slots != nullptr ? *opts_.shared_slots : own_slots_};
  io_pool pool_;
  prov::net::ssl_ctx_ptr ssl_;
  std::optional<net::steady_timer> backoff_; ///< accept retry after a failure
  // Acceptor thread only:
  uint64_t accept_failures_ = 0; ///< in the current episode
  clock::time_point failing_since_;
  bool refusing_ = false; ///< at max_connections, logged
  uint64_t refused_ = 0;
  std::atomic<bool> stopped_{false};
  std::atomic<bool> accepting_stopped_{false};
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
