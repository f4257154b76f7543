#include "gateway/mqtt_server.hpp"

#include <pthread.h>
#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <iostream>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include "actors/engine.hpp"
#include "gateway/acceptor.hpp"
#include "gateway/connection_slots.hpp"
#include "gateway/device_api.hpp"
#include "gateway/upgraded_connection.hpp"
#include "net/device_tls.hpp"
#include "net/mqtt_codec.hpp"
#include "net/mqtt_dps.hpp"
#include "net/websocket.hpp"
#include "messages/ascii.hpp"
#include "messages/crypto.hpp"
#include "messages/registration.hpp"
#include "metrics/diagnostic_log.hpp"
#include "metrics/instruments.hpp"

namespace prov::gateway {

namespace net = boost::asio;
using tcp = net::ip::tcp;
using boost::system::error_code;

namespace {

using clock = std::chrono::steady_clock;

/// Longest keep-alive honoured (SDKs use 60..240 s); docs/mqtt.md.
constexpr int max_keep_alive_s = 1800;

class session;

/// What every session of one server shares. Held by the sessions too:
/// WebSocket sessions run on the HTTPS server's threads, which may outlive
/// this server object.
struct listener_context {
  listener_context(const mqtt_server_options& o, engine& e)
    : opts(o), eng(e),
      own_api(o.api != nullptr ? nullptr
                               : std::make_unique<device_api>(e, o.id_scope, o.retry_after_s)),
      api(o.api != nullptr ? *o.api : *own_api),
      own_slots(o.max_connections, o.max_connections_per_client),
      slots(o.shared_slots != nullptr ? *o.shared_slots : own_slots),
      ws_slots(o.shared_slots != nullptr ? *o.shared_slots : own_slots) {}
  const mqtt_server_options opts;
  engine& eng;
  std::unique_ptr<device_api> own_api; ///< when none is shared
  device_api& api;
  connection_slots own_slots; ///< when none are shared
  listener_slots slots;       ///< the MQTT listener's connections
  /// Upgraded WebSocket connections, moved here from the HTTPS listener's
  /// count (dps_mqtt_connections_open{transport="mqtt_ws"}).
  listener_slots ws_slots;
  /// Accepted requests whose answer is not written yet (or whose
  /// connection is not gone yet): stop() waits for them.
  std::atomic<int> answering{0};
  /// Set by stop_accepting(): PUBLISHes and CONNECTs from here on are not
  /// taken (the connection closes instead), so stop() has no new answers
  /// to wait for once `answering` reaches 0.
  std::atomic<bool> stopping{false};
  /// Open WebSocket sessions, so that stop() can tell each it goes away
  /// (close frame 1001) before the HTTPS threads they run on stop.
  std::mutex ws_mutex;
  std::unordered_map<const session*, std::weak_ptr<session>> ws_sessions;
  bool ws_closing = false; ///< stop() told them: adopt no more (under ws_mutex)
};

/// One device connection. Like the HTTPS sessions: OpenSSL reads and writes
/// the non-blocking socket itself and Asio only reports readiness and runs
/// the deadline, all on the connection's one I/O thread. Unlike HTTP, reads
/// and writes overlap (answers arrive while the device may send), so each
/// direction has its own wait; `pump()` advances whatever is not waiting.
///
/// The MQTT bytes travel as they are (port 8883), or inside WebSocket
/// frames on a connection the HTTPS server upgraded (/$iothub/websocket):
/// take_input() turns what TLS delivered into MQTT bytes, send() wraps MQTT
/// bytes for the wire. Everything between (packets, deadlines, limits,
/// the device API calls) is the same code for both.
class session : public std::enable_shared_from_this<session> {
public:
  /// A connection accepted on the MQTT listener: TLS handshake first.
  session(tcp::socket&& sock, std::string ip, std::shared_ptr<listener_context> ctx,
          SSL_CTX* ssl, listener_slots& slots)
    : sock_(std::move(sock)), timer_(sock_.get_executor()), ssl_(SSL_new(ssl)),
      ctx_(std::move(ctx)), slots_(slots), ip_(std::move(ip)) {}

  /// A connection the HTTPS server upgraded to MQTT over WebSocket: TLS is
  /// up, CONNECT comes next, inside binary frames.
  session(upgraded_connection&& c, std::shared_ptr<listener_context> ctx)
    : sock_(std::move(c.sock)), timer_(sock_.get_executor()), ssl_(std::move(c.ssl)),
      ctx_(std::move(ctx)), slots_(*c.slots), ip_(std::move(c.ip)), ws_(true),
      chain_(std::move(c.chain)), ws_in_(std::move(c.leftover)) {
    phase_ = phase::connecting;
  }

  ~session() {
    ctx_->answering.fetch_sub(inflight_ + unwritten_answers_);
    if (ws_) {
      std::lock_guard<std::mutex> lock(ctx_->ws_mutex);
      ctx_->ws_sessions.erase(this);
    }
    slots_.release(ip_);
  }

  /// The server stops (on the session's thread): an open WebSocket session
  /// is told so with a close frame 1001 instead of seeing its TCP
  /// connection drop (1006) when the HTTPS threads stop.
  void server_stopping() {
    if (phase_ == phase::closed || ws_close_sent_)
      return;
    log_violation("the server is stopping");
    count_close("server_stopping");
    close_websocket(ws::close_code::going_away, "server stopping");
  }

  void run() {
    net::dispatch(sock_.get_executor(), [self = shared_from_this()] { self->on_run(); });
  }

  /// server_stopping() on the session's thread. Thread-safe.
  void going_away_soon() {
    net::post(sock_.get_executor(), [self = shared_from_this()] { self->server_stopping(); });
  }

private:
  enum class phase { handshake, connecting, open, closed };

  // -- I/O ------------------------------------------------------------------

  void on_run() {
    connect_deadline_ = clock::now() + std::chrono::seconds(opts().request_timeout_seconds);
    if (ws_) {
      // Upgraded: the socket and TLS are set up; frames may have arrived
      // with the upgrade request.
      rearm();
      if (!ws_in_.empty()) {
        std::string early;
        early.swap(ws_in_);
        batching_ = true;
        const bool go = take_input(early.data(), early.size());
        if (process_input() && phase_ != phase::closed && !close_after_flush_ && !go)
          end_websocket();
        batching_ = false;
        flush();
      }
      return pump();
    }
    error_code ec;
    sock_.non_blocking(true, ec);
    if (ec || !ssl_ || SSL_set_fd(ssl_.get(), static_cast<int>(sock_.native_handle())) != 1) {
      ERR_clear_error();
      return close_now(nullptr);
    }
    SSL_set_accept_state(ssl_.get());
    rearm();
    pump();
  }

  const mqtt_server_options& opts() const { return ctx_->opts; }
  const char* transport() const { return ws_ ? "mqtt_ws" : "mqtt"; }

  /// Advances the handshake, the reads and the writes, each unless it waits.
  void pump() {
    if (phase_ == phase::closed)
      return;
    if (phase_ == phase::handshake) {
      ERR_clear_error();
      int r = SSL_do_handshake(ssl_.get());
      if (r != 1) {
        if (!wait_for(r))
          close_now(nullptr); // a failed handshake: nothing to count
        return;
      }
      chain_ = net_peer_chain();
      phase_ = phase::connecting;
    }
    if (!read_waiting_ && !close_after_flush_)
      read_some();
    if (phase_ != phase::closed && !write_waiting_ && written_ < writing_.size())
      write_some();
  }

  std::shared_ptr<const client_chain> net_peer_chain() {
    return prov::net::peer_chain(ssl_.get());
  }

  void wait(tcp::socket::wait_type w) {
    bool& flag = w == tcp::socket::wait_read ? read_waiting_ : write_waiting_;
    if (flag)
      return; // already waiting; pump() runs both directions when it ends
    flag = true;
    sock_.async_wait(w, [self = shared_from_this(), &flag](error_code ec) {
      flag = false;
      if (self->phase_ == phase::closed)
        return;
      if (ec)
        return self->close_now(nullptr);
      self->pump();
    });
  }

  /// After an SSL call returned `r` <= 0: waits for what OpenSSL wants and
  /// returns true, or returns false when the connection failed or ended.
  bool wait_for(int r) {
    switch (SSL_get_error(ssl_.get(), r)) {
    case SSL_ERROR_WANT_READ: wait(tcp::socket::wait_read); return true;
    case SSL_ERROR_WANT_WRITE: wait(tcp::socket::wait_write); return true;
    default: ERR_clear_error(); return false;
    }
  }

  /// Reads and handles what arrived. The answers it produces (PUBACKs,
  /// PINGRESPs, ...) are written once per batch, not one SSL_write (one TLS
  /// record, one syscall) per packet. After read_batch_bytes it yields, so
  /// a client that sends without pause cannot hold the I/O thread from the
  /// other connections on it.
  void read_some() {
    static constexpr std::size_t read_batch_bytes = 64 * 1024;
    // One read buffer per I/O thread, not 16 KB per (mostly idle) session:
    // a session reads on its one thread, and in_ keeps what is left over.
    thread_local std::array<char, 16384> buf;
    std::size_t processed = 0;
    batching_ = true;
    for (;;) {
      ERR_clear_error();
      int n = SSL_read(ssl_.get(), buf.data(), static_cast<int>(buf.size()));
      if (n <= 0) {
        if (!wait_for(n))
          close_now(in_.empty() && ws_in_.empty() ? "client" : "client_mid_packet");
        break;
      }
      last_rx_ = clock::now();
      processed += static_cast<std::size_t>(n);
      const bool go = take_input(buf.data(), static_cast<std::size_t>(n));
      if (!process_input() || phase_ == phase::closed || close_after_flush_)
        break;
      if (!go) {
        end_websocket();
        break;
      }
      if (processed >= read_batch_bytes) {
        // OpenSSL may hold decrypted bytes the socket no longer signals:
        // come back by a post, not by waiting for readability.
        if (!resume_posted_) {
          resume_posted_ = true;
          net::post(sock_.get_executor(), [self = shared_from_this()] {
            self->resume_posted_ = false;
            self->pump();
          });
        }
        break;
      }
    }
    batching_ = false;
    flush();
  }

  // -- the carrier: MQTT bytes as they are, or in WebSocket frames ------------

  /// Takes what TLS delivered: into in_ as it is, or (WebSocket) as the
  /// payloads of binary frames, answering pings. False after the client's
  /// close frame or a framing error (end_websocket() answers it, once the
  /// MQTT packets before it are handled).
  bool take_input(const char* data, std::size_t n) {
    if (!ws_) {
      in_.append(data, n);
      return true;
    }
    if (ws_end_)
      return false;
    ws_in_.append(data, n);
    ws::limits lim;
    // An SDK sends a packet per frame (or less): a frame never needs to be
    // larger than the largest packet allowed.
    lim.max_payload = opts().max_packet_bytes;
    std::size_t off = 0;
    bool go = true;
    while (go) {
      ws::frame f;
      std::size_t consumed = 0;
      auto st = ws::read_frame(std::string_view(ws_in_).substr(off), lim, ws_state_, f,
                               consumed, ws_close_code_, ws_why_);
      if (st == ws::read_status::need_more)
        break;
      if (st == ws::read_status::error) {
        ws_end_ = ws_failed_ = true;
        go = false;
        break;
      }
      off += consumed;
      switch (f.op) {
      case ws::opcode::binary:
      case ws::opcode::continuation: in_ += f.payload; break;
      case ws::opcode::ping: send_raw(ws::encode_frame(ws::opcode::pong, f.payload)); break;
      case ws::opcode::pong: break; // unsolicited: ignored (RFC 6455 §5.5.3)
      case ws::opcode::close:
        ws_end_ = true;
        ws_close_code_ = ws::close_code::normal;
        go = false;
        break;
      case ws::opcode::text: break; // refused by read_frame
      }
    }
    if (ws_end_)
      ws_in_.clear();
    else
      ws_in_.erase(0, off);
    if (ws_in_.empty())
      release_if_large(ws_in_); // one large frame must not pin its buffer
    return go;
  }

  /// The client's close frame is answered with one and the connection
  /// closes; a framing error is logged, counted and answered with a close
  /// frame saying why.
  void end_websocket() {
    if (phase_ == phase::closed || ws_close_sent_)
      return;
    if (ws_failed_) {
      const bool big = ws_close_code_ == ws::close_code::too_big;
      log_violation("WebSocket: " + ws_why_);
      count_close(big ? "too_large" : "malformed");
      close_websocket(ws_close_code_, ws_why_);
    } else {
      count_close("client");
      close_websocket(ws::close_code::normal, "");
    }
  }

  /// Queues MQTT bytes for the client (in a binary frame over WebSocket).
  void send(std::string bytes) {
    if (!ws_)
      return send_raw(std::move(bytes));
    std::string framed;
    framed.reserve(bytes.size() + 10);
    ws::append_frame(framed, ws::opcode::binary, bytes);
    send_raw(std::move(framed));
  }

  void send_raw(std::string bytes) {
    if (phase_ == phase::closed || ws_close_sent_)
      return;
    // A client that does not read (a flood of PINGREQs, or of WebSocket
    // pings before CONNECT, when only small control answers are due): stop
    // buffering.
    const std::size_t cap = phase_ == phase::open ? 4 * opts().max_packet_bytes + 65536 : 8192;
    if (pending_.size() + bytes.size() > cap)
      return close_now("not_reading");
    pending_ += bytes;
    if (!batching_)
      flush(); // read_some() flushes once at the end of its batch
  }

  /// Starts writing the pending bytes unless a write is under way (it takes
  /// them next).
  void flush() {
    if (phase_ == phase::closed || pending_.empty() || written_ < writing_.size())
      return;
    start_write();
  }

  void start_write() {
    writing_.swap(pending_);
    pending_.clear();
    written_ = 0;
    write_deadline_ = clock::now() + std::chrono::seconds(opts().request_timeout_seconds);
    rearm();
    if (!write_waiting_)
      write_some();
  }

  void write_some() {
    while (written_ < writing_.size()) {
      ERR_clear_error();
      // After a want-write, the same bytes again, as SSL_write requires:
      // writing_ does not change until it is all written.
      int n = SSL_write(ssl_.get(), writing_.data() + written_,
                        static_cast<int>(writing_.size() - written_));
      if (n <= 0) {
        if (!wait_for(n))
          close_now("client");
        return;
      }
      written_ += static_cast<std::size_t>(n);
    }
    release_if_large(writing_);
    written_ = 0;
    write_deadline_.reset();
    if (!pending_.empty())
      return start_write();
    answers_written(); // nothing queued: every answer so far is on the wire
    if (close_after_flush_)
      close_now(nullptr);
  }

  /// The answers queued so far are written (or will never be): they no
  /// longer hold up stop().
  void answers_written() {
    if (unwritten_answers_ > 0) {
      ctx_->answering.fetch_sub(unwritten_answers_);
      unwritten_answers_ = 0;
    }
  }

  /// Empties `s`, and gives its memory back when a large packet or burst
  /// grew it: idle connections should not each keep their peak.
  static void release_if_large(std::string& s) {
    if (s.capacity() > 64 * 1024)
      std::string().swap(s);
    else
      s.clear();
  }

  /// Counts why the connection ends (once).
  void count_close(const char* reason) {
    if (close_counted_ || reason == nullptr)
      return;
    close_counted_ = true;
    if (opts().metrics != nullptr)
      opts().metrics->mqtt_disconnect(reason, transport());
  }

  /// Closes the connection; `reason` (when not null) is counted and logged.
  void close_now(const char* reason) {
    if (phase_ == phase::closed)
      return;
    phase_ = phase::closed;
    count_close(reason);
    answers_written();
    timer_.cancel();
    error_code ignored;
    sock_.shutdown(tcp::socket::shutdown_both, ignored);
    sock_.close(ignored);
  }

  /// A protocol violation: logged with why, then the connection closes.
  /// Nothing the packet asked for was done. Over WebSocket, a violation in
  /// what the client sent is answered with a close frame saying why first
  /// (RFC 6455 §7.1.7): without one the client only sees the TCP close
  /// (1006). Deadlines close at once: the client is gone or not reading.
  void violation(const char* reason, const std::string& why) {
    log_violation(why);
    if (auto code = ws_ ? close_code_for(reason) : std::nullopt; code && !ws_close_sent_) {
      count_close(reason);
      return close_websocket(*code, why);
    }
    close_now(reason);
  }

  /// The close status for a violation's reason (metrics label); none for
  /// the deadlines.
  static std::optional<ws::close_code> close_code_for(std::string_view reason) {
    if (reason == "too_large")
      return ws::close_code::too_big;
    if (reason == "inflight")
      return ws::close_code::policy_violation; // a limit, not a broken packet
    if (reason == "malformed" || reason == "unknown_topic")
      return ws::close_code::protocol_error;
    return std::nullopt;
  }

  /// Queues our close frame; the connection closes once it is written
  /// (within the write deadline). RFC 6455 §5.5.1: no data frames after it
  /// (late answers, pongs are dropped from here on).
  void close_websocket(ws::close_code code, std::string_view why) {
    send_raw(ws::encode_close(code, why));
    ws_close_sent_ = true;
    close_after_flush_ = true;
    flush();
  }

  void log_violation(const std::string& why) {
    if (opts().log != nullptr)
      opts().log->info(std::string(transport()) + ": closing the connection from " + ip_ + " ("
                       + (user_.registration_id.empty() ? std::string("before CONNECT")
                                                        : user_.registration_id)
                       + "): " + why);
  }

  // -- deadlines --------------------------------------------------------------

  std::optional<clock::time_point> next_deadline() const {
    std::optional<clock::time_point> t;
    auto take = [&](const std::optional<clock::time_point>& d) {
      if (d && (!t || *d < *t))
        t = d;
    };
    if (phase_ == phase::handshake || phase_ == phase::connecting)
      take(connect_deadline_);
    else
      take(last_rx_ + keep_alive_);
    take(partial_deadline_);
    take(write_deadline_);
    return t;
  }

  /// One timer per session, moved earlier only when a new deadline is
  /// earlier than the one it waits for; when it fires, the deadlines are
  /// checked again and it waits for the next.
  void rearm() {
    auto next = next_deadline();
    if (!next || (timer_armed_ && timer_at_ <= *next))
      return;
    timer_armed_ = true;
    timer_at_ = *next;
    timer_.expires_at(*next);
    timer_.async_wait([self = shared_from_this()](error_code ec) {
      if (ec)
        return; // moved earlier, or closed
      self->timer_armed_ = false;
      self->on_timer();
    });
  }

  void on_timer() {
    if (phase_ == phase::closed)
      return;
    const auto now = clock::now();
    if ((phase_ == phase::handshake || phase_ == phase::connecting) && now >= connect_deadline_)
      return violation("connect_timeout",
                       "no CONNECT within "
                         + std::to_string(opts().request_timeout_seconds) + " s");
    if (phase_ == phase::open && now >= last_rx_ + keep_alive_)
      return violation("keep_alive", "nothing received within 1.5 times the keep-alive");
    if (partial_deadline_ && now >= *partial_deadline_)
      return violation("request_timeout",
                       "a packet not completed within "
                         + std::to_string(opts().request_timeout_seconds) + " s");
    if (write_deadline_ && now >= *write_deadline_)
      return violation("request_timeout", "the client does not read its answers");
    rearm();
  }

  // -- packets ----------------------------------------------------------------

  /// Handles every complete packet in in_; false when the connection closed.
  bool process_input() {
    std::size_t off = 0;
    bool ok = true;
    while (ok && phase_ != phase::closed && !close_after_flush_) {
      mqtt::frame f;
      std::size_t consumed = 0;
      auto st = mqtt::read_frame(std::string_view(in_).substr(off), opts().max_packet_bytes,
                                 f, consumed);
      if (st == mqtt::frame_status::need_more)
        break;
      if (st == mqtt::frame_status::malformed) {
        violation("malformed", "malformed packet header");
        return false;
      }
      if (st == mqtt::frame_status::too_large) {
        violation("too_large", "a packet larger than mqtt.max_packet_bytes ("
                                 + std::to_string(opts().max_packet_bytes) + ")");
        return false;
      }
      ok = handle(f);
      off += consumed;
    }
    if (phase_ == phase::closed)
      return false;
    in_.erase(0, off);
    if (in_.empty())
      release_if_large(in_);
    // A packet that started arriving must complete within the request
    // timeout (slowloris); a partial read after it does not extend it. Over
    // WebSocket, a frame that started arriving counts the same.
    if (in_.empty() && ws_in_.empty())
      partial_deadline_.reset();
    else if (!partial_deadline_ || off > 0) {
      partial_deadline_ = clock::now() + std::chrono::seconds(opts().request_timeout_seconds);
      rearm();
    }
    return ok;
  }

  bool handle(const mqtt::frame& f) {
    using mqtt::packet_type;
    if (phase_ == phase::connecting) {
      if (f.type != packet_type::connect) {
        violation("malformed", "the first packet must be CONNECT");
        return false;
      }
      return on_connect(f);
    }
    switch (f.type) {
    case packet_type::publish: return on_publish(f);
    case packet_type::subscribe: return on_subscribe(f, true);
    case packet_type::unsubscribe: return on_subscribe(f, false);
    case packet_type::puback: {
      uint16_t id = 0;
      if (auto why = mqtt::parse_puback(f, id); !why.empty()) {
        violation("malformed", why);
        return false;
      }
      return true; // no redelivery (clean sessions only): nothing to release
    }
    case packet_type::pingreq: send(mqtt::encode_pingresp()); return true;
    case packet_type::disconnect: close_now("client"); return false;
    default:
      violation("malformed", "a packet type the server does not take ("
                               + std::to_string(static_cast<int>(f.type)) + ")");
      return false;
    }
  }

  /// CONNACK with a refusal, then close once it is written.
  bool refuse(mqtt::connack_code code, const std::string& why) {
    if (opts().metrics != nullptr)
      opts().metrics->mqtt_connect(static_cast<int>(code), transport());
    if (opts().log != nullptr)
      opts().log->info(std::string(transport()) + ": CONNECT refused ("
                       + std::to_string(static_cast<int>(code)) + ") from " + ip_ + ": " + why);
    close_after_flush_ = true;
    send(mqtt::encode_connack(false, code));
    return false;
  }

  bool on_connect(const mqtt::frame& f) {
    using mqtt::connack_code;
    mqtt::connect_packet c;
    auto r = mqtt::parse_connect(f, c);
    if (r.malformed) {
      violation("malformed", r.why);
      return false;
    }
    if (ctx_->stopping.load())
      return refuse(connack_code::server_unavailable, "the server is stopping");
    // [throttling] requests_per_minute_per_address, one budget with the
    // HTTPS API's: before any other check, so a flood costs a map lookup,
    // not a SAS. CONNACK 3, as for a refused check for want of service.
    if (int wait = ctx_->api.admit_address(ip_))
      return refuse(connack_code::server_unavailable,
                    "too many requests from this client address "
                    "(throttling.requests_per_minute_per_address); retry after "
                      + std::to_string(wait) + " s");
    if (r.refuse != connack_code::accepted)
      return refuse(r.refuse, r.why);
    if (!c.username)
      return refuse(connack_code::bad_username_or_password,
                    "no user name ({idScope}/registrations/{registrationId}/api-version=...)");
    if (auto why = mqtt::parse_username(*c.username, user_); !why.empty())
      return refuse(connack_code::bad_username_or_password, why);
    if (!enrollment::valid_registration_id(user_.registration_id))
      return refuse(connack_code::identifier_rejected,
                    "invalid registration id in the user name");
    if (c.client_id != user_.registration_id)
      return refuse(connack_code::identifier_rejected,
                    "the client id must be the registration id of the user name");
    if (!ascii::iequals(user_.id_scope, opts().id_scope))
      return refuse(connack_code::not_authorized, "unknown id scope '" + user_.id_scope + "'");
    if (c.password && !c.password->empty())
      credential_ = sas_credential{std::move(*c.password)};
    else if (chain_ && !chain_->der.empty())
      credential_ = x509_credential_of(*chain_);
    else
      return refuse(connack_code::bad_username_or_password,
                    "no password (a SAS token) and no client certificate");
    // The credential is checked here, as DPS does, and again on every
    // request (a SAS may expire while the connection is open).
    register_request rr;
    rr.id_scope = opts().id_scope;
    rr.registration_id = user_.registration_id;
    rr.api_version = user_.api_version;
    rr.credential = credential_;
    rr.protocol = transport();
    rr.client_ip = ip_;
    // On this I/O thread: a TPM device's check may wait for Kafka (its
    // challenge read), and DPS has no TPM over MQTT, so it is refused
    // before that read.
    if (auto err = ctx_->eng.authenticate_device_without_tpm(rr)) {
      const int st = err.status();
      return refuse(st == 429 || st >= 500 ? connack_code::server_unavailable
                                           : connack_code::not_authorized,
                    err.message);
    }
    if (opts().metrics != nullptr)
      opts().metrics->mqtt_connect(0, transport());
    phase_ = phase::open;
    // 3.1.1 §3.1.2.10: one and a half times the keep-alive; none asked for:
    // the HTTPS idle timeout.
    // Capped (max_keep_alive_s): a keep-alive of up to 18 h would let a
    // device that vanished hold its connection slot for 27 h.
    keep_alive_ = c.keep_alive_s > 0
                    ? std::chrono::milliseconds(
                        std::min<int>(c.keep_alive_s, max_keep_alive_s) * 1500)
                    : std::chrono::milliseconds(opts().idle_timeout_seconds * 1000);
    send(mqtt::encode_connack(false, connack_code::accepted));
    rearm();
    return true;
  }

  bool on_subscribe(const mqtt::frame& f, bool subscribe) {
    mqtt::subscribe_packet s;
    auto why = subscribe ? mqtt::parse_subscribe(f, s) : mqtt::parse_unsubscribe(f, s);
    if (!why.empty()) {
      violation("malformed", why);
      return false;
    }
    if (!subscribe) {
      for (const auto& [filter, qos] : s.filters)
        if (filter == mqtt::response_filter)
          subscribed_ = false;
      send(mqtt::encode_unsuback(s.packet_id));
      return true;
    }
    std::vector<uint8_t> granted;
    for (const auto& [filter, qos] : s.filters) {
      if (filter == mqtt::response_filter) {
        // DPS answers QoS 0 or 1; a QoS 2 request is granted 1.
        sub_qos_ = std::min<uint8_t>(qos, 1);
        subscribed_ = true;
        granted.push_back(sub_qos_);
      } else {
        granted.push_back(0x80); // only the documented filter is served
      }
    }
    send(mqtt::encode_suback(s.packet_id, granted));
    return true;
  }

  bool on_publish(const mqtt::frame& f) {
    mqtt::publish_packet p;
    if (auto why = mqtt::parse_publish(f, p); !why.empty()) {
      violation("malformed", why);
      return false;
    }
    mqtt::dps_request req;
    if (auto why = mqtt::parse_request_topic(p.topic, req); !why.empty()) {
      violation("unknown_topic", why + " (got '" + p.topic.substr(0, 128) + "')");
      return false;
    }
    if (inflight_ >= opts().max_inflight) {
      violation("inflight", "more than mqtt.max_inflight ("
                              + std::to_string(opts().max_inflight)
                              + ") requests unanswered");
      return false;
    }
    // Counted before looking at `stopping` (both sequentially consistent):
    // either stop() sees this request and waits for its answer, or this
    // sees stop() began and takes nothing.
    ctx_->answering.fetch_add(1);
    if (ctx_->stopping.load()) {
      ctx_->answering.fetch_sub(1);
      going_away();
      return false;
    }
    if (p.qos == 1)
      send(mqtt::encode_puback(p.packet_id));
    device_call call;
    call.what = req.what == mqtt::dps_request::kind::poll ? device_call::kind::poll
                                                          : device_call::kind::register_device;
    call.id_scope = user_.id_scope;
    call.registration_id = user_.registration_id;
    call.operation_id = req.operation_id;
    call.api_version = user_.api_version;
    if (call.what == device_call::kind::register_device)
      call.body = std::string(p.payload); // polls: Node sends " ", ignored
    call.force_registration = req.force_registration;
    call.credential = credential_;
    call.protocol = transport();
    call.client_ip = ip_;
    call.tracking_id = crypto::uuid4();
    ++inflight_;
    struct pending {
      std::string rid, tracking;
      bool poll;
      clock::time_point started = clock::now();
    };
    auto ctx = std::make_shared<pending>(
      pending{std::move(req.rid), call.tracking_id, call.what == device_call::kind::poll});
    // [throttling] requests_per_minute_per_address: answered as DPS answers
    // a throttled request over MQTT (res/429/?$rid=...&retry-after=N with
    // the 429001 body); the connection stays.
    if (int wait = ctx_->api.admit_address(ip_)) {
      auto a = device_api::failure({prov::error_code::throttled,
                                    "too many requests from this client address; retry after "
                                    "the retry-after interval"},
                                   ctx->tracking);
      a.retry_after_s = wait;
      on_answer(*ctx, std::move(a));
      return true;
    }
    ctx_->api.handle(std::move(call), [self = shared_from_this(), ctx](device_answer a) {
      net::post(self->sock_.get_executor(), [self, ctx, a = std::move(a)]() mutable {
        self->on_answer(*ctx, std::move(a));
      });
    });
    return true;
  }

  template <class Pending>
  void on_answer(const Pending& p, device_answer a) {
    --inflight_;
    const double secs = std::chrono::duration<double>(clock::now() - p.started).count();
    const char* op = p.poll ? "OperationStatusLookup" : "DeviceRegistration";
    if (opts().metrics != nullptr)
      opts().metrics->mqtt_request(p.poll ? "poll" : "register", a.status, secs,
                                      transport());
    if (opts().log != nullptr) {
      metrics::operation_record rec;
      rec.category = "DeviceOperations";
      rec.operation = op;
      rec.status = a.status;
      std::string code;
      if (a.err)
        code = std::to_string(static_cast<int32_t>(a.err.code));
      rec.error_code = code;
      rec.description = a.err.message;
      rec.duration_ms = secs * 1000.0;
      rec.id = user_.registration_id;
      rec.type = "Registration";
      rec.protocol = "Mqtt";
      rec.caller_ip = ip_;
      rec.correlation_id = p.tracking;
      rec.api_version = user_.api_version;
      opts().log->operation(rec);
    }
    if (phase_ != phase::open || !subscribed_) {
      // Gone, or nobody subscribed to the answer (MQTT delivers to subscribers).
      ctx_->answering.fetch_sub(1);
      return;
    }
    auto topic = mqtt::response_topic(a.status, p.rid, a.retry_after_s);
    uint16_t id = 0;
    if (sub_qos_ > 0) {
      id = next_packet_id_++;
      if (next_packet_id_ == 0)
        next_packet_id_ = 1;
    }
    auto pkt = mqtt::encode_publish(topic, a.body, sub_qos_, id);
    // stop() waits until it is written (write_some(), or close_now()).
    ++unwritten_answers_;
    if (pkt.empty()) // cannot happen with $rid capped; never send a corrupt packet
      return violation("unknown_topic", "the response topic does not fit an MQTT string");
    send(std::move(pkt));
    if (pending_.empty() && written_ >= writing_.size())
      answers_written(); // written at once
  }

  /// The server is stopping: the request is not taken. Over WebSocket a
  /// close frame 1001 (going away) tells the client why; over TLS, MQTT
  /// 3.1.1 has no way to say it but closing.
  void going_away() {
    log_violation("the server is stopping: request not taken");
    if (!ws_)
      return close_now("server_stopping");
    count_close("server_stopping");
    close_websocket(ws::close_code::going_away, "server stopping");
  }

  tcp::socket sock_;
  net::steady_timer timer_;
  prov::net::ssl_ptr ssl_; // after sock_: freed before the socket closes
  std::shared_ptr<listener_context> ctx_;
  listener_slots& slots_; ///< the slot this connection holds
  std::string ip_;
  const bool ws_ = false; ///< MQTT over WebSocket
  phase phase_ = phase::handshake;
  std::shared_ptr<const client_chain> chain_;
  // WebSocket only:
  std::string ws_in_; ///< bytes of a frame not complete yet
  ws::reader_state ws_state_;
  bool ws_end_ = false;    ///< a close frame or a framing error was read
  bool ws_failed_ = false; ///< ... a framing error
  bool ws_close_sent_ = false; ///< our close frame is queued: nothing after it
  ws::close_code ws_close_code_ = ws::close_code::normal;
  std::string ws_why_;
  bool close_counted_ = false;
  mqtt::dps_username user_;
  device_credential credential_;
  bool subscribed_ = false;
  uint8_t sub_qos_ = 0;
  uint16_t next_packet_id_ = 1;
  int inflight_ = 0;
  int unwritten_answers_ = 0; ///< queued answers counted in ctx_->answering
  bool read_waiting_ = false;
  bool write_waiting_ = false;
  bool close_after_flush_ = false;
  bool batching_ = false;      ///< in read_some(): send() only queues
  bool resume_posted_ = false; ///< read_some() yielded and posted pump()
  std::string in_;
  std::string writing_; ///< being written; unchanged until done
  std::size_t written_ = 0;
  std::string pending_; ///< queued behind writing_
  // Deadlines.
  bool timer_armed_ = false;
  clock::time_point timer_at_;
  clock::time_point connect_deadline_;
  clock::time_point last_rx_ = clock::now();
  std::chrono::milliseconds keep_alive_{0};
  std::optional<clock::time_point> partial_deadline_;
  std::optional<clock::time_point> write_deadline_;
};

class server_impl final : public mqtt_server {
public:
  server_impl(const mqtt_server_options& opts, engine& eng)
    : opts_(opts), ctx_(std::make_shared<listener_context>(opts, eng)) {
    if (!opts_.listen.empty()) // else WebSocket only: on the HTTPS server's threads
      pool_.emplace(opts_.threads);
  }

  ~server_impl() override { stop(); }

  error start() {
    if (opts_.listen.empty())
      return {};
    if (auto err = prov::net::make_device_tls_context(opts_.cert_chain_file, opts_.key_file,
                                                      "provisiond-mqtt", ssl_))
      return err;
    std::signal(SIGPIPE, SIG_IGN); // OpenSSL writes with write(2)
    if (auto err = pool_->listen(opts_.listen, "MQTT"))
      return err;
    accept();
    pool_->run("prov-mqtt");
    return {};
  }

  uint16_t port() const override { return pool_ ? pool_->port() : 0; }
  std::string address() const override { return pool_ ? pool_->address() : std::string(); }
  int open_connections() const override { return ctx_->slots.open(); }
  int open_websocket_connections() const override { return ctx_->ws_slots.open(); }

  void adopt_websocket(upgraded_connection&& c) override {
    if (ctx_->stopping.load()) {
      // Stopping: no new sessions. The slot goes back, the socket closes.
      c.slots->release(c.ip);
      error_code ignored;
      c.sock.close(ignored);
      return;
    }
    // From here an MQTT connection in the gauges, under the same caps.
    if (c.slots->transfer_to(ctx_->ws_slots))
      c.slots = &ctx_->ws_slots;
    auto s = std::make_shared<session>(std::move(c), ctx_);
    bool told;
    {
      // Under the lock stop() takes to tell the sessions: either it sees
      // this one, or this sees it has (and tells this one itself).
      std::lock_guard<std::mutex> lock(ctx_->ws_mutex);
      told = ctx_->ws_closing;
      ctx_->ws_sessions.emplace(s.get(), s);
    }
    s->run();
    if (told)
      s->going_away_soon();
  }

  void stop_accepting() override {
    ctx_->stopping.store(true);
    if (accepting_stopped_.exchange(true) || !pool_)
      return;
    pool_->close_acceptor();
  }

  void stop() override {
    if (stopped_.exchange(true))
      return;
    stop_accepting();
    if (pool_) {
      pool_->stop(ctx_->answering); // both transports' answers, then its threads
    } else {
      // WebSocket sessions' answers, until written (they run on the HTTPS
      // threads, which app/provisiond.cpp stops after this).
      auto deadline = clock::now() + std::chrono::seconds(2);
      while (ctx_->answering.load() > 0 && clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    close_websockets();
  }

private:
  /// Tells every open WebSocket session the server goes away (close frame
  /// 1001, on its own thread), then waits (up to 1 s) for the frames to be
  /// written and the sessions to end.
  void close_websockets() {
    std::vector<std::shared_ptr<session>> open;
    {
      std::lock_guard<std::mutex> lock(ctx_->ws_mutex);
      ctx_->ws_closing = true;
      for (auto& [p, w] : ctx_->ws_sessions)
        if (auto s = w.lock())
          open.push_back(std::move(s));
    }
    for (auto& s : open)
      s->going_away_soon();
    open.clear(); // the sessions' own handlers keep them alive until they end
    auto deadline = clock::now() + std::chrono::seconds(1);
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(ctx_->ws_mutex);
        if (ctx_->ws_sessions.empty())
          return;
      }
      if (clock::now() >= deadline)
        return; // a client that does not read: the HTTPS stop closes it
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  void accept() {
    pool_->acceptor().async_accept(pool_->next(), [this](error_code ec, tcp::socket sock) {
      if (ec == net::error::operation_aborted || !pool_->acceptor().is_open())
        return;
      if (ec) {
        // Out of descriptors or memory fails again at once: back off 100 ms
        // (clients wait in the listen backlog); any other error concerns
        // one client, and accept(2) says to retry.
        const char* name = exhausted_resource(ec.value());
        if (name == nullptr)
          return accept();
        if (opts_.metrics != nullptr)
          opts_.metrics->accept_failed(name);
        backoff_.emplace(pool_->first());
        backoff_->expires_after(std::chrono::milliseconds(100));
        return backoff_->async_wait([this](error_code wait_ec) {
          if (!wait_ec && pool_->acceptor().is_open())
            accept();
        });
      }
      admit(std::move(sock));
      accept();
    });
  }

  void admit(tcp::socket sock) {
    error_code ec;
    std::string ip = client_address(sock);
    auto v = ctx_->slots.acquire(ip);
    if (v != connection_slots::verdict::admitted) {
      if (opts_.metrics != nullptr)
        opts_.metrics->connection_refused(v == connection_slots::verdict::over_total
                                            ? "mqtt_max_connections"
                                            : "mqtt_max_connections_per_client");
      sock.close(ec);
      return;
    }
    sock.set_option(tcp::no_delay(true), ec);
    std::make_shared<session>(std::move(sock), std::move(ip), ctx_, ssl_.get(), ctx_->slots)
      ->run();
  }

  mqtt_server_options opts_;
  std::shared_ptr<listener_context> ctx_;
  prov::net::ssl_ctx_ptr ssl_;
  std::optional<io_pool> pool_; // after what sessions reference; none: WebSocket only
  std::optional<net::steady_timer> backoff_;
  std::atomic<bool> stopped_{false};
  std::atomic<bool> accepting_stopped_{false};
};

} // namespace

error mqtt_server::start(const mqtt_server_options& opts, engine& eng,
                         std::unique_ptr<mqtt_server>& out) {
  auto impl = std::make_unique<server_impl>(opts, eng);
  if (auto err = impl->start())
    return err;
  out = std::move(impl);
  return {};
}

} // namespace prov::gateway
