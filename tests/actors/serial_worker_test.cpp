// The TPM worker's thread (actors/serial_worker.hpp): jobs run in order on
// one thread other than the caller's; a full queue and a stopped worker
// answer the job itself (busy, stopped), so no callback is ever lost.

#include <doctest/doctest.h>

#include <chrono>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "actors/serial_worker.hpp"

using namespace prov;
using fate = serial_worker::fate;

TEST_CASE("serial_worker: order, its own thread, busy beyond the bound, stopped after stop") {
  serial_worker w(2);
  std::promise<void> release;
  auto gate = release.get_future().share();
  std::promise<std::thread::id> started;
  std::mutex mu;
  std::vector<int> ran;
  std::vector<fate> fates;
  auto record = [&](int n) {
    return [&, n](fate f) {
      std::lock_guard<std::mutex> g{mu};
      fates.push_back(f);
      if (f == fate::run)
        ran.push_back(n);
    };
  };
  // The first job holds the thread until released.
  w.post([&, gate](fate f) {
    REQUIRE(f == fate::run);
    started.set_value(std::this_thread::get_id());
    gate.wait();
  });
  auto worker_thread = started.get_future();
  REQUIRE(worker_thread.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  CHECK((worker_thread.get() != std::this_thread::get_id()));
  w.post(record(1));
  w.post(record(2));
  w.post(record(3)); // the queue holds 2: refused at once, here
  {
    std::lock_guard<std::mutex> g{mu};
    REQUIRE(fates.size() == 1);
    CHECK(fates[0] == fate::busy);
  }
  release.set_value();
  for (int i = 0; i < 500; ++i) {
    {
      std::lock_guard<std::mutex> g{mu};
      if (ran.size() == 2)
        break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  {
    std::lock_guard<std::mutex> g{mu};
    CHECK(ran == std::vector<int>{1, 2});
  }
  w.stop();
  w.post(record(4));
  std::lock_guard<std::mutex> g{mu};
  CHECK(fates.back() == fate::stopped);
  CHECK(ran == std::vector<int>{1, 2});
}

TEST_CASE("serial_worker: jobs queued at stop are answered stopped, not dropped") {
  std::promise<void> release;
  auto gate = release.get_future().share();
  std::promise<void> started;
  std::vector<fate> fates;
  {
    serial_worker w(8);
    w.post([&, gate](fate) {
      started.set_value();
      gate.wait();
    });
    started.get_future().wait();
    for (int i = 0; i < 3; ++i)
      w.post([&](fate f) { fates.push_back(f); }); // touched by one thread at a time
    std::thread releaser([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      release.set_value();
    });
    w.stop(); // waits for the running job, then answers the queued ones
    releaser.join();
  }
  CHECK(fates == std::vector<fate>(3, fate::stopped));
}
