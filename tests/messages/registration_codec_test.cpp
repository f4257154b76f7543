#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

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
}

} // TEST_SUITE
