#pragma once
// The configuration stage (configuration_actor.cpp says what it does): its
// typed handles, what it depends on and its two actor classes, one per mode.
// Included by engine.cpp and the tests; pulls in CAF.

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "actors/actor_types.hpp"

namespace prov {

/// The stage's bookkeeping of operations (configuration_actor.cpp).
struct configuration_state_t;
/// Kafka: one operation between its first delivery and its ack.
struct relay_t;

/// What configuration reads and writes, and nothing else of the engine.
/// Built in engine.cpp (configuration_deps_of). Everything referred to
/// outlives the actor (the engine stops its actor system first).
struct configuration_deps {
  storage::store* store; ///< registration records (reads); embedded: operations, outbox
  /// Embedded: every write goes through the engine's commit
  /// (engine_context::commit), so shutdown can wait for the commits in flight.
  std::function<void(storage::write_batch, storage::store::done_fn)> commit;
  const enrollment_catalog& catalog; ///< embedded: is allocation's read still current
  stage_sink* sink;                  ///< registration.completed
  metrics::instruments* metrics;
  // -- Kafka only (null embedded) ---------------------------------------------
  bus::stage_bus* bus;  ///< device.assigned (and device.deprovisioned)
  replication* repl;    ///< the assignment to dps.registrations
  kafka_counters* kafka_stats; ///< publish retries, assignments not republished
  /// Operations between their first delivery and their ack (the engine's
  /// count: a draining engine waits for them).
  std::atomic<int64_t>& relaying;
  /// Certificates from a register's csr (configuration/certificate_issuer.hpp);
  /// null: no [[issuing_cas]], a csr then fails its registration.
  const configuration::certificate_issuer* issuer = nullptr;
};

/// The deps of an engine's configuration stage, from its context.
inline configuration_deps configuration_deps_of(engine_context& ctx) {
  return {ctx.store,
          [c = &ctx](storage::write_batch b, storage::store::done_fn done) {
            c->commit(std::move(b), std::move(done));
          },
          ctx.catalog,
          ctx.sink.get(),
          ctx.metrics,
          ctx.bus.get(),
          ctx.repl.get(),
          ctx.kafka_stats.get(),
          ctx.relaying,
          ctx.issuer.get()};
}

/// What both modes take: registration.allocated (from the bus, or fused with
/// allocation), with the input's ack. The engine holds this handle.
using configuration_input_type =
  caf::typed_actor<caf::reacts_to<event_atom, registration_event, event_ack>>;

/// Embedded. A wrong message to it is a compile error.
using configuration_actor_type = configuration_input_type::extend<
  // from the store writer: the assignment committed
  caf::reacts_to<committed_atom, std::string, error>>;

/// Kafka. A wrong message to it is a compile error.
using kafka_configuration_actor_type = configuration_input_type::extend<
  // step 1 (device.assigned) done
  caf::reacts_to<recorded_atom, std::string, error>,
  // step 2 or 3 done (or a failed step 3, through the sink's retry_by_id)
  caf::reacts_to<relayed_atom, std::string, error>>;

/// Embedded: commits each outcome to the store (one batch with the outbox).
/// A class rather than `stateful_actor<...>`: CAF 0.17.6 builds a state
/// with no arguments (or only `self`), and the dependencies are references
/// given at spawn (`spawn<configuration_actor, caf::detached>(deps)`).
class configuration_actor final : public configuration_actor_type::base {
public:
  // -- construction -----------------------------------------------------------

  configuration_actor(caf::actor_config& cfg, configuration_deps deps);
  ~configuration_actor() override;

  const char* name() const override { return "configuration"; }

  behavior_type make_behavior() override;

  // -- message handlers -------------------------------------------------------

  /// registration.allocated: records the assignment, in one batch.
  void on_allocated(registration_event& ev, event_ack& ack);
  /// The batch is durable (or not: tried again in 200 ms).
  void on_committed(const std::string& op_id, const error& e);

private:
  // -- member variables -------------------------------------------------------

  const configuration_deps deps_;
  std::unique_ptr<configuration_state_t> st_;
  stage_output_ptr out_; ///< this stage's name, for the sink
};

/// Kafka: relays each outcome through the topics (steps 1-4 in
/// configuration_actor.cpp). Spawned as
/// `spawn<kafka_configuration_actor, caf::detached>(deps)`.
class kafka_configuration_actor final : public kafka_configuration_actor_type::base {
public:
  // -- construction -----------------------------------------------------------

  kafka_configuration_actor(caf::actor_config& cfg, configuration_deps deps);
  ~kafka_configuration_actor() override;

  const char* name() const override { return "configuration"; }

  behavior_type make_behavior() override;

  // -- message handlers -------------------------------------------------------

  /// registration.allocated: step 1 (or, when already published, step 2 again).
  void on_allocated(registration_event& ev, event_ack& ack);
  /// Step 1 (device.assigned) answered.
  void on_recorded(const std::string& op_id, const error& e);
  /// Step 2 or 3 answered: the next step, the acks, or the whole operation
  /// again in 1 s.
  void on_relayed(const std::string& op_id, const error& e);

private:
  /// Steps 2 (the record, unless the local table already has it) and 3
  /// (registration.completed), one after the other, each durable.
  void relay(relay_t& r);

  // -- member variables -------------------------------------------------------

  const configuration_deps deps_;
  std::unique_ptr<configuration_state_t> st_;
  stage_output_ptr out_; ///< this stage's name and retry_by_id, for the sink
  stage_output_ptr failed_out_; ///< a refused csr's completion: no retry of its own
};

} // namespace prov
