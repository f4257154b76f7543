// Attestation stage: proves a device's identity with the mechanism that reads
// its credential (actors/attestation/mechanism.hpp): the individual
// enrollment first, then the groups.
//
// attest() is a thread-safe function: the engine calls it on the gateway's
// I/O thread for HTTP registers (two mailbox hops fewer per device). The actor
// serves the same check to registrations published straight to Kafka
// (`registration.requested`, docs/events.md): it attests them and publishes
// registration.attested, or registration.completed (failed or disabled).
// The device's credential travels only on registration.requested: it is
// dropped here and never stored or published further.
// Accepts: (event_atom, registration_event, event_ack) from registration.requested
// Emits:   through the stage sink (actors/stage_sink.hpp).
// Acks:    when the published event is durable (as allocation does); fused
//          with a local allocation stage (kafka.fuse_stages, requests that
//          carry their operationId only), when that acks.
// Blocking: reads enrollments from RocksDB, so it is spawned detached.

#include "actors/attestation/tpm.hpp"
#include "actors/attestation_actor.hpp"
#include "metrics/instruments.hpp"

namespace prov {

using attestation::verdict;

namespace {

verdict check(const attestation_deps& ctx, const register_request& req,
              const attestation::request_facts& facts, const attestation::mechanism& mech,
              const attestation::proof& p, uint64_t generation, bool* tpm_deferred);

} // namespace

verdict attest(const attestation_deps& ctx, const register_request& req, bool registering,
               bool* tpm_deferred) {
  const attestation::mechanism* mech = ctx.mechanisms.reading(req.credential);
  attestation::request_facts facts;
  facts.id_scope = req.id_scope;
  facts.registration_id = req.registration_id;
  facts.now_s = now_ms() / 1000;
  facts.registering = registering;
  if (tpm_deferred != nullptr && mech != nullptr && mech->type() == attestation_type::tpm) {
    // Opening reads no store and makes no RSA: malformed keys and a SAS
    // that cannot be right (format, resource, expiry) are refused here, so
    // they never take a slot of the TPM worker's bounded queue.
    std::unique_ptr<attestation::proof> p;
    if (auto err = mech->open(req.credential, facts, p))
      return verdict::rejected(err.code, std::move(err.message));
    *tpm_deferred = true;
    return {};
  }
  if (mech == nullptr)
    return verdict::rejected(
      error_code::unauthorized,
      std::holds_alternative<std::monostate>(req.credential)
        ? "no credential: symmetric key devices send a SharedAccessSignature in the "
          "Authorization header, X.509 devices a client certificate in the TLS handshake, "
          "TPM devices their tpm.endorsementKey in the register body"
        : "this server does not accept this kind of credential");
  std::unique_ptr<attestation::proof> p;
  if (auto err = mech->open(req.credential, facts, p))
    return verdict::rejected(err.code, std::move(err.message));
  // Keyed on the exact scope, registration id and credential: a resource
  // check may be case-insensitive but a group's device key derives from the
  // id as written, so "DEV-A" must not reuse the verdict for "dev-a".
  const auto generation = ctx.catalog.generation();
  const std::string_view identity = p->identity();
  std::string cache_key;
  if (!identity.empty()) {
    cache_key.reserve(req.id_scope.size() + req.registration_id.size() + identity.size() + 2);
    cache_key.append(req.id_scope).append(1, '\n').append(req.registration_id)
      .append(1, '\n').append(identity);
    verdict cached;
    if (ctx.catalog.verified().lookup(cache_key, facts.now_s, generation, cached))
      return cached;
  }
  auto v = check(ctx, req, facts, *mech, *p, generation, tpm_deferred);
  if (tpm_deferred != nullptr && *tpm_deferred)
    return v;
  // A TPM device's SAS answers its challenge once: never from the cache.
  if (v.is_accepted() && !identity.empty() && v.type != attestation_type::tpm)
    ctx.catalog.verified().insert(std::move(cache_key), p->valid_until(), generation, v);
  return v;
}

namespace {

/// dps_tpm_challenges_total: a challenge issued, or a register's answer to
/// one accepted or refused (polls and status lookups are not answers).
void count_tpm(const attestation_deps& ctx, const attestation::request_facts& facts,
               bool answering, const verdict& r) {
  if (ctx.metrics == nullptr)
    return;
  if (r.result == verdict::outcome::challenge)
    ctx.metrics->tpm_challenge("issued");
  else if (answering && facts.registering)
    ctx.metrics->tpm_challenge(r.is_accepted() ? "answered" : "rejected");
}

verdict check(const attestation_deps& ctx, const register_request& req,
              const attestation::request_facts& facts, const attestation::mechanism& mech,
              const attestation::proof& p, uint64_t generation, bool* tpm_deferred) {
  // 1. Individual enrollment: it wins over any group (DPS precedence; a
  //    disabled individual enrollment blocks one device of a group).
  std::optional<std::string> doc;
  if (auto err = ctx.store->get(storage::cf::enrollments,
                                enrollment::key_of(req.registration_id), doc))
    return verdict::rejected(error_code::storage_failure, std::move(err.message));
  if (doc) {
    enrollment::enrollment_view v;
    if (auto err = enrollment::view_of_text(enrollment::kind::individual, *doc, v))
      return verdict::rejected(error_code::storage_failure, std::move(err.message));
    if (const auto* tpm = ctx.mechanisms.of_type(attestation_type::tpm);
        tpm != nullptr && type_of(v.attestation) == attestation_type::tpm
        && std::holds_alternative<sas_credential>(req.credential)) {
      // A TPM device's polls and status lookups carry only the SAS signed
      // with its challenge's key (no body): the TPM mechanism checks it.
      // Deferred only after attest() opened it as a device SAS (format,
      // resource, expiry): garbage never reaches the TPM worker's queue.
      if (tpm_deferred != nullptr) {
        *tpm_deferred = true;
        return {};
      }
      tpm_credential answer;
      answer.sas_token = std::get<sas_credential>(req.credential).token;
      std::unique_ptr<attestation::proof> tp;
      if (auto err = tpm->open(answer, facts, tp)) {
        auto r = verdict::rejected(err.code, std::move(err.message));
        count_tpm(ctx, facts, true, r);
        return r;
      }
      auto r = tp->check_individual(v);
      count_tpm(ctx, facts, true, r);
      return r;
    }
    if (type_of(v.attestation) != mech.type())
      return verdict::rejected(error_code::unauthorized_signature,
                               "the enrollment for this registration id uses "
                                 + std::string(to_string(type_of(v.attestation)))
                                 + " attestation, not " + std::string(to_string(mech.type())));
    auto r = p.check_individual(v);
    if (mech.type() == attestation_type::tpm)
      count_tpm(ctx, facts, !std::get<tpm_credential>(req.credential).sas_token.empty(), r);
    if (r.is_accepted())
      ctx.catalog.views().insert(enrollment::key_of(req.registration_id), generation, std::move(v));
    return r;
  }
  // 2. Groups, as the mechanism orders them.
  return p.check_groups(*ctx.catalog.groups());
}

} // namespace

namespace {

/// Whether the registration's recorded assignment is this operation's.
bool assigned_by(const attestation_deps& ctx, const std::string& registration_id,
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
error attest_requested(const attestation_deps& ctx, registration_event& in,
                       registration_event& out, verdict& r, bool& attested) {
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
  // As over HTTPS, a SAS token wins over a certificate chain.
  if (!in.authorization.empty() || !in.x509_presented)
    req.credential = credential_of_authorization(std::move(in.authorization));
  else
    req.credential = *in.x509_presented; // carries its proof of possession
  in.authorization.clear();
  in.x509_presented.reset();
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
  if (enrollment::key_of(in.id_scope) != enrollment::key_of(ctx.id_scope))
    return {error_code::id_scope_not_found,
            "unknown id scope '" + in.id_scope + "' (this instance serves '" + ctx.id_scope
              + "'; with split roles, set the same id_scope in every process's config)"};
  req.id_scope = in.id_scope;
  req.registration_id = in.registration_id;
  req.api_version = in.api_version;
  req.protocol = "kafka";
  // A TPM-enrolled id is refused before any challenge is read or written:
  // that would block this stage's thread on Kafka, and a direct publisher
  // has no TPM flow (docs/events.md#tpm-devices-cannot-publish-directly).
  bool tpm = false;
  r = attest(ctx, req, true, &tpm);
  if (!tpm && r.err && r.err.code == error_code::unauthorized_signature
      && ctx.catalog.caught_up(5000))
    // The enrollment may have been written through another instance a
    // moment ago (a factory creates the group, then publishes).
    r = attest(ctx, req, true, &tpm);
  if (tpm)
    r = attestation::tpm_refused_on_kafka(req.registration_id);
  req.credential = std::monostate{};
  attested = true;
  return r.err;
}

} // namespace

// -- attestation_actor ----------------------------------------------------------

attestation_actor::attestation_actor(caf::actor_config& cfg, attestation_deps deps)
  : attestation_actor_type::base(cfg), deps_(std::move(deps)) {}

attestation_actor::behavior_type attestation_actor::make_behavior() {
  auto out = std::make_shared<stage_output>();
  out->stage = "attestation";
  out_ = std::move(out);
  return {
    [this](event_atom, registration_event& in, event_ack& ack) { on_requested(in, ack); },
  };
}

void attestation_actor::on_requested(registration_event& in, event_ack& ack) {
  auto* m = deps_.metrics;
  m->stage_dequeued(metrics::stage::attestation);
  auto start = std::chrono::steady_clock::now();
  // Before attest_requested moves the credential out.
  const attestation_type tried =
    !in.authorization.empty() ? deps_.mechanisms.attempted(sas_credential{})
    : in.x509_presented       ? attestation_type::x509
                              : attestation_type::none;
  if (!in.operation_id.empty() && assigned_by(deps_, in.registration_id, in.operation_id)) {
    // A republished or redelivered request whose operation already
    // assigned the device: nothing to do (its outcome is on
    // registration.completed). Checked before attesting: the token may
    // have expired since. Duplicates still in flight meet in the
    // configuration stage.
    ack();
    return;
  }
  registration_event ev;
  verdict r;
  bool attested = false;
  auto err = attest_requested(deps_, in, ev, r, attested);
  m->stage_latency(metrics::stage::attestation, seconds_since(start));
  if (attested)
    m->attestation_attempt(
      !err,
      to_string(!err ? r.type : tried),
      ev.protocol);
  auto next = bus::topic::registration_attested;
  if (err) {
    m->registration_attempt("rejected", "", ev.protocol);
    ev.status = registration_status::failed;
    ev.error_code = static_cast<int32_t>(err.code);
    ev.error_message = err.message;
    ev.completed_ms = ev.accepted_ms; // as reproducible as the input
    next = bus::topic::registration_completed;
  } else {
    ev.attestation_type = to_string(r.type);
    ev.enrollment_group_id = r.enrollment_group_id;
    ev.x509_json = r.x509_json;
    ev.key_used = r.key_used;
    ev.attested_ms = ev.accepted_ms;
    if (!r.enabled) {
      // As over HTTP: terminal at once.
      m->registration_attempt("disabled", "", ev.protocol);
      m->operation_finished("disabled", 0.0);
      configuration::mark_disabled(ev);
      ev.completed_ms = ev.accepted_ms;
      next = bus::topic::registration_completed;
    }
  }
  // Fused with a local allocation stage, it acks this input. Only for
  // publisher-chosen operation ids: a redelivered request without one
  // would get a new id here, and a second operation. A failed publish
  // is left for redelivery (no retry here).
  deps_.sink->forward(out_, next, std::move(ev), std::move(ack.fn),
                      in.operation_id.empty() ? stage_sink::route::bus
                                              : stage_sink::route::nearest);
}

} // namespace prov
