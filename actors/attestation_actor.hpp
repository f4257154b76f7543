#pragma once
// The attestation stage (attestation_actor.cpp says what it does): what
// attest() and the stage depend on, the stage's typed handle and its actor
// class. Included by engine.cpp and the tests; pulls in CAF.

#include <string>

#include "actors/actor_types.hpp"

namespace prov {

/// What attest() reads, and nothing else of the engine. Built once in
/// engine.cpp; everything referred to outlives the engine's actors and its
/// gateway calls.
struct attestation_deps {
  const attestation::registry& mechanisms;
  const enrollment_catalog& catalog; ///< groups, accepted credentials, parsed views
  storage::store* store;             ///< individual enrollments, registration records (reads)
  metrics::instruments* metrics;     ///< null: TPM challenges are not counted
  std::string id_scope;              ///< this instance's; other scopes are refused
  std::string instance_hex;          ///< part of the operation ids the stage mints
  /// Where the stage's outputs go; chosen at start, unused by attest().
  stage_sink* sink = nullptr;
};

/// Verifies the credential of a register/poll request with its mechanism:
/// against the individual enrollment (first) or the enrollment groups.
/// Any thread. Read-only but for TPM challenges (issued, then consumed by
/// the register that answers them: `registering`; false for polls and
/// status lookups).
/// `tpm_deferred`, when given: a TPM register (a TPM credential, or a SAS for
/// a TPM enrollment) is not attested; *tpm_deferred is set and the verdict
/// is meaningless. The gateway's I/O threads pass it: a TPM register writes
/// its challenge (a store or Kafka write), and a TPM poll or status lookup
/// may wait for Kafka and makes RSA blobs, so they run on the engine's TPM
/// worker instead, and every other request stays on the fast path.
attestation::verdict attest(const attestation_deps& ctx, const register_request& req,
                            bool registering = true, bool* tpm_deferred = nullptr);

/// A wrong message to attestation is a compile error.
using attestation_actor_type = caf::typed_actor<
  // registration.requested (direct Kafka publishers, docs/events.md)
  caf::reacts_to<event_atom, registration_event, event_ack>>;

/// The stage for registration.requested. A class rather than
/// `stateful_actor<attestation_state>`: CAF 0.17.6 builds a state with no
/// arguments (or only `self`), and the dependencies are references given at
/// spawn (`spawn<attestation_actor, caf::detached>(deps)`).
class attestation_actor final : public attestation_actor_type::base {
public:
  // -- construction -----------------------------------------------------------

  attestation_actor(caf::actor_config& cfg, attestation_deps deps);

  const char* name() const override { return "attestation"; }

  behavior_type make_behavior() override;

  // -- message handlers -------------------------------------------------------

  /// registration.requested: attests it and forwards registration.attested,
  /// or registration.completed (failed or disabled).
  void on_requested(registration_event& in, event_ack& ack);

private:
  // -- member variables -------------------------------------------------------

  const attestation_deps deps_;
  stage_output_ptr out_; ///< this stage's name (no retry: Kafka redelivers)
};

} // namespace prov
