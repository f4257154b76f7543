// https_client against a tiny blocking OpenSSL server run in a thread, with a
// throwaway CA and server certificate made by the openssl CLI in a temp dir.
// Raw OpenSSL (not Beast) keeps this test quick to compile and lets it
// misbehave on purpose (drop idle connections, never answer).

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "net/https_client.hpp"

namespace fs = std::filesystem;
using prov::error_code;
using prov::net::http_headers;
using prov::net::https_client;
using prov::net::https_client_options;
using prov::net::https_response;

namespace {

// ---- throwaway PKI ------------------------------------------------------

struct test_pki {
  fs::path dir;
  bool ok = false;

  test_pki() {
    char tmpl[] = "/tmp/https_client_test.XXXXXX";
    if (!mkdtemp(tmpl)) return;
    dir = tmpl;
    std::ofstream(dir / "ext.cnf") << "basicConstraints=CA:FALSE\n"
                                      "keyUsage=digitalSignature\n"
                                      "extendedKeyUsage=serverAuth\n"
                                      "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
    std::ofstream(dir / "ca.cnf") << "basicConstraints=critical,CA:TRUE\n"
                                     "keyUsage=critical,keyCertSign,cRLSign\n";
    const std::string d = dir.string();
    const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes ";
    const std::string cmd =
        "(cd '" + d + "' && "
        "openssl req -x509" + ec + "-keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca "
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign && "
        "openssl req -x509" + ec + "-keyout other.key -out other-ca.pem -days 2 -subj /CN=other-ca "
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign && "
        "openssl req" + ec + "-keyout server.key -out server.csr -subj /CN=localhost && "
        "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
        "-out server.pem -days 2 -extfile ext.cnf) >/dev/null 2>&1"
        "";
    ok = std::system(cmd.c_str()) == 0 && fs::exists(dir / "server.pem");
  }
  ~test_pki() {
    std::error_code ignored;
    if (!dir.empty()) fs::remove_all(dir, ignored);
  }
  std::string path(const char* name) const { return (dir / name).string(); }
};

const test_pki& pki() {
  static test_pki p;
  return p;
}

// ---- blocking test server ------------------------------------------------

enum class behaviour {
  normal,          // keep-alive unless the client says Connection: close
  close_after_one, // drop every connection after one response (no header says so)
  abort_after_one, // same, but without close_notify (TCP close only)
  never_respond,   // read the request, then stay silent
};

class test_server {
public:
  explicit test_server(behaviour b) : mode_(b) {
    std::signal(SIGPIPE, SIG_IGN); // writes to a client that hung up must not kill the test
    ctx_ = SSL_CTX_new(TLS_server_method());
    REQUIRE(SSL_CTX_use_certificate_chain_file(ctx_, pki().path("server.pem").c_str()) == 1);
    REQUIRE(SSL_CTX_use_PrivateKey_file(ctx_, pki().path("server.key").c_str(), SSL_FILETYPE_PEM) == 1);
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(fd_, 16) == 0);
    socklen_t len = sizeof addr;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~test_server() {
    stop_ = true;
    thread_.join();
    ::close(fd_);
    SSL_CTX_free(ctx_);
  }

  uint16_t port() const { return port_; }
  int connections() const { return connections_; }
  std::vector<std::string> requests() const {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_;
  }
  std::string last_sni() const {
    std::lock_guard<std::mutex> lock(mu_);
    return sni_;
  }

private:
  void serve() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      int c = ::accept(fd_, nullptr, nullptr);
      if (c < 0) continue;
      timeval tv{0, 50'000}; // short reads so `stop_` is noticed
      ::setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      SSL* ssl = SSL_new(ctx_);
      SSL_set_fd(ssl, c);
      if (accept_tls(ssl)) {
        ++connections_;
        if (const char* sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name)) {
          std::lock_guard<std::mutex> lock(mu_);
          sni_ = sni;
        }
        bool graceful = handle(ssl);
        if (graceful) SSL_shutdown(ssl);
      }
      SSL_free(ssl);
      ::close(c);
      ERR_clear_error();
    }
  }

  bool accept_tls(SSL* ssl) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!stop_ && std::chrono::steady_clock::now() < deadline) {
      int r = SSL_accept(ssl);
      if (r == 1) return true;
      int e = SSL_get_error(ssl, r);
      if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) return false;
    }
    return false;
  }

  // Reads into `buf` until it holds `need` bytes (or a header end when
  // need == 0). False on close / error / stop.
  bool read_more(SSL* ssl, std::string& buf) {
    char tmp[4096];
    while (!stop_) {
      int n = SSL_read(ssl, tmp, sizeof tmp);
      if (n > 0) {
        buf.append(tmp, static_cast<std::size_t>(n));
        return true;
      }
      int e = SSL_get_error(ssl, n);
      if (e == SSL_ERROR_WANT_READ) continue; // SO_RCVTIMEO tick
      return false;
    }
    return false;
  }

  // Serves requests on one connection; returns whether to send close_notify.
  bool handle(SSL* ssl) {
    std::string buf;
    for (;;) {
      std::size_t end;
      while ((end = buf.find("\r\n\r\n")) == std::string::npos)
        if (!read_more(ssl, buf)) return true;
      std::string head = buf.substr(0, end + 2);
      buf.erase(0, end + 4);
      std::size_t content_length = 0;
      std::string host, conn, lower = head;
      for (auto& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      auto header_value = [&](const std::string& name) {
        auto pos = lower.find("\r\n" + name + ":");
        if (pos == std::string::npos) return std::string();
        pos += name.size() + 3;
        auto eol = head.find("\r\n", pos);
        std::string v = head.substr(pos, eol - pos);
        while (!v.empty() && v.front() == ' ') v.erase(0, 1);
        return v;
      };
      if (auto v = header_value("content-length"); !v.empty()) content_length = std::stoul(v);
      host = header_value("host");
      conn = header_value("connection");
      while (buf.size() < content_length)
        if (!read_more(ssl, buf)) return true;
      std::string body = buf.substr(0, content_length);
      buf.erase(0, content_length);
      std::string request_line = head.substr(0, head.find("\r\n"));
      {
        std::lock_guard<std::mutex> lock(mu_);
        requests_.push_back(request_line + (conn.empty() ? "" : " [conn:" + conn + "]"));
      }

      if (mode_ == behaviour::never_respond) {
        std::string sink;
        while (read_more(ssl, sink)) {
        }
        return false;
      }

      std::string target = request_line.substr(request_line.find(' ') + 1);
      target = target.substr(0, target.find(' '));
      int status = 200;
      std::string out_body;
      if (target == "/status/404") {
        status = 404;
        out_body = R"({"errorCode":404201,"message":"not here"})";
      } else if (target == "/big") {
        out_body.assign(100'000, 'x');
      } else {
        out_body = request_line + "\n" + body;
      }
      bool close = conn == "close" || mode_ != behaviour::normal;
      std::string resp = "HTTP/1.1 " + std::to_string(status) + (status == 200 ? " OK" : " Not Found") +
                         "\r\nContent-Type: application/json\r\nX-Echo-Host: " + host +
                         "\r\nX-Mixed-Case: Yes\r\nContent-Length: " + std::to_string(out_body.size()) +
                         (conn == "close" ? "\r\nConnection: close" : "") + "\r\n\r\n" + out_body;
      if (SSL_write(ssl, resp.data(), static_cast<int>(resp.size())) <= 0) return false;
      if (close) return mode_ != behaviour::abort_after_one;
    }
  }

  behaviour mode_;
  SSL_CTX* ctx_ = nullptr;
  int fd_ = -1;
  uint16_t port_ = 0;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  mutable std::mutex mu_;
  std::vector<std::string> requests_;
  std::string sni_;
};

https_client_options opts_for(const test_server& s) {
  https_client_options o;
  o.host = "localhost";
  o.port = s.port();
  o.ca_file = pki().path("ca.pem");
  o.connect_timeout = std::chrono::seconds(5);
  o.request_timeout = std::chrono::seconds(5);
  return o;
}

} // namespace

TEST_CASE("https_client: keep-alive reuses one verified connection") {
  REQUIRE_MESSAGE(pki().ok, "openssl CLI failed to make test certificates");
  test_server server(behaviour::normal);
  https_client client(opts_for(server));
  https_response res;

  for (int i = 0; i < 3; ++i) {
    auto err = client.request("GET", "/echo?i=" + std::to_string(i), res);
    REQUIRE_MESSAGE(!err, err.message);
    CHECK(res.status == 200);
    CHECK(res.body == "GET /echo?i=" + std::to_string(i) + " HTTP/1.1\n");
  }
  CHECK(client.connections_opened() == 1);
  CHECK(server.connections() == 1);
  CHECK(server.last_sni() == "localhost");
  // Case-insensitive lookup; Host carries the non-default port.
  REQUIRE(res.headers.find("x-echo-host") != nullptr);
  CHECK(*res.headers.find("X-ECHO-HOST") == "localhost:" + std::to_string(server.port()));
  CHECK(res.headers.get("x-mixed-case") == "Yes");
  CHECK(res.headers.get("absent", "dflt") == "dflt");
  CHECK(client.connected());
  client.close();
  CHECK(!client.connected());
}

TEST_CASE("https_client: request body and headers, error statuses pass through") {
  REQUIRE(pki().ok);
  test_server server(behaviour::normal);
  https_client client(opts_for(server));
  https_response res;
  http_headers h;
  h.add("Content-Type", "application/json; charset=utf-8");
  h.add("Authorization", "SharedAccessSignature sr=x&sig=y&se=1");
  auto err = client.request("PUT", "/echo", h, R"({"registrationId":"dev-1"})", res);
  REQUIRE_MESSAGE(!err, err.message);
  CHECK(res.status == 200);
  CHECK(res.body == "PUT /echo HTTP/1.1\n{\"registrationId\":\"dev-1\"}");

  err = client.request("POST", "/echo", h, "", res); // empty POST still has a length
  REQUIRE_MESSAGE(!err, err.message);
  CHECK(res.body == "POST /echo HTTP/1.1\n");

  err = client.request("GET", "/status/404", res);
  REQUIRE_MESSAGE(!err, err.message);
  CHECK(res.status == 404);
  CHECK(res.body.find("404201") != std::string::npos);
  CHECK(client.connections_opened() == 1);
}

TEST_CASE("https_client: new connection per request when reuse is off") {
  REQUIRE(pki().ok);
  test_server server(behaviour::normal);
  auto o = opts_for(server);
  o.reuse_connection = false;
  https_client client(o);
  https_response res;
  for (int i = 0; i < 3; ++i) {
    auto err = client.request("GET", "/echo", res);
    REQUIRE_MESSAGE(!err, err.message);
    CHECK(res.status == 200);
    CHECK(!client.connected());
  }
  CHECK(client.connections_opened() == 3);
  CHECK(server.connections() == 3);
  for (const auto& r : server.requests()) CHECK(r.find("[conn:close]") != std::string::npos);
}

TEST_CASE("https_client: reconnects transparently when the server drops idle connections") {
  REQUIRE(pki().ok);
  for (auto mode : {behaviour::close_after_one, behaviour::abort_after_one}) {
    test_server server(mode);
    https_client client(opts_for(server));
    https_response res;
    for (int i = 0; i < 4; ++i) {
      auto err = client.request("POST", "/echo", http_headers{}, "n=" + std::to_string(i), res);
      REQUIRE_MESSAGE(!err, err.message);
      CHECK(res.body == "POST /echo HTTP/1.1\nn=" + std::to_string(i));
      // Let the server's close reach us so the next write hits a dead socket.
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    CHECK(server.connections() == 4);
    CHECK(client.connections_opened() == 4);
    CHECK(server.requests().size() == 4); // nothing sent twice to the server
  }
}

TEST_CASE("https_client: server verification") {
  REQUIRE(pki().ok);
  test_server server(behaviour::normal);
  https_response res;

  SUBCASE("untrusted CA is refused") {
    auto o = opts_for(server);
    o.ca_file = pki().path("other-ca.pem");
    https_client client(o);
    auto err = client.request("GET", "/echo", res);
    REQUIRE(err);
    CHECK(err.code == error_code::unavailable);
    CHECK(err.message.find("verify") != std::string::npos);
  }
  SUBCASE("host name must match the certificate") {
    auto o = opts_for(server);
    o.server_name = "not-localhost.example";
    https_client client(o);
    auto err = client.request("GET", "/echo", res);
    REQUIRE(err);
    CHECK(err.code == error_code::unavailable);
  }
  SUBCASE("IP literal is checked against the IP SAN") {
    auto o = opts_for(server);
    o.host = "127.0.0.1";
    https_client client(o);
    auto err = client.request("GET", "/echo", res);
    REQUIRE_MESSAGE(!err, err.message);
    CHECK(*res.headers.find("x-echo-host") == "127.0.0.1:" + std::to_string(server.port()));
  }
  SUBCASE("CA given as PEM text") {
    auto o = opts_for(server);
    std::ifstream in(pki().path("ca.pem"));
    o.ca_pem.assign(std::istreambuf_iterator<char>(in), {});
    o.ca_file = "/nonexistent";
    https_client client(o);
    auto err = client.connect();
    REQUIRE_MESSAGE(!err, err.message);
    CHECK(client.connected());
  }
  SUBCASE("missing CA file is a clear error") {
    auto o = opts_for(server);
    o.ca_file = "/nonexistent/ca.pem";
    https_client client(o);
    auto err = client.request("GET", "/echo", res);
    REQUIRE(err);
    CHECK(err.message.find("/nonexistent/ca.pem") != std::string::npos);
  }
}

TEST_CASE("https_client: timeouts and connection failures are errors, not hangs") {
  REQUIRE(pki().ok);
  https_response res;
  {
    test_server server(behaviour::never_respond);
    auto o = opts_for(server);
    o.request_timeout = std::chrono::milliseconds(300);
    https_client client(o);
    auto t0 = std::chrono::steady_clock::now();
    auto err = client.request("GET", "/echo", res);
    auto elapsed = std::chrono::steady_clock::now() - t0;
    REQUIRE(err);
    CHECK(err.code == error_code::request_timeout);
    CHECK(elapsed < std::chrono::seconds(3));
    CHECK(server.requests().size() == 1); // a timeout is not replayed
  }
  {
    // A port nobody listens on: bind, read the port, close.
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    socklen_t len = sizeof addr;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
    ::close(fd);
    https_client_options o;
    o.host = "127.0.0.1";
    o.port = ntohs(addr.sin_port);
    o.ca_file = pki().path("ca.pem");
    https_client client(o);
    auto err = client.request("GET", "/", res);
    REQUIRE(err);
    CHECK(err.code == error_code::unavailable);
    CHECK(err.message.find("connect") != std::string::npos);
  }
}

TEST_CASE("https_client: rejects malformed requests and oversized bodies") {
  REQUIRE(pki().ok);
  test_server server(behaviour::normal);
  auto o = opts_for(server);
  o.max_body_bytes = 1000;
  https_client client(o);
  https_response res;
  CHECK(client.request("GE T", "/", res).code == error_code::bad_request);
  CHECK(client.request("GET", "no-slash", res).code == error_code::bad_request);
  CHECK(client.request("GET", "/a b", res).code == error_code::bad_request);
  http_headers evil;
  evil.add("X-Evil", "a\r\nInjected: 1");
  CHECK(client.request("GET", "/", evil, "", res).code == error_code::bad_request);
  CHECK(server.connections() == 0); // refused before dialing

  auto err = client.request("GET", "/big", res);
  CHECK(err.code == error_code::payload_too_large);
  err = client.request("GET", "/echo", res); // the client recovers
  REQUIRE_MESSAGE(!err, err.message);
  CHECK(res.status == 200);
}

TEST_CASE("split_host_port") {
  std::string host;
  uint16_t port = 0;
  CHECK(!prov::net::split_host_port("127.0.0.1:8443", 1, host, port));
  CHECK(host == "127.0.0.1");
  CHECK(port == 8443);
  CHECK(!prov::net::split_host_port("localhost", 8443, host, port));
  CHECK(host == "localhost");
  CHECK(port == 8443);
  CHECK(!prov::net::split_host_port("[::1]:9000", 1, host, port));
  CHECK(host == "::1");
  CHECK(port == 9000);
  CHECK(!prov::net::split_host_port("::1", 443, host, port));
  CHECK(host == "::1");
  CHECK(port == 443);
  CHECK(prov::net::split_host_port("host:", 1, host, port));
  CHECK(prov::net::split_host_port("host:70000", 1, host, port));
  CHECK(prov::net::split_host_port("host:12a", 1, host, port));
  CHECK(prov::net::split_host_port(":80", 1, host, port));
  CHECK(prov::net::split_host_port("[::1", 1, host, port));
}
