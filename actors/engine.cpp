#include "actors/engine.hpp"

#include <chrono>
#include <cstdio>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>
#include <openssl/crypto.h>

#include "actors/actor_types.hpp"
#include "actors/allocation_actor.hpp"
#include "actors/attestation_actor.hpp"
#include "actors/configuration_actor.hpp"
#include "actors/enrollment_actor.hpp"
#include "actors/registration_actor.hpp"
#include "actors/allocation/allocation_policy.hpp"
#include "actors/allocation/custom_webhook.hpp"
#include "actors/allocation/geo_latency.hpp"
#include "messages/ascii.hpp"
#include "actors/hub_store.hpp"
#include "actors/attestation/symmetric_key.hpp"
#include "actors/attestation/tpm.hpp"
#include "actors/attestation/x509.hpp"
#include "actors/once_per_interval.hpp"
#include "actors/keyed_workers.hpp"
#include "actors/throttling/rate_limiter.hpp"
#include "net/webhook_client.hpp"
#include "messages/crypto.hpp"
#include "bus/kafka_admin.hpp"
#include "bus/kafka_bus.hpp"

namespace prov {

using nlohmann::json;

namespace {

storage::cf family_of(enrollment::kind k) {
  return k == enrollment::kind::individual ? storage::cf::enrollments : storage::cf::groups;
}

bool iequals(std::string_view a, std::string_view b) {
  return enrollment::key_of(a) == enrollment::key_of(b);
}

/// Continuation tokens are the last key of the previous page; the next page
/// starts right after it.
std::string after_key(const std::string& continuation) {
  return continuation.empty() ? std::string{} : continuation + '\0';
}

/// A token is a key this server could have issued: a valid id, as stored
/// (lower case). Anything else would resume from an arbitrary position and
/// answer a wrong, often empty, last page without a word.
error check_continuation(const std::string& token, bool group_ids) {
  if (token.empty())
    return {};
  const bool valid = group_ids ? enrollment::valid_group_id(token)
                               : enrollment::valid_registration_id(token);
  if (!valid || enrollment::key_of(token) != token)
    return {error_code::invalid_header,
            "x-ms-continuation is not a continuation token this server issued"};
  return {};
}

class engine_impl final : public engine {
public:
  explicit engine_impl(engine_context_ptr ctx)
    : ctx_(std::move(ctx)),
      checks_{ctx_->mechanisms, ctx_->catalog, ctx_->store, ctx_->metrics, ctx_->opts.id_scope,
              ctx_->instance_hex},
      group_registrations_(ctx_->opts.cfg.throttling.registrations_per_minute_per_group,
                           std::chrono::minutes(1),
                           static_cast<std::size_t>(ctx_->opts.cfg.throttling.max_tracked_keys)) {
    cfg_.set("scheduler.max-threads", 2);
    cfg_.set("logger.verbosity", caf::atom("quiet"));
    sys_ = std::make_unique<caf::actor_system>(cfg_);
  }

  ~engine_impl() override { shutdown(); }

  error start() {
    auto& ctx = *ctx_;
    const auto& roles = ctx.opts.cfg.roles;
    if (auto err = ctx.catalog.reload_groups()) {
      if (err.code != error_code::internal)
        return err;
      // One unreadable group must not stop the service; the rest still work.
      std::fprintf(stderr, "provisiond: warning: %s\n", err.message.c_str());
    }
    // The mode is chosen here, once: the stages forward their outputs to
    // ctx.sink, and only configuration's commit differs by mode.
    kafka_sink* ksink = nullptr;
    if (ctx.kafka()) {
      auto s = std::make_unique<kafka_sink>(
        *ctx.bus, ctx.kafka_stats, std::chrono::seconds(ctx.opts.cfg.kafka.resend_after_s));
      ksink = s.get();
      ctx.sink = std::move(s);
    } else {
      ctx.sink = make_inprocess_sink(*ctx.bus);
    }
    auto attestation = checks_;
    attestation.sink = ctx.sink.get();
    attestation_ = sys_->spawn<attestation_actor, caf::detached>(std::move(attestation));
    registration_ = sys_->spawn<registration_actor, caf::detached>(registration_deps_of(ctx));
    allocation_ = sys_->spawn<allocation_actor, caf::detached>(
      allocation_deps{ctx.catalog, ctx.store, ctx.hubs, ctx.policies, ctx.sink.get(),
                      ctx.metrics});
    if (ctx.kafka())
      configuration_ =
        sys_->spawn<kafka_configuration_actor, caf::detached>(configuration_deps_of(ctx));
    else
      configuration_ = sys_->spawn<configuration_actor, caf::detached>(configuration_deps_of(ctx));
    enrollment_ = sys_->spawn<enrollment_actor, caf::detached>(enrollment_deps{
      ctx.store, ctx.catalog, ctx.hubs,
      [c = &ctx](const storage::write_batch& b) { return write_hubs(*c, b); }});
    auto* m = ctx.metrics;
    auto to = [m](auto dest, std::optional<metrics::stage> s) {
      return [dest, m, s](registration_event&& ev) {
        if (s)
          m->stage_enqueued(*s); // the stage counts it out when it handles it
        caf::anon_send(dest, event_atom::value, std::move(ev));
      };
    };
    // Allocation and configuration ack once their effect is durable; on Kafka
    // that is when the input offset may be committed. A weak handle: bus
    // subscriptions and fused hand-offs (below) must not keep an actor alive;
    // once it is gone an event is dropped unacked and comes back from Kafka.
    auto to_acked = [m](const auto& dest, metrics::stage s) {
      return [weak = caf::actor_cast<caf::weak_actor_ptr>(dest), m,
              s](registration_event&& ev, bus::stage_bus::ack_fn ack) {
        if (auto strong = weak.lock()) {
          m->stage_enqueued(s);
          caf::anon_send(caf::actor_cast<caf::actor>(strong), event_atom::value, std::move(ev),
                         event_ack{std::move(ack)});
        }
      };
    };
    // A stage's Kafka input. Late in a drain (SIGTERM), new input is left
    // unacked for the next owner of the partition: what this process starts
    // then it might not finish, and a half-done operation would be
    // allocated again there, perhaps under another hub list (a rolling
    // restart). In-process hand-offs continue. Embedded, the in-process bus
    // is the only way events move: nothing is dropped.
    auto from_kafka = [&ctx, to_acked](const auto& dest, metrics::stage s) {
      bus::stage_bus::acked_handler h = to_acked(dest, s);
      if (!ctx.kafka())
        return h;
      return bus::stage_bus::acked_handler(
        [h, c = &ctx](registration_event&& ev, bus::stage_bus::ack_fn ack) {
          if (c->stage_intake.load())
            h(std::move(ev), std::move(ack));
        });
    };
    // kafka.fuse_stages: a stage whose consumer runs here too hands it the
    // event in process, with its own input ack (kafka_sink::fuse).
    if (ksink != nullptr && ctx.opts.cfg.kafka.fuse_stages) {
      if (roles.attestation && roles.allocation)
        ksink->fuse(bus::topic::registration_attested,
                    to_acked(allocation_, metrics::stage::allocation));
      if (roles.allocation && roles.configuration)
        ksink->fuse(bus::topic::registration_allocated,
                    to_acked(configuration_, metrics::stage::configuration));
    }
    // Direct Kafka publishers (docs/events.md); HTTP registers are attested
    // on the gateway and go straight to registration.attested.
    if (roles.attestation && ctx.kafka())
      if (auto err = ctx.bus->subscribe_acked(bus::topic::registration_requested,
                                              from_kafka(attestation_, metrics::stage::attestation)))
        return err;
    if (roles.allocation)
      if (auto err = ctx.bus->subscribe_acked(bus::topic::registration_attested,
                                              from_kafka(allocation_, metrics::stage::allocation)))
        return err;
    if (roles.configuration)
      if (auto err = ctx.bus->subscribe_acked(
            bus::topic::registration_allocated,
            from_kafka(configuration_, metrics::stage::configuration)))
        return err;
    // Kafka: one consumer for the stages above (kafka_bus one_consumer).
    if (auto err = ctx.bus->start_consuming())
      return err;
    if (!roles.registration)
      return {};
    if (ctx.kafka()) {
      // Every gateway follows all of registration.completed into its
      // operation records (it answers polls for any gateway's operations),
      // caught up before resume() so finished operations are not resumed.
      if (auto err = ctx.repl->follow_completed(to(registration_, std::nullopt)))
        return err;
    } else {
      // Settling failures is idempotent and resumable from `pending`.
      if (auto err = ctx.bus->subscribe_acked(
            bus::topic::registration_completed,
            [h = to(registration_, std::nullopt)](registration_event&& ev,
                                                  bus::stage_bus::ack_fn ack) {
              h(std::move(ev));
              ack();
            }))
        return err;
    }
    // device.assigned: embedded mode keeps it in the durable outbox only.
    return resume();
  }

  /// Re-publishes every accepted, unfinished operation (crash recovery).
  error resume() {
    std::vector<std::pair<std::string, std::string>> entries;
    auto err = ctx_->store->scan(storage::cf::pending, "", 0,
                                 [&](std::string_view k, std::string_view v) {
                                   entries.emplace_back(k, v);
                                   return true;
                                 });
    if (err)
      return err;
    std::size_t resumed = 0;
    for (auto& [id, value] : entries) {
      std::optional<std::string> raw;
      operation_record op;
      if (auto e = ctx_->store->get(storage::cf::operations, id, raw))
        return e;
      bool resume = false;
      if (raw) {
        resume = !decode_record(*raw, op) && !is_terminal(op.status);
      } else if (!value.empty() && !decode_record(value, op) && !is_terminal(op.status)) {
        // A deferred accept recorded for its 202 (registration_actor.cpp):
        // the entry holds the record. Written as the operation record now,
        // the operation resumes like any other (its terminal commit then
        // deletes the entry).
        storage::write_batch rec;
        rec.put(storage::cf::operations, id, value);
        if (auto e = ctx_->store->write(rec))
          return e;
        resume = true;
      }
      if (!resume) {
        // Nothing to resume (unreadable, missing or already finished): drop
        // the marker so it is not retried on every start.
        storage::write_batch drop;
        drop.del(storage::cf::pending, id);
        static_cast<void>(ctx_->store->write(drop));
        continue;
      }
      ++resumed;
      caf::anon_send(registration_, accepted_atom::value, std::move(op.event));
    }
    resumed_ = resumed;
    return {};
  }

  void register_device(register_request req, register_cb cb) override {
    // Attest on the caller's thread (a gateway I/O thread): it is CPU work plus
    // point reads, and doing it here saves two mailbox hops per register.
    // Not a TPM register: it writes its challenge (below).
    auto start = std::chrono::steady_clock::now();
    bool tpm = false;
    auto r = attest(checks_, req, true, &tpm);
    if (tpm)
      return register_tpm(std::move(req), std::move(cb));
    ctx_->metrics->stage_latency(metrics::stage::attestation, seconds_since(start));
    attested(std::move(req), std::move(r), std::move(cb));
  }

  /// A TPM register on the TPM worker: issuing or answering a challenge
  /// writes it (embedded: a store write; Kafka: a produce, its ack and the
  /// local apply, up to 15 s; a miss may catch the topic up, up to 5 s), and
  /// none of that may hold a gateway I/O thread or CAF's shared scheduler.
  void register_tpm(register_request req, register_cb cb) {
    auto key = enrollment::key_of(req.registration_id);
    tpm_worker_.post(std::move(key), [this, req = std::move(req),
                                      cb = std::move(cb)](serial_worker::fate f) {
      if (f != serial_worker::fate::run) {
        register_reply reply;
        reply.err = f == serial_worker::fate::busy
                      ? error{error_code::throttled, "too many TPM registers in progress"}
                      : error{error_code::unavailable, "the service is stopping"};
        return cb(std::move(reply));
      }
      auto start = std::chrono::steady_clock::now();
      auto r = attest(checks_, req);
      ctx_->metrics->stage_latency(metrics::stage::attestation, seconds_since(start));
      attested(std::move(req), std::move(r), std::move(cb));
    });
  }

  void attested(register_request req, attestation::verdict r, register_cb cb) {
    auto* m = ctx_->metrics;
    if (r.result == attestation::verdict::outcome::challenge) {
      // Nothing to record: the device answers with a second register.
      register_reply reply;
      reply.err = std::move(r.err);
      reply.challenge = std::move(r.challenge);
      cb(std::move(reply));
      return;
    }
    // [throttling] registrations_per_minute_per_group: the group is known only
    // now (a device does not name it), but nothing is stored yet.
    if (r.is_accepted() && !r.enrollment_group_id.empty() && group_registrations_.enabled()) {
      if (int wait = group_registrations_.take(enrollment::key_of(r.enrollment_group_id))) {
        m->attestation_attempt(true, to_string(r.type), req.protocol);
        m->throttled("group_registration_rate");
        m->registration_attempt("rejected", "", req.protocol);
        register_reply reply;
        reply.err = {error_code::throttled,
                     "too many registrations for this device's enrollment group; retry after "
                     "the Retry-After interval"};
        reply.retry_after_s = wait;
        return cb(std::move(reply));
      }
    }
    caf::anon_send(registration_, register_atom::value, std::move(req), std::move(r),
                   register_reply_fn{std::move(cb)});
  }

  error authenticate_device(const register_request& req) override {
    return attest(checks_, req, false).err;
  }

  error authenticate_device_without_tpm(const register_request& req) override {
    bool tpm = false;
    auto r = attest(checks_, req, false, &tpm);
    if (tpm)
      return {error_code::unauthorized,
              "registration '" + req.registration_id + "' attests with TPM: DPS has no TPM "
              "attestation over MQTT (register over HTTPS)"};
    return std::move(r.err);
  }

  void authenticate_device(register_request req, done_cb cb) override {
    bool tpm = false;
    auto r = attest(checks_, req, false, &tpm);
    if (!tpm)
      return cb(std::move(r.err));
    auto key = enrollment::key_of(req.registration_id);
    tpm_worker_.post(std::move(key), [this, req = std::move(req),
                                      cb = std::move(cb)](serial_worker::fate f) {
      if (f != serial_worker::fate::run)
        return cb(f == serial_worker::fate::busy
                    ? error{error_code::throttled, "too many TPM requests in progress"}
                    : error{error_code::unavailable, "the service is stopping"});
      cb(attest(checks_, req, false).err);
    });
  }

  error operation(const std::string& registration_id, const std::string& operation_id,
                  registration_state& out) override {
    std::optional<std::string> raw;
    if (auto err = ctx_->store->get(storage::cf::operations, operation_id, raw))
      return err;
    operation_record op;
    if (!raw) {
      // A deferred accept recorded for its 202 is only a `pending` entry
      // until its outcome (registration_actor.cpp).
      std::optional<std::string> entry;
      if (auto err = ctx_->store->get(storage::cf::pending, operation_id, entry))
        return err;
      if (entry && !entry->empty()) {
        raw = std::move(entry);
      } else if (!entry && ctx_->kafka()) {
        // Kafka's registration.completed reader writes the operation record
        // and deletes the entry in one batch, possibly between the two reads
        // above: read the record once more before calling it unknown.
        if (auto err = ctx_->store->get(storage::cf::operations, operation_id, raw))
          return err;
      }
    }
    if (!raw && ctx_->kafka() && accepted_elsewhere(operation_id)) {
      // Accepted by another gateway moments ago; its outcome arrives here
      // through registration.completed.
      out = registration_state{};
      out.registration_id = registration_id;
      out.status = registration_status::assigning;
      return {};
    }
    if (!raw || decode_record(*raw, op) || !iequals(op.registration_id, registration_id))
      return {error_code::operation_not_found,
              "no operation '" + operation_id + "' for registration '" + registration_id + "'"};
    if (is_terminal(op.status)) {
      out = op.state;
    } else {
      out = registration_state{};
      out.registration_id = op.registration_id;
      out.status = op.status;
    }
    return {};
  }

  error registration(const std::string& registration_id, registration_state& out) override {
    std::optional<std::string> raw;
    if (auto err = ctx_->store->get(storage::cf::registrations,
                                    enrollment::key_of(registration_id), raw))
      return err;
    if (!raw)
      return {error_code::registration_not_found,
              "no registration record for '" + registration_id + "'"};
    return decode_record(*raw, out);
  }

  error tpm_authentication_key(const std::string& registration_id,
                               const std::string& operation_id, std::string& out) override {
    out.clear();
    attestation::tpm_slots s;
    if (auto err = ctx_->tpm_challenges->load(registration_id, s))
      return err;
    auto& c = s.answered;
    std::optional<std::string> doc;
    if (auto err = ctx_->store->get(storage::cf::enrollments, enrollment::key_of(registration_id),
                                    doc))
      return err;
    enrollment::enrollment_view v;
    const auto* tpm = doc && !enrollment::view_of_text(enrollment::kind::individual, *doc, v)
                        ? std::get_if<enrollment::tpm_attestation>(&v.attestation)
                        : nullptr;
    if (!c || tpm == nullptr) {
      s.cleanse();
      return {error_code::unauthorized_signature,
              "no answered TPM challenge for '" + registration_id + "'"};
    }
    auto ek = crypto::base64_decode(tpm->endorsement_key);
    std::string why;
    out = ek ? attestation::result_authentication_key(*c, *ek, operation_id, why) : std::string();
    s.cleanse();
    if (out.empty())
      return {error_code::internal, "TPM authenticationKey: " + why};
    return {};
  }

  void tpm_authentication_key(std::string registration_id, std::string operation_id,
                              key_cb cb) override {
    auto key = enrollment::key_of(registration_id);
    tpm_worker_.post(std::move(key), [this, id = std::move(registration_id),
                                      op = std::move(operation_id),
                      cb = std::move(cb)](serial_worker::fate f) {
      // Busy: made here, on the caller's thread, rather than refused: the
      // device's registration is done, and a refusal would make it start
      // over with a new challenge.
      if (f == serial_worker::fate::stopped)
        return cb({error_code::unavailable, "the service is stopping"}, {});
      std::string key;
      auto err = tpm_authentication_key(id, op, key);
      cb(std::move(err), std::move(key));
    });
  }

  void tpm_hub_key(std::string registration_id, hub_key_cb cb) override {
    auto key = enrollment::key_of(registration_id);
    tpm_worker_.post(std::move(key), [this, id = std::move(registration_id),
                                      cb = std::move(cb)](serial_worker::fate f) {
      if (f != serial_worker::fate::run)
        return cb(f == serial_worker::fate::busy
                    ? error{error_code::throttled, "too many TPM requests in progress"}
                    : error{error_code::unavailable, "the service is stopping"},
                  {});
      tpm_hub_key_info out;
      auto err = hub_key_now(id, out);
      cb(std::move(err), std::move(out));
    });
  }

  /// The key the last assignment's answers wrap (tpm_authentication_key):
  /// derived from the answered challenge and the record's last operation.
  error hub_key_now(const std::string& registration_id, tpm_hub_key_info& out) {
    registration_state rs;
    if (auto err = registration(registration_id, rs))
      return err.code == error_code::registration_not_found ? error{} : err;
    if (rs.status != registration_status::assigned || rs.attestation_type != "tpm"
        || rs.last_operation_id.empty())
      return {};
    // Kafka: the record (dps.registrations) and the challenge
    // (dps.enrollments) come from two readers. The operation's answer was
    // applied on dps.enrollments before its record was written, so catching
    // that reader up now, after the record was read, makes the challenge at
    // least as new as the record: a reader behind would still hold the
    // previous answered challenge, and HMAC(old challenge, this operation)
    // is a key nobody holds, under the right operationId.
    if (ctx_->catalog.replicated() && !ctx_->catalog.caught_up(5000))
      return {error_code::unavailable,
              "this gateway could not catch up on dps.enrollments to read the TPM "
              "challenge of the registration's last operation; retry after the "
              "Retry-After interval"};
    attestation::tpm_slots s;
    if (auto err = ctx_->tpm_challenges->load(registration_id, s))
      return err;
    // An answered challenge issued after the assignment (beyond the clock
    // skew between gateways) belongs to a later register that did not
    // assign (it failed): the record's operation was answered with a
    // challenge that is gone, so its key cannot be made; a key derived from
    // the new challenge would be one the device does not hold. Embedded,
    // one process's clock stamped both: no allowance.
    const int64_t skew_ms =
      ctx_->catalog.replicated()
        ? int64_t{ctx_->opts.cfg.device_api.clock_skew_seconds} * 1000
        : 0;
    if (s.answered && s.answered->issued_s * 1000 <= rs.updated_ms + skew_ms) {
      std::string k = attestation::hub_key(*s.answered, rs.last_operation_id);
      out.primary_key = crypto::base64_encode(k);
      OPENSSL_cleanse(k.data(), k.size());
      out.operation_id = rs.last_operation_id;
      out.assigned_hub = rs.assigned_hub;
      out.device_id = rs.device_id;
    }
    s.cleanse();
    return {};
  }

  void put_enrollment(enrollment::kind k, std::string id, std::string body,
                      std::string if_match, doc_cb cb) override {
    caf::anon_send(enrollment_, put_atom::value, k, std::move(id), std::move(body),
                   std::move(if_match), doc_reply_fn{std::move(cb)});
  }

  void delete_enrollment(enrollment::kind k, std::string id, std::string if_match,
                         done_cb cb) override {
    caf::anon_send(enrollment_, delete_atom::value, k, std::move(id), std::move(if_match),
                   done_reply_fn{std::move(cb)});
  }

  void bulk_enrollments(enrollment::kind k, std::string body, doc_cb cb) override {
    caf::anon_send(enrollment_, bulk_atom::value, k, std::move(body),
                   doc_reply_fn{std::move(cb)});
  }

  void write_certificate(std::string op, std::string name, std::string body,
                         std::string if_match, doc_cb cb) override {
    caf::anon_send(enrollment_, cert_atom::value, std::move(op), std::move(name),
                   std::move(body), std::move(if_match), doc_reply_fn{std::move(cb)});
  }

  error get_certificate(const std::string& name, json& doc) override {
    std::optional<std::string> raw;
    if (auto err = ctx_->store->get(storage::cf::certificates, enrollment::key_of(name), raw))
      return err;
    if (!raw)
      return {error_code::certificate_not_found,
              "CA '" + name + "' is not in the certificate store"};
    auto j = json::parse(*raw, nullptr, false);
    if (j.is_discarded())
      return {error_code::storage_failure, "stored CA '" + name + "' is not valid JSON"};
    doc = std::move(j);
    return {};
  }

  error list_certificates(std::vector<json>& docs, std::vector<std::string>& unreadable) override {
    return ctx_->store->scan_tolerant(
      storage::cf::certificates, "", 0,
      [&](std::string_view k, std::string_view v) {
        auto j = json::parse(v, nullptr, false);
        if (j.is_discarded() || !j.is_object())
          unreadable.push_back(std::string(k) + ": not valid JSON");
        else
          docs.push_back(std::move(j));
        return true;
      },
      [&](std::string_view k, const error& why) {
        unreadable.push_back(std::string(k) + ": " + why.message);
        return true;
      });
  }

  error list_hubs(std::vector<json>& docs) override {
    auto set = ctx_->hubs.hubs();
    for (const auto& h : *set)
      docs.push_back(public_hub(ctx_->hubs, h));
    return {};
  }

  error get_hub(const std::string& hostname, json& doc) override {
    auto set = ctx_->hubs.hubs();
    for (const auto& h : *set)
      if (allocation::hub_key(h.hostname) == allocation::hub_key(hostname)) {
        doc = public_hub(ctx_->hubs, h);
        return {};
      }
    return {error_code::linked_hub_not_found, "'" + hostname + "' is not a linked IoT hub"};
  }

  void put_hub(std::string hostname, std::string body, doc_cb cb) override {
    caf::anon_send(enrollment_, hub_atom::value, std::string("put"), std::move(hostname),
                   std::move(body), doc_reply_fn{std::move(cb)});
  }

  void delete_hub(std::string hostname, done_cb cb) override {
    caf::anon_send(enrollment_, hub_atom::value, std::string("delete"), std::move(hostname),
                   std::string(), doc_reply_fn{[cb = std::move(cb)](error e, std::string) {
                     cb(std::move(e));
                   }});
  }

  error get_enrollment(enrollment::kind k, const std::string& id, json& doc) override {
    std::optional<std::string> raw;
    if (auto err = ctx_->store->get(family_of(k), enrollment::key_of(id), raw))
      return err;
    if (!raw)
      return {k == enrollment::kind::individual ? error_code::enrollment_not_found
                                                : error_code::enrollment_group_not_found,
              (k == enrollment::kind::individual ? "individual enrollment '"
                                                 : "enrollment group '")
                + id + "' does not exist"};
    auto j = json::parse(*raw, nullptr, false);
    if (j.is_discarded())
      return {error_code::storage_failure, "stored enrollment is not valid JSON"};
    doc = std::move(j);
    return {};
  }

  error query_enrollments(enrollment::kind k, const std::string& continuation,
                          std::size_t max_items, std::vector<json>& page,
                          std::string& next, std::vector<std::string>& unreadable) override {
    page.clear();
    next.clear();
    unreadable.clear();
    if (auto err = check_continuation(continuation, k == enrollment::kind::group))
      return err;
    std::string last;
    bool more = false;
    // No scan limit: skipped entries do not fill the page. Once the page is
    // full, the next entry (readable or not) only says there is more; an
    // unreadable one is then reported by the page that starts at it, so a
    // client paging through everything meets each one once.
    auto err = ctx_->store->scan_tolerant(
      family_of(k), after_key(continuation), 0,
      [&](std::string_view key, std::string_view v) {
        if (page.size() == max_items) {
          more = true;
          return false;
        }
        auto j = json::parse(v, nullptr, false);
        if (j.is_discarded() || !j.is_object())
          unreadable.push_back(std::string(key) + ": not valid JSON");
        else
          page.push_back(std::move(j));
        last = std::string(key);
        return true;
      },
      [&](std::string_view key, const error& why) {
        if (page.size() == max_items) {
          more = true;
          return false;
        }
        unreadable.push_back(std::string(key) + ": " + why.message);
        last = std::string(key);
        return true;
      });
    if (more)
      next = last;
    return err;
  }

  void delete_registration(std::string id, std::string if_match, done_cb cb) override {
    caf::anon_send(enrollment_, deletereg_atom::value, std::move(id), std::move(if_match),
                   done_reply_fn{std::move(cb)});
  }

  error query_registrations(const std::string& group_id, const std::string& continuation,
                            std::size_t max_items, std::vector<registration_state>& page,
                            std::string& next, std::vector<std::string>& unreadable) override {
    page.clear();
    next.clear();
    unreadable.clear();
    if (auto err = check_continuation(continuation, false))
      return err;
    std::string last;
    bool more = false;
    // Undecodable records met once the page is full: the next page (which
    // starts after `last`) meets them again and reports them, unless there
    // is no next page.
    std::vector<std::string> after_full;
    auto err = ctx_->store->scan(storage::cf::registrations, after_key(continuation), 0,
                                 [&](std::string_view key, std::string_view v) {
                                   registration_state rs;
                                   if (auto bad = decode_record(v, rs)) {
                                     (page.size() == max_items ? after_full : unreadable)
                                       .push_back(std::string(key) + ": " + bad.message);
                                     return true;
                                   }
                                   if (!iequals(rs.enrollment_group_id, group_id))
                                     return true;
                                   if (page.size() == max_items) {
                                     more = true;
                                     return false;
                                   }
                                   page.push_back(std::move(rs));
                                   last = std::string(key);
                                   return true;
                                 });
    if (more)
      next = last;
    else
      unreadable.insert(unreadable.end(), after_full.begin(), after_full.end());
    return err;
  }

  error read_assignments(uint64_t after, std::size_t limit, std::vector<json>& events,
                         uint64_t& next) override {
    events.clear();
    next = after;
    return ctx_->store->scan(storage::cf::outbox, storage::seq_key(after + 1), limit,
                             [&](std::string_view key, std::string_view v) {
                               auto j = json::parse(v, nullptr, false);
                               if (!j.is_discarded())
                                 events.push_back(std::move(j));
                               next = storage::parse_seq_key(key);
                               return true;
                             });
  }

  /// A recent operation id minted by another instance (a UUIDv7 less than
  /// two minutes old). Older unknown ids are not found: a completed
  /// operation would have been recorded here by then.
  bool accepted_elsewhere(const std::string& operation_id) const {
    auto created = operation_created_ms(operation_id);
    if (created == 0 || operation_id.find(ctx_->instance_hex) != std::string::npos)
      return false;
    auto age = now_ms() - created;
    return age > -10000 && age < 120000;
  }

  std::size_t inflight() const override {
    auto n = ctx_->inflight.load();
    return n > 0 ? static_cast<std::size_t>(n) : 0;
  }

  void drain() override {
    if (drained_)
      return;
    drained_ = true;
    ctx_->accepting = false;
    // Let accepted work settle for a moment (with every role in one Kafka
    // process, its own stages carry it); whatever is left stays in
    // `pending` and resumes on the next start.
    auto settle = [this](auto busy) {
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (busy() && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    };
    settle([this] { return ctx_->inflight.load() > 0; });
    // Then no new stage input; finish the operations already begun.
    ctx_->stage_intake = false;
    settle([this] { return ctx_->relaying.load() > 0; });
    // Leave the stage groups now, not at the end of the shutdown: the
    // other members take the partitions over while this process stops.
    ctx_->bus->stop_consuming(); // in process: nothing to stop
    // Registers still parked for their outcome get their 202 now.
    if (registration_) {
      caf::scoped_actor self{*sys_};
      self->request(registration_, std::chrono::seconds(5), drain_atom::value)
        .receive([](std::size_t) {},
                 [](caf::error&) {}); // the actor is gone: nothing parked either
    }
  }

  void shutdown() override {
    if (stopped_)
      return;
    stopped_ = true;
    drain();
    // Queued TPM registers get 503; the running one finishes first (it may
    // still hand its register to the registration actor).
    tpm_worker_.stop();
    if (ctx_->prober)
      ctx_->prober->stop();
    // Kafka: stop the table readers while the store still takes writes.
    if (ctx_->repl)
      ctx_->repl->close();
    // Finish our commits while the actors can still receive their
    // callbacks; later ones fail. The store is the caller's: it stays open.
    ctx_->stop_commits();
    each_stage([](auto& a) {
      if (a)
        caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
    });
    // Drop every strong handle (bus subscriptions hold some), otherwise the
    // detached actors' threads wait forever for their last reference.
    for (int t = 0; t < bus::topic_count; ++t)
      ctx_->bus->subscribe(static_cast<bus::topic>(t), nullptr);
    each_stage([](auto& a) { a = std::decay_t<decltype(a)>{}; });
    sys_.reset(); // waits for all actors
    // The sink refers to the bus, and the context may outlive the engine (a
    // scrape's gauge locks it): gone first. The producer's pending callbacks
    // do not use the sink; they reach the stages by weak handles, dead now.
    ctx_->sink.reset();
    // Kafka: closes the consumers (committing what was acked) and flushes the
    // producer. Nothing uses the bus any more.
    ctx_->bus.reset();
  }

  std::size_t resumed() const { return resumed_; }

private:
  /// `f` on each stage's handle (their types differ: the typed ones).
  template <class F>
  void each_stage(F f) {
    f(registration_);
    f(attestation_);
    f(allocation_);
    f(configuration_);
    f(enrollment_);
  }

  engine_context_ptr ctx_;
  /// What attest() reads, on the gateway's threads and in the stage.
  const attestation_deps checks_;
  throttling::rate_limiter group_registrations_;
  caf::actor_system_config cfg_;
  std::unique_ptr<caf::actor_system> sys_;
  configuration_input_type configuration_; ///< either mode's stage
  enrollment_actor_type enrollment_;
  registration_actor_type registration_;
  attestation_actor_type attestation_;
  allocation_actor_type allocation_;
  /// TPM requests on their own threads (register_tpm), one registration
  /// id's in order (device_api.tpm_threads). The bounds keep unauthenticated
  /// challenge requests from queueing without limit: beyond 1024 queued in
  /// all, or 8 queued for one id (a device's challenge, answer and polls
  /// need a few; a flood for one id must not take every other id's room),
  /// a TPM request gets 429.
  keyed_workers tpm_worker_{static_cast<std::size_t>(ctx_->opts.cfg.device_api.tpm_threads),
                            1024, 8};
  std::size_t resumed_ = 0;
  bool drained_ = false;
  bool stopped_ = false;
};

} // namespace

void engine_context::commit(storage::write_batch batch, storage::store::done_fn done) {
  bool stopped = false;
  {
    std::lock_guard<std::mutex> guard{commits_mtx};
    stopped = commits_stopped;
    if (!stopped)
      ++commits_inflight;
  }
  if (stopped) // outside the lock: `done` may commit again
    return done({error_code::unavailable, "engine stopped"});
  store->commit(std::move(batch), [this, done = std::move(done)](const error& e) mutable {
    done(e);
    done = nullptr; // its actor handles go before stop_commits() can return
    std::lock_guard<std::mutex> guard{commits_mtx};
    if (--commits_inflight == 0)
      commits_cv.notify_all();
  });
}

void engine_context::stop_commits() {
  std::unique_lock<std::mutex> lock{commits_mtx};
  commits_stopped = true;
  commits_cv.wait(lock, [this] { return commits_inflight == 0; });
}

namespace {

/// Distributed mode: the stage topics must exist before the consumers
/// subscribe (the producer never auto-creates them). Against librdkafka's mock
/// cluster (dev-kafka, tests) CreateTopics is unsupported, so they must have
/// been created through the mock already; ensure_topics then only checks.
error make_kafka_bus(const config::kafka_config& cfg,
                     std::unique_ptr<bus::kafka::kafka_bus>& out) {
  namespace kafka = bus::kafka;
  // Warnings and errors only: librdkafka's info notices would flood stderr.
  // With kafka.properties.debug set, its debug lines too (asked for).
  const int max_level = cfg.properties.count("debug") ? 7 : 4;
  kafka::log_fn log = [max_level](int level, std::string_view msg) {
    if (level <= max_level)
      std::fprintf(stderr, "provisiond kafka: %.*s\n", static_cast<int>(msg.size()),
                   msg.data());
  };
  if (auto err = kafka::ensure_topics(cfg, kafka::topic_table(cfg), nullptr, 15000, log))
    return {err.code, "kafka topics at " + cfg.brokers + ": " + err.message};
  kafka::kafka_bus::options o;
  o.log = log;
  o.one_consumer = true; // one group membership and fetch loop per process
  if (auto err = kafka::kafka_bus::create(cfg, std::move(o), out))
    return {err.code, "kafka: " + err.message};
  return {};
}

/// allocationPolicy "custom": the webhook calls run on the client's own
/// threads; the policy (and so the engine) owns the client.
error custom_policy_of(const config::custom_allocation_config& c,
                       std::shared_ptr<const allocation::policy>& out) {
  if (!c.ca_file.empty()) {
    std::FILE* f = std::fopen(c.ca_file.c_str(), "rb");
    if (f == nullptr)
      return {error_code::bad_request,
              "custom_allocation.ca_file: cannot read '" + c.ca_file + "'"};
    std::fclose(f);
  }
  net::webhook_client_options o;
  o.ca_file = c.ca_file;
  o.threads = c.threads;
  o.timeout = std::chrono::milliseconds(c.timeout_ms);
  o.retries = c.retries;
  o.retry_backoff = std::chrono::milliseconds(c.retry_backoff_ms);
  auto client = std::make_shared<net::webhook_client>(o);
  // The stage's own deadline (allocation::webhook_budget) comes after every
  // attempt and backoff the client may take for the enrollment's limits.
  allocation::webhook_limits defaults;
  defaults.timeout = o.timeout;
  defaults.retries = o.retries;
  defaults.retry_backoff = o.retry_backoff;
  out = std::make_shared<allocation::custom_policy>(
    [client](allocation::webhook_post post, std::function<void(allocation::webhook_reply)> done) {
      net::webhook_call_limits limits;
      limits.timeout = post.timeout;
      limits.retries = post.retries;
      client->post(std::move(post.url), std::move(post.body), limits,
                   [done = std::move(done)](net::webhook_result r) {
                     allocation::webhook_reply reply;
                     reply.err = std::move(r.err);
                     reply.status = r.status;
                     reply.body = std::move(r.body);
                     reply.attempts = r.attempts;
                     done(std::move(reply));
                   });
    },
    defaults);
  return {};
}

} // namespace

namespace {

/// TPM challenges in the store, two keys per registration id: the answered
/// challenge at the id's key, the pending one at "<id>/pending" ('/' is never
/// in an id). Each write touches its own slot, so with Kafka a challenge
/// issued on one gateway never overwrites an answer applied on another.
/// Called on the TPM worker threads (engine_impl::register_device), several
/// ids at once, and, for polls, on the gateway's threads. Embedded, the writes are not fsync'd: a
/// challenge lost in a machine crash is re-issued cleanly (the device's next
/// register without Authorization), and an answered one lost with it only
/// makes the device register again; the operation record itself is synced.
/// With Kafka the write goes through dps.enrollments (applied here before it
/// returns), so a device may answer on any gateway
/// (docs/device-api.md#tpm-attestation).
class store_challenges final : public attestation::challenge_store {
public:
  store_challenges(engine_context& ctx, std::function<void(const char*)> in_write)
    : ctx_(ctx), in_write_(std::move(in_write)) {}

  error load(std::string_view registration_id, attestation::tpm_slots& out) const override {
    if (auto err = read(registration_id, out))
      return err;
    // Issued by another gateway a moment ago? Caught up at most once per
    // id per interval: a miss needs no credential (any TPM-enrolled id and a
    // well-formed SAS), so it must not buy a catch-up every time. Embedded,
    // a miss is final: no limiter (its mutex and map) on that path.
    if (out.empty() && ctx_.catalog.replicated()
        && catch_ups_.allow(enrollment::key_of(registration_id))
        && ctx_.catalog.caught_up(5000))
      return read(registration_id, out);
    return {};
  }

  error issue(std::string_view registration_id, std::string_view enrollment_etag,
              const attestation::tpm_challenge& c,
              attestation::challenge_write& out) const override {
    out = attestation::challenge_write::enrollment_changed;
    storage::write_batch b;
    b.put(storage::cf::tpm_challenges, pending_key(registration_id),
          attestation::encode_challenge(c));
    bool current = false;
    auto err = ctx_.catalog.write_if_enrollment(enrollment::key_of(registration_id),
                                                enrollment_etag, current, [&] {
                                                  if (in_write_)
                                                    in_write_("issue");
                                                  return write(b);
                                                });
    if (!err && current)
      out = attestation::challenge_write::written;
    return err;
  }

  error promote(std::string_view registration_id, std::string_view enrollment_etag,
                std::string_view verified_key,
                attestation::challenge_write& out) const override {
    out = attestation::challenge_write::enrollment_changed;
    bool current = false;
    // The catalog's lock of this id's stripe, held across the read and the
    // write, makes this a compare-and-set against issue() of the same id
    // (both write under it); other ids' challenge writes go on meanwhile.
    auto err = ctx_.catalog.write_if_enrollment(
      enrollment::key_of(registration_id), enrollment_etag, current, [&]() -> error {
        out = attestation::challenge_write::challenge_changed;
        attestation::tpm_slots s;
        if (auto err = read(registration_id, s))
          return err;
        if (!s.pending || !crypto::equal_constant_time(s.pending->key, verified_key)) {
          s.cleanse();
          return {};
        }
        s.pending->answered = true;
        storage::write_batch b;
        b.put(storage::cf::tpm_challenges, enrollment::key_of(registration_id),
              attestation::encode_challenge(*s.pending));
        b.del(storage::cf::tpm_challenges, pending_key(registration_id));
        s.cleanse();
        if (in_write_)
          in_write_("promote");
        auto err = write(b);
        if (!err)
          out = attestation::challenge_write::written;
        return err;
      });
    return err;
  }

private:
  static std::string pending_key(std::string_view registration_id) {
    return attestation::tpm_pending_slot_key(enrollment::key_of(registration_id));
  }

  error write(const storage::write_batch& b) const {
    return ctx_.catalog.write_shared(b, storage::store::durability::replayable);
  }

  error read(std::string_view registration_id, attestation::tpm_slots& out) const {
    out = attestation::tpm_slots{};
    std::optional<std::string> raw, pending;
    const std::string key = enrollment::key_of(registration_id);
    if (auto err = ctx_.store->get(storage::cf::tpm_challenges, key, raw))
      return err;
    if (auto err = ctx_.store->get(storage::cf::tpm_challenges, key + "/pending", pending))
      return err;
    attestation::tpm_challenge c;
    // Unreadable: as if none. A record at the id's key that is not answered
    // was written before the pending slot existed: it is the pending one.
    if (raw && attestation::decode_challenge(*raw, c))
      (c.answered ? out.answered : out.pending) = std::move(c);
    if (pending && attestation::decode_challenge(*pending, c))
      out.pending = std::move(c);
    return {};
  }

  engine_context& ctx_; // its catalog writes
  std::function<void(const char*)> in_write_; ///< engine_options::in_challenge_write
  mutable once_per_interval catch_ups_{std::chrono::seconds(5)};
};

} // namespace

error engine::start(engine_options opts, std::unique_ptr<engine>& out) {
  if (opts.store == nullptr)
    return {error_code::internal, "engine::start: no store"};
  auto ctx = std::make_shared<engine_context>();
  ctx->store = opts.store;
  ctx->catalog.attach(opts.store);
  bus::kafka::kafka_bus* kbus = nullptr;
  if (opts.cfg.kafka.enabled()) {
    std::unique_ptr<bus::kafka::kafka_bus> b;
    if (auto err = make_kafka_bus(opts.cfg.kafka, b))
      return err;
    kbus = b.get();
    ctx->bus = std::move(b);
  } else {
    ctx->bus = bus::make_inprocess_bus();
  }
  ctx->instance_hex = crypto::hex(crypto::random_bytes(8));
  ctx->mechanisms.add(std::make_unique<attestation::symmetric_key>(
    opts.cfg.device_api.max_sas_lifetime_seconds, opts.cfg.device_api.clock_skew_seconds));
  ctx->mechanisms.add(std::make_unique<attestation::x509>(
    opts.cfg.device_api.max_sas_lifetime_seconds, opts.cfg.device_api.clock_skew_seconds));
  ctx->tpm_challenges = std::make_unique<store_challenges>(*ctx, opts.in_challenge_write);
  if (opts.wrap_challenges)
    ctx->tpm_challenges = opts.wrap_challenges(std::move(ctx->tpm_challenges));
  ctx->mechanisms.add(std::make_unique<attestation::tpm>(
    *ctx->tpm_challenges, opts.cfg.device_api.tpm_challenge_seconds,
    opts.cfg.device_api.max_sas_lifetime_seconds, opts.cfg.device_api.clock_skew_seconds));
  auto hashed = std::make_shared<allocation::hashed_policy>();
  ctx->policies.add(hashed);
  {
    // geoLatency: the hubs' probe RTTs (this process's prober) and the
    // configured regions. The set outlives the policy (both in ctx).
    const auto& gc = opts.cfg.geo_latency;
    allocation::geo_options g;
    g.gateway_region = gc.region;
    g.tie_ms = gc.tie_ms;
    for (const auto& r : gc.client_ranges)
      g.client_ranges.push_back({r.cidr, r.region});
    for (const auto& l : gc.latencies)
      g.latency_ms[{ascii::to_lower(l.from), ascii::to_lower(l.to)}] = l.ms;
    const allocation::hub_set* set = &ctx->hubs;
    ctx->policies.add(std::make_shared<allocation::geo_latency_policy>(
      std::move(g), [set](std::string_view hub) { return set->health(hub).rtt_ms; }));
  }
  ctx->policies.add(std::make_shared<allocation::static_policy>());
  if (opts.cfg.roles.allocation) {
    std::shared_ptr<const allocation::policy> custom;
    if (auto err = custom_policy_of(opts.cfg.custom_allocation, custom))
      return err;
    ctx->policies.add(std::move(custom));
  }
  for (const auto& p : opts.policies)
    ctx->policies.add(p);
  // The configuration stage signs devices' CSRs: only its processes need
  // (and read) the CA keys.
  if (opts.cfg.roles.configuration)
    if (auto err = configuration::certificate_issuer::load(opts.cfg.issuing_cas, ctx->issuer,
                                                           opts.on_certificate_issued))
      return err;
  if (opts.metrics == nullptr)
    ctx->own_metrics = std::make_unique<metrics::instruments>();
  ctx->metrics = opts.metrics ? opts.metrics : ctx->own_metrics.get();
  ctx->opts = std::move(opts);
  if (kbus != nullptr) {
    if (auto err = replication::start(*ctx, *kbus, ctx->repl))
      return {err.code, "kafka: " + err.message};
    ctx->catalog.replicate_through(ctx->repl.get());
    if (ctx->opts.metrics != nullptr) {
      auto* m = ctx->opts.metrics;
      auto dead = kbus->dead_letter_counter();
      auto stats = ctx->kafka_stats;
      m->add_gauge("dps_kafka_dead_letters_total",
                   "Kafka records moved to the dead-letter topic (undecodable, rejected)", "",
                   "", [dead] { return static_cast<double>(dead->load()); });
      m->add_gauge("dps_kafka_resends_total",
                   "Operations handed off again: Kafka acknowledged them, no outcome came", "",
                   "", [stats] { return static_cast<double>(stats->resends.load()); });
      m->add_gauge("dps_kafka_publish_retries_total",
                   "Failed Kafka publishes retried after 1 s", "", "",
                   [stats] { return static_cast<double>(stats->publish_retries.load()); });
      m->add_gauge("dps_kafka_assigned_not_republished_total",
                   "Operations seen again by configuration after their device.assigned was "
                   "published (resends, redeliveries, own retries): answered without a "
                   "second one",
                   "", "",
                   [stats] {
                     return static_cast<double>(stats->assigned_not_republished.load());
                   });
      // Counters shared with the transport: they outlive the bus, and a
      // scrape only loads atomics (no lock held by Kafka I/O, no broker call).
      auto producer = kbus->producer_counters();
      m->add_gauge("dps_kafka_producer_queue",
                   "Records handed to the Kafka producer and not yet acknowledged or failed",
                   "", "", [producer] { return static_cast<double>(producer->pending.load()); });
      m->add_gauge("dps_kafka_producer_rebuilds_total",
                   "Kafka producer handles replaced after a fatal idempotence error", "", "",
                   [producer] { return static_cast<double>(producer->rebuilds.load()); });
      const auto& roles = ctx->opts.cfg.roles;
      const struct {
        const char* stage;
        bool runs;
        bus::topic input;
      } consumed[] = {{"attestation", roles.attestation, bus::topic::registration_requested},
                      {"allocation", roles.allocation, bus::topic::registration_attested},
                      {"configuration", roles.configuration,
                       bus::topic::registration_allocated}};
      for (const auto& c : consumed) {
        if (!c.runs)
          continue;
        m->add_gauge("dps_kafka_consumer_lag",
                     "Records of a stage's input partitions assigned to this process not yet "
                     "handled (high watermark of the last fetch minus the commit point)",
                     "stage", c.stage, [lag = kbus->consumer_lag(c.input)] {
                       return static_cast<double>(lag->load());
                     });
        m->add_gauge("dps_kafka_partitions_assigned",
                     "Partitions of a stage's input topic this process owns now (0 while its "
                     "group rebalances); summed over processes, the topic's partition count",
                     "stage", c.stage, [n = kbus->consumer_partitions(c.input)] {
                       return static_cast<double>(n->load());
                     });
      }
      // Weak: a scrape must not keep the engine alive; after shutdown the
      // tables report 0.
      std::weak_ptr<engine_context> weak = ctx;
      for (const char* table : {"enrollments", "registrations", "completed"})
        m->add_gauge("dps_kafka_table_lag",
                     "Records of a shared-state topic not yet applied to the local store",
                     "table", table, [weak, name = std::string(table)] {
                       auto c = weak.lock();
                       return c && c->repl ? static_cast<double>(c->repl->table_lag(name)) : 0.0;
                     });
    }
  }
  {
    // [[hubs]] seeds the linked hubs on a deployment's first start only.
    std::vector<allocation::linked_hub> seed;
    for (const auto& h : ctx->opts.cfg.hubs)
      seed.push_back(
        {h.hostname, h.allocation_weight, h.apply_allocation_policy, h.region, h.health_endpoint});
    if (auto err = seed_hubs(*ctx, seed, ctx->opts.placeholder_hubs))
      return {err.code, "linked hubs: " + err.message};
    // Health decides allocation, and the service API (gateway role) shows
    // it: each process that does either probes for itself, so what
    // GET /linkedHubs shows is what this process has seen.
    if (ctx->opts.cfg.roles.allocation || ctx->opts.cfg.roles.gateway)
      ctx->prober = std::make_unique<hub_prober>(ctx->hubs, ctx->opts.cfg.hub_health,
                                                 ctx->metrics);
  }
  auto impl = std::make_unique<engine_impl>(ctx);
  if (auto err = impl->start())
    return err;
  out = std::move(impl);
  return {};
}

} // namespace prov
