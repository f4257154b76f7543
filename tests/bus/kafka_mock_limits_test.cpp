// What librdkafka's mock cluster (Debian 12: librdkafka 2.0.2) does not do,
// pinned down so the gap is a fact in the suite rather than a remark in a
// doc. These are canaries: when Debian's librdkafka learns the missing
// behaviour, a test here fails and says what to build next.

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <librdkafka/rdkafka.h>

#include "tests/bus/kafka_test_support.hpp"

using namespace prov;

namespace {

struct rk_deleter {
  void operator()(rd_kafka_t* h) const { rd_kafka_destroy(h); }
};
using rk_ptr = std::unique_ptr<rd_kafka_t, rk_deleter>;

rk_ptr make_client(rd_kafka_type_t type, const config::kafka_config& cfg,
                   std::vector<std::pair<std::string, std::string>> props) {
  char err[512];
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  props.emplace_back("bootstrap.servers", cfg.brokers);
  props.emplace_back("log_level", "0"); // the mock's chatter is not the point here
  for (const auto& [k, v] : props)
    REQUIRE_MESSAGE(rd_kafka_conf_set(conf, k.c_str(), v.c_str(), err, sizeof err) ==
                      RD_KAFKA_CONF_OK,
                    k << ": " << err);
  rd_kafka_t* h = rd_kafka_new(type, conf, err, sizeof err);
  REQUIRE_MESSAGE(h != nullptr, err);
  return rk_ptr(h);
}

void ok(rd_kafka_error_t* e, const char* what) {
  const std::string msg = e ? rd_kafka_error_string(e) : "";
  if (e)
    rd_kafka_error_destroy(e);
  REQUIRE_MESSAGE(msg.empty(), what << ": " << msg);
}

void produce(rd_kafka_t* p, const std::string& topic, const std::string& value) {
  REQUIRE(rd_kafka_producev(p, RD_KAFKA_V_TOPIC(topic.c_str()), RD_KAFKA_V_PARTITION(0),
                            RD_KAFKA_V_VALUE(const_cast<char*>(value.data()), value.size()),
                            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                            RD_KAFKA_V_END) == RD_KAFKA_RESP_ERR_NO_ERROR);
}

} // namespace

TEST_SUITE("kafka_mock_limits") {

TEST_CASE("the mock accepts transactions but read_committed still sees aborted records") {
  // Why exactly-once dps.device.assigned (transactional producer +
  // read_committed hubs) is not built: the one cluster the suite can run
  // cannot show it working. Transactions commit and abort without error, but
  // the mock's Fetch reports no aborted transactions and a last stable
  // offset at the log end, so a read_committed consumer sees an aborted
  // record and one of a transaction still open. docs/kafka.md, "Delivery
  // guarantees".
  test::mock_fixture f;
  const std::string topic = f.cfg.topic_prefix + "txn";
  REQUIRE(f.mc->create_topic(topic, 1, 3).ok());

  auto p = make_client(RD_KAFKA_PRODUCER, f.cfg, {{"transactional.id", topic + "-txn"}});
  ok(rd_kafka_init_transactions(p.get(), 15000), "init_transactions");
  ok(rd_kafka_begin_transaction(p.get()), "begin");
  produce(p.get(), topic, "aborted");
  REQUIRE(rd_kafka_flush(p.get(), 10000) == RD_KAFKA_RESP_ERR_NO_ERROR);
  ok(rd_kafka_abort_transaction(p.get(), 15000), "abort");
  ok(rd_kafka_begin_transaction(p.get()), "begin");
  produce(p.get(), topic, "committed");
  ok(rd_kafka_commit_transaction(p.get(), 15000), "commit");
  ok(rd_kafka_begin_transaction(p.get()), "begin");
  produce(p.get(), topic, "open");
  REQUIRE(rd_kafka_flush(p.get(), 10000) == RD_KAFKA_RESP_ERR_NO_ERROR);

  auto c = make_client(RD_KAFKA_CONSUMER, f.cfg,
                       {{"group.id", topic + "-reader"}, {"isolation.level", "read_committed"},
                        {"enable.auto.commit", "false"}});
  rd_kafka_poll_set_consumer(c.get());
  std::unique_ptr<rd_kafka_topic_partition_list_t, void (*)(rd_kafka_topic_partition_list_t*)>
    parts(rd_kafka_topic_partition_list_new(1), rd_kafka_topic_partition_list_destroy);
  rd_kafka_topic_partition_list_add(parts.get(), topic.c_str(), 0)->offset =
    RD_KAFKA_OFFSET_BEGINNING;
  REQUIRE(rd_kafka_assign(c.get(), parts.get()) == RD_KAFKA_RESP_ERR_NO_ERROR);
  std::vector<std::string> seen;
  REQUIRE(test::eventually([&] {
    if (rd_kafka_message_t* m = rd_kafka_consumer_poll(c.get(), 100)) {
      if (!m->err)
        seen.emplace_back(static_cast<const char*>(m->payload), m->len);
      rd_kafka_message_destroy(m);
    }
    return seen.size() >= 3;
  }));
  // A real broker delivers only "committed". If this fails, the mock now
  // filters: build the transactional path and test it (issue: exactly-once
  // assignment events).
  CHECK(seen == std::vector<std::string>{"aborted", "committed", "open"});
  rd_kafka_consumer_close(c.get());
}

TEST_CASE("the mock stores no offsets sent with a transaction and fences no zombie producer") {
  // The other half of exactly-once (issue 24): the input offset committed
  // with the output, atomically (send_offsets_to_transaction), and a
  // restarted worker fencing its old self (init_transactions bumps the
  // epoch). On librdkafka 2.0.2's mock every call succeeds, but the offsets
  // are not stored and the old producer's commit still goes through.
  test::mock_fixture f(test::mock_fixture::kind::private_for_faults);
  const std::string in = f.cfg.topic_prefix + "in";
  const std::string out = f.cfg.topic_prefix + "out";
  REQUIRE(f.mc->create_topic(in, 1, 3).ok());
  REQUIRE(f.mc->create_topic(out, 1, 3).ok());
  auto committed = [&](const std::string& group) {
    auto c = make_client(RD_KAFKA_CONSUMER, f.cfg, {{"group.id", group}});
    std::unique_ptr<rd_kafka_topic_partition_list_t, void (*)(rd_kafka_topic_partition_list_t*)>
      l(rd_kafka_topic_partition_list_new(1), rd_kafka_topic_partition_list_destroy);
    rd_kafka_topic_partition_list_add(l.get(), in.c_str(), 0);
    REQUIRE(rd_kafka_committed(c.get(), l.get(), 10000) == RD_KAFKA_RESP_ERR_NO_ERROR);
    return l->elems[0].offset;
  };
  std::unique_ptr<rd_kafka_topic_partition_list_t, void (*)(rd_kafka_topic_partition_list_t*)>
    offsets(rd_kafka_topic_partition_list_new(1), rd_kafka_topic_partition_list_destroy);
  rd_kafka_topic_partition_list_add(offsets.get(), in.c_str(), 0)->offset = 5;
  {
    // Control: a plain commit is stored.
    auto c = make_client(RD_KAFKA_CONSUMER, f.cfg, {{"group.id", in + "-plain"}});
    REQUIRE(rd_kafka_commit(c.get(), offsets.get(), 0) == RD_KAFKA_RESP_ERR_NO_ERROR);
  }
  CHECK(committed(in + "-plain") == 5);

  auto p = make_client(RD_KAFKA_PRODUCER, f.cfg, {{"transactional.id", out + "-txn"}});
  auto member = make_client(RD_KAFKA_CONSUMER, f.cfg, {{"group.id", in + "-txn"}});
  std::unique_ptr<rd_kafka_consumer_group_metadata_t, void (*)(rd_kafka_consumer_group_metadata_t*)>
    cgm(rd_kafka_consumer_group_metadata(member.get()), rd_kafka_consumer_group_metadata_destroy);
  ok(rd_kafka_init_transactions(p.get(), 15000), "init_transactions");
  ok(rd_kafka_begin_transaction(p.get()), "begin");
  produce(p.get(), out, "committed");
  ok(rd_kafka_send_offsets_to_transaction(p.get(), offsets.get(), cgm.get(), 15000),
     "send_offsets_to_transaction");
  ok(rd_kafka_commit_transaction(p.get(), 15000), "commit");
  // A real broker: 5. If this fails, the mock stores transactional offsets.
  CHECK(committed(in + "-txn") == RD_KAFKA_OFFSET_INVALID);

  ok(rd_kafka_begin_transaction(p.get()), "begin");
  produce(p.get(), out, "zombie");
  REQUIRE(rd_kafka_flush(p.get(), 10000) == RD_KAFKA_RESP_ERR_NO_ERROR);
  auto successor = make_client(RD_KAFKA_PRODUCER, f.cfg, {{"transactional.id", out + "-txn"}});
  ok(rd_kafka_init_transactions(successor.get(), 15000), "successor's init_transactions");
  // A real broker fences the first producer (its commit fails, fatally).
  // If this fails, the mock fences.
  rd_kafka_error_t* e = rd_kafka_commit_transaction(p.get(), 15000);
  CHECK_MESSAGE(e == nullptr, (e ? rd_kafka_error_string(e) : ""));
  if (e)
    rd_kafka_error_destroy(e);
}

TEST_CASE("the mock appends a batch behind one it failed; the client takes the failed one as written") {
  // Why the mock's clients run with one request in flight
  // (mock_client_properties, max.in.flight.requests.per.connection = 1):
  // librdkafka 2.0.2's mock checks idempotent-producer sequences only for
  // transactional producers. B fails while C, behind it on the same
  // connection, is appended; C's success then makes librdkafka acknowledge B
  // implicitly (a real broker refuses C with OUT_OF_ORDER_SEQUENCE_NUMBER, so
  // there a later success does prove B written). B is reported delivered,
  // without an offset, and is not in the log: under injected produce errors
  // the scale-out test lost dps.device.assigned records this way.
  test::mock_fixture f(test::mock_fixture::kind::private_for_faults);
  const std::string topic = f.cfg.topic_prefix + "gap";
  REQUIRE(f.mc->create_topic(topic, 1, 1).ok());
  REQUIRE(f.mc->partition_leader(topic, 0, 1).ok());
  struct report {
    rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR__FAIL;
    int64_t offset = -2;
    bool done = false;
  };
  static report reports[3]; // the C callback has no capture
  for (auto& r : reports)
    r = report{};
  char errstr[512];
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  // librdkafka's defaults otherwise: 5 requests in flight per connection.
  for (const auto& [k, v] : std::vector<std::pair<std::string, std::string>>{
         {"bootstrap.servers", f.cfg.brokers}, {"log_level", "0"},
         {"enable.idempotence", "true"}, {"acks", "all"}, {"linger.ms", "0"}})
    REQUIRE(rd_kafka_conf_set(conf, k.c_str(), v.c_str(), errstr, sizeof errstr) ==
            RD_KAFKA_CONF_OK);
  rd_kafka_conf_set_dr_msg_cb(conf, [](rd_kafka_t*, const rd_kafka_message_t* m, void*) {
    auto& r = reports[reinterpret_cast<uintptr_t>(m->_private)];
    r.err = m->err;
    r.offset = m->offset;
    r.done = true;
  });
  rk_ptr p(rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr));
  REQUIRE_MESSAGE(p, errstr);
  auto send = [&](uintptr_t i) {
    const std::string v(1, static_cast<char>('A' + i));
    REQUIRE(rd_kafka_producev(p.get(), RD_KAFKA_V_TOPIC(topic.c_str()), RD_KAFKA_V_PARTITION(0),
                              RD_KAFKA_V_VALUE(const_cast<char*>(v.data()), v.size()),
                              RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                              RD_KAFKA_V_OPAQUE(reinterpret_cast<void*>(i)),
                              RD_KAFKA_V_END) == RD_KAFKA_RESP_ERR_NO_ERROR);
  };
  send(0); // A: producer id and connection in place
  REQUIRE(rd_kafka_flush(p.get(), 10000) == RD_KAFKA_RESP_ERR_NO_ERROR);
  // B fails (a retriable error, nothing written), answered 1 s late.
  REQUIRE(f.mc->fail_next(1, bus::kafka::mock_cluster::api::produce,
                          RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS, 1000).ok());
  send(1);
  REQUIRE(test::eventually(
    [&] { return f.mc->pending_errors(1, bus::kafka::mock_cluster::api::produce) == 0; }));
  send(2); // C: sent while B's answer is still on its way
  REQUIRE(rd_kafka_flush(p.get(), 15000) == RD_KAFKA_RESP_ERR_NO_ERROR);
  for (const auto& r : reports)
    REQUIRE(r.done);
  const auto log = test::read_partition(f.cfg, topic, 0, 3, std::chrono::seconds(3));
  // If this fails, the mock now refuses the gap (or librdkafka no longer
  // acks implicitly): max.in.flight.requests.per.connection = 1 can leave
  // mock_client_properties.
  CHECK(reports[1].err == RD_KAFKA_RESP_ERR_NO_ERROR); // B "delivered"...
  CHECK(reports[1].offset == RD_KAFKA_OFFSET_INVALID); // ...without an offset...
  CHECK(log == std::vector<std::string>{"A", "C"});    // ...and not in the log
}

} // TEST_SUITE
