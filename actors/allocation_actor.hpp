#pragma once
// The allocation stage (allocation_actor.cpp says what it does): its typed
// handle, what it depends on and its actor class. Included by engine.cpp and
// the tests; pulls in CAF.

#include <memory>
#include <string>

#include "actors/actor_types.hpp"

namespace prov {

/// One input while its policy decides (allocation_actor.cpp).
struct allocation_job;

/// What allocation reads, and where its outputs go; nothing else of the
/// engine. Built in engine.cpp. Everything referred to outlives the actor
/// (the engine stops its actor system first).
struct allocation_deps {
  const enrollment_catalog& catalog; ///< group snapshot, parsed views, generations
  storage::store* store;             ///< enrollments and registration records (reads)
  const allocation::hub_set& hubs;   ///< the linked hubs and their health
  const allocation::registry& policies;
  stage_sink* sink;
  metrics::instruments* metrics;
};

/// A wrong message to allocation is a compile error.
using allocation_actor_type = caf::typed_actor<
  // registration.attested (from the bus, or fused with attestation)
  caf::reacts_to<event_atom, registration_event, event_ack>,
  // a policy's answer that came after allocate() returned
  caf::reacts_to<allocated_atom, std::shared_ptr<allocation_job>>,
  // a policy's deadline, with the reason the job fails
  caf::reacts_to<expire_atom, std::shared_ptr<allocation_job>, std::string>>;

/// The stage. A class rather than `stateful_actor<allocation_state>`: CAF
/// 0.17.6 builds a state with no arguments (or only `self`), and the
/// dependencies are references given at spawn
/// (`spawn<allocation_actor, caf::detached>(deps)`).
class allocation_actor final : public allocation_actor_type::base {
public:
  // -- construction -----------------------------------------------------------

  allocation_actor(caf::actor_config& cfg, allocation_deps deps);

  const char* name() const override { return "allocation"; }

  behavior_type make_behavior() override;

  // -- message handlers -------------------------------------------------------

  /// registration.attested: runs the enrollment's policy.
  void on_attested(registration_event& ev, event_ack& ack);
  /// A policy answered later (from another thread, through the mailbox).
  void on_answered(const std::shared_ptr<allocation_job>& job);
  /// A policy's deadline passed: fails the job unless it answered first.
  void on_deadline(const std::shared_ptr<allocation_job>& job, std::string& why);

private:
  // -- member variables -------------------------------------------------------

  const allocation_deps deps_;
  stage_output_ptr out_; ///< this stage's name and retry, for the sink
};

} // namespace prov

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::shared_ptr<prov::allocation_job>)
