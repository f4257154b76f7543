// Offsets are committed only for finished messages, and only up to the
// first unfinished one in each partition.

#include <doctest/doctest.h>

#include <mutex>
#include <set>
#include <vector>

#include "tests/transport/kafka_test_support.hpp"
#include "transport/kafka_consumer.hpp"
#include "transport/kafka_producer.hpp"

using namespace prov;
using namespace prov::transport::kafka;
using prov::test::eventually;

TEST_SUITE("kafka_commit") {

TEST_CASE("unfinished messages are redelivered after a restart, finished ones are not") {
  test::mock_fixture f;
  const std::string topic = f.cfg.topic_prefix + "commits";
  const std::string tp = topic + "/0";
  REQUIRE(f.mc->create_topic(topic, 1, 3).ok());

  std::unique_ptr<producer> p;
  producer::options po;
  po.log = f.logs.fn();
  REQUIRE(producer::create(f.cfg, po, p).ok());
  std::atomic<int> acked{0};
  for (int i = 0; i < 10; ++i)
    REQUIRE(p->send({topic, "k", std::to_string(i), {}, -1}, [&](const delivery& d) {
               CHECK(d.err.ok());
               ++acked;
             }).ok());
  REQUIRE(eventually([&] { return acked.load() == 10; }));

  consumer::options co;
  co.group_id = test::unique_name("g");
  co.topics = {topic};
  co.revoke_grace_ms = 0; // the unfinished messages will never finish
  co.log = f.logs.fn();

  // First run: finish 0..4 and 7; leave 5, 6, 8 and 9 unfinished.
  std::mutex mu;
  std::vector<message_id> first;
  std::unique_ptr<consumer> c;
  REQUIRE(consumer::create(f.cfg, co,
                           [&](message&& m) {
                             std::lock_guard<std::mutex> lock(mu);
                             first.push_back(m.id);
                           },
                           c)
              .ok());
  REQUIRE(eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    return first.size() == 10;
  }));
  for (const message_id& id : first)
    if (id.offset < 5 || id.offset == 7) c->done(id);
  c->done(first[3]); // a second done() for the same message changes nothing
  REQUIRE(eventually([&] { return c->committed()[tp] == 5; }));
  c->close(); // final synchronous commit: still 5, offset 7 is past the gap
  CHECK(c->committed()[tp] == 5);
  CHECK(c->committed().size() == 1);
  c.reset();

  // Second run, same group: exactly 5..9 again, in order.
  std::vector<message> second;
  REQUIRE(consumer::create(f.cfg, co,
                           [&](message&& m) {
                             std::lock_guard<std::mutex> lock(mu);
                             second.push_back(std::move(m));
                           },
                           c)
              .ok());
  REQUIRE(eventually([&] {
    std::lock_guard<std::mutex> lock(mu);
    return second.size() >= 5;
  }));
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const message& m : second) c->done(m.id);
  }
  REQUIRE(eventually([&] { return c->committed()[tp] == 10; }));
  c->close();
  std::lock_guard<std::mutex> lock(mu);
  // In-order delivery: having started at 5, offsets 0..4 cannot follow.
  std::vector<int64_t> offsets;
  for (const message& m : second) {
    offsets.push_back(m.id.offset);
    CHECK(m.value == std::to_string(m.id.offset));
  }
  CHECK(offsets == std::vector<int64_t>{5, 6, 7, 8, 9});
}

} // TEST_SUITE
