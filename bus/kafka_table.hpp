#pragma once
// Follows every partition of one topic, from positions the caller stored, to
// materialize it into local state: the compacted dps.enrollments and
// dps.registrations topics into each instance's RocksDB, and
// registration.completed into each gateway's operation records.
//
// More topics can share one reader (options::more_topics): one librdkafka
// client and one apply() per poll for all of them (a gateway's
// dps.registrations and registration.completed).
//
// No consumer group: every instance reads everything. The caller's apply
// function makes a batch durable together with the new positions (one
// RocksDB write), so each record is applied exactly once per instance, and a
// restart resumes where the last durable batch ended; an empty data
// directory rebuilds from the beginning of the topic.
//
// Threading: one thread polls librdkafka and calls apply() with batches in
// offset order per partition. A failing apply() is retried with the same
// batch after options::retry_ms (the table never skips a record). The wait_*
// calls block the caller: use them from detached actors or startup code.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "messages/error.hpp"
#include "bus/kafka_common.hpp"
#include "bus/kafka_consumer.hpp"

namespace prov::bus::kafka {

class table_reader {
public:
  struct options {
    std::string topic; ///< full name, e.g. "dps.enrollments"
    /// Next offset to read per partition; partitions not listed start at
    /// the beginning of the topic.
    std::map<int32_t, int64_t> start;
    /// Further topics read by the same client, with their start positions;
    /// a batch then mixes them (message::id.topic tells them apart).
    std::map<std::string, std::map<int32_t, int64_t>> more_topics;
    std::size_t max_batch = 1000;
    int retry_ms = 500;
    /// How long create() waits for the topic's partition count.
    int metadata_timeout_ms = 15000;
    log_fn log;
    /// Whether an apply() error cannot go away by retrying in this process
    /// (it lacks the key a record is sealed with): the batch is still
    /// retried, but logged once, and wait_caught_up / wait_applied return
    /// the error at once instead of waiting out their timeout.
    std::function<bool(const error&)> is_permanent;
  };
  /// Applies `batch` durably, together with the positions after it (the
  /// offset after each message, per partition). An error keeps the batch
  /// for a retry.
  using apply_fn = std::function<error(const std::vector<message>& batch)>;
  /// (applied so far, total to catch up) for progress lines.
  using progress_fn = std::function<void(int64_t done, int64_t total)>;

  /// Looks up the partitions, assigns them at their start positions and
  /// starts the reader thread.
  [[nodiscard]] static error create(const config::kafka_config& cfg, options opts,
                                    apply_fn apply, std::unique_ptr<table_reader>& out);
  ~table_reader(); ///< close()
  table_reader(const table_reader&) = delete;
  table_reader& operator=(const table_reader&) = delete;

  /// Blocks until every record in the topic when this was called is
  /// applied (high watermarks queried now). `progress` is called about once
  /// a second while waiting.
  [[nodiscard]] error wait_caught_up(int timeout_ms, const progress_fn& progress = {});

  /// Blocks until the record at (partition, offset) is applied: a write
  /// produced to the topic is then visible locally (read-your-writes).
  [[nodiscard]] error wait_applied(int32_t partition, int64_t offset, int timeout_ms);
  /// The same for a record of one of options::more_topics (or the topic).
  [[nodiscard]] error wait_applied(const std::string& topic, int32_t partition, int64_t offset,
                                   int timeout_ms);

  /// Next offset to apply per partition (of options::topic).
  std::map<int32_t, int64_t> positions() const;
  /// Records in the topic not applied yet, against the high watermarks of
  /// the last fetches (no broker round trip; cheap enough for a scrape). 0
  /// once closed.
  int64_t lag() const;
  /// The same for one of the topics read.
  int64_t lag(const std::string& topic) const;
  const std::string& topic() const;

  /// Stops the thread; a batch being applied finishes first. Idempotent.
  void close();

  struct impl;

private:
  explicit table_reader(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

} // namespace prov::bus::kafka
