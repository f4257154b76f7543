#pragma once
// Token buckets by key (an id scope, an enrollment group, a device, a client
// address), as DPS throttles: `count` requests per `window`, refilled
// continuously, a burst of `count` allowed. Memory is bounded: at most
// `max_keys` buckets are kept, the least recently used one is dropped for a
// new key (a dropped bucket starts full again when its key comes back, so a
// flood of distinct keys can only make the limit more lenient for the keys
// it pushes out, never use more memory). Thread-safe; sharded so the I/O
// threads rarely wait on each other. No CAF, no I/O: pure logic.

#include <chrono>
#include <cstddef>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace prov::throttling {

using clock = std::chrono::steady_clock;

class rate_limiter {
public:
  /// `count` 0 disables the limiter (take() always admits, takes no lock).
  rate_limiter(int count, std::chrono::milliseconds window, std::size_t max_keys);

  bool enabled() const noexcept { return count_ > 0; }

  /// Takes one token from `key`'s bucket. 0 when admitted; otherwise the
  /// whole seconds (at least 1) until a token is back: the Retry-After.
  int take(std::string_view key, clock::time_point now = clock::now());

  /// Buckets held now (for tests of the memory bound).
  std::size_t size() const;

private:
  struct bucket {
    double tokens;
    clock::time_point last;
  };
  struct shard {
    mutable std::mutex mu;
    /// Most recently used first; the map's keys view the list's strings.
    std::list<std::pair<std::string, bucket>> lru;
    std::unordered_map<std::string_view, std::list<std::pair<std::string, bucket>>::iterator>
      index;
  };

  int count_;
  double per_second_; ///< refill rate
  std::size_t max_per_shard_;
  std::vector<std::unique_ptr<shard>> shards_;
};

} // namespace prov::throttling
