#pragma once
// A small synchronous HTTPS/1.1 client for the CLI, the interop/integration
// tests and the benchmark. One client = one (reused) TLS connection to one
// server; not thread-safe (use one client per thread). Boost and OpenSSL stay
// in https_client.cpp.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "messages/error.hpp"

namespace prov::net {

/// Header fields in arrival order; lookup is case-insensitive (HTTP field
/// names are), values are kept as received.
struct http_headers {
  std::vector<std::pair<std::string, std::string>> fields;

  /// First value of `name`, or nullptr when absent.
  const std::string* find(std::string_view name) const noexcept;
  /// First value of `name`, or `fallback` when absent.
  std::string get(std::string_view name, std::string_view fallback = {}) const;
  bool contains(std::string_view name) const noexcept { return find(name) != nullptr; }
  /// Appends a field (duplicates allowed, as on the wire).
  void add(std::string name, std::string value) {
    fields.emplace_back(std::move(name), std::move(value));
  }
  /// Replaces every field named `name` with one field.
  void set(std::string_view name, std::string value);
};

/// A complete response.
struct https_response {
  int status = 0;
  std::string reason;
  http_headers headers;
  std::string body;
};

/// Connection and trust settings.
struct https_client_options {
  std::string host = "localhost"; ///< DNS name or IP literal to dial
  uint16_t port = 443;
  /// PEM file with the CA certificate(s) the server must chain to. Empty and
  /// `ca_pem` empty: the system default trust store.
  std::string ca_file;
  /// The same as PEM text (wins over ca_file when non-empty).
  std::string ca_pem;
  /// Name checked against the server certificate (DNS SAN, or IP SAN when it
  /// is an IP literal) and sent as SNI (DNS names only). Empty = `host`.
  std::string server_name;
  /// Turn off all certificate checks (tests against throwaway servers only).
  bool insecure_skip_verify = false;
  /// Optional client certificate (PEM chain, leaf first) and key (PEM), for
  /// X.509 attestation.
  std::string client_cert_file;
  std::string client_key_file;

  std::chrono::milliseconds connect_timeout{10'000}; ///< resolve + TCP + TLS handshake
  std::chrono::milliseconds request_timeout{30'000}; ///< write request + read response
  /// false: open a fresh TCP+TLS connection for every request and send
  /// `Connection: close` (the benchmark measures full handshakes this way).
  bool reuse_connection = true;
  std::size_t max_body_bytes = 64u << 20;
  std::string user_agent = "provisiond-client/0.1";
};

/// Synchronous HTTPS client with keep-alive reuse and transparent reconnect:
/// a request that fails on a reused connection before any response byte
/// arrived (the server closed an idle connection) is retried once on a new
/// connection. Errors are returned, never thrown:
///   unavailable (503000)     resolve / connect / TLS handshake / verify failed,
///                            connection lost
///   request_timeout (408000) connect_timeout or request_timeout elapsed
///   bad_request (400000)     invalid arguments (method, target, header values)
///   payload_too_large        response body above max_body_bytes
class https_client {
public:
  explicit https_client(https_client_options opts);
  ~https_client();
  https_client(https_client&&) noexcept;
  https_client& operator=(https_client&&) noexcept;
  https_client(const https_client&) = delete;
  https_client& operator=(const https_client&) = delete;

  /// Sends one request and reads the whole response. `target` is the
  /// origin-form path plus query ("/x?api-version=..."). Host, User-Agent and
  /// Content-Length are filled in unless `headers` sets them. Any HTTP status
  /// is a success here; the caller interprets it.
  [[nodiscard]] error request(std::string_view method, std::string_view target,
                              const http_headers& headers, std::string_view body,
                              https_response& out);

  /// Convenience overload without extra headers or body.
  [[nodiscard]] error request(std::string_view method, std::string_view target,
                              https_response& out) {
    return request(method, target, http_headers{}, {}, out);
  }

  /// Connects now (also verifies the server); requests connect lazily anyway.
  [[nodiscard]] error connect();
  /// Closes the connection (best-effort TLS close_notify); the next request
  /// reconnects.
  void close() noexcept;
  /// True while a connection is open.
  bool connected() const noexcept;
  /// TCP+TLS connections opened so far (tests and the benchmark read it).
  uint64_t connections_opened() const noexcept;

  const https_client_options& options() const noexcept;

private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

/// Splits "host:port", "[v6]:port" or "host" (then `default_port`). Errors
/// are bad_request naming the problem.
[[nodiscard]] error split_host_port(std::string_view text, uint16_t default_port,
                                    std::string& host, uint16_t& port);

} // namespace prov::net
