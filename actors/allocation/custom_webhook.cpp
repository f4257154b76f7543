#include "actors/allocation/custom_webhook.hpp"

#include <nlohmann/json.hpp>

#include "messages/ascii.hpp"
#include "messages/json_text.hpp"

namespace prov::allocation {

namespace {

using json = nlohmann::json;

error failed(std::string message) {
  return {error_code::custom_allocation_failed, "Custom allocation failed: " + std::move(message)};
}

/// A JSON text the stage holds (the enrollment, the device's payload) as a
/// value; null when it is empty or, against expectations, not JSON.
json value_of(std::string_view text) {
  if (text.empty())
    return nullptr;
  auto j = json::parse(text.begin(), text.end(), nullptr, false);
  return j.is_discarded() ? json(nullptr) : j;
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names)
    out += (out.empty() ? "" : ", ") + n;
  return out.empty() ? "none" : out;
}

} // namespace

std::vector<std::string> offered_hubs(const request& in) {
  std::vector<std::string> out;
  for (const auto& h : in.candidates)
    if (!h.hostname.empty() && (in.explicit_list || h.apply_allocation_policy))
      out.push_back(h.hostname);
  return out;
}

std::string webhook_request_body(const request& in, const std::vector<std::string>& linked) {
  const enrollment::enrollment_view& v = *in.enrollment;
  json ctx = json::object();
  ctx["registrationId"] = std::string(in.registration_id);
  if (!in.current_hub.empty()) { // DPS sends these only when re-provisioning
    ctx["currentIotHubHostName"] = std::string(in.current_hub);
    ctx["currentDeviceId"] = std::string(in.current_device_id);
  }
  // DPS's sample shows the attestation's context as an empty object for
  // symmetric keys (never the keys). For X.509 the webhook gets what
  // registrationState.x509 shows: the device's certificateInfo, and for a
  // group signingCertificateInfo and enrollmentGroupId, so it can allocate
  // on a certificate property (DPS's own example of a custom policy).
  switch (enrollment::type_of(v.attestation)) {
    case attestation_type::symmetric_key: ctx["symmetricKey"] = json::object(); break;
    case attestation_type::x509: {
      json x = value_of(in.x509_json);
      if (!x.is_object())
        x = json::object();
      if (v.k == enrollment::kind::group)
        x["enrollmentGroupId"] = v.id;
      ctx["x509"] = std::move(x);
      break;
    }
    case attestation_type::tpm: ctx["tpm"] = json::object(); break;
    default: break;
  }
  if (json p = value_of(in.payload_json); !p.is_null())
    ctx["payload"] = std::move(p);
  json body = json::object();
  body[v.k == enrollment::kind::group ? "enrollmentGroup" : "individualEnrollment"] =
    value_of(v.public_json);
  body["deviceRuntimeContext"] = std::move(ctx);
  body["linkedHubs"] = linked;
  return body.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::chrono::milliseconds webhook_budget(const webhook_limits& l) {
  auto budget = std::chrono::milliseconds(0);
  auto backoff = l.retry_backoff;
  for (int i = 0; i <= l.retries; ++i) {
    budget += 2 * l.timeout;
    if (i < l.retries) {
      budget += backoff;
      backoff *= 2;
    }
  }
  return budget + std::chrono::seconds(5);
}

webhook_limits limits_for(const enrollment::enrollment_view& v, const webhook_limits& defaults) {
  webhook_limits l = defaults;
  if (v.webhook_timeout_ms > 0)
    l.timeout = std::chrono::milliseconds(v.webhook_timeout_ms);
  if (v.webhook_retries >= 0)
    l.retries = v.webhook_retries;
  return l;
}

std::chrono::milliseconds custom_policy::deadline_for(const request& in) const noexcept {
  return in.enrollment ? webhook_budget(limits_for(*in.enrollment, defaults_)) : deadline();
}

std::string webhook_host(std::string_view url) {
  constexpr std::string_view scheme = "https://";
  if (url.size() < scheme.size() || !ascii::iequals(url.substr(0, scheme.size()), scheme))
    return {};
  url.remove_prefix(scheme.size());
  return std::string(url.substr(0, url.find_first_of("/?#")));
}

error read_webhook_reply(const webhook_reply& r, const std::vector<std::string>& linked,
                         std::string_view host, decision& out) {
  out = {};
  if (r.status == 0) {
    const std::string tries = std::to_string(r.attempts) + (r.attempts == 1 ? " attempt" : " attempts");
    if (r.err.code == error_code::request_timeout)
      return failed("the webhook at " + std::string(host) + " did not answer in time (" + tries
                    + ")");
    return failed("the webhook at " + std::string(host) + " could not be reached (" + tries
                  + "): " + r.err.message);
  }
  if (r.status < 200 || r.status > 299) // DPS's own words, so clients see the same text
    return {error_code::custom_allocation_failed,
            "Custom allocation failed with status code: " + std::to_string(r.status)};
  const std::string answered = "the webhook answered status code " + std::to_string(r.status);
  auto j = json::parse(r.body, nullptr, false);
  if (j.is_discarded())
    return failed(answered + " with a body that is not JSON");
  if (!j.is_object())
    return failed(answered + " with a JSON " + j.type_name() + ", not an AllocationResponse object");
  // DPS's docs spell the member iotHubHostName (sample) and iotHubHostname (table).
  const json* hub = nullptr;
  for (const char* name : {"iotHubHostName", "iotHubHostname"})
    if (auto it = j.find(name); it != j.end() && !it->is_null()) {
      hub = &*it;
      break;
    }
  if (hub == nullptr || !hub->is_string() || hub->get_ref<const std::string&>().empty())
    return failed(answered + " without an iotHubHostName string");
  const std::string& name = hub->get_ref<const std::string&>();
  const std::string* match = nullptr;
  for (const auto& l : linked)
    if (ascii::iequals(l, name))
      match = &l;
  if (match == nullptr)
    return failed(answered + " with iotHubHostName '" + name
                  + "', which is not one of the linkedHubs (" + joined(linked) + ")");
  if (auto it = j.find("initialTwin"); it != j.end() && !it->is_null()) {
    if (!it->is_object())
      return failed(answered + " with an initialTwin that is a " + it->type_name()
                    + ", not a JSON object");
    out.initial_twin_json = it->dump(-1, ' ', false, json::error_handler_t::replace);
  }
  if (auto it = j.find("payload"); it != j.end() && !it->is_null()) {
    if (!it->is_object())
      return failed(answered + " with a payload that is a " + it->type_name()
                    + ", not a JSON object");
    out.payload_json = it->dump(-1, ' ', false, json::error_handler_t::replace);
  }
  out.hub = *match; // the linked hub's own spelling
  std::string why;
  json_text::object w(why);
  w.str("webhook", host)
    .num("status", r.status)
    .num("attempts", r.attempts)
    .str("iotHubHostName", name)
    .boolean("initialTwin", !out.initial_twin_json.empty())
    .boolean("payload", !out.payload_json.empty())
    .close();
  out.why_json = std::move(why);
  return {};
}

void custom_policy::allocate(const request& in, done_fn done) const {
  const enrollment::enrollment_view& v = *in.enrollment;
  if (v.webhook_url.empty()) {
    done->decided({error_code::custom_allocation_required,
                   "allocationPolicy custom: the enrollment has no "
                   "customAllocationDefinition.webhookUrl"},
                  {});
    return;
  }
  auto linked = offered_hubs(in);
  if (linked.empty()) {
    (*done)({error_code::no_hub_available,
             in.linked_hubs == 0 ? "no IoT hub is linked: add a [[hubs]] entry to the configuration"
                                 : "no linked IoT hub is available for this enrollment"},
            {});
    return;
  }
  webhook_post post;
  post.url = v.webhook_url;
  post.body = webhook_request_body(in, linked);
  const auto limits = limits_for(v, defaults_);
  post.timeout = limits.timeout;
  post.retries = limits.retries;
  auto host = webhook_host(post.url);
  post_(std::move(post), [done, linked = std::move(linked), host = std::move(host)](
                           webhook_reply r) {
    decision d;
    error err = read_webhook_reply(r, linked, host, d);
    done->decided(std::move(err), std::move(d));
  });
}

} // namespace prov::allocation
