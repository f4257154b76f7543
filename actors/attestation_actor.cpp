// Attestation stage: proves a device's identity. Symmetric keys only for now
// (X.509 and TPM come later): individual enrollment first, then groups.
//
// attest() is a thread-safe function: the engine calls it on the gateway's
// I/O thread for HTTP registers (two mailbox hops fewer per device). The actor
// serves the same check to stages that receive unattested events (the Kafka
// `registration.requested` intake).
// Accepts: (attest_atom, register_request) -> attestation_result
// Blocking: reads enrollments from RocksDB, so it is spawned detached.

#include <nlohmann/json.hpp>

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
    auto j = nlohmann::json::parse(*doc, nullptr, false);
    if (j.is_discarded())
      return reject(error_code::storage_failure, "stored enrollment is not valid JSON");
    if (auto err = enrollment::view_of(enrollment::kind::individual, j, v))
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
      auto dk = crypto::derive_device_key(*key, req.registration_id);
      if (dk && attestation::signature_matches(tok, *dk)) {
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

caf::behavior attestation_actor(caf::event_based_actor* self, engine_context_ptr ctx) {
  return {
    [ctx](attest_atom, const register_request& req) {
      auto start = std::chrono::steady_clock::now();
      auto r = attest(*ctx, req);
      ctx->metrics->stage_latency(metrics::stage::attestation, seconds_since(start));
      return r;
    },
  };
}

} // namespace prov
