// Broker outages, leader changes, injected produce errors and fatal
// producer errors: every acknowledged record is in the log exactly once.

#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <vector>

#include <librdkafka/rdkafka.h>

#include "tests/bus/kafka_test_support.hpp"
#include "bus/kafka_consumer.hpp"
#include "bus/kafka_producer.hpp"

using namespace prov;
using namespace prov::bus::kafka;
using prov::test::eventually;

namespace {

/// Sends and collects delivery reports.
struct sender {
  std::unique_ptr<producer> p;
  std::mutex mu;
  std::vector<delivery> reports;

  explicit sender(test::mock_fixture& f) : p(f.make_producer()) {}
  void send(const std::string& topic, const std::string& key, int n, int from = 0) {
    for (int i = from; i < from + n; ++i)
      REQUIRE(p->send({topic, key, std::to_string(i), {}, -1}, [this](const delivery& d) {
                 std::lock_guard<std::mutex> lock(mu);
                 reports.push_back(d);
               }).ok());
  }
  std::size_t count() {
    std::lock_guard<std::mutex> lock(mu);
    return reports.size();
  }
  bool wait(std::size_t n, std::chrono::milliseconds limit = std::chrono::seconds(20)) {
    return eventually([&] { return count() >= n; }, limit);
  }
  /// All reports ok, and per partition the offsets are exactly 0..k-1: every
  /// record written once, none lost, none duplicated (each test topic holds
  /// only this sender's records).
  void check_exactly_once(std::size_t n) {
    std::lock_guard<std::mutex> lock(mu);
    REQUIRE(reports.size() == n);
    std::map<int32_t, std::vector<int64_t>> offsets;
    for (const delivery& d : reports) {
      CHECK_MESSAGE(d.err.ok(), d.err.message);
      offsets[d.partition].push_back(d.offset);
    }
    for (auto& [part, offs] : offsets) {
      std::sort(offs.begin(), offs.end());
      for (std::size_t i = 0; i < offs.size(); ++i)
        CHECK_MESSAGE(offs[i] == static_cast<int64_t>(i), "partition ", part);
    }
  }
};

} // namespace

TEST_SUITE("kafka_faults") {

TEST_CASE("all brokers down for 5 s: nothing acknowledged is lost, the consumer resumes") {
  test::mock_fixture f(test::mock_fixture::kind::private_for_faults);
  // Longer than the outage, so the group survives it without a rebalance
  // (a rebalance would be correct too, just slower: uncommitted records are
  // redelivered).
  f.cfg.properties["session.timeout.ms"] = "10000";
  const std::string topic = f.cfg.topic_prefix + "outage";
  REQUIRE(f.mc->create_topic(topic, 2, 3).ok());

  std::mutex mu;
  std::vector<std::string> consumed;
  std::vector<message_id> unacked;
  std::unique_ptr<consumer> c;
  consumer::options co;
  co.group_id = test::unique_name("g");
  co.topics = {topic};
  co.revoke_grace_ms = 0;
  co.log = f.logs.fn();
  REQUIRE(consumer::create(f.cfg, co,
                           [&](message&& m) {
                             std::lock_guard<std::mutex> lock(mu);
                             consumed.push_back(m.key + ":" + m.value);
                             unacked.push_back(m.id);
                           },
                           c)
              .ok());
  auto ack_all = [&] {
    std::lock_guard<std::mutex> lock(mu);
    for (const message_id& id : unacked) c->done(id);
    unacked.clear();
  };
  auto distinct = [&] {
    std::lock_guard<std::mutex> lock(mu);
    return std::set<std::string>(consumed.begin(), consumed.end()).size();
  };

  sender s(f);
  s.send(topic, "a", 25);
  s.send(topic, "b", 25);
  REQUIRE(s.wait(50));
  // Steady state first: the consumer has joined and caught up.
  REQUIRE(eventually([&] { return distinct() == 50; }));
  ack_all();

  const auto down_at = std::chrono::steady_clock::now();
  REQUIRE(f.mc->broker_down(-1).ok());
  s.send(topic, "a", 25, 25);
  s.send(topic, "b", 25, 25);
  // The outage is real: the clients saw every broker go away.
  CHECK(eventually([&] { return f.logs.contains("_ALL_BROKERS_DOWN"); }));
  // The fault lasts 5 s (its duration, not a synchronisation point).
  std::this_thread::sleep_until(down_at + std::chrono::seconds(5));
  CHECK(s.count() == 50);
  REQUIRE(f.mc->broker_up(-1).ok());

  REQUIRE(s.wait(100));
  s.check_exactly_once(100);
  REQUIRE(eventually([&] { return distinct() == 100; }, std::chrono::seconds(20)));
  ack_all();
  REQUIRE(eventually([&] {
    int64_t total = 0;
    for (const auto& [tp, off] : c->committed()) total += off;
    return total == 100;
  }));
  c->close();
  std::lock_guard<std::mutex> lock(mu);
  // Per key, first occurrences come in produce order (at-least-once may
  // repeat a suffix after a rebalance, never reorder or skip).
  for (const std::string key : {"a", "b"}) {
    std::vector<std::string> firsts;
    std::set<std::string> seen;
    for (const std::string& e : consumed)
      if (e.rfind(key + std::string(":"), 0) == 0 && seen.insert(e).second) firsts.push_back(e);
    REQUIRE(firsts.size() == 50);
    for (int i = 0; i < 50; ++i) CHECK(firsts[i] == std::string(key) + ":" + std::to_string(i));
  }
}

TEST_CASE("partition leader moves mid-stream: records keep flowing, exactly once") {
  test::mock_fixture f;
  const std::string topic = f.cfg.topic_prefix + "leader";
  REQUIRE(f.mc->create_topic(topic, 1, 3).ok());
  sender s(f);
  REQUIRE(f.mc->partition_leader(topic, 0, 1).ok());
  s.send(topic, "k", 20);
  REQUIRE(s.wait(20));
  REQUIRE(f.mc->partition_leader(topic, 0, 2).ok());
  s.send(topic, "k", 20, 20);
  REQUIRE(s.wait(40));
  REQUIRE(f.mc->partition_leader(topic, 0, 3).ok());
  s.send(topic, "k", 20, 40);
  REQUIRE(s.wait(60));
  s.check_exactly_once(60);
}

TEST_CASE("retriable produce errors are retried transparently, exactly once") {
  test::mock_fixture f;
  const std::string topic = f.cfg.topic_prefix + "errors";
  REQUIRE(f.mc->create_topic(topic, 1, 3).ok());
  sender s(f);
  s.send(topic, "k", 5);
  REQUIRE(s.wait(5));
  f.mc->push_request_errors(mock_cluster::api::produce,
                            {RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                             RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                             RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                             RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
                             RD_KAFKA_RESP_ERR__TRANSPORT});
  s.send(topic, "k", 45, 5);
  REQUIRE(s.wait(50));
  s.check_exactly_once(50);
}

TEST_CASE("on the mock's suggested properties, a batch failed ahead of another is retried, not lost") {
  // kafka_mock_limits: with more than one request in flight, the mock appends
  // C behind a failed B and librdkafka then reports B delivered although it
  // is not in the log (the scale-out test's lost dps.device.assigned). The
  // properties every mock client runs on (dev-kafka prints them, the
  // integration tests use them) must rule that out.
  test::mock_fixture f(test::mock_fixture::kind::private_for_faults);
  for (const auto& p : mock_client_properties())
    f.cfg.properties[p.name] = p.value;
  const std::string topic = f.cfg.topic_prefix + "gap";
  REQUIRE(f.mc->create_topic(topic, 1, 1).ok());
  REQUIRE(f.mc->partition_leader(topic, 0, 1).ok());
  sender s(f);
  s.send(topic, "k", 1); // A
  REQUIRE(s.wait(1));
  // B fails (retriable, nothing written), answered 1 s late; C follows it.
  REQUIRE(f.mc->fail_next(1, mock_cluster::api::produce, RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
                          1000).ok());
  s.send(topic, "k", 1, 1);
  REQUIRE(eventually([&] { return f.mc->pending_errors(1, mock_cluster::api::produce) == 0; }));
  s.send(topic, "k", 1, 2);
  REQUIRE(s.wait(3));
  s.check_exactly_once(3); // B's report has its offset: written, not implicitly acked
  CHECK(test::read_partition(f.cfg, topic, 0, 3, std::chrono::seconds(3)) ==
        std::vector<std::string>{"0", "1", "2"});
}

TEST_CASE("a lost produce acknowledgement: nothing lost, duplicates are exact copies") {
  // Measured, not wished for: against librdkafka 2.0.2's mock cluster, a
  // batch written by the broker whose acknowledgement arrives after the
  // client's timeout is retried and written AGAIN (no broker-side dedupe
  // here). That is why every stage must be idempotent on operation id. This
  // test pins down what the transport does guarantee in that case.
  test::mock_fixture f;
  f.cfg.properties["request.timeout.ms"] = "500";
  f.cfg.properties["socket.timeout.ms"] = "500";
  const std::string topic = f.cfg.topic_prefix + "lostack";
  REQUIRE(f.mc->create_topic(topic, 1, 3).ok());
  REQUIRE(f.mc->partition_leader(topic, 0, 1).ok());

  sender s(f);
  s.send(topic, "k", 5);
  REQUIRE(s.wait(5));
  // The broker appends the next batch but answers after the client gave up.
  // librdkafka scans for timed-out requests once a second: a 3 s delay spans
  // at least two scans past the 500 ms timeout even on a loaded machine (with
  // 1.5 s, a late scan under a parallel test let the answer arrive first).
  REQUIRE(f.mc->delay_responses(1, mock_cluster::api::produce, 3000).ok());
  s.send(topic, "k", 10, 5);
  REQUIRE(s.wait(15));
  CHECK(f.logs.contains("Timed out ProduceRequest")); // the fault really happened
  {
    std::lock_guard<std::mutex> lock(s.mu);
    for (const delivery& d : s.reports) CHECK_MESSAGE(d.err.ok(), d.err.message);
  }
  const std::size_t in_log = static_cast<std::size_t>(
      std::max_element(s.reports.begin(), s.reports.end(), [](const delivery& a,
                                                             const delivery& b) {
        return a.offset < b.offset;
      })->offset + 1);
  const std::vector<std::string> consumed = test::read_partition(f.cfg, topic, 0, in_log);
  REQUIRE(consumed.size() == in_log);
  std::vector<std::string> firsts;
  std::set<std::string> seen;
  for (const std::string& v : consumed)
    if (seen.insert(v).second) firsts.push_back(v);
    else CHECK(std::stoi(v) >= 5); // only the delayed batch can repeat
  REQUIRE(firsts.size() == 15);
  for (int i = 0; i < 15; ++i) CHECK(firsts[i] == std::to_string(i));
  MESSAGE("records in the log for 15 sent: ", consumed.size());
}

TEST_CASE("a fatal producer error rebuilds the producer and re-sends what was not acknowledged") {
  test::mock_fixture f(test::mock_fixture::kind::private_for_faults);
  const std::string topic = f.cfg.topic_prefix + "fatal";
  REQUIRE(f.mc->create_topic(topic, 1, 3).ok());
  sender s(f);
  s.send(topic, "k", 10);
  REQUIRE(s.wait(10));

  // Queue records that cannot be delivered yet, then break the producer.
  REQUIRE(f.mc->broker_down(-1).ok());
  s.send(topic, "k", 10, 10);
  const auto counters = s.p->shared_counters(); // what the metrics read
  CHECK(counters->rebuilds == 0);
  s.p->inject_fatal_error_for_test();
  REQUIRE(eventually([&] { return s.p->rebuilds() == 1; }));
  CHECK(counters->rebuilds == 1);
  CHECK(f.logs.contains("producer fatal error"));
  CHECK(s.count() == 10); // the queued ones were not failed
  CHECK(s.p->pending() == 10);
  CHECK(counters->pending == 10); // held across the rebuild, still counted
  REQUIRE(f.mc->broker_up(-1).ok());
  REQUIRE(s.wait(20));
  s.send(topic, "k", 5, 20); // the rebuilt producer takes new work
  REQUIRE(s.wait(25));
  s.check_exactly_once(25);
  CHECK(s.p->rebuilds() == 1);
  CHECK(counters->pending == 0);
  s.p.reset();
  CHECK(counters->rebuilds == 1); // outlives the producer
}

} // TEST_SUITE
