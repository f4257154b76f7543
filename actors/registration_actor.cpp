// Registration stage: the intake. Takes requests the engine has already
// attested (attest() runs on the gateway thread: see engine.cpp), dedupes
// concurrent registers of one device, records the operation durably (group
// commit, synced WAL) and only then answers 202. Afterwards it hands the
// attested event to allocation and settles terminal failures.
//
// With device_api.register_wait_ms > 0 the accept is deferred: the register
// waits for its outcome, whose terminal commit records the operation
// (Kafka: the registration.completed reader), so a device answered 200 costs
// one synced commit, not two. The accept is recorded only when a 202 must go
// out first (deferred_accept).
//
// Accepts:
//   (register_atom, register_request, attestation::verdict, register_reply_fn)
//   (accepted_atom, registration_event)                   resume after restart
//   (committed_atom, operation id, error)                 from the store writer
//   (recorded_atom, operation id, error)                  a deferred accept recorded
//   (event_atom, registration_event)                      registration.completed
//   (handedoff_atom, operation id)          Kafka acknowledged registration.attested
//   (resend_atom)                           Kafka: hand off again what has no outcome
//   (waittick_atom)                         register waits past their deadline
//   (drain_atom) -> count                   shutting down: answer every parked register
// Emits:   registration.attested through the stage sink (always the bus).
// Blocking: point reads for terminal failures; spawned detached.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <optional>
#include <unordered_map>
#include <vector>

#include "actors/registration_actor.hpp"

namespace prov {

namespace {

struct pending_accept {
  registration_event event;
  register_reply_fn reply;
  std::chrono::steady_clock::time_point commit_started;
};

struct handed_off {
  registration_event event;
  /// When Kafka acknowledged the last hand-off; unset while it is in flight
  /// (the producer and the 1 s publish retry own it then).
  std::optional<std::chrono::steady_clock::time_point> acked_at;
  int resends = 0;
};

/// A register whose accept is deferred (registration_event::
/// unrecorded): nothing is written until the terminal commit, unless a 202
/// must go out first (its wait expired, the device sent its PUT again, a
/// drain). Then the accept is recorded as its `pending` entry, which holds
/// the whole operation record: a late accept must not overwrite an operation
/// record that the terminal commit may have written already. Such a `pending`
/// entry can outlive the operation; the entry is deleted when the outcome
/// arrives here, and resume() drops entries whose operation is terminal.
struct deferred_accept {
  registration_event event;
  enum class phase { unrecorded, recording, recorded } ph = phase::unrecorded;
  /// Answers (202s) that wait for the accept record.
  std::vector<register_reply_fn> after_record;
  std::chrono::steady_clock::time_point record_started;
  bool finished = false; ///< the outcome arrived while recording
};


/// A committed outcome, shared by the event and the answers built from it.
using outcome_ptr = std::shared_ptr<const registration_state>;

register_reply make_reply(error err) {
  register_reply r;
  r.err = std::move(err);
  return r;
}

} // namespace

/// The stage's bookkeeping, keyed by device and by operation.
struct registration_tables {
  /// lower(registration id) -> operation id of the unfinished operation.
  std::unordered_map<std::string, std::string> inflight;
  /// operation id -> accept waiting for its durable commit.
  std::unordered_map<std::string, pending_accept> accepting;
  /// operation ids whose terminal failure is being committed.
  std::unordered_map<std::string, registration_event> settling;
  /// Kafka: operations handed to registration.attested and still without an
  /// outcome. The end-to-end backstop: whatever loses an event between the
  /// stages (a broker that acknowledged a write it then lost, a worker's
  /// in-memory retry gone with the worker), the operation is handed off
  /// again; the stages are idempotent per operation id.
  std::unordered_map<std::string, handed_off> handed;
  /// operation id -> a register answer held back until the outcome arrives
  /// (device_api.register_wait_ms), so the device needs no poll.
  std::unordered_map<std::string, register_reply_fn> waiting;
  /// (deadline, operation id), oldest first: every wait is equally long.
  /// Entries of operations answered early are skipped when they surface.
  std::deque<std::pair<std::chrono::steady_clock::time_point, std::string>> deadlines;
  /// operation id -> an accept not (yet) recorded; see deferred_accept.
  std::unordered_map<std::string, deferred_accept> deferred;
  /// drain_atom's answer, held until every accept it started is recorded.
  std::optional<caf::typed_response_promise<std::size_t>> drain_rp;
  std::size_t drained = 0;
  bool tick_armed = false;
  bool draining = false; ///< shutting down: nothing is parked any more
};

// -- registration_actor ---------------------------------------------------------

registration_actor::registration_actor(caf::actor_config& cfg, registration_deps deps)
  : registration_actor_type::base(cfg), deps_(std::move(deps)),
    st_(std::make_shared<registration_tables>()) {}

registration_actor::~registration_actor() = default;

registration_actor::behavior_type registration_actor::make_behavior() {
  resend_after_ = deps_.sink->traits().resend_after;
  // Until the bus has an accepted operation, only this process's `pending`
  // marker knows it: a failed hand-off is retried in 1 s (through the resume
  // path) instead of waiting for a restart. A weak handle: the producer may
  // hold the callback until its message timeout.
  auto output = std::make_shared<stage_output>();
  output->stage = "registration";
  output->retry = [weak = caf::weak_actor_ptr{ctrl()}](registration_event ev,
                                                        stage_output::ack_fn, const error&) {
    if (auto strong = weak.lock())
      caf::delayed_anon_send(caf::actor_cast<registration_actor_type>(strong),
                             std::chrono::seconds(1), accepted_atom::value, std::move(ev));
  };
  output_ = std::move(output);
  register_wait_ = deps_.register_wait;
  // Kafka mode too: the gateway's accept commit (an fsync per batch, before
  // the hand-off) protected nothing a device could rely on, since nobody
  // knows the operation id before the answer; a lost accept is a device
  // that registers again, as after any unanswered PUT.
  defer_accept_ = register_wait_.count() > 0;
  // An actor that stops with held answers (drain() was skipped) still
  // answers them; a deferred accept can no longer be recorded, so those
  // devices learn to register again.
  attach_functor([st = st_] {
    for (auto& [op_id, reply] : st->waiting) {
      auto d = st->deferred.find(op_id);
      if (d != st->deferred.end() && d->second.ph != deferred_accept::phase::recorded) {
        reply.fn(make_reply({error_code::unavailable, "provisiond is shutting down"}));
      } else {
        register_reply rr;
        rr.operation_id = op_id;
        reply.fn(std::move(rr));
      }
    }
    for (auto& [op_id, d] : st->deferred)
      for (auto& reply : d.after_record)
        reply.fn(make_reply({error_code::unavailable, "provisiond is shutting down"}));
    st->waiting.clear();
    st->deferred.clear();
  });
  if (resend_after_.count() > 0)
    delayed_send(this, std::chrono::seconds(1), resend_atom::value);
  return {
    [this](drain_atom) { return on_drain(); },
    [this](recorded_atom, const std::string& op_id, const error& e) { on_recorded(op_id, e); },
    [this](waittick_atom) { on_waittick(); },
    [this](handedoff_atom, const std::string& op_id) { on_handed_off(op_id); },
    [this](resend_atom) { on_resend(); },
    [this](register_atom, register_request& req, attestation::verdict& r,
           register_reply_fn& reply) { on_register(req, r, reply); },
    [this](committed_atom, const std::string& op_id, const error& e) { on_committed(op_id, e); },
    [this](accepted_atom, registration_event& ev) { on_resumed(ev); },
    [this](event_atom, registration_event& ev) { on_completed(ev); },
  };
}

// -- message handlers -------------------------------------------------------------

caf::result<std::size_t> registration_actor::on_drain() {
  st_->draining = true;
  st_->drained = answer_all_waiting();
  st_->drain_rp = make_response_promise<std::size_t>();
  auto rp = *st_->drain_rp;
  maybe_answer_drain();
  return rp;
}

void registration_actor::on_recorded(const std::string& op_id, const error& e) {
  auto it = st_->deferred.find(op_id);
  if (it == st_->deferred.end())
    return;
  auto& d = it->second;
  deps_.metrics->stage_dequeued(metrics::stage::commit);
  deps_.metrics->stage_latency(metrics::stage::commit, seconds_since(d.record_started));
  auto replies = std::move(d.after_record);
  d.after_record.clear();
  if (e) {
    d.ph = deferred_accept::phase::unrecorded; // a later 202 tries again
    for (auto& reply : replies)
      reply.fn(make_reply({error_code::storage_failure,
                           "could not record the registration: " + e.message}));
  } else {
    d.ph = deferred_accept::phase::recorded;
    for (auto& reply : replies)
      answer(op_id, std::move(reply));
  }
  if (d.finished) {
    if (!e)
      drop_late_record(op_id);
    st_->deferred.erase(it);
  }
  maybe_answer_drain();
}

void registration_actor::on_waittick() {
  st_->tick_armed = false;
  auto now = std::chrono::steady_clock::now();
  while (!st_->deadlines.empty() && st_->deadlines.front().first <= now) {
    auto op_id = std::move(st_->deadlines.front().second);
    st_->deadlines.pop_front();
    answer_waiter(op_id); // no outcome yet: 202, the device polls
  }
  arm_tick();
}

void registration_actor::on_handed_off(const std::string& op_id) {
  if (auto it = st_->handed.find(op_id); it != st_->handed.end())
    it->second.acked_at = std::chrono::steady_clock::now();
}

void registration_actor::on_resend() {
  // Each further resend waits twice as long (up to 32x): a pipeline that
  // is down for minutes is not flooded with copies.
  auto now = std::chrono::steady_clock::now();
  std::vector<registration_event> due;
  for (auto& [id, h] : st_->handed)
    if (h.acked_at && now - *h.acked_at >= resend_after_ * (1 << std::min(h.resends, 5))) {
      ++h.resends;
      due.push_back(h.event);
    }
  deps_.kafka_stats->resends.fetch_add(due.size());
  for (auto& ev : due) {
    std::fprintf(stderr,
                 "provisiond: operation %s still has no outcome after Kafka acknowledged "
                 "it; handing it off again\n",
                 ev.operation_id.c_str());
    publish_attested(std::move(ev));
  }
  delayed_send(this, std::chrono::seconds(1), resend_atom::value);
}

void registration_actor::on_register(register_request& req, attestation::verdict& r,
                                     register_reply_fn& reply) {
  auto* m = deps_.metrics;
  // Attestation already ran (on the gateway thread); count it whatever
  // happens next.
  m->attestation_attempt(
    !r.err, to_string(r.err ? deps_.mechanisms.attempted(req.credential) : r.type),
    req.protocol);
  if (!deps_.accepting.load()) {
    m->throttled("shutting_down");
    m->registration_attempt("rejected", "", req.protocol);
    reply.fn(make_reply({error_code::unavailable, "provisiond is shutting down"}));
    return;
  }
  if (static_cast<std::size_t>(deps_.inflight.load()) >= deps_.max_inflight) {
    m->throttled("inflight_limit");
    m->registration_attempt("rejected", "", req.protocol);
    reply.fn(make_reply({error_code::throttled,
                         "too many registrations in flight; retry after the "
                         "Retry-After interval"}));
    return;
  }
  if (r.err) {
    m->registration_attempt("rejected", "", req.protocol);
    reply.fn(make_reply(std::move(r.err)));
    return;
  }
  auto reg_key = enrollment::key_of(req.registration_id);
  if (auto it = st_->inflight.find(reg_key); it != st_->inflight.end()) {
    // Same device registering again while its operation runs: one
    // operation, not two (DPS devices retry the PUT on timeouts).
    if (st_->deferred.count(it->second)) {
      answer(it->second, std::move(reply));
      return;
    }
    register_reply rr;
    rr.operation_id = it->second;
    reply.fn(std::move(rr));
    return;
  }
  registration_event ev;
  ev.operation_id = new_operation_id(deps_.instance_hex);
  ev.registration_id = req.registration_id;
  ev.id_scope = req.id_scope;
  ev.api_version = req.api_version;
  ev.protocol = req.protocol;
  ev.accepted_ms = now_ms();
  ev.attested_ms = ev.accepted_ms;
  ev.attestation_type = to_string(r.type);
  ev.enrollment_group_id = r.enrollment_group_id;
  ev.x509_json = r.x509_json;
  ev.key_used = r.key_used;
  ev.payload_json = req.payload_json;
  ev.csr = req.csr;
  ev.client_ip = req.client_ip;
  if (r.enabled && defer_accept_ && !st_->draining) {
    // Nobody learns the operation id before the outcome (or the 202 of
    // an expired wait, which records the accept first), so the accept
    // need not be durable: the terminal commit records the operation.
    ev.unrecorded = true;
    st_->inflight.emplace(reg_key, ev.operation_id);
    deps_.inflight.fetch_add(1);
    auto op_id = ev.operation_id;
    st_->deferred[op_id].event = ev;
    st_->waiting.emplace(op_id, std::move(reply));
    st_->deadlines.emplace_back(std::chrono::steady_clock::now() + register_wait_, op_id);
    arm_tick();
    publish_attested(std::move(ev));
    return;
  }
  operation_record op;
  op.operation_id = ev.operation_id;
  op.registration_id = ev.registration_id;
  storage::write_batch batch;
  if (r.enabled) {
    op.status = registration_status::assigning;
    batch.put(storage::cf::pending, ev.operation_id, "");
  } else {
    // Disabled enrollment: terminal at once, reported by the poll.
    configuration::mark_disabled(ev);
    op.status = ev.status;
    op.state = configuration::state_from_completed(ev);
  }
  op.event = ev;
  batch.put(storage::cf::operations, ev.operation_id, encode_record(op));
  if (r.enabled) {
    st_->inflight.emplace(reg_key, ev.operation_id);
    deps_.inflight.fetch_add(1);
  }
  auto op_id = ev.operation_id;
  st_->accepting.emplace(op_id, pending_accept{std::move(ev), std::move(reply),
                                               std::chrono::steady_clock::now()});
  m->stage_enqueued(metrics::stage::commit);
  auto me = caf::actor_cast<registration_actor_type>(this);
  deps_.commit(std::move(batch), [me, op_id](const error& e) {
    caf::anon_send(me, committed_atom::value, op_id, e);
  });
}

void registration_actor::on_committed(const std::string& op_id, const error& e) {
  if (auto it = st_->accepting.find(op_id); it != st_->accepting.end()) {
    auto pa = std::move(it->second);
    st_->accepting.erase(it);
    auto* m = deps_.metrics;
    m->stage_dequeued(metrics::stage::commit);
    m->stage_latency(metrics::stage::commit, seconds_since(pa.commit_started));
    auto reg_key = enrollment::key_of(pa.event.registration_id);
    if (e) {
      m->registration_attempt("rejected", "", pa.event.protocol);
      finish(reg_key, op_id);
      pa.reply.fn(make_reply({error_code::storage_failure,
                              "could not record the registration: " + e.message}));
      return;
    }
    if (pa.event.status == registration_status::assigning && register_wait_.count() > 0
        && !st_->draining) {
      st_->waiting.emplace(op_id, std::move(pa.reply));
      st_->deadlines.emplace_back(std::chrono::steady_clock::now() + register_wait_, op_id);
      arm_tick();
    } else {
      register_reply rr;
      rr.operation_id = op_id;
      pa.reply.fn(std::move(rr));
    }
    if (pa.event.status == registration_status::disabled) {
      m->registration_attempt("disabled", "", pa.event.protocol);
      m->operation_finished("disabled", 0.0);
    }
    if (pa.event.status == registration_status::assigning)
      publish_attested(std::move(pa.event));
    return;
  }
  if (auto it = st_->settling.find(op_id); it != st_->settling.end()) {
    auto ev = std::move(it->second);
    st_->settling.erase(it);
    finish(enrollment::key_of(ev.registration_id), op_id);
    if (!e) {
      deps_.metrics->registration_attempt("failed", "", ev.protocol);
      deps_.metrics->operation_finished(
        "failed", static_cast<double>(now_ms() - ev.accepted_ms) / 1000.0);
    }
  }
}

void registration_actor::on_resumed(registration_event& ev) {
  // Resumed after a restart: accepted before the crash, not yet finished.
  auto reg_key = enrollment::key_of(ev.registration_id);
  if (st_->inflight.emplace(reg_key, ev.operation_id).second)
    deps_.inflight.fetch_add(1);
  publish_attested(std::move(ev));
}

void registration_actor::on_completed(registration_event& ev) {
  if (deps_.sink->traits().outcomes_recorded) {
    // Kafka: the completed reader has already recorded the outcome;
    // only the in-flight bookkeeping (and the failure metric, counted
    // by the gateway that accepted the operation) is left.
    if (finish(enrollment::key_of(ev.registration_id), ev.operation_id)
        && ev.status == registration_status::failed) {
      deps_.metrics->registration_attempt("failed", "", ev.protocol);
      deps_.metrics->operation_finished(
        "failed", static_cast<double>(now_ms() - ev.accepted_ms) / 1000.0);
    }
    return;
  }
  // registration.completed. Assigned results were committed by the
  // configuration stage; failures from earlier stages are settled here.
  if (ev.status != registration_status::failed) {
    finish(enrollment::key_of(ev.registration_id), ev.operation_id, ev.outcome);
    return;
  }
  if (st_->settling.count(ev.operation_id))
    return;
  std::optional<std::string> raw;
  operation_record op;
  // A deferred accept has no operation record before this one.
  bool no_record = ev.unrecorded || st_->deferred.count(ev.operation_id);
  if (auto err = deps_.store->get(storage::cf::operations, ev.operation_id, raw);
      err || (!raw && !no_record)
      || (raw && (decode_record(*raw, op) || is_terminal(op.status)))) {
    finish(enrollment::key_of(ev.registration_id), ev.operation_id);
    return;
  }
  op.operation_id = ev.operation_id;
  op.registration_id = ev.registration_id;
  op.status = registration_status::failed;
  op.state = configuration::state_from_completed(ev);
  op.state.updated_ms = now_ms();
  op.event = registration_event{}; // terminal: the state is all a poll needs
  storage::write_batch batch;
  batch.put(storage::cf::operations, ev.operation_id, encode_record(op));
  batch.del(storage::cf::pending, ev.operation_id);
  std::optional<std::string> existing;
  auto reg_key = enrollment::key_of(ev.registration_id);
  if (!deps_.store->get(storage::cf::registrations, reg_key, existing)
      && configuration::failure_replaces(existing))
    batch.put(storage::cf::registrations, reg_key, encode_record(op.state));
  auto op_id = ev.operation_id;
  st_->settling.emplace(op_id, std::move(ev));
  auto me = caf::actor_cast<registration_actor_type>(this);
  deps_.commit(std::move(batch), [me, op_id](const error& e) {
    caf::anon_send(me, committed_atom::value, op_id, e);
  });
}

// -- hand-off, answers and bookkeeping -----------------------------------------

void registration_actor::publish_attested(registration_event ev) {
  stage_output::ack_fn handed_off;
  if (resend_after_.count() > 0) {
    auto& h = st_->handed[ev.operation_id];
    h.event = ev;
    h.acked_at.reset();
    handed_off = [weak = caf::weak_actor_ptr{ctrl()}, op_id = ev.operation_id] {
      if (auto strong = weak.lock())
        caf::anon_send(caf::actor_cast<registration_actor_type>(strong), handedoff_atom::value,
                       op_id);
    };
  }
  deps_.sink->forward(output_, bus::topic::registration_attested, std::move(ev),
                      std::move(handed_off), stage_sink::route::bus);
}

bool registration_actor::read_outcome(const std::string& op_id, register_reply& rr) {
  std::optional<std::string> raw;
  operation_record op;
  if (!deps_.store->get(storage::cf::operations, op_id, raw) && raw
      && !decode_record(*raw, op)
      && (op.status == registration_status::assigned
          || op.status == registration_status::failed)) {
    rr.status = op.status;
    rr.state = std::make_shared<const registration_state>(std::move(op.state));
    return true;
  }
  return false;
}

void registration_actor::record_deferred(const std::string& op_id) {
  auto it = st_->deferred.find(op_id);
  if (it == st_->deferred.end() || it->second.ph != deferred_accept::phase::unrecorded)
    return;
  it->second.ph = deferred_accept::phase::recording;
  it->second.record_started = std::chrono::steady_clock::now();
  deps_.metrics->stage_enqueued(metrics::stage::commit);
  operation_record op;
  op.operation_id = op_id;
  op.registration_id = it->second.event.registration_id;
  op.status = registration_status::assigning;
  op.event = it->second.event;
  op.event.unrecorded = false;
  storage::write_batch batch;
  batch.put(storage::cf::pending, op_id, encode_record(op));
  auto me = caf::actor_cast<registration_actor_type>(this);
  deps_.commit(std::move(batch), [me, op_id](const error& e) {
    caf::anon_send(me, recorded_atom::value, op_id, e);
  });
}

void registration_actor::answer(const std::string& op_id, register_reply_fn reply,
                                 outcome_ptr known) {
  register_reply rr;
  rr.operation_id = op_id;
  if (known) {
    rr.status = known->status;
    rr.state = std::move(known);
    reply.fn(std::move(rr));
    return;
  }
  if (read_outcome(op_id, rr)) {
    reply.fn(std::move(rr));
    return;
  }
  if (auto it = st_->deferred.find(op_id);
      it != st_->deferred.end() && it->second.ph != deferred_accept::phase::recorded) {
    it->second.after_record.push_back(std::move(reply));
    record_deferred(op_id);
    return;
  }
  reply.fn(std::move(rr));
}

void registration_actor::answer_waiter(const std::string& op_id, outcome_ptr known) {
  auto it = st_->waiting.find(op_id);
  if (it == st_->waiting.end())
    return;
  auto reply = std::move(it->second);
  st_->waiting.erase(it);
  answer(op_id, std::move(reply), std::move(known));
}

void registration_actor::drop_late_record(const std::string& op_id) {
  register_reply rr;
  if (!read_outcome(op_id, rr))
    return; // abandoned without an outcome: resumed on the next start
  storage::write_batch batch;
  batch.del(storage::cf::pending, op_id);
  deps_.commit(std::move(batch), [](const error&) {});
}

bool registration_actor::finish(const std::string& reg_key, const std::string& op_id,
                                 outcome_ptr known) {
  answer_waiter(op_id, std::move(known));
  st_->handed.erase(op_id);
  if (auto d = st_->deferred.find(op_id); d != st_->deferred.end()) {
    if (d->second.ph == deferred_accept::phase::recording) {
      d->second.finished = true; // recorded_atom finishes it
    } else {
      if (d->second.ph == deferred_accept::phase::recorded)
        drop_late_record(op_id);
      st_->deferred.erase(d);
    }
  }
  auto it = st_->inflight.find(reg_key);
  if (it != st_->inflight.end() && it->second == op_id) {
    st_->inflight.erase(it);
    deps_.inflight.fetch_sub(1);
    return true;
  }
  return false;
}

void registration_actor::arm_tick() {
  while (!st_->deadlines.empty() && !st_->waiting.count(st_->deadlines.front().second))
    st_->deadlines.pop_front();
  if (st_->tick_armed || st_->deadlines.empty())
    return;
  st_->tick_armed = true;
  // Rounded up: a tick that fires early finds nothing due and re-arms.
  auto due = std::chrono::ceil<std::chrono::milliseconds>(
    st_->deadlines.front().first - std::chrono::steady_clock::now());
  delayed_send(this, std::max(due, std::chrono::milliseconds(1)), waittick_atom::value);
}

std::size_t registration_actor::answer_all_waiting() {
  auto n = st_->waiting.size();
  auto waiting = std::move(st_->waiting);
  st_->waiting.clear();
  st_->deadlines.clear();
  for (auto& [op_id, reply] : waiting)
    answer(op_id, std::move(reply));
  return n;
}

void registration_actor::maybe_answer_drain() {
  if (!st_->drain_rp)
    return;
  for (auto& [op_id, d] : st_->deferred)
    if (d.ph == deferred_accept::phase::recording && !d.after_record.empty())
      return;
  st_->drain_rp->deliver(st_->drained);
  st_->drain_rp.reset();
}

} // namespace prov
