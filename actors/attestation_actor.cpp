// Attestation stage: proves a device's identity. Symmetric keys only for now
// (X.509 and TPM come later): individual enrollment first, then groups.
//
// attest() is a thread-safe function: the engine calls it on the gateway's
// I/O thread for HTTP registers (two mailbox hops fewer per device). The actor
// serves the same check to registrations published straight to Kafka
// (`registration.requested`, docs/events.md): it attests them and publishes
// registration.attested, or registration.completed (failed or disabled).
// The device's credential travels only on registration.requested: it is
// dropped here and never stored or published further.
// Accepts: (attest_atom, register_request) -> attestation_result
//          (event_atom, registration_event, event_ack) from registration.requested
// Acks:    when the published event is durable (as allocation does); fused
//          with a local allocation stage (kafka.fuse_stages, requests that
//          carry their operationId only), when that acks.
// Blocking: reads enrollments from RocksDB, so it is spawned detached.

#include <cstdio>

#include <openssl/crypto.h>


#include "actors/actor_types.hpp"
#include "actors/attestation/sas_token.hpp"
#include "messages/crypto.hpp"

namespace prov {

namespace {

attestation_result reject(error_code code, std::string msg) {
  attestation_result r;
  r.err = error{code, std::move(msg)};
  return r;
}

attestation_result verify_credential(const engine_context& ctx, const register_request& req,
                                     const attestation::sas_token& tok, uint64_t generation);

} // namespace

attestation_result attest(const engine_context& ctx, const register_request& req) {
  using attestation::sas_token;
  const auto& api = ctx.opts.cfg.device_api;
  if (req.authorization.empty())
    return reject(error_code::unauthorized,
                  "missing Authorization header: symmetric key devices send a "
                  "SharedAccessSignature (X.509 and TPM attestation are not supported yet)");
  sas_token tok;
  if (auto err = attestation::parse_sas(req.authorization, tok))
    return reject(err.code, err.message);
  attestation::sas_limits limits;
  limits.now = now_ms() / 1000;
  limits.max_lifetime = api.max_sas_lifetime_seconds;
  limits.clock_skew = api.clock_skew_seconds;
  if (auto err = attestation::check_expiry(tok, limits))
    return reject(error_code::unauthorized_signature, err.message);
  if (!attestation::device_resource_matches(tok, req.id_scope, req.registration_id))
    return reject(error_code::unauthorized_signature,
                  "token resource (sr) does not name " + req.id_scope + "/registrations/"
                    + req.registration_id);
  // Keyed on the exact scope, registration id and token: the resource check
  // is case-insensitive but a group's device key derives from the id as
  // written, so "DEV-A" must not reuse the verdict for "dev-a".
  const auto generation = ctx.enrollment_generation.load();
  std::string cache_key;
  cache_key.reserve(req.id_scope.size() + req.registration_id.size()
                    + req.authorization.size() + 2);
  cache_key.append(req.id_scope).append(1, '\n').append(req.registration_id)
    .append(1, '\n').append(req.authorization);
  attestation_result cached;
  if (ctx.verified.lookup(cache_key, limits.now, generation, cached))
    return cached;
  auto r = verify_credential(ctx, req, tok, generation);
  if (!r.err)
    ctx.verified.insert(std::move(cache_key), tok.expiry, generation, r);
  return r;
}

namespace {

attestation_result verify_credential(const engine_context& ctx, const register_request& req,
                                     const attestation::sas_token& tok, uint64_t generation) {
  // 1. Individual enrollment: it wins over any group (DPS precedence; a
  //    disabled individual enrollment blocks one device of a group).
  std::optional<std::string> doc;
  if (auto err = ctx.store->get(storage::cf::enrollments,
                                enrollment::key_of(req.registration_id), doc))
    return reject(error_code::storage_failure, err.message);
  if (doc) {
    enrollment::enrollment_view v;
    if (auto err = enrollment::view_of_text(enrollment::kind::individual, *doc, v))
      return reject(error_code::storage_failure, err.message);
    if (v.attestation_type != "symmetricKey")
      return reject(error_code::unauthorized_signature,
                    "the enrollment for this registration id uses " + v.attestation_type
                      + " attestation, not symmetricKey");
    if (!attestation::signature_matches(tok, v.primary_key)
        && (v.secondary_key.empty() || !attestation::signature_matches(tok, v.secondary_key)))
      return reject(error_code::unauthorized_signature,
                    "signature mismatch: the token is not signed with the individual "
                    "enrollment's primary or secondary key");
    attestation_result r;
    r.attestation_type = "symmetricKey";
    r.enabled = v.enabled;
    ctx.views.insert(enrollment::key_of(req.registration_id), generation, std::move(v));
    return r;
  }
  // 2. Groups: the device key is HMAC(group key, registration id).
  auto groups = ctx.groups.get();
  for (const auto& g : *groups) {
    if (g.attestation_type != "symmetricKey")
      continue;
    for (const auto* key : {&g.primary_key, &g.secondary_key}) {
      if (key->empty())
        continue;
      auto dk = crypto::derive_device_key_raw(*key, req.registration_id);
      const bool match =
        dk && attestation::signature_matches_raw(
                tok, std::string_view(reinterpret_cast<const char*>(dk->data()), dk->size()));
      if (dk)
        OPENSSL_cleanse(dk->data(), dk->size());
      if (match) {
        attestation_result r;
        r.attestation_type = "symmetricKey";
        r.enrollment_group_id = g.id;
        r.enabled = g.enabled;
        return r;
      }
    }
  }
  return reject(error_code::unauthorized_signature,
                "no enrollment matches: no individual enrollment for this registration "
                "id, and no enrollment group key derives a matching signature");
}

} // namespace

namespace {

/// Whether the registration's recorded assignment is this operation's.
bool assigned_by(const engine_context& ctx, const std::string& registration_id,
                 const std::string& operation_id) {
  std::optional<std::string> raw;
  registration_state prev;
  return !ctx.store->get(storage::cf::registrations, enrollment::key_of(registration_id), raw)
         && raw && !decode_record(*raw, prev) && prev.last_operation_id == operation_id
         && prev.status == registration_status::assigned;
}

/// Operation ids chosen by direct publishers: the shape rule of registration
/// ids (1..128 of A-Z a-z 0-9 - . _ :), which DPS-style ids also meet.
bool valid_operation_id(std::string_view id) { return enrollment::valid_registration_id(id); }

/// A registration.requested event: attest it and build what goes on. `out`
/// never carries the credential; the error is the failed completion's.
error attest_requested(const engine_context& ctx, registration_event& in,
                       registration_event& out, attestation_result& r, bool& attested) {
  attested = false;
  out = registration_event{};
  out.registration_id = in.registration_id;
  out.id_scope = in.id_scope;
  out.api_version = in.api_version;
  out.protocol = "kafka";
  out.payload_json = std::move(in.payload_json);
  // The request record's Kafka timestamp (the bus sets it): a redelivery
  // reproduces it.
  out.accepted_ms = in.accepted_ms > 0 ? in.accepted_ms : now_ms();
  register_request req;
  req.authorization = std::move(in.authorization);
  in.authorization.clear();
  bool own_op = !in.operation_id.empty() && valid_operation_id(in.operation_id);
  out.operation_id = own_op ? in.operation_id : new_operation_id(ctx.instance_hex);
  if (!in.operation_id.empty() && !own_op)
    return {error_code::bad_request,
            "operationId must be 1..128 characters of A-Z a-z 0-9 - . _ :, starting with a "
            "letter or digit and ending with a letter, digit or '-'"};
  if (!enrollment::valid_registration_id(in.registration_id))
    return {error_code::invalid_registration_id,
            "registrationId must be 1..128 characters of A-Z a-z 0-9 - . _ :, starting "
            "with a letter or digit and ending with a letter, digit or '-'"};
  if (enrollment::key_of(in.id_scope) != enrollment::key_of(ctx.opts.id_scope))
    return {error_code::id_scope_not_found,
            "unknown id scope '" + in.id_scope + "' (this instance serves '" + ctx.opts.id_scope
              + "'; with split roles, set the same id_scope in every process's config)"};
  req.id_scope = in.id_scope;
  req.registration_id = in.registration_id;
  req.api_version = in.api_version;
  req.protocol = "kafka";
  r = attest(ctx, req);
  if (r.err && r.err.code == error_code::unauthorized_signature && ctx.kafka()
      && !ctx.repl->catch_up_enrollments(5000))
    // The enrollment may have been written through another instance a
    // moment ago (a factory creates the group, then publishes).
    r = attest(ctx, req);
  req.authorization.clear();
  attested = true;
  return r.err;
}

} // namespace

caf::behavior attestation_actor(caf::event_based_actor* self, engine_context_ptr ctx) {
  return {
    [ctx](attest_atom, const register_request& req) {
      auto start = std::chrono::steady_clock::now();
      auto r = attest(*ctx, req);
      ctx->metrics->stage_latency(metrics::stage::attestation, seconds_since(start));
      return r;
    },
    [ctx](event_atom, registration_event& in, event_ack& ack) {
      auto* m = ctx->metrics;
      m->stage_dequeued(metrics::stage::attestation);
      auto start = std::chrono::steady_clock::now();
      const bool had_credential = in.authorization.rfind("SharedAccessSignature", 0) == 0;
      if (!in.operation_id.empty() && assigned_by(*ctx, in.registration_id, in.operation_id)) {
        // A republished or redelivered request whose operation already
        // assigned the device: nothing to do (its outcome is on
        // registration.completed). Checked before attesting: the token may
        // have expired since. Duplicates still in flight meet in the
        // configuration stage.
        ack();
        return;
      }
      registration_event ev;
      attestation_result r;
      bool attested = false;
      auto err = attest_requested(*ctx, in, ev, r, attested);
      m->stage_latency(metrics::stage::attestation, seconds_since(start));
      if (attested)
        m->attestation_attempt(!err,
                               err ? (had_credential ? "symmetricKey" : "none")
                                   : std::string_view(r.attestation_type),
                               ev.protocol);
      auto next = transport::topic::registration_attested;
      if (err) {
        m->registration_attempt("rejected", "", ev.protocol);
        ev.status = registration_status::failed;
        ev.error_code = static_cast<int32_t>(err.code);
        ev.error_message = err.message;
        ev.completed_ms = ev.accepted_ms; // as reproducible as the input
        next = transport::topic::registration_completed;
      } else {
        ev.attestation_type = r.attestation_type;
        ev.enrollment_group_id = r.enrollment_group_id;
        ev.attested_ms = ev.accepted_ms;
        if (!r.enabled) {
          // As over HTTP: terminal at once.
          m->registration_attempt("disabled", "", ev.protocol);
          m->operation_finished("disabled", 0.0);
          ev.status = registration_status::disabled;
          ev.error_code = static_cast<int32_t>(error_code::unauthorized_signature);
          ev.error_message = "the enrollment is disabled";
          ev.completed_ms = ev.accepted_ms;
          next = transport::topic::registration_completed;
        }
      }
      if (const auto& local = ctx->in_process[static_cast<std::size_t>(next)];
          local && !in.operation_id.empty()) {
        // Fused with a local allocation stage: it acks this input. Only for
        // publisher-chosen operation ids: a redelivered request without one
        // would get a new id here, and a second operation.
        local(std::move(ev), std::move(ack.fn));
        return;
      }
      auto op_id = ev.operation_id;
      ctx->bus->publish_durable(next, std::move(ev),
                                [ack = std::move(ack), op_id](const error& e) {
                                  if (!e) {
                                    ack();
                                    return;
                                  }
                                  std::fprintf(stderr,
                                               "provisiond: attestation of %s: publish "
                                               "failed, left for redelivery: %s\n",
                                               op_id.c_str(), e.message.c_str());
                                });
    },
  };
}

} // namespace prov
