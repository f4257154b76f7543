// throttling::rate_limiter with a synthetic clock: exact, no sleeps.

#include <doctest/doctest.h>

#include <string>

#include "actors/throttling/rate_limiter.hpp"

using tclock = prov::throttling::clock;
using prov::throttling::rate_limiter;
using namespace std::chrono_literals;

TEST_CASE("rate_limiter: a burst of count, then Retry-After until a token is back") {
  rate_limiter rl(3, 60s, 100); // 3 per minute: one token every 20 s
  const auto t0 = tclock::time_point{} + 1000s;
  CHECK(rl.take("scope", t0) == 0);
  CHECK(rl.take("scope", t0) == 0);
  CHECK(rl.take("scope", t0) == 0);
  CHECK(rl.take("scope", t0) == 20);
  CHECK(rl.take("scope", t0 + 5s) == 15);  // refused requests take nothing
  CHECK(rl.take("scope", t0 + 19500ms) == 1); // rounded up, never 0
  CHECK(rl.take("scope", t0 + 20s) == 0);  // the limit resets as tokens come back
  CHECK(rl.take("scope", t0 + 20s) == 20);
  // Idle for long: refilled to the burst, not beyond.
  const auto later = t0 + 3600s;
  for (int i = 0; i < 3; ++i)
    CHECK(rl.take("scope", later) == 0);
  CHECK(rl.take("scope", later) > 0);
}

TEST_CASE("rate_limiter: keys are independent") {
  rate_limiter rl(1, 10s, 100);
  const auto t0 = tclock::time_point{} + 1000s;
  CHECK(rl.take("a", t0) == 0);
  CHECK(rl.take("a", t0) == 10);
  CHECK(rl.take("b", t0) == 0);
  CHECK(rl.take("a", t0) == 10);
}

TEST_CASE("rate_limiter: count 0 is off") {
  rate_limiter rl(0, 60s, 100);
  CHECK_FALSE(rl.enabled());
  for (int i = 0; i < 1000; ++i)
    CHECK(rl.take("x") == 0);
  CHECK(rl.size() == 0);
}

TEST_CASE("rate_limiter: a flood of distinct keys keeps at most max_keys buckets") {
  rate_limiter rl(2, 60s, 64);
  const auto t0 = tclock::time_point{} + 1000s;
  for (int i = 0; i < 100000; ++i)
    CHECK(rl.take("10.0." + std::to_string(i / 256) + "." + std::to_string(i % 256), t0) == 0);
  // 16 shards of ceil(64 / 16) = 4 buckets.
  CHECK(rl.size() <= 64);
  CHECK(rl.size() > 0);
  // A key in use stays throttled while the flood goes on around it, as long
  // as it is more recent than what the flood pushes out.
  rate_limiter busy(1, 60s, 1600);
  CHECK(busy.take("busy", t0) == 0);
  for (int i = 0; i < 50; ++i) {
    CHECK(busy.take("busy", t0) > 0);
    busy.take("other-" + std::to_string(i), t0);
  }
}
