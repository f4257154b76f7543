#pragma once
// The attestation extension point. A mechanism checks one kind of device
// credential (messages/credential.hpp) against the enrollment that names the
// device and against the enrollment groups; the engine's attest() (attestation_actor.cpp)
// owns what every mechanism shares: DPS precedence (the individual enrollment
// first, then groups), the store read, the cache of accepted credentials.
// Mechanisms are pure: no actors, no I/O of their own. docs/extending.md
// shows what a new one takes.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "actors/enrollment/enrollment_model.hpp"
#include "messages/credential.hpp"
#include "messages/dps_types.hpp"
#include "messages/error.hpp"

namespace prov::attestation {

/// What attestation decided. Stored with an accepted operation, so resuming
/// it after a restart never needs the device's credential again.
struct verdict {
  enum class outcome : uint8_t {
    accepted,
    rejected,  ///< `err` says why
    challenge, ///< the device must answer `challenge` first (a 401 carrying it)
  };
  outcome result = outcome::accepted;
  error err; ///< rejected, and the 401 that carries a challenge
  attestation_type type = attestation_type::none;
  std::string enrollment_group_id; ///< "" for individual enrollments
  bool enabled = true;             ///< the admitting entry's provisioningStatus
  std::string challenge;           ///< challenge: JSON the device needs to answer
  /// Accepted X.509: `{"certificateInfo":{..},"signingCertificateInfo":{..}}`
  /// (compact JSON, the second only for groups), what DPS returns in
  /// registrationState.x509 besides enrollmentGroupId; "" otherwise.
  std::string x509_json;

  static verdict rejected(error_code code, std::string message) {
    verdict v;
    v.result = outcome::rejected;
    v.err = error{code, std::move(message)};
    return v;
  }
  static verdict accepted(attestation_type t, bool enabled, std::string group_id = {}) {
    verdict v;
    v.type = t;
    v.enabled = enabled;
    v.enrollment_group_id = std::move(group_id);
    return v;
  }
  bool is_accepted() const noexcept { return result == outcome::accepted; }
};

/// The facts of a request a credential is checked against.
struct request_facts {
  std::string_view id_scope;
  std::string_view registration_id;
  int64_t now_s = 0; ///< seconds since the epoch
  /// A register (it may consume a one-time answer, TPM's); false for polls
  /// and status lookups.
  bool registering = true;
};

/// One request's credential, opened (parsed, checked on its own) by its
/// mechanism. Checked against at most one individual enrollment, then the
/// groups.
class proof {
public:
  virtual ~proof() = default;
  /// The verdict of the individual enrollment for the registration id, whose
  /// attestation is this mechanism's (the caller checked its type).
  virtual verdict check_individual(const enrollment::enrollment_view& v) const = 0;
  /// The verdict of the groups (of every type: skip the others), when no
  /// individual enrollment names the device.
  virtual verdict check_groups(const std::vector<enrollment::enrollment_view>& groups) const = 0;
  /// What identifies the credential exactly, for the cache of accepted ones
  /// (a different signature must never match); "" to never cache.
  virtual std::string_view identity() const noexcept = 0;
  /// Until when (seconds since the epoch) an accepted verdict stays valid.
  virtual int64_t valid_until() const noexcept = 0;
};

class mechanism {
public:
  virtual ~mechanism() = default;
  virtual attestation_type type() const noexcept = 0;
  /// Whether `c` is this mechanism's kind of credential.
  virtual bool reads(const device_credential& c) const noexcept = 0;
  /// Checks the credential on its own (form, expiry, the resource it names).
  /// A rejection is the request's answer.
  [[nodiscard]] virtual error open(const device_credential& c, const request_facts& facts,
                                   std::unique_ptr<proof>& out) const = 0;
};

/// The mechanisms of an engine, one per credential kind; built once at start.
class registry {
public:
  void add(std::unique_ptr<mechanism> m);
  /// The mechanism that reads `c`; null when none does.
  const mechanism* reading(const device_credential& c) const noexcept;
  /// The mechanism of attestation type `t`; null when none.
  const mechanism* of_type(attestation_type t) const noexcept;
  /// The attestation type a request tried, for metrics: its mechanism's, or
  /// "none" when nothing was presented or no mechanism reads it.
  attestation_type attempted(const device_credential& c) const noexcept;

private:
  std::vector<std::unique_ptr<mechanism>> mechanisms_;
};

} // namespace prov::attestation
