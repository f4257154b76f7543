#include "net/tls_material.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <memory>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "net/openssl_handles.hpp"
#include "messages/ascii.hpp"

namespace prov::net {

namespace {

namespace fs = std::filesystem;

using x509_ptr = std::unique_ptr<X509, ossl_free<X509, X509_free>>;
using pkey_ptr = std::unique_ptr<EVP_PKEY, ossl_free<EVP_PKEY, EVP_PKEY_free>>;
using bio_ptr = std::unique_ptr<BIO, ossl_free<BIO, BIO_free_all>>;
using bn_ptr = std::unique_ptr<BIGNUM, ossl_free<BIGNUM, BN_free>>;
using name_ptr = std::unique_ptr<X509_NAME, ossl_free<X509_NAME, X509_NAME_free>>;
using ext_ptr = std::unique_ptr<X509_EXTENSION, ossl_free<X509_EXTENSION, X509_EXTENSION_free>>;
using gens_ptr = std::unique_ptr<GENERAL_NAMES, ossl_free<GENERAL_NAMES, GENERAL_NAMES_free>>;

constexpr long ca_days = 3650;
constexpr long server_days = 730; // under the 825-day cap Apple clients enforce
constexpr long renew_before_seconds = 30L * 24 * 3600;
constexpr std::size_t max_pem_size = 1 << 20;
constexpr const char* ca_common_name = "provisiond local CA";

/// The latest OpenSSL reason, queue cleared. Reason strings carry no secrets.
std::string ssl_reason() {
  unsigned long code = ERR_peek_last_error();
  ERR_clear_error();
  if (code == 0) return "unknown OpenSSL error";
  char buf[256];
  ERR_error_string_n(code, buf, sizeof buf);
  return buf;
}

error fail(std::string msg) { return error{error_code::internal, std::move(msg)}; }
error fail_ssl(const std::string& what) { return fail(what + ": " + ssl_reason()); }

/// Never prompt on a terminal for an encrypted key: treat it as unreadable.
int no_password(char*, int, int, void*) { return 0; }

/// A requested subjectAltName: an IP (raw 4 or 16 bytes) or a DNS name.
struct san_entry {
  bool ip = false;
  std::string value;
};

bool parse_ip(std::string_view text, std::string& bytes) {
  std::string s(text);
  if (s.size() >= 2 && s.front() == '[' && s.back() == ']') s = s.substr(1, s.size() - 2);
  unsigned char buf[16];
  if (inet_pton(AF_INET, s.c_str(), buf) == 1) {
    bytes.assign(reinterpret_cast<char*>(buf), 4);
    return true;
  }
  if (inet_pton(AF_INET6, s.c_str(), buf) == 1) {
    bytes.assign(reinterpret_cast<char*>(buf), 16);
    return true;
  }
  return false;
}

bool valid_dns_name(std::string_view s) {
  if (s.empty() || s.size() > 253) return false;
  for (char c : s) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' ||
                    c == '*';
    if (!ok) return false;
  }
  return true;
}

using ascii::iequals;

error parse_sans(const std::vector<std::string>& in, std::vector<san_entry>& out) {
  static const std::vector<std::string> defaults{"localhost", "127.0.0.1", "::1"};
  const auto& list = in.empty() ? defaults : in;
  for (const std::string& s : list) {
    san_entry e;
    if (parse_ip(s, e.value)) {
      e.ip = true;
    } else if (valid_dns_name(s)) {
      e.value = s;
    } else {
      return error{error_code::bad_request,
                   "TLS subjectAltName '" + s + "' is neither an IP address nor a DNS name"};
    }
    out.push_back(std::move(e));
  }
  return {};
}

error read_file(const std::string& path, std::string& out) {
  out.clear();
  std::ifstream f(path, std::ios::binary);
  if (!f) return fail("cannot open " + path + ": " + std::strerror(errno));
  char buf[8192];
  while (f) {
    f.read(buf, sizeof buf);
    out.append(buf, static_cast<std::size_t>(f.gcount()));
    if (out.size() > max_pem_size) {
      OPENSSL_cleanse(out.data(), out.size());
      out.clear();
      return fail(path + " is larger than 1 MiB");
    }
  }
  if (f.bad()) return fail("cannot read " + path);
  return {};
}

/// Writes via a temporary file + rename. A private `mode` (no group or
/// other bits: keys) is set exactly, whatever the umask; a public one
/// (certificates) is left to the umask, so provisiond's 077 keeps
/// everything in its data dir private.
error write_file_atomic(const std::string& path, const std::string& data, mode_t mode) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  ::unlink(tmp.c_str());
  const bool is_public = (mode & 077) != 0;
  const int fd =
    ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, is_public ? mode : 0600);
  if (fd < 0) return fail("cannot create " + tmp + ": " + std::strerror(errno));
  bool ok = is_public || ::fchmod(fd, mode) == 0;
  std::size_t done = 0;
  while (ok && done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) ok = false;
    else done += static_cast<std::size_t>(n);
  }
  ok = ok && ::fsync(fd) == 0;
  const int saved = errno;
  ok = (::close(fd) == 0) && ok;
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = ok ? errno : saved;
    ::unlink(tmp.c_str());
    return fail("cannot write " + path + ": " + std::strerror(err));
  }
  return {};
}

x509_ptr parse_cert(const std::string& pem) {
  bio_ptr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return nullptr;
  return x509_ptr(PEM_read_bio_X509(bio.get(), nullptr, no_password, nullptr));
}

pkey_ptr parse_key(const std::string& pem) {
  bio_ptr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return nullptr;
  return pkey_ptr(PEM_read_bio_PrivateKey(bio.get(), nullptr, no_password, nullptr));
}

error load_cert(const std::string& path, x509_ptr& out) {
  std::string pem;
  if (auto e = read_file(path, pem)) return e;
  out = parse_cert(pem);
  if (!out) return fail_ssl(path + " holds no readable certificate");
  return {};
}

error load_key(const std::string& path, pkey_ptr& out) {
  std::string pem;
  if (auto e = read_file(path, pem)) return e;
  out = parse_key(pem);
  OPENSSL_cleanse(pem.data(), pem.size());
  if (!out) return fail_ssl(path + " holds no readable (unencrypted) private key");
  return {};
}

bool to_pem(X509* cert, std::string& out) {
  bio_ptr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1) return false;
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  out.append(data, static_cast<std::size_t>(n));
  return true;
}

bool to_pem(EVP_PKEY* key, std::string& out) {
  bio_ptr bio(BIO_new(BIO_s_mem()));
  if (!bio ||
      PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1)
    return false;
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  out.append(data, static_cast<std::size_t>(n));
  OPENSSL_cleanse(data, static_cast<std::size_t>(n)); // key bytes in the BIO
  return true;
}

pkey_ptr generate_p256() {
  return pkey_ptr(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
}

bool add_ext(X509* cert, X509V3_CTX* ctx, int nid, const char* value) {
  ext_ptr ext(X509V3_EXT_nconf_nid(nullptr, ctx, nid, value));
  return ext && X509_add_ext(cert, ext.get(), -1) == 1;
}

bool add_sans(X509* cert, const std::vector<san_entry>& sans) {
  gens_ptr names(GENERAL_NAMES_new());
  if (!names) return false;
  for (const san_entry& s : sans) {
    GENERAL_NAME* gn = GENERAL_NAME_new();
    ASN1_STRING* str = s.ip ? ASN1_OCTET_STRING_new() : ASN1_IA5STRING_new();
    if (gn == nullptr || str == nullptr ||
        ASN1_STRING_set(str, s.value.data(), static_cast<int>(s.value.size())) != 1) {
      GENERAL_NAME_free(gn);
      ASN1_STRING_free(str);
      return false;
    }
    GENERAL_NAME_set0_value(gn, s.ip ? GEN_IPADD : GEN_DNS, str);
    if (sk_GENERAL_NAME_push(names.get(), gn) == 0) {
      GENERAL_NAME_free(gn);
      return false;
    }
  }
  return X509_add1_ext_i2d(cert, NID_subject_alt_name, names.get(), 0,
                           X509V3_ADD_DEFAULT) == 1;
}

/// Random positive 127-bit serial (RFC 5280: positive, at most 20 octets).
bool set_random_serial(X509* cert) {
  unsigned char buf[16];
  if (RAND_bytes(buf, sizeof buf) != 1) return false;
  buf[0] &= 0x7F;
  buf[0] |= 0x01; // never zero
  bn_ptr bn(BN_bin2bn(buf, sizeof buf, nullptr));
  return bn && BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert)) != nullptr;
}

/// A v3 certificate for `subject_key`, signed by `issuer_key`; `issuer` null
/// means self-signed.
error make_cert(const std::string& common_name, EVP_PKEY* subject_key,
                X509* issuer, EVP_PKEY* issuer_key, long days,
                const std::vector<san_entry>* sans, x509_ptr& out) {
  x509_ptr cert(X509_new());
  name_ptr name(X509_NAME_new());
  if (!cert || !name) return fail_ssl("allocating a certificate");
  bool ok =
      X509_set_version(cert.get(), X509_VERSION_3) == 1 && set_random_serial(cert.get()) &&
      // Backdated an hour so clients with a slightly slow clock accept it.
      X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600) != nullptr &&
      X509_time_adj_ex(X509_getm_notAfter(cert.get()), static_cast<int>(days), 0,
                       nullptr) != nullptr &&
      X509_NAME_add_entry_by_txt(
          name.get(), "CN", MBSTRING_UTF8,
          reinterpret_cast<const unsigned char*>(common_name.c_str()), -1, -1, 0) == 1 &&
      X509_set_subject_name(cert.get(), name.get()) == 1 &&
      X509_set_issuer_name(cert.get(), issuer ? X509_get_subject_name(issuer)
                                              : name.get()) == 1 &&
      X509_set_pubkey(cert.get(), subject_key) == 1;
  if (!ok) return fail_ssl("filling certificate fields");

  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer ? issuer : cert.get(), cert.get(), nullptr, nullptr, 0);
  if (sans == nullptr) {
    ok = add_ext(cert.get(), &ctx, NID_basic_constraints, "critical,CA:TRUE,pathlen:0") &&
         add_ext(cert.get(), &ctx, NID_key_usage, "critical,keyCertSign,cRLSign") &&
         add_ext(cert.get(), &ctx, NID_subject_key_identifier, "hash");
  } else {
    ok = add_ext(cert.get(), &ctx, NID_basic_constraints, "critical,CA:FALSE") &&
         add_ext(cert.get(), &ctx, NID_key_usage, "critical,digitalSignature") &&
         add_ext(cert.get(), &ctx, NID_ext_key_usage, "serverAuth") &&
         add_ext(cert.get(), &ctx, NID_subject_key_identifier, "hash") &&
         add_ext(cert.get(), &ctx, NID_authority_key_identifier, "keyid:always") &&
         add_sans(cert.get(), *sans);
  }
  if (!ok) return fail_ssl("adding certificate extensions");
  if (X509_sign(cert.get(), issuer_key, EVP_sha256()) <= 0)
    return fail_ssl("signing certificate");
  out = std::move(cert);
  return {};
}

bool cert_has_san(const GENERAL_NAMES* names, const san_entry& want) {
  for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
    const GENERAL_NAME* gn = sk_GENERAL_NAME_value(names, i);
    int type = 0;
    const auto* str = static_cast<const ASN1_STRING*>(GENERAL_NAME_get0_value(gn, &type));
    if (str == nullptr) continue;
    const std::string_view have(reinterpret_cast<const char*>(ASN1_STRING_get0_data(str)),
                                static_cast<std::size_t>(ASN1_STRING_length(str)));
    if (want.ip && type == GEN_IPADD && have == want.value) return true;
    if (!want.ip && type == GEN_DNS && iequals(have, want.value)) return true;
  }
  return false;
}

/// True when the existing server certificate and key can be kept.
bool server_material_usable(const tls_paths& p, X509* ca, const std::vector<san_entry>& sans) {
  x509_ptr leaf;
  pkey_ptr key;
  if (load_cert(p.cert_pem, leaf) || load_key(p.key_pem, key)) return false;
  EVP_PKEY* ca_pub = X509_get0_pubkey(ca);
  if (ca_pub == nullptr || X509_verify(leaf.get(), ca_pub) != 1) return false;
  if (X509_check_private_key(leaf.get(), key.get()) != 1) return false;
  time_t renew_at = std::time(nullptr) + renew_before_seconds;
  if (X509_cmp_time(X509_get0_notAfter(leaf.get()), &renew_at) <= 0) return false;
  gens_ptr names(static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(leaf.get(), NID_subject_alt_name, nullptr, nullptr)));
  if (!names) return false;
  for (const san_entry& s : sans)
    if (!cert_has_san(names.get(), s)) return false;
  ERR_clear_error();
  return true;
}

error write_key(const std::string& path, EVP_PKEY* key) {
  std::string pem;
  if (!to_pem(key, pem)) return fail_ssl("encoding private key for " + path);
  error e = write_file_atomic(path, pem, 0600);
  OPENSSL_cleanse(pem.data(), pem.size());
  return e;
}

error create_ca(const std::string& ca_pem, const std::string& ca_key, x509_ptr& cert,
                pkey_ptr& key) {
  key = generate_p256();
  if (!key) return fail_ssl("generating CA key");
  if (auto e = make_cert(ca_common_name, key.get(), nullptr, key.get(), ca_days, nullptr, cert))
    return e;
  std::string pem;
  if (!to_pem(cert.get(), pem)) return fail_ssl("encoding CA certificate");
  // Key first: a ca.pem without its key would block every later start.
  if (auto e = write_key(ca_key, key.get())) return e;
  return write_file_atomic(ca_pem, pem, 0644);
}

error create_server(const tls_paths& p, X509* ca, EVP_PKEY* ca_key,
                    const std::vector<san_entry>& sans) {
  pkey_ptr key = generate_p256();
  if (!key) return fail_ssl("generating server key");
  // CN mirrors the first DNS SAN (clients only look at SANs); 64-char cap.
  std::string cn = "provisiond";
  for (const san_entry& s : sans)
    if (!s.ip && s.value.size() <= 64) {
      cn = s.value;
      break;
    }
  x509_ptr cert;
  if (auto e = make_cert(cn, key.get(), ca, ca_key, server_days, &sans, cert)) return e;
  std::string chain;
  if (!to_pem(cert.get(), chain) || !to_pem(ca, chain))
    return fail_ssl("encoding server certificate");
  // The key goes first; until server.pem is replaced too the pair mismatches,
  // which the next start detects and repairs.
  if (auto e = write_key(p.key_pem, key.get())) return e;
  return write_file_atomic(p.cert_pem, chain, 0644);
}

} // namespace

error load_pem_file(const std::string& path, std::string& out) {
  return read_file(path, out);
}

error read_certificate_sans(const std::string& pem_path, std::vector<std::string>& out) {
  out.clear();
  x509_ptr cert;
  if (auto e = load_cert(pem_path, cert)) return e;
  gens_ptr names(static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(cert.get(), NID_subject_alt_name, nullptr, nullptr)));
  ERR_clear_error();
  if (!names) return {};
  for (int i = 0; i < sk_GENERAL_NAME_num(names.get()); ++i) {
    int type = 0;
    const auto* str = static_cast<const ASN1_STRING*>(
        GENERAL_NAME_get0_value(sk_GENERAL_NAME_value(names.get(), i), &type));
    if (str == nullptr) continue;
    const auto* data = ASN1_STRING_get0_data(str);
    const int len = ASN1_STRING_length(str);
    if (type == GEN_DNS) {
      out.emplace_back(reinterpret_cast<const char*>(data), static_cast<std::size_t>(len));
    } else if (type == GEN_IPADD && (len == 4 || len == 16)) {
      char buf[INET6_ADDRSTRLEN];
      if (inet_ntop(len == 4 ? AF_INET : AF_INET6, data, buf, sizeof buf) != nullptr)
        out.emplace_back(buf);
    }
  }
  return {};
}

error ensure_tls_material(const std::string& dir, const std::vector<std::string>& sans,
                          tls_paths& out) {
  const fs::path base(dir);
  out = tls_paths{};
  out.ca_pem = (base / "ca.pem").string();
  out.cert_pem = (base / "server.pem").string();
  out.key_pem = (base / "server.key").string();
  const std::string ca_key_path = (base / "ca.key").string();

  std::vector<san_entry> wanted;
  if (auto e = parse_sans(sans, wanted)) return e;

  std::error_code ec;
  fs::create_directories(base, ec);
  if (ec) return fail("cannot create TLS directory " + dir + ": " + ec.message());

  const bool have_ca_pem = fs::exists(out.ca_pem, ec);
  const bool have_ca_key = fs::exists(ca_key_path, ec);
  x509_ptr ca;
  pkey_ptr ca_key;
  if (!have_ca_pem && !have_ca_key) {
    if (auto e = create_ca(out.ca_pem, ca_key_path, ca, ca_key)) return e;
    out.ca_generated = true;
  } else if (have_ca_pem != have_ca_key) {
    // Never replace half a CA: devices may already trust the existing ca.pem.
    return fail(std::string(have_ca_pem ? ca_key_path : out.ca_pem) +
                " is missing; restore it or remove both CA files to create a new CA");
  } else {
    if (auto e = load_cert(out.ca_pem, ca)) return e;
    if (auto e = load_key(ca_key_path, ca_key)) return e;
    if (X509_check_private_key(ca.get(), ca_key.get()) != 1) {
      ERR_clear_error();
      return fail(ca_key_path + " does not belong to " + out.ca_pem);
    }
  }

  if (out.ca_generated || !server_material_usable(out, ca.get(), wanted)) {
    ERR_clear_error();
    if (auto e = create_server(out, ca.get(), ca_key.get(), wanted)) return e;
    out.server_generated = true;
  }
  return {};
}

} // namespace prov::net
