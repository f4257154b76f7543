// Metrics, health endpoints and diagnostic logs against the real provisiond
// process: counters must move by exactly the number of registrations made.

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <thread>

#include "messages/crypto.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/metrics_scrape.hpp"
#include "tests/support/server_process.hpp"

using namespace prov;
using nlohmann::json;
using test::http;
using test::metrics_addr;
using test::scrape;
using test::sum;

namespace {

const char* const hub_a = "hub-a.example.net";
const char* const hub_b = "hub-b.example.net";

std::string config_with_metrics(const std::string& dir, const std::string& log_file) {
  return "data_dir = \"" + dir + "\"\n"
         "[device_api]\nlisten = \"127.0.0.1:0\"\nretry_after_seconds = 1\n"
         // Long enough that every register here is answered 200 with its outcome.
         "register_wait_ms = 5000\n"
         "[metrics]\nlisten = \"127.0.0.1:0\"\n"
         "[log]\nlevel = \"info\"\nfile = \"" + log_file + "\"\n"
         "[[hubs]]\nhostname = \"" + std::string(hub_a) + "\"\n"
         "[[hubs]]\nhostname = \"" + std::string(hub_b) + "\"\n";
}

} // namespace

TEST_CASE("ops listener: healthz, readyz, metrics; unknown paths and methods refused") {
  auto dir = test::make_temp_dir("provisiond-metrics");
  test::server_process s;
  REQUIRE(!s.start(config_with_metrics(dir, dir + "/ops.log"), dir));
  auto addr = metrics_addr(s);
  REQUIRE(!addr.empty());
  auto h = http(addr, "GET", "/healthz");
  CHECK(h.status == 200);
  CHECK(h.body == R"({"status":"ok"})");
  auto r = http(addr, "GET", "/readyz");
  CHECK(r.status == 200);
  CHECK(r.body == R"({"status":"ready"})");
  CHECK(http(addr, "GET", "/nope").status == 404);
  CHECK(http(addr, "POST", "/metrics").status == 405);
  auto m = http(addr, "GET", "/metrics");
  CHECK(m.status == 200);
  CHECK(m.head.find("text/plain; version=0.0.4") != std::string::npos);
  CHECK(m.body.find("# TYPE dps_registration_attempts_total counter") != std::string::npos);
  // Every linked hub is there from the start, at zero.
  CHECK(m.body.find("dps_device_assignments_total{hub=\"hub-b.example.net\"} 0")
        != std::string::npos);
  CHECK(m.body.find("dps_stage_queue_depth{stage=\"allocation\"} 0") != std::string::npos);
  CHECK(m.body.find("process_resident_memory_bytes") != std::string::npos);
  CHECK(s.stop() == 0);
  test::remove_tree(dir);
}

TEST_CASE("counters move by exactly the registrations made; logs carry no secrets") {
  auto dir = test::make_temp_dir("provisiond-metrics");
  auto log_file = dir + "/ops.log";
  test::server_process s;
  REQUIRE(!s.start(config_with_metrics(dir, log_file), dir));
  auto addr = metrics_addr(s);
  auto before = scrape(addr);

  auto group_key = crypto::generate_key();
  json group{{"enrollmentGroupId", "metrics-group"},
             {"attestation",
              {{"type", "symmetricKey"},
               {"symmetricKey", {{"primaryKey", group_key}, {"secondaryKey", ""}}}}}};
  auto gr = s.service("PUT", "/enrollmentGroups/metrics-group", group.dump());
  REQUIRE_MESSAGE(gr.status == 200, gr.body);

  constexpr int good = 24;
  constexpr int bad = 3;
  auto c = s.client();
  for (int i = 0; i < good; ++i) {
    auto id = "metrics-dev-" + std::to_string(i);
    int status = 0;
    auto op = test::register_device(c, s, id, *crypto::derive_device_key(group_key, id),
                                    status, 10);
    REQUIRE_MESSAGE(op.value("status", "") == "assigned", op.dump());
  }
  for (int i = 0; i < bad; ++i) {
    auto id = "metrics-bad-" + std::to_string(i);
    net::http_headers hh;
    hh.set("Content-Type", "application/json");
    hh.set("Authorization", s.device_auth(id, crypto::generate_key()));
    net::https_response resp;
    REQUIRE(!c.request("PUT",
                       "/" + s.id_scope() + "/registrations/" + id
                         + "/register?api-version=2021-06-01",
                       hh, json{{"registrationId", id}}.dump(), resp));
    CHECK(resp.status == 401);
  }

  // Counters of the terminal stage move just after the record is durable; a
  // poll can see "assigned" a moment earlier. Wait (bounded) for the total.
  std::map<std::string, double> after;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  do {
    after = scrape(addr);
    if (sum(after, "dps_device_assignments_total") - sum(before, "dps_device_assignments_total")
        >= good)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  } while (std::chrono::steady_clock::now() < deadline);
  std::this_thread::sleep_for(std::chrono::milliseconds(100)); // nothing more may arrive
  after = scrape(addr);
  auto delta = [&](const std::string& name, std::initializer_list<std::string> f = {}) {
    return sum(after, name, f) - sum(before, name, f);
  };

  CHECK(delta("dps_device_assignments_total") == good);
  CHECK(delta("dps_device_assignments_total", {"hub=\"hub-a.example.net\""})
        + delta("dps_device_assignments_total", {"hub=\"hub-b.example.net\""})
        == good);
  // Per hub, registration attempts (assigned) and assignments agree.
  for (const char* hub : {hub_a, hub_b}) {
    auto label = std::string("hub=\"") + hub + "\"";
    CHECK(delta("dps_registration_attempts_total", {"status=\"assigned\"", label})
          == delta("dps_device_assignments_total", {label}));
  }
  CHECK(delta("dps_registration_attempts_total", {"status=\"assigned\"", "protocol=\"http\""})
        == good);
  CHECK(delta("dps_registration_attempts_total", {"status=\"rejected\""}) == bad);
  CHECK(delta("dps_registration_attempts_total", {"status=\"failed\""}) == 0);
  CHECK(delta("dps_attestation_attempts_total",
              {"status=\"success\"", "attestation=\"symmetricKey\"", "protocol=\"http\""})
        == good);
  CHECK(delta("dps_attestation_attempts_total", {"status=\"failure\""}) == bad);
  const std::string reg_route =
    "route=\"PUT /{idScope}/registrations/{registrationId}/register\"";
  CHECK(delta("dps_http_requests_total", {reg_route, "status=\"200\""}) == good);
  CHECK(delta("dps_http_requests_total", {reg_route, "status=\"202\""}) == 0);
  CHECK(delta("dps_http_requests_total", {reg_route, "status=\"401\""}) == bad);
  CHECK(delta("dps_http_request_duration_seconds_count", {reg_route}) == good + bad);
  CHECK(delta("dps_http_requests_total",
              {"route=\"PUT /enrollmentGroups/{id}\"", "status=\"200\""})
        == 1);
  CHECK(delta("dps_stage_duration_seconds_count", {"stage=\"attestation\""}) == good + bad);
  // Answered 200 with the outcome: the accept was deferred into the
  // terminal commit, nothing recorded it before (registration_actor.cpp).
  CHECK(delta("dps_stage_duration_seconds_count", {"stage=\"commit\""}) == 0);
  CHECK(delta("dps_stage_duration_seconds_count", {"stage=\"allocation\""}) == good);
  CHECK(delta("dps_stage_duration_seconds_count", {"stage=\"configuration\""}) == good);
  CHECK(delta("dps_operation_duration_seconds_count", {"status=\"assigned\""}) == good);
  for (const char* st : {"attestation", "commit", "allocation", "configuration"})
    CHECK(sum(after, "dps_stage_queue_depth", {std::string("stage=\"") + st + "\""}) == 0);
  CHECK(sum(after, "dps_operations_inflight") == 0);
  CHECK(delta("dps_storage_commit_duration_seconds_count") >= 1);
  CHECK(delta("dps_storage_commit_batches_sum") == good); // one commit each: the terminal one
  CHECK(sum(after, "dps_storage_estimated_keys", {"column_family=\"registrations\""}) >= 1);

  // Every metric the example Grafana dashboard queries is exported; the
  // Kafka-mode ones (dps_kafka_*) are checked by it_kafka_engine_test, the
  // hub health ones (dps_hub_*, once a hub was probed) by it_linked_hubs_test.
  CHECK(test::check_dashboard_metrics_except(http(addr, "GET", "/metrics").body,
                                             {"dps_kafka_", "dps_hub_"})
        > 10);

  // Diagnostic log: one JSON line per operation, no secrets.
  CHECK(s.stop() == 0);
  std::ifstream in(log_file);
  REQUIRE(in);
  std::string line;
  int device_200 = 0, device_401 = 0, upserts = 0;
  while (std::getline(in, line)) {
    auto j = json::parse(line, nullptr, false);
    REQUIRE_MESSAGE(!j.is_discarded(), "log line is not JSON: " << line);
    REQUIRE(j.contains("time"));
    CHECK(line.find("SharedAccessSignature") == std::string::npos);
    CHECK(line.find("sig=") == std::string::npos);
    CHECK(line.find(group_key) == std::string::npos);
    if (j.value("category", "") == "DeviceOperations"
        && j.value("operationName", "") == "DeviceRegistration") {
      CHECK(j.at("callerIpAddress") == "127.0.0.XXX");
      CHECK(j.at("properties").at("type") == "Registration");
      CHECK(j.at("properties").at("protocol") == "Http");
      CHECK(!j.at("correlationId").get<std::string>().empty());
      if (j.at("resultSignature") == 200) {
        ++device_200;
        CHECK(j.at("resultType") == "Success");
      }
      if (j.at("resultSignature") == 401) {
        ++device_401;
        CHECK(j.at("resultType") == "ClientError");
        CHECK(j.at("errorCode") == "401002");
        CHECK(!j.at("resultDescription").get<std::string>().empty());
      }
    }
    if (j.value("category", "") == "ServiceOperations" && j.value("operationName", "") == "Upsert"
        && j.at("properties").at("id") == "metrics-group")
      ++upserts;
  }
  CHECK(device_200 == good);
  CHECK(device_401 == bad);
  CHECK(upserts == 1);
  test::remove_tree(dir);
}

TEST_CASE("a service sub-path is labelled as it is served, percent-encoded or not") {
  // The route label and the dispatch read the same decoded segments: an
  // encoded `query` is served as the query, so it is counted as one too.
  auto dir = test::make_temp_dir("provisiond-metrics-path");
  test::server_process s;
  REQUIRE(!s.start(config_with_metrics(dir, dir + "/ops.log"), dir));
  auto addr = metrics_addr(s);
  auto before = scrape(addr);
  const std::string q = R"({"query":"*"})";
  for (const char* path : {"/enrollments/query", "/enrollments/%71uery", "/enrollments/QUER%59"}) {
    auto r = s.service("POST", path, q);
    CHECK_MESSAGE(r.status == 200, path << ": " << r.body);
  }
  for (const char* path : {"/registrations/some-group/query",
                           "/registrations/some-group/%71uery"}) {
    auto r = s.service("POST", path, q);
    CHECK_MESSAGE(r.status == 200, path << ": " << r.body);
  }
  // Under the other roots `query` is an id, encoded or not: nothing of that
  // name exists, so each call is a 404 counted under its {id} route.
  for (const char* path : {"/certificates/query", "/certificates/%71uery"}) {
    auto r = s.service("GET", path);
    CHECK_MESSAGE(r.status == 404, path << ": " << r.body);
  }
  for (const char* path : {"/registrations/query", "/registrations/%71uery"}) {
    auto r = s.service("DELETE", path);
    CHECK_MESSAGE(r.status == 404, path << ": " << r.body);
  }
  {
    auto r = s.service("GET", "/linkedHubs/query");
    CHECK_MESSAGE(r.status == 404, r.body);
  }
  auto after = scrape(addr);
  auto delta = [&](std::initializer_list<std::string> f) {
    return sum(after, "dps_http_requests_total", f) - sum(before, "dps_http_requests_total", f);
  };
  CHECK(delta({"route=\"POST /enrollments/query\"", "status=\"200\""}) == 3);
  CHECK(delta({"route=\"POST /enrollments/{id}\""}) == 0);
  CHECK(delta({"route=\"POST /registrations/{id}/query\"", "status=\"200\""}) == 2);
  CHECK(delta({"route=\"GET /certificates/{id}\"", "status=\"404\""}) == 2);
  CHECK(delta({"route=\"DELETE /registrations/{id}\"", "status=\"404\""}) == 2);
  CHECK(delta({"route=\"GET /linkedHubs/{id}\"", "status=\"404\""}) == 1);
  for (const char* root : {"certificates", "registrations", "linkedHubs"})
    CHECK_MESSAGE(delta({std::string("/") + root + "/query\""}) == 0, std::string(root));
  CHECK(delta({"route=\"other\""}) == 0);
  CHECK(s.stop() == 0);
  test::remove_tree(dir);
}
