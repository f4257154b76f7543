#pragma once
// One HTTP request on a fresh TLS connection with raw OpenSSL, for tests of
// what a TLS session carries (resumption, client certificates).

#include <doctest/doctest.h>

#include <cstdint>
#include <string>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/ssl.h>

namespace prov::test {

/// Sends `request` to 127.0.0.1:`port` over a TLS connection from `ctx`
/// (set up by the caller: versions, client certificate; freed by it), and
/// reads to the end into `response` (TLS 1.3 tickets arrive after the
/// handshake). `resume`: offer that session; `out`: the session it ends
/// with. Returns whether the server resumed the session.
inline bool raw_tls_request(SSL_CTX* ctx, uint16_t port, const std::string& request,
                            SSL_SESSION* resume, SSL_SESSION** out, std::string& response) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  SSL* ssl = SSL_new(ctx);
  SSL_set_fd(ssl, fd);
  if (resume != nullptr)
    SSL_set_session(ssl, resume);
  REQUIRE(SSL_connect(ssl) == 1);
  REQUIRE(SSL_write(ssl, request.data(), static_cast<int>(request.size()))
          == static_cast<int>(request.size()));
  response.clear();
  char buf[4096];
  int n;
  while ((n = SSL_read(ssl, buf, sizeof buf)) > 0)
    response.append(buf, static_cast<std::size_t>(n));
  const bool reused = SSL_session_reused(ssl) == 1;
  if (out != nullptr)
    *out = SSL_get1_session(ssl);
  SSL_shutdown(ssl); // freed without it, OpenSSL marks the session not resumable
  SSL_free(ssl);
  ::close(fd);
  return reused;
}

} // namespace prov::test
