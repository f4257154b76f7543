// Re-provisioning (DPS's reprovisionPolicy, protocol notes §7.4) against the
// real provisiond process: a device assigned to one hub registers again after
// its enrollment was pointed at another. Each combination is checked for the
// substatus the device sees and the events the outbox gets (GET /assignments).

#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "messages/crypto.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/kafka_it.hpp"
#include "tests/support/server_process.hpp"

using namespace prov;
using nlohmann::json;

namespace {

const char* const hub_a = "hub-a.example.net";
const char* const hub_b = "hub-b.example.net";
const std::string key = crypto::base64_encode(std::string(32, 'r'));
const json enrollment_twin = {{"tags", {{"site", "berlin"}}}};

test::server_process& srv() { return test::shared_server(); }

/// An individual enrollment with a static hub and the given reprovisionPolicy
/// (null: none, DPS's defaults).
void put_enrollment(const std::string& id, const std::string& hub, const json& policy,
                    const test::server_process& s = srv()) {
  json body{{"registrationId", id},
            {"attestation", {{"type", "symmetricKey"},
                             {"symmetricKey", {{"primaryKey", key}, {"secondaryKey", key}}}}},
            {"allocationPolicy", "static"},
            {"iotHubs", json::array({hub})},
            {"initialTwin", enrollment_twin}};
  if (!policy.is_null())
    body["reprovisionPolicy"] = policy;
  auto r = s.service("PUT", "/enrollments/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

json register_once(const std::string& id, const test::server_process& s = srv()) {
  auto c = s.client();
  int status = 0;
  auto res = test::register_device(c, s, id, key, status, 50);
  REQUIRE_MESSAGE(status == 200, res.dump());
  REQUIRE_MESSAGE(res.value("status", "") == "assigned", res.dump());
  return res;
}

/// The outbox events (any type) of operation `op`, in outbox order.
std::vector<json> events_of(const std::string& op, const test::server_process& s = srv()) {
  std::vector<json> out;
  for (auto& e : test::all_assignments(s))
    if (e["data"].value("operationId", "") == op)
      out.push_back(e);
  return out;
}

struct outcome {
  json state;               ///< registrationState of the second registration
  std::vector<json> events; ///< its outbox events
};

/// Registers `id` on hub A, moves its enrollment to hub B, registers again.
outcome move_and_register(const std::string& id, const json& policy) {
  put_enrollment(id, hub_a, policy);
  auto first = register_once(id);
  REQUIRE(first["registrationState"]["assignedHub"] == hub_a);
  CHECK(first["registrationState"]["substatus"] == "initialAssignment");
  put_enrollment(id, hub_b, policy);
  auto second = register_once(id);
  return {second["registrationState"], events_of(second["operationId"])};
}

void check_deprovisioned(const json& ev, const std::string& id, const std::string& substatus) {
  CHECK(ev["type"] == "device.deprovisioned");
  CHECK(ev["subject"] == id);
  CHECK(ev["data"]["registrationId"] == id);
  CHECK(ev["data"]["deviceId"] == id);
  CHECK(ev["data"]["hub"] == hub_a);
  CHECK(ev["data"]["newHub"] == hub_b);
  CHECK(ev["data"]["reason"] == "reprovisioned");
  CHECK(ev["data"]["substatus"] == substatus);
  CHECK(ev["data"]["migrateDeviceData"] == (substatus != "deviceDataReset"));
}

} // namespace

TEST_CASE("updateHubAssignment + migrateDeviceData (DPS's default): deviceDataMigrated") {
  const std::string id = "reprov-migrate";
  auto o = move_and_register(id, nullptr);
  CHECK(o.state["assignedHub"] == hub_b);
  CHECK(o.state["substatus"] == "deviceDataMigrated");
  REQUIRE(o.events.size() == 2);
  check_deprovisioned(o.events[0], id, "deviceDataMigrated");
  CHECK(o.events[1]["type"] == "device.assigned");
  CHECK(o.events[1]["data"]["assignedHub"] == hub_b);
  CHECK(o.events[1]["data"]["substatus"] == "deviceDataMigrated");
  CHECK(o.events[1]["data"]["allocation"]
        == json{{"policy", "static"},
                {"chosen", hub_b},
                {"candidates", "the enrollment's iotHubs"},
                {"reprovision", "moved from hub-a.example.net (migrateDeviceData true)"},
                {"migrateDeviceData", true}});
  // The outbox order is the events' sequence order.
  CHECK(std::stoull(o.events[0]["sequence"].get<std::string>()) + 1
        == std::stoull(o.events[1]["sequence"].get<std::string>()));
}

TEST_CASE("updateHubAssignment, migrateDeviceData false: deviceDataReset with the initial twin") {
  const std::string id = "reprov-reset";
  auto o = move_and_register(id, json{{"updateHubAssignment", true}, {"migrateDeviceData", false}});
  CHECK(o.state["assignedHub"] == hub_b);
  CHECK(o.state["substatus"] == "deviceDataReset");
  REQUIRE(o.events.size() == 2);
  check_deprovisioned(o.events[0], id, "deviceDataReset");
  CHECK(o.events[1]["type"] == "device.assigned");
  CHECK(o.events[1]["data"]["substatus"] == "deviceDataReset");
  CHECK(o.events[1]["data"]["initialTwin"] == enrollment_twin);
}

/// A -> B -> back to A with `policy`: the third registration's outcome.
outcome there_and_back(const std::string& id, const json& policy) {
  auto o = move_and_register(id, policy);
  REQUIRE(o.state["assignedHub"] == hub_b);
  put_enrollment(id, hub_a, policy);
  auto third = register_once(id);
  return {third["registrationState"], events_of(third["operationId"])};
}

void check_back_to_a(const outcome& o, const std::string& id, bool migrate) {
  CHECK(o.state["assignedHub"] == hub_a);
  CHECK(o.state["substatus"] == "reprovisionedToInitialAssignment");
  REQUIRE(o.events.size() == 2);
  // Off B, back onto A; whether A gets B's twin or the initial one is
  // migrateDeviceData's call, and the event says which.
  const json& dep = o.events[0];
  CHECK(dep["type"] == "device.deprovisioned");
  CHECK(dep["data"]["registrationId"] == id);
  CHECK(dep["data"]["hub"] == hub_b);
  CHECK(dep["data"]["newHub"] == hub_a);
  CHECK(dep["data"]["substatus"] == "reprovisionedToInitialAssignment");
  CHECK(dep["data"]["migrateDeviceData"] == migrate);
  const json& as = o.events[1];
  CHECK(as["type"] == "device.assigned");
  CHECK(as["data"]["assignedHub"] == hub_a);
  CHECK(as["data"]["substatus"] == "reprovisionedToInitialAssignment");
  CHECK(as["data"]["initialTwin"] == enrollment_twin);
  CHECK(as["data"]["allocation"]["reprovision"]
        == std::string("moved from hub-b.example.net back to a hub it was assigned to before")
             + (migrate ? " (migrateDeviceData true)" : " (migrateDeviceData false)"));
  CHECK(std::stoull(dep["sequence"].get<std::string>()) + 1
        == std::stoull(as["sequence"].get<std::string>()));
}

TEST_CASE("back to an earlier hub, migrating data: reprovisionedToInitialAssignment") {
  const std::string id = "reprov-back-migrate";
  check_back_to_a(there_and_back(id, nullptr), id, true);
  // The record the service API shows says so too.
  auto reg = srv().service("GET", "/registrations/" + id);
  REQUIRE(reg.status == 200);
  CHECK(test::parse_json(reg.body)["substatus"] == "reprovisionedToInitialAssignment");
  // B was used before too: going there again is the same.
  put_enrollment(id, hub_b, nullptr);
  auto again = register_once(id);
  CHECK(again["registrationState"]["assignedHub"] == hub_b);
  CHECK(again["registrationState"]["substatus"] == "reprovisionedToInitialAssignment");
}

TEST_CASE("back to an earlier hub, resetting data: reprovisionedToInitialAssignment, initial twin") {
  const std::string id = "reprov-back-reset";
  check_back_to_a(
    there_and_back(id, json{{"updateHubAssignment", true}, {"migrateDeviceData", false}}), id,
    false);
}

TEST_CASE("a deleted registration record forgets the hubs: the next move is a first one") {
  const std::string id = "reprov-back-forgotten";
  auto o = move_and_register(id, nullptr); // A, then B
  REQUIRE(o.state["assignedHub"] == hub_b);
  REQUIRE(srv().service("DELETE", "/registrations/" + id).status == 204);
  put_enrollment(id, hub_a, nullptr);
  auto fresh = register_once(id);
  CHECK(fresh["registrationState"]["assignedHub"] == hub_a);
  CHECK(fresh["registrationState"]["substatus"] == "initialAssignment");
  auto events = events_of(fresh["operationId"]);
  REQUIRE(events.size() == 1);
  CHECK(events[0]["type"] == "device.assigned");
  // Now A -> B is a move to a new hub, not back.
  put_enrollment(id, hub_b, nullptr);
  auto moved = register_once(id);
  CHECK(moved["registrationState"]["substatus"] == "deviceDataMigrated");
}

TEST_CASE("updateHubAssignment false: the device stays on its hub, nothing deprovisioned") {
  const std::string id = "reprov-sticky";
  auto o = move_and_register(id, json{{"updateHubAssignment", false}, {"migrateDeviceData", true}});
  CHECK(o.state["assignedHub"] == hub_a);
  CHECK(o.state["substatus"] == "initialAssignment");
  REQUIRE(o.events.size() == 1);
  CHECK(o.events[0]["type"] == "device.assigned");
  CHECK(o.events[0]["data"]["assignedHub"] == hub_a);
  // The policy chose B; re-provisioning kept A, and the event says so.
  CHECK(o.events[0]["data"]["allocation"]["chosen"] == hub_b);
  CHECK(o.events[0]["data"]["allocation"]["reprovision"]
        == "kept the current hub (updateHubAssignment false)");
}

TEST_CASE("registering again on the same hub: the substatus stays, nothing deprovisioned") {
  const std::string id = "reprov-same-hub";
  put_enrollment(id, hub_a, nullptr);
  register_once(id);
  auto again = register_once(id);
  CHECK(again["registrationState"]["assignedHub"] == hub_a);
  CHECK(again["registrationState"]["substatus"] == "initialAssignment");
  auto events = events_of(again["operationId"]);
  REQUIRE(events.size() == 1);
  CHECK(events[0]["type"] == "device.assigned");
  // forceRegistration=true changes nothing: provisiond allocates every register anyway.
  auto c = srv().client();
  net::http_headers h;
  h.add("Authorization", srv().device_auth(id, key));
  h.add("Content-Type", "application/json");
  net::https_response resp;
  auto err = c.request("PUT",
                       "/" + srv().id_scope() + "/registrations/" + id
                         + "/register?api-version=2021-06-01&forceRegistration=true",
                       h, json{{"registrationId", id}}.dump(), resp);
  REQUIRE(!err);
  REQUIRE_MESSAGE(resp.status == 200, resp.body);
  auto forced = test::parse_json(resp.body);
  CHECK(forced["status"] == "assigned");
  CHECK(forced["registrationState"]["assignedHub"] == hub_a);
  CHECK(forced["operationId"] != again["operationId"]);
  // The body member is read too; not a boolean: 400000, nothing registered.
  err = c.request("PUT", "/" + srv().id_scope() + "/registrations/" + id
                           + "/register?api-version=2021-06-01",
                  h, json{{"registrationId", id}, {"forceRegistration", "yes"}}.dump(), resp);
  REQUIRE(!err);
  CHECK(resp.status == 400);
  CHECK(test::parse_json(resp.body)["errorCode"] == 400000);
  err = c.request("PUT", "/" + srv().id_scope() + "/registrations/" + id
                           + "/register?api-version=2021-06-01",
                  h, json{{"registrationId", id}, {"forceRegistration", true}}.dump(), resp);
  REQUIRE(!err);
  REQUIRE_MESSAGE(resp.status == 200, resp.body);
  CHECK(test::parse_json(resp.body)["status"] == "assigned");
}

TEST_CASE("over Kafka: device.deprovisioned before device.assigned, on the topic and the outbox") {
  test::kafka_fixture fx;
  test::server_process s;
  REQUIRE_MESSAGE(!s.start(test::with_device_api(fx.server_config(), "register_wait_ms = 5000"),
                           fx.dir),
                  s.log());
  const std::string id = "reprov-kafka";
  put_enrollment(id, hub_a, nullptr, s);
  register_once(id, s);
  put_enrollment(id, hub_b, nullptr, s);
  auto second = register_once(id, s);
  CHECK(second["registrationState"]["assignedHub"] == hub_b);
  CHECK(second["registrationState"]["substatus"] == "deviceDataMigrated");
  const std::string op = second["operationId"];
  // The topic: both records of the operation, keyed by the device, in order.
  std::vector<std::string> types;
  for (const auto& r : test::read_topic(fx.cfg, "dps.device.assigned", 3))
    if (r.operation_id == op) {
      CHECK(r.key == id);
      types.push_back(r.ce_type);
      if (r.ce_type == "device.deprovisioned")
        check_deprovisioned(json::parse(r.value), id, "deviceDataMigrated");
    }
  CHECK(types == std::vector<std::string>{"device.deprovisioned", "device.assigned"});
  // The gateway's outbox, rebuilt from dps.registrations.
  std::vector<json> events;
  for (int i = 0; i < 100 && events.size() < 2; ++i) {
    events = events_of(op, s);
    if (events.size() < 2)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  REQUIRE(events.size() == 2);
  check_deprovisioned(events[0], id, "deviceDataMigrated");
  CHECK(events[1]["type"] == "device.assigned");
  CHECK(s.stop() == 0);
}
