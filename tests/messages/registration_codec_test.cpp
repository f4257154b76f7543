#include <doctest/doctest.h>

#include <cstdlib>
#include <limits>

#include <nlohmann/json.hpp>

#include "messages/crypto.hpp"
#include "messages/registration.hpp"

using namespace prov;
using nlohmann::json;

TEST_SUITE("registration codecs") {

TEST_CASE("an event survives encode and decode with every field") {
  registration_event ev;
  ev.operation_id = "5.0123456789abcdef.6f1c";
  ev.registration_id = "Dev-01";
  ev.id_scope = "0ne00000A1B";
  ev.api_version = "2021-06-01";
  ev.protocol = "http";
  ev.accepted_ms = 1700000000123;
  ev.attestation_type = "symmetricKey";
  ev.enrollment_group_id = "g1";
  ev.payload_json = R"({"a":1})";
  ev.assigned_hub = "hub-a";
  ev.device_id = "dev-01";
  ev.initial_twin_json = R"({"tags":{"x":"y"}})";
  ev.iot_edge = true;
  ev.substatus = "initialAssignment";
  ev.status = registration_status::failed;
  ev.error_code = 400208;
  ev.error_message = "no hub";
  ev.attested_ms = 1;
  ev.allocated_ms = 2;
  ev.completed_ms = 3;
  registration_event back;
  REQUIRE(!decode_event(encode_event(ev), back));
  CHECK(encode_event(back) == encode_event(ev));
  CHECK(back.status == registration_status::failed);
  CHECK(back.iot_edge);
}

TEST_CASE("bad events are rejected with a reason, never thrown") {
  registration_event ev;
  CHECK(decode_event("not json", ev).code == error_code::bad_request);
  CHECK(decode_event("[1,2]", ev).code == error_code::bad_request);
  CHECK(decode_event(R"({"v":2,"operationId":"o","registrationId":"r"})", ev).message.find(
          "version")
        != std::string::npos);
  CHECK(decode_event(R"({"v":1,"registrationId":"r"})", ev));
  CHECK(decode_event(R"({"v":1,"operationId":"o","registrationId":"r","status":"bogus"})", ev));
  CHECK(decode_event(R"({"v":1,"operationId":5,"registrationId":"r"})", ev));
}

TEST_CASE("the custom webhook's payload travels in the JSON event only when set") {
  registration_event ev;
  ev.operation_id = "op-1";
  ev.registration_id = "dev-01";
  CHECK(encode_event(ev).find("returnedPayload") == std::string::npos);
  ev.returned_payload_json = R"({"greeting":"hello"})";
  auto text = encode_event(ev);
  // Byte order of keys as nlohmann writes them: registrationId < returnedPayload < status.
  CHECK(json::parse(text).dump() == text);
  CHECK(json::parse(text).value("returnedPayload", "") == ev.returned_payload_json);
  registration_event back;
  REQUIRE(!decode_event(text, back));
  CHECK(back.returned_payload_json == ev.returned_payload_json);
  // A value that is not a string is refused, as for every text member.
  CHECK(decode_event(R"({"v":1,"operationId":"o","registrationId":"r","returnedPayload":{}})", back)
          .code
        == error_code::bad_request);
}

namespace {
const std::string sample_sas =
  "SharedAccessSignature sr=0ne00000A1B%2Fregistrations%2Fdev-01"
  "&sig=c2VjcmV0LXNpZ25hdHVyZS1ieXRlcw%3D%3D&se=1900000000&skn=registration";
const std::string sample_sig = "c2VjcmV0LXNpZ25hdHVyZS1ieXRlcw";
} // namespace

TEST_CASE("the authorization of a requested event is JSON only, and optional") {
  registration_event ev;
  ev.operation_id = "op-1";
  ev.registration_id = "dev-01";
  CHECK(encode_event(ev).find("authorization") == std::string::npos);
  ev.authorization = sample_sas;
  auto text = encode_event(ev);
  CHECK(json::parse(text).value("authorization", "") == sample_sas);
  registration_event back;
  REQUIRE(!decode_event(text, back));
  CHECK(back.authorization == sample_sas);
}

TEST_CASE("records never contain the credential of a requested event") {
  registration_event ev;
  ev.operation_id = "op-1";
  ev.registration_id = "dev-01";
  ev.id_scope = "0ne00000A1B";
  ev.authorization = sample_sas;
  ev.payload_json = R"({"a":1})";
  operation_record op;
  op.operation_id = ev.operation_id;
  op.registration_id = ev.registration_id;
  op.event = ev;
  for (auto st : {registration_status::assigning, registration_status::failed}) {
    op.status = st;
    op.state.status = st;
    auto rec = encode_record(op);
    CHECK(rec.find(sample_sig) == std::string::npos);
    CHECK(rec.find("SharedAccessSignature") == std::string::npos);
    CHECK(rec.find("authorization") == std::string::npos);
    operation_record back;
    REQUIRE(!decode_record(rec, back));
    CHECK(back.event.authorization.empty());
    CHECK(back.event.payload_json == ev.payload_json);
  }
}

TEST_CASE("requested events: request fields only; registrationId and idScope required") {
  registration_event ev;
  json j{{"registrationId", "dev-01"}, {"idScope", "0ne00000A1B"},
         {"authorization", sample_sas}};
  REQUIRE(!decode_requested_event(j.dump(), ev));
  CHECK(ev.registration_id == "dev-01");
  CHECK(ev.id_scope == "0ne00000A1B");
  CHECK(ev.authorization == sample_sas);
  CHECK(ev.operation_id.empty()); // optional: the attestation stage makes one
  CHECK(ev.payload_json.empty());
  CHECK(ev.status == registration_status::assigning);

  // Stage fields a publisher sets are ignored; the payload is an object or
  // its JSON text.
  j["v"] = 1;
  j["operationId"] = "factory-7.op-1";
  j["payload"] = {{"modelId", "dtmi:x;1"}};
  j["assignedHub"] = "evil.example.net";
  j["status"] = "assigned";
  j["enrollmentGroupId"] = "other";
  j["attestationType"] = "x509";
  REQUIRE(!decode_requested_event(j.dump(), ev));
  CHECK(ev.operation_id == "factory-7.op-1");
  CHECK(json::parse(ev.payload_json) == j["payload"]);
  CHECK(ev.assigned_hub.empty());
  CHECK(ev.status == registration_status::assigning);
  CHECK(ev.enrollment_group_id.empty());
  CHECK(ev.attestation_type.empty());
  j["payload"] = R"({"modelId":"dtmi:x;1"})";
  REQUIRE(!decode_requested_event(j.dump(), ev));
  CHECK(json::parse(ev.payload_json) == json{{"modelId", "dtmi:x;1"}});

  for (const char* bad : {R"({"idScope":"s"})", R"({"registrationId":"r"})",
                          R"({"registrationId":"","idScope":"s"})",
                          R"({"registrationId":"r","idScope":"s","v":2})",
                          R"({"registrationId":5,"idScope":"s"})",
                          R"({"registrationId":"r","idScope":"s","payload":[1]})",
                          R"({"registrationId":"r","idScope":"s","payload":"not json"})",
                          R"({"registrationId":"r","idScope":"s","authorization":7})",
                          "[]", "not json"})
    CHECK_MESSAGE(decode_requested_event(bad, ev).code == error_code::bad_request, bad);

  // A device's own request, like the HTTP register body: one meaning only.
  for (const char* dup :
       {R"({"registrationId":"r","idScope":"s","registrationId":"r2"})",
        R"({"registrationId":"r","idScope":"s","authorization":"a","authorization":"b"})",
        R"({"registrationId":"r","idScope":"s","payload":{"m":1,"m":2}})",
        R"({"registrationId":"r","idScope":"s","payload":"{\"m\":1,\"m\":2}"})"}) {
    auto err = decode_requested_event(dup, ev);
    CHECK_MESSAGE(err.code == error_code::bad_request, dup);
    CHECK_MESSAGE(err.message.find("duplicate") != std::string::npos, dup << ": " << err.message);
  }
}

TEST_CASE("requested events: an X.509 publisher's chain and proof, shape checked") {
  registration_event ev;
  const std::string leaf = "\x30\x82leaf", inter = "\x30\x82inter", sig = "\x30\x45sig";
  json j{{"registrationId", "dev-x"},
         {"idScope", "0ne00000A1B"},
         {"x509",
          {{"certificates", {crypto::base64_encode(leaf), crypto::base64_encode(inter)}},
           {"expiry", 1'900'000'000},
           {"signature", crypto::base64_encode(sig)}}}};
  REQUIRE(!decode_requested_event(j.dump(), ev));
  REQUIRE(ev.x509_presented);
  CHECK(ev.x509_presented->chain_der == std::vector<std::string>{leaf, inter});
  CHECK_FALSE(ev.x509_presented->from_handshake);
  REQUIRE(ev.x509_presented->possession);
  CHECK(ev.x509_presented->possession->expiry == 1'900'000'000);
  CHECK(ev.x509_presented->possession->signature == sig);
  CHECK(ev.authorization.empty());

  auto with = [&](const char* member, json v) {
    auto d = j;
    if (v.is_null())
      d["x509"].erase(member);
    else
      d["x509"][member] = std::move(v);
    return d.dump();
  };
  const std::vector<std::string> bad = {
    with("certificates", nullptr),
    with("certificates", json::array()),
    with("certificates", "MIIB"),
    with("certificates", {"not base64!"}),
    with("certificates", {5}),
    with("certificates", json(std::vector<std::string>(11, crypto::base64_encode(leaf)))),
    with("expiry", nullptr),
    with("expiry", "1900000000"),
    with("expiry", 1.5),
    with("signature", nullptr),
    with("signature", "%%%"),
    json{{"registrationId", "r"}, {"idScope", "s"}, {"x509", "MIIB"}}.dump(),
  };
  for (const auto& b : bad) {
    auto err = decode_requested_event(b, ev);
    CHECK_MESSAGE(err.code == error_code::bad_request, b);
    CHECK_MESSAGE(err.message.find("requested event: x509") == 0, b << ": " << err.message);
  }
  // The dead-letter copy keeps the chain (to see which device) but not the proof.
  auto red = json::parse(redact_credentials(j.dump()));
  CHECK(red["x509"]["certificates"] == j["x509"]["certificates"]);
  CHECK_FALSE(red["x509"].contains("signature"));
}

TEST_CASE("redact_credentials removes the authorization and any signature") {
  json j{{"registrationId", "dev-01"}, {"idScope", "s"}, {"authorization", sample_sas},
         {"payload", {{"note", "sig=abc&x"}}}};
  auto red = redact_credentials(j.dump());
  CHECK(red.find(sample_sig) == std::string::npos);
  CHECK(red.find("authorization") == std::string::npos);
  CHECK(json::parse(red)["payload"]["note"] == "sig=REDACTED&x");
  // Not JSON (a truncated record): signatures are still masked.
  auto raw = j.dump().substr(0, j.dump().size() - 30);
  CHECK(redact_credentials(raw).find(sample_sig) == std::string::npos);
  CHECK(redact_credentials(R"(x SIG=abc"y)") == R"(x SIG=REDACTED"y)");
  CHECK(redact_credentials("no secrets") == "no secrets");
}

TEST_CASE("operation records keep the terminal state only when terminal") {
  operation_record op;
  op.operation_id = "op";
  op.registration_id = "r";
  op.status = registration_status::assigning;
  op.event.operation_id = "op";
  op.event.registration_id = "r";
  op.state.assigned_hub = "should-not-persist";
  operation_record back;
  REQUIRE(!decode_record(encode_record(op), back));
  CHECK(back.status == registration_status::assigning);
  CHECK(back.state.assigned_hub.empty());
  op.status = registration_status::assigned;
  op.state.status = registration_status::assigned;
  REQUIRE(!decode_record(encode_record(op), back));
  CHECK(back.state.assigned_hub == "should-not-persist");
  operation_record junk;
  CHECK(decode_record(std::string_view("{"), junk).code == error_code::storage_failure);
}

TEST_CASE("registration state renders the DPS DeviceRegistrationResult shape") {
  registration_state s;
  s.registration_id = "dev";
  s.created_ms = 0;
  s.updated_ms = 1000;
  s.assigned_hub = "hub-a";
  s.device_id = "dev";
  s.status = registration_status::assigned;
  s.substatus = "initialAssignment";
  s.etag = "\"e\"";
  s.attestation_type = "symmetricKey";
  s.enrollment_group_id = "g";
  s.last_operation_id = "internal";
  auto j = to_json(s);
  CHECK(j["registrationId"] == "dev");
  CHECK(j["status"] == "assigned");
  CHECK(j["assignedHub"] == "hub-a");
  CHECK(j["deviceId"] == "dev");
  CHECK(j["substatus"] == "initialAssignment");
  CHECK(j["lastUpdatedDateTimeUtc"] == "1970-01-01T00:00:01.0000000Z");
  CHECK(j["symmetricKey"]["enrollmentGroupId"] == "g");
  CHECK(!j.contains("lastOperationId"));
  CHECK(!j.contains("errorCode"));
  auto op = operation_status_json("op1", s);
  CHECK(op["operationId"] == "op1");
  CHECK(op["status"] == "assigned");
  CHECK(op["registrationState"]["assignedHub"] == "hub-a");
  s.status = registration_status::assigning;
  op = operation_status_json("op1", s);
  CHECK(op["registrationState"] == json{{"registrationId", "dev"}, {"status", "assigning"}});
  registration_state back;
  s.status = registration_status::failed;
  s.error_code = 400208;
  REQUIRE(!decode_record(encode_record(s), back));
  CHECK(encode_record(back) == encode_record(s));
  CHECK(to_json(back)["errorCode"] == 400208);
}

TEST_CASE("error bodies carry errorCode, trackingId, message, timestampUtc") {
  auto j = json::parse(error_body({error_code::unauthorized_signature, "signature mismatch"},
                                  "t-1"));
  CHECK(j["errorCode"] == 401002);
  CHECK(j["trackingId"] == "t-1");
  CHECK(j["message"] == "signature mismatch");
  CHECK(j["timestampUtc"].get<std::string>().size() == 28);
  CHECK(http_status(error_code::unauthorized_signature) == 401);
  CHECK(http_status(error_code::no_hub_available) == 400);
  CHECK(to_string(error_code::throttled) == "throttled");
}

TEST_CASE("operation ids have the DPS shape and are unique") {
  auto a = new_operation_id("0123456789abcdef");
  auto b = new_operation_id("0123456789abcdef");
  CHECK(a != b);
  CHECK(a.rfind("5.0123456789abcdef.", 0) == 0);
  CHECK(a.size() == 2 + 16 + 1 + 36);
  // Any gateway can tell when an operation was created (its UUID is v7).
  auto created = operation_created_ms(a);
  CHECK(created > 0);
  CHECK(std::llabs(created - now_ms()) < 5000);
  CHECK(operation_created_ms("5.0123456789abcdef." + std::string(36, 'a')) == 0);
  CHECK(operation_created_ms("garbage") == 0);
}

} // TEST_SUITE

TEST_CASE("binary records round-trip every field; every truncation is an error") {
  operation_record op;
  op.operation_id = "5.0123456789abcdef.00000001";
  op.registration_id = "dev-\xc3\xa9";
  op.status = registration_status::assigned;
  op.event.version = 1;
  op.event.operation_id = op.operation_id;
  op.event.registration_id = op.registration_id;
  op.event.accepted_ms = 1'700'000'000'123;
  op.event.completed_ms = -5; // signed fields survive zigzag
  op.event.payload_json = R"({"a":[1,2,3]})";
  op.event.initial_twin_json = R"({"tags":{"x":"y"}})";
  op.event.iot_edge = true;
  op.event.status = registration_status::assigned;
  op.event.error_code = -1;
  op.state.registration_id = op.registration_id;
  op.state.status = registration_status::assigned;
  op.state.assigned_hub = "hub-a";
  op.state.error_code = 400208;
  op.state.created_ms = 1;
  op.state.updated_ms = std::numeric_limits<int64_t>::max();
  auto bytes = encode_record(op);
  CHECK(static_cast<unsigned char>(bytes[0]) == 0xB7);
  operation_record back;
  REQUIRE(!decode_record(bytes, back));
  CHECK(encode_record(back) == bytes);
  CHECK(back.event.accepted_ms == op.event.accepted_ms);
  CHECK(back.event.completed_ms == -5);
  CHECK(back.event.iot_edge);
  CHECK(back.event.initial_twin_json == op.event.initial_twin_json);
  CHECK(back.state.updated_ms == std::numeric_limits<int64_t>::max());
  CHECK(back.state.error_code == 400208);
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    operation_record t;
    CHECK_MESSAGE(decode_record(std::string_view(bytes).substr(0, n), t).code
                    == error_code::storage_failure,
                  "prefix " << n);
  }
  operation_record extra;
  CHECK(decode_record(bytes + "x", extra).code == error_code::storage_failure);
  // A state record is not an operation record.
  CHECK(decode_record(encode_record(op.state), extra).code == error_code::storage_failure);
}

TEST_CASE("JSON records written by earlier versions still decode") {
  operation_record op;
  REQUIRE(!decode_record(
    R"({"v":1,"operationId":"op","registrationId":"r","status":"assigning",
        "event":{"v":1,"operationId":"op","registrationId":"r","acceptedMs":7}})",
    op));
  CHECK(op.status == registration_status::assigning);
  CHECK(op.event.accepted_ms == 7);
  registration_state s;
  REQUIRE(!decode_record(R"({"v":1,"registrationId":"r","status":"assigned","assignedHub":"h"})",
                         s));
  CHECK(s.assigned_hub == "h");
}

TEST_CASE("hand-written status JSON equals the nlohmann rendering") {
  registration_state s;
  s.registration_id = "dev \"quoted\" \\ \x01";
  s.created_ms = 1'700'000'000'123;
  s.updated_ms = 1'700'000'000'456;
  s.assigned_hub = "hub-a";
  s.device_id = "dev";
  s.substatus = "initialAssignment";
  s.etag = "\"e\"";
  s.attestation_type = "symmetricKey";
  s.payload_json = R"({"model":"x","n":[1,2]})";
  for (auto st : {registration_status::assigning, registration_status::assigned,
                  registration_status::failed, registration_status::disabled}) {
    s.status = st;
    s.error_code = st == registration_status::failed ? 400208 : 0;
    s.error_message = st == registration_status::failed ? "no hub" : "";
    s.enrollment_group_id = st == registration_status::assigned ? "g" : "";
    CHECK(json::parse(to_json_text(s)) == to_json(s));
    CHECK(json::parse(operation_status_text("op-1", s)) == operation_status_json("op-1", s));
  }
  registration_state bare;
  bare.registration_id = "r";
  CHECK(json::parse(to_json_text(bare)) == to_json(bare));
}

TEST_CASE("utc_string formats milliseconds, before and after the epoch, across seconds") {
  CHECK(utc_string(0) == "1970-01-01T00:00:00.0000000Z");
  CHECK(utc_string(1) == "1970-01-01T00:00:00.0010000Z");
  CHECK(utc_string(999) == "1970-01-01T00:00:00.9990000Z");
  CHECK(utc_string(1000) == "1970-01-01T00:00:01.0000000Z");
  CHECK(utc_string(-1) == "1969-12-31T23:59:59.9990000Z");
  CHECK(utc_string(1'795'690'260'123) == "2026-11-26T10:51:00.1230000Z");
  CHECK(utc_string(1'795'690'260'999) == "2026-11-26T10:51:00.9990000Z"); // cached second
  CHECK(utc_string(1'795'690'261'000) == "2026-11-26T10:51:01.0000000Z");
  CHECK(utc_string(1'795'690'260'050) == "2026-11-26T10:51:00.0500000Z"); // back again
  // The fixed-buffer form that the JSON writers append.
  CHECK(utc_chars(1'795'690'260'123).view() == "2026-11-26T10:51:00.1230000Z");
  CHECK(std::string_view(utc_chars(-1)) == "1969-12-31T23:59:59.9990000Z");
}

TEST_CASE("registration records: 5 keeps assigned_hubs, 4 key_used, 3 x509_json, 2 allocation_json") {
  registration_state s;
  s.registration_id = "dev-1";
  s.status = registration_status::assigned;
  s.assigned_hub = "hub-a";
  s.last_operation_id = "op";
  s.allocation_json = R"({"policy":"hashed","chosen":"hub-a"})";
  s.attestation_type = "symmetricKey";
  s.x509_json = R"({"certificateInfo":{"subjectName":"CN=dev-1"}})";
  s.key_used = "secondary";
  add_assigned_hub(s, "hub-a");
  add_assigned_hub(s, "hub-b");
  add_assigned_hub(s, "HUB-A"); // there already
  CHECK(s.assigned_hubs == "hub-a\nhub-b");
  CHECK(was_assigned_to(s, "Hub-B"));
  CHECK_FALSE(was_assigned_to(s, "hub-c"));
  CHECK_FALSE(was_assigned_to(s, "hub"));
  auto v5 = encode_record(s);
  CHECK(static_cast<unsigned char>(v5[2]) == 5);
  registration_state back;
  REQUIRE(!decode_record(v5, back));
  CHECK(back.allocation_json == s.allocation_json);
  CHECK(back.x509_json == s.x509_json);
  CHECK(back.key_used == "secondary");
  CHECK(back.assigned_hubs == "hub-a\nhub-b");
  // An older record is the newer bytes without the trailing strings it lacks
  // (each empty one a one-byte length prefix) and with its version byte:
  // 4 lacks assigned_hubs, 3 key_used too, 2 x509_json too, 1 allocation_json too.
  auto older = [](std::string bytes, int drop, uint8_t version) {
    for (int i = 0; i < drop; ++i) {
      REQUIRE(bytes.back() == '\0');
      bytes.pop_back();
    }
    bytes[2] = static_cast<char>(version);
    return bytes;
  };
  // Version v lacks the field that v + 1 added, and all later ones.
  std::string registration_state::*const added_in[] = {
      &registration_state::allocation_json, &registration_state::x509_json,
      &registration_state::key_used, &registration_state::assigned_hubs};
  for (int version = 4; version >= 1; --version) {
    CAPTURE(version);
    s.*added_in[version - 1] = std::string();
    registration_state got;
    REQUIRE(!decode_record(older(encode_record(s), 5 - version, static_cast<uint8_t>(version)),
                           got));
    CHECK(got.assigned_hub == "hub-a");
    CHECK(got.last_operation_id == "op");
    CHECK(got.allocation_json == s.allocation_json);
    CHECK(got.x509_json == s.x509_json);
    CHECK(got.key_used == s.key_used);
    CHECK(got.assigned_hubs == s.assigned_hubs);
  }
  // A version from the future is refused.
  v5[2] = 7;
  CHECK(decode_record(v5, back).code == error_code::storage_failure);
  // The hub list is bounded: the oldest go.
  registration_state many;
  for (std::size_t i = 0; i <= max_assigned_hubs; ++i)
    add_assigned_hub(many, "hub-" + std::to_string(i));
  CHECK_FALSE(was_assigned_to(many, "hub-0"));
  CHECK(was_assigned_to(many, "hub-1"));
  CHECK(was_assigned_to(many, "hub-" + std::to_string(max_assigned_hubs)));
  // The service view shows allocation and keyUsed (never the hub list); the
  // device view shows neither.
  s.assigned_hubs = "hub-a";
  CHECK(json::parse(to_json_text(s, true)).count("assignedHubs") == 0);
  s.allocation_json = R"({"policy":"static"})";
  s.key_used = "primary";
  CHECK(to_json_text(s).find("allocation") == std::string::npos);
  CHECK(to_json_text(s).find("keyUsed") == std::string::npos);
  auto service = json::parse(to_json_text(s, true));
  CHECK(service["allocation"] == json{{"policy", "static"}});
  CHECK(service["symmetricKey"]["keyUsed"] == "primary");
  CHECK(to_json(s, true) == service);
  CHECK(to_json(s, false) == json::parse(to_json_text(s)));
}

TEST_CASE("operation records: the event's key_used and x509_json survive; versions 3 and 2 still decode") {
  operation_record op;
  op.operation_id = "op-1";
  op.registration_id = "dev-1";
  op.status = registration_status::assigning;
  op.event.operation_id = "op-1";
  op.event.registration_id = "dev-1";
  op.event.attestation_type = "symmetricKey";
  op.event.x509_json = R"({"certificateInfo":{"subjectName":"CN=dev-1"}})";
  op.event.key_used = "secondary";
  auto current = encode_record(op);
  CHECK(static_cast<unsigned char>(current[2]) == 5); // no issuance fields: what 5 wrote
  operation_record back;
  REQUIRE(!decode_record(current, back));
  CHECK(back.event.key_used == "secondary");
  CHECK(back.event.x509_json == op.event.x509_json);
  // The event's strings come right before the terminal flag (0 here), the
  // record's last byte. Version 3: no key_used after x509_json; version 2
  // (and 1): no x509_json either.
  op.event.key_used.clear();
  auto v3 = encode_record(op);
  REQUIRE(v3.size() >= 2);
  REQUIRE(v3[v3.size() - 2] == '\0'); // the empty key_used's length
  v3.erase(v3.size() - 2, 1);
  v3[2] = 3;
  operation_record three;
  REQUIRE(!decode_record(v3, three));
  CHECK(three.event.key_used.empty());
  CHECK(three.event.x509_json == op.event.x509_json);
  op.event.x509_json.clear();
  auto v2 = encode_record(op);
  REQUIRE(v2.size() >= 3);
  REQUIRE(v2[v2.size() - 2] == '\0'); // the empty key_used's length
  REQUIRE(v2[v2.size() - 3] == '\0'); // the empty x509_json's length
  v2.erase(v2.size() - 3, 2);
  v2[2] = 2;
  operation_record two;
  REQUIRE(!decode_record(v2, two));
  CHECK(two.event.key_used.empty());
  CHECK(two.event.x509_json.empty());
  CHECK(two.event.attestation_type == "symmetricKey");
}

TEST_CASE("events carry keyUsed only when set, through both decoders") {
  registration_event ev;
  ev.operation_id = "op-1";
  ev.registration_id = "dev-1";
  ev.iot_edge = true;
  auto without = encode_event(ev);
  CHECK(without.find("keyUsed") == std::string::npos);
  ev.key_used = "primary";
  auto with = encode_event(ev);
  // Byte order of keys as nlohmann writes them: iotEdge < keyUsed < operationId.
  CHECK(json::parse(with).dump() == with);
  CHECK(json::parse(with).value("keyUsed", "") == "primary");
  registration_event back;
  REQUIRE(!decode_event(with, back));
  CHECK(back.key_used == "primary");
  // Pretty-printed: not the flat fast path, the SAX reader; same result.
  registration_event slow;
  REQUIRE(!decode_event(json::parse(with).dump(2), slow));
  CHECK(slow.key_used == "primary");
  CHECK(decode_event(R"({"v":1,"operationId":"o","registrationId":"r","keyUsed":1})", slow)
          .code == error_code::bad_request);
  // With x509 as well (both set only in tests): still nlohmann's key order.
  ev.x509_json = R"({"certificateInfo":{}})";
  auto both = encode_event(ev);
  CHECK(json::parse(both).dump() == both);
  registration_event both_back;
  REQUIRE(!decode_event(json::parse(both).dump(2), both_back));
  CHECK(both_back.key_used == "primary");
  CHECK(both_back.x509_json == ev.x509_json);
}

TEST_CASE("an X.509 result carries certificateInfo and signingCertificateInfo") {
  const std::string info =
    R"({"certificateInfo":{"subjectName":"CN=dev-1","version":3},)"
    R"("signingCertificateInfo":{"subjectName":"CN=Root","version":3}})";
  registration_state s;
  s.registration_id = "dev-1";
  s.status = registration_status::assigned;
  s.attestation_type = "x509";
  s.enrollment_group_id = "g";
  s.x509_json = info;
  auto shown = json::parse(to_json_text(s));
  CHECK(shown["x509"]["enrollmentGroupId"] == "g");
  CHECK(shown["x509"]["certificateInfo"]["subjectName"] == "CN=dev-1");
  CHECK(shown["x509"]["signingCertificateInfo"]["subjectName"] == "CN=Root");
  CHECK(shown == to_json(s));
  CHECK(json::parse(operation_status_text("op", s)) == operation_status_json("op", s));
  s.enrollment_group_id.clear(); // individual: no enrollmentGroupId member
  CHECK(json::parse(to_json_text(s))["x509"]
        == json::parse(info));
  CHECK(json::parse(to_json_text(s)) == to_json(s));
  // Not X.509: never shown.
  s.attestation_type = "symmetricKey";
  CHECK(json::parse(to_json_text(s))["symmetricKey"] == json::object());
  // The event carries it over Kafka (JSON) and in the operation record (binary).
  registration_event ev;
  ev.operation_id = "op";
  ev.registration_id = "dev-1";
  ev.x509_json = info;
  auto text = encode_event(ev);
  CHECK(json::parse(text).dump() == text); // key order as nlohmann's: "v" < "x509"
  registration_event back;
  REQUIRE(!decode_event(text, back));
  CHECK(back.x509_json == info);
  operation_record op;
  op.operation_id = "op";
  op.registration_id = "dev-1";
  op.event = ev;
  operation_record op_back;
  REQUIRE(!decode_record(encode_record(op), op_back));
  CHECK(op_back.event.x509_json == info);
}

TEST_CASE("version 6: the issued chain on states, the csr on events; JSON and binary") {
  registration_state s;
  s.registration_id = "dev-1";
  s.status = registration_status::assigned;
  s.issued_chain = "TEVBRg==\nQ0E=";
  registration_state back;
  REQUIRE(!decode_record(encode_record(s), back));
  CHECK(back.issued_chain == s.issued_chain);
  // Shown in the operation's result only, as an array.
  auto op = json::parse(operation_status_text("op-1", s));
  CHECK(op["registrationState"]["issuedCertificateChain"] == json::array({"TEVBRg==", "Q0E="}));
  CHECK(operation_status_json("op-1", s) == op);
  CHECK(json::parse(to_json_text(s)).count("issuedCertificateChain") == 0);
  CHECK(json::parse(to_json_text(s, true)).count("issuedCertificateChain") == 0);
  operation_record rec;
  rec.operation_id = "op-1";
  rec.registration_id = "dev-1";
  rec.event.operation_id = "op-1";
  rec.event.registration_id = "dev-1";
  rec.event.csr = "MIIB";
  operation_record rec_back;
  REQUIRE(!decode_record(encode_record(rec), rec_back));
  CHECK(rec_back.event.csr == "MIIB");
  registration_event ev = rec.event;
  ev.issuing_ca = "fleet";
  ev.issued_chain = "TEVBRg==\nQ0E=";
  auto text = encode_event(ev);
  CHECK(json::parse(text).dump() == text); // keys in nlohmann's order
  registration_event ev_back;
  REQUIRE(!decode_event(text, ev_back));
  CHECK(ev_back.csr == "MIIB");
  CHECK(ev_back.issuing_ca == "fleet");
  CHECK(ev_back.issued_chain == ev.issued_chain);
  // Version 6 only when a 6 field is set: without them, exactly version 5's
  // bytes, which the previous release reads (rolling upgrade and downgrade).
  CHECK(static_cast<unsigned char>(encode_record(s)[2]) == 6);
  CHECK(static_cast<unsigned char>(encode_record(rec)[2]) == 6); // pending, with its csr
  registration_state plain = s;
  plain.issued_chain.clear();
  auto v5 = encode_record(plain);
  CHECK(static_cast<unsigned char>(v5[2]) == 5);
  auto with_empty_chain = encode_record(s); // what 6 would hold for an empty chain
  CHECK(v5.size() + 1 + s.issued_chain.size() == with_empty_chain.size());
  registration_state v5_back;
  REQUIRE(!decode_record(v5, v5_back));
  CHECK(v5_back.issued_chain.empty());
  CHECK(v5_back.registration_id == "dev-1");
  operation_record done = rec;
  done.status = registration_status::assigned;
  done.event = registration_event{}; // terminal records keep only the state
  done.state = s;
  auto done_v6 = encode_record(done);
  CHECK(static_cast<unsigned char>(done_v6[2]) == 6);
  REQUIRE(!decode_record(done_v6, rec_back));
  CHECK(rec_back.state.issued_chain == s.issued_chain);
  done.state = plain;
  auto done_v5 = encode_record(done);
  CHECK(static_cast<unsigned char>(done_v5[2]) == 5);
  operation_record done_back;
  REQUIRE(!decode_record(done_v5, done_back));
  CHECK(done_back.state.issued_chain.empty());
  CHECK(done_back.status == registration_status::assigned);
  registration_event requested;
  REQUIRE(!decode_requested_event(R"({"registrationId":"dev-1","idScope":"0ne00000001","csr":"MIIB"})",
                                  requested));
  CHECK(requested.csr == "MIIB");
}
