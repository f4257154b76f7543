// Configuration stage: the single writer of registration records. Commits, in
// one atomic batch, the registration record, the terminal operation, the
// removal from `pending` and the device.assigned event in the outbox, so an
// operation yields exactly one assignment event even across crashes.
//
// Accepts: (event_atom, registration_event, event_ack) from registration.allocated
//          (committed_atom, operation id, error) from the store writer
// Emits:   registration.completed and device.assigned after the commit.
//          (relayed_atom, operation id)   device.assigned is durable on Kafka
//          (relayfail_atom, operation id) device.assigned could not be published
// Acks:    embedded: after the RocksDB commit. Kafka: the operation keeps its
//          `pending` marker until device.assigned is acknowledged by Kafka;
//          then the marker is deleted and the input acked. A redelivered
//          event for a terminal operation that still has its marker (crash
//          between commit and Kafka ack) re-publishes device.assigned, so it
//          reaches Kafka at least once (twice only if the crash fell between
//          Kafka's ack and the marker delete; consumers dedupe on the id).
//          registration.completed is fire and forget (failures resume).
// Blocking: point reads for idempotency; spawned detached.

#include <cstdio>
#include <unordered_map>
#include <vector>

#include "actors/actor_types.hpp"
#include "messages/json_text.hpp"

namespace prov {

namespace {

struct committing_t {
  registration_event event;
  event_ack ack;
  std::chrono::steady_clock::time_point started; ///< stage latency includes the commit
  std::string cloud_event; ///< Kafka mode: the device.assigned record to relay
};

struct configuration_state_t {
  uint64_t next_seq = 1;
  std::unordered_map<std::string, committing_t> committing;
  /// Kafka: operation id -> acks waiting for device.assigned to be durable
  /// and the `pending` marker deleted.
  std::unordered_map<std::string, std::vector<event_ack>> relaying;
  /// Kafka: acks of duplicate deliveries that arrived while the operation was
  /// committing or relaying; released (or dropped) with the operation's own.
  std::unordered_map<std::string, std::vector<event_ack>> parked;
};

/// The CloudEvents context attributes of an assignment: in the JSON envelope
/// and, on Kafka, repeated as ce_* headers (one source for both).
struct ce_attributes {
  std::string source, id, subject, time;
};

ce_attributes attributes_of(const registration_event& ev) {
  return {"/provisiond/" + ev.id_scope, ev.operation_id, ev.device_id,
          utc_string(ev.completed_ms)};
}

/// The device.assigned CloudEvent (structured JSON). Written by hand: it is
/// built once per registration and nlohmann's tree + serializer was the
/// largest single cost of this stage (callgrind, docs/performance.md).
std::string assignment_event(const registration_event& ev, const registration_state& rs,
                             uint64_t seq) {
  auto attrs = attributes_of(ev);
  std::string out;
  out.reserve(640 + ev.initial_twin_json.size());
  json_text::object ce(out);
  ce.str("specversion", "1.0")
    .str("type", "device.assigned")
    .str("source", attrs.source)
    .str("id", attrs.id)
    .str("subject", attrs.subject)
    .str("time", attrs.time)
    .str("datacontenttype", "application/json")
    .str("sequence", std::to_string(seq)); // CloudEvents extension: a string
  json_text::object data(ce.nested("data"));
  data.str("registrationId", ev.registration_id)
    .str("deviceId", ev.device_id)
    .str("assignedHub", ev.assigned_hub)
    .str("operationId", ev.operation_id)
    .str("attestationType", ev.attestation_type)
    .str("substatus", ev.substatus);
  if (!ev.enrollment_group_id.empty())
    data.str("enrollmentGroupId", ev.enrollment_group_id);
  // The enrollment stored the twin as compact, valid JSON text.
  data.raw("initialTwin", ev.initial_twin_json.empty() ? "{}" : ev.initial_twin_json);
  json_text::object caps(data.nested("capabilities"));
  caps.boolean("iotEdge", ev.iot_edge).close();
  json_text::object ts(data.nested("timestamps"));
  ts.str("accepted", utc_string(ev.accepted_ms))
    .str("allocated", utc_string(ev.allocated_ms))
    .str("assigned", utc_string(ev.completed_ms))
    .str("registrationCreated", utc_string(rs.created_ms))
    .close();
  data.close();
  ce.close();
  return out;
}

/// device.assigned as a Kafka record: structured-mode CloudEvent (the outbox
/// JSON), keyed by device id, with the attributes also as ce_* headers so
/// consumers can route without parsing (CloudEvents Kafka binding).
transport::bus::raw_record assigned_record(ce_attributes attrs, std::string cloud_event) {
  transport::bus::raw_record r;
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

} // namespace

caf::behavior configuration_actor(caf::event_based_actor* self, engine_context_ptr ctx) {
  auto st = std::make_shared<configuration_state_t>();
  // Kafka: device.assigned must reach the topic even across a crash, so the
  // `pending` marker outlives the commit until Kafka acknowledges it.
  const bool relay = ctx->opts.cfg.kafka.enabled();
  // Publishes device.assigned (the outbox's CloudEvent, byte for byte); once
  // durable the actor drops the marker.
  auto publish_assigned = [self, ctx](const registration_event& ev, std::string cloud_event) {
    const auto& op_id = ev.operation_id;
    // A weak handle: the producer may hold this callback until its message
    // timeout, and a strong one would keep the detached actor (and engine
    // shutdown) waiting for it.
    caf::weak_actor_ptr weak{self->ctrl()};
    ctx->bus->publish_raw_durable(
      transport::topic::device_assigned, assigned_record(attributes_of(ev), std::move(cloud_event)),
      [weak, op_id](const error& e) {
        auto strong = weak.lock();
        if (!strong)
          return; // shutting down: unacked, so republished after the restart
        auto me = caf::actor_cast<caf::actor>(strong);
        if (!e) {
          caf::anon_send(me, relayed_atom::value, op_id);
          return;
        }
        std::fprintf(stderr, "provisiond: device.assigned for %s not published: %s\n",
                     op_id.c_str(), e.message.c_str());
        caf::anon_send(me, relayfail_atom::value, op_id);
      });
  };
  std::optional<std::string> last;
  if (!ctx->store->last_key(storage::cf::outbox, last) && last)
    st->next_seq = storage::parse_seq_key(*last) + 1;
  return {
    [=](event_atom, registration_event& ev, event_ack& ack) {
      ctx->metrics->stage_dequeued(metrics::stage::configuration);
      auto started = std::chrono::steady_clock::now();
      if (st->committing.count(ev.operation_id) || st->relaying.count(ev.operation_id)) {
        // Duplicate delivery while the first is being committed or relayed.
        // Kafka: after a rebalance the first copy's ack is void (stale epoch)
        // and only this one can commit the offset, so it waits for the relay
        // like the first. In-process the ack is a no-op.
        if (relay)
          st->parked[ev.operation_id].push_back(std::move(ack));
        else
          ack();
        return;
      }
      std::optional<std::string> raw;
      operation_record op;
      if (auto err = ctx->store->get(storage::cf::operations, ev.operation_id, raw)) {
        // Stay pending, unacked: resumed (and redelivered) on the next start.
        return;
      }
      if (!raw || decode_record(*raw, op)) {
        ack();
        return; // unknown operation: nothing to configure
      }
      if (is_terminal(op.status)) {
        // Already done (at-least-once redelivery). Kafka: if the marker is
        // still there, device.assigned may never have reached the topic.
        std::optional<std::string> marker;
        if (relay && op.status == registration_status::assigned
            && ctx->store->get(storage::cf::pending, ev.operation_id, marker))
          return; // cannot tell whether it was relayed: stay unacked
        if (relay && op.status == registration_status::assigned && marker) {
          // The marker holds the outbox position of the event to relay.
          // What was committed wins over the redelivered event's copy.
          ev.completed_ms = op.state.updated_ms;
          ev.device_id = op.state.device_id;
          ev.assigned_hub = op.state.assigned_hub;
          std::optional<std::string> stored;
          auto seq = storage::parse_seq_key(*marker);
          if (seq == 0 || ctx->store->get(storage::cf::outbox, *marker, stored) || !stored)
            stored = assignment_event(ev, op.state, seq); // marker without a position
          ctx->relaying.fetch_add(1);
          st->relaying[ev.operation_id].push_back(std::move(ack));
          publish_assigned(ev, std::move(*stored));
          return;
        }
        ack();
        return;
      }
      auto reg_key = enrollment::key_of(ev.registration_id);
      registration_state prev;
      raw.reset();
      bool had_prev = !ctx->store->get(storage::cf::registrations, reg_key, raw) && raw
                      && !decode_record(*raw, prev);
      ev.completed_ms = now_ms();
      ev.status = registration_status::assigned;
      registration_state rs;
      rs.registration_id = ev.registration_id;
      rs.created_ms = had_prev && prev.created_ms ? prev.created_ms : ev.accepted_ms;
      rs.updated_ms = ev.completed_ms;
      rs.assigned_hub = ev.assigned_hub;
      rs.device_id = ev.device_id;
      rs.status = registration_status::assigned;
      rs.substatus = ev.substatus;
      rs.etag = enrollment::new_etag();
      rs.attestation_type = ev.attestation_type;
      rs.enrollment_group_id = ev.enrollment_group_id;
      rs.last_operation_id = ev.operation_id;
      op.status = registration_status::assigned;
      op.state = rs;
      // A terminal record needs only its state: the event was kept for resume,
      // and the outbox event carries the details. Half the bytes per device.
      op.event = registration_event{};
      auto seq = st->next_seq++;
      storage::write_batch batch;
      batch.put(storage::cf::registrations, reg_key, encode_record(rs));
      batch.put(storage::cf::operations, ev.operation_id, encode_record(op));
      auto cloud_event = assignment_event(ev, rs, seq);
      if (relay) // the marker stays until Kafka has the event; it says where it is
        batch.put(storage::cf::pending, ev.operation_id, storage::seq_key(seq));
      else
        batch.del(storage::cf::pending, ev.operation_id);
      if (relay)
        batch.put(storage::cf::outbox, storage::seq_key(seq), cloud_event); // also relayed
      else
        batch.put(storage::cf::outbox, storage::seq_key(seq), std::move(cloud_event));
      auto op_id = ev.operation_id;
      st->committing.emplace(op_id, committing_t{std::move(ev), std::move(ack), started,
                                                 relay ? std::move(cloud_event) : std::string()});
      auto me = caf::actor_cast<caf::actor>(self);
      ctx->store->commit(std::move(batch), [me, op_id](const error& e) {
        caf::anon_send(me, committed_atom::value, op_id, e);
      });
    },
    [=](committed_atom, const std::string& op_id, const error& e) {
      auto it = st->committing.find(op_id);
      if (it == st->committing.end())
        return;
      auto ev = std::move(it->second.event);
      auto ack = std::move(it->second.ack);
      auto started = it->second.started;
      auto cloud_event = std::move(it->second.cloud_event);
      st->committing.erase(it);
      if (e) {
        // Not durable: retry shortly; the operation stays in `pending`.
        ev.status = registration_status::assigning;
        ctx->metrics->stage_enqueued(metrics::stage::configuration);
        self->delayed_send(self, std::chrono::milliseconds(200), event_atom::value,
                           std::move(ev), std::move(ack));
        return;
      }
      auto* m = ctx->metrics;
      m->stage_latency(metrics::stage::configuration, seconds_since(started));
      m->device_assigned(ev.assigned_hub);
      m->registration_attempt("assigned", ev.assigned_hub, ev.protocol);
      m->operation_finished("assigned",
                            static_cast<double>(ev.completed_ms - ev.accepted_ms) / 1000.0);
      if (relay) {
        ctx->relaying.fetch_add(1);
        st->relaying[op_id].push_back(std::move(ack));
        publish_assigned(ev, std::move(cloud_event));
      } else {
        ack(); // in-process: nothing to commit
        ctx->bus->publish(transport::topic::device_assigned, ev);
      }
      ctx->bus->publish(transport::topic::registration_completed, std::move(ev));
    },
    [=](relayed_atom, const std::string& op_id) {
      // device.assigned is on Kafka: drop the marker, then ack the input(s).
      auto it = st->relaying.find(op_id);
      if (it == st->relaying.end())
        return;
      auto acks = std::make_shared<std::vector<event_ack>>(std::move(it->second));
      st->relaying.erase(it);
      if (auto p = st->parked.find(op_id); p != st->parked.end()) {
        for (auto& a : p->second)
          acks->push_back(std::move(a));
        st->parked.erase(p);
      }
      storage::write_batch batch;
      batch.del(storage::cf::pending, op_id);
      ctx->store->commit(std::move(batch), [acks, ctx](const error& e) {
        // On failure the marker stays and the inputs stay unacked: after a
        // restart device.assigned is published once more (a duplicate).
        if (!e)
          for (const auto& a : *acks)
            a();
        ctx->relaying.fetch_sub(1);
      });
    },
    [=](relayfail_atom, const std::string& op_id) {
      // device.assigned did not reach Kafka. Its inputs stay unacked and the
      // marker stays, so a redelivery (rebalance or restart) publishes again;
      // forget the attempt so that redelivery is not taken for a duplicate.
      if (st->relaying.erase(op_id) > 0)
        ctx->relaying.fetch_sub(1);
      st->parked.erase(op_id);
    },
  };
}

} // namespace prov
