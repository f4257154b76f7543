#pragma once
// PKCS#10 requests and keys of several types, made in memory with OpenSSL,
// for the certificate issuance tests (tests/actors/certificate_issuer_test,
// tests/integration/csr_test). Header-only, like test_certs.hpp.

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "messages/crypto.hpp"
#include "tests/support/test_certs.hpp"

namespace prov::test {

/// "P-256", "P-384", "P-521" or "RSA-<bits>".
inline std::shared_ptr<EVP_PKEY> new_key(const std::string& type) {
  EVP_PKEY* k = type.rfind("RSA-", 0) == 0
                  ? EVP_RSA_gen(static_cast<unsigned>(std::stoul(type.substr(4))))
                  : EVP_EC_gen(type.c_str());
  if (k == nullptr)
    throw std::runtime_error("key generation failed: " + type);
  return {k, EVP_PKEY_free};
}

/// An RSA key of `bits` with public exponent `exponent`.
inline std::shared_ptr<EVP_PKEY> new_rsa_key(unsigned bits, unsigned long exponent) {
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(
    EVP_PKEY_CTX_new_from_name(nullptr, "RSA", nullptr), EVP_PKEY_CTX_free);
  std::unique_ptr<BIGNUM, decltype(&BN_free)> e(BN_new(), BN_free);
  EVP_PKEY* k = nullptr;
  if (!ctx || !e || BN_set_word(e.get(), exponent) != 1 || EVP_PKEY_keygen_init(ctx.get()) <= 0
      || EVP_PKEY_CTX_set_rsa_keygen_bits(ctx.get(), static_cast<int>(bits)) <= 0
      || EVP_PKEY_CTX_set1_rsa_keygen_pubexp(ctx.get(), e.get()) <= 0
      || EVP_PKEY_keygen(ctx.get(), &k) <= 0)
    throw std::runtime_error("RSA key generation failed");
  return {k, EVP_PKEY_free};
}

/// The DER of a CSR for subject CN=`cn` (plus O=...), signed by `key`.
inline std::string make_csr_der(EVP_PKEY* key, const std::string& cn) {
  std::unique_ptr<X509_REQ, decltype(&X509_REQ_free)> req(X509_REQ_new(), X509_REQ_free);
  X509_REQ_set_version(req.get(), 0);
  X509_NAME* name = X509_REQ_get_subject_name(req.get());
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("provisiond tests"), -1, -1, 0);
  if (!cn.empty())
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                               reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_REQ_set_pubkey(req.get(), key);
  if (X509_REQ_sign(req.get(), key, EVP_sha256()) <= 0)
    throw std::runtime_error("X509_REQ_sign failed");
  int n = i2d_X509_REQ(req.get(), nullptr);
  std::string out(static_cast<std::size_t>(n), '\0');
  auto* p = reinterpret_cast<unsigned char*>(out.data());
  i2d_X509_REQ(req.get(), &p);
  return out;
}

inline std::string make_csr(EVP_PKEY* key, const std::string& cn) {
  return crypto::base64_encode(make_csr_der(key, cn));
}

inline std::shared_ptr<X509> parse_der_cert(const std::string& der) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  X509* c = d2i_X509(nullptr, &p, static_cast<long>(der.size()));
  if (c == nullptr)
    throw std::runtime_error("not a DER certificate");
  return {c, X509_free};
}

/// X509_verify_cert of `chain_b64` (leaf first, as issuedCertificateChain)
/// against `root` only as the trust anchor (a root, or the issuing CA
/// itself), for TLS client use. "" when it
/// verifies; else OpenSSL's reason.
inline std::string verify_issued_chain(const std::vector<std::string>& chain_b64,
                                       const test_cert& root) {
  if (chain_b64.empty())
    return "empty chain";
  std::vector<std::shared_ptr<X509>> certs;
  for (const auto& b64 : chain_b64) {
    auto der = crypto::base64_decode(b64);
    if (!der)
      return "not base64";
    certs.push_back(parse_der_cert(*der));
  }
  std::unique_ptr<X509_STORE, decltype(&X509_STORE_free)> store(X509_STORE_new(),
                                                                 X509_STORE_free);
  X509_STORE_add_cert(store.get(), root.cert.get());
  auto free_stack = [](STACK_OF(X509)* st) { sk_X509_free(st); }; // a macro: no &
  std::unique_ptr<STACK_OF(X509), decltype(free_stack)> untrusted(sk_X509_new_null(),
                                                                  free_stack);
  for (std::size_t i = 1; i < certs.size(); ++i)
    sk_X509_push(untrusted.get(), certs[i].get());
  std::unique_ptr<X509_STORE_CTX, decltype(&X509_STORE_CTX_free)> ctx(X509_STORE_CTX_new(),
                                                                       X509_STORE_CTX_free);
  X509_STORE_CTX_init(ctx.get(), store.get(), certs[0].get(), untrusted.get());
  X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_CLIENT);
  // `root` may be the issuing CA itself (an intermediate): trusted as given.
  X509_STORE_CTX_set_flags(ctx.get(), X509_V_FLAG_PARTIAL_CHAIN);
  if (X509_verify_cert(ctx.get()) == 1)
    return {};
  return X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get()));
}

/// A CA certificate for `cn` with the key `key` (any type), signed by
/// `issuer` (self-signed when null); without subjectKeyIdentifier when `ski`
/// is false.
inline test_cert make_ca_with_key(const std::string& cn, std::shared_ptr<EVP_PKEY> key,
                                  const test_cert* issuer = nullptr, long serial = 1,
                                  bool ski = true) {
  test_cert out;
  out.key = std::move(key);
  out.cert.reset(X509_new(), X509_free);
  X509* c = out.cert.get();
  X509_set_version(c, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(c), serial);
  X509_gmtime_adj(X509_getm_notBefore(c), -3600);
  X509_gmtime_adj(X509_getm_notAfter(c), 365 * 86400L);
  X509_NAME_add_entry_by_txt(X509_get_subject_name(c), "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509* issuer_cert = issuer != nullptr ? issuer->cert.get() : c;
  X509_set_issuer_name(c, X509_get_subject_name(issuer_cert));
  X509_set_pubkey(c, out.key.get());
  add_ext(c, issuer_cert, NID_basic_constraints, "critical,CA:TRUE");
  add_ext(c, issuer_cert, NID_key_usage, "critical,keyCertSign,cRLSign");
  if (ski)
    add_ext(c, issuer_cert, NID_subject_key_identifier, "hash");
  EVP_PKEY* signer = issuer != nullptr ? issuer->key.get() : out.key.get();
  if (X509_sign(c, signer, EVP_sha256()) == 0)
    throw std::runtime_error("X509_sign failed");
  return out;
}

} // namespace prov::test
