// Distributed mode in one process: the real provisiond with [kafka] brokers
// pointing at a librdkafka mock cluster started inside this test process, so
// the cluster (topics, committed offsets) outlives a kill -9 of the server.

#include <doctest/doctest.h>

#include <librdkafka/rdkafka.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "messages/crypto.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/kafka_it.hpp"
#include "tests/support/metrics_scrape.hpp"
#include "tests/support/server_process.hpp"

using namespace prov;
using nlohmann::json;
namespace kafka = prov::bus::kafka;

namespace {

const std::string group_key = crypto::generate_key();
using test::kafka_fixture;
using test::read_topic;
using test::produce_raw;

std::string device_key(const std::string& reg_id) {
  return *crypto::derive_device_key(group_key, reg_id);
}

void create_group(const test::server_process& s, const std::string& id) {
  test::create_group(s, id, group_key);
}

/// Registers one device and waits for it: the first consumer-group joins take
/// about 3 s on the mock, and a test should only start once events really flow
/// through every stage's consumer.
void warm_up(const test::server_process& s, const std::string& id) {
  auto c = s.client();
  int status = 0;
  auto res = test::register_device(c, s, id, device_key(id), status, 50);
  REQUIRE_MESSAGE(res.value("status", "") == "assigned", res.dump());
}

using test::all_assignments;

/// A registration.requested record as a direct publisher writes it
/// (docs/events.md): key = registration id.
std::pair<std::string, std::string> requested(const test::server_process& s,
                                              const std::string& id,
                                              const std::string& authorization,
                                              const std::string& operation_id = {}) {
  json v{{"registrationId", id}, {"idScope", s.id_scope()}, {"payload", {{"line", 7}}}};
  if (!authorization.empty())
    v["authorization"] = authorization;
  if (!operation_id.empty())
    v["operationId"] = operation_id;
  return {id, v.dump()};
}

/// registration.completed records by registration id.
std::map<std::string, std::vector<json>> completed_by_id(const std::vector<test::kafka_record>& rs) {
  std::map<std::string, std::vector<json>> out;
  for (const auto& r : rs) {
    auto j = json::parse(r.value, nullptr, false);
    REQUIRE_MESSAGE(j.is_object(), r.value);
    out[j.value("registrationId", "")].push_back(j);
  }
  return out;
}

/// device.assigned records (CloudEvents) per operation id (ce_id).
std::map<std::string, int> assigned_per_op(const std::vector<test::kafka_record>& rs) {
  std::map<std::string, int> out;
  for (const auto& r : rs)
    ++out[r.operation_id];
  return out;
}

} // namespace

TEST_SUITE("kafka_engine") {

TEST_CASE("500 devices over HTTPS, stages over Kafka: each assigned once, on Kafka once") {
  kafka_fixture fx; // fused stages, the default; the test below covers the topics
  test::server_process s;
  REQUIRE_MESSAGE(!s.start(test::with_metrics(fx.server_config()), fx.dir), s.log());
  create_group(s, "kafka-group");
  warm_up(s, "kwarm");
  constexpr int threads = 50, per_thread = 10, total = threads * per_thread;
  std::atomic<int> failures{0};
  std::mutex mtx;
  std::map<std::string, std::string> op_of; // registration id -> operation id
  const auto started = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      auto c = s.client();
      for (int i = 0; i < per_thread; ++i) {
        auto id = "kdev-" + std::to_string(t) + "-" + std::to_string(i);
        int status = 0;
        auto res = test::register_device(c, s, id, device_key(id), status, 50);
        std::lock_guard<std::mutex> g{mtx};
        if (status == 200 && res.value("status", "") == "assigned") {
          op_of[id] = res.value("operationId", "");
        } else {
          ++failures;
          MESSAGE("device " << id << " status " << status << ": " << res.dump());
        }
      }
    });
  for (auto& th : pool)
    th.join();
  const double secs =
    std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  MESSAGE(total << " devices assigned through Kafka in " << secs << " s ("
                << static_cast<int>(total / secs) << " devices/s)");
  REQUIRE(failures.load() == 0);
  REQUIRE(op_of.size() == static_cast<size_t>(total));

  // registration.attested carried every operation: Kafka was used, not the
  // in-process bus.
  auto attested = read_topic(fx.cfg, "dps.registration.attested", total);
  std::set<std::string> attested_ops;
  for (auto& r : attested)
    attested_ops.insert(r.operation_id);
  CHECK(attested_ops.size() == static_cast<size_t>(total + 1)); // + the warm-up device
  // ...and allocation handed every one to configuration in process
  // (kafka.fuse_stages): registration.allocated stayed empty.
  CHECK(read_topic(fx.cfg, "dps.registration.allocated", 0, std::chrono::milliseconds(500))
          .empty());

  // device.assigned: exactly one event per operation.
  auto assigned = read_topic(fx.cfg, "dps.device.assigned", total);
  std::map<std::string, int> per_op;
  for (auto& r : assigned)
    ++per_op[r.operation_id];
  CHECK(assigned.size() == static_cast<size_t>(total + 1)); // + the warm-up device
  for (auto& [id, op] : op_of)
    CHECK_MESSAGE(per_op[op] == 1, id << " / " << op << " on device.assigned " << per_op[op]
                                      << " times");
  // Each Kafka record is the outbox's CloudEvent except for the outbox's own
  // `sequence` (Kafka offsets order records), keyed by device id, with the
  // ce_* attributes as headers too.
  auto outbox = all_assignments(s);
  CHECK(outbox.size() == static_cast<size_t>(total + 1));
  std::map<std::string, json> outbox_by_op;
  for (auto& e : outbox)
    outbox_by_op[e["data"].value("operationId", "")] = e;
  for (auto& r : assigned) {
    auto ce = json::parse(r.value, nullptr, false);
    REQUIRE_MESSAGE(ce.is_object(), r.value);
    CHECK(ce.value("specversion", "") == "1.0");
    CHECK(ce.value("type", "") == "device.assigned");
    CHECK(r.ce_type == "device.assigned");
    CHECK(ce.value("id", "") == r.operation_id);
    CHECK(r.key == ce.value("subject", ""));
    CHECK(ce.count("sequence") == 0);
    auto local = outbox_by_op[r.operation_id];
    CHECK(local.count("sequence") == 1);
    local.erase("sequence");
    CHECK_MESSAGE(ce == local, r.value);
  }
  // The run is over: nothing left in the producer, no stage behind, and a
  // clean run never rebuilt the producer.
  auto m = test::scrape_until(test::metrics_addr(s), test::kafka_drained);
  CHECK(test::kafka_drained(m));
  // The Kafka panels of the example Grafana dashboard query exported names.
  CHECK(test::check_dashboard_metrics(test::http(test::metrics_addr(s), "GET", "/metrics").body,
                                      "dps_kafka_")
        >= 5);
  REQUIRE(m.count("dps_kafka_producer_queue") == 1);
  REQUIRE(m.count("dps_kafka_producer_rebuilds_total") == 1);
  CHECK(m.at("dps_kafka_producer_queue") == 0);
  CHECK(m.at("dps_kafka_producer_rebuilds_total") == 0);
  for (const char* stage : {"attestation", "allocation", "configuration"}) {
    const std::string series = std::string("dps_kafka_consumer_lag{stage=\"") + stage + "\"}";
    REQUIRE_MESSAGE(m.count(series) == 1, series);
    CHECK_MESSAGE(m.at(series) == 0, series);
  }
  CHECK(s.stop() == 0);
}

TEST_CASE("kill -9 mid-burst over Kafka: every 202 ends assigned once, on Kafka at least once") {
  kafka_fixture fx;
  test::server_process s;
  // 202 at once (no wait for the outcome): operations are still in flight
  // at the kill and must resume after the restart.
  REQUIRE_MESSAGE(!s.start(test::with_device_api(fx.server_config(), "register_wait_ms = 0"),
                           fx.dir),
                  s.log());
  create_group(s, "kafka-crash-group");
  warm_up(s, "kwarm"); // kill only once events really flow through Kafka
  int sent = 0;
  auto accepted =
    test::burst_then_kill9(s, "kcrash-", device_key, std::chrono::milliseconds(1500), sent);
  MESSAGE("accepted before kill: " << accepted.size());
  REQUIRE(accepted.size() > 50);
  REQUIRE_MESSAGE(!s.restart(), s.log());
  const auto restarted = std::chrono::steady_clock::now();
  auto c = s.client();
  int not_assigned = test::count_not_assigned(s, c, accepted, device_key, 1500);
  MESSAGE("all accepted operations settled "
          << std::chrono::duration<double>(std::chrono::steady_clock::now() - restarted).count()
          << " s after the restart");
  CHECK(not_assigned == 0);
  // The outbox (RocksDB): exactly one assignment per accepted operation.
  std::map<std::string, int> outbox;
  for (auto& e : all_assignments(s))
    ++outbox[e["data"].value("operationId", "")];
  for (auto& [op, id] : accepted)
    CHECK_MESSAGE(outbox[op] == 1, op << " has " << outbox[op] << " outbox events");
  // Kafka: every accepted operation on device.assigned (at least once). A
  // crash between the RocksDB commit and Kafka's ack is healed by the
  // redelivered input event: configuration republishes from the recorded
  // assignment. Copies (resume after the restart republishes every pending
  // operation) are reported; they must be the same bytes, never a second
  // outcome (consumers dedupe on the id).
  auto on_kafka = read_topic(fx.cfg, "dps.device.assigned", accepted.size() + 1);
  std::map<std::string, int> kafka_count;
  std::map<std::string, std::set<std::string>> bodies;
  for (auto& r : on_kafka) {
    ++kafka_count[r.operation_id];
    bodies[r.operation_id].insert(r.value);
  }
  int missing = 0, twice = 0;
  for (auto& [op, id] : accepted) {
    auto it = kafka_count.find(op);
    if (it == kafka_count.end()) {
      ++missing;
      continue;
    }
    twice += it->second >= 2 ? 1 : 0;
    CHECK_MESSAGE(bodies[op].size() == 1, op << ": copies of device.assigned differ");
  }
  MESSAGE("device.assigned on Kafka: " << on_kafka.size() << " records; accepted operations "
                                       << "missing: " << missing << ", published more than once: "
                                       << twice);
  CHECK(missing == 0);
  CHECK(s.stop() == 0);
}

TEST_CASE("malformed events on each topic are dead-lettered; the partitions keep moving") {
  kafka_fixture fx;
  test::server_process s;
  REQUIRE_MESSAGE(!s.start(test::with_metrics(fx.server_config()), fx.dir), s.log());
  create_group(s, "dlq-group");
  warm_up(s, "dlq-warm"); // every stage's consumer has joined before the junk
  auto c = s.client();
  int status = 0;

  // The shared-state tables: records the service API would never write.
  const std::vector<std::pair<std::string, std::string>> bad_enrollments = {
    {"group/dlq-junk", "not json {"},
    {"group/dlq-other", R"({"enrollmentGroupId":"someone-else"})"},
    {"enrollment/dlq-arr", "[1,2]"},
    {"no-prefix", "{}"}};
  produce_raw(fx.cfg, "dps.enrollments", bad_enrollments);
  produce_raw(fx.cfg, "dps.registrations",
              {{"dlq-dev-0", "garbage"}, {"dlq-dev-1", std::string(3, '\0')}});
  // Read-your-writes after the junk: the enrollments reader got past it.
  create_group(s, "dlq-group-2");
  for (const char* g : {"dlq-junk", "dlq-other"})
    CHECK(s.service("GET", std::string("/enrollmentGroups/") + g).status == 404);
  CHECK(s.service("GET", "/enrollments/dlq-arr").status == 404);

  const std::vector<std::string> consumed = {"dps.registration.requested",
                                             "dps.registration.attested",
                                             "dps.registration.allocated",
                                             "dps.registration.completed"};
  // Junk keyed like the devices about to register, so it sits on their
  // partitions: a stuck partition would leave a device unassigned.
  std::vector<std::pair<std::string, std::string>> junk;
  for (int i = 0; i < 8; ++i)
    junk.emplace_back("dlq-dev-" + std::to_string(i), i % 2 ? "not json {" : "{\"v\":99}");
  for (const auto& t : consumed)
    produce_raw(fx.cfg, t, junk);

  for (int i = 0; i < 8; ++i) {
    auto id = "dlq-dev-" + std::to_string(i);
    auto res = test::register_device(c, s, id, device_key(id), status, 20);
    CHECK_MESSAGE(res.value("status", "") == "assigned", id << ": " << res.dump());
  }
  // Every junk record is on the dead-letter topic.
  const auto expected = consumed.size() * junk.size() + bad_enrollments.size() + 2;
  auto dead = read_topic(fx.cfg, "dps.dead-letter", expected);
  CHECK(dead.size() == expected);
  // No stage consumer is stuck behind the junk (lag 0), nothing waits to be sent.
  auto m = test::scrape_until(test::metrics_addr(s), test::kafka_drained);
  CHECK(test::kafka_drained(m));
  CHECK(m.count("dps_kafka_consumer_lag{stage=\"configuration\"}") == 1);
  CHECK(test::sum(m, "dps_kafka_consumer_lag") == 0);
  // One process runs every stage, so it owns every partition of each input.
  for (const char* stage : {"attestation", "allocation", "configuration"}) {
    const auto series = std::string("dps_kafka_partitions_assigned{stage=\"") + stage + "\"}";
    REQUIRE_MESSAGE(m.count(series) == 1, series);
    CHECK_MESSAGE(m.at(series) == test::kafka_partitions, series);
  }
  REQUIRE(m.count("dps_kafka_producer_queue") == 1);
  REQUIRE(m.count("dps_kafka_producer_rebuilds_total") == 1);
  CHECK(m.at("dps_kafka_producer_queue") == 0);
  CHECK(m.at("dps_kafka_producer_rebuilds_total") == 0);
  CHECK(test::sum(m, "dps_kafka_dead_letters_total") == static_cast<double>(expected));
  // Every table caught up: the lag gauges exist and read 0.
  for (const char* table : {"enrollments", "registrations", "completed"}) {
    const std::string series = std::string("dps_kafka_table_lag{table=\"") + table + "\"}";
    CHECK_MESSAGE(m.count(series) == 1, series);
    CHECK(m[series] == 0);
  }
  // The devices' registration records (dps.registrations) applied after the
  // junk on their partitions.
  for (int i = 0; i < 2; ++i)
    CHECK(s.service("GET", "/registrations/dlq-dev-" + std::to_string(i)).status == 200);
  CHECK(s.stop() == 0);
}

TEST_CASE("a data dir used without the gateway role cannot later serve as a gateway") {
  // Workers do not keep the assignment outbox (only gateways serve it), so
  // the same data dir as a gateway would serve GET /assignments with holes.
  kafka_fixture fx;
  test::server_process worker;
  REQUIRE_MESSAGE(!worker.start(fx.server_config(), fx.dir,
                                {"--roles", "attestation,allocation,configuration"}),
                  worker.log());
  CHECK(worker.stop() == 0);
  test::server_process gateway;
  CHECK(gateway.start(fx.server_config(), fx.dir));
  CHECK_MESSAGE(gateway.log().find("outbox is incomplete") != std::string::npos, gateway.log());
  CHECK(gateway.log().find("empty data_dir") != std::string::npos);
}

TEST_CASE("registrations published with a plain Kafka client reach completed and device.assigned") {
  kafka_fixture fx;
  test::server_process s;
  REQUIRE_MESSAGE(!s.start(fx.server_config(), fx.dir), s.log());
  create_group(s, "direct-group");
  warm_up(s, "dwarm");
  constexpr int total = 50;
  std::vector<std::pair<std::string, std::string>> recs;
  std::map<std::string, std::string> own_ops; // operation id -> registration id
  std::set<std::string> signatures;
  for (int i = 0; i < total; ++i) {
    auto id = "direct-" + std::to_string(i);
    auto auth = s.device_auth(id, device_key(id));
    signatures.insert(auth.substr(auth.find("sig=") + 4, 20));
    // Half bring their own operation id, half leave it to provisiond.
    std::string op = i % 2 ? "factory-op-" + std::to_string(i) : "";
    if (!op.empty())
      own_ops[op] = id;
    recs.push_back(requested(s, id, auth, op));
  }
  const auto started = std::chrono::steady_clock::now();
  produce_raw(fx.cfg, "dps.registration.requested", recs);

  auto completed = read_topic(fx.cfg, "dps.registration.completed", total + 1);
  auto assigned = read_topic(fx.cfg, "dps.device.assigned", total + 1);
  MESSAGE(total << " direct registrations completed within "
                << std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count()
                << " s (including the readers' quiet second)");
  auto by_id = completed_by_id(completed);
  auto per_op = assigned_per_op(assigned);
  std::map<std::string, int> per_device;
  for (const auto& r : assigned)
    ++per_device[r.key];
  for (const auto& [key, value] : recs) {
    auto& evs = by_id[key];
    REQUIRE_MESSAGE(evs.size() == 1, key << " completed " << evs.size() << " times");
    const auto& ev = evs.front();
    CHECK_MESSAGE(ev.value("status", "") == "assigned", ev.dump());
    CHECK(ev.value("protocol", "") == "kafka");
    CHECK(ev.value("enrollmentGroupId", "") == "direct-group");
    CHECK(json::parse(ev.value("payload", "{}")) == json{{"line", 7}});
    auto op = ev.value("operationId", "");
    auto published_op = json::parse(value).value("operationId", "");
    if (!published_op.empty())
      CHECK(op == published_op);
    CHECK_MESSAGE(per_op[op] == 1, key << " / " << op << " on device.assigned " << per_op[op]
                                       << " times");
    CHECK(per_device[key] == 1);
  }
  // The credential went no further than registration.requested.
  for (const auto* topic : {"dps.registration.attested", "dps.registration.allocated",
                            "dps.registration.completed", "dps.device.assigned",
                            "dps.registrations"})
    for (const auto& r : read_topic(fx.cfg, topic, 1, std::chrono::milliseconds(300))) {
      CHECK_MESSAGE(r.value.find("authorization") == std::string::npos, topic << ": " << r.value);
      CHECK_MESSAGE(r.value.find("SharedAccessSignature") == std::string::npos, topic);
      for (const auto& sig : signatures)
        CHECK_MESSAGE(r.value.find(sig) == std::string::npos, topic << ": " << r.value);
    }
  // The gateway follows registration.completed: the operation is there over
  // HTTPS too, under the publisher's operation id.
  auto c = s.client();
  CHECK(test::count_not_assigned(s, c, own_ops, device_key, 250) == 0);
  CHECK(s.stop() == 0);
}

TEST_CASE("fuse_stages = false: every stage hands over through its topic") {
  kafka_fixture fx;
  fx.fuse_stages = false;
  test::server_process s;
  REQUIRE_MESSAGE(!s.start(fx.server_config(), fx.dir), s.log());
  create_group(s, "unfused-group");
  warm_up(s, "uwarm");
  std::set<std::string> ops;
  // Over HTTPS (attested on the gateway)...
  auto c = s.client();
  for (int i = 0; i < 10; ++i) {
    auto id = "unfused-https-" + std::to_string(i);
    int status = 0;
    auto res = test::register_device(c, s, id, device_key(id), status, 50);
    REQUIRE_MESSAGE(res.value("status", "") == "assigned", res.dump());
    ops.insert(res.value("operationId", ""));
  }
  // ...and published directly (attested by the attestation stage).
  std::vector<std::pair<std::string, std::string>> recs;
  std::set<std::string> signatures;
  for (int i = 0; i < 10; ++i) {
    auto id = "unfused-direct-" + std::to_string(i);
    auto auth = s.device_auth(id, device_key(id));
    signatures.insert(auth.substr(auth.find("sig=") + 4, 20));
    auto op = "unfused-op-" + std::to_string(i);
    ops.insert(op);
    recs.push_back(requested(s, id, auth, op));
  }
  produce_raw(fx.cfg, "dps.registration.requested", recs);
  auto per_op = assigned_per_op(read_topic(fx.cfg, "dps.device.assigned", ops.size() + 1));
  for (const auto& op : ops)
    CHECK_MESSAGE(per_op[op] == 1, op << " on device.assigned " << per_op[op] << " times");
  // Every operation (and the warm-up's) went through both stage topics, and
  // no credential with it.
  for (const char* topic : {"dps.registration.attested", "dps.registration.allocated"}) {
    std::set<std::string> on_topic;
    for (const auto& r : read_topic(fx.cfg, topic, ops.size() + 1)) {
      on_topic.insert(r.operation_id);
      CHECK_MESSAGE(r.value.find("SharedAccessSignature") == std::string::npos, topic);
      for (const auto& sig : signatures)
        CHECK_MESSAGE(r.value.find(sig) == std::string::npos, topic << ": " << r.value);
    }
    for (const auto& op : ops)
      CHECK_MESSAGE(on_topic.count(op) == 1, topic << " lacks " << op);
    CHECK(on_topic.size() == ops.size() + 1);
  }
  CHECK(s.stop() == 0);
}

TEST_CASE("direct publishing: a bad credential ends failed (401002), no device.assigned") {
  kafka_fixture fx;
  test::server_process s;
  REQUIRE_MESSAGE(!s.start(fx.server_config(), fx.dir), s.log());
  create_group(s, "direct-bad-group");
  warm_up(s, "dbwarm");
  const std::string wrong_key = crypto::generate_key();
  std::vector<std::pair<std::string, std::string>> recs = {
    requested(s, "dbad-sig", s.device_auth("dbad-sig", wrong_key), "dbad-op-1"),
    requested(s, "dbad-none", ""),
    // idScope missing: undecodable, dead-lettered without its signature.
    {"dbad-shape", json{{"registrationId", "dbad-shape"},
                        {"authorization", s.device_auth("dbad-shape", wrong_key)}}
                     .dump()},
    // After the failures on the same keys' partitions, a good one still goes.
    requested(s, "dbad-sig", s.device_auth("dbad-sig", device_key("dbad-sig")), "dbad-op-2"),
  };
  const auto dlq_sig = [&] {
    auto a = json::parse(recs[2].second).value("authorization", "");
    return a.substr(a.find("sig=") + 4, 20);
  }();
  produce_raw(fx.cfg, "dps.registration.requested", recs);
  // warm-up + bad signature + no authorization + the good one
  auto by_id = completed_by_id(read_topic(fx.cfg, "dps.registration.completed", 4));
  REQUIRE(by_id["dbad-sig"].size() == 2);
  const auto& failed = by_id["dbad-sig"][0];
  CHECK(failed.value("operationId", "") == "dbad-op-1");
  CHECK(failed.value("status", "") == "failed");
  CHECK(failed.value("errorCode", 0) == 401002);
  CHECK(!failed.value("errorMessage", "").empty());
  CHECK(by_id["dbad-sig"][1].value("status", "") == "assigned");
  REQUIRE(by_id["dbad-none"].size() == 1);
  CHECK(by_id["dbad-none"][0].value("status", "") == "failed");
  CHECK(by_id["dbad-none"][0].value("errorCode", 0) == 401000);
  CHECK(by_id.count("dbad-shape") == 0);

  auto per_op = assigned_per_op(read_topic(fx.cfg, "dps.device.assigned", 2));
  CHECK(per_op.count("dbad-op-1") == 0);
  CHECK(per_op["dbad-op-2"] == 1);
  CHECK(per_op.size() == 2); // + the warm-up device

  auto dead = read_topic(fx.cfg, "dps.dead-letter", 1);
  REQUIRE(dead.size() == 1);
  CHECK(dead[0].key == "dbad-shape");
  CHECK(dead[0].value.find(dlq_sig) == std::string::npos);
  CHECK(dead[0].value.find("authorization") == std::string::npos);

  // The failure is visible over HTTPS like any other operation's.
  auto c = s.client();
  net::http_headers h;
  h.add("Authorization", s.device_auth("dbad-sig", device_key("dbad-sig")));
  net::https_response resp;
  REQUIRE(!c.request("GET", "/" + s.id_scope() + "/registrations/dbad-sig/operations/dbad-op-1"
                              "?api-version=2021-06-01", h, {}, resp));
  CHECK_MESSAGE(resp.status == 200, resp.body);
  auto j = json::parse(resp.body, nullptr, false);
  CHECK_MESSAGE(j.value("status", "") == "failed", resp.body);
  CHECK(s.stop() == 0);
}

TEST_CASE("direct publishing: a request published again with its operationId is assigned once") {
  kafka_fixture fx;
  test::server_process s;
  REQUIRE_MESSAGE(!s.start(fx.server_config(), fx.dir), s.log());
  create_group(s, "direct-dup-group");
  warm_up(s, "ddwarm");
  const std::string id = "ddup-1";
  auto rec = requested(s, id, s.device_auth(id, device_key(id)), "ddup-op-1");
  // Twice back to back (a producer retry, a replayed batch) ...
  produce_raw(fx.cfg, "dps.registration.requested", {rec, rec});
  auto per_op = assigned_per_op(read_topic(fx.cfg, "dps.device.assigned", 2));
  CHECK(per_op["ddup-op-1"] == 1);
  // ... and once more after it completed, followed by a new operation of the
  // same device (same key, same partition: handled after the copy).
  produce_raw(fx.cfg, "dps.registration.requested",
              {rec, requested(s, id, s.device_auth(id, device_key(id)), "ddup-op-2")});
  per_op = assigned_per_op(read_topic(fx.cfg, "dps.device.assigned", 3));
  CHECK(per_op["ddup-op-1"] == 1);
  CHECK(per_op["ddup-op-2"] == 1);
  CHECK(per_op.size() == 3); // + the warm-up device
  auto by_id = completed_by_id(read_topic(fx.cfg, "dps.registration.completed", 3));
  std::map<std::string, int> completions;
  for (const auto& ev : by_id[id])
    ++completions[ev.value("operationId", "")];
  CHECK(completions["ddup-op-1"] == 1);
  CHECK(completions["ddup-op-2"] == 1);
  CHECK(s.stop() == 0);
}

} // TEST_SUITE
