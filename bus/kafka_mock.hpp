#pragma once
// librdkafka's mock cluster: N in-process brokers speaking the real Kafka
// protocol on 127.0.0.1, keeping everything in memory. FOR DEVELOPMENT AND
// TESTS ONLY: nothing is durable, nothing is replicated for real, and the
// brokers listen on loopback only.
//
// librdkafka 2.0.2 binds each mock broker to an ephemeral port chosen by the
// kernel (there is no API to choose ports) and advertises that port in its
// metadata; read the addresses from bootstrap_servers().

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "messages/error.hpp"
#include "bus/kafka_common.hpp"

namespace prov::bus::kafka {

/// A client property suggested for clients of the mock cluster, and why.
struct suggested_property {
  const char* name;
  const char* value;
  const char* why;
};

/// The [kafka.properties] that clients of the mock cluster need: its
/// consumer-group rounds are timer-driven (the dead member's session, then a
/// join window of the session less 1 s), it holds an empty fetch for the
/// whole fetch wait, and it does not refuse an idempotent producer's
/// sequence gap (one request in flight, or acknowledged records go missing). `provisiond dev-kafka` prints these; the tests run on
/// them, so what a user pastes is what is tested.
const std::vector<suggested_property>& mock_client_properties();

class mock_cluster {
public:
  /// Kafka protocol ApiKeys usable with push_request_errors().
  enum class api : int16_t {
    produce = 0,
    fetch = 1,
    list_offsets = 2,
    metadata = 3,
    offset_commit = 8,
    offset_fetch = 9,
    find_coordinator = 10,
    join_group = 11,
    heartbeat = 12,
    sync_group = 14,
    init_producer_id = 22,
  };

  /// Starts `brokers` brokers (ids 1..brokers).
  [[nodiscard]] static error start(int brokers, std::unique_ptr<mock_cluster>& out,
                                   const log_fn& log = {});
  ~mock_cluster();

  mock_cluster(const mock_cluster&) = delete;
  mock_cluster& operator=(const mock_cluster&) = delete;

  /// "127.0.0.1:port,127.0.0.1:port,..."
  const std::string& bootstrap_servers() const noexcept;
  int broker_count() const noexcept;

  /// Creates a topic; an existing one is left alone (not an error). The
  /// replication factor is capped at the broker count.
  [[nodiscard]] error create_topic(const std::string& name, int partitions,
                                   int replication_factor);
  /// create_topic() for each spec. The mock has no topic configuration, so
  /// `compacted` is not enforced (compaction never runs on the mock).
  [[nodiscard]] error create_topics(const std::vector<topic_spec>& specs);

  /// Disconnects the broker and refuses connections (-1 = all). Leaders do
  /// not move: partitions led by a down broker are unavailable until up.
  [[nodiscard]] error broker_down(int32_t broker_id);
  [[nodiscard]] error broker_up(int32_t broker_id);
  /// Added latency per request on a broker (-1 = all).
  [[nodiscard]] error broker_rtt(int32_t broker_id, int rtt_ms);
  /// Makes `broker_id` the coordinator of consumer group `group`.
  [[nodiscard]] error group_coordinator(const std::string& group, int32_t broker_id);
  /// Moves the partition's leadership (-1 = leaderless).
  [[nodiscard]] error partition_leader(const std::string& topic, int32_t partition,
                                       int32_t broker_id);
  /// The next requests of kind `a` (cluster-wide) fail with these Kafka error
  /// codes, one per request, in order (e.g. 6 NOT_LEADER_FOR_PARTITION, 7
  /// REQUEST_TIMED_OUT, 19 NOT_ENOUGH_REPLICAS).
  void push_request_errors(api a, const std::vector<int>& kafka_error_codes);
  void clear_request_errors(api a);
  /// The next `count` requests of kind `a` to `broker_id` are processed
  /// normally but answered `rtt_ms` late: with rtt_ms above the client's
  /// request.timeout.ms, "written, but the acknowledgement was lost".
  [[nodiscard]] error delay_responses(int32_t broker_id, api a, int rtt_ms, int count = 1);
  /// The next request of kind `a` to `broker_id` fails with `kafka_error_code`
  /// (nothing is written), answered `rtt_ms` late: later requests on the same
  /// connection are processed meanwhile.
  [[nodiscard]] error fail_next(int32_t broker_id, api a, int kafka_error_code, int rtt_ms);
  /// How many injected errors or delays for `a` at `broker_id` are still to
  /// come (0 once the requests they were for arrived).
  std::size_t pending_errors(int32_t broker_id, api a) const;

  struct impl;

private:
  explicit mock_cluster(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

} // namespace prov::bus::kafka
