#pragma once
// Shared by the transport tests: a mock cluster per test, unique topic and
// group names, and waiting on conditions with deadlines (never bare sleeps).

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "config/config.hpp"
#include "bus/kafka_common.hpp"
#include "bus/kafka_producer.hpp"
#include "bus/kafka_mock.hpp"

namespace prov::test {

/// Polls `pred` every 10 ms until it holds or `limit` passes.
template <class Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = std::chrono::seconds(15)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline) return pred();
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

/// "<base>-<pid>-<n>": names no other test (or earlier run) uses.
inline std::string unique_name(const std::string& base) {
  static std::atomic<int> n{0};
  return base + "-" + std::to_string(::getpid()) + "-" + std::to_string(++n);
}

/// Keeps librdkafka's and our log lines; printed only with PROV_TEST_KAFKA_LOG=1
/// (broker-down tests log connection errors by design).
struct log_capture {
  std::mutex mu;
  std::vector<std::string> lines;
  bus::kafka::log_fn fn() {
    const bool print = std::getenv("PROV_TEST_KAFKA_LOG") != nullptr;
    return [this, print](int level, std::string_view msg) {
      std::lock_guard<std::mutex> lock(mu);
      lines.emplace_back(std::to_string(level) + " " + std::string(msg));
      if (print) std::fprintf(stderr, "[kafka %d] %.*s\n", level, static_cast<int>(msg.size()),
                              msg.data());
    };
  }
  bool contains(const std::string& needle) {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& l : lines)
      if (l.find(needle) != std::string::npos) return true;
    return false;
  }
};

/// A mock cluster and a config pointing at it, with a topic prefix no other
/// test uses. Tests that inject faults get a private cluster; the others
/// share one, because destroying a mock cluster takes about a second.
struct mock_fixture {
  log_capture logs;
  std::unique_ptr<bus::kafka::mock_cluster> own;
  bus::kafka::mock_cluster* mc = nullptr;
  config::kafka_config cfg;

  enum class kind { shared, private_for_faults };

  explicit mock_fixture(kind k = kind::shared) {
    if (k == kind::shared) {
      static log_capture shared_logs;
      static std::unique_ptr<bus::kafka::mock_cluster> shared;
      if (!shared)
        REQUIRE(bus::kafka::mock_cluster::start(3, shared, shared_logs.fn()).ok());
      mc = shared.get();
    } else {
      REQUIRE(bus::kafka::mock_cluster::start(3, own, logs.fn()).ok());
      mc = own.get();
    }
    cfg.brokers = mc->bootstrap_servers();
    cfg.topic_prefix = unique_name("t") + ".";
    cfg.partitions = 4;
    cfg.replication_factor = 3;
    cfg.client_id = "provisiond-test";
    // Reconnect quickly after a broker comes back; fail slow deliveries
    // well inside the test timeout.
    cfg.properties["reconnect.backoff.max.ms"] = "500";
    cfg.properties["message.timeout.ms"] = "20000";
    // The mock delays a rebalance after a member leaves by the session
    // timeout minus 1 s (45 s by default): keep restarts quick. Not below
    // 3 s: the mock's first join takes 3 s and would expire the member.
    cfg.properties["session.timeout.ms"] = "3000";
    cfg.properties["heartbeat.interval.ms"] = "500";
  }

  /// A producer on this cluster, logging into `logs`.
  std::unique_ptr<bus::kafka::producer> make_producer(
    bus::kafka::producer::options po = {}) {
    po.log = logs.fn();
    std::unique_ptr<bus::kafka::producer> p;
    REQUIRE(bus::kafka::producer::create(cfg, po, p).ok());
    return p;
  }
};

/// Reads the first `n` records of one partition without a consumer group
/// (rd_kafka_assign, no join delay): checks what is in the log itself.
/// Values in log order; fewer than `n` when `limit` passes first.
std::vector<std::string> read_partition(const config::kafka_config& cfg, const std::string& topic,
                                        int32_t partition, std::size_t n,
                                        std::chrono::milliseconds limit = std::chrono::seconds(15));

} // namespace prov::test
