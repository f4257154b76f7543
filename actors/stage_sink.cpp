#include "actors/stage_sink.hpp"

#include <cstdio>

#include "actors/engine_context.hpp"

namespace prov {

namespace {

class inprocess_sink final : public stage_sink {
public:
  explicit inprocess_sink(bus::stage_bus& bus) : stage_sink(delivery_traits{}), bus_(bus) {}

private:
  void do_forward(const stage_output_ptr&, bus::topic next, registration_event ev, ack_fn ack,
                  route) override {
    bus_.publish(next, std::move(ev)); // straight into the next stage's mailbox
    if (ack)
      ack();
  }

  bus::stage_bus& bus_;
};

delivery_traits kafka_traits(std::chrono::seconds resend_after) {
  delivery_traits t;
  t.redelivers = true;
  t.resend_after = resend_after;
  t.outcomes_recorded = true;
  t.shared_store = false;
  return t;
}

} // namespace

std::unique_ptr<stage_sink> make_inprocess_sink(bus::stage_bus& bus) {
  return std::make_unique<inprocess_sink>(bus);
}

kafka_sink::kafka_sink(bus::stage_bus& bus, std::shared_ptr<kafka_counters> stats,
                       std::chrono::seconds resend_after)
  : stage_sink(kafka_traits(resend_after)), bus_(bus), stats_(std::move(stats)) {}

void kafka_sink::fuse(bus::topic t, bus::stage_bus::acked_handler local) {
  local_[static_cast<std::size_t>(t)] = std::move(local);
}

void kafka_sink::do_forward(const stage_output_ptr& from, bus::topic next,
                            registration_event ev, ack_fn ack, route r) {
  if (r == route::nearest)
    if (const auto& local = local_[static_cast<std::size_t>(next)]) {
      // The local stage acks the input once its own effect is durable, and
      // retries on its own.
      local(std::move(ev), std::move(ack));
      return;
    }
  // Until the publish is acknowledged, the output exists only here: a stage
  // whose retry takes it back gets a copy kept; any other, only the id.
  std::shared_ptr<registration_event> copy;
  std::string op_id;
  if (from->retry)
    copy = std::make_shared<registration_event>(ev);
  else
    op_id = ev.operation_id;
  bus_.publish_durable(
    next, std::move(ev),
    [from, next, copy, op_id = std::move(op_id), ack = std::move(ack),
     stats = stats_](const error& e) mutable {
      if (!e) {
        if (ack)
          ack();
        return;
      }
      const std::string& id = copy ? copy->operation_id : op_id;
      const bool retrying = copy || from->retry_by_id;
      const auto topic = bus::topic_name(next);
      std::fprintf(stderr, "provisiond: %s of %s: publishing %.*s failed (%s): %s\n",
                   from->stage, id.c_str(), static_cast<int>(topic.size()), topic.data(),
                   retrying ? "retrying" : "left for redelivery", e.message.c_str());
      if (!retrying)
        return;
      stats->publish_retries.fetch_add(1);
      if (copy)
        from->retry(std::move(*copy), std::move(ack), e);
      else
        from->retry_by_id(op_id, std::move(ack), e);
    });
}

} // namespace prov
