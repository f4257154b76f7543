// Configuration stage: the single writer of registration records.
//
// Embedded: commits, in one atomic batch, the registration record, the
// terminal operation, the removal from `pending` and the device.assigned
// event in the outbox, so an operation yields exactly one assignment event
// even across crashes. Acks after the commit.
//
// Kafka (any number of processes with this role): the shared state is the
// compacted dps.registrations topic, so whichever process owns a partition
// after a crash or rebalance sees what the previous owner recorded. Per
// operation, in order, each step only after the previous one is durable:
//   1. device.assigned
//   2. the assignment (registration record + assigned event) to
//      dps.registrations
//   3. registration.completed (so a gateway that reports "assigned" has the
//      record on its way too)
//   4. the input ack (the allocated offset is committed)
// The record therefore proves that device.assigned is in Kafka: a
// redelivered or resent event whose operation is already the registration's
// last assigned one (in the local table, or in this worker's memory of what
// it published) publishes no second device.assigned; it republishes only
// what steps 2 and 3 may lack. A copy of device.assigned remains possible only when
// a worker dies between steps 1 and 2 (or its record has not reached the
// new owner's table yet); the CloudEvent is rebuilt from the same fields,
// so a copy from the same allocated event is byte-identical and consumers
// dedupe on ce_id. The record itself is a function of the allocated event
// (time = allocation time, etag from the operation id), so two workers
// recording the same allocated event around a rebalance produce identical
// bytes. Fused with a local allocation stage (kafka.fuse_stages, the
// default) the allocated event is not in Kafka: a redelivered input is
// allocated again, with the same clock readings (the input records' Kafka
// timestamps), but a new decision if the enrollment or the hubs changed
// meanwhile (docs/kafka.md).
//
// Accepts: (event_atom, registration_event, event_ack) from registration.allocated,
//          or from the local allocation stage when fused
//          (committed_atom, operation id, error) from the store writer (embedded)
//          (recorded_atom, operation id, error)  step 1 (device.assigned) done (Kafka)
//          (relayed_atom, operation id, error)   step 2 or 3 done (Kafka)
// Blocking: point reads for idempotency; spawned detached.

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "actors/configuration_actor.hpp"
#include "actors/configuration/certificate_issuer.hpp"
#include "actors/configuration/cloud_event.hpp"
#include "actors/configuration/recent_outcomes.hpp"

namespace prov {

struct committing_t {
  registration_event event;
  event_ack ack;
  std::chrono::steady_clock::time_point started; ///< stage latency includes the commit
};

struct relay_t {
  registration_event event;
  registration_state state;
  std::vector<event_ack> acks; ///< the delivery's and any duplicates'
  std::chrono::steady_clock::time_point started;
  bool failed = false;
  bool record = true; ///< step 2 still to do (in flight while set); else step 3 is
};

struct configuration_state_t {
  uint64_t next_seq = 1;
  std::unordered_map<std::string, committing_t> committing; ///< embedded
  std::unordered_map<std::string, relay_t> relaying;        ///< Kafka
  /// Kafka: operations waiting for a retry after a failed publish. They
  /// stay counted in engine_context::relaying meanwhile, so a draining
  /// engine waits for them too.
  std::unordered_set<std::string> retrying;
  /// Kafka: the last 65,536 operations whose device.assigned this worker
  /// published (see recent_outcomes.hpp; docs/kafka.md names the number).
  configuration::recent_outcomes recent{65536};
};

namespace {

/// device.assigned as a Kafka record: structured-mode CloudEvent, keyed by
/// device id, with the attributes also as ce_* headers so consumers can
/// route without parsing (CloudEvents Kafka binding).
bus::stage_bus::raw_record assigned_record(configuration::ce_attributes attrs,
                                           std::string cloud_event) {
  bus::stage_bus::raw_record r;
  r.key = attrs.subject;
  r.headers = {{"content-type", "application/cloudevents+json; charset=UTF-8"},
               {"ce_specversion", "1.0"},
               {"ce_type", "device.assigned"},
               {"ce_source", std::move(attrs.source)},
               {"ce_id", attrs.id},
               {"ce_subject", std::move(attrs.subject)},
               {"ce_time", std::move(attrs.time)},
               {"operation_id", std::move(attrs.id)}};
  r.value = std::move(cloud_event);
  return r;
}

/// The registration record of a newly assigned operation.
registration_state assigned_state(const registration_event& ev, const registration_state* prev) {
  registration_state rs;
  rs.registration_id = ev.registration_id;
  rs.created_ms = prev && prev->created_ms ? prev->created_ms : ev.accepted_ms;
  rs.updated_ms = ev.completed_ms;
  rs.assigned_hub = ev.assigned_hub;
  rs.device_id = ev.device_id;
  rs.status = registration_status::assigned;
  rs.substatus = ev.substatus;
  rs.payload_json = ev.returned_payload_json;
  rs.allocation_json = ev.allocation_json;
  rs.etag = enrollment::new_etag();
  rs.attestation_type = ev.attestation_type;
  rs.enrollment_group_id = ev.enrollment_group_id;
  rs.x509_json = ev.x509_json;
  rs.issued_chain = ev.issued_chain;
  rs.key_used = ev.key_used;
  rs.last_operation_id = ev.operation_id;
  // Every hub it was on (records from before this list have the last one
  // only), so allocation can tell a move back to one of them.
  if (prev != nullptr) {
    rs.assigned_hubs = prev->assigned_hubs;
    if (prev->status == registration_status::assigned)
      add_assigned_hub(rs, prev->assigned_hub);
  }
  add_assigned_hub(rs, rs.assigned_hub);
  return rs;
}

void count_assigned(metrics::instruments& m, const registration_event& ev,
                    std::chrono::steady_clock::time_point started) {
  m.stage_latency(metrics::stage::configuration, seconds_since(started));
  m.device_assigned(ev.assigned_hub);
  m.registration_attempt("assigned", ev.assigned_hub, ev.protocol);
  // The wall time until now: on Kafka, completed_ms is the allocation's
  // pinned reading, not when the outcome was published. A direct request's
  // accepted time is its publisher's record timestamp: another clock.
  m.operation_finished("assigned",
                       static_cast<double>(std::max<int64_t>(0, now_ms() - ev.accepted_ms))
                         / 1000.0);
}

/// Posts `a, op_id, error` to the actor if it still exists. A weak handle:
/// the producer may hold the callback until its message timeout, and a
/// strong one would keep the detached actor (and engine shutdown) waiting.
template <class Atom>
std::function<void(const error&)> reply_to(kafka_configuration_actor* self, Atom a,
                                           std::string op_id) {
  caf::weak_actor_ptr weak{self->ctrl()};
  return [weak, a, op_id](const error& e) {
    if (auto strong = weak.lock())
      caf::anon_send(caf::actor_cast<kafka_configuration_actor_type>(strong), a, op_id, e);
  };
}

} // namespace

// -- configuration_actor (embedded) ---------------------------------------------

configuration_actor::configuration_actor(caf::actor_config& cfg, configuration_deps deps)
  : configuration_actor_type::base(cfg), deps_(std::move(deps)),
    st_(std::make_unique<configuration_state_t>()) {}

configuration_actor::~configuration_actor() = default;

configuration_actor::behavior_type configuration_actor::make_behavior() {
  auto out = std::make_shared<stage_output>();
  out->stage = "configuration";
  out_ = std::move(out);
  std::optional<std::string> last;
  if (!deps_.store->last_key(storage::cf::outbox, last) && last)
    st_->next_seq = storage::parse_seq_key(*last) + 1;
  return {
    [this](event_atom, registration_event& ev, event_ack& ack) { on_allocated(ev, ack); },
    [this](committed_atom, const std::string& op_id, const error& e) { on_committed(op_id, e); },
  };
}

void configuration_actor::on_allocated(registration_event& ev, event_ack& ack) {
  deps_.metrics->stage_dequeued(metrics::stage::configuration);
  auto started = std::chrono::steady_clock::now();
  if (st_->committing.count(ev.operation_id)) {
    ack(); // duplicate while the first commits
    return;
  }
  std::optional<std::string> raw;
  operation_record op;
  if (ev.unrecorded) {
    // A deferred accept: no record to read yet, and only this event
    // knows the operation (the committing check covers a duplicate).
    op.operation_id = ev.operation_id;
    op.registration_id = ev.registration_id;
  } else {
    if (auto err = deps_.store->get(storage::cf::operations, ev.operation_id, raw))
      return; // stays pending: resumed on the next start
    if (!raw || decode_record(*raw, op) || is_terminal(op.status)) {
      ack(); // unknown or already done
      return;
    }
  }
  auto reg_key = enrollment::key_of(ev.registration_id);
  registration_state read_prev;
  const registration_state* prev = nullptr;
  if (ev.prior && ev.prior->generation == deps_.catalog.registration_generation()) {
    prev = ev.prior->state.get(); // allocation's read, still current
  } else {
    raw.reset();
    if (!deps_.store->get(storage::cf::registrations, reg_key, raw) && raw
        && !decode_record(*raw, read_prev))
      prev = &read_prev;
  }
  if (auto err = configuration::issue_for(deps_.issuer, ev, now_ms())) {
    // A refused CSR fails the registration; the intake records it.
    configuration::mark_failed(ev, err, now_ms());
    deps_.sink->forward(out_, bus::topic::registration_completed, std::move(ev),
                        std::move(ack.fn));
    return;
  }
  ev.completed_ms = now_ms();
  ev.status = registration_status::assigned;
  auto rs = assigned_state(ev, prev);
  // `prev` may live in ev.prior: keep what the outbox needs of it.
  std::optional<registration_state> moved_from;
  if (configuration::moves_hub(prev, ev))
    moved_from = *prev;
  ev.prior.reset();
  op.status = registration_status::assigned;
  op.state = rs;
  // A terminal record needs only its state: the event was kept for resume,
  // and the outbox event carries the details. Half the bytes per device.
  op.event = registration_event{};
  storage::write_batch batch;
  // Moved to another hub: the old hub's device.deprovisioned comes first
  // in the outbox, in the same batch as the assignment.
  if (moved_from) {
    auto dseq = st_->next_seq++;
    batch.put(storage::cf::outbox, storage::seq_key(dseq),
              configuration::deprovision_event(ev, *moved_from, dseq));
  }
  auto seq = st_->next_seq++;
  batch.put(storage::cf::registrations, reg_key, encode_record(rs));
  batch.put(storage::cf::operations, ev.operation_id, encode_record(op));
  // A deferred accept has no `pending` entry, or one recorded for a 202
  // that the registration actor deletes once the outcome reaches it.
  if (!ev.unrecorded)
    batch.del(storage::cf::pending, ev.operation_id);
  batch.put(storage::cf::outbox, storage::seq_key(seq),
            configuration::assignment_event(ev, rs, seq));
  ev.outcome = std::make_shared<const registration_state>(std::move(rs));
  auto op_id = ev.operation_id;
  st_->committing.emplace(op_id, committing_t{std::move(ev), std::move(ack), started});
  auto me = caf::actor_cast<configuration_actor_type>(this);
  deps_.commit(std::move(batch), [me, op_id](const error& e) {
    caf::anon_send(me, committed_atom::value, op_id, e);
  });
}

void configuration_actor::on_committed(const std::string& op_id, const error& e) {
  auto it = st_->committing.find(op_id);
  if (it == st_->committing.end())
    return;
  auto ev = std::move(it->second.event);
  auto ack = std::move(it->second.ack);
  auto started = it->second.started;
  st_->committing.erase(it);
  if (e) {
    // Not durable: retry shortly; the operation stays in `pending`.
    ev.status = registration_status::assigning;
    deps_.metrics->stage_enqueued(metrics::stage::configuration);
    delayed_send(this, std::chrono::milliseconds(200), event_atom::value,
                 std::move(ev), std::move(ack));
    return;
  }
  count_assigned(*deps_.metrics, ev, started);
  ack(); // in-process: nothing to commit
  // Embedded, device.assigned is the outbox entry just committed (GET
  // /assignments) and is not published: nothing in process subscribes to
  // it. registration.completed is, for the intake.
  deps_.sink->forward(out_, bus::topic::registration_completed, std::move(ev));
}

// -- kafka_configuration_actor --------------------------------------------------

kafka_configuration_actor::kafka_configuration_actor(caf::actor_config& cfg,
                                                     configuration_deps deps)
  : kafka_configuration_actor_type::base(cfg), deps_(std::move(deps)),
    st_(std::make_unique<configuration_state_t>()) {}

kafka_configuration_actor::~kafka_configuration_actor() = default;

kafka_configuration_actor::behavior_type kafka_configuration_actor::make_behavior() {
  // A failed step 3 fails the relay, which tries the whole operation again
  // from its own copy (the relayed_atom handler): the id is all it needs, so
  // the sink keeps no copy of the event per publish.
  auto out = std::make_shared<stage_output>();
  out->stage = "configuration";
  out->retry_by_id = [weak = caf::weak_actor_ptr{ctrl()}](const std::string& op_id,
                                                          stage_output::ack_fn,
                                                          const error& why) {
    if (auto strong = weak.lock())
      caf::anon_send(caf::actor_cast<kafka_configuration_actor_type>(strong),
                     relayed_atom::value, op_id, why);
  };
  out_ = std::move(out);
  // Failed issuance (certificate_issuer.hpp): no retry of its own.
  auto failed = std::make_shared<stage_output>();
  failed->stage = "configuration";
  failed_out_ = std::move(failed);
  return {
    [this](event_atom, registration_event& ev, event_ack& ack) { on_allocated(ev, ack); },
    [this](recorded_atom, const std::string& op_id, const error& e) { on_recorded(op_id, e); },
    [this](relayed_atom, const std::string& op_id, const error& e) { on_relayed(op_id, e); },
  };
}

// Steps 2 (the record, unless the local table already has it) and 3
// (registration.completed), one after the other, each durable.
void kafka_configuration_actor::relay(relay_t& r) {
  const auto& ev = r.event;
  if (r.record) {
    operation_record update;
    update.operation_id = ev.operation_id;
    update.registration_id = ev.registration_id;
    update.status = registration_status::assigned;
    update.event = ev;
    update.event.payload_json.clear(); // not needed to rebuild the CloudEvent
    update.state = r.state;
    deps_.repl->publish_assignment(update,
                                   reply_to(this, relayed_atom::value, ev.operation_id));
    return;
  }
  deps_.sink->forward(out_, bus::topic::registration_completed, ev,
                      [done = reply_to(this, relayed_atom::value, ev.operation_id)] {
                        done(error{});
                      },
                      stage_sink::route::bus);
}

void kafka_configuration_actor::on_allocated(registration_event& ev, event_ack& ack) {
  deps_.metrics->stage_dequeued(metrics::stage::configuration);
  auto started = std::chrono::steady_clock::now();
  const bool counted = st_->retrying.erase(ev.operation_id) > 0; // a retry
  if (auto it = st_->relaying.find(ev.operation_id); it != st_->relaying.end()) {
    // Duplicate delivery while the first is in flight. After a rebalance
    // the first copy's ack is void (stale epoch) and only this one can
    // commit the offset, so it is released with the first's.
    it->second.acks.push_back(std::move(ack));
    if (counted)
      deps_.relaying.fetch_sub(1); // the one in flight is counted
    return;
  }
  auto reg_key = enrollment::key_of(ev.registration_id);
  std::optional<std::string> raw;
  if (auto err = deps_.store->get(storage::cf::registrations, reg_key, raw)) {
    if (counted)
      st_->retrying.insert(ev.operation_id);
    deps_.metrics->stage_enqueued(metrics::stage::configuration);
    delayed_send(this, std::chrono::milliseconds(500), event_atom::value,
                 std::move(ev), std::move(ack));
    return;
  }
  registration_state prev;
  bool had_prev = raw && !decode_record(*raw, prev);
  const bool in_table = had_prev && prev.last_operation_id == ev.operation_id
                        && prev.status == registration_status::assigned;
  // The table already holds a later operation of this registration: a
  // record of this one would overwrite it on the compacted topic.
  bool table_newer = false;
  if (const auto* published = st_->recent.find(ev.operation_id)) {
    table_newer = had_prev && !in_table && prev.updated_ms >= published->updated_ms;
    prev = *published; // published here; the table may not have the record yet
    had_prev = true;
  }
  if (!(had_prev && prev.last_operation_id == ev.operation_id
        && prev.status == registration_status::assigned))
    if (auto err = configuration::issue_for(deps_.issuer, ev, now_ms())) {
      // A refused CSR fails the registration: registration.completed
      // through Kafka (its reader records it), acked once durable; a
      // failed publish leaves the input to be delivered again.
      if (counted)
        deps_.relaying.fetch_sub(1);
      configuration::mark_failed(ev, err, ev.allocated_ms ? ev.allocated_ms : ev.accepted_ms);
      deps_.sink->forward(failed_out_, bus::topic::registration_completed, std::move(ev),
                          std::move(ack.fn), stage_sink::route::bus);
      return;
    }
  relay_t r;
  r.acks.push_back(std::move(ack));
  r.started = started;
  if (!counted)
    deps_.relaying.fetch_add(1);
  if (had_prev && prev.last_operation_id == ev.operation_id
      && prev.status == registration_status::assigned) {
    // device.assigned is already in Kafka (its record or this worker's
    // memory says so): step 2 again from what was recorded, and no
    // second device.assigned.
    ev.status = registration_status::assigned;
    ev.completed_ms = prev.updated_ms;
    // Recorded as the allocation time (see below); a redelivered
    // allocated event may come from a second allocation run.
    ev.allocated_ms = prev.updated_ms;
    ev.assigned_hub = prev.assigned_hub;
    ev.device_id = prev.device_id;
    ev.substatus = prev.substatus;
    ev.returned_payload_json = prev.payload_json;
    ev.allocation_json = prev.allocation_json;
    ev.issued_chain = prev.issued_chain; // the certificate issued then
    ev.csr.clear();
    r.event = std::move(ev);
    r.state = prev;
    // The record again only if nobody has it yet: not in the table, not
    // acknowledged to this worker, and no later operation recorded since.
    r.record = !in_table && !st_->recent.recorded(r.event.operation_id) && !table_newer;
    deps_.kafka_stats->assigned_not_republished.fetch_add(1);
    auto& slot = st_->relaying[r.event.operation_id] = std::move(r);
    relay(slot);
    return;
  }
  // Deterministic: if another worker handles this operation too (it got
  // the event after a rebalance before this one's record reached its
  // table), both publish the same bytes. The assignment was decided at
  // allocation.
  ev.completed_ms = ev.allocated_ms ? ev.allocated_ms : ev.accepted_ms;
  ev.status = registration_status::assigned;
  r.state = assigned_state(ev, had_prev ? &prev : nullptr);
  r.state.etag = enrollment::etag_for(ev.operation_id);
  const bool moved = configuration::moves_hub(had_prev ? &prev : nullptr, ev);
  r.event = std::move(ev);
  auto op_id = r.event.operation_id;
  auto& slot = st_->relaying.emplace(op_id, std::move(r)).first->second;
  auto recorded = reply_to(this, recorded_atom::value, op_id);
  if (moved) {
    // Moved off a hub: device.deprovisioned for the old one on the same
    // topic and key (so the same partition, before device.assigned);
    // step 1 is done when both are durable. A retry publishes both again
    // (same ids: consumers dedupe on ce_id).
    struct join_t {
      std::mutex mtx;
      int left = 2;
      error first;
    };
    auto join = std::make_shared<join_t>();
    recorded = [join, recorded = std::move(recorded)](const error& e) {
      std::unique_lock<std::mutex> lk(join->mtx);
      if (e && !join->first)
        join->first = e;
      if (--join->left > 0)
        return;
      error out = join->first;
      lk.unlock();
      recorded(out);
    };
    auto rec = assigned_record(configuration::deprovision_attributes_of(slot.event, prev),
                               configuration::deprovision_event(slot.event, prev, 0));
    rec.key = slot.event.device_id; // the partition of device.assigned
    for (auto& [name, value] : rec.headers)
      if (name == "ce_type")
        value = "device.deprovisioned";
      else if (name == "operation_id")
        value = op_id;
    deps_.bus->publish_raw_durable(bus::topic::device_assigned, std::move(rec), recorded);
  }
  deps_.bus->publish_raw_durable(
    bus::topic::device_assigned,
    assigned_record(configuration::attributes_of(slot.event),
                    configuration::assignment_event(slot.event, slot.state, 0)),
    std::move(recorded));
}

void kafka_configuration_actor::on_recorded(const std::string& op_id, const error& e) {
  // Step 1 (device.assigned) answered.
  auto it = st_->relaying.find(op_id);
  if (it == st_->relaying.end())
    return;
  if (e) {
    std::fprintf(stderr, "provisiond: publishing the assignment of %s failed "
                         "(retrying): %s\n",
                 op_id.c_str(), e.message.c_str());
    deps_.kafka_stats->publish_retries.fetch_add(1);
    it->second.failed = true;
    send(this, relayed_atom::value, op_id, error{});
    return;
  }
  st_->recent.remember(op_id, it->second.state);
  count_assigned(*deps_.metrics, it->second.event, it->second.started);
  relay(it->second);
}

void kafka_configuration_actor::on_relayed(const std::string& op_id, const error& e) {
  auto it = st_->relaying.find(op_id);
  if (it == st_->relaying.end())
    return;
  auto& r = it->second;
  if (e) {
    // Step 2's failure (publish_assignment); the sink logged and counted
    // step 3's.
    if (r.record) {
      std::fprintf(stderr, "provisiond: recording the outcome of %s failed "
                           "(retrying): %s\n",
                   op_id.c_str(), e.message.c_str());
      deps_.kafka_stats->publish_retries.fetch_add(1);
    }
    r.failed = true;
  }
  if (!r.failed && r.record) {
    st_->recent.mark_recorded(op_id);
    r.record = false; // step 2 done: step 3
    relay(r);
    return;
  }
  auto done = std::move(r);
  st_->relaying.erase(it);
  if (!done.failed) {
    deps_.relaying.fetch_sub(1);
    for (const auto& a : done.acks)
      a();
    return;
  }
  st_->retrying.insert(done.event.operation_id); // still counted
  // Try the whole operation again shortly; it is idempotent (a published
  // assignment is remembered and not published again). Duplicate acks
  // ride along as further deliveries.
  done.event.status = registration_status::assigning;
  for (auto& a : done.acks) {
    deps_.metrics->stage_enqueued(metrics::stage::configuration);
    delayed_send(this, std::chrono::seconds(1), event_atom::value, done.event,
                 std::move(a));
  }
}

} // namespace prov
