// Device API (DPS registration over HTTPS) against the real provisiond process.

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <openssl/ssl.h>

#include "actors/attestation/sas_token.hpp"
#include "messages/crypto.hpp"
#include "messages/registration.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/raw_tls.hpp"
#include "tests/support/server_process.hpp"

using namespace prov;
using nlohmann::json;

namespace {

const char* const hub_a = "hub-a.example.net";
const char* const hub_b = "hub-b.example.net";

test::server_process& srv() { return test::shared_server(); }
json parse(const std::string& text) { return test::parse_json(text); }

void put_enrollment(const test::server_process& s, const std::string& id, json body) {
  body["registrationId"] = id;
  auto r = s.service("PUT", "/enrollments/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

void put_group(const test::server_process& s, const std::string& id, json body) {
  body["enrollmentGroupId"] = id;
  auto r = s.service("PUT", "/enrollmentGroups/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

json sym_attestation(const std::string& primary, const std::string& secondary = {}) {
  json sk{{"primaryKey", primary}};
  if (!secondary.empty())
    sk["secondaryKey"] = secondary;
  return json{{"type", "symmetricKey"}, {"symmetricKey", sk}};
}

std::string device_path(const test::server_process& s, const std::string& id) {
  return "/" + s.id_scope() + "/registrations/" + id;
}

/// PUT register with an explicit Authorization header and api-version.
net::https_response put_register(net::https_client& c, const test::server_process& s,
                                 const std::string& id, const std::string& auth,
                                 const std::string& api = "2021-06-01") {
  net::http_headers h;
  h.add("Authorization", auth);
  h.add("Content-Type", "application/json; charset=utf-8");
  net::https_response resp;
  auto err = c.request("PUT", device_path(s, id) + "/register?api-version=" + api, h,
                       json{{"registrationId", id}}.dump(), resp);
  REQUIRE_MESSAGE(!err, err.message);
  return resp;
}

/// Polls an operation until it leaves 202; returns the final response.
net::https_response poll(net::https_client& c, const test::server_process& s,
                         const std::string& id, const std::string& auth,
                         const std::string& op, const std::string& api = "2021-06-01") {
  net::https_response resp;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    net::http_headers h;
    h.add("Authorization", auth);
    auto err = c.request("GET", device_path(s, id) + "/operations/" + op + "?api-version=" + api,
                         h, {}, resp);
    REQUIRE_MESSAGE(!err, err.message);
    if (resp.status != 202)
      return resp;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  FAIL("operation " << op << " still assigning after 20 s: " << resp.body);
  return resp;
}

/// Register + poll with `auth`; returns the final operation JSON (status 200 required).
json register_with(net::https_client& c, const test::server_process& s, const std::string& id,
                   const std::string& auth, const std::string& api = "2021-06-01") {
  auto r = put_register(c, s, id, auth, api);
  REQUIRE_MESSAGE((r.status == 202 || r.status == 200), r.body);
  auto j = parse(r.body);
  auto op = j.value("operationId", "");
  REQUIRE(!op.empty());
  if (r.status == 200) // the outcome within register_wait_ms: no poll, like an SDK
    return j;
  auto p = poll(c, s, id, auth, op, api);
  REQUIRE_MESSAGE(p.status == 200, p.body);
  auto out = parse(p.body);
  CHECK(out.value("operationId", "") == op);
  return out;
}

void check_error(const net::https_response& r, int status, int code) {
  CHECK_MESSAGE(r.status == status, r.body);
  auto j = parse(r.body);
  CHECK_MESSAGE(j.value("errorCode", 0) == code, r.body);
  CHECK(!j.value("trackingId", "").empty());
  CHECK(j.contains("message"));
  CHECK(j.contains("timestampUtc"));
}

bool is_linked_hub(const std::string& h) {
  return h == hub_a || h == hub_b;
}

using test::all_assignments;

} // namespace

TEST_SUITE("device_api") {

/// Checks a final `assigned` operation body for `id` (poll or register answer).
json check_assigned(const std::string& body, const std::string& id, const std::string& op) {
  auto res = parse(body);
  CHECK(res.value("operationId", "") == op);
  CHECK(res.value("status", "") == "assigned");
  auto rs = res["registrationState"];
  CHECK(rs.value("registrationId", "") == id);
  CHECK(!rs.value("createdDateTimeUtc", "").empty());
  CHECK(is_linked_hub(rs.value("assignedHub", "")));
  CHECK(rs.value("deviceId", "") == id);
  CHECK(rs.value("status", "") == "assigned");
  CHECK(rs.value("substatus", "") == "initialAssignment");
  CHECK(!rs.value("etag", "").empty());
  CHECK(!rs.value("lastUpdatedDateTimeUtc", "").empty());
  CHECK(!rs.contains("errorCode"));
  return rs;
}

TEST_CASE("register_wait_ms = 0: 202 + Retry-After, then poll assigned (classic DPS flow)") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-classic");
  auto err = s.start(test::with_device_api(test::default_config(dir), "register_wait_ms = 0"), dir);
  REQUIRE_MESSAGE(!err, err.message);
  auto pk = crypto::generate_key();
  put_enrollment(s, "dev-classic-1", {{"attestation", sym_attestation(pk)}});
  auto c = s.client();
  auto auth = s.device_auth("dev-classic-1", pk);
  for (int i = 0; i < 3; ++i) { // never 200, however fast the pipeline is
    auto r = put_register(c, s, "dev-classic-1", auth);
    REQUIRE_MESSAGE(r.status == 202, r.body);
    CHECK(r.headers.get("Retry-After") == "1");
    auto j = parse(r.body);
    CHECK(j.value("status", "") == "assigning");
    auto op = j.value("operationId", "");
    REQUIRE(!op.empty());
    auto p = poll(c, s, "dev-classic-1", auth, op);
    REQUIRE_MESSAGE(p.status == 200, p.body);
    check_assigned(p.body, "dev-classic-1", op);
  }
  s.stop();
  test::remove_tree(dir);
}

TEST_CASE("register_wait_ms shorter than the pipeline: the wait expires into a 202, polls end assigned") {
  // The hand-off from allocation to configuration is held back 1 s (a slow
  // pipeline), so every register's 5 ms wait expires: its accept, deferred
  // until the outcome, is recorded first, then answered 202; the polls read
  // that record ("assigning") until the outcome. The hold is long so that a
  // loaded machine's late wait timer cannot see the outcome first (100 ms
  // let one register in a hundred end 200 under a parallel build).
  test::server_process s;
  s.set_pipeline_delay_ms(1000);
  auto dir = test::start_with_wait(s, 5);
  const auto group_key = crypto::generate_key();
  test::create_group(s, "expiry-group", group_key);
  constexpr int threads = 20, per_thread = 5;
  std::atomic<int> accepted{0}, answered{0}, not_assigned{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      auto c = s.client();
      for (int i = 0; i < per_thread; ++i) {
        auto id = "expiry-" + std::to_string(t) + "-" + std::to_string(i);
        int status = 0;
        test::put_answer put;
        auto res = test::register_device(c, s, id, *crypto::derive_device_key(group_key, id),
                                         status, 20, &put);
        (put.status == 202 ? accepted : answered)++;
        if (status != 200 || res.value("status", "") != "assigned"
            || res["registrationState"].value("registrationId", "") != id)
          ++not_assigned;
      }
    });
  for (auto& th : ts)
    th.join();
  CHECK(not_assigned.load() == 0);
  CHECK(accepted.load() == threads * per_thread); // every wait expired
  CHECK(answered.load() == 0);

  { // a device that sends its PUT again meanwhile gets the same operation
    const std::string id = "expiry-again";
    auto key = *crypto::derive_device_key(group_key, id);
    auto c1 = s.client(), c2 = s.client();
    auto put = [&](net::https_client& c, net::https_response& resp) {
      net::http_headers h;
      h.add("Authorization", s.device_auth(id, key));
      h.add("Content-Type", "application/json");
      REQUIRE(!c.request("PUT", "/" + s.id_scope() + "/registrations/" + id
                                  + "/register?api-version=2021-06-01",
                         h, json{{"registrationId", id}}.dump(), resp));
    };
    net::https_response first, second;
    std::thread t1{[&] { put(c1, first); }};
    std::this_thread::sleep_for(std::chrono::milliseconds(20)); // within the 1 s
    put(c2, second);
    t1.join();
    REQUIRE_MESSAGE(first.status == 202, first.body);
    REQUIRE_MESSAGE(second.status == 202, second.body);
    auto op = parse(first.body).value("operationId", "");
    CHECK(parse(second.body).value("operationId", "") == op);
    std::string status;
    for (int i = 0; i < 100 && status != "assigned"; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      auto p = poll(c1, s, id, s.device_auth(id, key), op);
      REQUIRE_MESSAGE((p.status == 200 || p.status == 202), p.body);
      status = parse(p.body).value("status", "");
    }
    CHECK(status == "assigned");
  }

  // Each operation assigned once: one outbox event per device.
  std::set<std::string> devices;
  for (auto& e : all_assignments(s))
    CHECK(devices.insert(e["data"].value("registrationId", "")).second);
  CHECK(devices.size() == static_cast<std::size_t>(threads * per_thread + 1));
  CHECK(s.stop() == 0);
  // A late accept record whose terminal commit came first was deleted once
  // the outcome arrived: nothing is left to resume.
  CHECK(test::pending_entries(dir) == 0);
}

TEST_CASE("a registration record deleted while the device's operation runs is not built upon") {
  // The hand-off from allocation to configuration is held back 500 ms, and
  // the device's record is deleted after allocation read it. Configuration
  // must not reuse that read: the new record starts afresh (it carried the
  // deleted record's created time when the read was reused unguarded).
  test::server_process s;
  s.set_pipeline_delay_ms(500);
  test::start_with_wait(s, 5000);
  const auto group_key = crypto::generate_key();
  test::create_group(s, "prior-group", group_key);
  const std::string id = "prior-dev";
  const auto key = *crypto::derive_device_key(group_key, id);
  auto c = s.client();
  int status = 0;
  auto first = test::register_device(c, s, id, key, status);
  REQUIRE_MESSAGE(first.value("status", "") == "assigned", first.dump());
  const auto created = first["registrationState"].value("createdDateTimeUtc", "");
  REQUIRE(!created.empty());
  json second;
  std::thread again{[&] {
    auto c2 = s.client();
    int status2 = 0;
    second = test::register_device(c2, s, id, key, status2);
  }};
  std::this_thread::sleep_for(std::chrono::milliseconds(200)); // allocated, held back
  CHECK(s.service("DELETE", "/registrations/" + id).status == 204);
  again.join();
  REQUIRE_MESSAGE(second.value("status", "") == "assigned", second.dump());
  CHECK(second["registrationState"].value("createdDateTimeUtc", "") != created);
  CHECK(s.stop() == 0);
}

TEST_CASE("individual symmetric-key enrollment: register answers 200 assigned, no poll needed") {
  // The embedded pipeline finishes in a few ms, well within register_wait_ms
  // (5 s on the shared test server), so the register answer carries the outcome.
  auto& s = srv();
  auto pk = crypto::generate_key(), sk = crypto::generate_key();
  put_enrollment(s, "dev-basic-1", {{"attestation", sym_attestation(pk, sk)}});
  auto c = s.client();
  auto auth = s.device_auth("dev-basic-1", pk);
  auto r = put_register(c, s, "dev-basic-1", auth);
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(r.headers.get("Retry-After").empty());
  auto op = parse(r.body).value("operationId", "");
  REQUIRE(!op.empty());
  auto rs = check_assigned(r.body, "dev-basic-1", op);

  // A poll of the same operation gives the same answer, byte for byte.
  auto p = poll(c, s, "dev-basic-1", auth, op);
  REQUIRE_MESSAGE(p.status == 200, p.body);
  CHECK(p.body == r.body);

  SUBCASE("secondary key also works") {
    auto res2 = register_with(c, s, "dev-basic-1", s.device_auth("dev-basic-1", sk));
    CHECK(res2.value("status", "") == "assigned");
    CHECK(res2["registrationState"].value("assignedHub", "") == rs.value("assignedHub", ""));
  }
  SUBCASE("a key that is neither primary nor secondary is rejected") {
    auto bad = put_register(c, s, "dev-basic-1", s.device_auth("dev-basic-1", crypto::generate_key()));
    check_error(bad, 401, 401002);
  }
  SUBCASE("status lookup POST /{scope}/registrations/{id} returns the registration state") {
    net::http_headers h;
    h.add("Authorization", auth);
    h.add("Content-Type", "application/json");
    net::https_response lr;
    auto err = c.request("POST", device_path(s, "dev-basic-1") + "?api-version=2021-06-01", h,
                         json{{"registrationId", "dev-basic-1"}}.dump(), lr);
    REQUIRE(!err);
    REQUIRE_MESSAGE(lr.status == 200, lr.body);
    auto st = parse(lr.body);
    CHECK(st.value("registrationId", "") == "dev-basic-1");
    CHECK(st.value("status", "") == "assigned");
    CHECK(st.value("assignedHub", "") == rs.value("assignedHub", ""));
    CHECK(st.value("deviceId", "") == "dev-basic-1");
    CHECK(st.value("substatus", "") == "initialAssignment");
    CHECK(st.value("etag", "") == rs.value("etag", ""));
  }
}

TEST_CASE("deviceId comes from the enrollment's deviceId") {
  auto& s = srv();
  auto pk = crypto::generate_key();
  put_enrollment(s, "dev-with-did", {{"deviceId", "custom-device-7"},
                                     {"attestation", sym_attestation(pk)}});
  auto c = s.client();
  auto res = register_with(c, s, "dev-with-did", s.device_auth("dev-with-did", pk));
  CHECK(res.value("status", "") == "assigned");
  CHECK(res["registrationState"].value("deviceId", "") == "custom-device-7");
  CHECK(res["registrationState"].value("registrationId", "") == "dev-with-did");
}

TEST_CASE("group enrollment: derived device key works, the group key itself does not") {
  auto& s = srv();
  auto gk = crypto::generate_key();
  put_group(s, "grp-dev-api", {{"attestation", sym_attestation(gk)}});
  auto c = s.client();
  auto dk = crypto::derive_device_key(gk, "grp-member-1");
  REQUIRE(dk);
  auto res = register_with(c, s, "grp-member-1", s.device_auth("grp-member-1", *dk));
  CHECK(res.value("status", "") == "assigned");
  auto rs = res["registrationState"];
  CHECK(rs.value("deviceId", "") == "grp-member-1");
  CHECK(is_linked_hub(rs.value("assignedHub", "")));
  CHECK(rs["symmetricKey"].value("enrollmentGroupId", "") == "grp-dev-api");

  auto bad = put_register(c, s, "grp-member-2", s.device_auth("grp-member-2", gk));
  check_error(bad, 401, 401002);
  // A key derived for another registration id does not work either.
  auto other = put_register(c, s, "grp-member-2", s.device_auth("grp-member-2", *dk));
  check_error(other, 401, 401002);
}

TEST_CASE("every supported api-version is accepted") {
  auto& s = srv();
  auto pk = crypto::generate_key();
  put_enrollment(s, "dev-apiver", {{"attestation", sym_attestation(pk)}});
  auto c = s.client();
  std::string hub;
  for (const char* api : {"2017-11-15", "2018-09-01-preview", "2018-11-01", "2019-03-31",
                          "2021-06-01", "2021-10-01"}) {
    CAPTURE(api);
    auto res = register_with(c, s, "dev-apiver", s.device_auth("dev-apiver", pk), api);
    CHECK(res.value("status", "") == "assigned");
    auto h = res["registrationState"].value("assignedHub", "");
    CHECK(is_linked_hub(h));
    if (hub.empty())
      hub = h;
    CHECK(h == hub);
  }
}

TEST_CASE("raw (Node style) and URL-encoded sr both authenticate") {
  auto& s = srv();
  auto pk = crypto::generate_key();
  put_enrollment(s, "dev-sr-styles", {{"attestation", sym_attestation(pk)}});
  auto c = s.client();
  auto resource = s.id_scope() + "/registrations/dev-sr-styles";
  auto exp = now_ms() / 1000 + 600;
  auto raw = attestation::make_sas(resource, pk, exp, "registration", false);
  auto enc = attestation::make_sas(resource, pk, exp, "registration", true);
  REQUIRE(raw.find("/registrations/") != std::string::npos);
  REQUIRE(enc.find("%2F") != std::string::npos);
  CHECK(register_with(c, s, "dev-sr-styles", raw).value("status", "") == "assigned");
  CHECK(register_with(c, s, "dev-sr-styles", enc).value("status", "") == "assigned");
  // A token for another resource is rejected.
  auto wrong = attestation::make_sas(s.id_scope() + "/registrations/someone-else", pk, exp,
                                     "registration", true);
  check_error(put_register(c, s, "dev-sr-styles", wrong), 401, 401002);
}

TEST_CASE("expired token -> 401002 mentioning expiry") {
  auto& s = srv();
  auto pk = crypto::generate_key();
  put_enrollment(s, "dev-expired", {{"attestation", sym_attestation(pk)}});
  auto c = s.client();
  auto tok = attestation::make_sas(s.id_scope() + "/registrations/dev-expired", pk,
                                   now_ms() / 1000 - 3600, "registration");
  auto r = put_register(c, s, "dev-expired", tok);
  check_error(r, 401, 401002);
  CHECK_MESSAGE(parse(r.body).value("message", "").find("expire") != std::string::npos, r.body);
}

TEST_CASE("wrong id scope -> 404001; unknown registration id -> 401002") {
  auto& s = srv();
  auto c = s.client();
  std::string scope = "0ne00ABCDEF";
  if (scope == s.id_scope())
    scope = "0ne00ABCDE0";
  net::http_headers h;
  auto key = crypto::generate_key();
  h.add("Authorization", attestation::make_sas(scope + "/registrations/dev-x", key,
                                               now_ms() / 1000 + 600, "registration"));
  h.add("Content-Type", "application/json");
  net::https_response r;
  REQUIRE(!c.request("PUT", "/" + scope + "/registrations/dev-x/register?api-version=2021-06-01",
                     h, R"({"registrationId":"dev-x"})", r));
  check_error(r, 404, 404001);

  auto unknown = put_register(c, s, "nobody-enrolled-this",
                              s.device_auth("nobody-enrolled-this", key));
  check_error(unknown, 401, 401002);
}

TEST_CASE("disabled individual enrollment and disabled group -> status disabled") {
  auto& s = srv();
  auto c = s.client();
  auto pk = crypto::generate_key();
  put_enrollment(s, "dev-disabled", {{"attestation", sym_attestation(pk)},
                                     {"provisioningStatus", "disabled"}});
  auto check_disabled = [&](const std::string& id, const std::string& key) {
    auto auth = s.device_auth(id, key);
    auto r = put_register(c, s, id, auth);
    // Never `disabled` in a 2xx register answer: Node and Python treat it as
    // an unknown status. The first poll reports it.
    REQUIRE_MESSAGE(r.status == 202, r.body);
    auto j = parse(r.body);
    CHECK_MESSAGE(j.value("status", "") == "assigning", r.body);
    auto p = poll(c, s, id, auth, j.value("operationId", ""));
    REQUIRE_MESSAGE(p.status == 200, p.body);
    auto res = parse(p.body);
    CHECK(res.value("status", "") == "disabled");
    CHECK(res["registrationState"].value("status", "") == "disabled");
    CHECK(!res["registrationState"].contains("assignedHub"));
  };
  check_disabled("dev-disabled", pk);

  auto gk = crypto::generate_key();
  put_group(s, "grp-disabled", {{"attestation", sym_attestation(gk)},
                                {"provisioningStatus", "disabled"}});
  check_disabled("grp-disabled-member", *crypto::derive_device_key(gk, "grp-disabled-member"));
  // Nothing was assigned: no assignment event for either device.
  for (const auto& e : all_assignments(s)) {
    auto rid = e["data"].value("registrationId", "");
    CHECK(rid != "dev-disabled");
    CHECK(rid != "grp-disabled-member");
  }
}

TEST_CASE("iotHubs naming an unlinked hub -> failed with errorCode 400208") {
  auto& s = srv();
  auto c = s.client();
  auto pk = crypto::generate_key();
  put_enrollment(s, "dev-unlinked-hub", {{"attestation", sym_attestation(pk)},
                                         {"iotHubs", {"hub-z.example.net"}}});
  auto auth = s.device_auth("dev-unlinked-hub", pk);
  auto r = put_register(c, s, "dev-unlinked-hub", auth);
  // The failure arrives within register_wait_ms: answered 200 `failed` on
  // the register itself, exactly what the poll says.
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto p = poll(c, s, "dev-unlinked-hub", auth, parse(r.body).value("operationId", ""));
  REQUIRE_MESSAGE(p.status == 200, p.body);
  CHECK(p.body == r.body);
  auto res = parse(p.body);
  CHECK(res.value("status", "") == "failed");
  CHECK(res["registrationState"].value("status", "") == "failed");
  CHECK(res["registrationState"].value("errorCode", 0) == 400208);
  CHECK(!res["registrationState"].value("errorMessage", "").empty());
  CHECK(!res["registrationState"].contains("assignedHub"));
}

TEST_CASE("static policy with one hub assigns that hub") {
  auto& s = srv();
  auto c = s.client();
  for (const char* hub : {hub_a, hub_b}) {
    CAPTURE(hub);
    auto id = std::string("dev-static-") + hub[4];
    auto pk = crypto::generate_key();
    put_enrollment(s, id, {{"attestation", sym_attestation(pk)},
                           {"allocationPolicy", "static"},
                           {"iotHubs", {hub}}});
    auto res = register_with(c, s, id, s.device_auth(id, pk));
    CHECK(res.value("status", "") == "assigned");
    CHECK(res["registrationState"].value("assignedHub", "") == hub);
  }
}

TEST_CASE("initialTwin and capabilities appear in the assignment event") {
  auto& s = srv();
  auto c = s.client();
  auto pk = crypto::generate_key();
  json twin{{"tags", {{"site", "berlin"}}}, {"properties", {{"desired", {{"interval", 30}}}}}};
  put_enrollment(s, "dev-twin", {{"attestation", sym_attestation(pk)},
                                 {"deviceId", "twin-device"},
                                 {"initialTwin", twin},
                                 {"capabilities", {{"iotEdge", true}}}});
  auto res = register_with(c, s, "dev-twin", s.device_auth("dev-twin", pk));
  REQUIRE(res.value("status", "") == "assigned");
  auto op = res.value("operationId", "");
  auto hub = res["registrationState"].value("assignedHub", "");

  auto r = s.service("GET", "/assignments?after=0");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto page = parse(r.body);
  REQUIRE(page["events"].is_array());
  REQUIRE(page["next"].is_number_unsigned());
  int found = 0;
  for (const auto& e : all_assignments(s)) {
    if (e["data"].value("operationId", "") != op)
      continue;
    ++found;
    CHECK(e.value("specversion", "") == "1.0");
    CHECK(e.value("type", "") == "device.assigned");
    CHECK(e.value("id", "") == op);
    // CloudEvents `sequence` extension: a decimal string (docs/events.md).
    REQUIRE(e["sequence"].is_string());
    auto seq = e["sequence"].get<std::string>();
    CHECK(!seq.empty());
    CHECK(seq.find_first_not_of("0123456789") == std::string::npos);
    CHECK(e.value("source", "") == "/provisiond/" + s.id_scope());
    CHECK(e.value("subject", "") == "twin-device");
    CHECK(e.value("datacontenttype", "") == "application/json");
    CHECK(!e.value("time", "").empty());
    auto d = e["data"];
    CHECK(d.value("attestationType", "") == "symmetricKey");
    CHECK(d.value("substatus", "") == "initialAssignment");
    CHECK(!d.contains("enrollmentGroupId"));
    CHECK(d.value("registrationId", "") == "dev-twin");
    CHECK(d.value("deviceId", "") == "twin-device");
    CHECK(d.value("assignedHub", "") == hub);
    CHECK(d["initialTwin"] == twin);
    CHECK(d["capabilities"] == json{{"iotEdge", true}});
  }
  CHECK(found == 1);
}

TEST_CASE("registering twice: two operations, same hub, one assignment event each") {
  auto& s = srv();
  auto c = s.client();
  auto pk = crypto::generate_key();
  put_enrollment(s, "dev-twice", {{"attestation", sym_attestation(pk)}});
  auto a = register_with(c, s, "dev-twice", s.device_auth("dev-twice", pk));
  auto b = register_with(c, s, "dev-twice", s.device_auth("dev-twice", pk));
  CHECK(a.value("status", "") == "assigned");
  CHECK(b.value("status", "") == "assigned");
  auto op1 = a.value("operationId", ""), op2 = b.value("operationId", "");
  CHECK(op1 != op2);
  CHECK(a["registrationState"].value("assignedHub", "")
        == b["registrationState"].value("assignedHub", ""));
  std::multiset<std::string> ops;
  for (const auto& e : all_assignments(s))
    if (e["data"].value("registrationId", "") == "dev-twice")
      ops.insert(e["data"].value("operationId", ""));
  CHECK(ops == std::multiset<std::string>{op1, op2});
}

TEST_CASE("keep-alive: 50 sequential requests on one connection") {
  auto& s = srv();
  auto pk = crypto::generate_key();
  put_enrollment(s, "dev-keepalive", {{"attestation", sym_attestation(pk)}});
  auto c = s.client(true);
  auto auth = s.device_auth("dev-keepalive", pk);
  auto res = register_with(c, s, "dev-keepalive", auth);
  REQUIRE(res.value("status", "") == "assigned");
  auto op = res.value("operationId", "");
  int ok = 0;
  for (int i = 0; i < 50; ++i) {
    net::http_headers h;
    h.add("Authorization", auth);
    net::https_response r;
    REQUIRE(!c.request("GET", device_path(s, "dev-keepalive") + "/operations/" + op
                                  + "?api-version=2021-06-01",
                       h, {}, r));
    if (r.status == 200 && parse(r.body).value("status", "") == "assigned")
      ++ok;
  }
  CHECK(ok == 50);
  CHECK(c.connections_opened() == 1);
  CHECK(c.connected());
}

namespace {

/// One TLS connection to the gateway with raw OpenSSL (no verification: this
/// checks resumption, not trust), a GET /healthz, and the session it ends with.
/// `resume`: offer that session. Returns whether the server resumed it.
bool tls_get(uint16_t port, int max_version, SSL_SESSION* resume, SSL_SESSION** out) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_max_proto_version(ctx, max_version);
  const std::string req = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
  std::string got;
  const bool reused = test::raw_tls_request(ctx, port, req, resume, out, got);
  SSL_CTX_free(ctx);
  CHECK(got.find(" 200 ") != std::string::npos);
  return reused;
}

} // namespace

TEST_CASE("TLS session resumption through tickets, TLS 1.2 and 1.3") {
  auto& s = srv();
  for (int version : {TLS1_2_VERSION, TLS1_3_VERSION}) {
    CAPTURE(version);
    SSL_SESSION* sess = nullptr;
    CHECK_FALSE(tls_get(s.port(), version, nullptr, &sess));
    REQUIRE(sess != nullptr);
    CHECK(SSL_SESSION_is_resumable(sess) == 1);
    CHECK(tls_get(s.port(), version, sess, nullptr));
    SSL_SESSION_free(sess);
  }
}

} // TEST_SUITE

TEST_CASE("a verified token stops working the moment its enrollment key changes") {
  // Polls reuse verified tokens (a cache); rotating or removing the key must
  // still take effect on the very next request.
  auto& s = srv();
  auto k1 = crypto::generate_key(), k2 = crypto::generate_key();
  put_enrollment(s, "dev-rotate-1", {{"attestation", sym_attestation(k1)}});
  auto c = s.client();
  auto old_auth = s.device_auth("dev-rotate-1", k1);
  auto r = put_register(c, s, "dev-rotate-1", old_auth);
  REQUIRE_MESSAGE((r.status == 200 || r.status == 202), r.body);
  auto op = parse(r.body).value("operationId", "");
  auto p = poll(c, s, "dev-rotate-1", old_auth, op);
  REQUIRE_MESSAGE(p.status == 200, p.body);
  CHECK(poll(c, s, "dev-rotate-1", old_auth, op).status == 200); // served from the cache

  put_enrollment(s, "dev-rotate-1", {{"attestation", sym_attestation(k2)}});
  auto stale = poll(c, s, "dev-rotate-1", old_auth, op);
  CHECK_MESSAGE(stale.status == 401, stale.body);
  CHECK(put_register(c, s, "dev-rotate-1", old_auth).status == 401);
  auto fresh = poll(c, s, "dev-rotate-1", s.device_auth("dev-rotate-1", k2), op);
  CHECK_MESSAGE(fresh.status == 200, fresh.body);

  // Deleting the enrollment revokes the new token too.
  auto d = s.service("DELETE", "/enrollments/dev-rotate-1");
  REQUIRE(d.status == 204);
  CHECK(poll(c, s, "dev-rotate-1", s.device_auth("dev-rotate-1", k2), op).status == 401);
}

TEST_CASE("group key rotation revokes cached device tokens; the cache is case-exact") {
  auto& s = srv();
  auto g1 = crypto::generate_key(), g2 = crypto::generate_key();
  put_group(s, "grp-rotate", {{"attestation", sym_attestation(g1)}});
  auto c = s.client();
  const std::string id = "dev-grp-rotate";
  auto old_auth = s.device_auth(id, *crypto::derive_device_key(g1, id));
  auto r = put_register(c, s, id, old_auth);
  REQUIRE_MESSAGE((r.status == 200 || r.status == 202), r.body);
  auto op = parse(r.body).value("operationId", "");
  REQUIRE(poll(c, s, id, old_auth, op).status == 200);

  // Same token, registration id in other case: the group key derives a
  // different device key, so this must fail even though the token is cached.
  auto upper = put_register(c, s, "DEV-GRP-ROTATE", old_auth);
  CHECK_MESSAGE(upper.status == 401, upper.body);

  put_group(s, "grp-rotate", {{"attestation", sym_attestation(g2)}});
  auto stale = poll(c, s, id, old_auth, op);
  CHECK_MESSAGE(stale.status == 401, stale.body);
  auto fresh = poll(c, s, id, s.device_auth(id, *crypto::derive_device_key(g2, id)), op);
  CHECK_MESSAGE(fresh.status == 200, fresh.body);
}
