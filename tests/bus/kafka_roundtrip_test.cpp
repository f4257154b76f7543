// Producer and consumer against the mock cluster: keys, headers, per-key
// order, delivery reports.

#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "tests/bus/kafka_test_support.hpp"
#include "bus/kafka_consumer.hpp"
#include "bus/kafka_producer.hpp"

using namespace prov;
using namespace prov::bus::kafka;
using prov::test::eventually;

TEST_SUITE("kafka_roundtrip") {

TEST_CASE("records round-trip with key, value and headers; per-key order holds") {
  test::mock_fixture f;
  const std::string topic = f.cfg.topic_prefix + "roundtrip";
  REQUIRE(f.mc->create_topic(topic, 4, 3).ok());

  auto p = f.make_producer();

  constexpr int keys = 8, per_key = 50;
  std::mutex mu;
  std::vector<delivery> reports;
  for (int i = 0; i < per_key; ++i)
    for (int k = 0; k < keys; ++k) {
      record r;
      r.topic = topic;
      r.key = "device-" + std::to_string(k);
      r.value = std::to_string(i);
      r.headers = {{"ce_type", "test.event"}, {"seq", std::to_string(i)}, {"empty", ""}};
      REQUIRE(p->send(std::move(r), [&](const delivery& d) {
                 std::lock_guard<std::mutex> lock(mu);
                 reports.push_back(d);
               }).ok());
    }
  REQUIRE(eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    return reports.size() == keys * per_key;
  }));
  for (const delivery& d : reports) {
    CHECK_MESSAGE(d.err.ok(), d.err.message);
    CHECK(d.topic == topic);
    CHECK(d.partition >= 0);
    CHECK(d.offset >= 0);
  }
  CHECK(p->pending() == 0);

  std::map<std::string, std::vector<int>> seen;     // key -> values in delivery order
  std::map<std::string, std::set<int32_t>> parts;   // key -> partitions it landed in
  std::unique_ptr<consumer> c;
  consumer::options co;
  co.group_id = test::unique_name("g");
  co.topics = {topic};
  co.log = f.logs.fn();
  co.revoke_grace_ms = 0;
  co.max_in_flight = 100; // pauses its partitions until half are done
  std::atomic<int> got{0};
  std::vector<message_id> delivered;
  bool headers_ok = true;
  REQUIRE(consumer::create(f.cfg, co,
                           [&](message&& m) {
                             {
                               std::lock_guard<std::mutex> lock(mu);
                               seen[m.key].push_back(std::stoi(m.value));
                               parts[m.key].insert(m.id.partition);
                               const std::string* t = find_header(m.headers, "ce_type");
                               const std::string* s = find_header(m.headers, "seq");
                               const std::string* e = find_header(m.headers, "empty");
                               headers_ok = headers_ok && t && *t == "test.event" && s &&
                                            *s == m.value && e && e->empty() &&
                                            m.headers.size() == 3;
                               delivered.push_back(m.id);
                             }
                             ++got;
                           },
                           c)
              .ok());
  // Finish messages in rounds, only once 100 are unfinished: without the
  // pause all 400 would be delivered in the first round.
  std::size_t acked = 0, most_unfinished = 0;
  while (acked < keys * per_key) { // (a rebalance under load may redeliver: >= is enough)
    REQUIRE(eventually([&] {
      std::lock_guard<std::mutex> lock(mu);
      return delivered.size() - acked >= 100 || delivered.size() == keys * per_key;
    }, std::chrono::seconds(20)));
    std::lock_guard<std::mutex> lock(mu);
    most_unfinished = std::max(most_unfinished, delivered.size() - acked);
    for (; acked < delivered.size(); ++acked) c->done(delivered[acked]);
  }
  CHECK(most_unfinished <= 110); // the bound, plus what was already in hand
  auto total = [&] {
    int64_t t = 0;
    for (const auto& [tp, off] : c->committed()) t += off;
    return t;
  };
  REQUIRE(eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    for (; acked < delivered.size(); ++acked) c->done(delivered[acked]);
    return total() == keys * per_key;
  }));
  c->close();
  CHECK(got.load() >= keys * per_key);
  std::lock_guard<std::mutex> lock(mu);
  CHECK(headers_ok);
  REQUIRE(seen.size() == keys);
  std::set<int32_t> used;
  for (const auto& [key, values] : seen) {
    CHECK(parts[key].size() == 1); // one key, one partition
    used.insert(*parts[key].begin());
    // Per key in order; compare first occurrences (at-least-once).
    std::vector<int> firsts;
    for (int v : values)
      if (std::find(firsts.begin(), firsts.end(), v) == firsts.end()) firsts.push_back(v);
    std::vector<int> expected(per_key);
    for (int i = 0; i < per_key; ++i) expected[i] = i;
    CHECK_MESSAGE(firsts == expected, key);
    if (values.size() != firsts.size())
      MESSAGE(key, ": ", values.size() - firsts.size(), " redelivered");
  }
  CHECK(used.size() > 1); // keys spread over partitions
}

TEST_CASE("send refuses beyond max_pending and after close, without calling back") {
  test::mock_fixture f(test::mock_fixture::kind::private_for_faults);
  const std::string topic = f.cfg.topic_prefix + "bounded";
  REQUIRE(f.mc->create_topic(topic, 1, 1).ok());
  REQUIRE(f.mc->broker_down(-1).ok()); // nothing can be acknowledged
  producer::options po;
  po.flush_timeout_ms = 100;
  po.max_pending = 3;
  auto p = f.make_producer(po);
  std::atomic<int> callbacks{0}, failed{0};
  auto cb = [&](const delivery& d) {
    ++callbacks;
    if (!d.err.ok()) ++failed;
  };
  const auto counters = p->shared_counters();
  for (int i = 0; i < 3; ++i) REQUIRE(p->send({topic, "k", "v", {}, -1}, cb).ok());
  const error full = p->send({topic, "k", "v", {}, -1}, cb);
  CHECK(full.code == error_code::unavailable);
  CHECK(full.message.find("queue full") != std::string::npos);
  CHECK(counters->pending == 3); // the refused one is not counted
  p->close(); // the 3 pending ones fail: never acknowledged
  CHECK(callbacks.load() == 3);
  CHECK(failed.load() == 3);
  CHECK(counters->pending == 0);
  CHECK(p->send({topic, "k", "v", {}, -1}, cb).code == error_code::unavailable);
  CHECK(callbacks.load() == 3);
  CHECK(counters->pending == 0);
}

} // TEST_SUITE

TEST_CASE("an operator's reconnect.backoff.ms above provisiond's 1 s cap still starts clients") {
  // librdkafka refuses reconnect.backoff.max.ms < reconnect.backoff.ms; our
  // default cap follows a longer base the operator set.
  test::mock_fixture f;
  auto cfg = f.cfg;
  cfg.properties.erase("reconnect.backoff.max.ms"); // the fixture's own choice
  cfg.properties["reconnect.backoff.ms"] = "2500";
  std::unique_ptr<producer> p;
  producer::options po;
  po.log = f.logs.fn();
  auto err = producer::create(cfg, po, p);
  CHECK_MESSAGE(err.ok(), err.message);
  cfg.properties["reconnect.backoff.max.ms"] = "500"; // the operator's own conflict: named
  std::unique_ptr<producer> bad;
  err = producer::create(cfg, po, bad);
  CHECK_FALSE(err.ok());
}
