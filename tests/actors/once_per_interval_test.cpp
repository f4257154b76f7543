// The gate that bounds Kafka catch-ups on TPM challenge misses
// (actors/once_per_interval.hpp), with a clock the test sets.

#include <doctest/doctest.h>

#include <chrono>
#include <string>

#include "actors/once_per_interval.hpp"

using namespace prov;
using namespace std::chrono_literals;

TEST_CASE("once_per_interval: once per key per interval; other keys are independent") {
  once_per_interval gate(5s);
  const auto t = once_per_interval::clock::time_point{} + 1000s;
  CHECK(gate.allow("dev-a", t));
  CHECK_FALSE(gate.allow("dev-a", t));
  CHECK_FALSE(gate.allow("dev-a", t + 4999ms));
  CHECK(gate.allow("dev-b", t + 1s));
  CHECK(gate.allow("dev-a", t + 5s));
  CHECK_FALSE(gate.allow("dev-a", t + 9s));
  CHECK(gate.allow("dev-a", t + 10s));
}

TEST_CASE("once_per_interval: keys older than the interval are pruned as it grows") {
  once_per_interval gate(5s);
  const auto t = once_per_interval::clock::time_point{} + 1000s;
  for (int i = 0; i < 5000; ++i)
    REQUIRE(gate.allow("old-" + std::to_string(i), t));
  CHECK(gate.tracked() <= 5000);
  // Later, new keys push the old ones out: the map stays bounded by what one
  // interval saw, not by everything ever seen.
  for (int i = 0; i < 5000; ++i)
    REQUIRE(gate.allow("new-" + std::to_string(i), t + 10s));
  CHECK(gate.tracked() < 8000);
  CHECK_FALSE(gate.allow("new-1", t + 11s));
  CHECK(gate.allow("old-1", t + 11s));
}
