#pragma once
// Vocabulary shared by the Kafka transport (producer, consumer, admin, mock
// cluster, bus): message headers, the log hook and the topic table. Free of
// librdkafka headers; those stay inside bus/*.cpp.

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"
#include "bus/bus.hpp"

namespace prov::bus::kafka {

/// One Kafka record header. Names may repeat; order is kept.
struct header {
  std::string name;
  std::string value;
};

/// Value of the first header called `name`, or nullptr.
const std::string* find_header(const std::vector<header>& hs, std::string_view name) noexcept;

/// Log sink for the transport and librdkafka. `level` is syslog-style
/// (3 error, 4 warning, 6 info, 7 debug). Called from librdkafka's internal
/// threads too, so it must be thread-safe. Empty = stderr.
using log_fn = std::function<void(int level, std::string_view message)>;

/// Writes to `log`, or to stderr as "provisiond kafka: <message>" when empty.
void write_log(const log_fn& log, int level, std::string_view message);

// -- topics ------------------------------------------------------------------

/// A topic provisiond creates when it is missing.
struct topic_spec {
  std::string name;
  int partitions = 1;
  int replication_factor = 1;
  bool compacted = false; ///< cleanup.policy=compact: the latest value per key is kept
  /// message.timestamp.type=LogAppendTime: record timestamps are the
  /// broker's. Stage inputs whose timestamps become event times (the
  /// accepted and allocation times, docs/kafka.md), so a publisher's clock
  /// or choice cannot set them.
  bool log_append_time = false;
};

/// Full name of a stage topic, e.g. "dps.registration.attested".
std::string topic_for(const config::kafka_config& cfg, topic t);
/// "<prefix>enrollments": enrollments and groups, compacted, keyed by kind + id.
std::string enrollments_topic(const config::kafka_config& cfg);
/// "<prefix>registrations": registration records, compacted, keyed by registration id.
std::string registrations_topic(const config::kafka_config& cfg);
/// "<prefix>dead-letter": events no stage could decode, with the reason.
std::string dead_letter_topic(const config::kafka_config& cfg);

/// Every topic of the design's topic table (architecture.md) plus the
/// dead-letter topic, with the configured partitions and replication.
std::vector<topic_spec> topic_table(const config::kafka_config& cfg);

/// Topic-level configuration a CreateTopics request sets for `spec`
/// ({"cleanup.policy": "compact"} for compacted topics, else empty).
std::map<std::string, std::string> topic_configs(const topic_spec& spec);

} // namespace prov::bus::kafka
