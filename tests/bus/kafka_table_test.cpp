// table_reader: materializes every partition of a topic from caller-stored
// positions; read-your-writes through wait_applied(); tombstones; a failing
// apply is retried with the same batch, never skipped.

#include <doctest/doctest.h>

#include <future>
#include <map>
#include <mutex>

#include "tests/bus/kafka_test_support.hpp"
#include "bus/kafka_producer.hpp"
#include "bus/kafka_table.hpp"

using namespace prov;
using namespace prov::bus::kafka;

namespace {

/// A stand-in for the RocksDB state: key -> value, plus stored positions.
struct fake_state {
  std::mutex mu;
  std::map<std::string, std::string> rows;
  std::map<int32_t, int64_t> positions;
  int applies = 0;
  int fail_next = 0;

  table_reader::apply_fn apply() {
    return [this](const std::vector<message>& batch) -> error {
      std::lock_guard<std::mutex> lock(mu);
      if (fail_next > 0) {
        --fail_next;
        return {error_code::storage_failure, "injected"};
      }
      ++applies;
      for (const auto& m : batch) {
        if (m.tombstone)
          rows.erase(m.key);
        else
          rows[m.key] = m.value;
        positions[m.id.partition] = m.id.offset + 1;
      }
      return {};
    };
  }
};

record rec(const std::string& topic, std::string key, std::string value) {
  record r;
  r.topic = topic;
  r.key = std::move(key);
  r.value = std::move(value);
  return r;
}

delivery send_sync(producer& p, record r) {
  std::promise<delivery> done;
  auto fut = done.get_future();
  REQUIRE(p.send(std::move(r), [&done](const delivery& d) { done.set_value(d); }).ok());
  return fut.get();
}

} // namespace

TEST_SUITE("kafka_table") {

TEST_CASE("catches up from the beginning, then resumes from stored positions") {
  test::mock_fixture f;
  const std::string topic = f.cfg.topic_prefix + "table";
  REQUIRE(f.mc->create_topics({{topic, 4, 3, true}}).ok());
  std::unique_ptr<producer> prod;
  REQUIRE(producer::create(f.cfg, {}, prod).ok());
  for (int i = 0; i < 200; ++i)
    REQUIRE(send_sync(*prod, rec(topic, "k" + std::to_string(i % 50), "v" + std::to_string(i)))
              .err.ok());
  fake_state st;
  {
    std::unique_ptr<table_reader> t;
    table_reader::options o;
    o.topic = topic;
    o.log = f.logs.fn();
    REQUIRE(table_reader::create(f.cfg, o, st.apply(), t).ok());
    REQUIRE(t->wait_caught_up(15000).ok());
    std::lock_guard<std::mutex> lock(st.mu);
    CHECK(st.rows.size() == 50);
    CHECK(st.rows["k49"] == "v199"); // last write per key wins
  }
  // A tombstone and one more write while "down"; a restart from the stored
  // positions applies exactly those two records.
  {
    record tomb = rec(topic, "k1", "");
    tomb.tombstone = true;
    REQUIRE(send_sync(*prod, tomb).err.ok());
    REQUIRE(send_sync(*prod, rec(topic, "k-new", "x")).err.ok());
  }
  fake_state again;
  again.rows = st.rows;
  again.positions = st.positions;
  std::unique_ptr<table_reader> t;
  table_reader::options o;
  o.topic = topic;
  o.start = st.positions;
  o.log = f.logs.fn();
  REQUIRE(table_reader::create(f.cfg, o, again.apply(), t).ok());
  REQUIRE(t->wait_caught_up(15000).ok());
  std::lock_guard<std::mutex> lock(again.mu);
  CHECK(again.rows.count("k1") == 0);
  CHECK(again.rows["k-new"] == "x");
  CHECK(again.rows.size() == 50);
}

/// A fresh 2-partition compacted topic, a producer for it, and a reader
/// applying into `st` that retries failed applies every 50 ms.
struct retrying_table {
  test::mock_fixture f;
  std::string topic;
  std::unique_ptr<producer> prod;
  std::unique_ptr<table_reader> t;

  retrying_table(const std::string& name, fake_state& st) {
    topic = f.cfg.topic_prefix + name;
    REQUIRE(f.mc->create_topics({{topic, 2, 3, true}}).ok());
    REQUIRE(producer::create(f.cfg, {}, prod).ok());
    table_reader::options o;
    o.topic = topic;
    o.retry_ms = 50;
    o.log = f.logs.fn();
    REQUIRE(table_reader::create(f.cfg, o, st.apply(), t).ok());
  }
};

TEST_CASE("wait_applied gives read-your-writes; a failing apply is retried, not skipped") {
  fake_state st;
  st.fail_next = 2;
  retrying_table rt("table", st);
  auto& t = rt.t;
  auto& prod = rt.prod;
  const auto& topic = rt.topic;
  REQUIRE(t->wait_caught_up(15000).ok()); // empty topic: at once
  auto d = send_sync(*prod, rec(topic, "device-7", "assigned"));
  REQUIRE(d.err.ok());
  REQUIRE(t->wait_applied(d.partition, d.offset, 15000).ok());
  {
    std::lock_guard<std::mutex> lock(st.mu);
    CHECK(st.rows["device-7"] == "assigned");
    CHECK(st.fail_next == 0); // both injected failures were retried
  }
  // Waiting for an offset that will never be written times out cleanly.
  auto err = t->wait_applied(d.partition, d.offset + 100, 200);
  CHECK(err.code == error_code::unavailable);
  CHECK(err.message.find("not applied locally") != std::string::npos);
}

TEST_CASE("a permanent apply error ends the waits at once, logged once; the batch is still retried") {
  test::mock_fixture f;
  const std::string topic = f.cfg.topic_prefix + "stuck";
  REQUIRE(f.mc->create_topics({{topic, 2, 3, true}}).ok());
  std::unique_ptr<producer> prod;
  REQUIRE(producer::create(f.cfg, {}, prod).ok());
  auto d = send_sync(*prod, rec(topic, "enrollment/x", "sealed under a key we lack"));
  REQUIRE(d.err.ok());
  fake_state st;
  st.fail_next = 1 << 30; // until released
  std::unique_ptr<table_reader> t;
  table_reader::options o;
  o.topic = topic;
  o.retry_ms = 50;
  o.log = f.logs.fn();
  o.is_permanent = [](const error& e) { return e.message == "injected"; };
  REQUIRE(table_reader::create(f.cfg, o, st.apply(), t).ok());
  // Returns the apply's error, long before the 60 s timeout would.
  auto err = t->wait_caught_up(60000);
  CHECK(err.code == error_code::storage_failure);
  CHECK(err.message == "injected");
  err = t->wait_applied(d.partition, d.offset, 60000);
  CHECK(err.message == "injected");
  CHECK(test::eventually([&] {
    std::lock_guard<std::mutex> lock(st.mu);
    return st.fail_next < (1 << 30) - 3; // retried several times
  }));
  {
    std::lock_guard<std::mutex> lock(f.logs.mu);
    int logged = 0;
    for (const auto& l : f.logs.lines)
      logged += l.find("table " + topic + ": applying 1 records failed") != std::string::npos;
    CHECK(logged == 1); // not once per retry
  }
  {
    std::lock_guard<std::mutex> lock(st.mu);
    st.fail_next = 0; // the cause is gone (in provisiond: a restart with the key)
  }
  // Until the next apply succeeds, a waiter still gets the error at once.
  CHECK(test::eventually([&] { return t->wait_applied(d.partition, d.offset, 100).ok(); }));
  CHECK(t->wait_caught_up(15000).ok());
  std::lock_guard<std::mutex> lock(st.mu);
  CHECK(st.rows["enrollment/x"] == "sealed under a key we lack");
}

TEST_CASE("lag counts the records not applied yet, and drops to 0 once they are") {
  fake_state st;
  st.fail_next = 1 << 30; // every apply fails until released
  retrying_table rt("lag", st);
  auto& t = rt.t;
  for (const char* key : {"a", "b", "c"})
    REQUIRE(send_sync(*rt.prod, rec(rt.topic, key, "v")).err.ok());
  CHECK_MESSAGE(test::eventually([&] { return t->lag() == 3; }), "lag ", t->lag());
  {
    std::lock_guard<std::mutex> lock(st.mu);
    st.fail_next = 0;
  }
  CHECK_MESSAGE(test::eventually([&] { return t->lag() == 0; }), "lag ", t->lag());
  t->close();
  CHECK(t->lag() == 0);
}

TEST_CASE("two topics in one reader: one apply per poll for both, positions per topic") {
  test::mock_fixture f;
  const std::string a = f.cfg.topic_prefix + "two-a", b = f.cfg.topic_prefix + "two-b";
  REQUIRE(f.mc->create_topics({{a, 2, 3, true}, {b, 3, 3, false}}).ok());
  std::unique_ptr<producer> prod;
  REQUIRE(producer::create(f.cfg, {}, prod).ok());
  for (int i = 0; i < 20; ++i) {
    REQUIRE(send_sync(*prod, rec(a, "a" + std::to_string(i), "x")).err.ok());
    REQUIRE(send_sync(*prod, rec(b, "b" + std::to_string(i), "y")).err.ok());
  }
  // Per topic, as the caller stores them: (topic, partition) -> next offset.
  std::mutex mu;
  std::map<std::pair<std::string, int32_t>, int64_t> next;
  std::map<std::string, int> rows;
  auto apply = [&](const std::vector<message>& batch) -> error {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& m : batch) {
      ++rows[m.id.topic];
      next[{m.id.topic, m.id.partition}] = m.id.offset + 1;
    }
    return {};
  };
  auto starts = [&](const std::string& topic) {
    std::lock_guard<std::mutex> lock(mu);
    std::map<int32_t, int64_t> out;
    for (const auto& [k, off] : next)
      if (k.first == topic)
        out[k.second] = off;
    return out;
  };
  {
    std::unique_ptr<table_reader> t;
    table_reader::options o;
    o.topic = a;
    o.more_topics[b] = {};
    o.log = f.logs.fn();
    REQUIRE(table_reader::create(f.cfg, o, apply, t).ok());
    REQUIRE(t->wait_caught_up(15000).ok());
    {
      std::lock_guard<std::mutex> lock(mu);
      CHECK(rows[a] == 20);
      CHECK(rows[b] == 20);
    }
    // Read-your-writes on the second topic.
    auto d = send_sync(*prod, rec(b, "b-late", "z"));
    REQUIRE(d.err.ok());
    REQUIRE(t->wait_applied(b, d.partition, d.offset, 15000).ok());
    CHECK(t->lag(b) == 0);
    CHECK(t->wait_applied("not-read", 0, 0, 10).code == error_code::internal);
  }
  // Restart from the stored positions: only what came after, per topic.
  REQUIRE(send_sync(*prod, rec(a, "a-after", "x")).err.ok());
  REQUIRE(send_sync(*prod, rec(b, "b-after", "y")).err.ok());
  {
    std::lock_guard<std::mutex> lock(mu);
    rows.clear();
  }
  std::unique_ptr<table_reader> t;
  table_reader::options o;
  o.topic = a;
  o.start = starts(a);
  o.more_topics[b] = starts(b);
  o.log = f.logs.fn();
  REQUIRE(table_reader::create(f.cfg, o, apply, t).ok());
  REQUIRE(t->wait_caught_up(15000).ok());
  std::lock_guard<std::mutex> lock(mu);
  CHECK(rows[a] == 1);
  CHECK(rows[b] == 1);
}

TEST_CASE("a missing topic is reported by name") {
  test::mock_fixture f;
  fake_state st;
  std::unique_ptr<table_reader> t;
  table_reader::options o;
  o.topic = f.cfg.topic_prefix + "absent";
  o.metadata_timeout_ms = 500;
  auto err = table_reader::create(f.cfg, o, st.apply(), t);
  CHECK(err.message.find(o.topic) != std::string::npos);
  CHECK(err.message.find("does not exist") != std::string::npos);
}

} // TEST_SUITE
