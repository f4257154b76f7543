#pragma once
// Open connections against the caps (total and per client address), shared by
// the device listeners (HTTPS, MQTT). Internal to gateway/*.cpp.

#include <atomic>
#include <mutex>
#include <string>
#include <unordered_map>

namespace prov::gateway {

/// Open connections, in total and per client address, against the caps.
/// Taken on the acceptor's thread, given back by sessions on any I/O thread:
/// the per-client table has a lock (once per connection, not per request).
class connection_slots {
public:
  enum class verdict { admitted, over_total, over_client };

  connection_slots(int max_total, int max_per_client)
    : max_total_(max_total), max_per_client_(max_per_client) {}

  verdict acquire(const std::string& ip) {
    if (max_total_ > 0 && open_.load() >= max_total_)
      return verdict::over_total; // only the acceptor adds: no race to the cap
    if (max_per_client_ > 0) {
      std::lock_guard<std::mutex> g{mu_};
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

} // namespace prov::gateway
