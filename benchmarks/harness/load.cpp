#include "benchmarks/harness/load.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include <unistd.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>
#include <nlohmann/json.hpp>
#include <openssl/x509v3.h>

#include "actors/attestation/sas_token.hpp"
#include "benchmarks/harness/answer_scan.hpp"
#include "benchmarks/harness/process.hpp"
#include "net/http_feed.hpp"
#include "net/mqtt_codec.hpp"
#include "net/websocket.hpp"
#include "net/openssl_handles.hpp"
#include "messages/crypto.hpp"

namespace bench {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using steady = std::chrono::steady_clock;

const char* to_string(load_mode m) {
  switch (m) {
  case load_mode::keepalive: return "keepalive";
  case load_mode::newconn: return "newconn";
  case load_mode::reference: return "reference";
  case load_mode::reference_keepalive: return "reference-keepalive";
  case load_mode::bulk: return "bulk";
  case load_mode::mqtt: return "mqtt";
  case load_mode::mqtt_ws: return "mqtt-ws";
  }
  return "?";
}

bool persistent(load_mode m) {
  return m == load_mode::keepalive || m == load_mode::bulk
         || m == load_mode::reference_keepalive;
}

namespace {

double ms_since(steady::time_point t) {
  return std::chrono::duration<double, std::milli>(steady::now() - t).count();
}

int64_t system_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
           std::chrono::system_clock::now().time_since_epoch())
    .count();
}

bool is_ip_literal(const std::string& h) {
  boost::system::error_code ec;
  asio::ip::make_address(h, ec);
  return !ec;
}

/// What all connections share (read-only while running, plus atomics).
struct shared_state {
  const load_options& o;
  std::atomic<uint64_t> next{0};
  uint64_t limit = UINT64_MAX;
  std::atomic<bool> go{false};
  steady::time_point deadline = steady::time_point::max();
  steady::time_point t0; ///< start of the measured phase (open loop: due times from here)
  std::atomic<uint64_t> started{0}, succeeded{0}, failed{0}, ready{0}, connect_failed{0};
  std::atomic<int> running_threads{0};
  explicit shared_state(const load_options& opts) : o(opts) {}

  bool take(uint64_t& idx) {
    if (o.interrupted && o.interrupted->load())
      return false;
    if (steady::now() >= deadline)
      return false;
    idx = next.fetch_add(1, std::memory_order_relaxed);
    if (idx >= limit)
      return false;
    started.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
};

/// One io_context and thread, and the statistics its connections collect.
struct thread_ctx {
  shared_state& sh;
  asio::io_context ioc{1};
  prov::net::ssl_ctx_ptr ssl_ctx{SSL_CTX_new(TLS_client_method())};
  tcp::endpoint endpoint;
  std::string host_header;
  bool verify_ip = false;
  load_result stats; // merged after the run
  std::vector<std::function<void()>> waiting; // connected, waiting for go

  explicit thread_ctx(shared_state& s) : sh(s) {}

  void error(const std::string& code, const std::string& msg) {
    ++stats.errors[code];
    if (stats.error_samples.size() < 5)
      stats.error_samples.push_back(code + ": " + msg);
  }
};

/// The error code of a DPS error body, or "http<status>".
std::string error_code_of(int status, const std::string& body) {
  auto j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_object() && j.contains("errorCode") && j["errorCode"].is_number_integer())
    return std::to_string(j["errorCode"].get<int64_t>());
  return "http" + std::to_string(status);
}

class conn : public std::enable_shared_from_this<conn> {
public:
  explicit conn(thread_ctx& t) : t_(t), o_(t.sh.o), timer_(t.ioc), io_timer_(t.ioc) {}

  void start() {
    if (persistent(o_.mode))
      connect([self = shared_from_this()] { self->t_.sh.ready.fetch_add(1); self->wait_go(); });
    else
      wait_go();
  }

private:
  using body_t = http::string_body;

  // ---- connection management ------------------------------------------------

  void wait_go() {
    if (t_.sh.go.load())
      return next();
    t_.waiting.push_back([self = shared_from_this()] { self->next(); });
  }

  // ---- transport: OpenSSL on the socket, Asio for readiness and deadlines ------
  //
  // Asio's ssl::stream under Beast's operations copied every record through
  // a BIO pair and ran several layers of composed operations per request; the
  // harness shares the two cores with the server, so that was taken from the
  // server. The same scheme as the server's sessions (gateway/https_server.cpp).

  /// Sets the deadline of the current connect, exchange or shutdown (and
  /// forgets an expired one). One timer that re-arms only when it fires
  /// early (no timer-queue work per request).
  void arm(std::chrono::seconds limit) {
    timed_out_ = false;
    deadline_ = steady::now() + limit;
    if (io_timer_armed_ && io_timer_.expiry() <= deadline_)
      return;
    start_io_timer();
  }

  void arm() { arm(std::chrono::seconds(o_.request_timeout_s)); }

  void disarm() { deadline_ = steady::time_point::max(); }

  void start_io_timer() {
    io_timer_armed_ = true;
    io_timer_.expires_at(deadline_);
    io_timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec)
        return;
      self->io_timer_armed_ = false;
      if (self->deadline_ == steady::time_point::max())
        return;
      if (steady::now() < self->deadline_)
        return self->start_io_timer();
      self->timed_out_ = true;
      beast::error_code ignored;
      if (self->sock_)
        self->sock_->cancel(ignored); // the pending wait ends with an error
    });
  }

  /// Waits for readiness, then calls `step`; a deadline or a closed socket
  /// calls `failed` instead.
  template <class Step, class Failed>
  void wait(tcp::socket::wait_type w, Step step, Failed failed) {
    sock_->async_wait(w, [self = shared_from_this(), step, failed](beast::error_code ec) mutable {
      if (ec || self->timed_out_)
        return failed();
      step();
    });
  }

  /// After an SSL call returned `r` <= 0: the wait OpenSSL asks for, or none
  /// when the connection failed (its OpenSSL error code in `ssl_err`).
  std::optional<tcp::socket::wait_type> want(int r, int& ssl_err) {
    ssl_err = SSL_get_error(ssl_.get(), r);
    if (ssl_err == SSL_ERROR_WANT_READ)
      return tcp::socket::wait_read;
    if (ssl_err == SSL_ERROR_WANT_WRITE)
      return tcp::socket::wait_write;
    return std::nullopt;
  }

  std::string ssl_failure(const char* what, int ssl_err) {
    std::string msg = what;
    if (ssl_err == SSL_ERROR_ZERO_RETURN)
      msg += ": the server closed the connection";
    else if (ssl_err == SSL_ERROR_SYSCALL)
      msg += errno ? std::string(": ") + std::strerror(errno) : ": connection closed";
    else if (auto e = ERR_peek_error())
      msg += std::string(": ") + ERR_reason_error_string(e);
    ERR_clear_error();
    return msg;
  }

  template <class Then>
  void connect(Then then) {
    close_socket();
    sock_.emplace(t_.ioc);
    ssl_.reset(SSL_new(t_.ssl_ctx.get()));
    in_.clear();
    server_wants_close_ = false;
    SSL* ssl = ssl_.get();
    if (ssl == nullptr)
      return connect_failed("tls", ssl_failure("SSL_new", SSL_ERROR_SSL));
    const std::string& name = o_.tls_name.empty() ? o_.host : o_.tls_name;
    if (!o_.insecure) {
      if (is_ip_literal(name))
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name.c_str());
      else
        SSL_set1_host(ssl, name.c_str());
    }
    if (!is_ip_literal(name))
      SSL_set_tlsext_host_name(ssl, name.c_str());
    if (o_.client_identity && !o_.client_identity(idx_, ssl))
      return connect_failed("tls", "no client certificate for device " + std::to_string(idx_));
    conn_start_ = steady::now();
    arm();
    sock_->async_connect(t_.endpoint, [self = shared_from_this(), then](beast::error_code ec) mutable {
      if (ec || self->timed_out_)
        return self->connect_failed(self->timed_out_ ? "timeout" : "connection",
                                    "connect: " + (self->timed_out_ ? std::string("timed out")
                                                                    : ec.message()));
      beast::error_code ignored;
      self->sock_->set_option(tcp::no_delay(true), ignored);
      self->sock_->non_blocking(true, ignored);
      if (SSL_set_fd(self->ssl_.get(), static_cast<int>(self->sock_->native_handle())) != 1)
        return self->connect_failed("tls", self->ssl_failure("SSL_set_fd", SSL_ERROR_SSL));
      SSL_set_connect_state(self->ssl_.get());
      self->handshake(std::move(then));
    });
  }

  template <class Then>
  void handshake(Then then) {
    ERR_clear_error();
    int r = SSL_do_handshake(ssl_.get());
    if (r == 1) {
      disarm();
      t_.stats.handshake.push_back(ms_since(conn_start_));
      ++t_.stats.connections;
      connected_ = true;
      return then();
    }
    int err = 0;
    auto w = want(r, err);
    if (!w) {
      std::string msg = ssl_failure("TLS handshake", err);
      long vr = SSL_get_verify_result(ssl_.get());
      if (vr != X509_V_OK)
        msg += std::string(" (") + X509_verify_cert_error_string(vr) + ")";
      return connect_failed("tls", msg);
    }
    auto self = shared_from_this();
    wait(*w,
         [self, then]() mutable { self->handshake(std::move(then)); },
         [self] {
           self->connect_failed(self->timed_out_ ? "timeout" : "tls",
                                "TLS handshake: " + std::string(self->timed_out_ ? "timed out"
                                                                                  : "aborted"));
         });
  }

  void connect_failed(const std::string& code, const std::string& msg) {
    connected_ = false;
    close_socket();
    if (!t_.sh.go.load()) {
      // Pre-connect phase: this slot is lost; report and stop.
      t_.error(code, msg);
      t_.sh.connect_failed.fetch_add(1);
      return;
    }
    fail(code, msg);
  }

  void close_socket() {
    // No deadline left pending: a finished connection must let its
    // io_context run out of work at once, not when the timer expires.
    disarm();
    io_timer_armed_ = false;
    io_timer_.cancel();
    connected_ = false;
    if (!sock_)
      return;
    beast::error_code ignored;
    sock_->shutdown(tcp::socket::shutdown_both, ignored);
    sock_->close(ignored);
  }

  /// newconn/reference: close_notify, wait for the server's (or its EOF, up
  /// to 2 s), then close.
  void shutdown_then_next() {
    arm(std::chrono::seconds(2));
    sent_close_notify_ = false;
    shutdown_some();
  }

  void shutdown_some() {
    if (!sent_close_notify_) {
      ERR_clear_error();
      int r = SSL_shutdown(ssl_.get());
      if (r == 1)
        return closed_then_next();
      if (r < 0)
        return wait_or_close(r);
      sent_close_notify_ = true;
    }
    char discard[512];
    for (;;) {
      ERR_clear_error();
      int n = SSL_read(ssl_.get(), discard, sizeof discard);
      if (n > 0)
        continue;
      return wait_or_close(n);
    }
  }

  /// Shutting down, an SSL call returned `r` <= 0: wait for what OpenSSL
  /// wants and go on, or close when the connection is gone.
  void wait_or_close(int r) {
    int err = 0;
    auto w = want(r, err);
    if (!w) {
      ERR_clear_error();
      return closed_then_next();
    }
    auto self = shared_from_this();
    wait(*w, [self] { self->shutdown_some(); },
         [self] { self->closed_then_next(); });
  }

  void closed_then_next() {
    close_socket();
    next();
  }

  // ---- one unit of work ---------------------------------------------------------

  void next() {
    uint64_t idx = 0;
    if (!t_.sh.take(idx)) {
      close_socket();
      return; // this connection is done; the io_context runs out of work
    }
    idx_ = idx;
    switch (o_.mode) {
    case load_mode::reference:
      return connect([self = shared_from_this()] { self->send_get(); });
    case load_mode::reference_keepalive:
      return with_connection([self = shared_from_this()] { self->send_get(); });
    case load_mode::bulk:
      return with_connection([self = shared_from_this()] { self->send_bulk(); });
    case load_mode::keepalive:
    case load_mode::newconn:
    case load_mode::mqtt:
    case load_mode::mqtt_ws:
      if (o_.rate > 0) {
        due_ = t_.sh.t0
               + std::chrono::duration_cast<steady::duration>(
                 std::chrono::duration<double>(static_cast<double>(idx) / o_.rate));
        if (steady::now() < due_) {
          timer_.expires_at(due_);
          return timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
            if (!ec)
              self->start_device();
          });
        }
      }
      return start_device();
    }
  }

  void start_device() {
    prepare_device();
    if (mqtt_mode())
      return connect([self = shared_from_this()] { self->send_mqtt_register(); });
    with_connection([self = shared_from_this()] { self->send_put(); });
  }

  template <class Then>
  void with_connection(Then then) {
    if (connected_ && persistent(o_.mode))
      return then();
    if (persistent(o_.mode))
      ++t_.stats.reconnects;
    connect(std::move(then));
  }

  void prepare_device() {
    reg_id_ = o_.registration_id(idx_);
    // X.509 devices authenticate in the handshake (client_identity).
    auth_ = o_.client_identity ? std::string() : device_sas(o_.id_scope, o_.key_root, reg_id_);
    base_ = "/" + o_.id_scope + "/registrations/" + reg_id_;
    op_id_.clear();
  }

  // Requests are written as text into one reused buffer: Beast's message and
  // serializer cost the harness (which shares the cores with the server)
  // about 10 k instructions per request.
  void new_request(std::string_view method, std::string_view target, bool keep_alive = true) {
    out_.clear();
    out_.append(method).append(" ").append(target).append(" HTTP/1.1\r\nHost: ");
    out_.append(t_.host_header).append("\r\nUser-Agent: provisiond-bench/0.1\r\n");
    if (!keep_alive)
      out_.append("Connection: close\r\n");
  }

  void header(std::string_view name, std::string_view value) {
    out_.append(name).append(": ").append(value).append("\r\n");
  }

  /// Ends the header block; a body (even an empty one) gets its Content-Length.
  void end_request(std::string_view body) {
    out_.append("Content-Length: ").append(std::to_string(body.size())).append("\r\n\r\n");
    out_.append(body);
  }
  void end_request() { out_.append("\r\n"); }

  /// Writes the request in out_ and reads the answer, then calls h(response).
  template <class Handler>
  void exchange(Handler h) {
    ++t_.stats.requests;
    written_ = 0;
    arm();
    write_some<false>(std::move(h));
  }

  /// Writes what is left of out_ (SSL_write may ask to wait), then reads
  /// the answer: an HTTP response, or (Mqtt) packets up to the answer PUBLISH.
  template <bool Mqtt, class Handler>
  void write_some(Handler h) {
    while (written_ < out_.size()) {
      ERR_clear_error();
      // After a want-write, the same bytes again, as SSL_write requires.
      int n = SSL_write(ssl_.get(), out_.data() + written_,
                        static_cast<int>(out_.size() - written_));
      if (n <= 0) {
        int err = 0;
        auto w = want(n, err);
        if (!w)
          return fail("connection", ssl_failure("write", err));
        auto self = shared_from_this();
        return wait(*w,
                    [self, h]() mutable { self->template write_some<Mqtt>(std::move(h)); },
                    [self] { self->io_failed("write"); });
      }
      written_ += static_cast<std::size_t>(n);
    }
    if constexpr (Mqtt)
      mqtt_read_some(std::move(h));
    else
      start_read(std::move(h));
  }

  /// Waits for the response head (or reads what is already buffered).
  template <class Handler>
  void start_read(Handler h) {
    parser_.emplace();
    parser_->eager(true);
    parser_->body_limit(1u << 20);
    if (in_.size() == 0 && SSL_has_pending(ssl_.get()) == 0) {
      // Nothing can be buffered yet: wait before the first read (Asio's epoll
      // reactor re-arms the socket per wait, so an answer already there is
      // reported; see gateway/https_server.cpp).
      auto self = shared_from_this();
      return wait(tcp::socket::wait_read, [self, h]() mutable { self->read_some(std::move(h)); },
                  [self] { self->io_failed("read"); });
    }
    read_some(std::move(h));
  }

  template <class Handler>
  void read_some(Handler h) {
    for (;;) {
      beast::error_code ec;
      auto fed = prov::net::feed(*parser_, in_, ec);
      if (fed == prov::net::feed_result::failed)
        return fail("connection", "read: " + ec.message()); // the stream is unusable now
      if (fed == prov::net::feed_result::done) {
        disarm();
        auto& res = parser_->get();
        if (!res.keep_alive())
          server_wants_close_ = true;
        return h(res);
      }
      auto space = in_.prepare(16 * 1024);
      ERR_clear_error();
      int n = SSL_read(ssl_.get(), space.data(), static_cast<int>(space.size()));
      if (n > 0) {
        in_.commit(static_cast<std::size_t>(n));
        continue;
      }
      int err = 0;
      auto w = want(n, err);
      if (!w) {
        // A body that ends with the connection (no Content-Length) is
        // complete now; anything else is a failure.
        std::string why = ssl_failure("read", err);
        beast::error_code eof_ec;
        if (err == SSL_ERROR_ZERO_RETURN || err == SSL_ERROR_SYSCALL || err == SSL_ERROR_SSL)
          parser_->put_eof(eof_ec);
        if (eof_ec || !parser_->is_done())
          return fail("connection", why);
        disarm();
        server_wants_close_ = true;
        return h(parser_->get());
      }
      auto self = shared_from_this();
      return wait(*w,
                  [self, h]() mutable { self->read_some(std::move(h)); },
                  [self] { self->io_failed("read"); });
    }
  }

  void io_failed(const char* what) {
    if (timed_out_)
      return fail("timeout", std::string(what) + ": timed out");
    fail("connection", std::string(what) + ": aborted");
  }

  // ---- device: PUT register, poll until terminal ------------------------------------

  void send_put() {
    new_request("PUT", base_ + "/register?api-version=" + o_.api_version);
    if (!auth_.empty())
      header("Authorization", auth_);
    header("Content-Type", "application/json; charset=utf-8");
    end_request("{\"registrationId\":\"" + reg_id_ + "\"}");
    ++t_.stats.puts;
    put_sys_us_ = system_us();
    put_start_ = steady::now();
    exchange([self = shared_from_this()](http::response<body_t>& res) { self->on_put(res); });
  }

  void on_put(http::response<body_t>& res) {
    t_.stats.put_latency.push_back(ms_since(put_start_));
    int status = static_cast<int>(res.result_int());
    if (status != 202 && status != 200)
      return fail(error_code_of(status, res.body()),
                  "PUT " + std::to_string(status) + " " + res.body().substr(0, 200));
    dps_answer a;
    if (scan_answer(res.body(), a) && !a.operation_id.empty()) {
      // The common answers; anything else goes the DOM's way below.
      op_id_ = a.operation_id;
      if (status == 202 && a.status == "assigning")
        return schedule_poll(res);
      if (a.status == "assigned")
        return assigned(a.updated);
    }
    auto j = nlohmann::json::parse(res.body(), nullptr, false);
    if (!j.is_object() || !j.contains("operationId") || !j["operationId"].is_string())
      return fail("bad_response", "PUT answer without operationId: " + res.body().substr(0, 200));
    op_id_ = j["operationId"].get<std::string>();
    if (status == 200 || j.value("status", "") != "assigning")
      return terminal(j);
    schedule_poll(res);
  }

  void schedule_poll(const http::response<body_t>& res) {
    int wait_ms = o_.poll_interval_ms;
    if (wait_ms < 0) {
      wait_ms = 1000;
      auto ra = res.find(http::field::retry_after);
      if (ra != res.end()) {
        int s = std::atoi(std::string(ra->value()).c_str());
        if (s > 0)
          wait_ms = s * 1000;
      }
    }
    if (ms_since(put_start_) + wait_ms > o_.device_timeout_s * 1000.0)
      return fail("device_timeout", "not terminal after " + std::to_string(o_.device_timeout_s)
                                      + " s");
    timer_.expires_after(std::chrono::milliseconds(wait_ms));
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec)
        return;
      if (self->server_wants_close_ || !self->connected_) {
        // The server closed the connection politely; polls need a new one.
        self->server_wants_close_ = false;
        self->close_socket();
        ++self->t_.stats.reconnects;
        return self->connect([self] { self->send_poll(); });
      }
      self->send_poll();
    });
  }

  void send_poll() {
    new_request("GET", base_ + "/operations/" + op_id_ + "?api-version=" + o_.api_version);
    if (!auth_.empty())
      header("Authorization", auth_);
    end_request();
    ++t_.stats.polls;
    poll_start_ = steady::now();
    exchange([self = shared_from_this()](http::response<body_t>& res) { self->on_poll(res); });
  }

  void on_poll(http::response<body_t>& res) {
    t_.stats.poll_latency.push_back(ms_since(poll_start_));
    int status = static_cast<int>(res.result_int());
    if (status == 202)
      return schedule_poll(res);
    if (status != 200)
      return fail(error_code_of(status, res.body()),
                  "poll " + std::to_string(status) + " " + res.body().substr(0, 200));
    dps_answer a;
    if (scan_answer(res.body(), a) && a.status == "assigned")
      return assigned(a.updated);
    auto j = nlohmann::json::parse(res.body(), nullptr, false);
    if (!j.is_object())
      return fail("bad_response", "poll answer is not JSON: " + res.body().substr(0, 200));
    terminal(j);
  }

  void terminal(const nlohmann::json& j) {
    std::string status = j.value("status", "");
    const nlohmann::json* rs = nullptr;
    if (j.contains("registrationState") && j["registrationState"].is_object())
      rs = &j["registrationState"];
    if (status != "assigned") {
      std::string code = status.empty() ? "bad_response" : status;
      if (rs && rs->contains("errorCode"))
        code += ":" + rs->at("errorCode").dump();
      return fail(code, "terminal status " + j.dump().substr(0, 300));
    }
    std::string updated;
    if (rs) {
      auto it = rs->find("lastUpdatedDateTimeUtc");
      if (it != rs->end() && it->is_string())
        updated = it->get<std::string>();
    }
    assigned(updated);
  }

  /// `updated`: registrationState.lastUpdatedDateTimeUtc, empty when absent.
  void assigned(std::string_view updated) {
    t_.stats.client_tta.push_back(ms_since(put_start_));
    if (o_.rate > 0)
      t_.stats.scheduled_tta.push_back(ms_since(due_));
    int64_t updated_ms = parse_utc_ms(updated);
    if (updated_ms > 0) {
      // Millisecond resolution: both times truncated to whole ms.
      double server_ms = static_cast<double>(updated_ms - put_sys_us_ / 1000);
      t_.stats.server_tta.push_back(server_ms < 0 ? 0 : server_ms);
    }
    t_.sh.succeeded.fetch_add(1, std::memory_order_relaxed);
    finish_unit();
  }

  // ---- device over MQTT: CONNECT, SUBSCRIBE, register, polls ----------------------------

  void send_mqtt_register() {
    prov::mqtt::connect_packet c;
    c.protocol_level = 4;
    c.clean_session = true;
    c.keep_alive_s = 60;
    c.client_id = reg_id_;
    c.username = o_.id_scope + "/registrations/" + reg_id_ + "/api-version=" + o_.api_version;
    c.password = auth_;
    prov::mqtt::subscribe_packet sub;
    sub.packet_id = 1;
    sub.filters = {{"$dps/registrations/res/#", 0}};
    // One write, as the server reads packets in order: no round trip per step.
    out_ = prov::mqtt::encode_connect(c) + prov::mqtt::encode_subscribe(sub)
           + prov::mqtt::encode_publish("$dps/registrations/PUT/iotdps-register/?$rid=1",
                                        "{\"registrationId\":\"" + reg_id_ + "\"}", 0, 0);
    if (o_.mode == load_mode::mqtt_ws) {
      // The upgrade request and the first frame together: the server hands
      // what follows the request to the MQTT session.
      ws_head_seen_ = false;
      ws_payload_.clear();
      out_ = "GET /$iothub/websocket HTTP/1.1\r\nHost: " + t_.host_header
             + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
             + prov::ws::encode_client_frame(prov::ws::opcode::binary, out_,
                                            static_cast<uint32_t>(idx_ * 2654435761u));
    }
    ++t_.stats.puts;
    put_sys_us_ = system_us();
    put_start_ = steady::now();
    mqtt_exchange([self = shared_from_this()](int status, int retry_after, std::string_view body) {
      self->on_mqtt_answer(status, retry_after, body, true);
    });
  }

  void on_mqtt_answer(int status, int retry_after, std::string_view body, bool put) {
    (put ? t_.stats.put_latency : t_.stats.poll_latency)
      .push_back(ms_since(put ? put_start_ : poll_start_));
    if (status != 200 && status != 202)
      return fail(error_code_of(status, std::string(body)),
                  "MQTT " + std::to_string(status) + " " + std::string(body.substr(0, 200)));
    dps_answer a;
    if (!scan_answer(body, a) || a.operation_id.empty()) {
      auto j = nlohmann::json::parse(body, nullptr, false);
      if (!j.is_object())
        return fail("bad_response", "MQTT answer is not JSON: " + std::string(body.substr(0, 200)));
      return terminal(j);
    }
    op_id_ = a.operation_id;
    if (a.status == "assigned")
      return assigned(a.updated);
    if (status == 200) {
      auto j = nlohmann::json::parse(body, nullptr, false);
      return terminal(j.is_object() ? j : nlohmann::json::object());
    }
    int wait_ms = o_.poll_interval_ms >= 0 ? o_.poll_interval_ms
                                           : (retry_after > 0 ? retry_after * 1000 : 1000);
    if (ms_since(put_start_) + wait_ms > o_.device_timeout_s * 1000.0)
      return fail("device_timeout", "not terminal after " + std::to_string(o_.device_timeout_s)
                                      + " s");
    timer_.expires_after(std::chrono::milliseconds(wait_ms));
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec)
        return;
      self->out_ = prov::mqtt::encode_publish(
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=" + self->op_id_,
        "", 0, 0);
      if (self->o_.mode == load_mode::mqtt_ws)
        self->out_ = prov::ws::encode_client_frame(prov::ws::opcode::binary, self->out_,
                                                  static_cast<uint32_t>(self->idx_ + 7));
      ++self->t_.stats.polls;
      self->poll_start_ = steady::now();
      self->mqtt_exchange([self](int st, int ra, std::string_view b) {
        self->on_mqtt_answer(st, ra, b, false);
      });
    });
  }

  /// Writes out_, then reads MQTT packets until an answer PUBLISH arrives
  /// (a refused CONNACK fails the device) and calls h(status, retry-after, payload).
  template <class Handler>
  void mqtt_exchange(Handler h) {
    ++t_.stats.requests;
    written_ = 0;
    arm();
    write_some<true>(std::move(h));
  }

  bool mqtt_mode() const {
    return o_.mode == load_mode::mqtt || o_.mode == load_mode::mqtt_ws;
  }

  /// MQTT over WebSocket: takes the 101 head, then the server's (unmasked)
  /// frames out of in_, their payloads into ws_payload_. "" or why the
  /// connection cannot go on.
  std::string unframe() {
    auto buf = in_.data();
    std::string_view have(static_cast<const char*>(buf.data()), buf.size());
    std::size_t used = 0;
    if (!ws_head_seen_) {
      auto end = have.find("\r\n\r\n");
      if (end == std::string_view::npos)
        return {};
      if (have.substr(0, 13) != "HTTP/1.1 101 ")
        return "upgrade refused: " + std::string(have.substr(0, std::min<std::size_t>(end, 200)));
      ws_head_seen_ = true;
      used = end + 4;
    }
    for (;;) {
      auto f = have.substr(used);
      if (f.size() < 2)
        break;
      const auto b0 = static_cast<uint8_t>(f[0]);
      uint64_t len = static_cast<uint8_t>(f[1]) & 0x7F;
      std::size_t pos = 2;
      if (len == 126) {
        if (f.size() < 4)
          break;
        len = (uint64_t{static_cast<uint8_t>(f[2])} << 8) | static_cast<uint8_t>(f[3]);
        pos = 4;
      } else if (len == 127) {
        if (f.size() < 10)
          break;
        len = 0;
        for (std::size_t i = 2; i < 10; ++i)
          len = (len << 8) | static_cast<uint8_t>(f[i]);
        pos = 10;
      }
      if (f.size() < pos + len)
        break;
      const auto op = b0 & 0x0F;
      if (op == 0x8)
        return "the server closed the WebSocket";
      if (op == 0x0 || op == 0x2)
        ws_payload_.append(f.substr(pos, static_cast<std::size_t>(len)));
      used += pos + static_cast<std::size_t>(len);
    }
    in_.consume(used);
    return {};
  }

  template <class Handler>
  void mqtt_read_some(Handler h) {
    const bool ws = o_.mode == load_mode::mqtt_ws;
    for (;;) {
      if (ws) {
        if (auto why = unframe(); !why.empty())
          return fail("connection", why);
      }
      auto buf = in_.data();
      std::string_view have = ws ? std::string_view(ws_payload_)
                                 : std::string_view(static_cast<const char*>(buf.data()),
                                                    buf.size());
      auto consume = [&](std::size_t n) {
        if (ws)
          ws_payload_.erase(0, n);
        else
          in_.consume(n);
      };
      prov::mqtt::frame f;
      std::size_t consumed = 0;
      auto st = prov::mqtt::read_frame(have, 1u << 20, f, consumed);
      if (st == prov::mqtt::frame_status::ok) {
        using prov::mqtt::packet_type;
        if (f.type == packet_type::connack) {
          int code = f.body.size() == 2 ? static_cast<uint8_t>(f.body[1]) : -1;
          if (code != 0)
            return fail("connack" + std::to_string(code), "CONNACK " + std::to_string(code));
        } else if (f.type == packet_type::publish) {
          prov::mqtt::publish_packet p;
          if (!prov::mqtt::parse_publish(f, p).empty())
            return fail("bad_response", "malformed PUBLISH");
          // $dps/registrations/res/{status}/?$rid=..[&retry-after=N]
          constexpr std::string_view res = "$dps/registrations/res/";
          int status = std::atoi(p.topic.c_str() + std::min(p.topic.size(), res.size()));
          int retry_after = 0;
          if (auto ra = p.topic.find("retry-after="); ra != std::string::npos)
            retry_after = std::atoi(p.topic.c_str() + ra + 12);
          std::string body(p.payload);
          consume(consumed);
          disarm();
          return h(status, retry_after, body);
        }
        consume(consumed); // SUBACK
        continue;
      }
      if (st != prov::mqtt::frame_status::need_more)
        return fail("bad_response", "malformed MQTT packet from the server");
      auto space = in_.prepare(16 * 1024);
      ERR_clear_error();
      int n = SSL_read(ssl_.get(), space.data(), static_cast<int>(space.size()));
      if (n > 0) {
        in_.commit(static_cast<std::size_t>(n));
        continue;
      }
      int err = 0;
      auto w = want(n, err);
      if (!w)
        return fail("connection", ssl_failure("read", err));
      auto self = shared_from_this();
      return wait(*w, [self, h]() mutable { self->mqtt_read_some(std::move(h)); },
                  [self] { self->io_failed("read"); });
    }
  }

  // ---- reference: one GET per new connection, or GETs back to back on kept ones -----------

  void send_get() {
    new_request("GET", o_.reference_path, o_.mode == load_mode::reference_keepalive);
    end_request();
    put_start_ = steady::now();
    exchange([self = shared_from_this()](http::response<body_t>& res) {
      self->t_.stats.request_latency.push_back(ms_since(self->put_start_));
      int status = static_cast<int>(res.result_int());
      if (status != 200)
        return self->fail("http" + std::to_string(status), "reference GET");
      self->t_.sh.succeeded.fetch_add(1, std::memory_order_relaxed);
      self->finish_unit();
    });
  }

  // ---- bulk enrollment batch -------------------------------------------------------------

  void send_bulk() {
    new_request("POST", "/enrollments?api-version=" + o_.service_api_version);
    header("Authorization", o_.service_auth);
    header("Content-Type", "application/json; charset=utf-8");
    bulk_body_ = o_.bulk_body(idx_);
    end_request(bulk_body_);
    put_start_ = steady::now();
    exchange([self = shared_from_this()](http::response<body_t>& res) { self->on_bulk(res); });
  }

  void on_bulk(http::response<body_t>& res) {
    t_.stats.request_latency.push_back(ms_since(put_start_));
    int status = static_cast<int>(res.result_int());
    auto j = nlohmann::json::parse(res.body(), nullptr, false);
    if (status != 200 || !j.is_object())
      return fail(error_code_of(status, res.body()),
                  "bulk " + std::to_string(status) + " " + res.body().substr(0, 200));
    auto req_items = nlohmann::json::parse(bulk_body_, nullptr, false);
    uint64_t items = req_items.is_object() ? req_items["enrollments"].size() : 0;
    uint64_t bad = 0, existing = 0;
    if (j.contains("errors") && j["errors"].is_array())
      for (auto& e : j["errors"]) {
        auto code = e.contains("errorCode") ? e["errorCode"].dump() : std::string("?");
        if (o_.ignore_conflicts && code == "409000") {
          ++existing;
          continue;
        }
        ++bad;
        t_.error(code, e.dump().substr(0, 200));
      }
    t_.stats.existing += existing;
    t_.sh.succeeded.fetch_add(items - bad - existing, std::memory_order_relaxed);
    t_.sh.failed.fetch_add(bad, std::memory_order_relaxed);
    finish_unit();
  }

  // ---- completion ---------------------------------------------------------------------------

  void finish_unit() {
    if (o_.mode == load_mode::newconn || o_.mode == load_mode::reference || mqtt_mode())
      return shutdown_then_next();
    if (server_wants_close_) {
      server_wants_close_ = false;
      close_socket();
    }
    next();
  }

  void fail(const std::string& code, const std::string& msg) {
    timer_.cancel();
    t_.error(code, reg_id_.empty() ? msg : reg_id_ + ": " + msg);
    t_.sh.failed.fetch_add(1, std::memory_order_relaxed);
    bool broken = code == "connection" || code == "timeout" || code == "tls"
                  || server_wants_close_;
    server_wants_close_ = false;
    if (broken || o_.mode == load_mode::newconn || o_.mode == load_mode::reference
        || mqtt_mode()) {
      close_socket();
    }
    next();
  }

  thread_ctx& t_;
  const load_options& o_;
  asio::steady_timer timer_;    ///< poll interval, open-loop due time
  asio::steady_timer io_timer_; ///< deadline of the current connect, exchange or shutdown
  steady::time_point deadline_ = steady::time_point::max();
  bool io_timer_armed_ = false;
  bool timed_out_ = false;
  std::optional<tcp::socket> sock_;
  prov::net::ssl_ptr ssl_; // after sock_: freed before the socket
  bool sent_close_notify_ = false;
  beast::flat_buffer in_;  ///< decrypted bytes not parsed yet
  std::size_t written_ = 0;
  std::string out_;       ///< the request being written
  bool ws_head_seen_ = false; ///< mqtt_ws: the 101 is read
  std::string ws_payload_;    ///< mqtt_ws: MQTT bytes out of the server's frames
  std::string bulk_body_; ///< bulk: the batch sent, to count its items
  std::optional<http::response_parser<body_t>> parser_;
  bool connected_ = false;
  bool server_wants_close_ = false;
  uint64_t idx_ = 0;
  std::string reg_id_, auth_, base_, op_id_;
  int64_t put_sys_us_ = 0;
  steady::time_point conn_start_, put_start_, poll_start_;
  steady::time_point due_; ///< open loop: when this device was due to start
};

void append(std::vector<double>& to, const std::vector<double>& from) {
  to.insert(to.end(), from.begin(), from.end());
}

} // namespace

std::string device_sas(const std::string& id_scope, const std::string& key_root,
                       const std::string& registration_id) {
  auto key = prov::crypto::derive_device_key(key_root, registration_id);
  return prov::attestation::make_sas(id_scope + "/registrations/" + registration_id,
                                     key ? *key : std::string{}, ::time(nullptr) + 3600,
                                     "registration");
}

load_result run_load(const load_options& o, const tick_fn& tick) {
  shared_state sh(o);
  sh.limit = o.count ? o.count : UINT64_MAX;
  int nthreads = std::max(1, o.threads);
  std::vector<std::unique_ptr<thread_ctx>> ctxs;
  bool ip = is_ip_literal(o.host);
  boost::system::error_code ec;
  tcp::endpoint ep;
  if (ip) {
    ep = tcp::endpoint(asio::ip::make_address(o.host), o.port);
  } else {
    asio::io_context tmp;
    tcp::resolver r(tmp);
    auto res = r.resolve(o.host, std::to_string(o.port), ec);
    if (ec || res.empty()) {
      load_result bad;
      bad.errors["resolve"] = 1;
      bad.error_samples.push_back("cannot resolve " + o.host + ": " + ec.message());
      return bad;
    }
    ep = res.begin()->endpoint();
  }
  for (int i = 0; i < nthreads; ++i) {
    auto t = std::make_unique<thread_ctx>(sh);
    t->endpoint = ep;
    t->host_header = (o.host.find(':') != std::string::npos ? "[" + o.host + "]" : o.host) + ":"
                     + std::to_string(o.port);
    SSL_CTX* raw = t->ssl_ctx.get();
    if (raw == nullptr) {
      load_result bad;
      bad.errors["tls"] = 1;
      bad.error_samples.push_back("cannot create a TLS context");
      return bad;
    }
    SSL_CTX_set_min_proto_version(raw, TLS1_2_VERSION);
    // Every new connection is a full handshake: no client session cache, no tickets.
    SSL_CTX_set_session_cache_mode(raw, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(raw, SSL_OP_NO_TICKET);
    // One read per batch of records instead of a header read and a body read.
    SSL_CTX_set_read_ahead(raw, 1);
    if (o.insecure) {
      SSL_CTX_set_verify(raw, SSL_VERIFY_NONE, nullptr);
    } else {
      SSL_CTX_set_verify(raw, SSL_VERIFY_PEER, nullptr);
      if (SSL_CTX_load_verify_locations(raw, o.ca_file.c_str(), nullptr) != 1) {
        load_result bad;
        bad.errors["tls"] = 1;
        bad.error_samples.push_back("cannot load CA file '" + o.ca_file
                                    + "': " + prov::net::openssl_error());
        return bad;
      }
    }
    ctxs.push_back(std::move(t));
  }

  // Spread the connections over the threads.
  for (int i = 0; i < o.concurrency; ++i) {
    auto& t = *ctxs[static_cast<std::size_t>(i % nthreads)];
    asio::post(t.ioc, [c = std::make_shared<conn>(t)] { c->start(); });
  }
  // Keep the io_contexts running while connected slots wait for the start.
  std::vector<asio::executor_work_guard<asio::io_context::executor_type>> guards;
  for (auto& t : ctxs)
    guards.push_back(asio::make_work_guard(t->ioc));
  auto t_connect = steady::now();
  std::vector<std::thread> threads;
  std::atomic<int> done_threads{0};
  // When each thread ran out of work: the run ends at the last of them, not
  // at the progress loop's next 250 ms tick.
  std::vector<steady::time_point> ended(ctxs.size());
  for (std::size_t i = 0; i < ctxs.size(); ++i)
    threads.emplace_back([t = ctxs[i].get(), &done_threads, end = &ended[i]] {
      t->ioc.run();
      *end = steady::now();
      done_threads.fetch_add(1);
    });

  bool preconnect = persistent(o.mode);
  if (preconnect) {
    while (sh.ready.load() + sh.connect_failed.load() < static_cast<uint64_t>(o.concurrency)
           && done_threads.load() < nthreads) {
      if (o.interrupted && o.interrupted->load())
        break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  load_result r;
  r.connect_phase_s = preconnect ? ms_since(t_connect) / 1000.0 : 0;
  // The handshakes of the connect phase are not part of the measured phase.
  if (o.on_go)
    o.on_go();
  const double cpu0 = self_cpu_seconds();
  auto t0 = steady::now();
  sh.t0 = t0;
  if (o.duration_s > 0)
    sh.deadline = t0 + std::chrono::microseconds(static_cast<int64_t>(o.duration_s * 1e6));
  sh.go.store(true);
  for (auto& t : ctxs)
    asio::post(t->ioc, [tp = t.get()] {
      auto w = std::move(tp->waiting);
      for (auto& f : w)
        f();
    });
  guards.clear();

  while (done_threads.load() < nthreads) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    if (tick)
      tick(ms_since(t0) / 1000.0, sh.succeeded.load(), sh.failed.load());
  }
  for (auto& th : threads)
    th.join();
  auto last = *std::max_element(ended.begin(), ended.end());
  r.wall_s = std::chrono::duration<double>(std::max(last, t0) - t0).count();
  r.harness_cpu_s = self_cpu_seconds() - cpu0;
  r.started = sh.started.load();
  r.succeeded = sh.succeeded.load();
  r.failed = sh.failed.load();
  for (auto& t : ctxs) {
    auto& s = t->stats;
    r.requests += s.requests;
    r.puts += s.puts;
    r.polls += s.polls;
    r.connections += s.connections;
    r.reconnects += s.reconnects;
    r.existing += s.existing;
    for (auto& [k, v] : s.errors)
      r.errors[k] += v;
    for (auto& e : s.error_samples)
      if (r.error_samples.size() < 10)
        r.error_samples.push_back(e);
    append(r.server_tta, s.server_tta);
    append(r.client_tta, s.client_tta);
    append(r.scheduled_tta, s.scheduled_tta);
    append(r.put_latency, s.put_latency);
    append(r.poll_latency, s.poll_latency);
    append(r.handshake, s.handshake);
    append(r.request_latency, s.request_latency);
  }
  // Connections lost before the run started are failures of the run, too.
  r.failed += sh.connect_failed.load();
  return r;
}

} // namespace bench
