#include "tests/bus/kafka_test_support.hpp"

#include <librdkafka/rdkafka.h>

namespace prov::test {

std::vector<std::string> read_partition(const config::kafka_config& cfg, const std::string& topic,
                                        int32_t partition, std::size_t n,
                                        std::chrono::milliseconds limit) {
  std::vector<std::string> out;
  char errstr[512];
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  rd_kafka_conf_set(conf, "bootstrap.servers", cfg.brokers.c_str(), errstr, sizeof errstr);
  rd_kafka_conf_set(conf, "log_level", "0", errstr, sizeof errstr);
  // A group id is required by the consumer API; assign() never joins it.
  rd_kafka_conf_set(conf, "group.id", "provisiond-test-reader", errstr, sizeof errstr);
  rd_kafka_conf_set(conf, "enable.auto.commit", "false", errstr, sizeof errstr);
  rd_kafka_t* rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
  REQUIRE_MESSAGE(rk, errstr);
  rd_kafka_topic_partition_list_t* parts = rd_kafka_topic_partition_list_new(1);
  rd_kafka_topic_partition_list_add(parts, topic.c_str(), partition)->offset =
      RD_KAFKA_OFFSET_BEGINNING;
  rd_kafka_assign(rk, parts);
  rd_kafka_topic_partition_list_destroy(parts);
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (out.size() < n && std::chrono::steady_clock::now() < deadline) {
    rd_kafka_message_t* m = rd_kafka_consumer_poll(rk, 50);
    if (!m) continue;
    if (!m->err) out.emplace_back(static_cast<const char*>(m->payload), m->len);
    rd_kafka_message_destroy(m);
  }
  rd_kafka_assign(rk, nullptr);
  rd_kafka_destroy(rk);
  return out;
}

} // namespace prov::test
