#pragma once
// A hand-written MQTT 3.1.1 client over raw OpenSSL for the MQTT transport's
// integration tests: blocking, with a receive timeout, sending whatever
// bytes a test builds (valid or not) and reading packets back with the
// server's own codec (net/mqtt_codec).

#include <doctest/doctest.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "net/mqtt_codec.hpp"

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
  mqtt_client(uint16_t port, const std::string& ca_file, int timeout_s = 20,
              const std::function<void(SSL_CTX*)>& setup = {}) {
    std::signal(SIGPIPE, SIG_IGN); // writes to a connection the server closed
    ctx_ = SSL_CTX_new(TLS_client_method());
    REQUIRE(ctx_ != nullptr);
    REQUIRE(SSL_CTX_load_verify_locations(ctx_, ca_file.c_str(), nullptr) == 1);
    SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER, nullptr);
    if (setup)
      setup(ctx_);
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
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

  /// False when the server has closed the connection already.
  bool send(const std::string& bytes) {
    return SSL_write(ssl_, bytes.data(), static_cast<int>(bytes.size()))
           == static_cast<int>(bytes.size());
  }

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
        return std::nullopt;
      }
      in_.append(buf, static_cast<std::size_t>(n));
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
  std::string in_;
  bool timed_out_ = false;
  int pubacks_ = 0;
};

} // namespace prov::test
