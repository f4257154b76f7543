#pragma once
// Owning handles for OpenSSL objects and the text of its error queue, shared
// by the HTTPS server, the TLS material code and the benchmark harness.
// Include it only from .cpp files: it pulls in OpenSSL's headers.

#include <memory>
#include <string>

#include <openssl/err.h>
#include <openssl/ssl.h>

namespace prov::net {

/// unique_ptr deleter calling OpenSSL's free function F.
template <class T, void (*F)(T*)>
struct ossl_free {
  void operator()(T* p) const noexcept { F(p); }
};
using ssl_ptr = std::unique_ptr<SSL, ossl_free<SSL, SSL_free>>;
using ssl_ctx_ptr = std::unique_ptr<SSL_CTX, ossl_free<SSL_CTX, SSL_CTX_free>>;

/// The oldest queued OpenSSL error (the root cause), "" when none; the queue
/// is empty afterwards. Error strings carry no secrets.
inline std::string openssl_error() {
  char buf[256] = {0};
  if (unsigned long e = ERR_peek_error(); e != 0)
    ERR_error_string_n(e, buf, sizeof buf);
  ERR_clear_error();
  return buf;
}

} // namespace prov::net
