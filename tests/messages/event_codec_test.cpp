// encode_event / decode_event against the nlohmann DOM codec they replaced
// (kept here as the reference): same bytes out, same events and errors in.

#include <doctest/doctest.h>

#include <algorithm>
#include <climits>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <random>
#include <vector>

#include <nlohmann/json.hpp>

#include "messages/registration.hpp"

using namespace prov;
using nlohmann::json;

namespace {

// -- the reference: the DOM-based codec as it was --------------------------------------

json ref_event_json(const registration_event& ev) {
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

/// get_to, plus the rule decode_event added later: a number out of an
/// integer member's range is an error (get_to wrapped it, or for a double
/// was undefined).
template <class T>
void ref_get_to(const json& j, const char* key, T& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null())
    return;
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    using lim = std::numeric_limits<T>;
    if ((it->is_number_unsigned() && it->get<uint64_t>() > static_cast<uint64_t>(lim::max()))
        || (!it->is_number_unsigned() && it->is_number_integer()
            && (it->get<int64_t>() < lim::min() || it->get<int64_t>() > lim::max()))
        || (it->is_number_float()
            && !(it->get<double>() >= static_cast<double>(lim::min())
                 && it->get<double>() < -static_cast<double>(lim::min()))))
      throw std::out_of_range(std::string(key) + " is out of range");
  }
  it->get_to(out);
}

error ref_event_from(const json& j, registration_event& ev) {
  ref_get_to(j, "v", ev.version);
  if (ev.version != 1)
    return {error_code::bad_request, "event: unsupported version " + std::to_string(ev.version)};
  ref_get_to(j, "operationId", ev.operation_id);
  ref_get_to(j, "registrationId", ev.registration_id);
  if (ev.operation_id.empty() || ev.registration_id.empty())
    return {error_code::bad_request, "event: operationId and registrationId are required"};
  ref_get_to(j, "idScope", ev.id_scope);
  ref_get_to(j, "apiVersion", ev.api_version);
  ref_get_to(j, "protocol", ev.protocol);
  ref_get_to(j, "acceptedMs", ev.accepted_ms);
  ref_get_to(j, "attestationType", ev.attestation_type);
  ref_get_to(j, "enrollmentGroupId", ev.enrollment_group_id);
  ref_get_to(j, "payload", ev.payload_json);
  ref_get_to(j, "authorization", ev.authorization);
  ref_get_to(j, "assignedHub", ev.assigned_hub);
  ref_get_to(j, "deviceId", ev.device_id);
  ref_get_to(j, "initialTwin", ev.initial_twin_json);
  ref_get_to(j, "iotEdge", ev.iot_edge);
  ref_get_to(j, "substatus", ev.substatus);
  std::string st = "assigning";
  ref_get_to(j, "status", st);
  if (!from_string(st, ev.status))
    return {error_code::bad_request, "event: bad status '" + st + "'"};
  ref_get_to(j, "errorCode", ev.error_code);
  ref_get_to(j, "errorMessage", ev.error_message);
  ref_get_to(j, "attestedMs", ev.attested_ms);
  ref_get_to(j, "allocatedMs", ev.allocated_ms);
  ref_get_to(j, "completedMs", ev.completed_ms);
  return {};
}

error ref_decode_event(std::string_view text, registration_event& out) {
  try {
    auto j = json::parse(text);
    if (!j.is_object())
      return {error_code::bad_request, "event: not a JSON object"};
    return ref_event_from(j, out);
  } catch (const std::exception& e) {
    return {error_code::bad_request, std::string("event: ") + e.what()};
  }
}

// -- helpers ----------------------------------------------------------------------------

/// Every field, for comparing events (the DOM dump never throws here: decoded
/// strings are valid UTF-8, and the samples are too).
std::string fields(const registration_event& ev) {
  return ref_event_json(ev).dump(-1, ' ', false, json::error_handler_t::replace);
}

/// A non-default event to decode into: decoding leaves absent members alone.
registration_event prefilled() {
  registration_event ev;
  ev.version = 7;
  ev.operation_id = "old-op";
  ev.registration_id = "old-reg";
  ev.id_scope = "old-scope";
  ev.payload_json = "{\"old\":true}";
  ev.authorization = "old-auth";
  ev.accepted_ms = -42;
  ev.error_code = 99;
  ev.iot_edge = true;
  ev.status = registration_status::disabled;
  ev.completed_ms = 5;
  return ev;
}

/// Decodes `text` with both codecs into equal starting events; they must agree
/// on success, error code and every field of the result (even after an error,
/// the partly filled event).
void check_same_decode(const std::string& text, const registration_event& start = prefilled()) {
  registration_event a = start, b = start;
  error ea = decode_event(text, a);
  error eb = ref_decode_event(text, b);
  INFO("input: ", text);
  INFO("new: ", ea.message, " / old: ", eb.message);
  REQUIRE(static_cast<bool>(ea) == static_cast<bool>(eb));
  CHECK(ea.code == eb.code);
  if (ea)
    CHECK(!ea.message.empty());
  CHECK(fields(a) == fields(b));
}

void check_same_encode(const registration_event& ev) {
  std::string want;
  try {
    want = ref_event_json(ev).dump();
  } catch (const json::exception& e) {
    INFO("old encoder threw: ", e.what());
    CHECK_THROWS_WITH_AS(encode_event(ev), e.what(), json::type_error);
    return;
  }
  auto got = encode_event(ev);
  REQUIRE(got == want);
  registration_event back;
  if (ev.version == 1 && !ev.operation_id.empty() && !ev.registration_id.empty()) {
    REQUIRE(!decode_event(got, back));
    CHECK(fields(back) == fields(ev));
  }
  check_same_decode(got);
}

void set_all_strings(registration_event& ev, const std::string& s) {
  for (auto* f : {&ev.operation_id, &ev.registration_id, &ev.id_scope, &ev.api_version,
                  &ev.protocol, &ev.attestation_type, &ev.enrollment_group_id, &ev.payload_json,
                  &ev.authorization, &ev.assigned_hub, &ev.device_id, &ev.initial_twin_json,
                  &ev.substatus, &ev.error_message})
    *f = s;
}

std::vector<std::string*> string_fields(registration_event& ev) {
  return {&ev.operation_id, &ev.registration_id, &ev.id_scope, &ev.api_version,
          &ev.protocol, &ev.attestation_type, &ev.enrollment_group_id, &ev.payload_json,
          &ev.authorization, &ev.assigned_hub, &ev.device_id, &ev.initial_twin_json,
          &ev.substatus, &ev.error_message};
}

registration_event sample() {
  registration_event ev;
  ev.operation_id = "5.0123456789abcdef.018f2c4e-7b1a-7c3d-8e9f-0a1b2c3d4e5f";
  ev.registration_id = "sensor-1";
  ev.id_scope = "0ne0000BEEF";
  ev.api_version = "2021-06-01";
  ev.protocol = "http";
  ev.accepted_ms = 1700000000123;
  ev.attestation_type = "symmetricKey";
  ev.enrollment_group_id = "bench-group";
  ev.payload_json = R"({"modelId":"dtmi:x;1","n":[1,2]})";
  ev.assigned_hub = "hub-a.example.net";
  ev.device_id = "sensor-1";
  ev.initial_twin_json = R"({"tags":{"x":"y"}})";
  ev.substatus = "initialAssignment";
  ev.status = registration_status::assigned;
  ev.attested_ms = 1700000000200;
  ev.allocated_ms = 1700000000300;
  ev.completed_ms = 1700000000400;
  return ev;
}

const std::vector<std::string> k_pieces = {
  "a", "Z", "0", " ", "/", "\"", "\\", "\b", "\f", "\n", "\r", "\t", std::string(1, '\0'),
  "\x01", "\x1f", "\x7f", "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80", "\xef\xbf\xbf",
  "\xf4\x8f\xbf\xbf", "{\"k\":[1,\"v\"]}", "sig=", "\\u0041", "'"};

std::string random_string(std::mt19937& gen) {
  std::uniform_int_distribution<int> len(0, 12), piece(0, static_cast<int>(k_pieces.size()) - 1),
    ascii(0x20, 0x7e), coin(0, 3);
  std::string s;
  for (int n = len(gen); n > 0; --n)
    s += coin(gen) == 0 ? k_pieces[static_cast<std::size_t>(piece(gen))]
                        : std::string(1, static_cast<char>(ascii(gen)));
  return s;
}

int64_t random_i64(std::mt19937& gen) {
  static const int64_t special[] = {0, 1, -1, 9, 10, -10, 1700000000123, INT32_MAX, INT32_MIN,
                                    INT64_MAX, INT64_MIN, INT64_MIN + 1};
  std::uniform_int_distribution<int> pick(0, 14);
  int p = pick(gen);
  if (p < 12)
    return special[p];
  std::uniform_int_distribution<int64_t> any(INT64_MIN, INT64_MAX);
  return any(gen) >> std::uniform_int_distribution<int>(0, 62)(gen);
}

registration_event random_event(std::mt19937& gen) {
  registration_event ev;
  for (auto* f : string_fields(ev))
    *f = random_string(gen);
  std::uniform_int_distribution<int> st(0, 4), coin(0, 5);
  if (coin(gen) == 0)
    ev.authorization.clear();
  if (coin(gen) == 0)
    ev.payload_json = json{{"k", random_string(gen)}, {"n", random_i64(gen)}}.dump();
  ev.version = coin(gen) == 0 ? static_cast<int32_t>(random_i64(gen)) : 1;
  ev.accepted_ms = random_i64(gen);
  ev.attested_ms = random_i64(gen);
  ev.allocated_ms = random_i64(gen);
  ev.completed_ms = random_i64(gen);
  ev.error_code = static_cast<int32_t>(random_i64(gen));
  ev.iot_edge = coin(gen) < 3;
  ev.status = static_cast<registration_status>(st(gen));
  return ev;
}

} // namespace

TEST_SUITE("event codec") {

TEST_CASE("encode_event writes what the DOM dump wrote, byte for byte (edge cases)") {
  check_same_encode(registration_event{});
  check_same_encode(sample());
  for (auto st : {registration_status::unassigned, registration_status::assigning,
                  registration_status::assigned, registration_status::failed,
                  registration_status::disabled})
    for (bool edge : {false, true}) {
      auto ev = sample();
      ev.status = st;
      ev.iot_edge = edge;
      check_same_encode(ev);
    }
  for (const auto& piece : k_pieces) {
    // In every string field at once, and in each alone.
    auto ev = sample();
    set_all_strings(ev, "x" + piece + piece + "y");
    check_same_encode(ev);
    for (std::size_t f = 0; f < string_fields(ev).size(); ++f) {
      auto one = sample();
      *string_fields(one)[f] = piece;
      check_same_encode(one);
    }
  }
  std::string all_controls;
  for (int c = 0; c < 0x20; ++c)
    all_controls.push_back(static_cast<char>(c));
  auto ev = sample();
  set_all_strings(ev, all_controls + "\"\\/\x7f");
  check_same_encode(ev);
  for (int64_t n : {int64_t{0}, int64_t{-1}, INT64_MAX, INT64_MIN, int64_t{INT32_MIN}}) {
    auto e = sample();
    e.accepted_ms = e.attested_ms = e.allocated_ms = e.completed_ms = n;
    e.error_code = static_cast<int32_t>(n);
    e.version = static_cast<int32_t>(n);
    check_same_encode(e);
  }
  auto empty_ids = sample();
  empty_ids.operation_id.clear();
  empty_ids.authorization.clear();
  check_same_encode(empty_ids);
  ev = sample();
  ev.payload_json = std::string(5000, 'p') + "\xe2\x82\xac";
  check_same_encode(ev);
}

TEST_CASE("encode_event throws like the DOM dump on invalid UTF-8") {
  for (std::string bad : {"\xff", "a\xc0\x80", "\xed\xa0\x80", "\xe2\x82", "\xf4\x90\x80\x80",
                          "ok\xc3"}) {
    auto ev = sample();
    for (std::size_t f = 0; f < string_fields(ev).size(); ++f) {
      auto one = sample();
      *string_fields(one)[f] = bad;
      check_same_encode(one);
    }
    set_all_strings(ev, bad);
    check_same_encode(ev);
  }
}

TEST_CASE("encode_event and decode_event agree with the DOM codec on random events") {
  std::mt19937 gen(20240611);
  for (int i = 0; i < 600; ++i) {
    auto ev = random_event(gen);
    check_same_encode(ev);
  }
}

TEST_CASE("decode_event takes any key order, whitespace, unknown members and escapes") {
  std::mt19937 gen(7);
  const std::vector<std::string> ws = {"", " ", "\n", "\t ", "\r\n  "};
  std::uniform_int_distribution<int> w(0, static_cast<int>(ws.size()) - 1), coin(0, 2);
  const std::vector<json> unknown = {
    json::object(), json::array(), json{{"a", {1, 2, {{"b", nullptr}}}}, {"v", 2}},
    json::array({json::array({json::object({{"operationId", 5}})})}), 3.5, -7, "x", nullptr,
    true};
  for (int i = 0; i < 300; ++i) {
    auto ev = random_event(gen);
    ev.version = 1;
    if (ev.operation_id.empty())
      ev.operation_id = "op";
    if (ev.registration_id.empty())
      ev.registration_id = "reg";
    auto j = json::parse(encode_event(ev));
    std::vector<std::pair<std::string, json>> members;
    for (const auto& m : j.items())
      members.emplace_back(m.key(), m.value());
    // Other members, some with a known key only nested inside.
    for (int u = coin(gen); u > 0; --u)
      members.emplace_back("x-" + std::to_string(u),
                           unknown[static_cast<std::size_t>(gen() % unknown.size())]);
    std::shuffle(members.begin(), members.end(), gen);
    const bool ascii = coin(gen) == 0; // non-ASCII as \uXXXX (surrogate pairs too)
    std::string text = ws[static_cast<std::size_t>(w(gen))] + "{";
    for (std::size_t m = 0; m < members.size(); ++m) {
      if (m)
        text += ws[static_cast<std::size_t>(w(gen))] + ",";
      text += ws[static_cast<std::size_t>(w(gen))] + json(members[m].first).dump(-1, ' ', ascii)
              + ws[static_cast<std::size_t>(w(gen))] + ":" + ws[static_cast<std::size_t>(w(gen))]
              + members[m].second.dump(-1, ' ', ascii);
    }
    text += ws[static_cast<std::size_t>(w(gen))] + "}" + ws[static_cast<std::size_t>(w(gen))];
    registration_event back;
    INFO(text);
    REQUIRE(!decode_event(text, back));
    CHECK(fields(back) == fields(ev));
    check_same_decode(text);
  }
  // Escapes written by hand: a surrogate pair, \/, and an escaped key.
  registration_event back;
  REQUIRE(!decode_event(R"({"\u0076":1,"operationId":"\ud83d\ude00\/\u00e9","registrationId":"r\"\\\b\f\n\r\t\u0000"})",
                        back));
  CHECK(back.operation_id == "\xf0\x9f\x98\x80/\xc3\xa9");
  CHECK(back.registration_id == std::string("r\"\\\b\f\n\r\t\0", 9));
}

TEST_CASE("decode_event accepts and rejects what the DOM decoder did") {
  const std::string valid = encode_event(sample());
  std::vector<std::string> inputs = {
    "", " ", "not json", "[1,2]", "[]", "1", "\"s\"", "null", "true", "{}", "{", "}",
    R"({"v":2,"operationId":"o","registrationId":"r"})",
    R"({"v":1,"registrationId":"r"})",
    R"({"v":1,"operationId":"o","registrationId":"r","status":"bogus"})",
    R"({"v":1,"operationId":5,"registrationId":"r"})",
    R"({"operationId":"o","registrationId":"r"})",
    R"({"operationId":"o","registrationId":"r","v":null,"status":null,"payload":null})",
    R"({"operationId":"o","registrationId":"r","operationId":null})",
    R"({"operationId":5,"registrationId":"r","operationId":"o"})",
    R"({"operationId":"o","registrationId":"r","v":1,"v":2})",
    R"({"operationId":"o","registrationId":"r","status":"failed","status":"x"})",
    R"({"operationId":"o","registrationId":"r","payload":{"a":1}})",
    R"({"operationId":"o","registrationId":"r","initialTwin":[1]})",
    R"({"operationId":"o","registrationId":"r","iotEdge":1})",
    R"({"operationId":"o","registrationId":"r","iotEdge":"true"})",
    R"({"operationId":"o","registrationId":"r","acceptedMs":true})",
    R"({"operationId":"o","registrationId":"r","errorCode":true})",
    R"({"operationId":"o","registrationId":"r","v":true})",
    R"({"operationId":"o","registrationId":"r","v":1.9})",
    R"({"operationId":"o","registrationId":"r","v":4294967297})",
    R"({"operationId":"o","registrationId":"r","acceptedMs":-1.5e3})",
    R"({"operationId":"o","registrationId":"r","acceptedMs":18446744073709551615})",
    R"({"operationId":"o","registrationId":"r","acceptedMs":1e400})",
    R"({"operationId":"o","registrationId":"r","acceptedMs":-0})",
    R"({"operationId":"o","registrationId":"r","acceptedMs":01})",
    R"({"operationId":"o","registrationId":"r","acceptedMs":"1"})",
    R"({"operationId":"o","registrationId":"r"} /* c */)",
    R"({"operationId":"o","registrationId":"r","x":"\ud800"})",
    R"({"operationId":"o","registrationId":"r","x":"\u12"})",
    R"({"operationId":"o","registrationId":"r","x":"a	b"})",
    "{\"operationId\":\"o\",\"registrationId\":\"r\",\"x\":\"\xff\"}",
    "{\"operationId\":\"o\xc3\",\"registrationId\":\"r\"}",
    R"({"operationId":"o","registrationId":"r",})",
    R"({"operationId":"o","registrationId":"r"}{})",
    R"({"operationId":"o""registrationId":"r"})",
    R"({"operationId":'o',"registrationId":"r"})",
    valid + "x", valid + " \n", valid + "}", valid + "{}", valid + "\0",
    std::string(valid.begin(), valid.end() - 1) + ",}", "\xef\xbb\xbf" + valid,
  };
  // Deep unknown nesting.
  inputs.push_back(R"({"operationId":"o","registrationId":"r","deep":)" + std::string(3000, '[')
                   + std::string(3000, ']') + "}");
  inputs.push_back(std::string(3000, '[') + std::string(3000, ']'));
  // Truncations of a valid event.
  for (std::size_t n = 0; n < valid.size(); ++n)
    inputs.push_back(valid.substr(0, n));
  // Each member replaced by values of every type.
  const std::vector<std::string> values = {
    "null", "true", "false", "0", "-1", "1", "1.5", "-2.5", "1e3", "2E-2", "4294967297",
    "9223372036854775807", "9223372036854775808", "18446744073709551615", "-9223372036854775808",
    "\"\"", "\"str\"", "\"assigned\"", "\"1\"", "{}", "{\"a\":[1,{\"b\":2}]}", "[]",
    "[1,{\"v\":2}]"};
  auto base = json::parse(valid);
  for (const auto& item : base.items()) {
    for (const auto& v : values) {
      std::string text = "{";
      for (const auto& other : base.items())
        if (other.key() != item.key())
          text += json(other.key()).dump() + ":" + other.value().dump() + ",";
      text += json(item.key()).dump() + ":" + v + "}";
      inputs.push_back(text);
      // Missing and duplicated too.
      inputs.push_back(text.substr(0, text.rfind(',')) + "}");
      inputs.push_back(text.substr(0, text.size() - 1) + "," + json(item.key()).dump() + ":"
                       + item.value().dump() + "}");
    }
  }
  for (const auto& text : inputs) {
    check_same_decode(text);
    check_same_decode(text, registration_event{});
  }
}

TEST_CASE("decode_event matches the DOM decoder on mutated records") {
  std::mt19937 gen(99);
  // No digits, '-', '.', 'e' or 'E' inserted: a number out of the integer
  // range would make both decoders' float-to-int conversion undefined.
  const std::string alphabet = "{}[]\",:\\ \tanulltrsfx\xc3\xff";
  std::uniform_int_distribution<int> op(0, 2), ch(0, static_cast<int>(alphabet.size()) - 1);
  for (int i = 0; i < 3000; ++i) {
    auto text = encode_event(sample());
    for (int m = 1 + static_cast<int>(gen() % 3); m > 0; --m) {
      std::size_t at = gen() % text.size();
      switch (op(gen)) {
        case 0: text.erase(at, 1); break;
        case 1: text.insert(at, 1, alphabet[static_cast<std::size_t>(ch(gen))]); break;
        default: text[at] = alphabet[static_cast<std::size_t>(ch(gen))];
      }
      if (text.empty())
        text = "{";
    }
    check_same_decode(text);
  }
}

TEST_CASE("decode_event errors say what is wrong") {
  registration_event ev;
  auto err = decode_event(R"({"v":1,"operationId":"o","registrationId":"r","iotEdge":"yes"})", ev);
  CHECK(err.code == error_code::bad_request);
  CHECK(err.message.find("iotEdge") != std::string::npos);
  CHECK(err.message.find("boolean") != std::string::npos);
  err = decode_event(R"({"v":1,"operationId":"o","registrationId":"r","acceptedMs":{}})", ev);
  CHECK(err.message.find("acceptedMs") != std::string::npos);
  err = decode_event(R"({"v":1,"operationId":"o")", ev);
  CHECK(err.message.find("parse error") != std::string::npos);
  CHECK(decode_event("[]", ev).message == "event: not a JSON object");
}

TEST_CASE("decode_event: integers of 19 digits and more are the right value or an error") {
  // The flat fast path multiplied before it counted digits: a 19th digit
  // overflowed int64_t (undefined behaviour), and a value out of a member's
  // range was then cast into it (wrapped, or undefined for a double).
  auto decode = [](const std::string& member, const std::string& number, registration_event& ev) {
    return decode_event(R"({"v":1,"operationId":"o","registrationId":"r",")" + member + "\":"
                          + number + "}",
                        ev);
  };
  registration_event ev;
  REQUIRE(!decode("acceptedMs", "1234567890123456789", ev)); // 19 digits, fits
  CHECK(ev.accepted_ms == 1234567890123456789);
  REQUIRE(!decode("completedMs", "-9223372036854775808", ev));
  CHECK(ev.completed_ms == INT64_MIN);
  REQUIRE(!decode("completedMs", "9223372036854775807", ev));
  CHECK(ev.completed_ms == INT64_MAX);
  for (const char* member : {"acceptedMs", "attestedMs", "allocatedMs", "completedMs",
                             "errorCode", "v"})
    for (const char* number : {"9999999999999999999",         // 19 digits
                               "9223372036854775808",         // 19, INT64_MAX + 1
                               "-9999999999999999999",        // 19, negative
                               "12345678901234567890",        // 20
                               "18446744073709551616",        // 20, past uint64_t
                               "1234567890123456789012345",   // 25
                               "-1234567890123456789012345",  // 25, negative
                               "1e25", "-9.3e18"}) {
      INFO(std::string(member), ": ", std::string(number));
      registration_event out;
      auto err = decode(member, number, out);
      INFO("error: ", err.message, " / acceptedMs ", out.accepted_ms, " / v ", out.version);
      REQUIRE(err);
      CHECK(err.code == error_code::bad_request);
      CHECK(err.message.find("out of range") != std::string::npos);
    }
  // int32_t members: no wrap-around into range (4294967297 used to be v 1).
  CHECK(decode("v", "4294967297", ev).message.find("out of range") != std::string::npos);
  CHECK(decode("errorCode", "2147483648", ev).message.find("out of range") != std::string::npos);
  REQUIRE(!decode("errorCode", "-2147483648", ev));
  CHECK(ev.error_code == INT32_MIN);
}

TEST_CASE("decode_requested_event: a version out of range is an error, not a wrapped value") {
  registration_event ev;
  for (const char* v : {"4294967297", "9999999999999999999", "12345678901234567890",
                        "1234567890123456789012345", "1e25"}) {
    auto err = decode_requested_event(
      std::string(R"({"registrationId":"r","idScope":"s","v":)") + v + "}", ev);
    INFO(std::string(v), ": ", err.message);
    CHECK(err.code == error_code::bad_request);
    CHECK(err.message.find("out of range") != std::string::npos);
  }
}

} // TEST_SUITE
