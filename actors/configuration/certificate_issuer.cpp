#include "actors/configuration/certificate_issuer.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <nlohmann/json.hpp>

#include "messages/ascii.hpp"
#include "messages/crypto.hpp"

namespace prov::configuration {

namespace {

template <class T, void (*F)(T*)>
struct free_with {
  void operator()(T* p) const noexcept { F(p); }
};
using x509_ptr = std::unique_ptr<X509, free_with<X509, X509_free>>;
using req_ptr = std::unique_ptr<X509_REQ, free_with<X509_REQ, X509_REQ_free>>;
using pkey_ptr = std::unique_ptr<EVP_PKEY, free_with<EVP_PKEY, EVP_PKEY_free>>;
using bio_ptr = std::unique_ptr<BIO, free_with<BIO, BIO_free_all>>;
using name_ptr = std::unique_ptr<X509_NAME, free_with<X509_NAME, X509_NAME_free>>;
using bn_ptr = std::unique_ptr<BIGNUM, free_with<BIGNUM, BN_free>>;
using ext_ptr = std::unique_ptr<X509_EXTENSION, free_with<X509_EXTENSION, X509_EXTENSION_free>>;

/// The most recent OpenSSL error as text, for messages; clears the queue.
std::string ssl_reason() {
  unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0)
    return "unknown error";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

error bad_csr(std::string what) {
  return {error_code::invalid_csr, "csr: " + std::move(what)};
}

/// "P-256", "P-384", "RSA-2048"...; "" when not a key issuance accepts.
std::string key_type_of(EVP_PKEY* key, std::string& described) {
  const int id = EVP_PKEY_get_base_id(key);
  const int bits = EVP_PKEY_get_bits(key);
  if (id == EVP_PKEY_EC) {
    char group[64] = {0};
    size_t len = 0;
    if (EVP_PKEY_get_utf8_string_param(key, "group", group, sizeof group, &len) != 1)
      group[0] = '\0';
    described = std::string("EC ") + (group[0] ? group : "(unknown curve)");
    if (std::strcmp(group, "prime256v1") == 0 || std::strcmp(group, "P-256") == 0)
      return "P-256";
    if (std::strcmp(group, "secp384r1") == 0 || std::strcmp(group, "P-384") == 0)
      return "P-384";
    return "";
  }
  if (id == EVP_PKEY_RSA) {
    described = "RSA " + std::to_string(bits) + " bits";
    if (bits >= 2048 && bits <= 8192)
      return "RSA-" + std::to_string(bits);
    return "";
  }
  const char* name = OBJ_nid2sn(id);
  described = name ? name : "unknown key type";
  return "";
}

/// The subject's CN entries: exactly one expected.
error subject_cn(X509_NAME* subject, std::string& cn) {
  int idx = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
  if (idx < 0)
    return bad_csr("the subject has no CN (it must be the registration id)");
  if (X509_NAME_get_index_by_NID(subject, NID_commonName, idx) >= 0)
    return bad_csr("the subject has more than one CN");
  ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, idx));
  unsigned char* utf8 = nullptr;
  int n = ASN1_STRING_to_UTF8(&utf8, data);
  if (n < 0)
    return bad_csr("the subject CN is not a valid string");
  cn.assign(reinterpret_cast<char*>(utf8), static_cast<std::size_t>(n));
  OPENSSL_free(utf8);
  return {};
}

std::string printable(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 128))
    out.push_back(static_cast<unsigned char>(c) >= 0x20 && c != 0x7f ? c : '?');
  if (s.size() > 128)
    out += "...";
  return out;
}

error decode_csr(std::string_view csr_b64, std::string_view registration_id, req_ptr& req,
                 pkey_ptr& key, csr_summary& out) {
  if (auto e = check_issuable_id(registration_id))
    return e;
  if (csr_b64.empty())
    return bad_csr("empty");
  if (csr_b64.find("-----BEGIN") != std::string_view::npos)
    return bad_csr("PEM armour is not accepted: send the base64 of the DER only");
  auto der = crypto::base64_decode(csr_b64);
  if (!der || der->empty())
    return bad_csr("not base64 (expected the base64 of a DER PKCS#10 certificate signing "
                   "request)");
  const auto* p = reinterpret_cast<const unsigned char*>(der->data());
  req.reset(d2i_X509_REQ(nullptr, &p, static_cast<long>(der->size())));
  ERR_clear_error();
  if (!req)
    return bad_csr("not a DER PKCS#10 certificate signing request");
  if (p != reinterpret_cast<const unsigned char*>(der->data()) + der->size())
    return bad_csr("trailing bytes after the certificate signing request");
  key.reset(X509_REQ_get_pubkey(req.get()));
  ERR_clear_error();
  if (!key)
    return bad_csr("its public key cannot be read");
  std::string described;
  out.key_type = key_type_of(key.get(), described);
  if (out.key_type.empty())
    return bad_csr("unsupported key " + described +
                   " (ECDSA P-256 or P-384, or RSA of 2048..8192 bits)");
  if (out.key_type.rfind("RSA", 0) == 0) {
    // A huge exponent makes verifying the request (and every later use of
    // the certificate) arbitrarily slow: a cheap denial of service.
    BIGNUM* e = nullptr;
    const bool got = EVP_PKEY_get_bn_param(key.get(), "e", &e) == 1 && e != nullptr;
    bn_ptr exp(e);
    ERR_clear_error();
    if (!got || !BN_is_word(exp.get(), 65537))
      return bad_csr("unsupported RSA public exponent " +
                     (got && BN_num_bits(exp.get()) <= 32
                        ? std::to_string(BN_get_word(exp.get()))
                        : std::string("(") + std::to_string(got ? BN_num_bits(exp.get()) : 0) +
                            " bits)") +
                     " (only 65537 is accepted)");
  }
  // Proof that the device holds the private key of the certificate to be.
  if (X509_REQ_verify(req.get(), key.get()) != 1) {
    ERR_clear_error();
    return bad_csr("its signature does not verify with its public key");
  }
  std::string cn;
  if (auto e = subject_cn(X509_REQ_get_subject_name(req.get()), cn))
    return e;
  if (cn != registration_id)
    return bad_csr("subject CN '" + printable(cn) + "' is not the registration id '" +
                   printable(registration_id) + "'");
  out.der = std::move(*der);
  return {};
}

std::string read_file(const std::string& path, std::string& why) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    why = std::strerror(errno);
    return {};
  }
  std::string data;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0)
    data.append(buf, n);
  std::fclose(f);
  return data;
}

std::string der_of(X509* cert) {
  unsigned char* buf = nullptr;
  int n = i2d_X509(cert, &buf);
  if (n <= 0)
    return {};
  std::string out(reinterpret_cast<char*>(buf), static_cast<std::size_t>(n));
  OPENSSL_free(buf);
  return out;
}

/// The CN values in an RFC 2253 subject text (registration_state's
/// certificateInfo.subjectName), escapes kept as written: a CN that matches
/// a registration id (A-Z a-z 0-9 - . _ :) is never escaped.
std::vector<std::string> cns_of_rfc2253(std::string_view dn) {
  std::vector<std::string> out;
  std::string rdn;
  auto flush = [&] {
    if (rdn.rfind("CN=", 0) == 0)
      out.push_back(rdn.substr(3));
    rdn.clear();
  };
  for (std::size_t i = 0; i < dn.size(); ++i) {
    if (dn[i] == '\\' && i + 1 < dn.size()) {
      rdn.push_back(dn[i]);
      rdn.push_back(dn[++i]);
    } else if (dn[i] == ',' || dn[i] == '+') {
      flush();
    } else {
      rdn.push_back(dn[i]);
    }
  }
  flush();
  return out;
}

/// The identity checks issuance adds to the CSR's: the certificate names the
/// registration id exactly, so it must be the device's identity exactly.
error check_identity(const registration_event& ev) {
  // IoT Hub authenticates an X.509 device by CN == device id (case-
  // sensitive): a certificate for the registration id is useless, and
  // misleading, for a device the enrollment assigns under another id.
  if (!ev.device_id.empty() && ev.device_id != ev.registration_id)
    return {error_code::invalid_enrollment,
            "certificate issuance: the enrollment assigns device id '" + printable(ev.device_id) +
              "', not the registration id '" + printable(ev.registration_id) +
              "'; an issued certificate's CN is the registration id (remove the enrollment's "
              "deviceId, or register without a csr)"};
  // X.509 attestation matches the certificate's CN to the registration id
  // ignoring case (as DPS); the certificate issued to replace it must not
  // silently name another spelling.
  if (!ev.x509_json.empty()) {
    auto j = nlohmann::json::parse(ev.x509_json, nullptr, false);
    const nlohmann::json* subject = nullptr;
    if (j.is_object())
      if (auto ci = j.find("certificateInfo"); ci != j.end() && ci->is_object())
        if (auto sn = ci->find("subjectName"); sn != ci->end() && sn->is_string())
          subject = &*sn;
    if (subject != nullptr) {
      auto cns = cns_of_rfc2253(subject->get_ref<const std::string&>());
      if (std::find(cns.begin(), cns.end(), std::string(ev.registration_id)) == cns.end())
        return bad_csr("the registration id '" + printable(ev.registration_id) +
                       "' is not spelled exactly as the client certificate's subject (" +
                       printable(subject->get_ref<const std::string&>()) +
                       "): register with the id exactly as in the certificate's CN");
    }
  }
  return {};
}

} // namespace

error check_issuable_id(std::string_view registration_id) {
  if (registration_id.size() <= max_issued_cn_chars)
    return {};
  return bad_csr("the registration id is " + std::to_string(registration_id.size()) +
                 " characters; an issued certificate's subject CN (the registration id) is "
                 "limited to " + std::to_string(max_issued_cn_chars) +
                 " characters (RFC 5280 ub-common-name)");
}

struct certificate_issuer::authority {
  std::string name;
  int64_t validity_s = 0;
  pkey_ptr key;
  x509_ptr cert;                  ///< the issuing CA
  std::vector<std::string> chain; ///< base64 DER: the issuing CA, intermediates, root
  const EVP_MD* digest = nullptr;
};

certificate_issuer::~certificate_issuer() = default;

error check_csr(std::string_view csr_b64, std::string_view registration_id, csr_summary& out) {
  req_ptr req;
  pkey_ptr key;
  return decode_csr(csr_b64, registration_id, req, key, out);
}

std::string join_chain(const std::vector<std::string>& chain) {
  std::string out;
  for (const auto& c : chain) {
    if (!out.empty())
      out.push_back('\n');
    out += c;
  }
  return out;
}

error certificate_issuer::load(const std::vector<config::issuing_ca_config>& cas,
                               std::shared_ptr<const certificate_issuer>& out, log_fn log) {
  std::shared_ptr<certificate_issuer> issuer(new certificate_issuer());
  issuer->log_ = std::move(log);
  for (std::size_t i = 0; i < cas.size(); ++i) {
    const config::issuing_ca_config& c = cas[i];
    const std::string where = "issuing_cas[" + std::to_string(i) + "] (" + c.name + ")";
    auto fail = [&](const std::string& key, const std::string& what) -> error {
      return {error_code::bad_request, where + "." + key + ": " + what};
    };
    auto a = std::make_unique<authority>();
    a->name = c.name;
    a->validity_s = static_cast<int64_t>(c.validity_hours) * 3600;
    // Checked again here: config validation may have run long before.
    struct stat sb {};
    if (::stat(c.key_file.c_str(), &sb) != 0)
      return fail("key_file", "cannot read '" + c.key_file + "': " + std::strerror(errno));
    if ((sb.st_mode & 077) != 0)
      return fail("key_file", "'" + c.key_file +
                                "' is accessible by group or others; chmod 600 it");
    std::string why;
    std::string pem = read_file(c.key_file, why);
    if (pem.empty())
      return fail("key_file", "cannot read '" + c.key_file + "': " +
                                (why.empty() ? "empty file" : why));
    bio_ptr kb(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
    // Without a callback OpenSSL would prompt for a passphrase on the TTY
    // (and block a service start): refuse encrypted keys instead.
    bool encrypted = false;
    auto no_password = [](char*, int, int, void* u) -> int {
      *static_cast<bool*>(u) = true;
      return -1;
    };
    a->key.reset(PEM_read_bio_PrivateKey(kb.get(), nullptr, no_password, &encrypted));
    OPENSSL_cleanse(pem.data(), pem.size());
    if (!a->key && encrypted) {
      ERR_clear_error();
      return fail("key_file", "'" + c.key_file + "' is encrypted: encrypted keys are not "
                                "supported (store it unencrypted, chmod 600)");
    }
    if (!a->key)
      return fail("key_file", "'" + c.key_file + "' holds no PEM private key (" +
                                ssl_reason() + ")");
    std::string certs = read_file(c.certificate_file, why);
    if (certs.empty())
      return fail("certificate_file", "cannot read '" + c.certificate_file + "': " +
                                        (why.empty() ? "empty file" : why));
    bio_ptr cb(BIO_new_mem_buf(certs.data(), static_cast<int>(certs.size())));
    while (true) {
      x509_ptr cert(PEM_read_bio_X509(cb.get(), nullptr, nullptr, nullptr));
      if (!cert)
        break;
      a->chain.push_back(crypto::base64_encode(der_of(cert.get())));
      if (!a->cert)
        a->cert = std::move(cert);
    }
    ERR_clear_error();
    if (!a->cert)
      return fail("certificate_file",
                  "'" + c.certificate_file + "' holds no PEM certificate");
    if (X509_check_private_key(a->cert.get(), a->key.get()) != 1) {
      ERR_clear_error();
      return fail("key_file", "the key is not the one of the first certificate in '" +
                                c.certificate_file + "'");
    }
    if (X509_check_ca(a->cert.get()) == 0)
      return fail("certificate_file", "the first certificate in '" + c.certificate_file +
                                        "' is not a CA (basicConstraints CA:TRUE with "
                                        "keyCertSign)");
    // Issued certificates name it by keyid (authorityKeyIdentifier), which
    // chain building relies on when CA names repeat across rolls.
    if (X509_get0_subject_key_id(a->cert.get()) == nullptr)
      return fail("certificate_file", "the first certificate in '" + c.certificate_file +
                                        "' has no subjectKeyIdentifier extension (issued "
                                        "certificates' authorityKeyIdentifier needs it)");
    std::string described;
    auto type = key_type_of(a->key.get(), described);
    if (type.empty())
      return fail("key_file", "unsupported key " + described +
                                " (ECDSA P-256 or P-384, or RSA of 2048..8192 bits)");
    a->digest = type == "P-384" ? EVP_sha384() : EVP_sha256();
    issuer->cas_.push_back(std::move(a));
  }
  out = std::move(issuer);
  return {};
}

bool certificate_issuer::has(std::string_view ca_name) const {
  return std::any_of(cas_.begin(), cas_.end(),
                     [&](const auto& a) { return ascii::iequals(a->name, ca_name); });
}

std::vector<std::string> certificate_issuer::names() const {
  std::vector<std::string> out;
  for (const auto& a : cas_)
    out.push_back(a->name);
  return out;
}

void certificate_issuer::log_issued(std::string_view line) const {
  if (log_)
    log_(line);
}

error certificate_issuer::issue(std::string_view ca_name, std::string_view registration_id,
                                std::string_view csr_b64, int64_t now_ms,
                                std::vector<std::string>& chain, issued_facts* issued) const {
  const authority* ca = nullptr;
  for (const auto& a : cas_)
    if (ascii::iequals(a->name, ca_name))
      ca = a.get();
  if (ca == nullptr)
    return {error_code::issuing_ca_unavailable,
            "the enrollment's issuing CA '" + printable(ca_name) +
              "' is not configured on this instance ([[issuing_cas]])"};
  req_ptr req;
  pkey_ptr key;
  csr_summary summary;
  if (auto e = decode_csr(csr_b64, registration_id, req, key, summary))
    return e;
  auto internal = [](const char* what) -> error {
    return {error_code::internal, std::string("certificate issuance: ") + what + ": " +
                                    ssl_reason()};
  };
  x509_ptr cert(X509_new());
  if (!cert || X509_set_version(cert.get(), 2) != 1)
    return internal("X509_new");
  // 16 random bytes (RFC 5280: at most 20 octets, positive): unique without
  // a counter shared between workers. Top bit cleared, never zero.
  unsigned char serial[16];
  if (RAND_bytes(serial, sizeof serial) != 1)
    return internal("RAND_bytes");
  serial[0] = static_cast<unsigned char>((serial[0] & 0x7f) | 0x01);
  bn_ptr bn(BN_bin2bn(serial, sizeof serial, nullptr));
  if (!bn || !BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert.get())))
    return internal("serial");
  // The subject is the registration id alone: nothing else the device put
  // in its request is vouched for.
  name_ptr subject(X509_NAME_new());
  if (!subject
      || X509_NAME_add_entry_by_NID(subject.get(), NID_commonName, MBSTRING_UTF8,
                                    reinterpret_cast<const unsigned char*>(registration_id.data()),
                                    static_cast<int>(registration_id.size()), -1, 0) != 1
      || X509_set_subject_name(cert.get(), subject.get()) != 1
      || X509_set_issuer_name(cert.get(), X509_get_subject_name(ca->cert.get())) != 1
      || X509_set_pubkey(cert.get(), key.get()) != 1)
    return internal("subject");
  const time_t now = static_cast<time_t>(now_ms / 1000);
  time_t not_after = now + static_cast<time_t>(ca->validity_s);
  // Never past the issuing CA: a chain check would refuse the rest anyway.
  if (const ASN1_TIME* ca_end = X509_get0_notAfter(ca->cert.get())) {
    struct tm tm {};
    if (ASN1_TIME_to_tm(ca_end, &tm) == 1) {
      time_t end = timegm(&tm);
      if (end <= now)
        return {error_code::issuing_ca_unavailable,
                "the issuing CA '" + ca->name + "' has expired"};
      not_after = std::min(not_after, end);
    }
  }
  if (!ASN1_TIME_set(X509_getm_notBefore(cert.get()), now - 300)
      || !ASN1_TIME_set(X509_getm_notAfter(cert.get()), not_after))
    return internal("validity");
  X509V3_CTX v3;
  X509V3_set_ctx(&v3, ca->cert.get(), cert.get(), nullptr, nullptr, 0);
  const bool rsa = summary.key_type.rfind("RSA", 0) == 0;
  const std::pair<int, const char*> exts[] = {
    {NID_basic_constraints, "critical,CA:FALSE"},
    {NID_key_usage, rsa ? "critical,digitalSignature,keyEncipherment" : "critical,digitalSignature"},
    {NID_ext_key_usage, "clientAuth"},
    {NID_subject_key_identifier, "hash"},
    {NID_authority_key_identifier, "keyid:always"}, // load() made sure it has one
  };
  for (const auto& [nid, value] : exts) {
    ext_ptr ext(X509V3_EXT_conf_nid(nullptr, &v3, nid, value));
    if (!ext || X509_add_ext(cert.get(), ext.get(), -1) != 1)
      return internal("extensions");
  }
  if (X509_sign(cert.get(), ca->key.get(), ca->digest) <= 0)
    return internal("X509_sign");
  if (issued != nullptr) {
    static const char hex[] = "0123456789ABCDEF";
    issued->ca_name = ca->name;
    issued->serial.clear();
    for (unsigned char b : serial) {
      issued->serial.push_back(hex[b >> 4]);
      issued->serial.push_back(hex[b & 15]);
    }
    struct tm tm {};
    char when[32] = {0};
    const time_t end = not_after;
    if (gmtime_r(&end, &tm) != nullptr)
      std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
    issued->not_after = when;
  }
  std::vector<std::string> out;
  out.reserve(1 + ca->chain.size());
  out.push_back(crypto::base64_encode(der_of(cert.get())));
  out.insert(out.end(), ca->chain.begin(), ca->chain.end());
  chain = std::move(out);
  return {};
}

error issue_for(const certificate_issuer* issuer, registration_event& ev, int64_t now_ms) {
  if (ev.csr.empty())
    // Nothing asked, or already issued for this event: a retry (a failed
    // store commit, a failed device.assigned publish) comes back with the
    // chain and without the csr, and must keep the certificate it announced.
    return {};
  ev.issued_chain.clear();
  if (ev.issuing_ca.empty())
    return {error_code::no_issuance_policy,
            "the device sent a csr, but its " +
              std::string(ev.enrollment_group_id.empty() ? "enrollment" : "enrollment group") +
              " has no certificate issuance policy (certificatePolicyResourceId or "
              "clientCertificateIssuancePolicy)"};
  if (auto e = check_identity(ev))
    return e;
  if (issuer == nullptr)
    return {error_code::issuing_ca_unavailable,
            "certificate issuance is not available on this instance ([[issuing_cas]])"};
  std::vector<std::string> chain;
  certificate_issuer::issued_facts facts;
  if (auto e = issuer->issue(ev.issuing_ca, ev.registration_id, ev.csr, now_ms, chain, &facts))
    return e;
  ev.issued_chain = join_chain(chain);
  // For audit and revocation: what was issued to whom, by which CA.
  issuer->log_issued("certificate issued: registrationId=" + printable(ev.registration_id) +
                     " operationId=" + printable(ev.operation_id) + " ca=" + facts.ca_name +
                     " serial=" + facts.serial + " notAfter=" + facts.not_after);
  ev.csr.clear(); // served its purpose; not kept on records
  return {};
}

void mark_failed(registration_event& ev, const error& err, int64_t completed_ms) {
  ev.status = registration_status::failed;
  ev.error_code = static_cast<int32_t>(err.code);
  ev.error_message = err.message;
  ev.completed_ms = completed_ms;
  ev.issued_chain.clear();
  ev.prior.reset();
}

} // namespace prov::configuration
