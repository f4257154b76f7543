#pragma once
// Certificate issuance from a device's CSR (DPS api-version
// 2025-07-01-preview / 2026-11-01, RegisterDeviceAndIssueCertificate): the
// configuration stage signs the device's PKCS#10 request with the issuing CA
// its enrollment names and returns the chain (registrationState
// .issuedCertificateChain). Pure logic, no I/O after load(); OpenSSL stays
// behind this header.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"
#include "messages/error.hpp"
#include "messages/registration.hpp"

namespace prov::configuration {

/// What a CSR that passed check_csr() asks for.
struct csr_summary {
  std::string key_type; ///< "P-256", "P-384", "RSA-3072", ...
  std::string der;      ///< the decoded request
};

/// Decodes and checks a device's `csr` (base64 of the DER of a PKCS#10
/// request, no PEM armour): it parses, its signature verifies with its own
/// key, its subject CN is `registration_id`, its key is ECDSA P-256 / P-384
/// or RSA 2048..8192 bits. Errors: invalid_csr, each cause its own message.
[[nodiscard]] error check_csr(std::string_view csr_b64, std::string_view registration_id,
                              csr_summary& out);

/// RFC 5280's ub-common-name: OpenSSL refuses a longer CN, and the issued
/// CN is the registration id (which may be up to 128 characters).
constexpr std::size_t max_issued_cn_chars = 64;

/// invalid_csr when `registration_id` is too long to be an issued
/// certificate's CN; the gateway refuses such a register with a csr at once.
[[nodiscard]] error check_issuable_id(std::string_view registration_id);

/// The issuing CAs of [[issuing_cas]], loaded once at start (keys in
/// memory). Immutable after load(); issue() may run on any thread.
class certificate_issuer {
public:
  ~certificate_issuer();
  certificate_issuer(const certificate_issuer&) = delete;
  certificate_issuer& operator=(const certificate_issuer&) = delete;

  /// Reads every CA's key and certificate chain. Errors name the CA entry
  /// (`issuing_cas[i]`), the file and the cause: unreadable, key readable by
  /// group or others, not a key / certificate, key not the certificate's,
  /// certificate not a CA.
  /// `log`: gets one line per issued certificate (issue_for), for the
  /// diagnostic log (audit, revocation); may be empty.
  using log_fn = std::function<void(std::string_view line)>;
  [[nodiscard]] static error load(const std::vector<config::issuing_ca_config>& cas,
                                  std::shared_ptr<const certificate_issuer>& out,
                                  log_fn log = {});

  bool has(std::string_view ca_name) const;
  std::vector<std::string> names() const;

  /// Issues a client certificate for `registration_id` from `csr_b64` with
  /// CA `ca_name` valid from `now_ms` (5 minutes earlier, for device clock
  /// skew) for the CA's validity, not past the CA's own notAfter. `chain`:
  /// base64 DER, the leaf, then the CA's chain as configured (issuing CA,
  /// intermediates, root). Serial numbers are 16 random bytes.
  /// `issued`, when not null, gets what the audit line names.
  struct issued_facts {
    std::string ca_name;   ///< as configured
    std::string serial;    ///< upper-case hex
    std::string not_after; ///< ISO 8601 UTC
  };
  [[nodiscard]] error issue(std::string_view ca_name, std::string_view registration_id,
                            std::string_view csr_b64, int64_t now_ms,
                            std::vector<std::string>& chain,
                            issued_facts* issued = nullptr) const;

  /// Writes the line issue_for logs for a certificate (no-op without a log).
  void log_issued(std::string_view line) const;

private:
  struct authority;
  certificate_issuer() = default;
  std::vector<std::unique_ptr<authority>> cas_;
  log_fn log_;
};

/// The issued chain as stored on events and records: '\n'-separated base64.
std::string join_chain(const std::vector<std::string>& chain);

/// The configuration stage's step: when `ev` carries a csr, issues its
/// certificate with the CA allocation found on its enrollment
/// (ev.issuing_ca) into ev.issued_chain, and drops the csr. An event without
/// a csr is left as is: its issued_chain (if any) is the one issued by an
/// earlier run on the same event, which a retry must keep. Errors:
/// no_issuance_policy (a csr but no policy: DPS has no documented answer;
/// provisiond refuses rather than assign a device that waits for a
/// certificate it never gets), issuing_ca_unavailable (`issuer` null or
/// without that CA), invalid_csr. Nothing is issued on any error. Each
/// certificate issued is logged through the issuer's log (registration id,
/// operation id, CA, serial, notAfter).
[[nodiscard]] error issue_for(const certificate_issuer* issuer, registration_event& ev,
                              int64_t now_ms);

/// `ev` as a failed registration (err's code and message), completed at
/// `completed_ms`: what configuration forwards on registration.completed
/// when issuance fails.
void mark_failed(registration_event& ev, const error& err, int64_t completed_ms);

} // namespace prov::configuration
