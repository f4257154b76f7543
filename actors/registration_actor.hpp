#pragma once
// The registration stage (registration_actor.cpp says what it does): its
// typed handle, what it depends on and its actor class. Included by
// engine.cpp and the tests; pulls in CAF.

#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "actors/actor_types.hpp"

namespace prov {

/// The stage's bookkeeping of operations (registration_actor.cpp).
struct registration_tables;

/// What the intake reads and writes, and nothing else of the engine. Built
/// in engine.cpp (registration_deps_of). Everything referred to outlives the actor (the engine
/// stops its actor system first).
struct registration_deps {
  storage::store* store; ///< operation and registration records (reads)
  /// Every write goes through the engine's commit (engine_context::commit),
  /// so shutdown can wait for the commits in flight.
  std::function<void(storage::write_batch, storage::store::done_fn)> commit;
  const attestation::registry& mechanisms; ///< the attempted type, for metrics
  stage_sink* sink;
  metrics::instruments* metrics;
  kafka_counters* kafka_stats;       ///< resends
  std::atomic<int64_t>& inflight;    ///< accepted, unfinished operations (the engine's count)
  const std::atomic<bool>& accepting; ///< false while the engine drains
  std::size_t max_inflight;
  /// device_api.register_wait_ms: how long a register waits for its outcome.
  std::chrono::milliseconds register_wait;
  std::string instance_hex; ///< part of the operation ids it mints
};

/// The deps of an engine's intake, from its context (the engine and the
/// tests that run the stage over an engine_context).
inline registration_deps registration_deps_of(engine_context& ctx) {
  return {ctx.store,
          [c = &ctx](storage::write_batch b, storage::store::done_fn done) {
            c->commit(std::move(b), std::move(done));
          },
          ctx.mechanisms, ctx.sink.get(), ctx.metrics, ctx.kafka_stats.get(), ctx.inflight,
          ctx.accepting, ctx.opts.max_inflight,
          std::chrono::milliseconds(ctx.opts.cfg.device_api.register_wait_ms), ctx.instance_hex};
}

/// A wrong message to registration is a compile error.
using registration_actor_type = caf::typed_actor<
  // a register the engine attested (on the gateway thread)
  caf::reacts_to<register_atom, register_request, attestation::verdict, register_reply_fn>,
  // an unfinished operation resumed after a restart (or a failed hand-off, again)
  caf::reacts_to<accepted_atom, registration_event>,
  // registration.completed
  caf::reacts_to<event_atom, registration_event>,
  // from the store writer: an accept or a settled failure committed
  caf::reacts_to<committed_atom, std::string, error>,
  // a deferred accept recorded
  caf::reacts_to<recorded_atom, std::string, error>,
  // Kafka acknowledged a hand-off; hand off again what has no outcome
  caf::reacts_to<handedoff_atom, std::string>, caf::reacts_to<resend_atom>,
  // held registers past their deadline
  caf::reacts_to<waittick_atom>,
  // shutting down: answers every parked register, replies how many
  caf::replies_to<drain_atom>::with<std::size_t>>;

/// The intake. A class rather than `stateful_actor<registration_state>`:
/// CAF 0.17.6 builds a state with no arguments (or only `self`), and the
/// dependencies are references given at spawn
/// (`spawn<registration_actor, caf::detached>(deps)`).
class registration_actor final : public registration_actor_type::base {
public:
  using outcome_ptr = std::shared_ptr<const registration_state>;

  // -- construction -----------------------------------------------------------

  registration_actor(caf::actor_config& cfg, registration_deps deps);
  ~registration_actor() override;

  const char* name() const override { return "registration"; }

  behavior_type make_behavior() override;

  // -- message handlers -------------------------------------------------------

  void on_register(register_request& req, attestation::verdict& r, register_reply_fn& reply);
  void on_resumed(registration_event& ev);
  void on_completed(registration_event& ev);
  void on_committed(const std::string& op_id, const error& e);
  void on_recorded(const std::string& op_id, const error& e);
  void on_handed_off(const std::string& op_id);
  void on_resend();
  void on_waittick();
  caf::result<std::size_t> on_drain();

private:
  // -- hand-off, answers and bookkeeping --------------------------------------

  /// Hands an accepted operation to allocation, always through the bus (it
  /// starts the operation). With resends on, it is kept until its outcome
  /// and its hand-off acknowledged to this actor.
  void publish_attested(registration_event ev);
  /// Fills `rr` with the outcome when the operation record is terminal
  /// (assigned or failed); true then.
  bool read_outcome(const std::string& op_id, register_reply& rr);
  /// Records a deferred accept (its `pending` entry); recorded_atom follows.
  void record_deferred(const std::string& op_id);
  /// Answers a register for `op_id`: the outcome when it is recorded, else
  /// the classic 202 "assigning", but never before the accept is durable.
  void answer(const std::string& op_id, register_reply_fn reply, outcome_ptr known = nullptr);
  /// Answers a held register (see answer).
  void answer_waiter(const std::string& op_id, outcome_ptr known = nullptr);
  /// Deletes the `pending` entry of a deferred accept recorded late, once
  /// its outcome is durable (a terminal commit that came first left it).
  void drop_late_record(const std::string& op_id);
  /// The operation's outcome is recorded (or it was abandoned): a held
  /// register gets its answer. True when the operation was in flight here
  /// (and no longer is).
  /// `known`: the committed outcome, when the caller has it.
  bool finish(const std::string& reg_key, const std::string& op_id, outcome_ptr known = nullptr);
  /// Arms the one timer that answers expired waits: at most one tick per
  /// wait period while every outcome arrives in time.
  void arm_tick();
  /// Answers every held register: those with a recorded accept get the
  /// classic 202 now, deferred ones once their accept is recorded. Returns
  /// how many.
  std::size_t answer_all_waiting();
  /// drain_atom's answer waits for the accepts it had to record.
  void maybe_answer_drain();

  // -- member variables -------------------------------------------------------

  const registration_deps deps_;
  /// Shared with the functor that answers held registers when the actor
  /// stops without a drain.
  std::shared_ptr<registration_tables> st_;
  stage_output_ptr output_; ///< this stage's name and retry, for the sink
  std::chrono::seconds resend_after_{0}; ///< Kafka: hand off again after this (0: never)
  std::chrono::milliseconds register_wait_{0};
  bool defer_accept_ = false;
};

} // namespace prov
