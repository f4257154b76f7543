#pragma once
// X.509 certificates as enrollments carry them (X509CertificateWithInfo):
// PEM or bare base64 DER, read once into DER and thumbprints, plus the small
// OpenSSL handles the X.509 attestation mechanism shares with the model.
// Include it only from .cpp files: it pulls in OpenSSL's headers.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json_fwd.hpp>
#include <openssl/x509.h>

namespace prov::enrollment {

template <class T, void (*F)(T*)>
struct x509_free {
  void operator()(T* p) const noexcept { F(p); }
};
using x509_ptr = std::unique_ptr<X509, x509_free<X509, X509_free>>;
using x509_store_ptr = std::unique_ptr<X509_STORE, x509_free<X509_STORE, X509_STORE_free>>;
using x509_store_ctx_ptr =
  std::unique_ptr<X509_STORE_CTX, x509_free<X509_STORE_CTX, X509_STORE_CTX_free>>;

/// The object `d2i` reads from `der` (d2i_X509, d2i_X509_CRL): null when it
/// does not read or bytes are left over (trailing bytes would make two texts
/// name one object).
template <class T, T* (*D2I)(T**, const unsigned char**, long), void (*F)(T*)>
std::unique_ptr<T, x509_free<T, F>> parse_exact_der(std::string_view der) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  std::unique_ptr<T, x509_free<T, F>> out(D2I(nullptr, &p, static_cast<long>(der.size())));
  if (out && p != reinterpret_cast<const unsigned char*>(der.data()) + der.size())
    out.reset();
  return out;
}

/// The certificate in DER; null when `der` is not exactly one certificate.
x509_ptr parse_der(std::string_view der);
/// The same, shareable (parsed once, read by many threads).
std::shared_ptr<X509> shared_der(std::string_view der);
/// A DER CRL, shareable; null when `der` is not exactly one CRL.
std::shared_ptr<X509_CRL> shared_crl_der(std::string_view der);
/// DER of a certificate given as PEM or as bare base64 DER (DPS accepts
/// both); false when it is neither.
bool certificate_der(std::string_view text, std::string& der);
/// A hex thumbprint (any case; ':' and ' ' ignored) as raw bytes: 20 (SHA-1)
/// or 32 (SHA-256); false otherwise.
bool thumbprint_bytes(std::string_view hex, std::string& raw);
/// Raw SHA-1 and SHA-256 of `data` (thumbprints of a DER certificate).
std::string sha1_of(std::string_view data);
std::string sha256_of(std::string_view data);
/// Upper-case hex, as DPS spells thumbprints.
std::string upper_hex(std::string_view raw);
/// RFC 2253 text of a name ("CN=dev-1,O=Contoso").
std::string name_text(const X509_NAME* name);
/// The subject's last commonName, "" when none.
std::string common_name(const X509* cert);
/// Seconds since the epoch of an ASN1_TIME; 0 when unreadable.
int64_t epoch_of(const ASN1_TIME* t);
/// ISO 8601 UTC ("2026-12-07T12:00:00Z") of seconds since the epoch.
std::string utc_text(int64_t epoch_s);
/// X509CertificateInfo as DPS fills `info`: subjectName, sha1Thumbprint,
/// sha256Thumbprint (upper-case hex), issuerName, notBeforeUtc, notAfterUtc,
/// serialNumber, version.
nlohmann::json certificate_info(const X509* cert, std::string_view der);

} // namespace prov::enrollment
