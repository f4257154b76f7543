#pragma once
// Where a stage's output goes. The one place that knows whether the next
// stage is reached through the in-process bus or through Kafka (and whether
// it runs in this process, kafka.fuse_stages): chosen once at composition
// (engine.cpp), so a stage only forwards its output and says what it does
// when that output could not be made durable. CAF-free.

#include <array>
#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "bus/bus.hpp"

namespace prov {

struct kafka_counters; // engine_context.hpp

/// A stage, as the sink sees it. Built once per stage actor and held by the
/// sink's pending callbacks, which the Kafka producer may keep until its
/// message timeout, past the actor's end: `retry` captures a weak handle.
struct stage_output {
  using ack_fn = bus::stage_bus::ack_fn;
  /// The stage's answer to an output that could not be made durable: it gets
  /// the output back with the ack it passed (not called) and schedules its own
  /// retry (resend it, run the input again, ...). Any thread.
  using retry_fn = std::function<void(registration_event ev, ack_fn ack, const error& why)>;

  /// The same answer for a stage that runs its retry from its own state and
  /// needs only the operation id back: the sink then keeps no copy of the
  /// output while the publish is in flight.
  using retry_by_id_fn =
    std::function<void(const std::string& operation_id, ack_fn ack, const error& why)>;

  const char* stage = ""; ///< for the log line
  /// At most one of the two. Both empty: a failed output is left to Kafka,
  /// which delivers the input again (its ack was not called).
  retry_fn retry;
  retry_by_id_fn retry_by_id;
};
using stage_output_ptr = std::shared_ptr<const stage_output>;

/// What the stages may rely on about how events travel; fixed at composition.
/// Each is a fact a stage needs, named for it; today all four follow the
/// mode (in process: the defaults; Kafka: kafka_sink's).
struct delivery_traits {
  /// Stage inputs come from a log that delivers them again after a crash or
  /// a rebalance: an output must be a function of its input (clock readings
  /// pinned to the input's timestamps), so a redelivered input yields the
  /// same bytes.
  bool redelivers = false;
  /// An acknowledged hand-off can still be lost further on (a broker that
  /// acknowledged a write it then lost, a worker's in-memory retry gone with
  /// the worker): the intake hands off again what has no outcome after this
  /// long (kafka.resend_after_s). Zero: never (in process nothing is lost
  /// that the `pending` markers do not resume).
  std::chrono::seconds resend_after{0};
  /// registration.completed reaches the intake with its outcome already
  /// recorded (Kafka: the completed reader wrote it); otherwise the intake
  /// records the failures itself.
  bool outcomes_recorded = false;
  /// Every stage reads this process's store: an event may carry what its
  /// sender read for the next stage (registration_event::prior).
  bool shared_store = true;
};

class stage_sink {
public:
  using ack_fn = bus::stage_bus::ack_fn;
  /// How an output may travel.
  enum class route {
    /// To the stage consuming `next` in this process when there is one
    /// (kafka.fuse_stages), with the input's ack; else through the bus.
    nearest,
    /// Through the bus always: the output starts an operation (or is not
    /// reproducible from its input), so it must be in the log.
    bus,
  };

  virtual ~stage_sink() = default;

  /// Hands `ev` to the stage that consumes `next`. `ack` (may be empty) runs
  /// once `ev` is durable (in process: at once, after the hand-off; Kafka:
  /// acks=all), or travels with `ev` to a fused local stage, which runs it
  /// once its own effect is durable. A failed publish is logged and given to
  /// `from.retry` or `from.retry_by_id` (counted in
  /// dps_kafka_publish_retries_total); without either, the input stays
  /// unacked for Kafka to deliver again.
  void forward(const stage_output_ptr& from, bus::topic next, registration_event ev,
               ack_fn ack = {}, route r = route::nearest) {
    do_forward(from, next, std::move(ev), std::move(ack), r);
  }

  const delivery_traits& traits() const noexcept { return traits_; }

protected:
  explicit stage_sink(delivery_traits t) : traits_(t) {}

  /// forward(), defaults applied (they live on the non-virtual call only).
  virtual void do_forward(const stage_output_ptr& from, bus::topic next, registration_event ev,
                          ack_fn ack, route r) = 0;

private:
  delivery_traits traits_;
};

/// Embedded mode: the in-process bus, whose hand-off cannot fail (no copy
/// is kept for a retry).
std::unique_ptr<stage_sink> make_inprocess_sink(bus::stage_bus& bus);

/// Kafka mode: publishes durably (acks=all), or hands to a fused local stage.
class kafka_sink final : public stage_sink {
public:
  kafka_sink(bus::stage_bus& bus, std::shared_ptr<kafka_counters> stats,
             std::chrono::seconds resend_after);

  /// kafka.fuse_stages: the stage consuming `t` runs in this process too, and
  /// gets `nearest` outputs for `t` here instead of through Kafka (a produce,
  /// a consume and a broker round trip fewer). Set before input flows; never
  /// changed after.
  void fuse(bus::topic t, bus::stage_bus::acked_handler local);

private:
  void do_forward(const stage_output_ptr& from, bus::topic next, registration_event ev,
                  ack_fn ack, route r) override;

  bus::stage_bus& bus_;
  std::shared_ptr<kafka_counters> stats_;
  std::array<bus::stage_bus::acked_handler, bus::topic_count> local_;
};

} // namespace prov
