#pragma once
// Kafka consumer-group member that commits an offset only when the caller
// says the message's effect is durable.
//
// Commits: enable.auto.commit=false. done(m) marks one message finished; per
// partition the consumer commits the end of the longest finished prefix of
// what it delivered (the next offset after the highest contiguous finished
// one), so a message that was delivered but never finished is redelivered
// after a restart or rebalance, and everything after it in its partition
// too. Stages are idempotent on operation id, so redelivery is harmless.
//
// Rebalancing: eager (range/roundrobin), not cooperative. On revocation the
// consumer waits up to revoke_grace_ms for in-flight messages to finish,
// commits the finished prefix synchronously, then forgets the partitions;
// done() calls arriving later for them are ignored (the new owner gets those
// messages again). Eager keeps the bookkeeping simple (all partitions change
// hands at once, with one commit point); cooperative-sticky would keep
// unaffected partitions flowing during a rebalance and is a later
// optimisation.
//
// Topics: one consumer may follow several (kafka_bus's one_consumer: a
// process's stage topics in one group); commits and in-flight tracking are
// per partition, the in-flight bound and revocation per consumer.
//
// Threading: the consumer owns one thread that polls librdkafka, serves
// rebalances, delivers messages to the handler one at a time in partition
// order, and commits. The handler must not block (hand the message to an
// actor mailbox) and should not throw: an exception is logged and the
// message stays unfinished. done() may be called from any thread.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "messages/error.hpp"
#include "bus/kafka_common.hpp"

namespace prov::bus::kafka {

/// Identifies one delivered message for done().
struct message_id {
  std::string topic;
  int32_t partition = -1;
  int64_t offset = -1;
  uint64_t epoch = 0; ///< assignment generation it was delivered under
};

/// A consumed message.
struct message {
  message_id id;
  std::string key;
  std::string value;
  bool tombstone = false; ///< null value (compacted topics: the key was deleted)
  std::vector<header> headers;
  int64_t timestamp_ms = -1;
};

class consumer {
public:
  struct options {
    std::string group_id;            ///< required
    std::vector<std::string> topics; ///< required
    /// Where a group with no committed offset starts. "earliest": a new
    /// group sees everything already in the topic.
    std::string auto_offset_reset = "earliest";
    /// Delivered but unfinished messages; above this the consumer pauses
    /// its partitions until half of them are done (bounded memory).
    std::size_t max_in_flight = 10000;
    /// Longest a revocation waits for in-flight messages to finish.
    int revoke_grace_ms = 1000;
    /// Where the consumer keeps lag() current (one is made when null), so a
    /// metric can read it after the consumer is replaced or gone.
    std::shared_ptr<std::atomic<int64_t>> lag_out;
    /// Where the consumer keeps the number of partitions it owns (as
    /// lag_out): 0 between a revocation and the next assignment, so a
    /// failover shows in a scrape.
    std::shared_ptr<std::atomic<int64_t>> partitions_out;
    /// For a consumer of several topics: the same two figures per topic
    /// (by Kafka topic name), besides the totals above.
    std::map<std::string, std::shared_ptr<std::atomic<int64_t>>> lag_by_topic;
    std::map<std::string, std::shared_ptr<std::atomic<int64_t>>> partitions_by_topic;
    /// Upgrading from other groups (kafka_bus's one_consumer: the previous
    /// version's group per stage topic), by topic name: an assigned
    /// partition this group has no committed offset for starts where that
    /// group committed, and the offset is committed in this group at once
    /// (so it is seeded once); auto_offset_reset when neither has one.
    /// Read in the rebalance callback with a short-lived consumer per group.
    std::map<std::string, std::string> seed_groups;
    /// Bounds all of the seeding reads of one assignment; past it the
    /// remaining partitions start as auto_offset_reset says.
    int seed_timeout_ms = 10000;
    log_fn log;
  };
  using handler = std::function<void(message&&)>;

  /// Creates the consumer, joins the group and starts delivering to `h`.
  [[nodiscard]] static error create(const config::kafka_config& cfg, options opts, handler h,
                                    std::unique_ptr<consumer>& out);

  ~consumer(); ///< close()

  consumer(const consumer&) = delete;
  consumer& operator=(const consumer&) = delete;

  /// The effect of the message is durable; its offset may be committed once
  /// every earlier delivered message of its partition is done. Thread-safe.
  void done(const message_id& id);

  /// Stops delivering, commits the finished prefixes synchronously, leaves
  /// the group. Unfinished messages are redelivered to the next owner.
  void close();

  /// Partitions currently assigned, as "topic/partition".
  std::vector<std::string> assignment() const;

  /// Offsets this consumer has successfully committed (next offset to read),
  /// by "topic/partition".
  std::map<std::string, int64_t> committed() const;

  /// Records of the assigned partitions not finished yet: per partition, the
  /// high watermark of the last fetch minus the first unfinished offset (the
  /// next commit point), or minus the fetch position when every delivered
  /// message is done. Refreshed by the consumer thread every lag_refresh_ms
  /// from librdkafka's cached watermarks (no broker round trip); this only
  /// reads an atomic. 0 without partitions and once closed.
  int64_t lag() const;
  static constexpr int lag_refresh_ms = 100;

  struct impl;

private:
  explicit consumer(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

} // namespace prov::bus::kafka
