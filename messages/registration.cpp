#include "messages/registration.hpp"


#include "messages/ascii.hpp"
#include "messages/binary_codec.hpp"
#include "messages/crypto.hpp"
#include "messages/json_body.hpp"
#include "messages/json_text.hpp"

#include <charconv>
#include <algorithm>
#include <chrono>
#include <climits>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <cstring>
#include <ctime>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
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

utc_text utc_chars(int64_t ms) noexcept {
  // Formatted by hand (snprintf was ~10k instructions a call, and every poll
  // answer carries two of these); the calendar part is cached per thread for
  // the current second. Clamped to years 0000..9999, so the shape is fixed.
  ms = std::clamp(ms, int64_t{-62167219200000}, int64_t{253402300799999});
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
  utc_text out;
  std::memcpy(out.chars, cached, 19);
  out.chars[19] = '.';
  out.chars[20] = static_cast<char>('0' + frac / 100);
  out.chars[21] = static_cast<char>('0' + frac / 10 % 10);
  out.chars[22] = static_cast<char>('0' + frac % 10);
  std::memcpy(out.chars + 23, "0000Z", 5);
  return out;
}

std::string utc_string(int64_t ms) { return std::string(utc_chars(ms).view()); }

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

/// Whether a JSON number fits a signed integer member. nlohmann's get_to
/// static_casts: an integer out of range wraps (4294967297 became version 1)
/// and a double out of range is undefined behaviour, so both are refused.
template <class Int>
bool fits(int64_t v) {
  return v >= std::numeric_limits<Int>::min() && v <= std::numeric_limits<Int>::max();
}
template <class Int>
bool fits(uint64_t v) {
  return v <= static_cast<uint64_t>(std::numeric_limits<Int>::max());
}
template <class Int>
bool fits(double v) {
  static_assert(std::is_signed_v<Int>);
  // [min, -min): both bounds are powers of two, exact as doubles.
  constexpr double min = static_cast<double>(std::numeric_limits<Int>::min());
  return v >= min && v < -min;
}

template <class T>
void get_to(const json& j, const char* key, T& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null())
    return;
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    bool ok = it->is_number_unsigned()  ? fits<T>(it->get<uint64_t>())
              : it->is_number_integer() ? fits<T>(it->get<int64_t>())
              : it->is_number_float()   ? fits<T>(it->get<double>())
                                        : true; // not a number: get_to's type_error
    if (!ok)
      throw std::out_of_range(std::string(key) + " is out of range");
  }
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
  get_to(j, "allocation", s.allocation_json);
  get_to(j, "x509", s.x509_json);
  get_to(j, "keyUsed", s.key_used);
  get_to(j, "assignedHubs", s.assigned_hubs);
  get_to(j, "issuedCertificateChain", s.issued_chain);
  return {};
}

// What encode_event writes, as a tree; encode_event's own writer defers to it
// only to throw what it throws on invalid UTF-8 (tests compare the two).
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
  if (!ev.returned_payload_json.empty())
    j["returnedPayload"] = ev.returned_payload_json;
  if (!ev.allocation_json.empty())
    j["allocation"] = ev.allocation_json;
  if (!ev.client_ip.empty())
    j["clientIp"] = ev.client_ip;
  if (!ev.key_used.empty())
    j["keyUsed"] = ev.key_used;
  if (!ev.x509_json.empty())
    j["x509"] = ev.x509_json;
  if (!ev.csr.empty())
    j["csr"] = ev.csr;
  if (!ev.issuing_ca.empty())
    j["issuingCa"] = ev.issuing_ca;
  if (!ev.issued_chain.empty())
    j["issuedCertificateChain"] = ev.issued_chain;
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
  get_to(j, "returnedPayload", ev.returned_payload_json);
  get_to(j, "allocation", ev.allocation_json);
  get_to(j, "clientIp", ev.client_ip);
  get_to(j, "x509", ev.x509_json);
  get_to(j, "keyUsed", ev.key_used);
  get_to(j, "csr", ev.csr);
  get_to(j, "issuingCa", ev.issuing_ca);
  get_to(j, "issuedCertificateChain", ev.issued_chain);
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

json to_json(const registration_state& s, bool service) {
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
  if (s.attestation_type == "symmetricKey" || s.attestation_type == "x509") {
    json sk = json::object();
    if (s.attestation_type == "x509" && !s.x509_json.empty())
      if (json info = parse_or_null(s.x509_json); info.is_object())
        sk = std::move(info);
    if (!s.enrollment_group_id.empty())
      sk["enrollmentGroupId"] = s.enrollment_group_id;
    if (service && !s.key_used.empty())
      sk["keyUsed"] = s.key_used;
    j[s.attestation_type] = sk;
  }
  if (!s.payload_json.empty())
    j["payload"] = parse_or_null(s.payload_json);
  if (service && !s.allocation_json.empty())
    j["allocation"] = parse_or_null(s.allocation_json);
  return j;
}

namespace {

void write_state(std::string& out, const registration_state& s, bool service = false,
                 bool issued = false) {
  json_text::object o(out);
  o.str("registrationId", s.registration_id).str("status", to_string(s.status));
  if (s.created_ms)
    o.str("createdDateTimeUtc", utc_chars(s.created_ms));
  if (!s.assigned_hub.empty())
    o.str("assignedHub", s.assigned_hub);
  if (!s.device_id.empty())
    o.str("deviceId", s.device_id);
  if (!s.substatus.empty())
    o.str("substatus", s.substatus);
  if (s.error_code != 0)
    o.num("errorCode", s.error_code).str("errorMessage", s.error_message);
  if (s.updated_ms)
    o.str("lastUpdatedDateTimeUtc", utc_chars(s.updated_ms));
  if (!s.etag.empty())
    o.str("etag", s.etag);
  if (s.attestation_type == "symmetricKey" || s.attestation_type == "x509") {
    json_text::object sk(o.nested(s.attestation_type));
    if (!s.enrollment_group_id.empty())
      sk.str("enrollmentGroupId", s.enrollment_group_id);
    if (service && !s.key_used.empty())
      sk.str("keyUsed", s.key_used);
    // certificateInfo and signingCertificateInfo: the members of an object
    // we wrote compact ourselves, copied without a parse (every poll).
    if (s.attestation_type == "x509" && s.x509_json.size() > 2 && s.x509_json.front() == '{'
        && s.x509_json.back() == '}') {
      const std::string_view members(s.x509_json.data() + 1, s.x509_json.size() - 2);
      if (members.front() == '"')
        sk.raw_members(members);
    }
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
  if (service && !s.allocation_json.empty())
    o.raw("allocation", parse_or_null(s.allocation_json).dump());
  if (issued && !s.issued_chain.empty()) {
    // Base64 only (written by the issuer): no escaping needed.
    std::string arr = "[";
    std::string_view rest = s.issued_chain;
    while (!rest.empty()) {
      auto nl = rest.find('\n');
      if (arr.size() > 1)
        arr.push_back(',');
      arr.push_back('"');
      arr.append(rest.substr(0, nl));
      arr.push_back('"');
      rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
    }
    arr.push_back(']');
    o.raw("issuedCertificateChain", arr);
  }
  o.close();
}

} // namespace

std::string to_json_text(const registration_state& s, bool service) {
  std::string out;
  out.reserve(384 + s.allocation_json.size());
  write_state(out, s, service);
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
    write_state(o.nested("registrationState"), s, false, true);
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
  if (s.status != registration_status::assigning && !s.issued_chain.empty()) {
    json chain = json::array();
    std::string_view rest = s.issued_chain;
    while (!rest.empty()) {
      auto nl = rest.find('\n');
      chain.push_back(std::string(rest.substr(0, nl)));
      rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
    }
    j["registrationState"]["issuedCertificateChain"] = std::move(chain);
  }
  return j;
}

namespace {

// Binary record layout (messages/binary_codec.hpp): magic, kind, version,
// then the fields in declaration order. JSON records (the first byte is '{')
// were written before; decode_record still reads them.
constexpr uint8_t record_magic = 0xB7;
constexpr uint8_t kind_state = 1;
constexpr uint8_t kind_operation = 2;
/// 2: registration states end with allocation_json. 3: states and events
/// end with x509_json. 4: states and events end with key_used. 5: states end
/// with assigned_hubs. 6: states end with issued_chain, events with csr.
/// Older records (without them) are still read. A record whose version-6
/// fields are empty is written as version 5, which earlier releases read:
/// rolling upgrades and downgrades keep working until a certificate is
/// issued (docs/certificate-issuance.md).
constexpr uint8_t record_version = 6;
constexpr uint8_t record_version_without_issuance = 5;

uint8_t version_for(const registration_state& s) {
  return s.issued_chain.empty() ? record_version_without_issuance : record_version;
}

void put_status(codec::writer& w, registration_status s) { w.u8(static_cast<uint8_t>(s)); }
bool get_status(codec::reader& r, registration_status& s) {
  auto v = r.u8();
  if (v > static_cast<uint8_t>(registration_status::disabled))
    return false;
  s = static_cast<registration_status>(v);
  return true;
}

void put_state(codec::writer& w, const registration_state& s, uint8_t version) {
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
  w.str(s.allocation_json); // version 2
  w.str(s.x509_json);       // version 3
  w.str(s.key_used);        // version 4
  w.str(s.assigned_hubs);   // version 5
  if (version >= 6)
    w.str(s.issued_chain);
}

bool get_state(codec::reader& r, registration_state& s, uint8_t version) {
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
  if (version >= 2)
    r.str(s.allocation_json);
  if (version >= 3)
    r.str(s.x509_json);
  if (version >= 4)
    r.str(s.key_used);
  if (version >= 5)
    r.str(s.assigned_hubs);
  if (version >= 6)
    r.str(s.issued_chain);
  return r.ok();
}

void put_event(codec::writer& w, const registration_event& ev, uint8_t version) {
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
  w.str(ev.x509_json); // version 3
  w.str(ev.key_used);  // version 4
  if (version >= 6)
    w.str(ev.csr);
}

bool get_event(codec::reader& r, registration_event& ev, uint8_t version) {
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
  if (version >= 3)
    r.str(ev.x509_json);
  if (version >= 4)
    r.str(ev.key_used);
  if (version >= 6)
    r.str(ev.csr);
  return r.ok();
}

bool binary_header(codec::reader& r, uint8_t kind, uint8_t& version) {
  if (r.u8() != record_magic || r.u8() != kind)
    return false;
  version = r.u8();
  return r.ok() && version >= 1 && version <= record_version;
}

error corrupt(std::string_view what) {
  return {error_code::storage_failure, std::string(what) + ": truncated or corrupt record"};
}

} // namespace

bool was_assigned_to(const registration_state& s, std::string_view hub) {
  std::string_view rest = s.assigned_hubs;
  while (!rest.empty()) {
    auto nl = rest.find('\n');
    if (ascii::iequals(rest.substr(0, nl), hub))
      return true;
    rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
  }
  return false;
}

void add_assigned_hub(registration_state& s, std::string_view hub) {
  if (hub.empty() || was_assigned_to(s, hub))
    return;
  if (!s.assigned_hubs.empty())
    s.assigned_hubs.push_back('\n');
  s.assigned_hubs.append(hub);
  std::size_t n = 1;
  for (char c : s.assigned_hubs)
    n += c == '\n';
  if (n > max_assigned_hubs) // forget the oldest
    s.assigned_hubs.erase(0, s.assigned_hubs.find('\n') + 1);
}

std::string encode_record(const registration_state& s) {
  codec::writer w(128 + s.payload_json.size());
  w.u8(record_magic);
  w.u8(kind_state);
  const uint8_t version = version_for(s);
  w.u8(version);
  put_state(w, s, version);
  return w.take();
}

error decode_record(std::string_view text, registration_state& out) {
  if (!text.empty() && text.front() == '{')
    return guarded("registration record", [&]() -> error {
      auto j = json::parse(text);
      return state_from(j, out);
    });
  codec::reader r(text);
  uint8_t version = 0;
  if (!binary_header(r, kind_state, version) || !get_state(r, out, version) || !r.done())
    return corrupt("registration record");
  return {};
}

std::string encode_record(const operation_record& op) {
  codec::writer w(256 + op.event.payload_json.size() + op.event.initial_twin_json.size());
  w.u8(record_magic);
  w.u8(kind_operation);
  bool terminal = is_terminal(op.status);
  const uint8_t version =
    op.event.csr.empty() && (!terminal || op.state.issued_chain.empty())
      ? record_version_without_issuance
      : record_version;
  w.u8(version);
  w.str(op.operation_id);
  w.str(op.registration_id);
  put_status(w, op.status);
  put_event(w, op.event, version);
  w.u8(terminal ? 1 : 0);
  if (terminal)
    put_state(w, op.state, version);
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
  uint8_t version = 0;
  if (!binary_header(r, kind_operation, version))
    return corrupt("operation record");
  r.str(out.operation_id);
  r.str(out.registration_id);
  if (!get_status(r, out.status) || !get_event(r, out.event, version))
    return corrupt("operation record");
  if (r.u8() == 1 && !get_state(r, out.state, version))
    return corrupt("operation record");
  if (!r.done())
    return corrupt("operation record");
  return {};
}

namespace {

void append_int(std::string& out, int64_t v) {
  char buf[24];
  auto res = std::to_chars(buf, buf + sizeof(buf), v);
  out.append(buf, res.ptr);
}

// Appends `,"key":"value"` (`key_lit` carries the separator and quotes).
bool append_str_field(std::string& out, std::string_view key_lit, std::string_view v) {
  out.append(key_lit);
  return json_text::append_string_as_dump(out, v);
}

} // namespace

std::string encode_event(const registration_event& ev) {
  // Written directly, byte for byte what event_json(ev).dump() writes: keys in
  // std::map (byte) order, every member present, authorization only when set.
  std::string out;
  // ~450 bytes of keys, quotes and worst-case numbers, plus the strings.
  out.reserve(464 + ev.operation_id.size() + ev.registration_id.size() + ev.id_scope.size()
              + ev.api_version.size() + ev.protocol.size() + ev.attestation_type.size()
              + ev.enrollment_group_id.size() + ev.payload_json.size()
              + ev.authorization.size() + ev.assigned_hub.size() + ev.device_id.size()
              + ev.initial_twin_json.size() + ev.substatus.size() + ev.error_message.size()
              + ev.returned_payload_json.size() + ev.allocation_json.size()
              + ev.x509_json.size() + ev.key_used.size() + ev.csr.size()
              + ev.issuing_ca.size() + ev.issued_chain.size() + 112);
  out.append("{\"acceptedMs\":");
  append_int(out, ev.accepted_ms);
  out.append(",\"allocatedMs\":");
  append_int(out, ev.allocated_ms);
  bool ok = true;
  if (!ev.allocation_json.empty()) // "allocatedMs" < "allocation" < "apiVersion"
    ok = append_str_field(out, ",\"allocation\":", ev.allocation_json);
  ok = ok && append_str_field(out, ",\"apiVersion\":", ev.api_version)
            && append_str_field(out, ",\"assignedHub\":", ev.assigned_hub)
            && append_str_field(out, ",\"attestationType\":", ev.attestation_type);
  out.append(",\"attestedMs\":");
  append_int(out, ev.attested_ms);
  if (ok && !ev.authorization.empty())
    ok = append_str_field(out, ",\"authorization\":", ev.authorization);
  out.append(",\"completedMs\":");
  append_int(out, ev.completed_ms);
  if (ok && !ev.csr.empty()) // "completedMs" < "csr" < "deviceId"
    ok = append_str_field(out, ",\"csr\":", ev.csr);
  ok = ok && append_str_field(out, ",\"deviceId\":", ev.device_id)
       && append_str_field(out, ",\"enrollmentGroupId\":", ev.enrollment_group_id);
  out.append(",\"errorCode\":");
  append_int(out, ev.error_code);
  ok = ok && append_str_field(out, ",\"errorMessage\":", ev.error_message)
       && append_str_field(out, ",\"idScope\":", ev.id_scope)
       && append_str_field(out, ",\"initialTwin\":", ev.initial_twin_json);
  out.append(ev.iot_edge ? ",\"iotEdge\":true" : ",\"iotEdge\":false");
  // "iotEdge" < "issuedCertificateChain" < "issuingCa" < "keyUsed"
  if (ok && !ev.issued_chain.empty())
    ok = append_str_field(out, ",\"issuedCertificateChain\":", ev.issued_chain);
  if (ok && !ev.issuing_ca.empty())
    ok = append_str_field(out, ",\"issuingCa\":", ev.issuing_ca);
  if (ok && !ev.key_used.empty()) // "iotEdge" < "keyUsed" < "operationId"
    ok = append_str_field(out, ",\"keyUsed\":", ev.key_used);
  ok = ok && append_str_field(out, ",\"operationId\":", ev.operation_id)
       && append_str_field(out, ",\"payload\":", ev.payload_json)
       && append_str_field(out, ",\"protocol\":", ev.protocol)
       && append_str_field(out, ",\"registrationId\":", ev.registration_id);
  if (ok && !ev.returned_payload_json.empty())
    ok = append_str_field(out, ",\"returnedPayload\":", ev.returned_payload_json);
  ok = ok && append_str_field(out, ",\"status\":", to_string(ev.status))
       && append_str_field(out, ",\"substatus\":", ev.substatus);
  out.append(",\"v\":");
  append_int(out, ev.version);
  if (ok && !ev.x509_json.empty()) // "v" < "x509"
    ok = append_str_field(out, ",\"x509\":", ev.x509_json);
  out.push_back('}');
  // Invalid UTF-8 somewhere: let the DOM encoder throw exactly what it always
  // threw (type_error 316).
  if (!ok)
    return event_json(ev).dump();
  return out;
}

namespace {

/// decode_event without a DOM: the SAX events of nlohmann's own parser (same
/// grammar, numbers, escapes and errors as json::parse) stage the last value
/// of each known top-level member; apply() then reads them with event_from's
/// rules and in its order (so duplicates, nulls and type errors come out the
/// same). Anything else, nested values included, is skipped.
class event_sax {
public:
  enum class kind : uint8_t { absent, null, string, integer, unsigned_, floating, boolean,
                              object, array };
  struct slot {
    kind k = kind::absent;
    bool b = false;
    int64_t i = 0;
    uint64_t u = 0;
    double d = 0;
    std::string s;
  };
  enum field : uint8_t { f_v, f_operation_id, f_registration_id, f_id_scope, f_api_version,
                         f_protocol, f_accepted_ms, f_attestation_type,
                         f_enrollment_group_id, f_payload, f_authorization, f_assigned_hub,
                         f_device_id, f_initial_twin, f_iot_edge, f_substatus, f_status,
                         f_error_code, f_error_message, f_attested_ms, f_allocated_ms,
                         f_completed_ms, f_returned_payload, f_allocation, f_x509,
                         f_key_used, f_csr, f_issuing_ca, f_issued_chain, f_count };

  // -- nlohmann SAX interface
  bool null() { return scalar(kind::null); }
  bool boolean(bool v) {
    if (auto* s = target(kind::boolean))
      s->b = v;
    return true;
  }
  bool number_integer(json::number_integer_t v) {
    if (auto* s = target(kind::integer))
      s->i = v;
    return true;
  }
  bool number_unsigned(json::number_unsigned_t v) {
    if (auto* s = target(kind::unsigned_))
      s->u = v;
    return true;
  }
  bool number_float(json::number_float_t v, const json::string_t&) {
    if (auto* s = target(kind::floating))
      s->d = v;
    return true;
  }
  bool string(json::string_t& v) {
    if (auto* s = target(kind::string))
      s->s.assign(v); // copy: the lexer keeps reusing its buffer
    return true;
  }
  bool binary(json::binary_t&) { return true; } // never produced by the JSON parser
  bool start_object(std::size_t) { return open(kind::object); }
  bool start_array(std::size_t) { return open(kind::array); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }
  bool key(json::string_t& k) {
    if (depth_ == 1)
      current_ = lookup(k);
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) {
    parse_error_ = ex.what();
    return false;
  }

  /// The common case without nlohmann's lexer: one flat object of strings
  /// (short escapes only), integers that fit, booleans and nulls. False when
  /// the text is anything else, valid or not; the caller then parses it again
  /// with sax_parse (on a fresh object), which has the final word.
  bool parse_flat(std::string_view text);
  error apply(registration_event& ev);
  bool top_is_object() const { return top_ == kind::object; }
  std::string& parse_error_message() { return parse_error_; }

private:
  static constexpr std::string_view names_[f_count] = {
    "v", "operationId", "registrationId", "idScope", "apiVersion", "protocol", "acceptedMs",
    "attestationType", "enrollmentGroupId", "payload", "authorization", "assignedHub",
    "deviceId", "initialTwin", "iotEdge", "substatus", "status", "errorCode",
    "errorMessage", "attestedMs", "allocatedMs", "completedMs", "returnedPayload",
    "allocation", "x509", "keyUsed", "csr", "issuingCa", "issuedCertificateChain"};

  static int lookup(std::string_view k) {
    for (int f = 0; f < f_count; ++f)
      if (names_[f] == k)
        return f;
    return -1;
  }
  static const char* type_name(kind k) {
    switch (k) {
      case kind::null: return "null";
      case kind::string: return "string";
      case kind::boolean: return "boolean";
      case kind::object: return "object";
      case kind::array: return "array";
      default: return "number";
    }
  }
  /// The slot a scalar value at this point goes to, marked as `k`; nullptr
  /// when the value is nested or its member is not one we read.
  slot* target(kind k) {
    if (depth_ == 0) {
      top_ = k;
      return nullptr;
    }
    if (depth_ != 1 || current_ < 0)
      return nullptr;
    slot& s = slots_[current_];
    s.k = k;
    return &s;
  }
  bool scalar(kind k) {
    target(k);
    return true;
  }
  bool open(kind k) {
    target(k);
    ++depth_;
    return true;
  }
  bool close() {
    --depth_;
    return true;
  }
  error type_mismatch(int f, const char* want) const;
  bool read(int f, std::string& out, error& err);
  template <class Int>
  bool read_int(int f, Int& out, error& err, bool bool_ok);
  bool read(int f, bool& out, error& err);

  static bool read_string(const char*& p, const char* end, std::string& out);
  static bool read_integer(const char*& p, const char* end, int64_t& out);

  slot slots_[f_count];
  std::string scratch_; // keys, and string values of members not read
  int depth_ = 0;
  int current_ = -1;
  kind top_ = kind::absent;
  std::string parse_error_;
};

error event_sax::type_mismatch(int f, const char* want) const {
  return {error_code::bad_request, "event: " + std::string(names_[f]) + " must be a " + want
                                     + ", but is " + type_name(slots_[f].k)};
}

bool event_sax::parse_flat(std::string_view text) {
  const char* p = text.data();
  const char* end = p + text.size();
  auto skip_ws = [&] {
    while (p != end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
      ++p;
  };
  skip_ws();
  if (p == end || *p != '{')
    return false;
  ++p;
  top_ = kind::object;
  skip_ws();
  if (p != end && *p == '}') {
    ++p;
  } else {
    for (;;) {
      if (p == end || *p != '"' || !read_string(p, end, scratch_))
        return false;
      const int f = lookup(scratch_);
      skip_ws();
      if (p == end || *p != ':')
        return false;
      ++p;
      skip_ws();
      if (p == end)
        return false;
      slot* s = f >= 0 ? &slots_[f] : nullptr;
      const char c = *p;
      if (c == '"') {
        if (!read_string(p, end, s ? s->s : scratch_))
          return false;
        if (s)
          s->k = kind::string;
      } else if (c == '-' || (c >= '0' && c <= '9')) {
        int64_t v = 0;
        if (!read_integer(p, end, v))
          return false;
        if (s) {
          s->k = kind::integer;
          s->i = v;
        }
      } else if (end - p >= 4 && std::memcmp(p, "true", 4) == 0) {
        p += 4;
        if (s) {
          s->k = kind::boolean;
          s->b = true;
        }
      } else if (end - p >= 5 && std::memcmp(p, "false", 5) == 0) {
        p += 5;
        if (s) {
          s->k = kind::boolean;
          s->b = false;
        }
      } else if (end - p >= 4 && std::memcmp(p, "null", 4) == 0) {
        p += 4;
        if (s)
          s->k = kind::null;
      } else {
        return false; // nested values (and garbage): sax_parse
      }
      skip_ws();
      if (p == end)
        return false;
      if (*p == '}') {
        ++p;
        break;
      }
      if (*p != ',')
        return false;
      ++p;
      skip_ws();
    }
  }
  skip_ws();
  return p == end;
}

// A string literal at p (on its '"'); the lexer's rules: no raw control
// characters, well-formed UTF-8 only. \u escapes are left to sax_parse.
bool event_sax::read_string(const char*& p, const char* end, std::string& out) {
  out.clear();
  const char* run = ++p;
  while (p != end) {
#if defined(__SSE2__)
    // Skip 16 plain bytes at a time: neither '"' nor '\\', nor a control
    // byte or one of a UTF-8 sequence (negative as signed char). The JSON
    // texts embedded in events (twin, payload) make these strings long.
    while (end - p >= 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      const __m128i special =
        _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('"')),
                                  _mm_cmpeq_epi8(v, _mm_set1_epi8('\\'))),
                     _mm_cmplt_epi8(v, _mm_set1_epi8(0x20)));
      const int mask = _mm_movemask_epi8(special);
      if (mask != 0) {
        p += __builtin_ctz(static_cast<unsigned>(mask));
        break;
      }
      p += 16;
    }
    if (p == end)
      break;
#endif
    auto c = static_cast<unsigned char>(*p);
    if (c == '"') {
      out.append(run, p);
      ++p;
      return true;
    }
    if (c < 0x20)
      return false;
    if (c < 0x80 && c != '\\') {
      ++p;
      continue;
    }
    if (c >= 0x80) {
      auto n = json_text::utf8_sequence(std::string_view(p, static_cast<std::size_t>(end - p)), 0);
      if (n == 0)
        return false;
      p += n;
      continue;
    }
    out.append(run, p);
    if (++p == end)
      return false;
    switch (*p) {
      case '"': out.push_back('"'); break;
      case '\\': out.push_back('\\'); break;
      case '/': out.push_back('/'); break;
      case 'b': out.push_back('\b'); break;
      case 'f': out.push_back('\f'); break;
      case 'n': out.push_back('\n'); break;
      case 'r': out.push_back('\r'); break;
      case 't': out.push_back('\t'); break;
      default: return false; // \u (surrogate rules) and invalid escapes
    }
    run = ++p;
  }
  return false;
}

// An integer of up to 18 digits (no overflow possible); fractions, exponents,
// leading zeros and longer numbers are left to sax_parse. The count is checked
// before each digit is taken: a 19th could overflow int64_t.
bool event_sax::read_integer(const char*& p, const char* end, int64_t& out) {
  const bool negative = *p == '-';
  if (negative)
    ++p;
  const char* first = p;
  int64_t v = 0;
  while (p != end && *p >= '0' && *p <= '9') {
    if (p - first == 18)
      return false;
    v = v * 10 + (*p++ - '0');
  }
  const auto digits = p - first;
  if (digits == 0 || (*first == '0' && digits > 1))
    return false;
  if (p != end && (*p == '.' || *p == 'e' || *p == 'E'))
    return false;
  out = negative ? -v : v;
  return true;
}

// Each read mirrors get_to(j, key, out): absent or null leaves `out` alone;
// otherwise nlohmann's from_json conversion for that type.
bool event_sax::read(int f, std::string& out, error& err) {
  slot& s = slots_[f];
  if (s.k == kind::absent || s.k == kind::null)
    return true;
  if (s.k != kind::string) {
    err = type_mismatch(f, "string");
    return false;
  }
  out = std::move(s.s);
  return true;
}

template <class Int>
bool event_sax::read_int(int f, Int& out, error& err, bool bool_ok) {
  const slot& s = slots_[f];
  bool ok = true;
  switch (s.k) {
    case kind::absent:
    case kind::null: return true;
    // static_cast as nlohmann's get_arithmetic_value / from_json do, within
    // the member's range (as get_to above).
    case kind::integer:
      if (!(ok = fits<Int>(s.i)))
        break;
      out = static_cast<Int>(s.i);
      return true;
    case kind::unsigned_:
      if (!(ok = fits<Int>(s.u)))
        break;
      out = static_cast<Int>(s.u);
      return true;
    case kind::floating:
      if (!(ok = fits<Int>(s.d)))
        break;
      out = static_cast<Int>(s.d);
      return true;
    case kind::boolean:
      if (bool_ok) { // from_json(json, int32_t&) takes booleans; int64_t's does not
        out = static_cast<Int>(s.b);
        return true;
      }
      break;
    default: break;
  }
  err = ok ? type_mismatch(f, "number")
           : error{error_code::bad_request, "event: " + std::string(names_[f]) + " is out of range"};
  return false;
}

bool event_sax::read(int f, bool& out, error& err) {
  const slot& s = slots_[f];
  if (s.k == kind::absent || s.k == kind::null)
    return true;
  if (s.k != kind::boolean) {
    err = type_mismatch(f, "boolean");
    return false;
  }
  out = s.b;
  return true;
}

// event_from, step for step, on the staged values.
error event_sax::apply(registration_event& ev) {
  error err;
  if (!read_int(f_v, ev.version, err, true))
    return err;
  if (ev.version != 1)
    return {error_code::bad_request, "event: unsupported version " + std::to_string(ev.version)};
  if (!read(f_operation_id, ev.operation_id, err) || !read(f_registration_id, ev.registration_id, err))
    return err;
  if (ev.operation_id.empty() || ev.registration_id.empty())
    return {error_code::bad_request, "event: operationId and registrationId are required"};
  if (!read(f_id_scope, ev.id_scope, err) || !read(f_api_version, ev.api_version, err)
      || !read(f_protocol, ev.protocol, err) || !read_int(f_accepted_ms, ev.accepted_ms, err, false)
      || !read(f_attestation_type, ev.attestation_type, err)
      || !read(f_enrollment_group_id, ev.enrollment_group_id, err)
      || !read(f_payload, ev.payload_json, err) || !read(f_authorization, ev.authorization, err)
      || !read(f_assigned_hub, ev.assigned_hub, err) || !read(f_device_id, ev.device_id, err)
      || !read(f_initial_twin, ev.initial_twin_json, err) || !read(f_iot_edge, ev.iot_edge, err)
      || !read(f_substatus, ev.substatus, err)
      || !read(f_returned_payload, ev.returned_payload_json, err)
      || !read(f_allocation, ev.allocation_json, err)
      || !read(f_x509, ev.x509_json, err)
      || !read(f_key_used, ev.key_used, err)
      || !read(f_csr, ev.csr, err)
      || !read(f_issuing_ca, ev.issuing_ca, err)
      || !read(f_issued_chain, ev.issued_chain, err))
    return err;
  std::string st = "assigning";
  if (!read(f_status, st, err))
    return err;
  if (!from_string(st, ev.status))
    return {error_code::bad_request, "event: bad status '" + st + "'"};
  if (!read_int(f_error_code, ev.error_code, err, true)
      || !read(f_error_message, ev.error_message, err)
      || !read_int(f_attested_ms, ev.attested_ms, err, false)
      || !read_int(f_allocated_ms, ev.allocated_ms, err, false)
      || !read_int(f_completed_ms, ev.completed_ms, err, false))
    return err;
  return {};
}

} // namespace

error decode_event(std::string_view text, registration_event& out) {
  try {
    {
      event_sax flat;
      if (flat.parse_flat(text))
        return flat.apply(out);
    }
    event_sax sax;
    if (!json::sax_parse(text.data(), text.data() + text.size(), &sax))
      return {error_code::bad_request, "event: " + sax.parse_error_message()};
    if (!sax.top_is_object())
      return {error_code::bad_request, "event: not a JSON object"};
    return sax.apply(out);
  } catch (const std::exception& e) { // allocation failure
    return {error_code::bad_request, std::string("event: ") + e.what()};
  }
}

namespace {

/// A direct publisher's `x509` member: its shape only; the mechanism judges
/// the certificates and the signature.
error decode_presented_x509(const json& x, registration_event& ev) {
  auto bad = [](const std::string& what) {
    return error{error_code::bad_request, "requested event: x509" + what};
  };
  if (!x.is_object())
    return bad(" must be an object {certificates, expiry, signature}");
  auto cred = std::make_shared<x509_credential>();
  auto certs = x.find("certificates");
  if (certs == x.end() || !certs->is_array() || certs->empty() || certs->size() > 10)
    return bad(".certificates must be an array of 1..10 base64 DER certificates, leaf first");
  for (const auto& c : *certs) {
    std::optional<std::string> der;
    if (c.is_string())
      der = crypto::base64_decode(c.get_ref<const std::string&>());
    if (!der || der->empty() || der->size() > 16384)
      return bad(".certificates[" + std::to_string(cred->chain_der.size())
                 + "] is not base64 of at most 16 KiB");
    cred->chain_der.push_back(std::move(*der));
  }
  auto expiry = x.find("expiry");
  if (expiry == x.end() || !expiry->is_number_integer())
    return bad(".expiry must be an integer (seconds since the epoch)");
  auto sig = x.find("signature");
  std::optional<std::string> sig_bytes;
  if (sig != x.end() && sig->is_string())
    sig_bytes = crypto::base64_decode(sig->get_ref<const std::string&>());
  if (!sig_bytes || sig_bytes->size() > 1024)
    return bad(".signature must be base64 (the leaf key's signature, at most 1 KiB)");
  cred->possession =
    x509_credential::possession_proof{expiry->get<int64_t>(), std::move(*sig_bytes)};
  ev.x509_presented = std::move(cred);
  return {};
}

} // namespace

error decode_requested_event(std::string_view text, registration_event& out) {
  try {
    // A device's own request, read as its HTTP body would be: a repeated
    // member name is refused, not resolved to the last.
    json j;
    if (auto err = parse_json_body(text, j))
      return {error_code::bad_request, "requested event: " + err.message};
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
    get_to(j, "csr", ev.csr);
    if (auto it = j.find("payload"); it != j.end() && !it->is_null()) {
      // Like the HTTP body's payload: a JSON object. Also accepted as JSON
      // text in a string, the form encode_event writes.
      json p = *it;
      if (it->is_string())
        if (auto err = parse_json_body(it->get_ref<const std::string&>(), p))
          return {error_code::bad_request, "requested event: payload: " + err.message};
      if (!p.is_object())
        return {error_code::bad_request, "requested event: payload must be a JSON object"};
      ev.payload_json = p.dump();
    }
    if (auto it = j.find("x509"); it != j.end() && !it->is_null())
      if (auto err = decode_presented_x509(*it, ev))
        return err;
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
    if (auto x = j.find("x509"); x != j.end() && x->is_object())
      x->erase("signature");
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
