#pragma once
// Dead letters: a consumed record no stage can use (undecodable, unknown
// schema version, a handler that throws) is copied to "<prefix>dead-letter"
// with the reason, and only then marked done so its partition's offset can
// move past it. One bad record never stops a partition.

#include <functional>
#include <string>
#include <string_view>

#include "bus/kafka_common.hpp"
#include "bus/kafka_consumer.hpp"
#include "bus/kafka_producer.hpp"

namespace prov::bus::kafka {

/// Header names on a dead-lettered record (the original headers come first).
inline constexpr std::string_view dlq_reason = "dlq.reason";
inline constexpr std::string_view dlq_topic = "dlq.original.topic";
inline constexpr std::string_view dlq_partition = "dlq.original.partition";
inline constexpr std::string_view dlq_offset = "dlq.original.offset";
inline constexpr std::string_view dlq_timestamp = "dlq.original.timestamp";

/// The record to write: original key, value and headers, plus the dlq.*
/// headers above.
record dead_letter_record(const std::string& dead_letter_topic, const message& original,
                          std::string_view reason);

/// Writes dead_letter_record() and calls `written` once it is acknowledged
/// (typically: consumer.done(original.id), so the offset moves past it). A
/// failed write is tried `attempts` times in all; after that `written` is
/// not called, so the original stays uncommitted (redelivered after a
/// restart or rebalance, and dead-lettered then) and the failure is logged.
/// `p` must outlive the delivery callbacks (they end when it is closed).
void forward_to_dead_letter(producer& p, const std::string& dead_letter_topic,
                            const message& original, std::string_view reason,
                            std::function<void()> written, const log_fn& log = {},
                            int attempts = 3);

} // namespace prov::bus::kafka
