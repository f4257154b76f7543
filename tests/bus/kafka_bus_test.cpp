// kafka_bus: publish on one instance, subscribe on another; undecodable
// events go to the dead-letter topic without stopping their partition.

#include <doctest/doctest.h>

#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "tests/bus/kafka_test_support.hpp"
#include "bus/kafka_bus.hpp"
#include "bus/kafka_consumer.hpp"
#include "bus/kafka_dead_letter.hpp"
#include "bus/kafka_producer.hpp"

using namespace prov;
using namespace prov::bus;
using namespace prov::bus::kafka;
using prov::test::eventually;

namespace {

registration_event make_event(int i, const std::string& reg) {
  registration_event ev;
  ev.operation_id = "5.0123456789abcdef.op-" + std::to_string(i);
  ev.registration_id = reg;
  ev.id_scope = "0ne00000001";
  ev.api_version = "2021-06-01";
  ev.protocol = "http";
  ev.accepted_ms = 1700000000000 + i;
  ev.attestation_type = "symmetricKey";
  ev.payload_json = R"({"n":)" + std::to_string(i) + "}";
  ev.assigned_hub = "hub-a.example";
  ev.device_id = "dev-" + reg;
  return ev;
}

kafka_bus::options bus_options(test::mock_fixture& f, const std::string& group_prefix,
                               bool one_consumer = false) {
  kafka_bus::options o;
  o.group_prefix = group_prefix;
  o.one_consumer = one_consumer;
  o.log = f.logs.fn();
  o.consumer_options.revoke_grace_ms = 200;
  return o;
}


/// Publishes on one bus, consumes on another (a consumer per topic, or one
/// for both topics with one_consumer).
void publish_and_consume(bool one_consumer) {
  test::mock_fixture f;
  REQUIRE(f.mc->create_topics(topic_table(f.cfg)).ok());
  const std::string groups = test::unique_name("grp") + ".";

  std::unique_ptr<kafka_bus> a, b;
  REQUIRE(kafka_bus::create(f.cfg, bus_options(f, groups), a).ok());
  REQUIRE(kafka_bus::create(f.cfg, bus_options(f, groups, one_consumer), b).ok());

  std::mutex mu;
  std::vector<registration_event> attested;             // acked subscriber
  std::vector<std::function<void()>> acks;
  std::vector<registration_event> allocated;            // plain subscriber
  REQUIRE(b->subscribe_acked(topic::registration_attested,
                             [&](registration_event&& ev, std::function<void()> ack) {
                               std::lock_guard<std::mutex> lock(mu);
                               attested.push_back(std::move(ev));
                               acks.push_back(std::move(ack));
                             })
              .ok());
  b->subscribe(topic::registration_allocated, [&](registration_event&& ev) {
    std::lock_guard<std::mutex> lock(mu);
    allocated.push_back(std::move(ev));
  });
  REQUIRE(b->start_consuming().ok()); // one_consumer: starts here; else no-op

  std::atomic<int> durable{0};
  constexpr int n = 30;
  for (int i = 0; i < n; ++i) {
    const registration_event ev = make_event(i, "reg-" + std::to_string(i % 3));
    REQUIRE(a->publish(topic::registration_attested, ev, [&](const delivery& d) {
               CHECK_MESSAGE(d.err.ok(), d.err.message);
               ++durable;
             }).ok());
    a->publish(topic::registration_allocated, ev); // fire and forget
  }
  REQUIRE(eventually([&] { return durable.load() == n; }));
  REQUIRE(eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    return attested.size() >= n && allocated.size() >= n; // >=: at-least-once
  }, std::chrono::seconds(20)));

  {
    std::lock_guard<std::mutex> lock(mu);
    // Per registration id, events arrive in publish order and decode intact.
    std::map<std::string, int> last;
    std::set<std::string> seen_ops;
    for (const registration_event& ev : attested) {
      if (!seen_ops.insert(ev.operation_id).second) continue; // a redelivery
      const int i = std::stoi(ev.operation_id.substr(ev.operation_id.rfind('-') + 1));
      CHECK(ev.registration_id == "reg-" + std::to_string(i % 3));
      CHECK(ev.payload_json == R"({"n":)" + std::to_string(i) + "}");
      CHECK(ev.accepted_ms == 1700000000000 + i);
      CHECK(ev.device_id == "dev-" + ev.registration_id);
      auto it = last.find(ev.registration_id);
      if (it != last.end()) CHECK(it->second < i);
      last[ev.registration_id] = i;
    }
    CHECK(seen_ops.size() == n);
  }
  // Plain subscribers commit on return; acked ones only after ack().
  auto total = [](const std::map<std::string, int64_t>& m) {
    int64_t t = 0;
    for (const auto& [k, v] : m) t += v;
    return t;
  };
  REQUIRE(eventually([&] { return total(b->committed(topic::registration_allocated)) == n; }));
  CHECK(b->committed(topic::registration_attested).empty());
  // The metrics' view: every attested event unacked is lag, the plain
  // subscriber has none, nothing waits in the producer.
  const auto attested_lag = b->consumer_lag(topic::registration_attested);
  const auto allocated_lag = b->consumer_lag(topic::registration_allocated);
  CHECK_MESSAGE(eventually([&] { return attested_lag->load() == n; }), attested_lag->load());
  CHECK_MESSAGE(eventually([&] { return allocated_lag->load() == 0; }), allocated_lag->load());
  // Fire-and-forget publishes may still await their delivery reports.
  CHECK(eventually([&] { return a->producer_counters()->pending == 0; }));
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto& ack : acks) ack();
  }
  REQUIRE(eventually([&] { return total(b->committed(topic::registration_attested)) == n; }));
  CHECK_MESSAGE(eventually([&] { return attested_lag->load() == 0; }), attested_lag->load());
  // Each topic's partitions, counted by topic also when one consumer has both.
  const int64_t parts = f.cfg.partitions;
  CHECK(b->consumer_partitions(topic::registration_attested)->load() == parts);
  CHECK(b->consumer_partitions(topic::registration_allocated)->load() == parts);
  CHECK(b->consumer_partitions(topic::registration_requested)->load() == 0);
  b->close();
  CHECK(b->consumer_partitions(topic::registration_attested)->load() == 0);
  a->close();
  CHECK(a->dead_lettered() == 0);
  CHECK(b->dead_lettered() == 0);
  CHECK(a->producer_counters()->rebuilds == 0);
}

} // namespace

TEST_SUITE("kafka_bus") {

TEST_CASE("events published on one bus reach the subscriber on another, in order, acked") {
  publish_and_consume(false);
}

TEST_CASE("one consumer for several topics: each topic's events reach its handler, acked") {
  publish_and_consume(true);
}

TEST_CASE("one consumer per process: when one member stops, the other takes every topic over") {
  test::mock_fixture f;
  REQUIRE(f.mc->create_topics(topic_table(f.cfg)).ok());
  const std::string groups = test::unique_name("grp") + ".";
  std::unique_ptr<kafka_bus> pub, w1, w2;
  REQUIRE(kafka_bus::create(f.cfg, bus_options(f, groups), pub).ok());
  REQUIRE(kafka_bus::create(f.cfg, bus_options(f, groups, true), w1).ok());
  REQUIRE(kafka_bus::create(f.cfg, bus_options(f, groups, true), w2).ok());
  std::mutex mu;
  std::map<std::string, std::set<std::string>> seen; // "w1"/"w2" -> topic:operation
  auto subscribe = [&](kafka_bus& b, const std::string& who) {
    for (topic t : {topic::registration_attested, topic::registration_allocated})
      REQUIRE(b.subscribe_acked(t, [&, who, t](registration_event&& ev, std::function<void()> ack) {
                 std::lock_guard<std::mutex> lock(mu);
                 seen[who].insert(std::string(topic_name(t)) + ":" + ev.operation_id);
                 ack();
               }).ok());
    REQUIRE(b.start_consuming().ok());
  };
  subscribe(*w1, "w1");
  subscribe(*w2, "w2");
  const int64_t parts = f.cfg.partitions;
  auto owned = [&](topic t) {
    return w1->consumer_partitions(t)->load() + w2->consumer_partitions(t)->load();
  };
  // One group for both topics: each topic's partitions split between the two.
  REQUIRE(eventually([&] {
    return owned(topic::registration_attested) == parts &&
           owned(topic::registration_allocated) == parts &&
           w1->consumer_partitions(topic::registration_attested)->load() > 0 &&
           w2->consumer_partitions(topic::registration_attested)->load() > 0;
  }, std::chrono::seconds(30)));
  auto publish_all = [&](int from, int to) {
    std::atomic<int> durable{0};
    for (int i = from; i < to; ++i) {
      const registration_event ev = make_event(i, "reg-" + std::to_string(i));
      for (topic t : {topic::registration_attested, topic::registration_allocated})
        REQUIRE(pub->publish(t, ev, [&](const delivery& d) {
                     CHECK(d.err.ok());
                     ++durable;
                   }).ok());
    }
    REQUIRE(eventually([&] { return durable.load() == 2 * (to - from); }));
  };
  auto count = [&](const std::string& who) {
    std::lock_guard<std::mutex> lock(mu);
    return seen[who].size();
  };
  publish_all(0, 40);
  REQUIRE(eventually([&] { return count("w1") + count("w2") >= 80; }, std::chrono::seconds(20)));
  CHECK(count("w1") > 0);
  CHECK(count("w2") > 0);
  // w1 leaves: w2 owns every partition of both topics and gets all new events.
  w1->stop_consuming();
  REQUIRE(eventually([&] {
    return w2->consumer_partitions(topic::registration_attested)->load() == parts &&
           w2->consumer_partitions(topic::registration_allocated)->load() == parts;
  }, std::chrono::seconds(30)));
  CHECK(w1->consumer_partitions(topic::registration_attested)->load() == 0);
  publish_all(40, 80);
  REQUIRE(eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 40; i < 80; ++i)
      for (const char* t : {"registration.attested", "registration.allocated"})
        if (!seen["w2"].count(std::string(t) + ":" + make_event(i, "").operation_id))
          return false;
    return true;
  }, std::chrono::seconds(20)));
  w2->close();
  w1->close();
  pub->close();
}

TEST_CASE("one consumer per process, upgrading: starts where the per-stage groups left off") {
  test::mock_fixture f;
  REQUIRE(f.mc->create_topics(topic_table(f.cfg)).ok());
  const std::string groups = test::unique_name("grp") + ".";
  std::unique_ptr<kafka_bus> pub, old_worker, new_worker;
  REQUIRE(kafka_bus::create(f.cfg, bus_options(f, groups), pub).ok());
  constexpr int n = 20, old_done = 10;
  std::atomic<int> durable{0};
  for (int i = 0; i < n; ++i) {
    const registration_event ev = make_event(i, "reg-" + std::to_string(i)); // every partition
    for (topic t : {topic::registration_attested, topic::registration_allocated})
      REQUIRE(pub->publish(t, ev, [&](const delivery& d) {
                   CHECK(d.err.ok());
                   ++durable;
                 }).ok());
  }
  REQUIRE(eventually([&] { return durable.load() == 2 * n; }));
  auto index_of = [](const registration_event& ev) {
    return std::stoi(ev.operation_id.substr(ev.operation_id.rfind('-') + 1));
  };
  auto total = [](const std::map<std::string, int64_t>& m) {
    int64_t t = 0;
    for (const auto& [k, v] : m) t += v;
    return t;
  };
  // The previous version: a group per stage topic (<prefix>registration.attested).
  // It finished events 0..9 of attested (per partition, the events before
  // 10..19) and never consumed allocated, whose partitions have no offsets.
  REQUIRE(kafka_bus::create(f.cfg, bus_options(f, groups), old_worker).ok());
  REQUIRE(old_worker->subscribe_acked(topic::registration_attested,
                                      [&](registration_event&& ev, std::function<void()> ack) {
                                        if (index_of(ev) < old_done) ack();
                                      })
              .ok());
  REQUIRE(eventually([&] {
    return total(old_worker->committed(topic::registration_attested)) == old_done;
  }, std::chrono::seconds(20)));
  old_worker->close();

  // The new version: one consumer, group <prefix>stages, nothing committed.
  REQUIRE(kafka_bus::create(f.cfg, bus_options(f, groups, true), new_worker).ok());
  std::mutex mu;
  std::map<topic, std::set<int>> seen;
  for (topic t : {topic::registration_attested, topic::registration_allocated})
    REQUIRE(new_worker
                ->subscribe_acked(t,
                                  [&, t](registration_event&& ev, std::function<void()> ack) {
                                    std::lock_guard<std::mutex> lock(mu);
                                    seen[t].insert(index_of(ev));
                                    ack();
                                  })
                .ok());
  REQUIRE(new_worker->start_consuming().ok());
  REQUIRE(eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    return seen[topic::registration_allocated].size() == n &&
           seen[topic::registration_attested].count(n - 1) &&
           seen[topic::registration_attested].size() >= n - old_done;
  }, std::chrono::seconds(30)));
  {
    std::lock_guard<std::mutex> lock(mu);
    // Partition order: had attested started at the beginning, 0..9 (before
    // 10..19 in their partitions) would be here by now.
    std::set<int> expected;
    for (int i = old_done; i < n; ++i) expected.insert(i);
    CHECK_MESSAGE(seen[topic::registration_attested] == expected,
                  seen[topic::registration_attested].size() << " attested events delivered");
  }
  CHECK(f.logs.contains("starting where the previous group did"));
  // The seed is the new group's own commit now; acked, everything is.
  CHECK(eventually([&] {
    return total(new_worker->committed(topic::registration_attested)) == n &&
           total(new_worker->committed(topic::registration_allocated)) == n;
  }));
  new_worker->close();
  pub->close();
}

TEST_CASE("inputs take their clock readings from the record's timestamp, the same on redelivery") {
  // What lets a fused worker allocate a redelivered input again and publish
  // the same bytes: a requested record's accepted time and an attested
  // record's allocation time come from the log, not from the clock.
  test::mock_fixture f;
  f.cfg.partitions = 1;
  REQUIRE(f.mc->create_topics(topic_table(f.cfg)).ok());
  const std::string groups = test::unique_name("grp") + ".";
  std::unique_ptr<kafka_bus> a;
  REQUIRE(kafka_bus::create(f.cfg, bus_options(f, groups), a).ok());
  const int64_t before = now_ms();
  std::atomic<int> sent{0};
  auto count = [&](const delivery& d) {
    CHECK(d.err.ok());
    ++sent;
  };
  auto unstamped = make_event(1, "reg-a"); // as a gateway publishes it
  auto stamped = make_event(2, "reg-a");
  stamped.allocated_ms = 1700000000777;     // already allocated: kept
  REQUIRE(a->publish(topic::registration_attested, unstamped, count).ok());
  REQUIRE(a->publish(topic::registration_attested, stamped, count).ok());
  REQUIRE(a->send_record({topic_for(f.cfg, topic::registration_requested), "reg-d",
                          R"({"v":1,"registrationId":"reg-d","idScope":"0ne00000001",)"
                          R"("operationId":"direct-1"})",
                          {}},
                         count)
              .ok());
  REQUIRE(eventually([&] { return sent.load() == 3; }));
  const int64_t after = now_ms();

  // Read both topics without acking, twice: the second reader gets the same
  // records again (a redelivery) and must see the same readings.
  auto read_all = [&](std::map<std::string, registration_event>& got) {
    std::unique_ptr<kafka_bus> b;
    REQUIRE(kafka_bus::create(f.cfg, bus_options(f, groups), b).ok());
    std::mutex mu;
    auto keep = [&](registration_event&& ev, std::function<void()>) {
      std::lock_guard<std::mutex> lock(mu);
      got.emplace(ev.operation_id, std::move(ev));
    };
    REQUIRE(b->subscribe_acked(topic::registration_attested, keep).ok());
    REQUIRE(b->subscribe_acked(topic::registration_requested, keep).ok());
    REQUIRE(eventually([&] {
      std::lock_guard<std::mutex> lock(mu);
      return got.size() == 3;
    }, std::chrono::seconds(20)));
    b->close();
  };
  std::map<std::string, registration_event> first, second;
  read_all(first);
  std::this_thread::sleep_for(std::chrono::milliseconds(20)); // the clock moves on
  read_all(second);
  const auto& u = first.at(unstamped.operation_id);
  CHECK(u.allocated_ms >= before);
  CHECK(u.allocated_ms <= after);
  CHECK(u.accepted_ms == unstamped.accepted_ms); // the event's own, untouched
  CHECK(first.at(stamped.operation_id).allocated_ms == 1700000000777);
  const auto& d = first.at("direct-1");
  CHECK(d.accepted_ms >= before);
  CHECK(d.accepted_ms <= after);
  for (const auto& [op, ev] : first) {
    CHECK_MESSAGE(second.at(op).accepted_ms == ev.accepted_ms, op);
    CHECK_MESSAGE(second.at(op).allocated_ms == ev.allocated_ms, op);
  }
  a->close();
}

TEST_CASE("an undecodable event is dead-lettered with its reason; later events still flow") {
  test::mock_fixture f;
  f.cfg.partitions = 1; // everything on one partition: the bad record sits in front
  REQUIRE(f.mc->create_topics(topic_table(f.cfg)).ok());
  const std::string groups = test::unique_name("grp") + ".";
  const std::string attested = topic_for(f.cfg, topic::registration_attested);

  // Read the dead-letter topic while the bus subscriber joins (in parallel).
  std::mutex mu;
  std::vector<message> dead;
  std::unique_ptr<consumer> dlq;
  consumer::options co;
  co.group_id = test::unique_name("dlq-reader");
  co.topics = {dead_letter_topic(f.cfg)};
  co.revoke_grace_ms = 0;
  co.log = f.logs.fn();
  REQUIRE(consumer::create(f.cfg, co,
                           [&](message&& m) {
                             std::lock_guard<std::mutex> lock(mu);
                             dead.push_back(std::move(m));
                           },
                           dlq)
              .ok());

  std::unique_ptr<kafka_bus> b;
  REQUIRE(kafka_bus::create(f.cfg, bus_options(f, groups), b).ok());
  std::vector<registration_event> got;
  REQUIRE(b->subscribe_acked(topic::registration_attested,
                             [&](registration_event&& ev, std::function<void()> ack) {
                               if (ev.registration_id == "throws")
                                 throw std::runtime_error("boom");
                               std::lock_guard<std::mutex> lock(mu);
                               got.push_back(std::move(ev));
                               ack();
                             })
              .ok());

  // Garbage first, then good events, an event whose handler throws, more good.
  std::unique_ptr<producer> raw;
  producer::options po;
  po.log = f.logs.fn();
  REQUIRE(producer::create(f.cfg, po, raw).ok());
  std::atomic<int> sent{0};
  auto count = [&](const delivery& d) {
    CHECK(d.err.ok());
    ++sent;
  };
  REQUIRE(raw->send({attested, "reg-x", "{this is not an event", {{"operation_id", "bad"}}, -1},
                    count)
              .ok());
  // Two producers: only an acknowledged write fixes the order in the log.
  REQUIRE(eventually([&] { return sent.load() == 1; }));
  REQUIRE(b->publish(topic::registration_attested, make_event(1, "reg-a"), count).ok());
  REQUIRE(b->publish(topic::registration_attested, make_event(2, "throws"), count).ok());
  REQUIRE(b->publish(topic::registration_attested, make_event(3, "reg-b"), count).ok());
  REQUIRE(eventually([&] { return sent.load() == 4; }));

  REQUIRE(eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    return got.size() >= 2 && dead.size() >= 2; // >=: at-least-once
  }, std::chrono::seconds(20)));
  // Offsets 0..3 all finished (two of them by their dead letter): committed past.
  REQUIRE(eventually([&] { return b->committed(topic::registration_attested)[attested + "/0"] == 4; }));
  CHECK(b->dead_lettered() == 2);
  b->close();
  dlq->close();

  std::lock_guard<std::mutex> lock(mu);
  CHECK(got[0].registration_id == "reg-a");
  CHECK(got[1].registration_id == "reg-b");
  const message& d0 = dead[0];
  CHECK(d0.key == "reg-x");
  CHECK(d0.value == "{this is not an event");
  CHECK(*find_header(d0.headers, "operation_id") == "bad");
  CHECK(find_header(d0.headers, dlq_reason)->rfind("undecodable event:", 0) == 0);
  CHECK(*find_header(d0.headers, dlq_topic) == attested);
  CHECK(*find_header(d0.headers, dlq_partition) == "0");
  CHECK(*find_header(d0.headers, dlq_offset) == "0");
  const message& d1 = dead[1];
  CHECK(d1.key == "throws");
  CHECK(*find_header(d1.headers, dlq_reason) == "handler threw: boom");
  CHECK(*find_header(d1.headers, dlq_offset) == "2");
}

} // TEST_SUITE
