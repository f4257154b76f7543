// Allocation stage: picks the hub with the enrollment's policy
// (actors/allocation/policy.hpp), the device id and the initial twin, and
// decides reprovisioning against the existing record.
//
// Accepts: (event_atom, registration_event, event_ack) from registration.attested;
//          (allocated_atom, allocation_job) a policy's answer that came later;
//          (expire_atom, allocation_job, reason) its deadline.
// Emits:   registration.allocated, or registration.completed (failed), through
//          the stage sink (actors/stage_sink.hpp).
// Acks:    when the emitted event is durable on the bus: this stage's effect
//          is that event (on Kafka: acks=all), so the input offset is committed
//          only then. A failed publish is retried in 1 s (the input is
//          allocated again), unacked meanwhile. Fused with a local
//          configuration stage (kafka.fuse_stages), the event goes to it in
//          process with this ack instead.
// Blocking: reads the enrollment and registration record; spawned detached.

#include <algorithm>
#include <atomic>


#include "actors/allocation_actor.hpp"
#include "messages/ascii.hpp"
#include "messages/json_text.hpp"

namespace prov {

namespace {

using ascii::iequals;

/// The enrollment's view, shared with the caches it comes from (groups are
/// in memory; attestation just parsed an individual one) instead of copied.
error load_view(const allocation_deps& ctx, const registration_event& ev,
                std::shared_ptr<const enrollment::enrollment_view>& out) {
  auto individual = ev.enrollment_group_id.empty();
  if (!individual) {
    // Groups are few and already in memory (attestation needs them all), so
    // the parsed view is taken from the cache instead of re-parsing JSON.
    auto groups = ctx.catalog.groups();
    auto key = enrollment::key_of(ev.enrollment_group_id);
    for (const auto& g : *groups)
      if (enrollment::key_of(g.id) == key) {
        out = std::shared_ptr<const enrollment::enrollment_view>(groups, &g);
        return {};
      }
    return {error_code::enrollment_group_not_found,
            "enrollment group '" + ev.enrollment_group_id
              + "' was deleted while the registration was in progress"};
  }
  // Attestation just parsed this enrollment; reuse it unless any enrollment
  // changed since.
  if ((out = ctx.catalog.views().lookup(enrollment::key_of(ev.registration_id),
                              ctx.catalog.generation())))
    return {};
  std::optional<std::string> raw;
  if (auto err = ctx.store->get(storage::cf::enrollments,
                                enrollment::key_of(ev.registration_id), raw))
    return err;
  if (!raw)
    return {error_code::enrollment_not_found,
            "individual enrollment '" + ev.registration_id
              + "' was deleted while the registration was in progress"};
  enrollment::enrollment_view v;
  if (auto err = enrollment::view_of_text(enrollment::kind::individual, *raw, v))
    return err;
  out = std::make_shared<const enrollment::enrollment_view>(std::move(v));
  return {};
}

/// Candidate hubs: the enrollment's iotHubs (restricted to linked hubs), else
/// every linked hub; from the set as it was when allocation began.
std::vector<const allocation::linked_hub*> candidates(const allocation::hub_set::snapshot& hubs,
                                                      const enrollment::enrollment_view& v) {
  std::vector<const allocation::linked_hub*> out;
  if (v.iot_hubs.empty()) {
    for (const auto& h : *hubs)
      out.push_back(&h);
    return out;
  }
  for (const auto& name : v.iot_hubs)
    for (const auto& h : *hubs)
      if (iequals(h.hostname, name))
        out.push_back(&h);
  return out;
}

/// Drops the hubs whose health probes say unhealthy (every policy skips
/// them). Error no_healthy_hub when hubs would take part in allocation but
/// none of those is healthy, naming each and why.
error healthy_candidates(const allocation_deps& ctx,
                         const std::vector<const allocation::linked_hub*>& all,
                         bool explicit_list, std::vector<allocation::candidate_hub>& out) {
  out.clear();
  bool any_takes_part = false, healthy_takes_part = false;
  std::string sick;
  for (const auto* h : all) {
    const bool takes_part = explicit_list || h->apply_allocation_policy;
    any_takes_part = any_takes_part || takes_part;
    if (ctx.hubs.eligible(*h)) {
      healthy_takes_part = healthy_takes_part || takes_part;
      out.push_back(h->candidate());
      continue;
    }
    if (!takes_part)
      continue;
    const auto why = ctx.hubs.health(h->hostname).last_error;
    sick += (sick.empty() ? "" : "; ") + h->hostname + " ("
            + (why.empty() ? std::string("health probe failed") : why) + ")";
  }
  if (any_takes_part && !healthy_takes_part && !sick.empty())
    return {error_code::no_healthy_hub,
            "no healthy IoT hub for this device: every candidate hub failed its health "
            "probe: " + sick};
  return {};
}

/// The device's registration record as allocation read it, before the
/// policy ran (the webhook is told the current hub), and the registration
/// generation before that read (embedded configuration reuses the read while
/// it is still current).
struct current_record {
  uint64_t generation = 0;
  std::shared_ptr<const registration_state> state; ///< null: none
  /// The linked hubs allocation decided against: a hub removed while the
  /// policy ran is still a valid answer for this device.
  allocation::hub_set::snapshot hubs;
};

/// The request's views of the event's text and of the current record;
/// again whenever the event moves.
void views_of(const registration_event& ev, const current_record& cur,
              allocation::request& in) {
  in.registration_id = ev.registration_id;
  in.payload_json = ev.payload_json;
  in.client_ip = ev.client_ip;
  in.x509_json = ev.x509_json;
  in.current_hub = {};
  in.current_device_id = {};
  if (cur.state && cur.state->status == registration_status::assigned) {
    in.current_hub = cur.state->assigned_hub;
    in.current_device_id = cur.state->device_id;
  }
}

/// What the policy decides on: the enrollment, the candidate hubs and the
/// device's current assignment.
error prepare(const allocation_deps& ctx, const registration_event& ev,
              allocation::request& in, current_record& cur) {
  if (auto err = load_view(ctx, ev, in.enrollment)) {
    // Kafka: the enrollment may have been written through another instance
    // a moment ago (the device was attested there); catch up once first.
    bool missing = err.code == error_code::enrollment_not_found
                   || err.code == error_code::enrollment_group_not_found;
    if (!missing || !ctx.catalog.caught_up(5000))
      return err;
    if (auto again = load_view(ctx, ev, in.enrollment))
      return again;
  }
  const enrollment::enrollment_view& v = *in.enrollment;
  cur.hubs = ctx.hubs.hubs();
  in.explicit_list = !v.iot_hubs.empty();
  in.linked_hubs = cur.hubs->size();
  if (auto err = healthy_candidates(ctx, candidates(cur.hubs, v), in.explicit_list, in.candidates))
    return err;
  cur.generation = ctx.catalog.registration_generation();
  std::optional<std::string> raw;
  if (auto err = ctx.store->get(storage::cf::registrations,
                                enrollment::key_of(ev.registration_id), raw))
    return err;
  registration_state prev;
  if (raw && !decode_record(*raw, prev))
    cur.state = std::make_shared<const registration_state>(std::move(prev));
  views_of(ev, cur, in);
  return {};
}

/// After the policy decided: reprovisioning against the device's record
/// (read by prepare()), the device id and the twin.
error finish(const allocation_deps& ctx, const enrollment::enrollment_view& v,
             registration_event& ev, allocation::decision d, const current_record& cur) {
  std::string hub = std::move(d.hub);
  // Why (docs/events.md, data.allocation): the policy, what it chose and its
  // reasons, then what re-provisioning made of it.
  const auto kind = v.allocation.value_or(allocation_policy::hashed);
  std::string why;
  json_text::object w(why);
  w.str("policy", to_string(kind));
  if (!v.allocation)
    w.str("policyFrom", "instance default");
  w.str("chosen", hub);
  w.str("candidates", v.iot_hubs.empty() ? "linked hubs" : "the enrollment's iotHubs");
  if (!d.why_json.empty())
    w.raw("why", d.why_json);
  ev.substatus = to_string(assignment_substatus::initial_assignment);
  if (ctx.sink->traits().shared_store) {
    // Configuration needs the same record; no other operation of this
    // device runs meanwhile (the registration stage dedupes), and a delete
    // through the service API bumps the generation.
    auto p = std::make_shared<registration_event::prior_record>();
    p->generation = cur.generation;
    p->state = cur.state;
    ev.prior = std::move(p);
  }
  const registration_state* prev = cur.state.get();
  if (prev != nullptr && prev->status == registration_status::assigned
      && !prev->assigned_hub.empty()) {
    const bool same_hub = iequals(prev->assigned_hub, hub);
    if (!v.update_hub_assignment)
      hub = prev->assigned_hub; // sticky: never re-provision
    if (!v.update_hub_assignment || same_hub) {
      if (!prev->substatus.empty())
        ev.substatus = prev->substatus;
      w.str("reprovision", same_hub ? "already on the chosen hub"
                                    : "kept the current hub (updateHubAssignment false)");
    } else {
      // DPS: a move back to a hub the device had before is
      // reprovisionedToInitialAssignment; its twin still follows
      // migrateDeviceData (device.deprovisioned says which).
      const bool back = was_assigned_to(*prev, hub);
      ev.substatus = to_string(back ? assignment_substatus::reprovisioned_to_initial_assignment
                               : v.migrate_device_data ? assignment_substatus::device_data_migrated
                                                       : assignment_substatus::device_data_reset);
      w.str("reprovision", "moved from " + prev->assigned_hub
                             + (back ? " back to a hub it was assigned to before" : "")
                             + (v.migrate_device_data ? " (migrateDeviceData true)"
                                                      : " (migrateDeviceData false)"));
      w.boolean("migrateDeviceData", v.migrate_device_data);
    }
  }
  w.close();
  ev.allocation_json = std::move(why);
  ev.assigned_hub = std::move(hub);
  ev.device_id = (ev.enrollment_group_id.empty() && !v.device_id.empty())
                   ? v.device_id
                   : ev.registration_id;
  // The webhook's initialTwin, when it sent one, replaces the enrollment's
  // (DPS: it overrides the twin settings).
  ev.initial_twin_json = d.initial_twin_json.empty() ? v.initial_twin_json
                                                     : std::move(d.initial_twin_json);
  ev.returned_payload_json = std::move(d.payload_json);
  ev.iot_edge = v.iot_edge;
  // Issued by configuration (certificate_issuer.hpp) with this policy's CA.
  ev.issuing_ca = ev.csr.empty() ? std::string() : v.issuing_ca;
  // Kafka: a clock reading pinned in the log (the attested record's
  // timestamp, set by the bus; the request's, fused after attestation), so
  // allocating a redelivered input again yields the same bytes.
  if (!ctx.sink->traits().redelivers)
    ev.allocated_ms = now_ms();
  else if (ev.allocated_ms <= 0)
    ev.allocated_ms = ev.attested_ms > 0 ? ev.attested_ms : ev.accepted_ms;
  return {};
}

} // namespace

/// One input while its policy decides: the policy may answer during its call
/// or later from another thread; whichever of (answer, return) comes second
/// goes on, a late answer through the actor's mailbox. The first of (answer,
/// deadline) decides the outcome; the other is dropped.
struct allocation_job final : allocation::answer {
  registration_event ev;
  event_ack ack;
  std::chrono::steady_clock::time_point start;
  std::shared_ptr<const enrollment::enrollment_view> view;
  current_record current;
  caf::weak_actor_ptr stage;
  error err;
  allocation::decision decided_;
  enum : int { open, answered, expired };
  std::atomic<int> outcome{open};
  std::atomic<bool> first_arrived{false}; ///< of (answer, return from allocate())

  void decided(error e, allocation::decision d) override;
  /// Fails the job with `e` (its deadline passed, the policy threw): true
  /// when no answer came first.
  bool expire(error e) {
    int expected = open;
    if (!outcome.compare_exchange_strong(expected, expired))
      return false;
    err = std::move(e);
    return true;
  }
};

namespace {

/// Emits the outcome of `ev`, whose policy answered `err` or `d` (`view`:
/// its enrollment, null when it failed before the policy ran; `cur`: the
/// record prepare() read): registration.allocated, or
/// registration.completed when it failed.
void emit(const stage_output_ptr& out, const allocation_deps* ctx, registration_event& ev,
          event_ack& ack, std::chrono::steady_clock::time_point start,
          const enrollment::enrollment_view* view, const current_record& cur, error err,
          allocation::decision d) {
  // DPS assigns only linked hubs, whatever a policy (a webhook) answers.
  if (!err && (cur.hubs == nullptr
               || std::none_of(cur.hubs->begin(), cur.hubs->end(),
                               [&](const auto& h) { return iequals(h.hostname, d.hub); })))
    err = {error_code::no_hub_available,
           "the allocation policy chose '" + d.hub + "', which is not a linked IoT hub"};
  else if (!err && !ctx->hubs.eligible(d.hub))
    err = {error_code::no_healthy_hub,
           "the allocation policy chose '" + d.hub + "', which failed its health probe: "
             + ctx->hubs.health(d.hub).last_error};
  if (!err)
    err = finish(*ctx, *view, ev, std::move(d), cur);
  ctx->metrics->stage_latency(metrics::stage::allocation, seconds_since(start));
  auto next = bus::topic::registration_allocated;
  if (err) {
    ev.status = registration_status::failed;
    ev.error_code = static_cast<int32_t>(err.code);
    ev.error_message = err.message;
    ev.completed_ms = ctx->sink->traits().redelivers
                        ? (ev.allocated_ms > 0 ? ev.allocated_ms : ev.accepted_ms)
                        : now_ms();
    next = bus::topic::registration_completed;
  }
  ctx->sink->forward(out, next, std::move(ev), std::move(ack.fn));
}

/// allocation's answer to a failed publish: the input (attested) is
/// allocated again in 1 s with its ack. A weak handle, as the producer may
/// hold the callback until its message timeout.
stage_output_ptr output_of(allocation_actor* self, metrics::instruments* m) {
  auto out = std::make_shared<stage_output>();
  out->stage = "allocation";
  out->retry = [weak = caf::weak_actor_ptr{self->ctrl()}, m](registration_event ev,
                                                              stage_output::ack_fn ack,
                                                              const error&) {
    auto strong = weak.lock();
    if (!strong)
      return;
    ev.status = registration_status::assigning; // the input again
    ev.error_code = 0;
    ev.error_message.clear();
    m->stage_enqueued(metrics::stage::allocation);
    caf::delayed_anon_send(caf::actor_cast<allocation_actor_type>(strong), std::chrono::seconds(1),
                           event_atom::value, std::move(ev), event_ack{std::move(ack)});
  };
  return out;
}

void emit(const stage_output_ptr& out, const allocation_deps* ctx, allocation_job& job) {
  emit(out, ctx, job.ev, job.ack, job.start, job.view.get(), job.current, std::move(job.err),
       std::move(job.decided_));
}

/// A policy that throws fails the device, not the stage.
template <class Call>
error guarded(allocation_policy kind, Call&& call) {
  try {
    call();
    return {};
  } catch (const std::exception& ex) {
    return {error_code::internal,
            std::string(to_string(kind)) + " allocation failed: " + ex.what()};
  }
}

/// Runs the enrollment's policy; emits now when it answers now, else keeps
/// the input in a job for the answer.
void allocate(allocation_actor* self, const stage_output_ptr& out,
              const allocation_deps* ctx, registration_event& ev, event_ack& ack) {
  const auto start = std::chrono::steady_clock::now();
  allocation::request in;
  current_record cur;
  if (auto err = prepare(*ctx, ev, in, cur))
    return emit(out, ctx, ev, ack, start, nullptr, cur, std::move(err), {});
  const auto kind = in.enrollment->allocation.value_or(allocation_policy::hashed);
  const allocation::policy* policy = ctx->policies.find(kind);
  if (policy == nullptr)
    return emit(out, ctx, ev, ack, start, nullptr, cur,
                {error_code::no_hub_available,
                 std::string(to_string(kind))
                   + (kind == allocation_policy::custom ? " allocation (webhook)" : " allocation")
                   + " is not supported by this provisiond version"},
                {});
  if (policy->synchronous()) {
    // Answers during the call: a non-owning handle to a stack answer.
    allocation::held_answer now; // on the stack
    if (auto err = guarded(kind, [&] {
          policy->allocate(in, allocation::done_fn(allocation::done_fn{}, &now));
        }))
      now.err = std::move(err);
    return emit(out, ctx, ev, ack, start, in.enrollment.get(), cur, std::move(now.err),
                std::move(now.d));
  }
  auto job = std::make_shared<allocation_job>();
  job->ev = std::move(ev);
  job->ack = std::move(ack);
  job->start = start;
  job->view = in.enrollment;
  job->current = std::move(cur);
  job->stage = self->ctrl();
  views_of(job->ev, job->current, in); // the event moved
  if (auto err = guarded(kind, [&] { policy->allocate(in, job); }))
    if (job->expire(std::move(err))) // else it answered before throwing: that stands
      return emit(out, ctx, *job);
  if (job->first_arrived.exchange(true)) // answered during the call
    return emit(out, ctx, *job);
  const auto deadline = policy->deadline_for(in);
  self->delayed_send(self, deadline, expire_atom::value, job,
                     std::string(to_string(kind)) + " allocation did not answer within "
                       + std::to_string(deadline.count()) + " ms");
}

} // namespace

void allocation_job::decided(error e, allocation::decision d) {
  int expected = open;
  if (!outcome.compare_exchange_strong(expected, answered))
    return; // too late: the deadline failed the job
  err = std::move(e);
  decided_ = std::move(d);
  if (first_arrived.exchange(true)) // answered after allocate() returned
    if (auto strong = stage.lock())
      caf::anon_send(caf::actor_cast<allocation_actor_type>(strong), allocated_atom::value,
                     std::static_pointer_cast<allocation_job>(shared_from_this()));
}

// -- allocation_actor -----------------------------------------------------------

allocation_actor::allocation_actor(caf::actor_config& cfg, allocation_deps deps)
  : allocation_actor_type::base(cfg), deps_(std::move(deps)) {}

allocation_actor::behavior_type allocation_actor::make_behavior() {
  out_ = output_of(this, deps_.metrics);
  return {
    [this](event_atom, registration_event& ev, event_ack& ack) { on_attested(ev, ack); },
    [this](allocated_atom, const std::shared_ptr<allocation_job>& job) { on_answered(job); },
    [this](expire_atom, const std::shared_ptr<allocation_job>& job, std::string& why) {
      on_deadline(job, why);
    },
  };
}

void allocation_actor::on_attested(registration_event& ev, event_ack& ack) {
  deps_.metrics->stage_dequeued(metrics::stage::allocation);
  allocate(this, out_, &deps_, ev, ack);
}

void allocation_actor::on_answered(const std::shared_ptr<allocation_job>& job) {
  emit(out_, &deps_, *job);
}

void allocation_actor::on_deadline(const std::shared_ptr<allocation_job>& job, std::string& why) {
  if (job->expire({error_code::no_hub_available, std::move(why)}))
    emit(out_, &deps_, *job);
}

} // namespace prov
