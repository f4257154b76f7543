// The topic table, topic creation (ensure_topics against the mock cluster)
// and the dead-letter record shape.

#include <doctest/doctest.h>

#include <algorithm>

#include "tests/bus/kafka_test_support.hpp"
#include "bus/kafka_admin.hpp"
#include "bus/kafka_bus.hpp"
#include "bus/kafka_dead_letter.hpp"
#include "bus/kafka_handles.hpp"
#include "bus/kafka_mock.hpp"

using namespace prov;
using namespace prov::bus;
using namespace prov::bus::kafka;

namespace {

bool has(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

} // namespace

TEST_SUITE("kafka_topics") {

TEST_CASE("the topic table follows the design, with the prefix and compacted state topics") {
  config::kafka_config cfg;
  cfg.partitions = 24;
  cfg.replication_factor = 3;
  const std::vector<topic_spec> t = topic_table(cfg);
  std::vector<std::string> names;
  for (const topic_spec& s : t) {
    names.push_back(s.name);
    CHECK(s.partitions == 24);
    CHECK(s.replication_factor == 3);
    const bool state = s.name == "dps.enrollments" || s.name == "dps.registrations";
    CHECK_MESSAGE(s.compacted == state, s.name);
    const bool input = s.name == "dps.registration.requested"
                       || s.name == "dps.registration.attested";
    CHECK_MESSAGE(s.log_append_time == input, s.name);
    std::map<std::string, std::string> want;
    if (state) want["cleanup.policy"] = "compact";
    if (input) want["message.timestamp.type"] = "LogAppendTime";
    CHECK(topic_configs(s) == want);
  }
  CHECK(names == std::vector<std::string>{
                     "dps.registration.requested", "dps.registration.attested",
                     "dps.registration.allocated", "dps.registration.completed",
                     "dps.device.assigned", "dps.enrollments", "dps.registrations",
                     "dps.dead-letter"});
  cfg.topic_prefix = "eu1-";
  CHECK(topic_for(cfg, topic::registration_completed) == "eu1-registration.completed");
  CHECK(dead_letter_topic(cfg) == "eu1-dead-letter");
}

TEST_CASE("events are keyed by registration id, device.assigned by device id") {
  registration_event ev;
  ev.registration_id = "reg-1";
  ev.device_id = "dev-1";
  CHECK(kafka_bus::key_for(topic::registration_attested, ev) == "reg-1");
  CHECK(kafka_bus::key_for(topic::registration_completed, ev) == "reg-1");
  CHECK(kafka_bus::key_for(topic::device_assigned, ev) == "dev-1");
  ev.device_id.clear();
  CHECK(kafka_bus::key_for(topic::device_assigned, ev) == "reg-1");
}

TEST_CASE("a dead-letter record keeps the original and says why and where from") {
  message m;
  m.id = {"dps.registration.attested", 3, 42, 7};
  m.key = "reg-1";
  m.value = "{not json";
  m.headers = {{"operation_id", "op-1"}};
  m.timestamp_ms = 1700000000000;
  const record r = dead_letter_record("dps.dead-letter", m, "undecodable event: x");
  CHECK(r.topic == "dps.dead-letter");
  CHECK(r.key == "reg-1");
  CHECK(r.value == "{not json");
  CHECK(r.partition == -1);
  REQUIRE(r.headers.size() == 6);
  CHECK(r.headers[0].name == "operation_id");
  CHECK(*find_header(r.headers, dlq_reason) == "undecodable event: x");
  CHECK(*find_header(r.headers, dlq_topic) == "dps.registration.attested");
  CHECK(*find_header(r.headers, dlq_partition) == "3");
  CHECK(*find_header(r.headers, dlq_offset) == "42");
  CHECK(*find_header(r.headers, dlq_timestamp) == "1700000000000");
}

TEST_CASE("ensure_topics is idempotent and leaves existing topics alone") {
  test::mock_fixture f;
  f.cfg.replication_factor = 5; // above the broker count: the mock caps it
  const std::vector<topic_spec> table = topic_table(f.cfg);
  REQUIRE(f.mc->create_topics(table).ok());
  REQUIRE(f.mc->create_topics(table).ok()); // again: existing topics are fine

  for (int round = 0; round < 2; ++round) {
    ensure_topics_result res;
    const error err = ensure_topics(f.cfg, table, &res, 5000, f.logs.fn());
    REQUIRE_MESSAGE(err.ok(), err.message);
    CHECK(res.created.empty());
    CHECK(res.existing.size() == table.size());
  }
  std::vector<std::string> names;
  REQUIRE(list_topics(f.cfg, names, 5000, f.logs.fn()).ok());
  for (const topic_spec& s : table) CHECK_MESSAGE(has(names, s.name), s.name);
}

TEST_CASE("ensure_topics reports a missing topic it cannot create (the mock has no CreateTopics)") {
  test::mock_fixture f;
  const std::string name = f.cfg.topic_prefix + "missing";
  ensure_topics_result res;
  const error err = ensure_topics(f.cfg, {{name, 2, 1, true}}, &res, 300, f.logs.fn());
  // librdkafka 2.0.2's mock broker does not implement CreateTopics; a real
  // cluster creates the topic here. What matters: no silent success.
  CHECK(err.code == error_code::unavailable);
  CHECK(err.message.find("CreateTopics") != std::string::npos);
  std::vector<std::string> names;
  REQUIRE(list_topics(f.cfg, names, 5000, f.logs.fn()).ok());
  CHECK_FALSE(has(names, name)); // and the metadata probe did not auto-create it
}

} // TEST_SUITE

TEST_SUITE("kafka_config_translation") {

TEST_CASE("a property librdkafka rejects stops client creation, naming the key") {
  config::kafka_config cfg;
  cfg.brokers = "127.0.0.1:1";
  cfg.properties["no.such.property"] = "1";
  std::unique_ptr<producer> p;
  const error err = producer::create(cfg, {}, p);
  CHECK(err.code == error_code::bad_request);
  CHECK(err.message.rfind("kafka.properties.no.such.property: ", 0) == 0);
  CHECK_FALSE(p);

  cfg.properties = {{"linger.ms", "not-a-number"}};
  std::unique_ptr<consumer> c;
  consumer::options co;
  co.group_id = "g";
  co.topics = {"t"};
  const error err2 = consumer::create(cfg, co, [](message&&) {}, c);
  CHECK(err2.message.rfind("kafka.properties.linger.ms: ", 0) == 0);
  CHECK_FALSE(c);
}

} // TEST_SUITE

namespace {

std::string conf_value(const config::kafka_config& cfg, const internal::property_list& enforced,
                       const char* name) {
  internal::conf_ptr conf;
  REQUIRE(make_conf(cfg, internal::client_defaults({}), enforced, conf).ok());
  char buf[64];
  size_t size = sizeof buf;
  REQUIRE(rd_kafka_conf_get(conf.get(), name, buf, &size) == RD_KAFKA_CONF_OK);
  return buf;
}

} // namespace

TEST_CASE("a group member's socket timeout covers a SyncGroup held for the whole session") {
  config::kafka_config cfg;
  const internal::property_list member = {{"group.id", "g"}};
  // librdkafka's default session (45 s): held SyncGroups are not abandoned at 10 s.
  CHECK(conf_value(cfg, member, "socket.timeout.ms") == "48000");
  // The mock's suggested properties: 6 s + 3 s is under provisiond's 10 s.
  for (const auto& p : mock_client_properties())
    cfg.properties[p.name] = p.value;
  CHECK(conf_value(cfg, member, "socket.timeout.ms") == "10000");
  cfg.properties["session.timeout.ms"] = "20000";
  CHECK(conf_value(cfg, member, "socket.timeout.ms") == "23000");
  // Not a group member (producer, admin): the 10 s default stays.
  CHECK(conf_value(cfg, {}, "socket.timeout.ms") == "10000");
  // Set by the operator: theirs.
  cfg.properties["socket.timeout.ms"] = "5000";
  CHECK(conf_value(cfg, member, "socket.timeout.ms") == "5000");
}
