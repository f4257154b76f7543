#include <doctest/doctest.h>

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/allocation/custom_webhook.hpp"

using namespace prov;
using namespace prov::allocation;
using nlohmann::json;

namespace {

const std::vector<std::string> linked{"hub-a.example.net", "hub-b.example.net"};

webhook_reply answered(int status, std::string body) {
  webhook_reply r;
  r.status = status;
  r.body = std::move(body);
  r.attempts = 1;
  return r;
}

error read(const webhook_reply& r, decision& d) {
  return read_webhook_reply(r, linked, "hooks.example.net", d);
}

} // namespace

TEST_CASE("webhook answers: the hub (in the linked hub's spelling), twin and payload") {
  decision d;
  auto err = read(answered(200, R"({"iotHubHostName":"HUB-B.example.net",)"
                                R"("initialTwin":{"tags":{"a":1}},"payload":{"p":true}})"),
                  d);
  REQUIRE(err.ok());
  CHECK(d.hub == "hub-b.example.net");
  CHECK(json::parse(d.initial_twin_json) == json{{"tags", {{"a", 1}}}});
  CHECK(json::parse(d.payload_json) == json{{"p", true}});
  // The table's spelling, nulls as absent.
  REQUIRE(read(answered(201, R"({"iotHubHostname":"hub-a.example.net","payload":null})"), d).ok());
  CHECK(d.hub == "hub-a.example.net");
  CHECK(d.payload_json.empty());
  CHECK(d.initial_twin_json.empty());
}

TEST_CASE("webhook answers that fail the device: 400207, naming the status") {
  decision d;
  auto check = [&](const webhook_reply& r, const std::string& message) {
    auto err = read(r, d);
    CHECK(err.code == error_code::custom_allocation_failed);
    CHECK(err.message == message);
  };
  check(answered(500, "{}"), "Custom allocation failed with status code: 500");
  check(answered(404, ""), "Custom allocation failed with status code: 404");
  check(answered(200, "nope"),
        "Custom allocation failed: the webhook answered status code 200 with a body that is "
        "not JSON");
  check(answered(200, "[]"), "Custom allocation failed: the webhook answered status code 200 "
                             "with a JSON array, not an AllocationResponse object");
  check(answered(200, "{}"), "Custom allocation failed: the webhook answered status code 200 "
                             "without an iotHubHostName string");
  check(answered(200, R"({"iotHubHostName":"elsewhere"})"),
        "Custom allocation failed: the webhook answered status code 200 with iotHubHostName "
        "'elsewhere', which is not one of the linkedHubs (hub-a.example.net, hub-b.example.net)");
  check(answered(200, R"({"iotHubHostName":"hub-a.example.net","payload":[1]})"),
        "Custom allocation failed: the webhook answered status code 200 with a payload that is "
        "a array, not a JSON object");
  check(answered(200, R"({"iotHubHostName":"hub-a.example.net","initialTwin":"x"})"),
        "Custom allocation failed: the webhook answered status code 200 with an initialTwin "
        "that is a string, not a JSON object");
  webhook_reply timeout;
  timeout.err = {error_code::request_timeout, "timed out"};
  timeout.attempts = 3;
  check(timeout, "Custom allocation failed: the webhook at hooks.example.net did not answer in "
                 "time (3 attempts)");
  webhook_reply refused;
  refused.err = {error_code::unavailable, "connection refused"};
  refused.attempts = 1;
  check(refused, "Custom allocation failed: the webhook at hooks.example.net could not be "
                 "reached (1 attempt): connection refused");
}

TEST_CASE("webhook_host drops the path and the query (a function key)") {
  CHECK(webhook_host("https://fn.example.net/api/alloc?code=secret") == "fn.example.net");
  CHECK(webhook_host("https://127.0.0.1:8443?code=x") == "127.0.0.1:8443");
  CHECK(webhook_host("http://x") == "");
}

TEST_CASE("the policy posts DPS's AllocationRequest and answers from the reply") {
  auto view = std::make_shared<enrollment::enrollment_view>();
  view->k = enrollment::kind::group;
  view->id = "g1";
  view->attestation = enrollment::symmetric_key_attestation{"k1", "k2"};
  view->allocation = allocation_policy::custom;
  view->webhook_url = "https://hooks.example.net/a?code=k";
  view->public_json = R"({"enrollmentGroupId":"g1","attestation":{"type":"symmetricKey","symmetricKey":{}}})";
  request in;
  in.registration_id = "dev-1";
  in.enrollment = view;
  in.candidates = {{"hub-a.example.net", 1, true, ""}, {"hub-off.example.net", 1, false, ""},
                   {"hub-b.example.net", 1, true, ""}};
  in.linked_hubs = 3;
  in.payload_json = R"({"m":1})";
  in.current_hub = "hub-a.example.net";
  in.current_device_id = "dev-1";

  webhook_post sent;
  std::function<void(webhook_reply)> reply;
  custom_policy p([&](webhook_post post, std::function<void(webhook_reply)> done) {
                    sent = std::move(post);
                    reply = std::move(done);
                  },
                  webhook_limits{std::chrono::seconds(1), 2, std::chrono::milliseconds(100)});
  struct capture final : answer {
    int calls = 0;
    error err;
    decision d;
    void decided(error e, decision dd) override {
      ++calls;
      err = std::move(e);
      d = std::move(dd);
    }
  };
  auto got = std::make_shared<capture>();
  p.allocate(in, got);
  CHECK(got->calls == 0); // answered later, from the poster's thread
  CHECK(sent.url == view->webhook_url);
  CHECK(json::parse(sent.body)
        == json{{"enrollmentGroup", json::parse(view->public_json)},
                {"deviceRuntimeContext", {{"registrationId", "dev-1"},
                                          {"currentIotHubHostName", "hub-a.example.net"},
                                          {"currentDeviceId", "dev-1"},
                                          {"symmetricKey", json::object()},
                                          {"payload", {{"m", 1}}}}},
                // apply_allocation_policy = false keeps a hub out, as for hashed
                {"linkedHubs", {"hub-a.example.net", "hub-b.example.net"}}});
  REQUIRE(reply);
  reply(answered(200, R"({"iotHubHostName":"hub-b.example.net"})"));
  CHECK(got->calls == 1);
  CHECK(got->err.ok());
  CHECK(got->d.hub == "hub-b.example.net");
  // The off hub is not offered, so the webhook may not choose it.
  auto again = std::make_shared<capture>();
  p.allocate(in, again);
  reply(answered(200, R"({"iotHubHostName":"hub-off.example.net"})"));
  CHECK(again->err.code == error_code::custom_allocation_failed);
}

TEST_CASE("an enrollment's own webhook timeout and retries replace the defaults") {
  const webhook_limits defaults{std::chrono::seconds(1), 2, std::chrono::milliseconds(100)};
  // 3 attempts of 2 x 1 s, backoffs 100 + 200 ms, plus 5 s.
  CHECK(webhook_budget(defaults) == std::chrono::milliseconds(6000 + 300 + 5000));
  auto view = std::make_shared<enrollment::enrollment_view>();
  view->id = "dev-1";
  view->attestation = enrollment::symmetric_key_attestation{"k1", "k2"};
  view->allocation = allocation_policy::custom;
  view->webhook_url = "https://hooks.example.net/a";
  view->public_json = R"({"registrationId":"dev-1"})";
  request in;
  in.registration_id = "dev-1";
  in.enrollment = view;
  in.candidates = {{"hub-a.example.net", 1, true, ""}};
  in.linked_hubs = 1;
  struct ignore final : answer {
    void decided(error, decision) override {}
  };
  std::vector<webhook_post> sent;
  custom_policy p([&](webhook_post post, std::function<void(webhook_reply)>) {
                    sent.push_back(std::move(post));
                  },
                  defaults);
  p.allocate(in, std::make_shared<ignore>());
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].timeout == std::chrono::seconds(1));
  CHECK(sent[0].retries == 2);
  CHECK(p.deadline_for(in) == webhook_budget(defaults));

  view->webhook_timeout_ms = 250;
  view->webhook_retries = 0;
  p.allocate(in, std::make_shared<ignore>());
  REQUIRE(sent.size() == 2);
  CHECK(sent[1].timeout == std::chrono::milliseconds(250));
  CHECK(sent[1].retries == 0);
  CHECK(p.deadline_for(in) == std::chrono::milliseconds(500 + 5000));
  CHECK(p.deadline() == webhook_budget(defaults)); // the instance's stays
}

TEST_CASE("the webhook's deviceRuntimeContext.x509: the certificate details the stage has, the "
          "group's id; {} when it has none") {
  auto view = std::make_shared<enrollment::enrollment_view>();
  view->k = enrollment::kind::group;
  view->id = "x509-group";
  view->attestation = enrollment::x509_attestation{};
  view->public_json = R"({"enrollmentGroupId":"x509-group"})";
  request in;
  in.registration_id = "dev-x";
  in.enrollment = view;
  const std::string info =
    R"({"certificateInfo":{"subjectName":"CN=dev-x"},"signingCertificateInfo":{"subjectName":"CN=ca"}})";
  in.x509_json = info;
  auto body = json::parse(webhook_request_body(in, linked));
  CHECK(body["deviceRuntimeContext"]
        == json{{"registrationId", "dev-x"},
                {"x509", {{"certificateInfo", {{"subjectName", "CN=dev-x"}}},
                          {"signingCertificateInfo", {{"subjectName", "CN=ca"}}},
                          {"enrollmentGroupId", "x509-group"}}}});
  // An individual enrollment: no group id.
  view->k = enrollment::kind::individual;
  view->id = "dev-x";
  body = json::parse(webhook_request_body(in, linked));
  CHECK(body["deviceRuntimeContext"]["x509"]
        == json{{"certificateInfo", {{"subjectName", "CN=dev-x"}}},
                {"signingCertificateInfo", {{"subjectName", "CN=ca"}}}});
  // Nothing (or, against expectations, not an object) from attestation: {}.
  for (const char* none : {"", "[1]", "not json"}) {
    in.x509_json = none;
    body = json::parse(webhook_request_body(in, linked));
    CHECK(body["deviceRuntimeContext"]["x509"] == json::object());
  }
}
