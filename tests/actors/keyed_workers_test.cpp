// The TPM workers (actors/keyed_workers.hpp): a job held on one key does not
// hold another key's jobs; one key's jobs run one at a time, in order; a
// full queue, a key with too many queued jobs and stopped workers answer the
// job itself (busy, stopped).

#include <doctest/doctest.h>

#include <chrono>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "actors/keyed_workers.hpp"

using namespace prov;
using fate = keyed_workers::fate;

namespace {

/// Waits (bounded) until `done()`; whether it came.
template <class F>
bool eventually(F done) {
  for (int i = 0; i < 1000; ++i) {
    if (done())
      return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

} // namespace

TEST_CASE("keyed_workers: a held key does not hold other keys; one key's jobs stay in order") {
  keyed_workers w(2, 16, 16);
  std::promise<void> release;
  auto gate = release.get_future().share();
  std::promise<void> a_started;
  std::mutex mu;
  std::vector<std::string> ran;
  auto record = [&](std::string name) {
    return [&, name](fate f) {
      std::lock_guard<std::mutex> g{mu};
      if (f == fate::run)
        ran.push_back(name);
    };
  };
  auto ran_now = [&] {
    std::lock_guard<std::mutex> g{mu};
    return ran;
  };
  w.post("a", [&, gate](fate f) {
    REQUIRE(f == fate::run);
    a_started.set_value();
    gate.wait();
    std::lock_guard<std::mutex> g{mu};
    ran.push_back("a1");
  });
  REQUIRE(a_started.get_future().wait_for(std::chrono::seconds(10))
          == std::future_status::ready);
  w.post("a", record("a2")); // waits for a1: same key
  w.post("b", record("b1"));
  w.post("b", record("b2"));
  // With one thread (or no per-key queueing) b's jobs would wait for a1.
  CHECK(eventually([&] { return ran_now().size() == 2; }));
  CHECK(ran_now() == std::vector<std::string>{"b1", "b2"});
  release.set_value();
  CHECK(eventually([&] { return ran_now().size() == 4; }));
  CHECK(ran_now() == std::vector<std::string>{"b1", "b2", "a1", "a2"});
  w.stop();
}

TEST_CASE("keyed_workers: busy beyond the bound, stopped after stop, queued jobs answered") {
  keyed_workers w(1, 2, 2);
  std::promise<void> release;
  auto gate = release.get_future().share();
  std::promise<void> started;
  std::mutex mu;
  std::vector<fate> fates;
  auto record = [&](fate f) {
    std::lock_guard<std::mutex> g{mu};
    fates.push_back(f);
  };
  w.post("x", [&, gate](fate) {
    started.set_value();
    gate.wait();
  });
  REQUIRE(started.get_future().wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  w.post("x", record);
  w.post("y", record);
  w.post("z", record); // two queued already: refused here
  {
    std::lock_guard<std::mutex> g{mu};
    REQUIRE(fates.size() == 1);
    CHECK(fates[0] == fate::busy);
  }
  std::thread stopper([&] { w.stop(); });
  release.set_value();
  stopper.join();
  w.post("x", record);
  std::lock_guard<std::mutex> g{mu};
  // Each job answered exactly once: busy, then run or stopped for the two
  // queued (stop may come before or after they run), then stopped.
  REQUIRE(fates.size() == 4);
  CHECK(fates.back() == fate::stopped);
}

TEST_CASE("keyed_workers: one key's queued jobs are capped; other keys still get in") {
  // Room for 8 queued jobs in all, 3 per key: without the per-key cap,
  // jobs for the held key "flood" would fill the queue and "other" would be
  // refused.
  keyed_workers w(2, 8, 3);
  std::promise<void> release;
  auto gate = release.get_future().share();
  std::promise<void> started;
  std::mutex mu;
  std::vector<std::pair<std::string, fate>> fates;
  auto record = [&](std::string key) {
    return [&, key](fate f) {
      std::lock_guard<std::mutex> g{mu};
      fates.emplace_back(key, f);
    };
  };
  auto count = [&](const std::string& key, fate f) {
    std::lock_guard<std::mutex> g{mu};
    std::size_t n = 0;
    for (const auto& [k, x] : fates)
      n += k == key && x == f ? 1 : 0;
    return n;
  };
  w.post("flood", [&, gate](fate f) {
    REQUIRE(f == fate::run);
    started.set_value();
    gate.wait();
  });
  REQUIRE(started.get_future().wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  // The running job is not queued: 3 queue behind it, the other 7 are busy
  // at once (answered on this thread, before post returns).
  for (int i = 0; i < 10; ++i)
    w.post("flood", record("flood"));
  CHECK(count("flood", fate::busy) == 7);
  // Another key: queued and run (the second thread is free), not busy.
  w.post("other", record("other"));
  CHECK(eventually([&] { return count("other", fate::run) == 1; }));
  CHECK(count("other", fate::busy) == 0);
  release.set_value();
  CHECK(eventually([&] { return count("flood", fate::run) == 3; }));
  // Once they ran, the key has room again.
  w.post("flood", record("flood"));
  CHECK(eventually([&] { return count("flood", fate::run) == 4; }));
  w.stop();
  std::lock_guard<std::mutex> g{mu};
  CHECK(fates.size() == 12); // each job answered exactly once
}
