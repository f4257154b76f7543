#pragma once
// One dedicated thread running jobs in order, with a bounded queue: for
// blocking work that must stay off both the gateway's I/O threads and CAF's
// shared scheduler (TPM challenges: a store or Kafka write each, RSA work).
// A job is told whether it runs or was refused (queue full, stopped), so
// every caller's callback is answered exactly once.

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace prov {

class serial_worker {
public:
  enum class fate { run, busy, stopped };
  using job = std::function<void(fate)>;

  explicit serial_worker(std::size_t max_queued)
    : max_queued_(max_queued), thread_([this] { loop(); }) {}
  ~serial_worker() { stop(); }
  serial_worker(const serial_worker&) = delete;
  serial_worker& operator=(const serial_worker&) = delete;

  /// Queues `j`; when it cannot be queued it is called here with busy or
  /// stopped.
  void post(job j) {
    fate refused = fate::run;
    {
      std::lock_guard<std::mutex> guard{mtx_};
      if (stopping_)
        refused = fate::stopped;
      else if (queue_.size() >= max_queued_)
        refused = fate::busy;
      else
        queue_.push_back(std::move(j));
    }
    if (refused != fate::run)
      return j(refused);
    cv_.notify_one();
  }

  /// Finishes the running job, refuses the queued ones (stopped), joins.
  /// Idempotent.
  void stop() {
    std::deque<job> left;
    {
      std::lock_guard<std::mutex> guard{mtx_};
      stopping_ = true;
    }
    cv_.notify_one();
    if (thread_.joinable())
      thread_.join();
    {
      std::lock_guard<std::mutex> guard{mtx_};
      left.swap(queue_);
    }
    for (auto& j : left)
      j(fate::stopped);
  }

private:
  void loop() {
    for (;;) {
      job j;
      {
        std::unique_lock<std::mutex> lock{mtx_};
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (stopping_)
          return;
        j = std::move(queue_.front());
        queue_.pop_front();
      }
      j(fate::run);
    }
  }

  std::size_t max_queued_;
  std::mutex mtx_;
  std::condition_variable cv_;
  std::deque<job> queue_;
  bool stopping_ = false;
  std::thread thread_; ///< last: starts once the rest is built
};

} // namespace prov
