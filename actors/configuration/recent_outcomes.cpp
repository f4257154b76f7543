#include "actors/configuration/recent_outcomes.hpp"

namespace prov::configuration {

bool recent_outcomes::remember(const std::string& op_id, const registration_state& state) {
  if (!by_op_.emplace(op_id, entry{state, false}).second)
    return false;
  order_.push_back(op_id);
  if (order_.size() > capacity_) {
    by_op_.erase(order_.front());
    order_.pop_front();
  }
  return true;
}

const registration_state* recent_outcomes::find(const std::string& op_id) const {
  auto it = by_op_.find(op_id);
  return it == by_op_.end() ? nullptr : &it->second.state;
}

void recent_outcomes::mark_recorded(const std::string& op_id) {
  if (auto it = by_op_.find(op_id); it != by_op_.end())
    it->second.recorded = true;
}

bool recent_outcomes::recorded(const std::string& op_id) const {
  auto it = by_op_.find(op_id);
  return it != by_op_.end() && it->second.recorded;
}

} // namespace prov::configuration
