#include <doctest/doctest.h>

#include <string>

#include "config/config.hpp"

using namespace prov;
using namespace prov::config;

namespace {

std::string kafka_error(const std::string& text) {
  engine_config cfg;
  const error err = load_string(text, "k.toml", cfg);
  if (err) CHECK(err.code == error_code::bad_request);
  return err.message;
}

} // namespace

TEST_SUITE("kafka_config") {

TEST_CASE("no [kafka] section means embedded mode with documented defaults") {
  engine_config cfg;
  REQUIRE(load_string("", "k.toml", cfg).ok());
  CHECK_FALSE(cfg.kafka.enabled());
  CHECK(cfg.kafka.brokers.empty());
  CHECK(cfg.kafka.topic_prefix == "dps.");
  CHECK(cfg.kafka.partitions == 12);
  CHECK(cfg.kafka.replication_factor == 3);
  CHECK(cfg.kafka.client_id == "provisiond");
  CHECK(cfg.kafka.resend_after_s == 10);
  CHECK(cfg.kafka.fuse_stages);
  CHECK(cfg.kafka.properties.empty());
}

TEST_CASE("every [kafka] key round-trips, properties dotted with or without quotes") {
  const std::string text = R"([kafka]
brokers = "k1.example:9092, k2.example:9093,[::1]:9094"
topic_prefix = "prod.dps-"
partitions = 48
replication_factor = 1
client_id = "provisiond-eu1"
resend_after_s = 0
fuse_stages = false

[kafka.properties]
"security.protocol" = "SASL_SSL"
sasl.mechanism = "SCRAM-SHA-512"
"socket.keepalive.enable" = true
"message.timeout.ms" = 30000
)";
  engine_config cfg;
  const error err = load_string(text, "k.toml", cfg);
  REQUIRE_MESSAGE(err.ok(), err.message);
  const kafka_config& k = cfg.kafka;
  CHECK(k.enabled());
  CHECK(k.brokers == "k1.example:9092, k2.example:9093,[::1]:9094");
  CHECK(k.topic_prefix == "prod.dps-");
  CHECK(k.partitions == 48);
  CHECK(k.replication_factor == 1);
  CHECK(k.client_id == "provisiond-eu1");
  CHECK(k.resend_after_s == 0);
  CHECK_FALSE(k.fuse_stages);
  CHECK(k.properties == std::map<std::string, std::string>{
                           {"message.timeout.ms", "30000"},
                           {"sasl.mechanism", "SCRAM-SHA-512"},
                           {"security.protocol", "SASL_SSL"},
                           {"socket.keepalive.enable", "true"}});
  CHECK(validate(cfg).ok());
}

TEST_CASE("bad [kafka] values name file, line and key") {
  CHECK(kafka_error("[kafka]\nbrokers = \"localhost\"\n") ==
        "k.toml:2: kafka.brokers: expected \"HOST:PORT,HOST:PORT,...\", got \"localhost\"");
  CHECK(kafka_error("[kafka]\nbrokers = \"a:1,,b:2\"\n") ==
        "k.toml:2: kafka.brokers: expected \"HOST:PORT,HOST:PORT,...\", got \"a:1,,b:2\"");
  CHECK(kafka_error("[kafka]\nbrokers = \"a:0\"\n") ==
        "k.toml:2: kafka.brokers: expected \"HOST:PORT,HOST:PORT,...\", got \"a:0\"");
  CHECK(kafka_error("[kafka]\n\npartitions = 0\n") ==
        "k.toml:3: kafka.partitions: must be 1..10000, got 0");
  CHECK(kafka_error("[kafka]\nreplication_factor = 33\n") ==
        "k.toml:2: kafka.replication_factor: must be 1..32, got 33");
  CHECK(kafka_error("[kafka]\nresend_after_s = -1\n") ==
        "k.toml:2: kafka.resend_after_s: must be 0..3600, got -1");
  CHECK(kafka_error("[kafka]\ntopic_prefix = \"dps/\"\n") ==
        "k.toml:2: kafka.topic_prefix: must be at most 200 characters of A-Z a-z 0-9 . _ -, "
        "got \"dps/\"");
  CHECK(kafka_error("[kafka]\nclient_id = \"\"\n") ==
        "k.toml:2: kafka.client_id: must be 1..255 characters of A-Z a-z 0-9 . _ -, got \"\"");
  CHECK(kafka_error("[kafka]\nbrokerz = \"a:1\"\n") == "k.toml:2: kafka.brokerz: unknown key");
  CHECK(kafka_error("[kafka]\npartitions = \"12\"\n") ==
        "k.toml:2: kafka.partitions: expected integer, got string");
  CHECK(kafka_error("[kafka]\nfuse_stages = \"no\"\n") ==
        "k.toml:2: kafka.fuse_stages: expected boolean, got string");
  CHECK(kafka_error("[kafka.properties]\n\"linger.ms\" = 1.5\n") ==
        "k.toml:2: kafka.properties.linger.ms: expected string, integer or boolean, got float");
}

TEST_CASE("properties provisiond sets itself are rejected with the reason") {
  CHECK(kafka_error("[kafka]\nbrokers = \"a:1\"\n[kafka.properties]\nacks = \"1\"\n") ==
        "k.toml:4: kafka.properties.acks: set by provisiond, remove it (provisiond always "
        "produces with acks=all)");
  CHECK(kafka_error("[kafka.properties]\nenable.auto.commit = true\n") ==
        "k.toml:2: kafka.properties.enable.auto.commit: set by provisiond, remove it "
        "(provisiond commits offsets only after an effect is durable)");
  CHECK(kafka_error("[kafka.properties]\n\"bootstrap.servers\" = \"x:1\"\n") ==
        "k.toml:2: kafka.properties.bootstrap.servers: set by provisiond, remove it (set "
        "kafka.brokers instead)");
  CHECK(is_reserved_kafka_property("enable.idempotence"));
  CHECK(is_reserved_kafka_property("group.id"));
  CHECK_FALSE(is_reserved_kafka_property("security.protocol"));
}

TEST_CASE("validate checks a [kafka] section built in code") {
  engine_config cfg;
  cfg.kafka.brokers = "localhost:9092";
  CHECK(validate(cfg).ok());
  cfg.kafka.replication_factor = 0;
  CHECK(validate(cfg).message == "kafka.replication_factor: must be 1..32, got 0");
  cfg.kafka.replication_factor = 1;
  cfg.kafka.properties["enable.idempotence"] = "false";
  CHECK(validate(cfg).message ==
        "kafka.properties.enable.idempotence: set by provisiond, remove it (provisiond always "
        "produces idempotently)");
}

} // TEST_SUITE
