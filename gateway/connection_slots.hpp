#pragma once
// Open connections against the caps (total and per client address). One
// instance is shared by the device listeners (HTTPS, MQTT), so the caps, and
// the descriptors they protect, hold for both together. Light on purpose:
// app/provisiond.cpp builds it and hands it to both servers.

#include <atomic>
#include <mutex>
#include <string>
#include <unordered_map>

namespace prov::gateway {

/// Open connections, in total and per client address, against the caps.
/// Taken on the acceptors' threads (one per listener), given back by
/// sessions on any I/O thread. acquire() checks and counts under one lock
/// (once per connection, not per request), so two acceptors cannot both
/// take the last slot.
class connection_slots {
public:
  enum class verdict { admitted, over_total, over_client };

  connection_slots(int max_total, int max_per_client)
    : max_total_(max_total), max_per_client_(max_per_client) {}
  connection_slots(const connection_slots&) = delete;
  connection_slots& operator=(const connection_slots&) = delete;

  verdict acquire(const std::string& ip) {
    std::lock_guard<std::mutex> g{mu_};
    if (max_total_ > 0 && open_.load() >= max_total_)
      return verdict::over_total;
    if (max_per_client_ > 0) {
      int& n = per_client_[ip];
      if (n >= max_per_client_)
        return verdict::over_client;
      ++n;
    }
    open_.fetch_add(1);
    return verdict::admitted;
  }

  void release(const std::string& ip) {
    open_.fetch_sub(1);
    if (max_per_client_ > 0) {
      std::lock_guard<std::mutex> g{mu_};
      auto it = per_client_.find(ip);
      if (it != per_client_.end() && --it->second <= 0)
        per_client_.erase(it);
    }
  }

  int open() const { return open_.load(); }
  int max_total() const { return max_total_; }

private:
  const int max_total_;
  const int max_per_client_;
  std::atomic<int> open_{0};
  std::mutex mu_;
  std::unordered_map<std::string, int> per_client_;
};

/// One listener's view of the shared slots: its own open count (its gauge),
/// the shared caps.
class listener_slots {
public:
  explicit listener_slots(connection_slots& shared) : shared_(shared) {}

  connection_slots::verdict acquire(const std::string& ip) {
    auto v = shared_.acquire(ip);
    if (v == connection_slots::verdict::admitted)
      open_.fetch_add(1);
    return v;
  }
  void release(const std::string& ip) {
    open_.fetch_sub(1);
    shared_.release(ip);
  }

  /// A connection this listener accepted, now served by `to` (upgraded to
  /// MQTT over WebSocket): it leaves this count for that one and keeps its
  /// place under the caps; `to` releases it. False (nothing moved) when the
  /// two do not share the caps.
  bool transfer_to(listener_slots& to) {
    if (&to.shared_ != &shared_)
      return false;
    open_.fetch_sub(1);
    to.open_.fetch_add(1);
    return true;
  }

  int open() const { return open_.load(); }          ///< this listener's
  int open_total() const { return shared_.open(); }  ///< all listeners'
  int max_total() const { return shared_.max_total(); }

private:
  connection_slots& shared_;
  std::atomic<int> open_{0};
};

} // namespace prov::gateway
