#pragma once
// Individual enrollments and enrollment groups as the DPS service API
// (api-version 2021-10-01) defines them. Documents are kept as JSON (every
// field from the reference is stored and returned as given); the engine reads
// the fields it acts on through the typed `enrollment_view`.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "messages/dps_types.hpp"
#include "messages/error.hpp"

// OpenSSL's certificate and CRL, declared only: the parsed forms below are
// used from .cpp files that include x509_certificates.hpp.
struct x509_st;
struct X509_crl_st;

namespace prov::enrollment {

enum class kind : uint8_t { individual, group };

/// attestation.symmetricKey: base64 keys (a group's derive its devices' keys).
struct symmetric_key_attestation {
  std::string primary_key;
  std::string secondary_key;
};
/// One X509CertificateWithInfo: the certificate (DER), or, for a client
/// certificate given by thumbprint only, its info's thumbprints.
struct x509_certificate_ref {
  std::string der;    ///< empty: known by thumbprint only
  std::string sha1;   ///< raw thumbprints: of `der`, or as given ("" when not)
  std::string sha256;
  /// `der` parsed once when a group's view is built (signingCertificates;
  /// null otherwise), shared read-only by every attestation.
  std::shared_ptr<x509_st> cert;
};
/// A caReferences entry: the CA's name in the certificate store
/// (ca_store.hpp), and what the store held for it when the group snapshot
/// was built (enrollment_catalog resolves it; a parsed document alone leaves
/// it `unresolved`, which admits nothing).
struct ca_reference {
  enum class state : uint8_t { unresolved, missing, unverified, verified };
  std::string name;
  state status = state::unresolved;
  std::string der; ///< the CA certificate, when the store has it
  /// DER CRLs stored with the CA (its own, or its intermediates'): a chain
  /// through this CA is checked against those whose issuer is in it.
  std::vector<std::string> crls;
  /// `der` and `crls` parsed once when the snapshot is built (resolve_ca),
  /// not on every attestation; null / skipped when they do not parse.
  std::shared_ptr<x509_st> cert;
  std::vector<std::shared_ptr<X509_crl_st>> parsed_crls;
};
bool operator==(const ca_reference& a, const ca_reference& b);
/// attestation.x509, parsed: individual enrollments name the device's own
/// certificates, groups the CA (root or intermediate) that signs them, given
/// inline (signingCertificates) or by name in the certificate store.
struct x509_attestation {
  std::vector<x509_certificate_ref> client_certificates;  ///< primary, secondary
  std::vector<x509_certificate_ref> signing_certificates; ///< primary, secondary
  std::vector<ca_reference> ca_references;                ///< primary, secondary
};
/// attestation.tpm: base64 TPM2B_PUBLIC of the endorsement and storage root keys.
struct tpm_attestation {
  std::string endorsement_key;
  std::string storage_root_key;
};
bool operator==(const symmetric_key_attestation& a, const symmetric_key_attestation& b);
bool operator==(const x509_certificate_ref& a, const x509_certificate_ref& b);
bool operator==(const x509_attestation& a, const x509_attestation& b);
bool operator==(const tpm_attestation& a, const tpm_attestation& b);

/// An enrollment's attestation, one alternative per attestation_type (in
/// its order; std::monostate is "none").
using attestation_view =
  std::variant<std::monostate, symmetric_key_attestation, x509_attestation, tpm_attestation>;
inline attestation_type type_of(const attestation_view& a) noexcept {
  return static_cast<attestation_type>(a.index());
}

/// What the engine needs from an enrollment document.
struct enrollment_view {
  kind k = kind::individual;
  std::string id;               ///< registrationId or enrollmentGroupId, as given
  attestation_view attestation;
  std::string device_id;        ///< individual only; empty = registration id
  bool enabled = true;          ///< provisioningStatus != "disabled"
  std::optional<allocation_policy> allocation; ///< unset: the instance default
  std::vector<std::string> iot_hubs; ///< empty = all linked hubs
  std::string initial_twin_json; ///< serialized initialTwin, "" when absent
  bool iot_edge = false;         ///< capabilities.iotEdge
  bool update_hub_assignment = true; ///< reprovisionPolicy
  bool migrate_device_data = true;
  std::string etag;
  /// allocationPolicy custom only (else empty): customAllocationDefinition,
  /// and the document as the webhook receives it (public_document(), compact).
  std::string webhook_url;
  std::string webhook_api_version;
  /// customAllocationDefinition.timeoutMs and .retries (provisiond
  /// extensions): per attempt and retries after a failed attempt; 0 and -1
  /// mean the [custom_allocation] defaults.
  int webhook_timeout_ms = 0;
  int webhook_retries = -1;
  std::string public_json;
  /// The issuing CA of the enrollment's certificate issuance policy
  /// ([[issuing_cas]] name), "" when it has none: a register with a `csr`
  /// then fails (docs/x509.md).
  std::string issuing_ca;
};

/// The issuing CA an issuance policy names, from either shape DPS defines:
/// `clientCertificateIssuancePolicy.certificateAuthorityName`
/// (2021-11-01-preview) or `certificatePolicyResourceId` (2025-07-01-preview
/// and later): an ARM id ".../certificateAuthorities/<ca>/certificatePolicies/
/// <policy>", whose <ca> segment is taken; a bare name is the CA itself.
/// Empty when the id names no CA.
std::string issuing_ca_of_resource_id(std::string_view resource_id);

/// The bounds of customAllocationDefinition.timeoutMs and .retries (the
/// same as [custom_allocation] timeout_ms and retries).
inline constexpr int min_webhook_timeout_ms = 100;
inline constexpr int max_webhook_timeout_ms = 600000;
inline constexpr int max_webhook_retries = 10;

/// Storage key of an id: ids are case-insensitive, so keys are lower-case.
std::string key_of(std::string_view id);

/// True when `id` is a valid registration id: 1..128 chars of [A-Za-z0-9-._:],
/// first char alphanumeric, last alphanumeric or '-'.
bool valid_registration_id(std::string_view id);
/// Same charset rules for enrollment group ids (1..128).
bool valid_group_id(std::string_view id);

/// Validates a create-or-replace body from the service API and produces the
/// document to store. `path_id` is the id from the URL; the body's id (if
/// present) must match it case-insensitively. `existing` is the stored document
/// (nullptr when creating): createdDateTimeUtc is kept from it. Generates
/// 64-byte symmetric keys when omitted, a new etag, timestamps (ISO 8601 UTC from
/// `now_ms`). Read-only members sent by clients (registrationState, etag,
/// timestamps) are ignored. Errors: invalid_enrollment / custom_allocation_required
/// / id_mismatch with a message naming the offending member.
[[nodiscard]] error normalize(kind k, std::string_view path_id,
                              const nlohmann::json& body,
                              const nlohmann::json* existing, int64_t now_ms,
                              nlohmann::json& out);

/// Extracts the typed view of a stored document.
[[nodiscard]] error view_of(kind k, const nlohmann::json& doc, enrollment_view& out);
/// The same from the stored text, read without building a tree when the
/// document is plain (no initialTwin, no \u escapes, no duplicate members);
/// otherwise parsed with nlohmann. Text that is not JSON: storage_failure
/// "stored enrollment is not valid JSON"; otherwise view_of's answer.
[[nodiscard]] error view_of_text(kind k, std::string_view text, enrollment_view& out);
/// view_of_text's reader without a tree: true when it could fill `out` (which
/// it may have changed either way). Exposed for its tests.
bool scan_view(kind k, std::string_view text, enrollment_view& out);

/// The document as GET/query/PUT responses show it: symmetric keys removed
/// (`attestation.symmetricKey` becomes {} ), everything else as stored.
nlohmann::json public_document(const nlohmann::json& doc);

/// The attestation mechanism including keys (POST .../attestationmechanism).
nlohmann::json attestation_mechanism(const nlohmann::json& doc);

/// True when an If-Match header value matches the stored etag: "*" matches
/// anything; otherwise compared with surrounding quotes (and W/) stripped.
bool etag_matches(std::string_view if_match, std::string_view stored_etag);

/// A new opaque etag (quoted UUID-like string, as DPS sends).
std::string new_etag();
/// An etag that is a function of `seed` (same seed, same etag): records that
/// several processes may write for the same operation stay identical.
std::string etag_for(std::string_view seed);

} // namespace prov::enrollment
