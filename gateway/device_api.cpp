#include "gateway/device_api.hpp"

#include <cstdio>

#include <nlohmann/json.hpp>

#include "actors/attestation/tpm.hpp"
#include "actors/configuration/certificate_issuer.hpp"
#include "messages/ascii.hpp"
#include "messages/json_body.hpp"
#include "messages/json_text.hpp"
#include "messages/registration.hpp"
#include "metrics/instruments.hpp"

namespace prov::gateway {

using ascii::iequals;
using nlohmann::json;

namespace {

/// A base64 PKCS#10 request of an RSA 8192 key is ~1.5 KB of DER, 2 KB of
/// base64: this leaves room and still bounds what travels on the event.
constexpr std::size_t max_csr_chars = 16384;

/// The register body an SDK sends without a payload, exactly as
/// JSON.stringify writes it: {"registrationId":"<id>"}, the id a valid
/// registration id (so nothing in it is escaped, and no second member can
/// hide in it). Read without the JSON parser, which cost 3% of the server's
/// instructions per device; any other body (spaces, more members, escapes) is
/// parsed.
bool minimal_register_body(std::string_view body, std::string_view& id) {
  constexpr std::string_view head = "{\"registrationId\":\"";
  constexpr std::string_view tail = "\"}";
  if (body.size() < head.size() + tail.size() || body.substr(0, head.size()) != head
      || body.substr(body.size() - tail.size()) != tail)
    return false;
  id = body.substr(head.size(), body.size() - head.size() - tail.size());
  return enrollment::valid_registration_id(id);
}

/// A TPM device's assigned result also carries
/// registrationState.tpm.authenticationKey (its IoT Hub key, for the TPM to
/// import; the C and Node SDKs require it). `text` is an operation status
/// (`nested`) or a registration state. Without the key the device cannot
/// use its assignment, so a failure is the answer (and logged), never a
/// result silently missing the key.
bool needs_tpm_key(const registration_state& st) {
  return st.attestation_type == "tpm" && st.status == registration_status::assigned;
}

[[nodiscard]] error with_tpm_key(error err, std::string key, const registration_state& st,
                                 const std::string& operation_id, bool nested,
                                 std::string& text) {
  json j;
  if (!err) {
    j = json::parse(text, nullptr, false);
    if (j.is_discarded())
      err = {error_code::internal, "the assigned result is not JSON"};
  }
  if (err) {
    std::fprintf(stderr,
                 "provisiond: TPM device '%s' (operation %s): no tpm.authenticationKey for its "
                 "assigned result: %s\n",
                 st.registration_id.c_str(), operation_id.c_str(), err.message.c_str());
    return {err.code, "the TPM device's authenticationKey cannot be made: " + err.message};
  }
  json& rs = nested ? j["registrationState"] : j;
  rs["tpm"] = {{"authenticationKey", std::move(key)}};
  text = j.dump();
  return {};
}

/// For polls and status lookups: a TPM device's run on the engine's TPM
/// worker (engine::authenticate_device), so this RSA work is done there.
[[nodiscard]] error add_tpm_key(engine& eng, const registration_state& st,
                                const std::string& operation_id, bool nested,
                                std::string& text) {
  if (!needs_tpm_key(st))
    return {};
  std::string key;
  error err = eng.tpm_authentication_key(st.registration_id, operation_id, key);
  return with_tpm_key(std::move(err), std::move(key), st, operation_id, nested, text);
}

device_answer ok(int status, std::string body, int retry_after_s = 0) {
  device_answer a;
  a.status = status;
  a.body = std::move(body);
  a.retry_after_s = retry_after_s;
  return a;
}

/// A refused credential check; a full TPM worker queue (throttled) or a
/// stopping service says when to come back.
device_answer refusal(const error& e, const std::string& tracking, int retry_after_s) {
  auto a = device_api::device_failure(e, tracking);
  if (e.code == error_code::throttled || e.code == error_code::unavailable)
    a.retry_after_s = retry_after_s;
  return a;
}

} // namespace

device_api::device_api(engine& eng, std::string id_scope, int retry_after_s,
                       const config::throttling_config& quotas,
                       metrics::instruments* metrics)
  : eng_(eng), id_scope_(std::move(id_scope)), retry_after_s_(retry_after_s),
    metrics_(metrics),
    scope_registrations_(quotas.registrations_per_minute_per_scope, std::chrono::minutes(1), 1),
    device_polls_(quotas.polls_per_device, std::chrono::seconds(quotas.poll_window_seconds),
                  static_cast<std::size_t>(quotas.max_tracked_keys)),
    address_requests_(quotas.requests_per_minute_per_address, std::chrono::minutes(1),
                      static_cast<std::size_t>(quotas.max_tracked_keys)) {}

int device_api::admit_address(const std::string& client_ip) {
  const int wait = address_requests_.take(client_ip);
  if (wait > 0 && metrics_ != nullptr)
    metrics_->throttled("client_request_rate");
  return wait;
}

bool device_api::admitted(const device_call& call, const answer_fn& answer) {
  int wait = 0;
  const char* reason = "";
  if (call.what == device_call::kind::register_device) {
    wait = scope_registrations_.take(id_scope_);
    reason = "scope_registration_rate";
  } else if (call.what == device_call::kind::poll && device_polls_.enabled()) {
    // Ids are case-insensitive: "DEV-1" and "dev-1" share one quota.
    wait = device_polls_.take(enrollment::key_of(call.registration_id));
    reason = "device_poll_rate";
  }
  if (wait == 0)
    return true;
  if (metrics_ != nullptr)
    metrics_->throttled(reason);
  auto a = device_failure({error_code::throttled,
                    call.what == device_call::kind::poll
                      ? "too many operation polls for this device; retry after the "
                        "Retry-After interval"
                      : "too many registrations for this ID scope; retry after the "
                        "Retry-After interval"},
                   call.tracking_id);
  a.retry_after_s = wait;
  answer(std::move(a));
  return false;
}

device_answer device_api::failure(const error& e, const std::string& tracking_id) {
  device_answer a;
  a.status = e.status();
  if (a.status < 400 || a.status > 599)
    a.status = 500;
  a.body = error_body(e, tracking_id);
  a.err = e;
  return a;
}

device_answer device_api::device_failure(const error& e, const std::string& tracking_id) {
  auto a = failure(e, tracking_id);
  if (a.status == 500) {
    // A server-side failure's message names the data dir, the key file or
    // key ids (storage, secrets): none of the device's business. The device
    // gets the tracking id; the operation log has the message (a.err) under it.
    std::string msg = "the service could not complete the request";
    if (!tracking_id.empty())
      msg += "; trackingId " + tracking_id + " identifies it in the server's log";
    a.body = error_body({e.code, std::move(msg)}, tracking_id);
  }
  return a;
}

void device_api::handle(device_call call, const answer_fn& answer) {
  auto fail = [&](error e) { answer(device_failure(e, call.tracking_id)); };
  if (!iequals(call.id_scope, id_scope_))
    return fail({error_code::id_scope_not_found, "unknown id scope '" + call.id_scope + "'"});
  if (!enrollment::valid_registration_id(call.registration_id))
    return fail({error_code::invalid_registration_id,
                 "invalid registration id: 1..128 characters of A-Z a-z 0-9 - . _ :, "
                 "starting with a letter or digit and ending with a letter, digit or '-'"});
  if (call.api_version.empty())
    return fail({error_code::missing_api_version,
                 "the api-version query parameter is required (e.g. 2021-06-01)"});
  if (!admitted(call, answer))
    return;
  register_request rr;
  rr.id_scope = id_scope_;
  rr.registration_id = call.registration_id;
  rr.api_version = call.api_version;
  rr.credential = std::move(call.credential);
  rr.protocol = call.protocol;
  rr.client_ip = call.client_ip;
  rr.correlation_id = call.tracking_id;
  if (call.what == device_call::kind::poll) {
    // Node sends "{}" on this GET; the body is ignored. The rest runs where
    // the credential was checked: here, or for a TPM device on the engine's
    // TPM worker (its challenge read and its key's RSA work stay off this
    // I/O thread).
    return eng_.authenticate_device(
      std::move(rr), [eng = &eng_, answer, tracking = call.tracking_id,
                      id = std::move(call.registration_id), op = std::move(call.operation_id),
                      retry_after = retry_after_s_](error err) {
        if (err)
          return answer(refusal(err, tracking, retry_after));
        if (!op)
          return answer(device_failure({error_code::bad_request, "malformed operation id"},
                                       tracking));
        registration_state st;
        if (auto e = eng->operation(id, *op, st))
          return answer(device_failure(e, tracking));
        const bool pending = st.status == registration_status::assigning;
        auto text = operation_status_text(*op, st);
        if (auto e = add_tpm_key(*eng, st, *op, true, text))
          return answer(device_failure(e, tracking));
        answer(ok(pending ? 202 : 200, std::move(text), pending ? retry_after : 0));
      });
  }
  if (call.body_framing)
    return fail(call.body_framing);
  const bool reg = call.what == device_call::kind::register_device;
  if (std::string_view body_id; reg && minimal_register_body(call.body, body_id)) {
    if (!iequals(body_id, call.registration_id))
      return fail({error_code::id_mismatch, "registrationId in the body does not match the path"});
    rr.force_registration = call.force_registration;
    return register_device(std::move(rr), call, answer);
  }
  json body = json::object();
  if (!call.body.empty()) {
    if (auto err = parse_json_body(call.body, body))
      return fail(err);
    if (!body.is_object())
      return fail({error_code::malformed_json, "the body must be a JSON object"});
  }
  if (auto it = body.find("registrationId"); it != body.end() && !it->is_null()) {
    if (!it->is_string() || !iequals(it->get<std::string>(), call.registration_id))
      return fail({error_code::id_mismatch, "registrationId in the body does not match the path"});
  }
  if (auto it = body.find("tpm"); it != body.end() && !it->is_null()) {
    // TPM attestation: the keys from the body, and the SAS (Authorization)
    // that answers the challenge on the second register.
    tpm_credential tc;
    if (auto err = attestation::read_tpm_member(*it, tc))
      return fail(err);
    if (auto* sas = std::get_if<sas_credential>(&rr.credential))
      tc.sas_token = std::move(sas->token);
    else if (!std::holds_alternative<std::monostate>(rr.credential))
      return fail({error_code::bad_request,
                   "a TPM register carries no client certificate: tpm or x509, not both"});
    rr.credential = std::move(tc);
  }
  if (auto it = body.find("payload"); it != body.end() && !it->is_null()) {
    if (!it->is_object())
      return fail({error_code::bad_request, "payload must be a JSON object"});
    rr.payload_json = it->dump();
  }
  // RegisterDeviceAndIssueCertificate: only its shape here; the
  // configuration stage decodes, checks and signs it (docs/x509.md).
  if (auto it = body.find("csr"); reg && it != body.end() && !it->is_null()) {
    if (!it->is_string())
      return fail({error_code::invalid_csr, "csr must be a string (base64 DER PKCS#10)"});
    if (it->get_ref<const std::string&>().size() > max_csr_chars)
      return fail({error_code::invalid_csr, "csr is longer than " +
                                              std::to_string(max_csr_chars) + " characters"});
    if (auto e = configuration::check_issuable_id(call.registration_id))
      return fail(e); // would only fail at signing, after attestation
    rr.csr = it->get<std::string>();
  }
  if (!reg) {
    // As for polls: a TPM device's lookup continues on the TPM worker.
    return eng_.authenticate_device(
      std::move(rr), [eng = &eng_, answer, tracking = call.tracking_id,
                      id = std::move(call.registration_id),
                      retry_after = retry_after_s_](error err) {
        if (err)
          return answer(refusal(err, tracking, retry_after));
        registration_state st;
        if (auto e = eng->registration(id, st))
          return answer(device_failure(e, tracking));
        auto text = to_json_text(st);
        if (auto e = add_tpm_key(*eng, st, st.last_operation_id, false, text))
          return answer(device_failure(e, tracking));
        answer(ok(200, std::move(text)));
      });
  }
  rr.force_registration = call.force_registration;
  // As a body member too (the query parameter is how the Node SDK sends it);
  // provisiond allocates every register anyway (docs/device-api.md).
  if (auto it = body.find("forceRegistration"); it != body.end() && !it->is_null()) {
    if (!it->is_boolean())
      return fail({error_code::bad_request, "forceRegistration must be a boolean"});
    rr.force_registration = rr.force_registration || it->get<bool>();
  }
  register_device(std::move(rr), call, answer);
}

void device_api::register_device(register_request rr, const device_call& call,
                                 const answer_fn& answer) {
  // The reply runs on the registration stage's thread (or, for a TPM
  // challenge, the engine's TPM worker).
  eng_.register_device(std::move(rr), [eng = &eng_, answer, tracking = call.tracking_id,
                                       retry_after = retry_after_s_](register_reply r) {
    if (r.err) {
      auto a = device_failure(r.err, tracking);
      if (!r.challenge.empty())
        a.body = std::move(r.challenge); // a TPM challenge: its own 401 body
      if (r.err.code == error_code::throttled || r.err.code == error_code::unavailable)
        a.retry_after_s = r.retry_after_s > 0 ? r.retry_after_s : retry_after;
      return answer(std::move(a));
    }
    if ((r.status == registration_status::assigned || r.status == registration_status::failed)
        && r.state)
      // The outcome arrived within register_wait_ms: the answer a poll
      // would give (200), so the device is done without polling. Every
      // official SDK (Node, C, Python, embedded C) accepts it on register.
    {
      auto text = operation_status_text(r.operation_id, *r.state);
      if (!needs_tpm_key(*r.state))
        return answer(ok(200, std::move(text)));
      // This runs on the registration stage's thread, which answers every
      // register: the key's store reads and RSA work go to the engine's
      // TPM worker, which answers.
      return eng->tpm_authentication_key(
        r.state->registration_id, r.operation_id,
        [answer, tracking, state = r.state, op = r.operation_id,
         text = std::move(text)](error err, std::string key) mutable {
          if (auto e = with_tpm_key(std::move(err), std::move(key), *state, op, true, text))
            return answer(device_failure(e, tracking));
          answer(ok(200, std::move(text)));
        });
    }
    // Otherwise always "assigning" on the 202 (Node and Python treat
    // `disabled` in a 2xx as unknown); the first poll reports the rest.
    std::string body = "{\"operationId\":";
    json_text::append_string(body, r.operation_id);
    body += ",\"status\":\"assigning\"}";
    answer(ok(202, std::move(body), retry_after));
  });
}

} // namespace prov::gateway
