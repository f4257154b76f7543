#pragma once
// The configuration stage's memory of the outcomes it recorded lately (Kafka
// mode). A worker's own records reach its local store only through
// dps.registrations, so a second allocation of one operation (an end-to-end
// resend) can arrive before that record is applied; it must then get the
// outcome already published, not a new one with another timestamp.
//
// Bounded: the oldest remembered operation is forgotten once more than
// `capacity` are held. First write wins, and a repeated write does not make
// an entry younger: an operation's outcome never changes once recorded.

#include <cstddef>
#include <deque>
#include <string>
#include <unordered_map>

#include "messages/registration.hpp"

namespace prov::configuration {

class recent_outcomes {
public:
  explicit recent_outcomes(std::size_t capacity) : capacity_(capacity) {}

  /// Remembers `state` as op_id's outcome, forgetting the oldest entry if
  /// that makes more than capacity(). If op_id is already remembered nothing
  /// changes and the answer is false.
  bool remember(const std::string& op_id, const registration_state& state);

  /// The remembered outcome, or nullptr. Valid until the next remember().
  const registration_state* find(const std::string& op_id) const;

  /// Notes that op_id's record reached dps.registrations (Kafka acknowledged
  /// it). No effect for an operation not remembered.
  void mark_recorded(const std::string& op_id);
  /// Whether mark_recorded() was called for a remembered op_id.
  bool recorded(const std::string& op_id) const;

  std::size_t size() const { return by_op_.size(); }
  std::size_t capacity() const { return capacity_; }

private:
  std::size_t capacity_;
  struct entry {
    registration_state state;
    bool recorded = false;
  };
  std::unordered_map<std::string, entry> by_op_;
  std::deque<std::string> order_; ///< oldest first
};

} // namespace prov::configuration
