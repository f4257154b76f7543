#pragma once
// The CA certificate store (DPS "certificates" with proof of possession):
// what an entry is, stored and answered, and the three writes that change
// one (upload, new verification code, verify). Pure functions on JSON
// documents; the enrollment actor reads and writes the store around them.
//
// Stored document (cf certificates, key = lower(name)):
//   {name, certificate (base64 DER), subject, thumbprint (SHA-1, upper hex),
//    sha256Thumbprint, notBefore, expiry (epoch s), isVerified,
//    verificationCode ("" when none outstanding), crls (base64 DER CRLs, at
//    most one per issuer), created, updated (epoch ms), etag}

#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json_fwd.hpp>

#include "actors/enrollment/enrollment_model.hpp"
#include "messages/error.hpp"

namespace prov::enrollment {

/// 1..128 of A-Z a-z 0-9 - . _ (ARM resource name rules, no '/'), not
/// starting with '.' (so never "." or "..").
bool valid_certificate_name(std::string_view name);

/// A PUT body ({certificate, isVerified?} or ARM's {properties: {...}}) into
/// the document to store. `existing`: the entry under this name, or null; an
/// upload of the same certificate keeps its verification, another
/// certificate starts unverified. Errors: invalid_certificate (not one PEM
/// or base64 certificate, not a CA, expired), bad_request (isVerified true:
/// proof of possession is the only way to verify).
[[nodiscard]] error ca_upload(const std::string& name, const nlohmann::json& body,
                              const nlohmann::json* existing, int64_t now_ms,
                              nlohmann::json& out);

/// A fresh verification code in `doc` (replacing an outstanding one).
void ca_new_verification_code(nlohmann::json& doc, int64_t now_ms);

/// Proof of possession: `body` {certificate} must be signed by the entry's CA
/// and have the outstanding verification code as its subject CN. On success
/// `doc` is verified (code consumed). Errors: invalid_certificate, with the reason.
[[nodiscard]] error ca_verify(nlohmann::json& doc, const nlohmann::json& body, int64_t now_ms);

/// Revocation (DPS has none): `body` {crl} is a PEM or base64 DER CRL, issued
/// by the CA itself (its signature is checked now) or by an intermediate
/// below it (checked at attestation against the presented intermediate). It
/// replaces the stored CRL of the same issuer. Errors: invalid_certificate.
[[nodiscard]] error ca_put_crl(nlohmann::json& doc, const nlohmann::json& body, int64_t now_ms);

/// CertificateResponse as DPS answers it: {name, etag, id, type, properties:
/// {subject, expiry, thumbprint, isVerified, certificate, created, updated}},
/// plus properties.crls [{issuer, lastUpdate, nextUpdate, revoked}] when any.
nlohmann::json ca_public(const nlohmann::json& doc);
/// VerificationCodeResponse: ca_public plus properties.verificationCode.
nlohmann::json ca_verification_public(const nlohmann::json& doc);

/// Fills ref's status and der from the stored entry (null: missing). A
/// document it cannot read (wrong-typed fields) counts as missing: it admits
/// nothing, and never throws (it runs on the table reader thread).
void resolve_ca(const std::string* stored_doc, ca_reference& ref);
/// Parses ref.der and ref.crls into ref.cert and ref.parsed_crls (resolve_ca
/// does; for references built by other means).
void resolve_parsed(ca_reference& ref);

/// Why `doc` is not a stored CA entry for `key` (empty when it is): an object
/// whose name is a valid_certificate_name with key_of(name) == key, whose
/// certificate is base64 of one DER certificate, whose typed fields (isVerified
/// bool, crls array of strings, expiry/notBefore/created/updated integers,
/// the text fields strings) have their types when present. Replication
/// dead-letters such a record instead of storing it.
std::string ca_doc_problem(std::string_view key, const nlohmann::json& doc);

} // namespace prov::enrollment
