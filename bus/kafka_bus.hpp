#pragma once
// bus::stage_bus over Kafka. Each bus topic is the Kafka topic
// "<prefix><topic name>"; events are encoded with the registration_event JSON
// codec (messages/registration.hpp) and keyed by registration id (device id
// for device.assigned), so per-device order holds on every hop.
//
// The engine uses it when [kafka] brokers is set (one process runs every
// stage; --roles comes later). Records that cannot be decoded, and events whose handler
// throws, go to "<prefix>dead-letter" with the reason and are committed past.

#include <array>
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "config/config.hpp"
#include "messages/error.hpp"
#include "bus/bus.hpp"
#include "bus/kafka_common.hpp"
#include "bus/kafka_consumer.hpp"
#include "bus/kafka_producer.hpp"

namespace prov::bus::kafka {

class kafka_bus final : public stage_bus {
public:
  struct options {
    /// Consumer group of a topic's subscriber: group_prefix + topic name
    /// (e.g. "provisiond.registration.attested"). All instances of a stage
    /// share it, so they split the partitions.
    std::string group_prefix = "provisiond.";
    producer::options producer_options;
    consumer::options consumer_options; ///< group_id and topics are set per topic
    /// One consumer for every subscription, in group group_prefix +
    /// "stages", dispatching by topic; it starts at start_consuming().
    /// Each librdkafka consumer has its own fetch loop and group
    /// membership, and against a broker that holds empty fetches (the mock)
    /// its idle wakeups cost CPU per second, so a worker running three
    /// stages pays that once instead of three times, and a kill rebalances
    /// one group instead of three. Off: a consumer (and group) per topic,
    /// consuming from subscribe_acked() on.
    bool one_consumer = false;
    log_fn log;
  };

  /// Receives an event and `ack`, to be called once the event's effect is
  /// durable (from any thread). Until then its offset is not committed. An
  /// ack after unsubscribe or close is ignored (the event is redelivered).
  using stage_bus::acked_handler;

  [[nodiscard]] static error create(const config::kafka_config& cfg, options opts,
                                    std::unique_ptr<kafka_bus>& out);
  ~kafka_bus() override; ///< close()

  /// Fire and forget: failures are logged (the durable operation record
  /// makes the event resumable).
  void publish(topic t, registration_event ev) override;

  /// `done` learns when the event is durable in Kafka (acks=all), e.g. to
  /// answer 202 only then. When this returns an error `done` is not called.
  [[nodiscard]] error publish(topic t, const registration_event& ev, delivery_fn done);

  /// publish() reporting durability as an error value; a refused send is
  /// reported through `done` too.
  void publish_durable(topic t, registration_event ev, durable_fn done) override;

  /// Offsets are committed when `h` returns: right for handlers whose effect
  /// is complete on return. A null handler unsubscribes. Consumer creation
  /// errors are logged; use subscribe_acked() to see them.
  /// Produces `rec` as is (key, value, headers) on the topic's Kafka topic.
  void publish_raw_durable(topic t, raw_record rec, durable_fn done) override;

  void subscribe(topic t, handler h) override;

  /// Offsets are committed only after `ack`. Replaces an earlier subscriber.
  /// With one_consumer, a topic added after start_consuming() restarts the
  /// shared consumer with it (one rebalance); unsubscribing one leaves its
  /// records unacked (the next owner gets them) and the consumer running
  /// for the others.
  [[nodiscard]] error subscribe_acked(topic t, acked_handler h) override;

  /// With one_consumer: creates the consumer of every subscribed topic.
  /// Otherwise nothing (each subscription consumes already).
  [[nodiscard]] error start_consuming() override;

  /// Produces any record (the compacted state topics) with the bus's
  /// producer; as producer::send.
  [[nodiscard]] error send_record(record r, delivery_fn done);
  /// Copies a record no reader can use to the dead-letter topic with the
  /// reason (table readers: they have no offset to hold back).
  void dead_letter(const message& m, std::string_view reason);
  /// Closes the consumers (committing finished work), then flushes the
  /// producer. Idempotent.
  /// See bus::stop_consuming(): closes every consumer, in parallel.
  void stop_consuming() override;
  void close();

  /// Offsets committed by the subscriber of `t` ("topic/partition" -> next
  /// offset); empty when there is none.
  std::map<std::string, int64_t> committed(topic t) const;

  /// Records sent to the dead-letter topic so far.
  uint64_t dead_lettered() const noexcept { return *dead_lettered_; }
  /// The same count, readable after the bus is gone (metrics scrape it).
  std::shared_ptr<const std::atomic<uint64_t>> dead_letter_counter() const noexcept {
    return dead_lettered_;
  }

  /// The producer's queue and rebuild counts (producer::shared_counters()).
  std::shared_ptr<const producer::counters> producer_counters() const;
  /// The lag of this bus's subscriber of `t` (consumer::lag()), kept in one
  /// place across re-subscriptions and after the bus is gone (then 0).
  std::shared_ptr<const std::atomic<int64_t>> consumer_lag(topic t) const {
    return consumer_lags_[static_cast<std::size_t>(t)];
  }

  /// Partitions of `t` this bus's subscriber owns now (consumer
  /// partitions_out), kept like consumer_lag().
  std::shared_ptr<const std::atomic<int64_t>> consumer_partitions(topic t) const {
    return consumer_partitions_[static_cast<std::size_t>(t)];
  }

  /// The Kafka record key of an event on `t`.
  static std::string key_for(topic t, const registration_event& ev);

private:
  kafka_bus(const config::kafka_config& cfg, options opts);
  void unsubscribe(topic t);
  /// Decodes `m` (a record of `t`) and hands it to `h`; dead-letters it
  /// when it cannot be decoded or `h` throws.
  void on_record(topic t, const acked_handler& h, message&& m, const ack_fn& ack);
  /// (Re)creates the shared consumer for the topics with a handler.
  error restart_shared();

  config::kafka_config cfg_;
  options opts_;
  std::unique_ptr<producer> producer_;
  mutable std::mutex mu_;
  std::map<topic, std::shared_ptr<consumer>> consumers_;
  // one_consumer: the handlers by topic (read per record, under mu_), the
  // consumer and the topics it was made for.
  std::array<std::shared_ptr<const acked_handler>, topic_count> handlers_;
  std::shared_ptr<consumer> shared_;
  std::vector<topic> shared_topics_;
  bool started_ = false;
  std::shared_ptr<std::atomic<uint64_t>> dead_lettered_ =
    std::make_shared<std::atomic<uint64_t>>(0);
  std::array<std::shared_ptr<std::atomic<int64_t>>, topic_count> consumer_lags_;
  std::array<std::shared_ptr<std::atomic<int64_t>>, topic_count> consumer_partitions_;
};

} // namespace prov::bus::kafka
