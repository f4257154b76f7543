#pragma once
// Lets an action happen at most once per key per interval (e.g. a Kafka
// catch-up on a TPM challenge miss, which unauthenticated requests can
// trigger). Thread-safe; keeps one timestamp per key seen within the last
// interval (older ones are pruned as it grows).

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <iterator>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

namespace prov {

class once_per_interval {
public:
  using clock = std::chrono::steady_clock;
  explicit once_per_interval(clock::duration interval) : interval_(interval) {}

  /// Whether the action may run now for `key`; when it may, it counts as run.
  bool allow(std::string_view key, clock::time_point now = clock::now()) {
    std::lock_guard<std::mutex> guard{mtx_};
    if (last_.size() >= prune_at_) {
      for (auto it = last_.begin(); it != last_.end();)
        it = now - it->second >= interval_ ? last_.erase(it) : std::next(it);
      // Many keys within one interval: prune again only after as many more.
      prune_at_ = std::max<std::size_t>(1024, last_.size() * 2);
    }
    auto [it, fresh] = last_.try_emplace(std::string(key), now);
    if (fresh)
      return true;
    if (now - it->second < interval_)
      return false;
    it->second = now;
    return true;
  }

  std::size_t tracked() const {
    std::lock_guard<std::mutex> guard{mtx_};
    return last_.size();
  }

private:
  clock::duration interval_;
  mutable std::mutex mtx_;
  std::unordered_map<std::string, clock::time_point> last_;
  std::size_t prune_at_ = 1024;
};

} // namespace prov
