#pragma once
// Integration tests over Kafka: a librdkafka mock cluster inside the test
// process (it outlives kill -9 of any provisiond), configs pointing
// provisiond at it, and plain librdkafka clients to read and write topics.

#include <doctest/doctest.h>

#include <librdkafka/rdkafka.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "config/config.hpp"
#include "tests/support/server_process.hpp"
#include "bus/kafka_common.hpp"
#include "bus/kafka_mock.hpp"
#include "storage/keyring.hpp"

namespace prov::test {

namespace kafka = prov::bus::kafka;

inline constexpr int kafka_partitions = 4;

/// The [kafka.properties] table `provisiond dev-kafka` prints: the tests run
/// on exactly what users paste.
inline std::string mock_properties_section() {
  std::string out = "[kafka.properties]\n";
  for (const auto& p : bus::kafka::mock_client_properties())
    out += "\"" + std::string(p.name) + "\" = \"" + p.value + "\"\n";
  return out;
}

/// A mock cluster with provisiond's topics, and a temp data dir whose config
/// points the server at it.
struct kafka_fixture {
  std::unique_ptr<kafka::mock_cluster> mc;
  config::kafka_config cfg;
  std::string dir;
  bool fuse_stages = true; ///< kafka.fuse_stages of the servers' configs

  explicit kafka_fixture(int brokers = 1) {
    // Errors only: the mock's own notices are noise here.
    kafka::log_fn quiet = [](int level, std::string_view msg) {
      if (level <= 3)
        MESSAGE("mock: " << std::string(msg));
    };
    REQUIRE(!kafka::mock_cluster::start(brokers, mc, quiet));
    cfg.brokers = mc->bootstrap_servers();
    cfg.partitions = kafka_partitions;
    cfg.replication_factor = brokers >= 3 ? 3 : 1;
    // The mock does not implement CreateTopics (docs/kafka.md): create them
    // the way dev-kafka does; provisiond then finds them all present.
    REQUIRE(!mc->create_topics(kafka::topic_table(cfg)));
    dir = make_temp_dir("provisiond-kafka-it");
    REQUIRE(!dir.empty());
    // One key file for every process of the deployment: dps.enrollments is
    // sealed with it (docs/security.md#kafka-mode).
    std::shared_ptr<const storage::keyring> ring;
    auto err = storage::keyring::create(key_file(), ring);
    REQUIRE_MESSAGE(!err, err.message);
  }
  /// The key-encryption key file every server_config() shares.
  std::string key_file() const { return dir + "/secrets.key"; }
  /// A dps.enrollments value as the servers read it: opened when sealed
  /// (docs/security.md#kafka-mode), else as it is.
  std::string open_enrollment_record(const std::string& key, const std::string& value) const {
    if (!storage::keyring::is_sealed(value))
      return value;
    std::shared_ptr<const storage::keyring> ring;
    auto err = storage::keyring::load(key_file(), ring);
    REQUIRE_MESSAGE(!err, err.message);
    std::string plain;
    err = ring->open(value, "kafka:dps.enrollments/" + key, plain);
    REQUIRE_MESSAGE(!err, err.message);
    return plain;
  }
  ~kafka_fixture() { remove_tree(dir); }

  std::string server_config() const {
    // The mock's properties (mock_client_properties: why each).
    return server_config(dir);
  }

  /// The same for another process's data dir (each needs its own; the key
  /// file is shared).
  std::string server_config(const std::string& data_dir) const {
    return default_config(data_dir) + "[secrets]\nkey_file = \"" + key_file() + "\"\n"
           + "[kafka]\nbrokers = \"" + cfg.brokers
           + "\"\npartitions = " + std::to_string(kafka_partitions)
           + "\nreplication_factor = " + std::to_string(cfg.replication_factor) + "\n"
           + "fuse_stages = " + (fuse_stages ? "true" : "false") + "\n"
           + mock_properties_section()
           // Debugging aid: extra [kafka.properties] lines for every process.
           + (std::getenv("PROV_TEST_KAFKA_PROPS")
                ? std::getenv("PROV_TEST_KAFKA_PROPS") + std::string("\n")
                : std::string());
  }
};

struct kafka_record {
  std::string operation_id; ///< header operation_id
  std::string ce_type;      ///< header ce_type (device.assigned only)
  std::string key;
  std::string value;
};

/// Every record of `topic` (its cfg.partitions partitions, from the beginning). Reads until
/// `at_least` records arrived and nothing new came for `quiet`, or `limit`.
inline std::vector<kafka_record> read_topic(const config::kafka_config& cfg, const std::string& topic,
                                     std::size_t at_least,
                                     std::chrono::milliseconds quiet = std::chrono::seconds(1),
                                     std::chrono::milliseconds limit = std::chrono::seconds(30)) {
  std::vector<kafka_record> out;
  char errstr[512];
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  rd_kafka_conf_set(conf, "bootstrap.servers", cfg.brokers.c_str(), errstr, sizeof errstr);
  rd_kafka_conf_set(conf, "log_level", "0", errstr, sizeof errstr);
  // Required by the consumer API; assign() never joins the group.
  rd_kafka_conf_set(conf, "group.id", "provisiond-it-reader", errstr, sizeof errstr);
  rd_kafka_conf_set(conf, "enable.auto.commit", "false", errstr, sizeof errstr);
  rd_kafka_t* rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
  REQUIRE_MESSAGE(rk, errstr);
  rd_kafka_topic_partition_list_t* parts = rd_kafka_topic_partition_list_new(cfg.partitions);
  for (int p = 0; p < cfg.partitions; ++p)
    rd_kafka_topic_partition_list_add(parts, topic.c_str(), p)->offset =
      RD_KAFKA_OFFSET_BEGINNING;
  rd_kafka_assign(rk, parts);
  rd_kafka_topic_partition_list_destroy(parts);
  const auto start = std::chrono::steady_clock::now();
  auto last = start;
  for (;;) {
    const auto now = std::chrono::steady_clock::now();
    if (now - start > limit || (out.size() >= at_least && now - last > quiet))
      break;
    rd_kafka_message_t* m = rd_kafka_consumer_poll(rk, 50);
    if (!m)
      continue;
    if (!m->err) {
      kafka_record r;
      r.value.assign(static_cast<const char*>(m->payload), m->len);
      rd_kafka_headers_t* hs = nullptr;
      const void* v = nullptr;
      size_t n = 0;
      if (!rd_kafka_message_headers(m, &hs)) {
        if (!rd_kafka_header_get_last(hs, "operation_id", &v, &n))
          r.operation_id.assign(static_cast<const char*>(v), n);
        if (!rd_kafka_header_get_last(hs, "ce_type", &v, &n))
          r.ce_type.assign(static_cast<const char*>(v), n);
      }
      if (m->key)
        r.key.assign(static_cast<const char*>(m->key), m->key_len);
      out.push_back(std::move(r));
      last = std::chrono::steady_clock::now();
    }
    rd_kafka_message_destroy(m);
  }
  rd_kafka_assign(rk, nullptr);
  rd_kafka_destroy(rk);
  return out;
}

/// Produces raw records with a plain librdkafka producer (what a buggy or
/// hostile client could put on provisiond's topics).
inline void produce_raw(const config::kafka_config& cfg, const std::string& topic,
                 const std::vector<std::pair<std::string, std::string>>& records) {
  char errstr[512];
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  rd_kafka_conf_set(conf, "bootstrap.servers", cfg.brokers.c_str(), errstr, sizeof errstr);
  rd_kafka_conf_set(conf, "log_level", "0", errstr, sizeof errstr);
  rd_kafka_t* rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
  REQUIRE_MESSAGE(rk, errstr);
  for (const auto& [key, value] : records) {
    auto err = rd_kafka_producev(
      rk, RD_KAFKA_V_TOPIC(topic.c_str()),
      RD_KAFKA_V_KEY(const_cast<char*>(key.data()), key.size()),
      RD_KAFKA_V_VALUE(const_cast<char*>(value.data()), value.size()),
      RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
    REQUIRE(err == RD_KAFKA_RESP_ERR_NO_ERROR);
  }
  REQUIRE(rd_kafka_flush(rk, 10000) == RD_KAFKA_RESP_ERR_NO_ERROR);
  rd_kafka_destroy(rk);
}

} // namespace prov::test
