#pragma once
// Device registration: the request a gateway hands the engine, the event that
// flows between stages, and the registration state devices and operators see.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json_fwd.hpp>

#include "messages/credential.hpp"
#include "messages/error.hpp"

namespace prov {

/// DPS EnrollmentStatus.
enum class registration_status : uint8_t {
  unassigned = 0,
  assigning = 1,
  assigned = 2,
  failed = 3,
  disabled = 4,
};
std::string_view to_string(registration_status s) noexcept;
bool from_string(std::string_view s, registration_status& out) noexcept;
inline bool is_terminal(registration_status s) noexcept {
  return s == registration_status::assigned || s == registration_status::failed
         || s == registration_status::disabled;
}

/// PUT /{idScope}/registrations/{registrationId}/register, after the gateway
/// has checked the HTTP shape (path, content type, JSON body).
struct register_request {
  std::string id_scope;
  std::string registration_id;
  std::string api_version;
  device_credential credential; ///< what the device presented to prove its identity
  std::string payload_json;      ///< device payload as JSON text, "" when absent
  /// `csr` (api-version 2025-07-01-preview and later): base64 DER PKCS#10,
  /// checked and signed by the configuration stage; "" when absent.
  std::string csr;
  bool force_registration = false;
  std::string protocol = "http";
  std::string client_ip;
  std::string correlation_id;
};

struct registration_state;

/// The unit of work passed between stages (keyed by registration id). Each
/// stage fills its part; stages are idempotent on operation_id.
struct registration_event {
  int32_t version = 1; ///< schema version for the Kafka encoding
  std::string operation_id;
  std::string registration_id;
  std::string id_scope;
  std::string api_version;
  std::string protocol;
  int64_t accepted_ms = 0;
  // attestation
  std::string attestation_type;   ///< "symmetricKey"
  std::string enrollment_group_id; ///< empty for individual enrollments
  /// "primary" or "secondary": the enrollment's key (or the group key the
  /// device key derives from) that signed the credential; "" for other
  /// attestations. JSON encoding only when set.
  std::string key_used;
  std::string payload_json;
  /// The device's address as the gateway saw it (geoLatency's client-address
  /// ranges); "" when unknown. JSON encoding only when set.
  std::string client_ip;
  /// registration.requested only: the device's credential (SAS token text)
  /// as a direct publisher sends it. The attestation stage clears it before
  /// anything is published further; it is never stored (encode_record skips
  /// it) and left out of inspect() so it never reaches a log.
  std::string authorization;
  /// registration.requested only, like `authorization`: an X.509 direct
  /// publisher's chain and its proof of possession (the request's `x509`
  /// member). Never encoded, not in inspect().
  std::shared_ptr<const x509_credential> x509_presented;
  // allocation
  std::string assigned_hub;
  std::string device_id;
  std::string initial_twin_json;
  bool iot_edge = false;
  std::string substatus;
  /// The custom allocation webhook's `payload` (JSON object text), for
  /// registrationState.payload; "" when none. In the JSON encoding only when
  /// set; not in the binary operation record (a terminal one keeps it in its
  /// state, an unfinished one is allocated again).
  std::string returned_payload_json;
  /// Why the device got its hub (JSON object text: the policy, its
  /// reasons, re-provisioning); "" when not allocated. JSON encoding only
  /// when set, like returnedPayload.
  std::string allocation_json;
  /// An X.509 device's certificateInfo/signingCertificateInfo as one compact
  /// JSON object text (attestation::verdict::x509_json); "" otherwise.
  std::string x509_json;
  /// The register's `csr` (base64 DER PKCS#10, as the device sent it); ""
  /// when none. Kept with the accepted operation (resume) until issuance.
  std::string csr;
  /// The issuing CA the enrollment's issuance policy names (set by
  /// allocation when `csr` is set); "" when it names none.
  std::string issuing_ca;
  /// registrationState.issuedCertificateChain: base64 DER, '\n'-separated
  /// (leaf, intermediates, root); set by configuration.
  std::string issued_chain;
  // terminal outcome
  registration_status status = registration_status::assigning;
  int32_t error_code = 0;
  std::string error_message;
  int64_t attested_ms = 0;
  int64_t allocated_ms = 0;
  int64_t completed_ms = 0;
  /// In process only (never encoded, not in inspect()): a register whose
  /// accept is not recorded yet, because its answer waits for the outcome
  /// (device_api.register_wait_ms). No operation record exists until the
  /// terminal commit (Kafka: until registration.completed is applied), and
  /// nobody knows the operation id.
  bool unrecorded = false;
  /// In process only, like `unrecorded`: the committed outcome, set by the
  /// embedded configuration stage on registration.completed, so the
  /// registration actor answers a parked register without reading it back.
  std::shared_ptr<const registration_state> outcome;
  /// In process only: the device's registration record as allocation read
  /// it (null: there was none), and engine_context::registration_generation
  /// before that read, so embedded configuration can skip reading it again.
  struct prior_record {
    std::shared_ptr<const registration_state> state;
    uint64_t generation = 0;
  };
  std::shared_ptr<const prior_record> prior;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, registration_event& x) {
  return f(x.version, x.operation_id, x.registration_id, x.id_scope, x.api_version,
           x.protocol, x.accepted_ms, x.attestation_type, x.enrollment_group_id, x.key_used,
           x.payload_json, x.assigned_hub, x.device_id, x.initial_twin_json,
           x.iot_edge, x.substatus, x.returned_payload_json, x.allocation_json, x.x509_json,
           x.csr, x.issuing_ca, x.issued_chain, x.status, x.error_code, x.error_message,
           x.attested_ms, x.allocated_ms, x.completed_ms);
}

/// DeviceRegistrationResult as stored and shown (device and service API).
struct registration_state {
  std::string registration_id;
  int64_t created_ms = 0;
  int64_t updated_ms = 0;
  std::string assigned_hub;
  std::string device_id;
  registration_status status = registration_status::unassigned;
  std::string substatus;
  int32_t error_code = 0;
  std::string error_message;
  std::string etag;
  std::string attestation_type;
  std::string enrollment_group_id;
  /// Every hub the device has been assigned to, in the order of its first
  /// assignment there, '\n'-separated (bounded: max_assigned_hubs), so a
  /// move back to one is DPS's reprovisionedToInitialAssignment. Internal:
  /// not shown by any API.
  std::string assigned_hubs;
  /// The key the device signed with at its last registration ("primary",
  /// "secondary"; "" for other attestations). Service API only.
  std::string key_used;
  std::string payload_json; ///< the custom allocation webhook's payload ("" none)
  std::string last_operation_id; ///< internal: not shown to devices
  /// Why the device is on its hub (the event's allocation_json); shown by the
  /// service API only, never to devices.
  std::string allocation_json;
  /// registrationState.x509's certificateInfo and signingCertificateInfo
  /// (registration_event::x509_json); "" when not X.509.
  std::string x509_json;
  /// The certificate chain issued from the device's CSR at this assignment
  /// (registration_event::issued_chain); "" when none. Shown only in the
  /// operation's result (register answer and operation polls), as DPS: not
  /// by the status lookup or the service API.
  std::string issued_chain;
};

/// At most this many hubs in registration_state::assigned_hubs (DPS links 50
/// at most); beyond it the first ones are forgotten.
inline constexpr std::size_t max_assigned_hubs = 64;
/// Whether the device of `s` has been assigned to `hub` (case-insensitive).
bool was_assigned_to(const registration_state& s, std::string_view hub);
/// Adds `hub` to s.assigned_hubs (nothing when there already).
void add_assigned_hub(registration_state& s, std::string_view hub);

/// A register call's lifecycle, as stored under its operation id.
struct operation_record {
  std::string operation_id;
  std::string registration_id;
  registration_status status = registration_status::assigning;
  registration_event event;  ///< the accepted request, for resume after restart
  registration_state state;  ///< filled when terminal
};

// -- JSON codecs (DPS wire shapes and our storage records) --------------------

/// DeviceRegistrationResult JSON (registrationId, createdDateTimeUtc, ...).
/// `service`: the service API's view, which adds `allocation` (why this hub)
/// when known; devices never see it.
nlohmann::json to_json(const registration_state& s, bool service = false);
/// {"operationId","status","registrationState"?} as the device API answers.
nlohmann::json operation_status_json(const std::string& operation_id,
                                     const registration_state& s);

/// The same two documents as compact JSON text, written without building a
/// tree (every poll answers one). Equal to to_json(...).dump() as JSON values.
std::string to_json_text(const registration_state& s, bool service = false);
std::string operation_status_text(const std::string& operation_id,
                                  const registration_state& s);

std::string encode_record(const registration_state& s);
[[nodiscard]] error decode_record(std::string_view text, registration_state& out);
std::string encode_record(const operation_record& op);
[[nodiscard]] error decode_record(std::string_view text, operation_record& out);
std::string encode_event(const registration_event& ev);
[[nodiscard]] error decode_event(std::string_view text, registration_event& out);
/// A registration.requested record from a direct publisher (docs/events.md):
/// registrationId and idScope required; operationId, authorization,
/// apiVersion, payload (any JSON value; a string is read as JSON text, as
/// encode_event writes it) and x509 ({certificates: [base64 DER, leaf
/// first], expiry, signature: base64}) optional. Every other member is ignored: the
/// stages fill their fields themselves.
[[nodiscard]] error decode_requested_event(std::string_view text, registration_event& out);

/// A registration.requested record value fit to be copied elsewhere (the
/// dead-letter topic): a JSON object loses its "authorization" member and
/// its x509 proof's "signature", and
/// in any text the value of every `sig=` (any case), a SAS token's secret
/// part, becomes "REDACTED".
std::string redact_credentials(std::string_view value);

/// Error body: {errorCode, trackingId, message, timestampUtc}.
std::string error_body(const error& e, std::string_view tracking_id);

/// Milliseconds since the epoch (system clock).
int64_t now_ms() noexcept;
/// ISO 8601 UTC with 7 fractional digits ("2026-11-26T12:00:00.1230000Z").
std::string utc_string(int64_t ms);
/// The same text in a fixed buffer, for appending without a heap string
/// (a registration writes eight of them).
struct utc_text {
  char chars[28];
  std::string_view view() const noexcept { return {chars, sizeof chars}; }
  operator std::string_view() const noexcept { return view(); }
};
utc_text utc_chars(int64_t ms) noexcept;

/// A DPS-shaped operation id: "<digit>.<16 hex>.<uuid>".
std::string new_operation_id(std::string_view instance_hex16);
/// When new_operation_id() made `operation_id` (Unix ms); 0 when it was not
/// made by it (older ids, external publishers' ids, garbage).
int64_t operation_created_ms(std::string_view operation_id);

} // namespace prov
