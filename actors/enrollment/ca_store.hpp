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
//    most one per issuer), created, updated (epoch ms), etag, revision}
//
// Kafka mode (actors/replication.cpp): every write of an entry carries
// revision = 1 + the highest revision this instance has seen for the name
// (its entry, or the marker its last delete left), and a delete is published
// as a marker {name, deleted: true, revision} instead of a null tombstone.
// Every instance applies the topic in the same order with the same rule
// (ca_supersedes), so a write computed from a state that a delete has since
// replaced (a slower gateway's verify, a late retry) loses everywhere, and the
// CA does not come back.

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

/// An entry's or deletion marker's revision (0 when absent: written before
/// revisions existed).
int64_t ca_revision(const nlohmann::json& doc) noexcept;
/// The dps.enrollments value that deletes CA `name` in Kafka mode.
nlohmann::json ca_deleted_marker(const std::string& name, int64_t revision);
bool ca_is_deleted_marker(const nlohmann::json& doc) noexcept;
/// Meta key (cf meta) of the revision of the last deletion of `key`.
std::string ca_deleted_meta_key(std::string_view key);
/// Whether a replicated record of revision `incoming` (a marker when
/// `is_delete`) replaces the state of revision `stored` (the entry's, or the
/// last marker's; 0 when none). A delete wins a tie: it and a concurrent
/// write computed from the same state carry the same revision. Revision 0
/// (a writer older than revisions) replaces only revision 0, as before.
bool ca_supersedes(int64_t incoming, bool is_delete, int64_t stored) noexcept;

/// Why `doc` is not a stored CA entry for `key` (empty when it is): an object
/// whose name is a valid_certificate_name with key_of(name) == key, whose
/// certificate is base64 of one DER certificate, whose typed fields (isVerified
/// bool, crls array of strings, expiry/notBefore/created/updated integers,
/// the text fields strings) have their types when present. Replication
/// dead-letters such a record instead of storing it. A deletion marker
/// (ca_deleted_marker) is checked as one: name as above, revision >= 1.
std::string ca_doc_problem(std::string_view key, const nlohmann::json& doc);

} // namespace prov::enrollment
