#pragma once
// Throwaway X.509 material for tests, made in memory with OpenSSL: EC P-256
// keys, a root CA, intermediates and device (TLS client) certificates.
// Header-only so unit and integration tests share it without CMake edits.

#include <cstdint>
#include <ctime>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

namespace prov::test {

struct test_cert {
  std::shared_ptr<EVP_PKEY> key;
  std::shared_ptr<X509> cert;

  std::string der() const {
    int n = i2d_X509(cert.get(), nullptr);
    std::string out(static_cast<std::size_t>(n), '\0');
    auto* p = reinterpret_cast<unsigned char*>(out.data());
    i2d_X509(cert.get(), &p);
    return out;
  }
  std::string pem() const {
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
    PEM_write_bio_X509(bio.get(), cert.get());
    char* data = nullptr;
    long n = BIO_get_mem_data(bio.get(), &data);
    return std::string(data, static_cast<std::size_t>(n));
  }
  std::string key_pem() const {
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
    PEM_write_bio_PrivateKey(bio.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr);
    char* data = nullptr;
    long n = BIO_get_mem_data(bio.get(), &data);
    return std::string(data, static_cast<std::size_t>(n));
  }
};

struct cert_options {
  std::string cn;
  bool ca = false;
  int64_t not_before_offset_s = -3600; ///< relative to now
  int64_t not_after_offset_s = 365 * 86400;
  long serial = 1;
};

inline std::shared_ptr<EVP_PKEY> new_ec_key() {
  EVP_PKEY* k = EVP_EC_gen("P-256");
  if (k == nullptr)
    throw std::runtime_error("EVP_EC_gen failed");
  return {k, EVP_PKEY_free};
}

inline void add_ext(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  if (ext == nullptr)
    throw std::runtime_error("bad extension");
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
}

/// A certificate for `o.cn`, signed by `issuer` (self-signed when null).
inline test_cert make_cert(const cert_options& o, const test_cert* issuer = nullptr) {
  test_cert out;
  out.key = new_ec_key();
  out.cert.reset(X509_new(), X509_free);
  X509* c = out.cert.get();
  X509_set_version(c, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(c), o.serial);
  X509_gmtime_adj(X509_getm_notBefore(c), static_cast<long>(o.not_before_offset_s));
  X509_gmtime_adj(X509_getm_notAfter(c), static_cast<long>(o.not_after_offset_s));
  X509_NAME* name = X509_get_subject_name(c);
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("provisiond tests"), -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(o.cn.c_str()), -1, -1, 0);
  X509* issuer_cert = issuer != nullptr ? issuer->cert.get() : c;
  X509_set_issuer_name(c, X509_get_subject_name(issuer_cert));
  X509_set_pubkey(c, out.key.get());
  if (o.ca) {
    add_ext(c, issuer_cert, NID_basic_constraints, "critical,CA:TRUE");
    add_ext(c, issuer_cert, NID_key_usage, "critical,keyCertSign,cRLSign");
  } else {
    add_ext(c, issuer_cert, NID_basic_constraints, "critical,CA:FALSE");
    add_ext(c, issuer_cert, NID_key_usage, "critical,digitalSignature");
    add_ext(c, issuer_cert, NID_ext_key_usage, "clientAuth");
  }
  add_ext(c, issuer_cert, NID_subject_key_identifier, "hash");
  if (issuer != nullptr)
    add_ext(c, issuer_cert, NID_authority_key_identifier, "keyid:always");
  EVP_PKEY* signer = issuer != nullptr ? issuer->key.get() : out.key.get();
  if (X509_sign(c, signer, EVP_sha256()) == 0)
    throw std::runtime_error("X509_sign failed");
  return out;
}

inline test_cert make_ca(const std::string& cn, const test_cert* issuer = nullptr,
                         long serial = 1) {
  cert_options o;
  o.cn = cn;
  o.ca = true;
  o.serial = serial;
  return make_cert(o, issuer);
}

inline test_cert make_device(const std::string& cn, const test_cert& issuer, long serial = 100,
                             int64_t not_before_offset_s = -3600,
                             int64_t not_after_offset_s = 365 * 86400) {
  cert_options o;
  o.cn = cn;
  o.serial = serial;
  o.not_before_offset_s = not_before_offset_s;
  o.not_after_offset_s = not_after_offset_s;
  return make_cert(o, &issuer);
}

/// A TLS server certificate for localhost (DNS:localhost, IP:127.0.0.1),
/// signed by `issuer`: test servers a client verifies against that CA.
inline test_cert make_localhost_server(const test_cert& issuer, long serial = 200) {
  test_cert out;
  out.key = new_ec_key();
  out.cert.reset(X509_new(), X509_free);
  X509* c = out.cert.get();
  X509_set_version(c, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(c), serial);
  X509_gmtime_adj(X509_getm_notBefore(c), -3600);
  X509_gmtime_adj(X509_getm_notAfter(c), 365 * 86400L);
  X509_NAME* name = X509_get_subject_name(c);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("localhost"), -1, -1, 0);
  X509_set_issuer_name(c, X509_get_subject_name(issuer.cert.get()));
  X509_set_pubkey(c, out.key.get());
  add_ext(c, issuer.cert.get(), NID_basic_constraints, "critical,CA:FALSE");
  add_ext(c, issuer.cert.get(), NID_key_usage, "critical,digitalSignature");
  add_ext(c, issuer.cert.get(), NID_ext_key_usage, "serverAuth");
  add_ext(c, issuer.cert.get(), NID_subject_alt_name, "DNS:localhost,IP:127.0.0.1");
  if (X509_sign(c, issuer.key.get(), EVP_sha256()) == 0)
    throw std::runtime_error("X509_sign failed");
  return out;
}

/// A self-signed device certificate (individual enrollments).
inline test_cert make_self_signed_device(const std::string& cn) {
  cert_options o;
  o.cn = cn;
  return make_cert(o, nullptr);
}

/// A CRL issued by `issuer` revoking `revoked` (their serials), valid for a day
/// (nextUpdate `next_update_s` from now).
/// `last_update_s`: lastUpdate relative to now (a later CRL of the same
/// issuer needs a later one to replace a stored CRL).
inline std::string make_crl_pem(const test_cert& issuer,
                                std::initializer_list<const test_cert*> revoked,
                                long last_update_s = -60, long next_update_s = 86400) {
  std::unique_ptr<X509_CRL, decltype(&X509_CRL_free)> crl(X509_CRL_new(), X509_CRL_free);
  X509_CRL_set_version(crl.get(), 1);
  X509_CRL_set_issuer_name(crl.get(), X509_get_subject_name(issuer.cert.get()));
  std::unique_ptr<ASN1_TIME, decltype(&ASN1_TIME_free)> t(ASN1_TIME_new(), ASN1_TIME_free);
  X509_gmtime_adj(t.get(), last_update_s);
  X509_CRL_set1_lastUpdate(crl.get(), t.get());
  X509_gmtime_adj(t.get(), next_update_s);
  X509_CRL_set1_nextUpdate(crl.get(), t.get());
  for (const auto* r : revoked) {
    X509_REVOKED* entry = X509_REVOKED_new();
    X509_REVOKED_set_serialNumber(entry, X509_get_serialNumber(r->cert.get()));
    X509_gmtime_adj(t.get(), -30);
    X509_REVOKED_set_revocationDate(entry, t.get());
    X509_CRL_add0_revoked(crl.get(), entry);
  }
  X509_CRL_sort(crl.get());
  if (X509_CRL_sign(crl.get(), issuer.key.get(), EVP_sha256()) == 0)
    throw std::runtime_error("X509_CRL_sign failed");
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
  PEM_write_bio_X509_CRL(bio.get(), crl.get());
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<std::size_t>(n));
}

/// A direct publisher's proof of possession (docs/events.md): the raw
/// signature by `c`'s key (SHA-256) of "<scope>/registrations/<id>\n<expiry>".
inline std::string sign_possession(const test_cert& c, const std::string& scope,
                                   const std::string& id, int64_t expiry) {
  const std::string text = scope + "/registrations/" + id + "\n" + std::to_string(expiry);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  size_t n = 0;
  if (EVP_DigestSignInit(ctx.get(), nullptr, EVP_sha256(), nullptr, c.key.get()) != 1
      || EVP_DigestSign(ctx.get(), nullptr, &n,
                        reinterpret_cast<const unsigned char*>(text.data()), text.size()) != 1)
    throw std::runtime_error("EVP_DigestSign failed");
  std::string sig(n, '\0');
  if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &n,
                     reinterpret_cast<const unsigned char*>(text.data()), text.size()) != 1)
    throw std::runtime_error("EVP_DigestSign failed");
  sig.resize(n);
  return sig;
}

} // namespace prov::test
