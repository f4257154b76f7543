#include <array>

#include "bus/bus.hpp"

namespace prov::bus {

std::string_view topic_name(topic t) noexcept {
  switch (t) {
    case topic::registration_requested: return "registration.requested";
    case topic::registration_attested: return "registration.attested";
    case topic::registration_allocated: return "registration.allocated";
    case topic::registration_completed: return "registration.completed";
    case topic::device_assigned: return "device.assigned";
  }
  return "unknown";
}

namespace {

// Subscribers hand events to actor mailboxes, which are unbounded MPSC queues
// preserving per-sender order, so a plain function call keeps per-key order.
class inprocess_bus final : public stage_bus {
public:
  void publish(topic t, registration_event ev) override {
    auto& h = handlers_[static_cast<size_t>(t)];
    if (h)
      h(std::move(ev));
  }
  void subscribe(topic t, handler h) override {
    handlers_[static_cast<size_t>(t)] = std::move(h);
  }

private:
  std::array<handler, topic_count> handlers_;
};

} // namespace

std::unique_ptr<stage_bus> make_inprocess_bus() {
  return std::make_unique<inprocess_bus>();
}

} // namespace prov::bus
