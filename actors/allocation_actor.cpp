// Allocation stage: picks the hub (hashed or static), the device id and the
// initial twin, and decides reprovisioning against the existing record.
//
// Accepts: (event_atom, registration_event, event_ack) from registration.attested;
//          (handoff_atom, registration_event), tests: a delayed hand-off onward.
// Emits:   registration.allocated, or registration.completed (failed).
// Acks:    when the emitted event is durable on the bus: this stage's effect
//          is that event (on Kafka: acks=all), so the input offset is committed
//          only then. A failed publish is retried in 1 s (the input is
//          allocated again), unacked meanwhile. Fused with a local
//          configuration stage (kafka.fuse_stages), the event goes to it in
//          process with this ack instead.
// Blocking: reads the enrollment and registration record; spawned detached.

#include <cstdio>


#include "actors/actor_types.hpp"
#include "messages/ascii.hpp"

namespace prov {

namespace {

using ascii::iequals;

/// The enrollment's view, shared with the caches it comes from (groups are
/// in memory; attestation just parsed an individual one) instead of copied.
error load_view(const engine_context& ctx, const registration_event& ev,
                std::shared_ptr<const enrollment::enrollment_view>& out) {
  auto individual = ev.enrollment_group_id.empty();
  if (!individual) {
    // Groups are few and already in memory (attestation needs them all), so
    // the parsed view is taken from the cache instead of re-parsing JSON.
    auto groups = ctx.groups.get();
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
  if ((out = ctx.views.lookup(enrollment::key_of(ev.registration_id),
                              ctx.enrollment_generation.load())))
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
/// every linked hub.
std::vector<allocation::candidate_hub> candidates(const engine_context& ctx,
                                                  const enrollment::enrollment_view& v) {
  if (v.iot_hubs.empty())
    return ctx.hubs;
  std::vector<allocation::candidate_hub> out;
  for (const auto& name : v.iot_hubs)
    for (const auto& h : ctx.hubs)
      if (iequals(h.hostname, name))
        out.push_back(h);
  return out;
}

error allocate(const engine_context& ctx, registration_event& ev) {
  std::shared_ptr<const enrollment::enrollment_view> vp;
  if (auto err = load_view(ctx, ev, vp)) {
    // Kafka: the enrollment may have been written through another instance
    // a moment ago (the device was attested there); catch up once first.
    bool missing = err.code == error_code::enrollment_not_found
                   || err.code == error_code::enrollment_group_not_found;
    if (!missing || !ctx.kafka() || ctx.repl->catch_up_enrollments(5000))
      return err;
    if (auto again = load_view(ctx, ev, vp))
      return again;
  }
  const enrollment::enrollment_view& v = *vp;
  auto hubs = candidates(ctx, v);
  std::string hub;
  const auto& policy = v.allocation_policy;
  if (policy == "static") {
    if (auto err = allocation::static_hub(hubs, hub))
      return {error_code::no_hub_available,
              "static allocation: the enrollment must name exactly one linked hub"};
  } else if (policy == "custom") {
    return {error_code::no_hub_available,
            "custom allocation (webhook) is not supported by this provisiond version"};
  } else {
    // hashed, and geoLatency until client location is modelled: both are a
    // weighted deterministic choice among the candidates.
    if (auto err = allocation::hashed(ev.registration_id, hubs, !v.iot_hubs.empty(), hub))
      return {error_code::no_hub_available,
              ctx.hubs.empty()
                ? "no IoT hub is linked: add a [[hubs]] entry to the configuration"
                : "no linked IoT hub is available for this enrollment"};
  }
  // Reprovisioning against the existing record.
  std::optional<std::string> raw;
  registration_state prev;
  ev.substatus = "initialAssignment";
  const auto generation = ctx.registration_generation.load();
  if (auto err = ctx.store->get(storage::cf::registrations,
                                enrollment::key_of(ev.registration_id), raw))
    return err;
  const bool had_prev = raw && !decode_record(*raw, prev);
  if (!ctx.kafka()) {
    // Configuration needs the same record; no other operation of this
    // device runs meanwhile (the registration stage dedupes), and a delete
    // through the service API bumps the generation.
    auto p = std::make_shared<registration_event::prior_record>();
    p->generation = generation;
    if (had_prev)
      p->state = std::make_shared<const registration_state>(prev);
    ev.prior = std::move(p);
  }
  if (had_prev && prev.status == registration_status::assigned
      && !prev.assigned_hub.empty()) {
    if (!v.update_hub_assignment) {
      hub = prev.assigned_hub; // sticky: never re-provision
      ev.substatus = prev.substatus.empty() ? "initialAssignment" : prev.substatus;
    } else if (!iequals(prev.assigned_hub, hub)) {
      ev.substatus = v.migrate_device_data ? "deviceDataMigrated" : "deviceDataReset";
    } else {
      ev.substatus = prev.substatus.empty() ? "initialAssignment" : prev.substatus;
    }
  }
  ev.assigned_hub = hub;
  ev.device_id = (ev.enrollment_group_id.empty() && !v.device_id.empty())
                   ? v.device_id
                   : ev.registration_id;
  ev.initial_twin_json = v.initial_twin_json;
  ev.iot_edge = v.iot_edge;
  // Kafka: a clock reading pinned in the log (the attested record's
  // timestamp, set by the bus; the request's, fused after attestation), so
  // allocating a redelivered input again yields the same bytes.
  if (!ctx.kafka())
    ev.allocated_ms = now_ms();
  else if (ev.allocated_ms <= 0)
    ev.allocated_ms = ev.attested_ms > 0 ? ev.attested_ms : ev.accepted_ms;
  return {};
}

} // namespace

caf::behavior allocation_actor(caf::event_based_actor* self, engine_context_ptr ctx) {
  return {
    [ctx](handoff_atom, registration_event& ev) { // test_pipeline_delay_ms
      ctx->bus->publish(transport::topic::registration_allocated, std::move(ev));
    },
    [self, ctx](event_atom, registration_event& ev, event_ack& ack) {
      ctx->metrics->stage_dequeued(metrics::stage::allocation);
      auto start = std::chrono::steady_clock::now();
      auto err = allocate(*ctx, ev);
      ctx->metrics->stage_latency(metrics::stage::allocation, seconds_since(start));
      auto next = transport::topic::registration_allocated;
      if (err) {
        ev.status = registration_status::failed;
        ev.error_code = static_cast<int32_t>(err.code);
        ev.error_message = err.message;
        ev.completed_ms = ctx->kafka() ? (ev.allocated_ms > 0 ? ev.allocated_ms : ev.accepted_ms)
                                       : now_ms();
        next = transport::topic::registration_completed;
      }
      if (!ctx->kafka()) { // in-process hand-off: cannot fail, no copy for a retry
        if (ctx->opts.test_pipeline_delay_ms > 0 && !err)
          self->delayed_send(self, std::chrono::milliseconds(ctx->opts.test_pipeline_delay_ms),
                             handoff_atom::value, std::move(ev));
        else
          ctx->bus->publish(next, std::move(ev));
        ack();
        return;
      }
      if (const auto& local = ctx->in_process[static_cast<std::size_t>(next)]) {
        // Fused with configuration: it acks this input once its effect is
        // durable, and retries on its own.
        local(std::move(ev), std::move(ack.fn));
        return;
      }
      // A failed publish is retried: the input (attested) is allocated
      // again in 1 s with its ack. A weak handle, as the producer may hold
      // the callback until its message timeout.
      auto input = std::make_shared<std::pair<registration_event, event_ack>>(ev, ack);
      input->first.status = registration_status::assigning;
      input->first.error_code = 0;
      input->first.error_message.clear();
      caf::weak_actor_ptr weak{self->ctrl()};
      auto* m = ctx->metrics;
      ctx->bus->publish_durable(next, std::move(ev), [input, weak, m, stats = ctx->kafka_stats](
                                                       const error& e) {
        if (!e) {
          input->second();
          return;
        }
        std::fprintf(stderr, "provisiond: allocation of %s: publish failed (retrying in 1 s): %s\n",
                     input->first.operation_id.c_str(), e.message.c_str());
        stats->publish_retries.fetch_add(1);
        if (auto strong = weak.lock()) {
          m->stage_enqueued(metrics::stage::allocation);
          caf::delayed_anon_send(caf::actor_cast<caf::actor>(strong), std::chrono::seconds(1),
                                 event_atom::value, std::move(input->first),
                                 std::move(input->second));
        }
      });
    },
  };
}

} // namespace prov
