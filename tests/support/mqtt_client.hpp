#pragma once
// A hand-written MQTT 3.1.1 client over raw OpenSSL for the MQTT transport's
// integration tests: blocking, with a receive timeout, sending whatever
// bytes a test builds (valid or not) and reading packets back with the
// server's own codec (net/mqtt_codec). Over TLS to the MQTT port, or over
// WebSocket on the HTTPS port (`websocket`): then every send() is one masked
// binary frame and read() takes the MQTT bytes out of the server's frames.

#include <doctest/doctest.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "net/mqtt_codec.hpp"
#include "net/websocket.hpp"

namespace prov::test {

struct mqtt_packet {
  mqtt::packet_type type = mqtt::packet_type::connect;
  uint8_t flags = 0;
  std::string body;
};

class mqtt_client {
public:
  /// Connects over TLS (trusting `ca_file`, verifying nothing else: the
  /// server's name is checked by other tests) to 127.0.0.1:`port`.
  /// `timeout_s` bounds every read. `setup` may add a client certificate.
  struct websocket_t {};
  static constexpr websocket_t websocket{};

  /// Over WebSocket: TLS to the HTTPS `port`, the upgrade request at
  /// /$iothub/websocket with subprotocol mqtt, which must get a 101.
  /// `with_request`: bytes (client frames) sent in the same TLS write as the
  /// request, before the 101 is seen.
  mqtt_client(websocket_t, uint16_t port, const std::string& ca_file, int timeout_s = 20,
              const std::string& with_request = {}, int rcvbuf = 0)
    : mqtt_client(port, ca_file, timeout_s, {}, rcvbuf) {
    ws_ = true;
    REQUIRE(send_raw(upgrade_request() + with_request));
    auto head = read_head();
    REQUIRE_MESSAGE(head.rfind("HTTP/1.1 101 ", 0) == 0, head);
    REQUIRE(head.find("Sec-WebSocket-Protocol: mqtt\r\n") != std::string::npos);
    REQUIRE(head.find("Sec-WebSocket-Accept: " + ws::accept_key(ws_key) + "\r\n")
            != std::string::npos);
  }

  static constexpr const char* ws_key = "dGhlIHNhbXBsZSBub25jZQ==";

  /// The SDKs' upgrade request; `path`, `protocol` ("" = no header) and
  /// `key` ("" = none) vary for the negative tests.
  static std::string upgrade_request(const std::string& path = "/$iothub/websocket",
                                     const std::string& protocol = "mqtt",
                                     const std::string& key = ws_key,
                                     const std::string& version = "13") {
    std::string r = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Version: " + version + "\r\n";
    if (!key.empty())
      r += "Sec-WebSocket-Key: " + key + "\r\n";
    if (!protocol.empty())
      r += "Sec-WebSocket-Protocol: " + protocol + "\r\n";
    r += "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n";
    return r;
  }

  /// Reads an HTTP response head (through the blank line); what follows
  /// stays buffered for the frames.
  std::string read_head() {
    for (;;) {
      auto end = raw_in_.find("\r\n\r\n");
      if (end != std::string::npos) {
        auto head = raw_in_.substr(0, end + 4);
        raw_in_.erase(0, end + 4);
        return head;
      }
      if (!read_more())
        return raw_in_;
    }
  }

  /// `rcvbuf` > 0: the socket's receive buffer, set before connecting (a
  /// small one keeps what the server can push before blocking small).
  mqtt_client(uint16_t port, const std::string& ca_file, int timeout_s = 20,
              const std::function<void(SSL_CTX*)>& setup = {}, int rcvbuf = 0) {
    std::signal(SIGPIPE, SIG_IGN); // writes to a connection the server closed
    ctx_ = SSL_CTX_new(TLS_client_method());
    REQUIRE(ctx_ != nullptr);
    REQUIRE(SSL_CTX_load_verify_locations(ctx_, ca_file.c_str(), nullptr) == 1);
    SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER, nullptr);
    if (setup)
      setup(ctx_);
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    if (rcvbuf > 0)
      ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    timeval tv{timeout_s, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssl_ = SSL_new(ctx_);
    SSL_set_fd(ssl_, fd_);
    REQUIRE(SSL_connect(ssl_) == 1);
  }
  ~mqtt_client() {
    SSL_free(ssl_);
    ::close(fd_);
    SSL_CTX_free(ctx_);
  }
  mqtt_client(const mqtt_client&) = delete;
  mqtt_client& operator=(const mqtt_client&) = delete;

  /// False when the server has closed the connection already. Over
  /// WebSocket: one masked binary frame.
  bool send(const std::string& bytes) {
    if (ws_)
      return send_raw(ws::encode_client_frame(ws::opcode::binary, bytes, mask_++));
    return send_raw(bytes);
  }

  /// The bytes as they are (a WebSocket frame a test built).
  bool send_raw(const std::string& bytes) {
    return SSL_write(ssl_, bytes.data(), static_cast<int>(bytes.size()))
           == static_cast<int>(bytes.size());
  }

  /// Over WebSocket: the server's close frame's status (0 = none seen yet).
  int close_status() const { return close_status_; }
  const std::string& close_reason() const { return close_reason_; }
  /// Data frames the server sent after its close frame (RFC 6455 §5.5.1: none).
  int data_after_close() const { return data_after_close_; }
  /// Pong payloads received.
  const std::vector<std::string>& pongs() const { return pongs_; }

  /// The next packet, or nullopt when the connection closed (or the read
  /// timed out: `timed_out()` tells which).
  std::optional<mqtt_packet> read() {
    for (;;) {
      mqtt::frame f;
      std::size_t consumed = 0;
      auto st = mqtt::read_frame(in_, 1 << 24, f, consumed);
      if (st == mqtt::frame_status::ok) {
        mqtt_packet p{f.type, f.flags, std::string(f.body)};
        in_.erase(0, consumed);
        return p;
      }
      REQUIRE(st == mqtt::frame_status::need_more);
      if (ws_) {
        if (!unframe())
          return std::nullopt;
        continue;
      }
      if (!read_more())
        return std::nullopt;
      in_ += raw_in_;
      raw_in_.clear();
    }
  }

  /// One SSL_read into raw_in_; false when closed or timed out.
  bool read_more() {
    char buf[16384];
    ERR_clear_error();
    errno = 0; // a stale EAGAIN from an earlier call must not read as a timeout
    int n = SSL_read(ssl_, buf, sizeof buf);
    if (n <= 0) {
      // SO_RCVTIMEO expiring: OpenSSL reports a retry (or a syscall error
      // with EAGAIN); a close is ZERO_RETURN, or SYSCALL with errno 0.
      const int e = SSL_get_error(ssl_, n);
      const int err = errno;
      timed_out_ = e == SSL_ERROR_WANT_READ
                   || (e == SSL_ERROR_SYSCALL && (err == EAGAIN || err == EWOULDBLOCK));
      ERR_clear_error();
      return false;
    }
    raw_in_.append(buf, static_cast<std::size_t>(n));
    return true;
  }

  /// Over WebSocket: reads one server frame (unmasked, as servers send);
  /// binary payloads go to in_, pongs and the close status are kept. False
  /// when the connection closed or timed out.
  bool unframe() {
    for (;;) {
      if (raw_in_.size() >= 2) {
        const auto b0 = static_cast<uint8_t>(raw_in_[0]);
        const auto b1 = static_cast<uint8_t>(raw_in_[1]);
        REQUIRE_MESSAGE((b1 & 0x80) == 0, "the server masked a frame");
        std::size_t pos = 2;
        uint64_t len = b1 & 0x7F;
        bool have = true;
        if (len == 126) {
          have = raw_in_.size() >= 4;
          if (have)
            len = (uint64_t{static_cast<uint8_t>(raw_in_[2])} << 8)
                  | static_cast<uint8_t>(raw_in_[3]);
          pos = 4;
        } else if (len == 127) {
          have = raw_in_.size() >= 10;
          if (have) {
            len = 0;
            for (std::size_t i = 2; i < 10; ++i)
              len = (len << 8) | static_cast<uint8_t>(raw_in_[i]);
          }
          pos = 10;
        }
        if (have && raw_in_.size() >= pos + len) {
          std::string payload = raw_in_.substr(pos, static_cast<std::size_t>(len));
          raw_in_.erase(0, pos + static_cast<std::size_t>(len));
          switch (b0 & 0x0F) {
          case 0x0:
          case 0x2:
            if (close_status_ != 0)
              ++data_after_close_;
            in_ += payload;
            return true;
          case 0xA: pongs_.push_back(payload); continue;
          case 0x8:
            close_status_ = ws::close_status(payload);
            close_reason_ = payload.size() > 2 ? payload.substr(2) : std::string();
            continue; // the server closes the connection next
          default: FAIL("unexpected server frame opcode " << (b0 & 0x0F));
          }
        }
      }
      if (!read_more())
        return false;
    }
  }

  /// One SSL_read: the bytes of at most one TLS record, i.e. of one server
  /// write (up to 16 KB); "" when closed or timed out. Bypasses read()'s
  /// buffer, so call it with nothing buffered.
  std::string read_record() {
    REQUIRE(in_.empty());
    char buf[16384];
    ERR_clear_error();
    int n = SSL_read(ssl_, buf, sizeof buf);
    ERR_clear_error();
    return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
  }

  /// Reads until the server closes; true when it did (not a timeout).
  bool closed_by_server() {
    while (read()) {
    }
    return !timed_out_;
  }

  bool timed_out() const { return timed_out_; }

  /// CONNECT with the DPS user name, then the CONNACK's return code (-1 when
  /// the connection closed without one).
  int connect(const std::string& client_id, const std::optional<std::string>& username,
              const std::optional<std::string>& password, uint16_t keep_alive_s = 60) {
    mqtt::connect_packet c;
    c.protocol_level = 4;
    c.clean_session = true;
    c.keep_alive_s = keep_alive_s;
    c.client_id = client_id;
    c.username = username;
    c.password = password;
    send(mqtt::encode_connect(c));
    auto p = read();
    if (!p)
      return -1;
    REQUIRE(p->type == mqtt::packet_type::connack);
    REQUIRE(p->body.size() == 2);
    return static_cast<uint8_t>(p->body[1]);
  }

  /// SUBSCRIBE to `filter` at `qos`; the granted QoS (0x80 = refused).
  int subscribe(const std::string& filter, uint8_t qos, uint16_t id = 1) {
    mqtt::subscribe_packet s;
    s.packet_id = id;
    s.filters = {{filter, qos}};
    send(mqtt::encode_subscribe(s));
    auto p = read();
    REQUIRE(p);
    REQUIRE(p->type == mqtt::packet_type::suback);
    REQUIRE(p->body.size() == 3);
    return static_cast<uint8_t>(p->body[2]);
  }

  /// A PUBLISH the server sent: topic and payload, acknowledged when QoS 1.
  struct message {
    std::string topic;
    std::string payload;
    uint8_t qos = 0;
  };

  /// The next PUBLISH from the server (PUBACKs for our QoS 1 publishes are
  /// skipped and counted); nullopt when the connection closed.
  std::optional<message> next_message() {
    for (;;) {
      auto p = read();
      if (!p)
        return std::nullopt;
      if (p->type == mqtt::packet_type::puback) {
        ++pubacks_;
        continue;
      }
      REQUIRE(p->type == mqtt::packet_type::publish);
      mqtt::frame f{p->type, p->flags, p->body};
      mqtt::publish_packet pub;
      REQUIRE(mqtt::parse_publish(f, pub).empty());
      if (pub.qos == 1) {
        std::string ack = mqtt::encode_puback(pub.packet_id);
        send(ack);
      }
      return message{pub.topic, std::string(pub.payload), pub.qos};
    }
  }

  int pubacks() const { return pubacks_; }

private:
  SSL_CTX* ctx_ = nullptr;
  SSL* ssl_ = nullptr;
  int fd_ = -1;
  std::string in_;     ///< MQTT bytes
  std::string raw_in_; ///< TLS bytes not taken yet (WebSocket frames, a response head)
  bool ws_ = false;
  uint32_t mask_ = 0x1234ABCD;
  int close_status_ = 0;
  int data_after_close_ = 0;
  std::string close_reason_;
  std::vector<std::string> pongs_;
  bool timed_out_ = false;
  int pubacks_ = 0;
};

} // namespace prov::test
