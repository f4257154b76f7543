#include "bus/kafka_producer.hpp"

#include <pthread.h>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include "bus/kafka_handles.hpp"

namespace prov::bus::kafka {

using namespace internal;

struct producer::impl : opaque_base {
  struct entry {
    record rec;
    delivery_fn done;
    bool in_librdkafka = false; ///< produced on the current handle, outcome pending
  };

  options opts;
  conf_ptr master_conf; ///< every handle is created from a copy of this

  mutable std::mutex mu;
  handle_ptr rk;                      ///< null while rebuilding or after close
  std::map<uint64_t, entry> pending;  ///< by send order, for in-order re-send
  uint64_t next_id = 1;
  bool closed = false;

  std::atomic<bool> fatal{false};
  std::atomic<bool> stop{false};
  std::shared_ptr<counters> stats = std::make_shared<counters>();
  std::thread poller;

  /// Publishes pending.size() to the metrics counter. Caller holds `mu`.
  void count_pending_locked() {
    stats->pending.store(static_cast<int64_t>(pending.size()), std::memory_order_relaxed);
  }

  // -- librdkafka callbacks (run on the thread calling rd_kafka_poll/flush) --

  static void on_delivery(rd_kafka_t* rk, const rd_kafka_message_t* m, void* opaque) {
    auto* self = static_cast<impl*>(static_cast<opaque_base*>(opaque));
    const auto id = reinterpret_cast<uintptr_t>(m->_private);
    const rd_kafka_resp_err_t err = m->err;
    // Purged (rebuild or close) or failed because the producer is fatally
    // broken: the record's fate is unknown, so it stays pending and is sent
    // again on the new handle (or failed by close()).
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR &&
        (err == RD_KAFKA_RESP_ERR__PURGE_QUEUE || err == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT ||
         err == RD_KAFKA_RESP_ERR__FATAL ||
         rd_kafka_fatal_error(rk, nullptr, 0) != RD_KAFKA_RESP_ERR_NO_ERROR)) {
      std::lock_guard<std::mutex> lock(self->mu);
      if (auto it = self->pending.find(id); it != self->pending.end())
        it->second.in_librdkafka = false;
      return;
    }
    entry e;
    {
      std::lock_guard<std::mutex> lock(self->mu);
      auto it = self->pending.find(id);
      if (it == self->pending.end()) return;
      e = std::move(it->second);
      self->pending.erase(it);
      self->count_pending_locked();
    }
    delivery d;
    d.topic = std::move(e.rec.topic);
    d.partition = m->partition;
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
      d.offset = m->offset;
    } else {
      d.err = kafka_error(err, "produce to " + d.topic);
      d.possibly_persisted =
          rd_kafka_message_status(m) != RD_KAFKA_MSG_STATUS_NOT_PERSISTED;
    }
    if (e.done) e.done(d);
  }

  static void on_error(rd_kafka_t* rk, int err, const char* reason, void* opaque) {
    auto* self = static_cast<impl*>(static_cast<opaque_base*>(opaque));
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
      char buf[512] = {};
      const rd_kafka_resp_err_t orig = rd_kafka_fatal_error(rk, buf, sizeof buf);
      write_log(self->log, 3,
                std::string("producer fatal error (") + rd_kafka_err2name(orig) + "): " + buf +
                    "; rebuilding the producer");
      self->fatal = true;
      return;
    }
    // Transport errors are informational: librdkafka reconnects by itself.
    write_log(self->log, 4,
              std::string("producer: ") + rd_kafka_err2name(static_cast<rd_kafka_resp_err_t>(err)) +
                  ": " + reason);
  }

  // -- handle lifecycle --------------------------------------------------------

  error new_handle(handle_ptr& out) {
    conf_ptr conf(rd_kafka_conf_dup(master_conf.get()));
    char errstr[512];
    rd_kafka_t* h = rd_kafka_new(RD_KAFKA_PRODUCER, conf.get(), errstr, sizeof errstr);
    if (!h) return {error_code::bad_request, std::string("kafka producer: ") + errstr};
    conf.release(); // owned by the handle now
    out.reset(h);
    return {};
  }

  /// Hands one pending record to librdkafka. Caller holds `mu`, rk is set.
  rd_kafka_resp_err_t produce_locked(uint64_t id, entry& e) {
    const record& r = e.rec;
    headers_ptr hs = make_headers(r.headers);
    const rd_kafka_resp_err_t err = rd_kafka_producev(
        rk.get(), RD_KAFKA_V_TOPIC(r.topic.c_str()),
        RD_KAFKA_V_PARTITION(r.partition < 0 ? RD_KAFKA_PARTITION_UA : r.partition),
        RD_KAFKA_V_KEY(r.key.empty() ? nullptr : r.key.data(), r.key.size()),
        RD_KAFKA_V_VALUE(r.tombstone ? nullptr : const_cast<char*>(r.value.data()),
                         r.tombstone ? 0 : r.value.size()),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_HEADERS(hs.get()),
        RD_KAFKA_V_OPAQUE(reinterpret_cast<void*>(static_cast<uintptr_t>(id))),
        RD_KAFKA_V_END);
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
      (void)hs.release(); // librdkafka owns the headers now
      e.in_librdkafka = true;
    }
    return err;
  }

  /// Destroys a fatally failed handle, creates a new one and re-sends every
  /// unacknowledged record in send order. Runs on the poll thread.
  void rebuild() {
    handle_ptr old;
    {
      std::lock_guard<std::mutex> lock(mu);
      old = std::move(rk);
    }
    if (old) {
      // Queued records were already purged by librdkafka; purge the ones in
      // flight too and serve their reports (acknowledged ones complete).
      rd_kafka_purge(old.get(), RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (rd_kafka_outq_len(old.get()) > 0 && std::chrono::steady_clock::now() < deadline)
        rd_kafka_poll(old.get(), 50);
      old.reset();
    }
    fatal = false;
    handle_ptr fresh;
    while (!stop) {
      if (auto err = new_handle(fresh); !err) break;
      else
        write_log(log, 3, "producer rebuild failed, retrying in 1 s: " + err.message);
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    if (!fresh) return; // stopping; close() fails what is pending
    std::vector<std::pair<delivery_fn, delivery>> failed;
    std::size_t resent = 0;
    {
      std::lock_guard<std::mutex> lock(mu);
      rk = std::move(fresh);
      for (auto it = pending.begin(); it != pending.end();) {
        it->second.in_librdkafka = false;
        const rd_kafka_resp_err_t err = produce_locked(it->first, it->second);
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
          ++resent;
          ++it;
          continue;
        }
        delivery d;
        d.topic = it->second.rec.topic;
        d.err = kafka_error(err, "re-send to " + d.topic + " after producer rebuild");
        d.possibly_persisted = true;
        failed.emplace_back(std::move(it->second.done), std::move(d));
        it = pending.erase(it);
      }
      count_pending_locked();
    }
    for (auto& [done, d] : failed)
      if (done) done(d);
    ++stats->rebuilds;
    write_log(log, 4, "producer rebuilt; re-sent " + std::to_string(resent) +
                          " unacknowledged records (duplicates possible)");
  }

  void poll_loop() {
    while (!stop) {
      rd_kafka_t* h = nullptr;
      {
        std::lock_guard<std::mutex> lock(mu);
        h = rk.get(); // replaced only by this thread, or by close() after join
      }
      if (h) rd_kafka_poll(h, 50);
      if (fatal) rebuild();
    }
  }

  void close() {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (closed) return;
      closed = true;
    }
    stop = true;
    if (poller.joinable()) poller.join();
    handle_ptr h;
    {
      std::lock_guard<std::mutex> lock(mu);
      h = std::move(rk);
    }
    if (h) {
      // Serves delivery reports on this thread while it waits.
      rd_kafka_flush(h.get(), opts.flush_timeout_ms);
      rd_kafka_purge(h.get(), RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
      while (rd_kafka_outq_len(h.get()) > 0 && std::chrono::steady_clock::now() < deadline)
        rd_kafka_poll(h.get(), 50);
      h.reset();
    }
    std::map<uint64_t, entry> left;
    {
      std::lock_guard<std::mutex> lock(mu);
      left.swap(pending);
      count_pending_locked();
    }
    for (auto& [id, e] : left) {
      delivery d;
      d.topic = e.rec.topic;
      d.err = {error_code::unavailable, "producer closed before " + d.topic +
                                            " acknowledged the record"};
      d.possibly_persisted = true;
      if (e.done) e.done(d);
    }
  }
};

producer::producer(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

producer::~producer() {
  if (impl_) impl_->close();
}

error producer::create(const config::kafka_config& cfg, options opts,
                       std::unique_ptr<producer>& out) {
  auto p = std::make_unique<impl>();
  p->log = opts.log;
  p->opts = std::move(opts);
  conf_ptr conf;
  // murmur2: the partition for a key matches Java clients (external
  // publishers), so one device's events share a partition whoever writes.
  // No auto-creation: a compacted topic must never appear non-compacted.
  if (auto err = make_conf(cfg,
                           client_defaults({{"partitioner", "murmur2_random"},
                                            {"allow.auto.create.topics", "false"}}),
                           {{"enable.idempotence", "true"}, {"acks", "all"}}, conf))
    return err;
  set_opaque(conf.get(), p.get());
  rd_kafka_conf_set_dr_msg_cb(conf.get(), &impl::on_delivery);
  rd_kafka_conf_set_error_cb(conf.get(), &impl::on_error);
  p->master_conf = std::move(conf);
  handle_ptr h;
  if (auto err = p->new_handle(h)) return err;
  p->rk = std::move(h);
  impl* raw = p.get();
  p->poller = std::thread([raw] {
    pthread_setname_np(pthread_self(), "prov-kafka-prod");
    raw->poll_loop();
  });
  out.reset(new producer(std::move(p)));
  return {};
}

error producer::send(record r, delivery_fn done) {
  impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.closed) return {error_code::unavailable, "kafka producer is closed"};
  if (s.pending.size() >= s.opts.max_pending)
    return {error_code::unavailable, "kafka producer queue full (" +
                                         std::to_string(s.pending.size()) + " records pending)"};
  const uint64_t id = s.next_id++;
  auto it = s.pending.emplace(id, impl::entry{std::move(r), std::move(done), false}).first;
  s.count_pending_locked();
  if (!s.rk) return {}; // rebuilding: sent in order once the new handle exists
  const rd_kafka_resp_err_t err = s.produce_locked(id, it->second);
  if (err == RD_KAFKA_RESP_ERR_NO_ERROR) return {};
  if (err == RD_KAFKA_RESP_ERR__FATAL) {
    s.fatal = true; // kept; re-sent after the rebuild
    return {};
  }
  error e = kafka_error(err, "produce to " + it->second.rec.topic);
  s.pending.erase(it);
  s.count_pending_locked();
  return e;
}

void producer::close() { impl_->close(); }

std::size_t producer::pending() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->pending.size();
}

uint64_t producer::rebuilds() const { return impl_->stats->rebuilds; }

std::shared_ptr<const producer::counters> producer::shared_counters() const {
  return impl_->stats;
}

void producer::inject_fatal_error_for_test() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->rk)
    rd_kafka_test_fatal_error(impl_->rk.get(), RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                              "injected by test");
}

} // namespace prov::bus::kafka
