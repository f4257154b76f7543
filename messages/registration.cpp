#include "messages/registration.hpp"

#include <chrono>
#include <ctime>
#include <random>

#include <nlohmann/json.hpp>

#include "messages/crypto.hpp"

namespace prov {

using nlohmann::json;

std::string_view to_string(registration_status s) noexcept {
  switch (s) {
    case registration_status::unassigned: return "unassigned";
    case registration_status::assigning: return "assigning";
    case registration_status::assigned: return "assigned";
    case registration_status::failed: return "failed";
    case registration_status::disabled: return "disabled";
  }
  return "unassigned";
}

bool from_string(std::string_view s, registration_status& out) noexcept {
  for (auto v : {registration_status::unassigned, registration_status::assigning,
                 registration_status::assigned, registration_status::failed,
                 registration_status::disabled}) {
    if (to_string(v) == s) {
      out = v;
      return true;
    }
  }
  return false;
}

int64_t now_ms() noexcept {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

std::string utc_string(int64_t ms) {
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  int frac = static_cast<int>(ms % 1000);
  if (frac < 0) {
    frac += 1000;
    --secs;
  }
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03d0000Z",
                tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                tm.tm_sec, frac);
  return buf;
}

std::string new_operation_id(std::string_view instance_hex16) {
  // Shape of DPS operation ids; clients treat them as opaque. URL-safe.
  return "5." + std::string(instance_hex16) + "." + crypto::uuid4();
}

namespace {

json parse_or_null(const std::string& text) {
  if (text.empty())
    return nullptr;
  auto j = json::parse(text, nullptr, false);
  return j.is_discarded() ? json(nullptr) : j;
}

template <class T>
void get_to(const json& j, const char* key, T& out) {
  auto it = j.find(key);
  if (it != j.end() && !it->is_null())
    it->get_to(out);
}

json state_record(const registration_state& s) {
  return json{{"registrationId", s.registration_id},
              {"createdMs", s.created_ms},
              {"updatedMs", s.updated_ms},
              {"assignedHub", s.assigned_hub},
              {"deviceId", s.device_id},
              {"status", to_string(s.status)},
              {"substatus", s.substatus},
              {"errorCode", s.error_code},
              {"errorMessage", s.error_message},
              {"etag", s.etag},
              {"attestationType", s.attestation_type},
              {"enrollmentGroupId", s.enrollment_group_id},
              {"payload", s.payload_json},
              {"lastOperationId", s.last_operation_id}};
}

error state_from(const json& j, registration_state& s) {
  get_to(j, "registrationId", s.registration_id);
  get_to(j, "createdMs", s.created_ms);
  get_to(j, "updatedMs", s.updated_ms);
  get_to(j, "assignedHub", s.assigned_hub);
  get_to(j, "deviceId", s.device_id);
  std::string st;
  get_to(j, "status", st);
  if (!from_string(st, s.status))
    return {error_code::storage_failure, "registration record: bad status '" + st + "'"};
  get_to(j, "substatus", s.substatus);
  get_to(j, "errorCode", s.error_code);
  get_to(j, "errorMessage", s.error_message);
  get_to(j, "etag", s.etag);
  get_to(j, "attestationType", s.attestation_type);
  get_to(j, "enrollmentGroupId", s.enrollment_group_id);
  get_to(j, "payload", s.payload_json);
  get_to(j, "lastOperationId", s.last_operation_id);
  return {};
}

json event_json(const registration_event& ev) {
  return json{{"v", ev.version},
              {"operationId", ev.operation_id},
              {"registrationId", ev.registration_id},
              {"idScope", ev.id_scope},
              {"apiVersion", ev.api_version},
              {"protocol", ev.protocol},
              {"acceptedMs", ev.accepted_ms},
              {"attestationType", ev.attestation_type},
              {"enrollmentGroupId", ev.enrollment_group_id},
              {"payload", ev.payload_json},
              {"assignedHub", ev.assigned_hub},
              {"deviceId", ev.device_id},
              {"initialTwin", ev.initial_twin_json},
              {"iotEdge", ev.iot_edge},
              {"substatus", ev.substatus},
              {"status", to_string(ev.status)},
              {"errorCode", ev.error_code},
              {"errorMessage", ev.error_message},
              {"attestedMs", ev.attested_ms},
              {"allocatedMs", ev.allocated_ms},
              {"completedMs", ev.completed_ms}};
}

error event_from(const json& j, registration_event& ev) {
  get_to(j, "v", ev.version);
  if (ev.version != 1)
    return {error_code::bad_request, "event: unsupported version " + std::to_string(ev.version)};
  get_to(j, "operationId", ev.operation_id);
  get_to(j, "registrationId", ev.registration_id);
  if (ev.operation_id.empty() || ev.registration_id.empty())
    return {error_code::bad_request, "event: operationId and registrationId are required"};
  get_to(j, "idScope", ev.id_scope);
  get_to(j, "apiVersion", ev.api_version);
  get_to(j, "protocol", ev.protocol);
  get_to(j, "acceptedMs", ev.accepted_ms);
  get_to(j, "attestationType", ev.attestation_type);
  get_to(j, "enrollmentGroupId", ev.enrollment_group_id);
  get_to(j, "payload", ev.payload_json);
  get_to(j, "assignedHub", ev.assigned_hub);
  get_to(j, "deviceId", ev.device_id);
  get_to(j, "initialTwin", ev.initial_twin_json);
  get_to(j, "iotEdge", ev.iot_edge);
  get_to(j, "substatus", ev.substatus);
  std::string st = "assigning";
  get_to(j, "status", st);
  if (!from_string(st, ev.status))
    return {error_code::bad_request, "event: bad status '" + st + "'"};
  get_to(j, "errorCode", ev.error_code);
  get_to(j, "errorMessage", ev.error_message);
  get_to(j, "attestedMs", ev.attested_ms);
  get_to(j, "allocatedMs", ev.allocated_ms);
  get_to(j, "completedMs", ev.completed_ms);
  return {};
}

template <class F>
error guarded(std::string_view what, F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return {error_code::storage_failure, std::string(what) + ": " + e.what()};
  }
}

} // namespace

json to_json(const registration_state& s) {
  json j{{"registrationId", s.registration_id},
         {"status", to_string(s.status)}};
  if (s.created_ms)
    j["createdDateTimeUtc"] = utc_string(s.created_ms);
  if (!s.assigned_hub.empty())
    j["assignedHub"] = s.assigned_hub;
  if (!s.device_id.empty())
    j["deviceId"] = s.device_id;
  if (!s.substatus.empty())
    j["substatus"] = s.substatus;
  if (s.error_code != 0) {
    j["errorCode"] = s.error_code;
    j["errorMessage"] = s.error_message;
  }
  if (s.updated_ms)
    j["lastUpdatedDateTimeUtc"] = utc_string(s.updated_ms);
  if (!s.etag.empty())
    j["etag"] = s.etag;
  if (s.attestation_type == "symmetricKey") {
    json sk = json::object();
    if (!s.enrollment_group_id.empty())
      sk["enrollmentGroupId"] = s.enrollment_group_id;
    j["symmetricKey"] = sk;
  }
  if (!s.payload_json.empty())
    j["payload"] = parse_or_null(s.payload_json);
  return j;
}

json operation_status_json(const std::string& operation_id, const registration_state& s) {
  json j{{"operationId", operation_id}, {"status", to_string(s.status)}};
  if (s.status == registration_status::assigning)
    j["registrationState"] = json{{"registrationId", s.registration_id},
                                  {"status", "assigning"}};
  else
    j["registrationState"] = to_json(s);
  return j;
}

std::string encode_record(const registration_state& s) {
  auto j = state_record(s);
  j["v"] = 1;
  return j.dump();
}

error decode_record(std::string_view text, registration_state& out) {
  return guarded("registration record", [&]() -> error {
    auto j = json::parse(text);
    return state_from(j, out);
  });
}

std::string encode_record(const operation_record& op) {
  json j{{"v", 1},
         {"operationId", op.operation_id},
         {"registrationId", op.registration_id},
         {"status", to_string(op.status)},
         {"event", event_json(op.event)}};
  if (is_terminal(op.status))
    j["state"] = state_record(op.state);
  return j.dump();
}

error decode_record(std::string_view text, operation_record& out) {
  return guarded("operation record", [&]() -> error {
    auto j = json::parse(text);
    get_to(j, "operationId", out.operation_id);
    get_to(j, "registrationId", out.registration_id);
    std::string st;
    get_to(j, "status", st);
    if (!from_string(st, out.status))
      return {error_code::storage_failure, "operation record: bad status '" + st + "'"};
    if (auto it = j.find("event"); it != j.end())
      if (auto err = event_from(*it, out.event))
        return err;
    if (auto it = j.find("state"); it != j.end())
      return state_from(*it, out.state);
    return {};
  });
}

std::string encode_event(const registration_event& ev) {
  return event_json(ev).dump();
}

error decode_event(std::string_view text, registration_event& out) {
  try {
    auto j = json::parse(text);
    if (!j.is_object())
      return {error_code::bad_request, "event: not a JSON object"};
    return event_from(j, out);
  } catch (const std::exception& e) {
    return {error_code::bad_request, std::string("event: ") + e.what()};
  }
}

std::string error_body(const error& e, std::string_view tracking_id) {
  json j{{"errorCode", static_cast<int32_t>(e.code)},
         {"trackingId", tracking_id},
         {"message", e.message},
         {"timestampUtc", utc_string(now_ms())}};
  return j.dump();
}

} // namespace prov
