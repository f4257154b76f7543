#include "bus/kafka_table.hpp"

#include <pthread.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
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
  int32_t partitions = 0;

  mutable std::mutex mu;
  std::condition_variable applied_cv;
  std::map<int32_t, int64_t> pos; ///< next offset to apply, per partition
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
    auto deadline = steady::now() + std::chrono::milliseconds(opts.metadata_timeout_ms);
    std::string last = "no answer";
    while (steady::now() < deadline) {
      const rd_kafka_metadata_t* md = nullptr;
      // all_topics=1: asking for one topic by name could auto-create it.
      auto err = rd_kafka_metadata(rk.get(), 1, nullptr, &md, 5000);
      if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        for (int i = 0; i < md->topic_cnt; ++i)
          if (opts.topic == md->topics[i].topic && md->topics[i].err == 0)
            partitions = md->topics[i].partition_cnt;
        rd_kafka_metadata_destroy(md);
        if (partitions > 0)
          return {};
        last = "topic does not exist";
      } else {
        last = rd_kafka_err2str(err);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return {error_code::unavailable, "kafka table " + opts.topic + ": " + last};
  }

  error assign() {
    partition_list_ptr list(rd_kafka_topic_partition_list_new(partitions));
    {
      std::lock_guard<std::mutex> lock(mu);
      for (int32_t p = 0; p < partitions; ++p) {
        auto it = opts.start.find(p);
        int64_t start = it == opts.start.end() ? RD_KAFKA_OFFSET_BEGINNING : it->second;
        rd_kafka_topic_partition_list_add(list.get(), opts.topic.c_str(), p)->offset = start;
        pos[p] = it == opts.start.end() ? 0 : it->second;
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
        write_log(log, 3, "table " + opts.topic + ": applying " + std::to_string(batch.size())
                            + " records failed (retrying): " + err.message);
        for (int i = 0; i < opts.retry_ms / 50 && !stop.load(); ++i)
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
        continue; // the same batch again
      }
      {
        std::lock_guard<std::mutex> lock(mu);
        for (const auto& m : batch)
          pos[m.id.partition] = std::max(pos[m.id.partition], m.id.offset + 1);
      }
      applied_cv.notify_all();
      batch.clear();
    }
  }

  int64_t remaining(const std::map<int32_t, int64_t>& targets) const {
    int64_t left = 0;
    for (const auto& [p, hi] : targets) {
      auto it = pos.find(p);
      int64_t at = it == pos.end() ? 0 : it->second;
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
  std::map<int32_t, int64_t> targets;
  for (int32_t p = 0; p < d.partitions; ++p) {
    int64_t lo = 0, hi = 0;
    for (;;) {
      auto err = rd_kafka_query_watermark_offsets(d.rk.get(), d.opts.topic.c_str(), p, &lo,
                                                  &hi, 5000);
      if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
        break;
      if (steady::now() >= deadline)
        return kafka_error(err, "kafka table " + d.opts.topic + ": watermarks");
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    if (hi > lo)
      targets[p] = hi;
  }
  std::unique_lock<std::mutex> lock(d.mu);
  const int64_t total = d.remaining(targets);
  auto next_report = steady::now() + std::chrono::seconds(1);
  for (;;) {
    auto left = d.remaining(targets);
    if (left == 0)
      return {};
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
  auto& d = *impl_;
  std::unique_lock<std::mutex> lock(d.mu);
  auto ok = d.applied_cv.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] {
    auto it = d.pos.find(partition);
    return it != d.pos.end() && it->second > offset;
  });
  if (ok)
    return {};
  return {error_code::unavailable, "kafka table " + d.opts.topic + ": record "
                                     + std::to_string(partition) + "/" + std::to_string(offset)
                                     + " not applied locally within "
                                     + std::to_string(timeout_ms) + " ms"};
}

std::map<int32_t, int64_t> table_reader::positions() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->pos;
}

int64_t table_reader::lag() const {
  if (impl_->stop)
    return 0;
  const auto pos = positions();
  int64_t total = 0;
  for (int32_t p = 0; p < impl_->partitions; ++p) {
    int64_t lo = 0, hi = 0;
    if (rd_kafka_get_watermark_offsets(impl_->rk.get(), impl_->opts.topic.c_str(), p, &lo, &hi)
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
