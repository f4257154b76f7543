#include "messages/registration.hpp"

#include "messages/binary_codec.hpp"
#include "messages/json_text.hpp"

#include <chrono>
#include <climits>
#include <cstring>
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
  // Formatted by hand (snprintf was ~10k instructions a call, and every poll
  // answer carries two of these); the calendar part is cached per thread for
  // the current second.
  int64_t secs = ms / 1000;
  int frac = static_cast<int>(ms % 1000);
  if (frac < 0) {
    frac += 1000;
    --secs;
  }
  thread_local int64_t cached_secs = INT64_MIN;
  thread_local char cached[20]; // "YYYY-MM-DDTHH:MM:SS"
  if (secs != cached_secs) {
    std::time_t t = static_cast<std::time_t>(secs);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900,
                  tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
    std::memcpy(cached, buf, 19);
    cached_secs = secs;
  }
  std::string out(cached, 19);
  out.push_back('.');
  out.push_back(static_cast<char>('0' + frac / 100));
  out.push_back(static_cast<char>('0' + frac / 10 % 10));
  out.push_back(static_cast<char>('0' + frac % 10));
  out.append("0000Z");
  return out;
}

std::string new_operation_id(std::string_view instance_hex16) {
  // Shape of DPS operation ids; clients treat them as opaque. URL-safe. The
  // UUID is version 7, so any gateway can tell an operation's age (a poll
  // reaching a gateway that has not seen the operation yet).
  return "5." + std::string(instance_hex16) + "." + crypto::uuid7(now_ms());
}

int64_t operation_created_ms(std::string_view operation_id) {
  auto dot = operation_id.rfind('.');
  if (dot == std::string_view::npos)
    return 0;
  return crypto::uuid7_time_ms(operation_id.substr(dot + 1));
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
  json j{{"v", ev.version},
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
  if (!ev.authorization.empty())
    j["authorization"] = ev.authorization;
  return j;
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
  get_to(j, "authorization", ev.authorization);
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

namespace {

void write_state(std::string& out, const registration_state& s) {
  json_text::object o(out);
  o.str("registrationId", s.registration_id).str("status", to_string(s.status));
  if (s.created_ms)
    o.str("createdDateTimeUtc", utc_string(s.created_ms));
  if (!s.assigned_hub.empty())
    o.str("assignedHub", s.assigned_hub);
  if (!s.device_id.empty())
    o.str("deviceId", s.device_id);
  if (!s.substatus.empty())
    o.str("substatus", s.substatus);
  if (s.error_code != 0)
    o.num("errorCode", s.error_code).str("errorMessage", s.error_message);
  if (s.updated_ms)
    o.str("lastUpdatedDateTimeUtc", utc_string(s.updated_ms));
  if (!s.etag.empty())
    o.str("etag", s.etag);
  if (s.attestation_type == "symmetricKey") {
    json_text::object sk(o.nested("symmetricKey"));
    if (!s.enrollment_group_id.empty())
      sk.str("enrollmentGroupId", s.enrollment_group_id);
    sk.close();
  }
  if (!s.payload_json.empty()) {
    // Stored as serialized by us, so valid; re-checked only when it looks odd.
    auto first = s.payload_json.front();
    if (first == '{' || first == '[')
      o.raw("payload", s.payload_json);
    else
      o.raw("payload", parse_or_null(s.payload_json).dump());
  }
  o.close();
}

} // namespace

std::string to_json_text(const registration_state& s) {
  std::string out;
  out.reserve(384);
  write_state(out, s);
  return out;
}

std::string operation_status_text(const std::string& operation_id,
                                  const registration_state& s) {
  std::string out;
  out.reserve(448);
  json_text::object o(out);
  o.str("operationId", operation_id).str("status", to_string(s.status));
  if (s.status == registration_status::assigning) {
    json_text::object rs(o.nested("registrationState"));
    rs.str("registrationId", s.registration_id).str("status", "assigning").close();
  } else {
    write_state(o.nested("registrationState"), s);
  }
  o.close();
  return out;
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

namespace {

// Binary record layout (messages/binary_codec.hpp): magic, kind, version,
// then the fields in declaration order. JSON records (the first byte is '{')
// were written before; decode_record still reads them.
constexpr uint8_t record_magic = 0xB7;
constexpr uint8_t kind_state = 1;
constexpr uint8_t kind_operation = 2;
constexpr uint8_t record_version = 1;

void put_status(codec::writer& w, registration_status s) { w.u8(static_cast<uint8_t>(s)); }
bool get_status(codec::reader& r, registration_status& s) {
  auto v = r.u8();
  if (v > static_cast<uint8_t>(registration_status::disabled))
    return false;
  s = static_cast<registration_status>(v);
  return true;
}

void put_state(codec::writer& w, const registration_state& s) {
  w.str(s.registration_id);
  w.i64(s.created_ms);
  w.i64(s.updated_ms);
  w.str(s.assigned_hub);
  w.str(s.device_id);
  put_status(w, s.status);
  w.str(s.substatus);
  w.i64(s.error_code);
  w.str(s.error_message);
  w.str(s.etag);
  w.str(s.attestation_type);
  w.str(s.enrollment_group_id);
  w.str(s.payload_json);
  w.str(s.last_operation_id);
}

bool get_state(codec::reader& r, registration_state& s) {
  r.str(s.registration_id);
  s.created_ms = r.i64();
  s.updated_ms = r.i64();
  r.str(s.assigned_hub);
  r.str(s.device_id);
  if (!get_status(r, s.status))
    return false;
  r.str(s.substatus);
  s.error_code = static_cast<int32_t>(r.i64());
  r.str(s.error_message);
  r.str(s.etag);
  r.str(s.attestation_type);
  r.str(s.enrollment_group_id);
  r.str(s.payload_json);
  r.str(s.last_operation_id);
  return r.ok();
}

void put_event(codec::writer& w, const registration_event& ev) {
  w.i64(ev.version);
  w.str(ev.operation_id);
  w.str(ev.registration_id);
  w.str(ev.id_scope);
  w.str(ev.api_version);
  w.str(ev.protocol);
  w.i64(ev.accepted_ms);
  w.str(ev.attestation_type);
  w.str(ev.enrollment_group_id);
  w.str(ev.payload_json);
  w.str(ev.assigned_hub);
  w.str(ev.device_id);
  w.str(ev.initial_twin_json);
  w.u8(ev.iot_edge ? 1 : 0);
  w.str(ev.substatus);
  put_status(w, ev.status);
  w.i64(ev.error_code);
  w.str(ev.error_message);
  w.i64(ev.attested_ms);
  w.i64(ev.allocated_ms);
  w.i64(ev.completed_ms);
}

bool get_event(codec::reader& r, registration_event& ev) {
  ev.version = static_cast<int32_t>(r.i64());
  r.str(ev.operation_id);
  r.str(ev.registration_id);
  r.str(ev.id_scope);
  r.str(ev.api_version);
  r.str(ev.protocol);
  ev.accepted_ms = r.i64();
  r.str(ev.attestation_type);
  r.str(ev.enrollment_group_id);
  r.str(ev.payload_json);
  r.str(ev.assigned_hub);
  r.str(ev.device_id);
  r.str(ev.initial_twin_json);
  ev.iot_edge = r.u8() != 0;
  r.str(ev.substatus);
  if (!get_status(r, ev.status))
    return false;
  ev.error_code = static_cast<int32_t>(r.i64());
  r.str(ev.error_message);
  ev.attested_ms = r.i64();
  ev.allocated_ms = r.i64();
  ev.completed_ms = r.i64();
  return r.ok();
}

bool binary_header(codec::reader& r, uint8_t kind) {
  return r.u8() == record_magic && r.u8() == kind && r.u8() == record_version && r.ok();
}

error corrupt(std::string_view what) {
  return {error_code::storage_failure, std::string(what) + ": truncated or corrupt record"};
}

} // namespace

std::string encode_record(const registration_state& s) {
  codec::writer w(128 + s.payload_json.size());
  w.u8(record_magic);
  w.u8(kind_state);
  w.u8(record_version);
  put_state(w, s);
  return w.take();
}

error decode_record(std::string_view text, registration_state& out) {
  if (!text.empty() && text.front() == '{')
    return guarded("registration record", [&]() -> error {
      auto j = json::parse(text);
      return state_from(j, out);
    });
  codec::reader r(text);
  if (!binary_header(r, kind_state) || !get_state(r, out) || !r.done())
    return corrupt("registration record");
  return {};
}

std::string encode_record(const operation_record& op) {
  codec::writer w(256 + op.event.payload_json.size() + op.event.initial_twin_json.size());
  w.u8(record_magic);
  w.u8(kind_operation);
  w.u8(record_version);
  w.str(op.operation_id);
  w.str(op.registration_id);
  put_status(w, op.status);
  put_event(w, op.event);
  bool terminal = is_terminal(op.status);
  w.u8(terminal ? 1 : 0);
  if (terminal)
    put_state(w, op.state);
  return w.take();
}

error decode_record(std::string_view text, operation_record& out) {
  if (!text.empty() && text.front() == '{')
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
  codec::reader r(text);
  if (!binary_header(r, kind_operation))
    return corrupt("operation record");
  r.str(out.operation_id);
  r.str(out.registration_id);
  if (!get_status(r, out.status) || !get_event(r, out.event))
    return corrupt("operation record");
  if (r.u8() == 1 && !get_state(r, out.state))
    return corrupt("operation record");
  if (!r.done())
    return corrupt("operation record");
  return {};
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

error decode_requested_event(std::string_view text, registration_event& out) {
  try {
    auto j = json::parse(text);
    if (!j.is_object())
      return {error_code::bad_request, "requested event: not a JSON object"};
    registration_event ev;
    get_to(j, "v", ev.version);
    if (ev.version != 1)
      return {error_code::bad_request,
              "requested event: unsupported version " + std::to_string(ev.version)};
    get_to(j, "registrationId", ev.registration_id);
    get_to(j, "idScope", ev.id_scope);
    if (ev.registration_id.empty() || ev.id_scope.empty())
      return {error_code::bad_request, "requested event: registrationId and idScope are required"};
    get_to(j, "operationId", ev.operation_id);
    get_to(j, "apiVersion", ev.api_version);
    get_to(j, "authorization", ev.authorization);
    if (auto it = j.find("payload"); it != j.end() && !it->is_null()) {
      // Like the HTTP body's payload: a JSON object. Also accepted as JSON
      // text in a string, the form encode_event writes.
      json p = it->is_string() ? json::parse(it->get_ref<const std::string&>(), nullptr, false)
                               : *it;
      if (!p.is_object())
        return {error_code::bad_request, "requested event: payload must be a JSON object"};
      ev.payload_json = p.dump();
    }
    out = std::move(ev);
    return {};
  } catch (const std::exception& e) {
    return {error_code::bad_request, std::string("requested event: ") + e.what()};
  }
}

namespace {

std::string redact_signatures(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  std::size_t i = 0;
  while (i < text.size()) {
    bool at_sig = i + 4 <= text.size() && (text[i] == 's' || text[i] == 'S')
                  && (text[i + 1] == 'i' || text[i + 1] == 'I')
                  && (text[i + 2] == 'g' || text[i + 2] == 'G') && text[i + 3] == '=';
    if (!at_sig) {
      out.push_back(text[i++]);
      continue;
    }
    out.append(text.substr(i, 4)).append("REDACTED");
    i += 4;
    // The value ends where a SAS field, a JSON string or a header line does.
    while (i < text.size() && text[i] != '&' && text[i] != '"' && text[i] != '\\'
           && text[i] != ',' && text[i] != ' ' && text[i] != '\n' && text[i] != '\r'
           && text[i] != '\t')
      ++i;
  }
  return out;
}

} // namespace

std::string redact_credentials(std::string_view value) {
  auto j = json::parse(value, nullptr, false);
  if (j.is_object()) {
    j.erase("authorization");
    // Dumped without escapes a token could hide behind ("sig\u003d").
    return redact_signatures(j.dump());
  }
  return redact_signatures(value);
}

std::string error_body(const error& e, std::string_view tracking_id) {
  json j{{"errorCode", static_cast<int32_t>(e.code)},
         {"trackingId", tracking_id},
         {"message", e.message},
         {"timestampUtc", utc_string(now_ms())}};
  return j.dump();
}

} // namespace prov
