#include "actors/throttling/rate_limiter.hpp"

#include <algorithm>
#include <cmath>
#include <functional>

namespace prov::throttling {

namespace {
// Enough that 2-8 I/O threads seldom meet on one lock, few enough that the
// per-shard share of max_keys stays meaningful for small caps.
constexpr std::size_t shard_count = 16;
} // namespace

rate_limiter::rate_limiter(int count, std::chrono::milliseconds window, std::size_t max_keys)
  : count_(std::max(count, 0)),
    per_second_(window.count() > 0 ? count_ * 1000.0 / double(window.count()) : 0.0),
    max_per_shard_(std::max<std::size_t>(1, (max_keys + shard_count - 1) / shard_count)) {
  if (count_ > 0)
    for (std::size_t i = 0; i < shard_count; ++i)
      shards_.push_back(std::make_unique<shard>());
}

int rate_limiter::take(std::string_view key, clock::time_point now) {
  if (count_ <= 0 || per_second_ <= 0)
    return 0;
  shard& s = *shards_[std::hash<std::string_view>{}(key) % shards_.size()];
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.index.find(key);
  if (it == s.index.end()) {
    if (s.index.size() >= max_per_shard_) {
      s.index.erase(std::string_view(s.lru.back().first));
      s.lru.pop_back();
    }
    s.lru.emplace_front(std::string(key), bucket{double(count_), now});
    s.index.emplace(std::string_view(s.lru.front().first), s.lru.begin());
    it = s.index.find(key);
  } else if (it->second != s.lru.begin()) {
    s.lru.splice(s.lru.begin(), s.lru, it->second);
  }
  bucket& b = it->second->second;
  if (now > b.last) {
    const double elapsed = std::chrono::duration<double>(now - b.last).count();
    b.tokens = std::min(double(count_), b.tokens + elapsed * per_second_);
    b.last = now;
  }
  if (b.tokens >= 1.0) {
    b.tokens -= 1.0;
    return 0;
  }
  const double wait_s = (1.0 - b.tokens) / per_second_;
  return std::max(1, static_cast<int>(std::ceil(wait_s)));
}

std::size_t rate_limiter::size() const {
  std::size_t n = 0;
  for (const auto& s : shards_) {
    std::lock_guard<std::mutex> lock(s->mu);
    n += s->index.size();
  }
  return n;
}

} // namespace prov::throttling
