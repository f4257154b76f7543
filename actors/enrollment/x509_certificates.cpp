#include "actors/enrollment/x509_certificates.hpp"

#include <cctype>
#include <ctime>

#include <nlohmann/json.hpp>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "messages/crypto.hpp"

namespace prov::enrollment {

namespace {

std::string digest(const EVP_MD* md, std::string_view data) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (EVP_Digest(data.data(), data.size(), out, &n, md, nullptr) != 1)
    return {};
  return std::string(reinterpret_cast<const char*>(out), n);
}

} // namespace

std::string upper_hex(std::string_view raw) {
  static const char digits[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(raw.size() * 2);
  for (unsigned char c : raw) {
    out.push_back(digits[c >> 4]);
    out.push_back(digits[c & 15]);
  }
  return out;
}

x509_ptr parse_der(std::string_view der) {
  return parse_exact_der<X509, d2i_X509, X509_free>(der);
}

std::shared_ptr<X509> shared_der(std::string_view der) {
  return std::shared_ptr<X509>(parse_der(der).release(), X509_free);
}

std::shared_ptr<X509_CRL> shared_crl_der(std::string_view der) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  X509_CRL* crl = d2i_X509_CRL(nullptr, &p, static_cast<long>(der.size()));
  if (crl != nullptr && p != reinterpret_cast<const unsigned char*>(der.data()) + der.size()) {
    X509_CRL_free(crl); // trailing bytes: not exactly one CRL
    crl = nullptr;
  }
  return std::shared_ptr<X509_CRL>(crl, X509_CRL_free);
}

bool certificate_der(std::string_view text, std::string& der) {
  std::string b64;
  if (text.find("-----BEGIN") != std::string_view::npos) {
    // PEM: exactly one CERTIFICATE block.
    constexpr std::string_view begin = "-----BEGIN CERTIFICATE-----";
    constexpr std::string_view end = "-----END CERTIFICATE-----";
    auto b = text.find(begin);
    auto e = text.find(end);
    if (b == std::string_view::npos || e == std::string_view::npos || e < b
        || text.find(begin, b + 1) != std::string_view::npos)
      return false;
    text = text.substr(b + begin.size(), e - b - begin.size());
  }
  // Bare base64 DER, or a PEM body: line breaks and spaces ignored.
  // DPS samples also escape the line breaks as "\n" text: ignore those too.
  b64.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (c == '\\' && i + 1 < text.size() && (text[i + 1] == 'n' || text[i + 1] == 'r')) {
      ++i;
      continue;
    }
    if (c == '\r' || c == '\n' || c == ' ' || c == '\t')
      continue;
    b64.push_back(c);
  }
  auto raw = crypto::base64_decode(b64);
  if (!raw || !parse_der(*raw))
    return false;
  der = std::move(*raw);
  return true;
}

bool thumbprint_bytes(std::string_view hex, std::string& raw) {
  std::string out;
  int hi = -1;
  for (char c : hex) {
    if (c == ':' || c == ' ')
      continue;
    int v;
    if (c >= '0' && c <= '9')
      v = c - '0';
    else if (c >= 'a' && c <= 'f')
      v = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F')
      v = c - 'A' + 10;
    else
      return false;
    if (hi < 0) {
      hi = v;
    } else {
      out.push_back(static_cast<char>(hi * 16 + v));
      hi = -1;
    }
  }
  if (hi >= 0 || (out.size() != 20 && out.size() != 32))
    return false;
  raw = std::move(out);
  return true;
}

std::string sha1_of(std::string_view data) { return digest(EVP_sha1(), data); }
std::string sha256_of(std::string_view data) { return digest(EVP_sha256(), data); }

std::string name_text(const X509_NAME* name) {
  std::unique_ptr<BIO, x509_free<BIO, BIO_free_all>> bio(BIO_new(BIO_s_mem()));
  if (!bio || name == nullptr
      || X509_NAME_print_ex(bio.get(), name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB) < 0)
    return {};
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return n > 0 ? std::string(data, static_cast<std::size_t>(n)) : std::string();
}

std::string common_name(const X509* cert) {
  const X509_NAME* subject = X509_get_subject_name(cert);
  int last = -1;
  for (int i = X509_NAME_get_index_by_NID(subject, NID_commonName, -1); i >= 0;
       i = X509_NAME_get_index_by_NID(subject, NID_commonName, i))
    last = i;
  if (last < 0)
    return {};
  const ASN1_STRING* s = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, last));
  unsigned char* utf8 = nullptr;
  int n = ASN1_STRING_to_UTF8(&utf8, s);
  if (n < 0)
    return {};
  std::string out(reinterpret_cast<char*>(utf8), static_cast<std::size_t>(n));
  OPENSSL_free(utf8);
  return out;
}

int64_t epoch_of(const ASN1_TIME* t) {
  std::tm tm{};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1)
    return 0;
  return static_cast<int64_t>(timegm(&tm));
}

std::string utc_text(int64_t epoch_s) {
  std::time_t t = static_cast<std::time_t>(epoch_s);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

nlohmann::json certificate_info(const X509* cert, std::string_view der) {
  nlohmann::json info = nlohmann::json::object();
  info["subjectName"] = name_text(X509_get_subject_name(cert));
  info["sha1Thumbprint"] = upper_hex(sha1_of(der));
  info["sha256Thumbprint"] = upper_hex(sha256_of(der));
  info["issuerName"] = name_text(X509_get_issuer_name(cert));
  info["notBeforeUtc"] = utc_text(epoch_of(X509_get0_notBefore(cert)));
  info["notAfterUtc"] = utc_text(epoch_of(X509_get0_notAfter(cert)));
  std::string serial;
  if (BIGNUM* bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), nullptr)) {
    if (char* h = BN_bn2hex(bn)) {
      serial = h;
      OPENSSL_free(h);
    }
    BN_free(bn);
  }
  info["serialNumber"] = serial;
  info["version"] = X509_get_version(cert) + 1;
  return info;
}

} // namespace prov::enrollment
