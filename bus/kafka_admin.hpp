#pragma once
// Topic administration: create the topics provisiond needs when they are
// missing. Existing topics are left exactly as they are (partition count and
// configuration are never changed behind an operator's back).

#include <string>
#include <vector>

#include "config/config.hpp"
#include "messages/error.hpp"
#include "bus/kafka_common.hpp"

namespace prov::bus::kafka {

struct ensure_topics_result {
  std::vector<std::string> created;  ///< created by this call
  std::vector<std::string> existing; ///< already there (or created concurrently)
};

/// Creates every topic of `specs` that the cluster does not have (Kafka
/// CreateTopics, with cleanup.policy=compact where asked). Idempotent: topics
/// that exist, or that another instance creates at the same moment, are fine.
/// Errors name the topic (e.g. a replication factor above the broker count).
///
/// librdkafka 2.0.2's mock cluster does not implement CreateTopics: against
/// it this succeeds only when nothing is missing. Create topics on a mock
/// cluster with mock_cluster::create_topics() (dev-kafka and tests do).
[[nodiscard]] error ensure_topics(const config::kafka_config& cfg,
                                  const std::vector<topic_spec>& specs,
                                  ensure_topics_result* result = nullptr,
                                  int timeout_ms = 15000, const log_fn& log = {});

/// Names of the topics the cluster reports (metadata request).
[[nodiscard]] error list_topics(const config::kafka_config& cfg, std::vector<std::string>& out,
                                int timeout_ms = 10000, const log_fn& log = {});

} // namespace prov::bus::kafka
