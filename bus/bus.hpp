#pragma once
// The event bus between stages. Its shape is Kafka's: named topics, events
// keyed by registration id (per-key order preserved), at-least-once delivery,
// consumers idempotent on operation id. Embedded mode uses the in-process bus;
// the Kafka bus implements the same interface.

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "messages/registration.hpp"

namespace prov::bus {

enum class topic : uint8_t {
  registration_requested,
  registration_attested,
  registration_allocated,
  registration_completed,
  device_assigned,
};
inline constexpr int topic_count = 5;

/// Topic name without prefix, e.g. "registration.attested".
std::string_view topic_name(topic t) noexcept;

class stage_bus {
public:
  using handler = std::function<void(registration_event&&)>;
  /// Marks a delivered event's effect durable; any thread, at most once.
  using ack_fn = std::function<void()>;
  /// Receives an event and its ack. On Kafka the offset is committed only
  /// after the ack, so an unacked event is redelivered after a crash.
  using acked_handler = std::function<void(registration_event&&, ack_fn ack)>;
  /// Learns whether a published event is durable (Kafka: acks=all).
  using durable_fn = std::function<void(const error&)>;
  virtual ~stage_bus() = default;

  /// Delivers `ev` to the topic's subscribers. Keyed by ev.registration_id.
  virtual void publish(topic t, registration_event ev) = 0;

  /// Registers the (single) consumer of a topic. Must be called before the
  /// first publish on that topic; events published with no subscriber are
  /// dropped (the durable operation record makes them resumable).
  virtual void subscribe(topic t, handler h) = 0;

  /// Like subscribe(), with an explicit ack. The in-process bus has nothing
  /// to commit, so its default ignores the ack.
  [[nodiscard]] virtual error subscribe_acked(topic t, acked_handler h) {
    subscribe(t, [h = std::move(h)](registration_event&& ev) { h(std::move(ev), [] {}); });
    return {};
  }

  /// Like publish(); `done` runs once the event is durable or has failed
  /// (any thread). In-process: at once, after the hand-off.
  virtual void publish_durable(topic t, registration_event ev, durable_fn done) {
    publish(t, std::move(ev));
    done(error{});
  }

  /// An already-encoded record: device.assigned goes out as the same
  /// CloudEvents JSON the outbox holds, with ce_* headers.
  struct raw_record {
    std::string key;
    std::string value;
    std::vector<std::pair<std::string, std::string>> headers;
  };

  /// Publishes `rec` on `t`; `done` as for publish_durable. In-process there
  /// is no consumer of raw records (embedded mode keeps the outbox), so it
  /// reports success at once.
  virtual void publish_raw_durable(topic t, raw_record rec, durable_fn done) {
    done(error{});
  }

  /// Starts consuming what was subscribed, where the bus defers that to
  /// one consumer for all its subscriptions (Kafka: one group membership
  /// and one fetch loop per process). Call once the stage subscriptions
  /// are made. In-process: nothing to start.
  [[nodiscard]] virtual error start_consuming() { return {}; }

  /// Stops every subscription's consumer at once (Kafka: commits what was
  /// acked and leaves the groups, so their partitions move to the other
  /// members now); publishing still works. In-process: nothing to stop.
  virtual void stop_consuming() {}
};

/// Direct hand-off to the subscriber (which enqueues into its actor mailbox).
std::unique_ptr<stage_bus> make_inprocess_bus();

} // namespace prov::bus
