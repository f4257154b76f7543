#include "bus/kafka_table.hpp"

#include <pthread.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string_view>
#include <thread>

#include "messages/crypto.hpp"
#include "bus/kafka_handles.hpp"

namespace prov::bus::kafka {

using namespace internal;
using steady = std::chrono::steady_clock;

struct table_reader::impl : opaque_base {
  options opts;
  apply_fn apply;
  handle_ptr rk;
  std::vector<std::string> topics;  ///< opts.topic, then opts.more_topics
  std::vector<int32_t> partitions;  ///< per topic

  mutable std::mutex mu;
  std::condition_variable applied_cv;
  /// Next offset to apply, per topic (as `topics`) and partition.
  std::vector<std::map<int32_t, int64_t>> pos;
  /// The last apply() error that options::is_permanent called permanent;
  /// cleared by the next successful apply. Waiters return it at once.
  error stuck;

  /// Index in `topics`; -1 for a topic not read here.
  int index_of(std::string_view topic) const {
    for (std::size_t i = 0; i < topics.size(); ++i)
      if (topics[i] == topic)
        return static_cast<int>(i);
    return -1;
  }

  const std::map<int32_t, int64_t>& start_of(std::size_t i) const {
    return i == 0 ? opts.start : opts.more_topics.at(topics[i]);
  }
  std::atomic<bool> stop{false};
  std::thread worker;

  error open(const config::kafka_config& cfg) {
    conf_ptr conf;
    // A group id only so that assign() is available; the reader never joins
    // the group (no subscribe) and never commits: positions are the caller's.
    const std::string group =
      cfg.client_id + ".table." + crypto::hex(crypto::random_bytes(6));
    if (auto err = make_conf(cfg,
                             client_defaults({{"auto.offset.reset", "earliest"},
                                              {"enable.partition.eof", "false"}}),
                             {{"group.id", group},
                              {"enable.auto.commit", "false"},
                              {"enable.auto.offset.store", "false"}},
                             conf))
      return err;
    set_opaque(conf.get(), this);
    char errstr[512];
    rd_kafka_t* h = rd_kafka_new(RD_KAFKA_CONSUMER, conf.get(), errstr, sizeof errstr);
    if (!h)
      return {error_code::bad_request, std::string("kafka table reader: ") + errstr};
    conf.release();
    rk.reset(h);
    rd_kafka_poll_set_consumer(rk.get());
    return {};
  }

  error find_partitions() {
    topics.assign(1, opts.topic);
    for (const auto& [t, start] : opts.more_topics)
      if (t != opts.topic)
        topics.push_back(t);
    partitions.assign(topics.size(), 0);
    pos.assign(topics.size(), {});
    auto deadline = steady::now() + std::chrono::milliseconds(opts.metadata_timeout_ms);
    std::string last = "no answer";
    while (steady::now() < deadline) {
      const rd_kafka_metadata_t* md = nullptr;
      // all_topics=1: asking for one topic by name could auto-create it.
      auto err = rd_kafka_metadata(rk.get(), 1, nullptr, &md, 5000);
      if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        for (int i = 0; i < md->topic_cnt; ++i)
          if (int t = index_of(md->topics[i].topic); t >= 0 && md->topics[i].err == 0)
            partitions[static_cast<std::size_t>(t)] = md->topics[i].partition_cnt;
        rd_kafka_metadata_destroy(md);
        std::string missing;
        for (std::size_t t = 0; t < topics.size(); ++t)
          if (partitions[t] <= 0)
            missing = topics[t];
        if (missing.empty())
          return {};
        last = missing == opts.topic ? "topic does not exist"
                                     : "topic " + missing + " does not exist";
      } else {
        last = rd_kafka_err2str(err);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return {error_code::unavailable, "kafka table " + opts.topic + ": " + last};
  }

  error assign() {
    int32_t total = 0;
    for (auto n : partitions)
      total += n;
    partition_list_ptr list(rd_kafka_topic_partition_list_new(total));
    {
      std::lock_guard<std::mutex> lock(mu);
      for (std::size_t t = 0; t < topics.size(); ++t) {
        const auto& starts = start_of(t);
        for (int32_t p = 0; p < partitions[t]; ++p) {
          auto it = starts.find(p);
          int64_t start = it == starts.end() ? RD_KAFKA_OFFSET_BEGINNING : it->second;
          rd_kafka_topic_partition_list_add(list.get(), topics[t].c_str(), p)->offset = start;
          pos[t][p] = it == starts.end() ? 0 : it->second;
        }
      }
    }
    if (auto err = rd_kafka_assign(rk.get(), list.get()))
      return kafka_error(err, "kafka table " + opts.topic + ": assign");
    return {};
  }

  static message to_message(const rd_kafka_message_t* m) {
    message msg;
    msg.id.topic = rd_kafka_topic_name(m->rkt);
    msg.id.partition = m->partition;
    msg.id.offset = m->offset;
    if (m->key)
      msg.key.assign(static_cast<const char*>(m->key), m->key_len);
    if (m->payload)
      msg.value.assign(static_cast<const char*>(m->payload), m->len);
    msg.tombstone = m->payload == nullptr;
    msg.headers = read_headers(m);
    rd_kafka_timestamp_type_t tstype;
    msg.timestamp_ms = rd_kafka_message_timestamp(m, &tstype);
    return msg;
  }

  void run() {
    std::vector<message> batch;
    auto last_error_log = steady::time_point{};
    while (!stop.load()) {
      if (batch.empty()) {
        int timeout = 100;
        while (batch.size() < opts.max_batch && !stop.load()) {
          message_ptr m(rd_kafka_consumer_poll(rk.get(), timeout));
          timeout = 0;
          if (!m)
            break;
          if (m->err) {
            if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF
                && steady::now() - last_error_log > std::chrono::seconds(5)) {
              last_error_log = steady::now();
              write_log(log, 4, "table " + opts.topic + ": " + rd_kafka_message_errstr(m.get()));
            }
            continue;
          }
          batch.push_back(to_message(m.get()));
        }
        if (batch.empty())
          continue;
      }
      if (auto err = apply(batch)) {
        const bool permanent = opts.is_permanent && opts.is_permanent(err);
        bool repeated = false;
        if (permanent) {
          std::lock_guard<std::mutex> lock(mu);
          repeated = stuck.message == err.message;
          stuck = err;
        }
        if (permanent)
          applied_cv.notify_all();
        // A permanent failure is logged once (it comes back every retry_ms).
        if (!repeated)
          write_log(log, 3, "table " + opts.topic + ": applying " + std::to_string(batch.size())
                              + " records failed (retrying): " + err.message);
        for (int i = 0; i < opts.retry_ms / 50 && !stop.load(); ++i)
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
        continue; // the same batch again
      }
      {
        std::lock_guard<std::mutex> lock(mu);
        stuck = {};
        for (const auto& m : batch)
          if (int t = index_of(m.id.topic); t >= 0) {
            auto& at = pos[static_cast<std::size_t>(t)][m.id.partition];
            at = std::max(at, m.id.offset + 1);
          }
      }
      applied_cv.notify_all();
      batch.clear();
    }
  }

  int64_t remaining(const std::vector<std::map<int32_t, int64_t>>& targets) const {
    int64_t left = 0;
    for (std::size_t t = 0; t < targets.size(); ++t)
      for (const auto& [p, hi] : targets[t]) {
        auto it = pos[t].find(p);
        int64_t at = it == pos[t].end() ? 0 : it->second;
        if (at < hi)
          left += hi - at;
      }
    return left;
  }
};

table_reader::table_reader(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

table_reader::~table_reader() { close(); }

error table_reader::create(const config::kafka_config& cfg, options opts, apply_fn apply,
                           std::unique_ptr<table_reader>& out) {
  auto p = std::make_unique<impl>();
  p->log = opts.log;
  p->opts = std::move(opts);
  p->apply = std::move(apply);
  if (auto err = p->open(cfg))
    return err;
  if (auto err = p->find_partitions())
    return err;
  if (auto err = p->assign())
    return err;
  auto* raw = p.get();
  p->worker = std::thread([raw] {
    pthread_setname_np(pthread_self(), "prov-kafka-tbl");
    raw->run();
  });
  out.reset(new table_reader(std::move(p)));
  return {};
}

error table_reader::wait_caught_up(int timeout_ms, const progress_fn& progress) {
  auto& d = *impl_;
  auto deadline = steady::now() + std::chrono::milliseconds(timeout_ms);
  // Targets: the high watermark of every partition now. A partition whose
  // records were all deleted (low == high) has nothing left to read.
  std::vector<std::map<int32_t, int64_t>> targets(d.topics.size());
  for (std::size_t t = 0; t < d.topics.size(); ++t)
    for (int32_t p = 0; p < d.partitions[t]; ++p) {
      int64_t lo = 0, hi = 0;
      for (;;) {
        auto err = rd_kafka_query_watermark_offsets(d.rk.get(), d.topics[t].c_str(), p, &lo,
                                                    &hi, 5000);
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
          break;
        if (steady::now() >= deadline)
          return kafka_error(err, "kafka table " + d.topics[t] + ": watermarks");
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
      if (hi > lo)
        targets[t][p] = hi;
    }
  std::unique_lock<std::mutex> lock(d.mu);
  const int64_t total = d.remaining(targets);
  auto next_report = steady::now() + std::chrono::seconds(1);
  for (;;) {
    auto left = d.remaining(targets);
    if (left == 0)
      return {};
    if (d.stuck)
      return d.stuck;
    if (steady::now() >= deadline)
      return {error_code::unavailable, "kafka table " + d.opts.topic + ": "
                                         + std::to_string(left)
                                         + " records not applied in time"};
    if (progress && steady::now() >= next_report) {
      next_report = steady::now() + std::chrono::seconds(1);
      lock.unlock();
      progress(total - left, total);
      lock.lock();
      continue;
    }
    d.applied_cv.wait_for(lock, std::chrono::milliseconds(100));
  }
}

error table_reader::wait_applied(int32_t partition, int64_t offset, int timeout_ms) {
  return wait_applied(impl_->opts.topic, partition, offset, timeout_ms);
}

error table_reader::wait_applied(const std::string& topic, int32_t partition, int64_t offset,
                                 int timeout_ms) {
  auto& d = *impl_;
  const int t = d.index_of(topic);
  if (t < 0)
    return {error_code::internal, "kafka table " + d.opts.topic + ": does not read " + topic};
  std::unique_lock<std::mutex> lock(d.mu);
  const auto& at = d.pos[static_cast<std::size_t>(t)];
  auto done = [&] {
    auto it = at.find(partition);
    return it != at.end() && it->second > offset;
  };
  auto ok = d.applied_cv.wait_for(lock, std::chrono::milliseconds(timeout_ms),
                                  [&] { return done() || d.stuck; });
  if (ok && !done())
    return d.stuck;
  if (ok)
    return {};
  return {error_code::unavailable, "kafka table " + topic + ": record "
                                     + std::to_string(partition) + "/" + std::to_string(offset)
                                     + " not applied locally within "
                                     + std::to_string(timeout_ms) + " ms"};
}

std::map<int32_t, int64_t> table_reader::positions() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->pos[0];
}

int64_t table_reader::lag() const { return lag(impl_->opts.topic); }

int64_t table_reader::lag(const std::string& topic) const {
  const int t = impl_->index_of(topic);
  if (impl_->stop || t < 0)
    return 0;
  std::map<int32_t, int64_t> pos;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    pos = impl_->pos[static_cast<std::size_t>(t)];
  }
  int64_t total = 0;
  for (int32_t p = 0; p < impl_->partitions[static_cast<std::size_t>(t)]; ++p) {
    int64_t lo = 0, hi = 0;
    if (rd_kafka_get_watermark_offsets(impl_->rk.get(), topic.c_str(), p, &lo, &hi)
          != RD_KAFKA_RESP_ERR_NO_ERROR
        || hi < 0)
      continue; // nothing fetched from it yet
    auto it = pos.find(p);
    total += std::max<int64_t>(0, hi - (it == pos.end() ? std::max<int64_t>(lo, 0) : it->second));
  }
  return total;
}

const std::string& table_reader::topic() const { return impl_->opts.topic; }

void table_reader::close() {
  if (!impl_ || impl_->stop.exchange(true))
    return;
  if (impl_->worker.joinable())
    impl_->worker.join();
  rd_kafka_consumer_close(impl_->rk.get());
  impl_->applied_cv.notify_all();
}

} // namespace prov::bus::kafka
