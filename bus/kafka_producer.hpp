#pragma once
// Idempotent Kafka producer (enable.idempotence=true, acks=all) that tells
// each caller when its record is durable in Kafka.
//
// Threading: send() may be called from any thread and never blocks on the
// network. The producer owns one poll thread; delivery callbacks run there
// (or on the thread calling close(), while it flushes). Keep them short and
// non-blocking: hand the result to an actor mailbox or a promise.
//
// Fatal errors: an idempotent producer can hit a fatal error (sequence or
// epoch mismatch; rd_kafka_fatal_error()), after which librdkafka refuses
// all further sends. This producer then destroys the handle, creates a new
// one (a new producer id) and re-sends every record not yet acknowledged, in
// the original order. A record that was in flight when the error happened
// may already be in the log, so it can appear TWICE. Consumers are
// idempotent on operation id, which makes that harmless; order by first
// occurrence is kept.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "messages/error.hpp"
#include "bus/kafka_common.hpp"

namespace prov::bus::kafka {

/// A record to produce.
struct record {
  std::string topic;
  std::string key;
  std::string value;
  std::vector<header> headers;
  int32_t partition = -1; ///< -1: chosen from the key (murmur2, like Java clients)
  bool tombstone = false; ///< send a null value (deletes the key of a compacted topic)
};

/// The outcome of one send().
struct delivery {
  error err;             ///< ok: written to all in-sync replicas (acks=all)
  std::string topic;
  int32_t partition = -1;
  int64_t offset = -1;   ///< offset in the partition when ok
  /// On failure: the broker may nevertheless have written it (a timeout
  /// after the request left). Retrying then may duplicate; dedupe on op id.
  bool possibly_persisted = false;
};

using delivery_fn = std::function<void(const delivery&)>;

class producer {
public:
  struct options {
    /// Longest close() waits for outstanding records.
    int flush_timeout_ms = 10000;
    /// Records accepted but not yet acknowledged; send() refuses beyond this
    /// (back-pressure: the caller answers 429/503 instead of queueing).
    std::size_t max_pending = 100000;
    log_fn log;
  };

  /// Creates the librdkafka handle and starts the poll thread. Fails on bad
  /// configuration (named as kafka.properties.<key>), not on absent brokers:
  /// those are retried until message.timeout.ms.
  [[nodiscard]] static error create(const config::kafka_config& cfg, options opts,
                                    std::unique_ptr<producer>& out);

  ~producer(); ///< close()

  producer(const producer&) = delete;
  producer& operator=(const producer&) = delete;

  /// Queues `r`. When this returns an error (closed, max_pending reached,
  /// record refused by librdkafka) `done` is never called. Otherwise `done`
  /// is called exactly once: ok once acknowledged, or an error (e.g.
  /// message.timeout.ms exceeded, or close() before delivery).
  [[nodiscard]] error send(record r, delivery_fn done);

  /// Stops accepting, waits up to flush_timeout_ms for outstanding records,
  /// fails the rest, stops the poll thread. Idempotent.
  void close();

  /// Records accepted and not yet completed.
  std::size_t pending() const;

  /// How many times the handle was rebuilt after a fatal error.
  uint64_t rebuilds() const;

  /// pending() and rebuilds() as atomics the producer keeps current, for
  /// metrics: readable without a lock or a librdkafka call, and after the
  /// producer is gone (pending then reads 0).
  struct counters {
    std::atomic<int64_t> pending{0};
    std::atomic<uint64_t> rebuilds{0};
  };
  std::shared_ptr<const counters> shared_counters() const;

  /// Tests only: raises a fabricated fatal error (rd_kafka_test_fatal_error)
  /// as the idempotence machinery would, to exercise the rebuild path.
  void inject_fatal_error_for_test();

  struct impl;

private:
  explicit producer(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

} // namespace prov::bus::kafka
