#pragma once
// An allocation policy that answers what another one decides, N ms later:
// the test binary's slow pipeline (a register wait that expires at will, a
// record deleted between allocation and configuration, a drain with work
// still in flight). Registered through engine_options::policies, so the
// product binary carries nothing of it.

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "actors/allocation/policy.hpp"

namespace prov::test {

class delayed_policy final : public allocation::policy {
public:
  /// Serves `kind` with `inner`'s (synchronous) decision, `delay` later.
  delayed_policy(allocation_policy kind, std::shared_ptr<const allocation::policy> inner,
                 std::chrono::milliseconds delay)
    : kind_(kind), inner_(std::move(inner)), delay_(delay),
      timer_([t = timer_state_] { run(*t); }) {}

  ~delayed_policy() override {
    {
      std::lock_guard<std::mutex> lock(timer_state_->mu);
      timer_state_->stop = true; // answers still due are dropped: the engine is gone
    }
    timer_state_->cv.notify_one();
    // The last answer may hold the last reference to the engine, and so to
    // this policy: then this runs on the timer thread, which cannot join
    // itself (it owns a share of the timer state, so it may run on).
    if (timer_.get_id() == std::this_thread::get_id())
      timer_.detach();
    else
      timer_.join();
  }

  allocation_policy kind() const noexcept override { return kind_; }
  std::chrono::milliseconds deadline() const noexcept override {
    return inner_->deadline() + delay_;
  }

  void allocate(const allocation::request& in, allocation::done_fn done) const override {
    auto got = std::make_shared<allocation::held_answer>();
    inner_->allocate(in, got);
    std::lock_guard<std::mutex> lock(timer_state_->mu);
    timer_state_->due.emplace(std::chrono::steady_clock::now() + delay_,
                              [done = std::move(done), got] { done->decided(got->err, got->d); });
    timer_state_->cv.notify_one();
  }

private:
  struct timer_state {
    std::mutex mu;
    std::condition_variable cv;
    std::multimap<std::chrono::steady_clock::time_point, std::function<void()>> due;
    bool stop = false;
  };

  static void run(timer_state& t) {
    std::unique_lock<std::mutex> lock(t.mu);
    while (!t.stop) {
      if (t.due.empty()) {
        t.cv.wait(lock);
        continue;
      }
      auto first = t.due.begin();
      if (std::chrono::steady_clock::now() < first->first) {
        t.cv.wait_until(lock, first->first); // or a new, maybe earlier answer, or stop
        continue;
      }
      auto answer = std::move(first->second);
      t.due.erase(first);
      lock.unlock();
      answer();
      answer = nullptr; // may release the engine, and this policy, here
      lock.lock();
    }
  }

  allocation_policy kind_;
  std::shared_ptr<const allocation::policy> inner_;
  std::chrono::milliseconds delay_;
  std::shared_ptr<timer_state> timer_state_ = std::make_shared<timer_state>();
  std::thread timer_; // last: starts once the rest is initialized
};

} // namespace prov::test
