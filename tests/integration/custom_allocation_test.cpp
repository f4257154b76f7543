// The custom allocation webhook (allocationPolicy "custom") against the real
// provisiond process and a real local HTTPS webhook server, trusted through
// custom_allocation.ca_file. Each webhook path answers one way; each outcome
// is checked exactly, as the device and the service API see it.

#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "actors/enrollment/x509_certificates.hpp"
#include "gateway/https_server.hpp"
#include "messages/crypto.hpp"
#include "tests/support/cli.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/kafka_it.hpp"
#include "tests/support/local_https.hpp"
#include "tests/support/server_process.hpp"
#include "tests/support/test_certs.hpp"
#include "tests/support/x509_client.hpp"

using namespace prov;
using nlohmann::json;

namespace {

const char* const hub_a = "hub-a.example.net";
const char* const hub_b = "hub-b.example.net";

/// What the webhook received.
struct seen_call {
  std::string path;
  std::string query_code;
  json body;
};

/// The webhook: its answer depends on the request path.
class webhook_handler final : public gateway::handler {
public:
  void handle(gateway::http_request req, gateway::respond_fn respond) override {
    auto body = json::parse(req.body, nullptr, false);
    {
      std::lock_guard<std::mutex> lk(mtx_);
      auto q = req.query.find("code");
      calls_.push_back({req.path, q == req.query.end() ? "" : q->second, body});
    }
    gateway::http_response r;
    r.headers.emplace_back("Content-Type", "application/json");
    if (req.path == "/ok") {
      json device_payload = body.is_object() ? body["deviceRuntimeContext"].value("payload", json())
                                             : json();
      r.body = json{{"iotHubHostName", hub_b},
                    {"initialTwin",
                     {{"tags", {{"from", "webhook"}}},
                      {"properties", {{"desired", {{"interval", 30}}}}}}},
                    {"payload", {{"greeting", "hello"}, {"echo", device_payload}}}}
                 .dump();
    } else if (req.path.rfind("/fail500", 0) == 0) {
      r.status = 500;
      r.body = R"({"error":"boom"})";
    } else if (req.path == "/late1500") {
      // Answers after 1.5 s: later than [custom_allocation] timeout_ms (1 s).
      std::thread([respond = std::move(respond)]() mutable {
        std::this_thread::sleep_for(std::chrono::milliseconds(1500));
        gateway::http_response late;
        late.headers.emplace_back("Content-Type", "application/json");
        late.body = json{{"iotHubHostName", hub_a}, {"payload", {{"late", true}}}}.dump();
        respond(std::move(late));
      }).detach();
      return;
    } else if (req.path.rfind("/slow", 0) == 0) {
      std::lock_guard<std::mutex> lk(mtx_);
      held_.push_back(std::move(respond)); // answered only at the end
      return;
    } else if (req.path == "/malformed") {
      r.body = R"({"iotHubHostName": "hub-a.example.net",)";
    } else if (req.path == "/unlinked") {
      r.body = R"({"iotHubHostName":"hub-z.example.net"})";
    } else if (req.path == "/payload-string") {
      r.body = R"({"iotHubHostName":"hub-a.example.net","payload":"text"})";
    } else {
      r.status = 404;
    }
    respond(std::move(r));
  }

  std::vector<seen_call> calls_to(const std::string& path) {
    std::lock_guard<std::mutex> lk(mtx_);
    std::vector<seen_call> out;
    for (const auto& c : calls_)
      if (c.path == path)
        out.push_back(c);
    return out;
  }

  void release_held() {
    std::vector<gateway::respond_fn> held;
    {
      std::lock_guard<std::mutex> lk(mtx_);
      held.swap(held_);
    }
    for (auto& r : held) {
      gateway::http_response late;
      late.body = R"({"iotHubHostName":"hub-a.example.net"})";
      r(std::move(late));
    }
  }

private:
  std::mutex mtx_;
  std::vector<seen_call> calls_;
  std::vector<gateway::respond_fn> held_;
};

/// The webhook server and provisiond, started once for the file.
struct fixture {
  webhook_handler handler;
  test::local_https_server webhook{handler, "Webhook Test Root", 11, 2};
  test::server_process prov;
  std::string base = webhook.base(); ///< https://localhost:PORT

  fixture() {
    const std::string data = test::make_temp_dir("provisiond-webhook-data");
    prov.remove_data_dir_at_exit();
    auto cfg = test::with_device_api(test::default_config(data), "register_wait_ms = 5000")
               + "[custom_allocation]\nca_file = \"" + webhook.ca_file()
               + "\"\ntimeout_ms = 1000\nretries = 1\nretry_backoff_ms = 50\n";
    auto err = prov.start(cfg, data);
    REQUIRE_MESSAGE(!err, err.message);
  }
  ~fixture() {
    handler.release_held();
    prov.stop();
    webhook.stop();
  }
};

fixture& fx() {
  static fixture f;
  return f;
}

const std::string key = crypto::base64_encode(std::string(32, 'k'));

json custom_definition(const std::string& path) {
  return {{"webhookUrl", fx().base + path}, {"apiVersion", "2021-10-01"}};
}

void put_individual(const std::string& id, const std::string& path,
                    const test::server_process& srv = fx().prov, const json& limits = {}) {
  json def = custom_definition(path);
  if (limits.is_object())
    def.update(limits);
  json body{{"registrationId", id},
            {"attestation", {{"type", "symmetricKey"},
                             {"symmetricKey", {{"primaryKey", key}, {"secondaryKey", key}}}}},
            {"allocationPolicy", "custom"},
            {"customAllocationDefinition", def},
            {"initialTwin", {{"tags", {{"from", "enrollment"}}}}}};
  auto r = srv.service("PUT", "/enrollments/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

/// Registers `id` with `payload` (null: none) like an SDK: PUT, then polls
/// until the outcome. The final operation JSON.
json register_with(const std::string& id, const std::string& device_key, const json& payload,
                   const test::server_process& s = fx().prov) {
  auto c = s.client();
  net::http_headers h;
  h.add("Authorization", s.device_auth(id, device_key));
  h.add("Content-Type", "application/json; charset=utf-8");
  json body{{"registrationId", id}};
  if (!payload.is_null())
    body["payload"] = payload;
  const auto base = "/" + s.id_scope() + "/registrations/" + id;
  net::https_response resp;
  auto err = c.request("PUT", base + "/register?api-version=2021-06-01", h, body.dump(), resp);
  REQUIRE_MESSAGE(!err, err.message);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (resp.status == 202 && std::chrono::steady_clock::now() < deadline) {
    auto op = test::parse_json(resp.body).value("operationId", "");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    net::http_headers ph;
    ph.add("Authorization", s.device_auth(id, device_key));
    err = c.request("GET", base + "/operations/" + op + "?api-version=2021-06-01", ph, {}, resp);
    REQUIRE_MESSAGE(!err, err.message);
  }
  REQUIRE_MESSAGE(resp.status == 200, resp.body);
  return test::parse_json(resp.body);
}

/// An individual enrollment with the webhook at `path`, registered without
/// a payload: the final operation JSON.
json register_via(const std::string& id, const std::string& path) {
  put_individual(id, path);
  return register_with(id, key, nullptr);
}

/// The device.assigned event of `op` (GET /assignments).
json assigned_event(const std::string& op) {
  for (auto& e : test::all_assignments(fx().prov))
    if (e["data"].value("operationId", "") == op)
      return e;
  FAIL("no device.assigned event for " << op);
  return {};
}

/// A failed registration: status, errorCode and errorMessage exactly.
void check_failed(const json& op, const std::string& message) {
  CHECK(op["status"] == "failed");
  const json& rs = op["registrationState"];
  CHECK(rs["status"] == "failed");
  CHECK(rs["errorCode"] == 400207);
  CHECK(rs["errorMessage"] == message);
  CHECK(rs.value("assignedHub", "") == "");
}

} // namespace

TEST_CASE("custom allocation: the webhook's hub, initialTwin and payload reach the device") {
  const std::string id = "webhook-ok-1";
  put_individual(id, "/ok?code=s3cret");
  // The service API stores and shows the definition.
  auto got = fx().prov.service("GET", "/enrollments/" + id);
  REQUIRE(got.status == 200);
  CHECK(test::parse_json(got.body)["customAllocationDefinition"] == custom_definition("/ok?code=s3cret"));

  auto op = register_with(id, key, json{{"model", "m1"}});
  REQUIRE(op["status"] == "assigned");
  const json& rs = op["registrationState"];
  CHECK(rs["assignedHub"] == hub_b);
  CHECK(rs["substatus"] == "initialAssignment");
  CHECK(rs["payload"] == json{{"greeting", "hello"}, {"echo", {{"model", "m1"}}}});

  // What DPS sends: the enrollment without its keys, the device's context,
  // the hubs it may choose; the function key stays in the query.
  auto calls = fx().handler.calls_to("/ok");
  REQUIRE(calls.size() == 1);
  CHECK(calls[0].query_code == "s3cret");
  const json& req = calls[0].body;
  REQUIRE(req.is_object());
  CHECK_FALSE(req.contains("enrollmentGroup"));
  CHECK(req["individualEnrollment"]["registrationId"] == id);
  CHECK(req["individualEnrollment"]["allocationPolicy"] == "custom");
  CHECK(req["individualEnrollment"]["attestation"]["symmetricKey"] == json::object());
  CHECK(req["deviceRuntimeContext"] == json{{"registrationId", id},
                                            {"symmetricKey", json::object()},
                                            {"payload", {{"model", "m1"}}}});
  CHECK(req["linkedHubs"] == json::array({hub_a, hub_b}));

  // The webhook's twin replaced the enrollment's in device.assigned.
  auto ev = assigned_event(op["operationId"]);
  CHECK(ev["data"]["assignedHub"] == hub_b);
  CHECK(ev["data"]["initialTwin"]
        == json{{"tags", {{"from", "webhook"}}}, {"properties", {{"desired", {{"interval", 30}}}}}});
  // ...and says why the device is on hub B: the webhook's answer.
  CHECK(ev["data"]["allocation"]
        == json{{"policy", "custom"},
                {"chosen", hub_b},
                {"candidates", "linked hubs"},
                {"why", {{"webhook", "localhost:" + std::to_string(fx().webhook.port())},
                         {"status", 200},
                         {"attempts", 1},
                         {"iotHubHostName", hub_b},
                         {"initialTwin", true},
                         {"payload", true}}}});

  // The registration record shows the payload to operators too.
  auto reg = fx().prov.service("GET", "/registrations/" + id);
  REQUIRE(reg.status == 200);
  CHECK(test::parse_json(reg.body)["payload"] == rs["payload"]);
  // ...and why the device is on its hub, which the device itself never sees.
  CHECK(test::parse_json(reg.body)["allocation"] == ev["data"]["allocation"]);
  CHECK_FALSE(rs.contains("allocation"));

  // Registering again: the webhook learns the current assignment.
  auto again = register_with(id, key, nullptr);
  REQUIRE(again["status"] == "assigned");
  CHECK(again["registrationState"]["payload"]
        == json{{"greeting", "hello"}, {"echo", nullptr}});
  calls = fx().handler.calls_to("/ok");
  REQUIRE(calls.size() == 2);
  CHECK(calls[1].body["deviceRuntimeContext"]
        == json{{"registrationId", id},
                {"currentIotHubHostName", hub_b},
                {"currentDeviceId", id},
                {"symmetricKey", json::object()}});
}

TEST_CASE("custom allocation: an enrollment group's devices, enrollmentGroup in the request") {
  const std::string group = "webhook-group";
  const std::string group_key = crypto::base64_encode(std::string(32, 'g'));
  json body{{"enrollmentGroupId", group},
            {"attestation", {{"type", "symmetricKey"},
                             {"symmetricKey", {{"primaryKey", group_key},
                                               {"secondaryKey", group_key}}}}},
            {"allocationPolicy", "custom"},
            {"iotHubs", json::array({hub_a, hub_b})},
            {"customAllocationDefinition", custom_definition("/ok")}};
  auto r = fx().prov.service("PUT", "/enrollmentGroups/" + group, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  const std::string id = "webhook-group-device-1";
  auto op = register_with(id, *crypto::derive_device_key(group_key, id), nullptr);
  REQUIRE(op["status"] == "assigned");
  CHECK(op["registrationState"]["assignedHub"] == hub_b);
  bool found = false;
  for (const auto& c : fx().handler.calls_to("/ok"))
    if (c.body["deviceRuntimeContext"].value("registrationId", "") == id) {
      found = true;
      CHECK_FALSE(c.body.contains("individualEnrollment"));
      CHECK(c.body["enrollmentGroup"]["enrollmentGroupId"] == group);
      CHECK(c.body["enrollmentGroup"]["attestation"]["symmetricKey"] == json::object());
      CHECK(c.body["linkedHubs"] == json::array({hub_a, hub_b}));
    }
  CHECK(found);
}

namespace {

/// Registers an X.509 device (its certificate over TLS, no Authorization)
/// and polls with the same client until the outcome: the final operation.
json register_x509(net::https_client& c, const std::string& id) {
  const auto base = "/" + fx().prov.id_scope() + "/registrations/" + id;
  net::http_headers h;
  h.add("Content-Type", "application/json; charset=utf-8");
  net::https_response resp;
  auto err = c.request("PUT", base + "/register?api-version=2021-06-01", h,
                       json{{"registrationId", id}}.dump(), resp);
  REQUIRE_MESSAGE(!err, err.message);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (resp.status == 202 && std::chrono::steady_clock::now() < deadline) {
    auto op = test::parse_json(resp.body).value("operationId", "");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    err = c.request("GET", base + "/operations/" + op + "?api-version=2021-06-01", {}, {}, resp);
    REQUIRE_MESSAGE(!err, err.message);
  }
  REQUIRE_MESSAGE(resp.status == 200, resp.body);
  return test::parse_json(resp.body);
}

/// The webhook's request for device `id` at `path` (exactly one).
json webhook_request_for(const std::string& path, const std::string& id) {
  std::vector<json> found;
  for (const auto& c : fx().handler.calls_to(path))
    if (c.body.is_object() && c.body["deviceRuntimeContext"].value("registrationId", "") == id)
      found.push_back(c.body);
  REQUIRE(found.size() == 1);
  return found[0];
}

} // namespace

TEST_CASE("custom allocation: an X.509 device's certificate reaches the webhook") {
  // Real certificates over real TLS: the webhook's deviceRuntimeContext.x509
  // is what registrationState.x509 shows the device (DPS's certificate
  // details), so a webhook can allocate on a certificate property.
  const test::test_cert root = test::make_ca("Webhook X509 Root", nullptr, 31);
  const test::test_cert inter = test::make_ca("Webhook X509 Intermediate", &root, 32);

  SUBCASE("individual enrollment") {
    const std::string id = "webhook-x509-ind";
    const test::test_cert leaf = test::make_device(id, inter, 33);
    json body{{"registrationId", id},
              {"attestation",
               {{"type", "x509"},
                {"x509", {{"clientCertificates", {{"primary", {{"certificate", leaf.pem()}}}}}}}}},
              {"allocationPolicy", "custom"},
              {"customAllocationDefinition", custom_definition("/ok")}};
    auto r = fx().prov.service("PUT", "/enrollments/" + id, body.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
    auto c = test::device_client(fx().prov, leaf, {&inter});
    auto op = register_x509(c, id);
    REQUIRE(op["status"] == "assigned");
    const json& rs = op["registrationState"];
    CHECK(rs["assignedHub"] == hub_b);
    REQUIRE(rs["x509"]["certificateInfo"].is_object());

    auto req = webhook_request_for("/ok", id);
    CHECK(req["individualEnrollment"]["attestation"]["type"] == "x509");
    const json& ctx = req["deviceRuntimeContext"];
    CHECK_FALSE(ctx.contains("symmetricKey"));
    CHECK_FALSE(ctx.contains("payload"));
    REQUIRE(ctx["x509"].is_object());
    CHECK(ctx["x509"] == rs["x509"]);
    const json& info = ctx["x509"]["certificateInfo"];
    CHECK(info["subjectName"] == "CN=" + id + ",O=provisiond tests");
    CHECK(info["issuerName"] == "CN=Webhook X509 Intermediate,O=provisiond tests");
    CHECK(info["sha256Thumbprint"]
          == enrollment::upper_hex(enrollment::sha256_of(leaf.der())));
    CHECK(info["serialNumber"] == "21"); // 33
    CHECK_FALSE(ctx["x509"].contains("signingCertificateInfo"));
    CHECK_FALSE(ctx["x509"].contains("enrollmentGroupId"));
  }

  SUBCASE("enrollment group: the signing CA and the group too") {
    const std::string group = "webhook-x509-group";
    json body{{"enrollmentGroupId", group},
              {"attestation",
               {{"type", "x509"},
                {"x509", {{"signingCertificates", {{"primary", {{"certificate", inter.pem()}}}}}}}}},
              {"allocationPolicy", "custom"},
              {"customAllocationDefinition", custom_definition("/ok")}};
    auto r = fx().prov.service("PUT", "/enrollmentGroups/" + group, body.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
    const std::string id = "webhook-x509-group-device";
    const test::test_cert leaf = test::make_device(id, inter, 34);
    auto c = test::device_client(fx().prov, leaf, {&inter});
    auto op = register_x509(c, id);
    REQUIRE(op["status"] == "assigned");
    const json& rs = op["registrationState"];
    CHECK(rs["x509"]["enrollmentGroupId"] == group);

    auto req = webhook_request_for("/ok", id);
    CHECK(req["enrollmentGroup"]["enrollmentGroupId"] == group);
    const json& x = req["deviceRuntimeContext"]["x509"];
    CHECK(x == rs["x509"]);
    CHECK(x["enrollmentGroupId"] == group);
    CHECK(x["certificateInfo"]["subjectName"] == "CN=" + id + ",O=provisiond tests");
    CHECK(x["certificateInfo"]["serialNumber"] == "22"); // 34
    CHECK(x["signingCertificateInfo"]["subjectName"]
          == "CN=Webhook X509 Intermediate,O=provisiond tests");
    CHECK(x["signingCertificateInfo"]["sha256Thumbprint"]
          == enrollment::upper_hex(enrollment::sha256_of(inter.der())));
  }
}

TEST_CASE("custom allocation: a 500 from the webhook fails the device with DPS's message") {
  const std::string id = "webhook-500";
  check_failed(register_via(id, "/fail500"), "Custom allocation failed with status code: 500");
  // retries = 1: asked twice.
  CHECK(fx().handler.calls_to("/fail500").size() == 2);
  // Nothing assigned: the record shows the failure.
  auto reg = fx().prov.service("GET", "/registrations/" + id);
  REQUIRE(reg.status == 200);
  CHECK(test::parse_json(reg.body)["status"] == "failed");
}

TEST_CASE("custom allocation: a webhook that does not answer in time") {
  check_failed(register_via("webhook-slow", "/slow"),
               "Custom allocation failed: the webhook at localhost:"
                 + std::to_string(fx().webhook.port())
                 + " did not answer in time (2 attempts)");
  CHECK(fx().handler.calls_to("/slow").size() == 2);
}

TEST_CASE("custom allocation: an enrollment's own retries replace the instance's") {
  // [custom_allocation] retries = 1 (two calls); this enrollment says none.
  const std::string id = "webhook-own-retries";
  put_individual(id, "/fail500-own", fx().prov, {{"retries", 0}});
  check_failed(register_with(id, key, nullptr), "Custom allocation failed with status code: 500");
  CHECK(fx().handler.calls_to("/fail500-own").size() == 1);
  // And more than the instance's: 3 retries, four calls.
  const std::string more = "webhook-more-retries";
  put_individual(more, "/fail500-more", fx().prov, {{"retries", 3}});
  check_failed(register_with(more, key, nullptr), "Custom allocation failed with status code: 500");
  CHECK(fx().handler.calls_to("/fail500-more").size() == 4);
}

TEST_CASE("custom allocation: an enrollment's own timeout replaces the instance's") {
  // The webhook answers after 1.5 s. The instance's 1 s timeout gives up
  // (twice, retries = 1); the enrollment's 10 s waits for the answer.
  const std::string quick = "webhook-default-timeout";
  put_individual(quick, "/late1500");
  check_failed(register_with(quick, key, nullptr),
               "Custom allocation failed: the webhook at localhost:"
                 + std::to_string(fx().webhook.port())
                 + " did not answer in time (2 attempts)");
  const std::string patient = "webhook-own-timeout";
  put_individual(patient, "/late1500", fx().prov, {{"timeoutMs", 10000}, {"retries", 0}});
  auto op = register_with(patient, key, nullptr);
  REQUIRE_MESSAGE(op["status"] == "assigned", op.dump());
  CHECK(op["registrationState"]["assignedHub"] == hub_a);
  CHECK(op["registrationState"]["payload"] == json{{"late", true}});
  // A short one of its own: one attempt, the enrollment's own message.
  const std::string brief = "webhook-short-timeout";
  put_individual(brief, "/slow-short", fx().prov, {{"timeoutMs", 200}, {"retries", 0}});
  check_failed(register_with(brief, key, nullptr),
               "Custom allocation failed: the webhook at localhost:"
                 + std::to_string(fx().webhook.port())
                 + " did not answer in time (1 attempt)");
  CHECK(fx().handler.calls_to("/slow-short").size() == 1);
  // The limits are part of the enrollment as GET shows it.
  auto got = fx().prov.service("GET", "/enrollments/" + patient);
  REQUIRE(got.status == 200);
  CHECK(test::parse_json(got.body)["customAllocationDefinition"]["timeoutMs"] == 10000);
}

TEST_CASE("custom allocation: bad webhook limits are refused with 400005, nothing stored") {
  for (const auto& [limits, message] : std::vector<std::pair<json, std::string>>{
         {{{"timeoutMs", 99}}, "customAllocationDefinition.timeoutMs: must be between 100 and 600000"},
         {{{"timeoutMs", 600001}}, "customAllocationDefinition.timeoutMs: must be between 100 and 600000"},
         {{{"timeoutMs", "5s"}}, "customAllocationDefinition.timeoutMs: must be an integer (got string)"},
         {{{"timeoutMs", 1.5}}, "customAllocationDefinition.timeoutMs: must be an integer (got number)"},
         {{{"retries", -1}}, "customAllocationDefinition.retries: must be between 0 and 10"},
         {{{"retries", 11}}, "customAllocationDefinition.retries: must be between 0 and 10"},
         {{{"retries", true}}, "customAllocationDefinition.retries: must be an integer (got boolean)"}}) {
    const std::string id = "webhook-bad-limits";
    json def = custom_definition("/ok");
    def.update(limits);
    json body{{"registrationId", id},
              {"attestation", {{"type", "symmetricKey"},
                               {"symmetricKey", {{"primaryKey", key}, {"secondaryKey", key}}}}},
              {"allocationPolicy", "custom"},
              {"customAllocationDefinition", def}};
    auto r = fx().prov.service("PUT", "/enrollments/" + id, body.dump());
    CHECK_MESSAGE(r.status == 400, r.body);
    auto j = test::parse_json(r.body);
    CHECK_MESSAGE(j.value("errorCode", 0) == 400005, r.body);
    CHECK_MESSAGE(j.value("message", "") == message, r.body);
    CHECK(fx().prov.service("GET", "/enrollments/" + id).status == 404);
  }
}

TEST_CASE("custom allocation: an answer that is not JSON") {
  check_failed(register_via("webhook-malformed", "/malformed"),
               "Custom allocation failed: the webhook answered status code 200 with a body "
               "that is not JSON");
}

TEST_CASE("custom allocation: a hub that is not linked") {
  check_failed(register_via("webhook-unlinked", "/unlinked"),
               "Custom allocation failed: the webhook answered status code 200 with "
               "iotHubHostName 'hub-z.example.net', which is not one of the linkedHubs "
               "(hub-a.example.net, hub-b.example.net)");
}

TEST_CASE("custom allocation: a payload that is not an object") {
  check_failed(register_via("webhook-payload-string", "/payload-string"),
               "Custom allocation failed: the webhook answered status code 200 with a "
               "payload that is a string, not a JSON object");
}

TEST_CASE("custom allocation: a webhook nobody listens on") {
  const std::string id = "webhook-unreachable";
  json body{{"registrationId", id},
            {"attestation", {{"type", "symmetricKey"},
                             {"symmetricKey", {{"primaryKey", key}, {"secondaryKey", key}}}}},
            {"allocationPolicy", "custom"},
            {"customAllocationDefinition",
             {{"webhookUrl", "https://127.0.0.1:1/x?code=secret"}, {"apiVersion", "2021-10-01"}}}};
  auto r = fx().prov.service("PUT", "/enrollments/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto op = register_with(id, key, nullptr);
  CHECK(op["status"] == "failed");
  CHECK(op["registrationState"]["errorCode"] == 400207);
  const std::string msg = op["registrationState"].value("errorMessage", "");
  CHECK(msg.rfind("Custom allocation failed: the webhook at 127.0.0.1:1 could not be reached "
                  "(2 attempts): ",
                  0)
        == 0);
  CHECK(msg.find("secret") == std::string::npos); // the function key never shows
}

TEST_CASE("custom allocation: the CLI creates a custom enrollment with its webhook and limits") {
  const std::string id = "webhook-cli-1";
  const std::string common = " --data-dir " + fx().prov.data_dir();
  int rc = -1;
  auto out = test::run_cli("enrollment create " + id + " --primary-key " + key + " --secondary-key "
                       + key + " --policy custom --webhook-url '" + fx().base
                       + "/fail500-cli?code=secret' --webhook-retries 0 --webhook-timeout-ms 2000"
                       + common,
                     rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK_MESSAGE(out.find("custom") != std::string::npos, out);
  CHECK_MESSAGE(out.find("/fail500-cli?...") != std::string::npos, out);
  CHECK_MESSAGE(out.find("secret") == std::string::npos, out); // the key is not printed
  CHECK_MESSAGE(out.find("timeoutMs=2000 retries=0") != std::string::npos, out);
  auto got = fx().prov.service("GET", "/enrollments/" + id);
  REQUIRE(got.status == 200);
  auto doc = test::parse_json(got.body);
  CHECK(doc["allocationPolicy"] == "custom");
  CHECK(doc["customAllocationDefinition"]["webhookUrl"] == fx().base + "/fail500-cli?code=secret");
  CHECK(doc["customAllocationDefinition"]["apiVersion"] == "2021-10-01");
  CHECK(doc["customAllocationDefinition"]["retries"] == 0);
  // The device's registration asks that webhook, once (retries 0).
  check_failed(register_with(id, key, nullptr), "Custom allocation failed with status code: 500");
  auto calls = fx().handler.calls_to("/fail500-cli");
  REQUIRE(calls.size() == 1);
  CHECK(calls[0].query_code == "secret");

  // Without a URL: refused before anything is sent.
  out = test::run_cli("enrollment create webhook-cli-2 --policy custom" + common, rc);
  CHECK(rc != 0);
  CHECK_MESSAGE(out.find("--policy custom needs --webhook-url") != std::string::npos, out);
  CHECK(fx().prov.service("GET", "/enrollments/webhook-cli-2").status == 404);
  // A limit out of range: the server's 400005, nothing stored.
  out = test::run_cli("enrollment create webhook-cli-3 --policy custom --webhook-url " + fx().base
                  + "/ok --webhook-retries 11" + common,
                rc);
  CHECK(rc != 0);
  CHECK_MESSAGE(out.find("customAllocationDefinition.retries: must be between 0 and 10")
                  != std::string::npos,
                out);
  CHECK(fx().prov.service("GET", "/enrollments/webhook-cli-3").status == 404);
}

TEST_CASE("custom allocation over Kafka, stages not fused: the payload and twin cross the topics") {
  test::kafka_fixture kfx;
  kfx.fuse_stages = false; // registration.allocated goes through Kafka too
  test::server_process s;
  const std::string ca = fx().webhook.ca_file();
  REQUIRE_MESSAGE(!s.start(test::with_device_api(kfx.server_config(), "register_wait_ms = 5000")
                             + "[custom_allocation]\nca_file = \"" + ca + "\"\n",
                           kfx.dir),
                  s.log());
  const std::string id = "webhook-kafka-1";
  put_individual(id, "/ok", s);
  auto op = register_with(id, key, json{{"model", "k1"}}, s);
  REQUIRE_MESSAGE(op["status"] == "assigned", op.dump());
  CHECK(op["registrationState"]["assignedHub"] == hub_b);
  CHECK(op["registrationState"]["payload"] == json{{"greeting", "hello"}, {"echo", {{"model", "k1"}}}});
  const std::string op_id = op["operationId"];
  bool on_allocated = false;
  for (const auto& r : test::read_topic(kfx.cfg, "dps.registration.allocated", 1))
    if (r.operation_id == op_id) {
      on_allocated = true;
      CHECK(json::parse(json::parse(r.value).value("returnedPayload", "null"))
            == op["registrationState"]["payload"]);
    }
  CHECK(on_allocated);
  bool assigned = false;
  for (const auto& r : test::read_topic(kfx.cfg, "dps.device.assigned", 1))
    if (r.operation_id == op_id) {
      assigned = true;
      CHECK(json::parse(r.value)["data"]["initialTwin"]["tags"] == json{{"from", "webhook"}});
    }
  CHECK(assigned);
  // The record, as another process reads it from the shared table.
  auto reg = s.service("GET", "/registrations/" + id);
  REQUIRE(reg.status == 200);
  CHECK(test::parse_json(reg.body)["payload"] == op["registrationState"]["payload"]);
  CHECK(s.stop() == 0);
}
