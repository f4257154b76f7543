#pragma once
// A few dedicated threads running jobs with a bounded queue, serialised per
// key: jobs of one key run one at a time, in the order posted; jobs of
// different keys run side by side. For the TPM work (actors/engine.cpp):
// a TPM request may wait seconds (a Kafka catch-up or produce), and with one
// thread that wait held every other TPM device's register; per-key order
// keeps one registration id's challenge, answer and polls in sequence, as
// the single thread did. Stays off both the gateway's I/O threads and CAF's
// shared scheduler. Same fates as serial_worker: every caller's callback is
// answered exactly once.

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "actors/serial_worker.hpp"

namespace prov {

class keyed_workers {
public:
  using fate = serial_worker::fate;
  using job = serial_worker::job;

  /// `threads` >= 1; `max_queued`: queued (not running) jobs beyond which
  /// post() refuses with busy; `max_queued_per_key`: the same for one key's
  /// queued jobs. Without the latter, requests for one key (unauthenticated
  /// TPM challenges for one id) could fill the whole queue while they wait
  /// for each other, and every other key would get busy.
  keyed_workers(std::size_t threads, std::size_t max_queued, std::size_t max_queued_per_key)
    : max_queued_(max_queued), max_queued_per_key_(max_queued_per_key) {
    if (threads == 0)
      threads = 1;
    threads_.reserve(threads);
    for (std::size_t i = 0; i < threads; ++i)
      threads_.emplace_back([this] { loop(); });
  }
  ~keyed_workers() { stop(); }
  keyed_workers(const keyed_workers&) = delete;
  keyed_workers& operator=(const keyed_workers&) = delete;

  /// Queues `j` under `key`; when it cannot be queued it is called here with
  /// busy or stopped.
  void post(std::string key, job j) {
    fate refused = fate::run;
    {
      std::lock_guard<std::mutex> guard{mtx_};
      if (stopping_)
        refused = fate::stopped;
      else if (queue_.size() >= max_queued_)
        refused = fate::busy;
      else if (auto& n = queued_of_[key]; n >= max_queued_per_key_)
        refused = fate::busy;
      else {
        ++n;
        queue_.push_back({std::move(key), std::move(j)});
      }
    }
    if (refused != fate::run)
      return j(refused);
    // All: the one woken might find only this key's job, busy on another
    // thread, and go back to sleep while an idle one could run another.
    cv_.notify_all();
  }

  /// Finishes the running jobs, refuses the queued ones (stopped), joins.
  /// Idempotent.
  void stop() {
    std::deque<item> left;
    {
      std::lock_guard<std::mutex> guard{mtx_};
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_)
      if (t.joinable())
        t.join();
    {
      std::lock_guard<std::mutex> guard{mtx_};
      left.swap(queue_);
      queued_of_.clear();
    }
    for (auto& i : left)
      i.j(fate::stopped);
  }

private:
  struct item {
    std::string key;
    job j;
  };

  /// The first queued job whose key is not running (queue_.end(): none).
  /// The queue is bounded (max_queued_), so the scan is too.
  std::deque<item>::iterator runnable() {
    for (auto it = queue_.begin(); it != queue_.end(); ++it)
      if (running_.count(it->key) == 0)
        return it;
    return queue_.end();
  }

  void loop() {
    for (;;) {
      item i;
      {
        std::unique_lock<std::mutex> lock{mtx_};
        auto it = queue_.end();
        cv_.wait(lock, [&] { return stopping_ || (it = runnable()) != queue_.end(); });
        if (stopping_)
          return;
        i = std::move(*it);
        queue_.erase(it);
        if (auto q = queued_of_.find(i.key); q != queued_of_.end() && --q->second == 0)
          queued_of_.erase(q);
        running_.insert(i.key);
      }
      i.j(fate::run);
      {
        std::lock_guard<std::mutex> guard{mtx_};
        running_.erase(i.key);
      }
      // A job of the same key may be waiting for this one.
      cv_.notify_all();
    }
  }

  std::size_t max_queued_;
  std::size_t max_queued_per_key_;
  std::mutex mtx_;
  std::condition_variable cv_;
  std::deque<item> queue_;
  std::unordered_set<std::string> running_; ///< keys of the jobs running now
  /// Queued jobs per key (keys with none are erased: the map stays as small
  /// as the queue).
  std::unordered_map<std::string, std::size_t> queued_of_;
  bool stopping_ = false;
  std::vector<std::thread> threads_; ///< last: start once the rest is built
};

} // namespace prov
