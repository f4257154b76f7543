#pragma once
// TPM attestation (DPS, azure-dps-protocol.md §2.6). A device first registers
// without Authorization, sending its EK and SRK; when the EK is its individual
// enrollment's, it gets a challenge (a 401 carrying an activation blob): a
// fresh HMAC key that only the TPM holding that EK can import under that SRK.
// It then registers (and polls) with a SAS signed by that key. TPM is
// individual-only, as in DPS.
//
// The challenge's state is kept through a challenge_store (the engine's is
// the `tpm_challenges` column family): single-use for registers, bound to
// the registration id and the EK, and it expires. Two slots per
// registration id: the pending challenge (issued, not answered) and the
// answered one (what polls, status lookups and the result's key use). A
// register without Authorization replaces only the pending one: EKs are
// public, so anyone may ask for a challenge, but that must not take an
// assigned device's key away.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json_fwd.hpp>

#include "actors/attestation/mechanism.hpp"

namespace prov::attestation {

/// The `tpm` member of a device's register body (azure-dps-protocol.md
/// §2.6): its endorsementKey and storageRootKey strings into `out` (a null
/// or missing one stays empty; decoding and parsing are the mechanism's).
/// Errors (bad_request) name the member. Shared by the device API and the
/// tpm fuzz harness.
[[nodiscard]] error read_tpm_member(const nlohmann::json& tpm, tpm_credential& out);

/// One outstanding challenge of a registration id.
struct tpm_challenge {
  std::string ek_digest; ///< SHA-256 of the EK's TPM2B bytes it was made for
  std::string key;       ///< the HMAC key the TPM imports (32 bytes)
  std::string srk;       ///< the SRK's TPM2B_PUBLIC it was made for (for the result's blob)
  int64_t issued_s = 0;
  int64_t expires_s = 0;
  bool answered = false; ///< a register was accepted with it: no second one
};
std::string encode_challenge(const tpm_challenge& c);
bool decode_challenge(std::string_view bytes, tpm_challenge& out);

/// The key of the device's IoT Hub identity after a TPM registration:
/// HMAC-SHA256(challenge key, "provisiond iothub key\n" + operation id), so
/// every answer of one operation (register, polls, status lookups, on any
/// gateway) carries the same key, and a new registration a new one.
std::string hub_key(const tpm_challenge& c, std::string_view operation_id);
/// `registrationState.tpm.authenticationKey` of an assigned TPM device
/// (azure-dps-protocol.md §2.6, step 7): the hub key in a fresh activation
/// blob for `ek_tpm2b` and the challenge's SRK, base64. "" and `why` when the
/// keys cannot be used.
std::string result_authentication_key(const tpm_challenge& c, std::string_view ek_tpm2b,
                                      std::string_view operation_id, std::string& why);

/// The verdict of a `registration.requested` (a Kafka direct publisher's
/// request) for a TPM-enrolled registration id: refused (401002) without
/// reading or writing a challenge. Direct publishers have no TPM flow
/// (docs/events.md#tpm-devices-cannot-publish-directly): no challenge round
/// trip over Kafka, and a challenge write would block the attestation stage.
verdict tpm_refused_on_kafka(std::string_view registration_id);

/// The `tpm_challenges` keys of a registration id's two slots, from its
/// lower-cased id (enrollment::key_of): the answered challenge at the id's
/// key, the pending one at "<id>/pending" ('/' is never in an id). Both go
/// when the individual enrollment is deleted.
inline std::string tpm_answered_slot_key(std::string_view key) { return std::string(key); }
inline std::string tpm_pending_slot_key(std::string_view key) {
  return std::string(key) + "/pending";
}

/// A registration id's challenges.
struct tpm_slots {
  std::optional<tpm_challenge> pending;  ///< issued, not answered yet
  std::optional<tpm_challenge> answered; ///< the one a register was accepted with
  bool empty() const noexcept { return !pending && !answered; }
  /// Wipes the keys (call before the slots go out of scope).
  void cleanse() noexcept;
};

/// What a challenge write did. Challenges belong to one incarnation of an
/// individual enrollment: a write is made only while the enrollment is still
/// stored with the etag the request was checked against, so a delete (or a
/// replacement) that lands while a register is in flight cannot be followed
/// by that register's challenge or answer.
enum class challenge_write : uint8_t {
  written,
  challenge_changed,  ///< promote: the pending challenge is no longer the verified one
  enrollment_changed, ///< the enrollment was deleted or replaced since it was read
};

/// Where challenges live, keyed by registration id (the caller lower-cases
/// nothing: implementations key case-insensitively, as enrollments are).
class challenge_store {
public:
  virtual ~challenge_store() = default;
  [[nodiscard]] virtual error load(std::string_view registration_id, tpm_slots& out) const = 0;
  /// Stores a new pending challenge (the answered one stays), only while the
  /// individual enrollment is stored with `enrollment_etag`.
  [[nodiscard]] virtual error issue(std::string_view registration_id,
                                    std::string_view enrollment_etag, const tpm_challenge& c,
                                    challenge_write& out) const = 0;
  /// Compare-and-set: the pending challenge becomes the answered one (the
  /// previous answered one is dropped) only while it is still the one whose
  /// key is `verified_key` (compared in constant time) and the individual
  /// enrollment is still stored with `enrollment_etag`; else nothing
  /// changes. Atomic against this store's other writes and the individual
  /// enrollment writes of this process (Kafka: docs/device-api.md#tpm-attestation
  /// says what holds across gateways).
  [[nodiscard]] virtual error promote(std::string_view registration_id,
                                      std::string_view enrollment_etag,
                                      std::string_view verified_key,
                                      challenge_write& out) const = 0;
};

class tpm final : public mechanism {
public:
  /// `store` outlives the mechanism. `challenge_ttl_s`: how long a challenge
  /// may be answered (device_api.tpm_challenge_seconds); the SAS lifetime
  /// bounds are the symmetric key mechanism's.
  tpm(const challenge_store& store, int64_t challenge_ttl_s, int64_t max_lifetime_s,
      int64_t clock_skew_s)
    : store_(store), ttl_s_(challenge_ttl_s), max_lifetime_s_(max_lifetime_s),
      clock_skew_s_(clock_skew_s) {}

  attestation_type type() const noexcept override { return attestation_type::tpm; }
  bool reads(const device_credential& c) const noexcept override;
  error open(const device_credential& c, const request_facts& facts,
             std::unique_ptr<proof>& out) const override;

private:
  const challenge_store& store_;
  int64_t ttl_s_;
  int64_t max_lifetime_s_;
  int64_t clock_skew_s_;
};

} // namespace prov::attestation
