#pragma once
// The provisioning engine: spawns the stage actors, wires them over the bus,
// resumes unfinished operations, and offers the gateway an API that hides CAF.
// Writes go through actors (single writers); reads go straight to the store,
// which is safe from any thread.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "actors/enrollment/enrollment_model.hpp"
#include "config/config.hpp"
#include "messages/error.hpp"
#include "messages/registration.hpp"
#include "metrics/instruments.hpp"

namespace prov::storage {
class store;
}
namespace prov::allocation {
class policy;
}
namespace prov::attestation {
class challenge_store;
}

namespace prov {

struct engine_options {
  config::engine_config cfg;
  std::string id_scope;          ///< resolved (configured or generated)
  storage::store* store = nullptr; ///< owned by the caller, outlives the engine
  /// cfg.hubs is the quickstart's placeholder (hub.local), not the
  /// operator's: seeded like [[hubs]], but replaced by real [[hubs]] on a
  /// later start (actors/hub_store.hpp).
  bool placeholder_hubs = false;
  std::size_t max_inflight = 200000; ///< accepted, unfinished operations (503 beyond)
  /// Where stage metrics go; owned by the caller. Null = a private, unexported set.
  metrics::instruments* metrics = nullptr;
  /// Allocation policies of an embedding program, registered after the
  /// built-in ones (a policy of the same kind replaces the built-in one).
  std::vector<std::shared_ptr<const allocation::policy>> policies;
  /// Tests only (tests/testd): wraps the engine's TPM challenge store, so a
  /// test can hold a challenge write at a point of its choosing. Null: none.
  std::function<std::unique_ptr<attestation::challenge_store>(
    std::unique_ptr<attestation::challenge_store>)>
    wrap_challenges;
  /// Tests only (tests/testd): called with "issue" or "promote" inside the
  /// enrollment lock of a challenge write (after the etag check, before the
  /// write), so a test can show an enrollment write waits for it. Null: none.
  std::function<void(const char* call)> in_challenge_write;
  /// One line per certificate issued from a CSR (configuration role), for
  /// the diagnostic log. Null: not logged.
  std::function<void(std::string_view line)> on_certificate_issued;
  /// Tests only (tests/testd): called on the dps.enrollments reader's
  /// thread before it applies a batch, so a test can keep one gateway
  /// behind on that topic. Null: none.
  std::function<void()> before_enrollments_apply;
};

/// Result of a register call as the gateway needs it.
struct register_reply {
  error err;                 ///< set: reject with err (401, 404, 503, ...)
  /// With err: the answer's whole body instead of the error body (a TPM
  /// challenge's 401, actors/attestation/tpm.hpp).
  std::string challenge;
  std::string operation_id;
  /// assigning: answer 202 and let the device poll. assigned or failed: the
  /// outcome arrived within device_api.register_wait_ms; `state` holds it
  /// (shared with the event that carried it: never null then).
  registration_status status = registration_status::assigning;
  std::shared_ptr<const registration_state> state;
  /// A throttled (429) reply: seconds until the quota admits one more; 0 =
  /// the configured device_api.retry_after_seconds.
  int retry_after_s = 0;
};

/// The IoT Hub key of a TPM device's current assignment: what DPS gives the
/// hub identity it creates (docs/device-api.md#the-hub-key-of-a-tpm-device).
struct tpm_hub_key_info {
  std::string primary_key;  ///< base64 of the 32-byte key; "" when there is none now
  std::string operation_id; ///< the assignment it belongs to
  std::string assigned_hub;
  std::string device_id;
};

class engine {
public:
  using register_cb = std::function<void(register_reply)>;
  using done_cb = std::function<void(error)>;
  using doc_cb = std::function<void(error, std::string /*json*/)>;

  virtual ~engine() = default;

  /// Spawns the actors and resumes accepted, unfinished operations.
  [[nodiscard]] static error start(engine_options opts, std::unique_ptr<engine>& out);

  // -- device API ------------------------------------------------------------

  /// Verifies the credential, records the operation durably, then answers.
  /// `cb` runs on an engine thread.
  virtual void register_device(register_request req, register_cb cb) = 0;

  /// Checks a device credential for polls and status lookups (synchronous).
  [[nodiscard]] virtual error authenticate_device(const register_request& req) = 0;
  /// The same for a transport without TPM attestation (MQTT: DPS has
  /// none), on the caller's thread and never blocking on a TPM challenge
  /// read: a TPM credential, or any credential for a TPM-enrolled
  /// registration id, is refused (unauthorized) without reading challenges.
  [[nodiscard]] virtual error authenticate_device_without_tpm(const register_request& req) = 0;
  /// The same, for a caller on a thread that must not block (a gateway I/O
  /// thread): checked on the caller's thread and `cb` called there, except
  /// for a TPM device's (its challenge read may wait for Kafka, and its
  /// result's authenticationKey is RSA work): then checked on the engine's
  /// TPM worker, and `cb` runs there (or with throttled when its queue is
  /// full, unavailable when it stopped), so the caller's follow-up work for
  /// that device runs there too.
  virtual void authenticate_device(register_request req, done_cb cb) = 0;

  /// Reads an operation (synchronous). operation_not_found when unknown or
  /// belonging to another registration id.
  [[nodiscard]] virtual error operation(const std::string& registration_id,
                                        const std::string& operation_id,
                                        registration_state& out) = 0;

  /// Reads a registration record (synchronous).
  [[nodiscard]] virtual error registration(const std::string& registration_id,
                                           registration_state& out) = 0;

  /// The `registrationState.tpm.authenticationKey` of a TPM device assigned
  /// by `operation_id` (base64 activation blob of its IoT Hub key:
  /// actors/attestation/tpm.hpp). Synchronous; RSA work.
  [[nodiscard]] virtual error tpm_authentication_key(const std::string& registration_id,
                                                     const std::string& operation_id,
                                                     std::string& out) = 0;
  using key_cb = std::function<void(error, std::string /*authenticationKey*/)>;
  /// The same, made on the engine's TPM worker thread (`cb` runs there; on
  /// the caller's thread when the worker's queue is full, and with
  /// unavailable when it stopped): for
  /// a caller on a thread that must not do the store reads and RSA work,
  /// such as the registration stage's, which answers every register.
  virtual void tpm_authentication_key(std::string registration_id, std::string operation_id,
                                      key_cb cb) = 0;

  using hub_key_cb = std::function<void(error, tpm_hub_key_info)>;
  /// The hub key of the TPM device assigned by its registration record's
  /// last operation: the key that operation's `tpm.authenticationKey`
  /// wraps. primary_key "" (no error) when the id has no assigned TPM
  /// registration or no answered challenge. Made on the engine's TPM worker
  /// (the challenge read may wait for Kafka); `cb` runs there, or with
  /// throttled / unavailable when it is full / stopped.
  virtual void tpm_hub_key(std::string registration_id, hub_key_cb cb) = 0;

  // -- service API -------------------------------------------------------------

  virtual void put_enrollment(enrollment::kind k, std::string id, std::string body_json,
                              std::string if_match, doc_cb cb) = 0;
  virtual void delete_enrollment(enrollment::kind k, std::string id, std::string if_match,
                                 done_cb cb) = 0;
  /// Bulk operation body {enrollments|enrollmentGroups:[...], mode}; answers
  /// the BulkEnrollmentOperationResult JSON.
  virtual void bulk_enrollments(enrollment::kind k, std::string body_json, doc_cb cb) = 0;
  [[nodiscard]] virtual error get_enrollment(enrollment::kind k, const std::string& id,
                                             nlohmann::json& doc) = 0;
  /// One page of documents in id order. `continuation` = "" for the first
  /// page, else a `next` from an earlier page (invalid_header when it cannot
  /// be one); `next` = "" on the last page. query_registrations too.
  /// A document whose stored value does not open (sealed value tampered, key
  /// missing) or parse is left out of the page and named in `unreadable`
  /// ("<key>: <why>"), so one damaged value does not fail every query.
  [[nodiscard]] virtual error query_enrollments(enrollment::kind k,
                                                const std::string& continuation,
                                                std::size_t max_items,
                                                std::vector<nlohmann::json>& page,
                                                std::string& next,
                                                std::vector<std::string>& unreadable) = 0;
  virtual void delete_registration(std::string id, std::string if_match, done_cb cb) = 0;
  /// A stored registration record that does not decode cannot be matched to
  /// a group, so every group's query names it in `unreadable` ("<key>:
  /// <why>"), once per walk through the pages: on the page whose scan met it
  /// before the page was full, or the last page.
  [[nodiscard]] virtual error query_registrations(const std::string& group_id,
                                                  const std::string& continuation,
                                                  std::size_t max_items,
                                                  std::vector<registration_state>& page,
                                                  std::string& next,
                                                  std::vector<std::string>& unreadable) = 0;
  /// Assignment events with sequence > after, in order.
  [[nodiscard]] virtual error read_assignments(uint64_t after, std::size_t limit,
                                               std::vector<nlohmann::json>& events,
                                               uint64_t& next) = 0;

  // -- CA certificate store (actors/enrollment/ca_store.hpp) ---------------------

  /// A write to the CA store: op "put" (body: the upload), "code" (a new
  /// verification code), "verify" (body: {certificate}), "crl" (body:
  /// {crl}) or "delete". `cb`
  /// gets the stored documents' public JSON (VerificationCodeResponse for
  /// "code", CertificateResponse otherwise; "" for "delete").
  virtual void write_certificate(std::string op, std::string name, std::string body,
                                 std::string if_match, doc_cb cb) = 0;
  /// A stored CA document (certificate_not_found when absent).
  [[nodiscard]] virtual error get_certificate(const std::string& name, nlohmann::json& doc) = 0;
  /// Every stored CA document, in name order. A CA whose stored value does
  /// not open (sealed value tampered, key missing) or parse is left out and
  /// named in `unreadable` ("<name>: <why>"), so one damaged entry does not
  /// hide the others.
  [[nodiscard]] virtual error list_certificates(std::vector<nlohmann::json>& docs,
                                                std::vector<std::string>& unreadable) = 0;

  // -- linked hubs (actors/hub_store.hpp) -------------------------------------------

  /// Every linked hub (public JSON with live health), in host name order.
  [[nodiscard]] virtual error list_hubs(std::vector<nlohmann::json>& docs) = 0;
  /// One linked hub (linked_hub_not_found when absent).
  [[nodiscard]] virtual error get_hub(const std::string& hostname, nlohmann::json& doc) = 0;
  /// Adds or replaces a linked hub from a service API body; `cb` gets its
  /// public JSON. Allocation uses it as soon as `cb` runs.
  virtual void put_hub(std::string hostname, std::string body, doc_cb cb) = 0;
  /// Removes a linked hub (linked_hub_not_found when absent). Registrations
  /// already on it keep their records and answer polls as before.
  virtual void delete_hub(std::string hostname, done_cb cb) = 0;

  // -- operations ---------------------------------------------------------------

  virtual std::size_t inflight() const = 0;
  /// Stops intake (new registers get 503) and lets in-flight work settle,
  /// for up to 5 s; then every register still parked for its outcome is
  /// answered 202. Call it while the device API still runs, so those
  /// answers reach the devices. Idempotent.
  virtual void drain() = 0;
  /// drain(), then stops the actors.
  virtual void shutdown() = 0;
};

} // namespace prov
