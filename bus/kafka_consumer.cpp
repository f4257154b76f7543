#include "bus/kafka_consumer.hpp"

#include <pthread.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "bus/kafka_handles.hpp"

namespace prov::bus::kafka {

using namespace internal;

namespace {

std::string partition_key(std::string_view topic, int32_t partition) {
  std::string k(topic);
  k += '/';
  k += std::to_string(partition);
  return k;
}

} // namespace

struct consumer::impl : opaque_base {
  /// Delivery order and completion of one partition's in-flight messages.
  struct tracker {
    std::string topic;
    int32_t partition = -1;
    std::deque<std::pair<int64_t, bool>> inflight; ///< (offset, done), ascending
    int64_t commit_next = -1; ///< end of the finished prefix (-1: nothing yet)
    int64_t sent = -1;        ///< last offset handed to a commit request
  };

  options opts;
  config::kafka_config cfg; ///< for the seeding readers (options::seed_groups)
  handler on_message;
  handle_ptr rk; ///< used only by the consumer thread once it runs

  mutable std::mutex mu;
  std::condition_variable idle_cv; ///< signalled when in-flight messages finish
  std::map<std::string, tracker> trackers; ///< by "topic/partition"
  std::map<std::string, int64_t> committed_offsets;
  uint64_t epoch = 1;
  std::size_t in_flight = 0;
  bool paused = false;

  std::shared_ptr<std::atomic<int64_t>> lag; ///< written by the consumer thread only
  std::shared_ptr<std::atomic<int64_t>> owned; ///< partitions assigned (consumer thread)

  std::atomic<bool> stop{false};
  std::thread worker;

  // -- librdkafka callbacks (consumer thread, inside poll/close) -------------

  static impl* self_of(void* opaque) {
    return static_cast<impl*>(static_cast<opaque_base*>(opaque));
  }

  static void on_rebalance(rd_kafka_t* rk, rd_kafka_resp_err_t err,
                           rd_kafka_topic_partition_list_t* parts, void* opaque) {
    impl* self = self_of(opaque);
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
      {
        std::lock_guard<std::mutex> lock(self->mu);
        ++self->epoch;
        self->trackers.clear();
        self->in_flight = 0;
        self->paused = false;
        for (int i = 0; i < parts->cnt; ++i) {
          const auto& p = parts->elems[i];
          tracker& t = self->trackers[partition_key(p.topic, p.partition)];
          t.topic = p.topic;
          t.partition = p.partition;
        }
      }
      self->seed_offsets(rk, parts);
      rd_kafka_assign(rk, parts);
      self->owned->store(parts->cnt);
      self->store_by_topic(self->opts.partitions_by_topic, [&](const std::string& topic) {
        int64_t n = 0;
        for (int i = 0; i < parts->cnt; ++i)
          n += topic == parts->elems[i].topic;
        return n;
      });
      return;
    }
    if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS) self->revoke_all(rk);
    else
      write_log(self->log, 3, std::string("consumer rebalance error: ") + rd_kafka_err2str(err));
    rd_kafka_assign(rk, nullptr);
  }

  static void on_commit(rd_kafka_t*, rd_kafka_resp_err_t err,
                        rd_kafka_topic_partition_list_t* offsets, void* opaque) {
    impl* self = self_of(opaque);
    self->record_commit(err, offsets);
  }

  static void on_error(rd_kafka_t*, int err, const char* reason, void* opaque) {
    impl* self = self_of(opaque);
    write_log(self->log, err == RD_KAFKA_RESP_ERR__FATAL ? 3 : 4,
              std::string("consumer: ") +
                  rd_kafka_err2name(static_cast<rd_kafka_resp_err_t>(err)) + ": " + reason);
  }

  // -- seeding from other groups (options::seed_groups) ------------------------

  /// For each partition of `parts` this group has no committed offset for
  /// and whose topic has a seed group that has one: sets it as the start
  /// offset in `parts` and commits it here. Blocks the consumer thread (it
  /// is in the rebalance callback, before anything is fetched) for at most
  /// seed_timeout_ms; on any failure the partition starts as before.
  void seed_offsets(rd_kafka_t* h, rd_kafka_topic_partition_list_t* parts) {
    if (opts.seed_groups.empty() || parts->cnt == 0) return;
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(opts.seed_timeout_ms);
    auto left_ms = [&] {
      return static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                  deadline - std::chrono::steady_clock::now())
                                  .count());
    };
    partition_list_ptr own(rd_kafka_topic_partition_list_copy(parts));
    if (const rd_kafka_resp_err_t err = rd_kafka_committed(h, own.get(), left_ms())) {
      write_log(log, 4, std::string("consumer: reading committed offsets to seed from the "
                                    "previous groups failed, not seeding: ") +
                            rd_kafka_err2str(err));
      return;
    }
    std::map<std::string, partition_list_ptr> wanted; // by seed group
    for (int i = 0; i < own->cnt; ++i) {
      const auto& p = own->elems[i];
      if (p.err != RD_KAFKA_RESP_ERR_NO_ERROR || p.offset >= 0) continue; // has one (or unknown)
      auto g = opts.seed_groups.find(p.topic);
      if (g == opts.seed_groups.end()) continue;
      partition_list_ptr& l = wanted[g->second];
      if (!l) l.reset(rd_kafka_topic_partition_list_new(4));
      rd_kafka_topic_partition_list_add(l.get(), p.topic, p.partition);
    }
    partition_list_ptr seeded(rd_kafka_topic_partition_list_new(4));
    std::string what;
    for (auto& [group, list] : wanted) {
      const int ms = left_ms();
      if (ms <= 0) {
        write_log(log, 4, "consumer: seeding offsets from group " + group +
                              " skipped: seed_timeout_ms spent");
        continue;
      }
      if (error err = committed_of(group, list.get(), ms)) {
        write_log(log, 4, "consumer: reading group " + group +
                              "'s committed offsets failed, not seeding from it: " +
                              err.message);
        continue;
      }
      for (int i = 0; i < list->cnt; ++i) {
        const auto& p = list->elems[i];
        if (p.err != RD_KAFKA_RESP_ERR_NO_ERROR || p.offset < 0) continue;
        rd_kafka_topic_partition_list_find(parts, p.topic, p.partition)->offset = p.offset;
        rd_kafka_topic_partition_list_add(seeded.get(), p.topic, p.partition)->offset = p.offset;
        what += (what.empty() ? "" : ", ") + partition_key(p.topic, p.partition) + "@" +
                std::to_string(p.offset) + " (" + group + ")";
      }
    }
    if (seeded->cnt == 0) return;
    // Committed here so the seed survives the old groups' offsets expiring
    // and is read once; if this fails the next assignment seeds again.
    const rd_kafka_resp_err_t err = rd_kafka_commit(h, seeded.get(), 0);
    record_commit(err, seeded.get());
    write_log(log, 5, "consumer group " + opts.group_id +
                          ": no committed offset, starting where the previous group did: " +
                          what + " (read in " +
                          std::to_string(opts.seed_timeout_ms - std::max(0, left_ms())) + " ms)");
  }

  /// Reads the offsets `group` committed for `list` into it, with a
  /// consumer that never joins (so it neither disturbs nor leaves `group`).
  error committed_of(const std::string& group, rd_kafka_topic_partition_list_t* list,
                     int timeout_ms) {
    conf_ptr conf;
    if (auto err = make_conf(cfg, {}, {{"group.id", group}, {"enable.auto.commit", "false"}},
                             conf))
      return err;
    opaque_base logs{log}; // outlives the handle (declared first)
    set_opaque(conf.get(), &logs);
    char errstr[512];
    handle_ptr reader(rd_kafka_new(RD_KAFKA_CONSUMER, conf.get(), errstr, sizeof errstr));
    if (!reader) return {error_code::bad_request, std::string("kafka consumer: ") + errstr};
    conf.release();
    if (const rd_kafka_resp_err_t err = rd_kafka_committed(reader.get(), list, timeout_ms))
      return kafka_error(err, "committed offsets");
    return {};
  }

  // -- commits -----------------------------------------------------------------

  void record_commit(rd_kafka_resp_err_t err, const rd_kafka_topic_partition_list_t* offsets) {
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 0; offsets && i < offsets->cnt; ++i) {
      const auto& p = offsets->elems[i];
      const std::string key = partition_key(p.topic, p.partition);
      if (err == RD_KAFKA_RESP_ERR_NO_ERROR && p.err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        int64_t& c = committed_offsets[key];
        c = std::max(c, p.offset);
      } else if (auto it = trackers.find(key); it != trackers.end()) {
        it->second.sent = -1; // retried by the next commit round
      }
    }
    if (err != RD_KAFKA_RESP_ERR_NO_ERROR && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
      write_log(log, 4, std::string("offset commit failed (will retry): ") +
                            rd_kafka_err2str(err));
  }

  /// Commits every partition whose finished prefix grew since the last
  /// request. Async in the loop; sync on revoke and close.
  void commit_ready(rd_kafka_t* h, bool sync) {
    partition_list_ptr list(rd_kafka_topic_partition_list_new(4));
    {
      std::lock_guard<std::mutex> lock(mu);
      for (auto& [key, t] : trackers) {
        if (t.commit_next < 0 || t.commit_next <= t.sent) continue;
        rd_kafka_topic_partition_list_add(list.get(), t.topic.c_str(), t.partition)->offset =
            t.commit_next;
        t.sent = t.commit_next;
      }
    }
    if (list->cnt == 0) return;
    const rd_kafka_resp_err_t err = rd_kafka_commit(h, list.get(), sync ? 0 : 1);
    if (sync) record_commit(err, list.get());
    else if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
      record_commit(err, list.get());
  }

  void revoke_all(rd_kafka_t* h) {
    {
      std::unique_lock<std::mutex> lock(mu);
      idle_cv.wait_for(lock, std::chrono::milliseconds(opts.revoke_grace_ms),
                       [&] { return in_flight == 0; });
    }
    commit_ready(h, true);
    std::lock_guard<std::mutex> lock(mu);
    ++epoch; // later done() calls for these partitions are ignored
    trackers.clear();
    in_flight = 0;
    paused = false;
    lag->store(0);
    owned->store(0);
    zero_by_topic();
  }

  template <class F>
  static void store_by_topic(const std::map<std::string, std::shared_ptr<std::atomic<int64_t>>>& m,
                             F value_of) {
    for (const auto& [topic, out] : m)
      out->store(value_of(topic));
  }

  void zero_by_topic() {
    auto zero = [](const std::string&) { return int64_t{0}; };
    store_by_topic(opts.lag_by_topic, zero);
    store_by_topic(opts.partitions_by_topic, zero);
  }

  /// See consumer::lag(). Local calls only: rd_kafka_position() and
  /// rd_kafka_get_watermark_offsets() read what the last fetches cached.
  int64_t compute_lag(rd_kafka_t* h) {
    partition_list_ptr list(rd_kafka_topic_partition_list_new(4));
    std::vector<int64_t> first_unfinished;
    {
      std::lock_guard<std::mutex> lock(mu);
      for (const auto& [key, t] : trackers) {
        rd_kafka_topic_partition_list_add(list.get(), t.topic.c_str(), t.partition);
        // done() pops the finished prefix, so the front is unfinished.
        first_unfinished.push_back(t.inflight.empty() ? -1 : t.inflight.front().first);
      }
    }
    if (list->cnt == 0) return 0;
    if (rd_kafka_position(h, list.get()) != RD_KAFKA_RESP_ERR_NO_ERROR) return lag->load();
    int64_t total = 0;
    std::map<std::string, int64_t> by_topic;
    for (int i = 0; i < list->cnt; ++i) {
      const auto& p = list->elems[i];
      int64_t lo = 0, hi = 0;
      if (rd_kafka_get_watermark_offsets(h, p.topic, p.partition, &lo, &hi) !=
              RD_KAFKA_RESP_ERR_NO_ERROR ||
          hi < 0)
        continue; // nothing fetched from it yet
      const int64_t from = first_unfinished[static_cast<std::size_t>(i)] >= 0
                               ? first_unfinished[static_cast<std::size_t>(i)]
                               : p.offset;
      if (from < 0) continue; // no position yet (RD_KAFKA_OFFSET_INVALID)
      total += std::max<int64_t>(0, hi - from);
      if (!opts.lag_by_topic.empty()) by_topic[p.topic] += std::max<int64_t>(0, hi - from);
    }
    store_by_topic(opts.lag_by_topic, [&](const std::string& topic) {
      auto it = by_topic.find(topic);
      return it == by_topic.end() ? int64_t{0} : it->second;
    });
    return total;
  }

  // -- the consumer thread -----------------------------------------------------

  void deliver(const rd_kafka_message_t* m) {
    message msg;
    msg.id.topic = rd_kafka_topic_name(m->rkt);
    msg.id.partition = m->partition;
    msg.id.offset = m->offset;
    if (m->key) msg.key.assign(static_cast<const char*>(m->key), m->key_len);
    if (m->payload) msg.value.assign(static_cast<const char*>(m->payload), m->len);
    msg.tombstone = m->payload == nullptr;
    msg.headers = read_headers(m);
    rd_kafka_timestamp_type_t tstype;
    msg.timestamp_ms = rd_kafka_message_timestamp(m, &tstype);
    {
      std::lock_guard<std::mutex> lock(mu);
      tracker& t = trackers[partition_key(msg.id.topic, msg.id.partition)];
      t.topic = msg.id.topic;
      t.partition = msg.id.partition;
      t.inflight.emplace_back(msg.id.offset, false);
      ++in_flight;
      msg.id.epoch = epoch;
    }
    const std::string where = msg.id.topic + "/" + std::to_string(msg.id.partition) + "@" +
                              std::to_string(msg.id.offset);
    try {
      on_message(std::move(msg));
    } catch (const std::exception& e) {
      // Left unfinished: its partition's commit stops here until a restart
      // or rebalance redelivers it. kafka_bus dead-letters instead.
      write_log(log, 3, "consumer handler threw on " + where + ": " + e.what());
    }
  }

  void apply_backpressure(rd_kafka_t* h) {
    bool pause = false, resume = false;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!paused && in_flight >= opts.max_in_flight) pause = paused = true;
      else if (paused && in_flight <= opts.max_in_flight / 2) {
        resume = true;
        paused = false;
      }
    }
    if (!pause && !resume) return;
    rd_kafka_topic_partition_list_t* raw = nullptr;
    if (rd_kafka_assignment(h, &raw) != RD_KAFKA_RESP_ERR_NO_ERROR || !raw) return;
    partition_list_ptr parts(raw);
    if (pause) rd_kafka_pause_partitions(h, parts.get());
    else rd_kafka_resume_partitions(h, parts.get());
  }

  void run() {
    rd_kafka_t* h = rk.get();
    auto next_lag = std::chrono::steady_clock::now();
    while (!stop) {
      message_ptr m(rd_kafka_consumer_poll(h, 50));
      if (m) {
        if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR)
          deliver(m.get());
        else if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
          write_log(log, 4, std::string("consumer: ") + rd_kafka_message_errstr(m.get()));
      }
      apply_backpressure(h);
      commit_ready(h, false);
      // Timed, not per message: under load the loop turns once per record.
      if (const auto now = std::chrono::steady_clock::now(); now >= next_lag) {
        lag->store(compute_lag(h));
        next_lag = now + std::chrono::milliseconds(lag_refresh_ms);
      }
    }
    commit_ready(h, true);
    rd_kafka_consumer_close(h); // revokes (rebalance callback), leaves the group
    rk.reset();
    lag->store(0);
    owned->store(0);
    zero_by_topic();
  }

  void close() {
    stop = true;
    if (worker.joinable()) worker.join();
  }
};

consumer::consumer(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

consumer::~consumer() {
  if (impl_) impl_->close();
}

error consumer::create(const config::kafka_config& cfg, options opts, handler h,
                       std::unique_ptr<consumer>& out) {
  if (opts.group_id.empty()) return {error_code::bad_request, "kafka consumer: no group id"};
  if (opts.topics.empty()) return {error_code::bad_request, "kafka consumer: no topics"};
  if (opts.max_in_flight == 0) opts.max_in_flight = 1;
  auto p = std::make_unique<impl>();
  p->log = opts.log;
  if (!opts.seed_groups.empty()) p->cfg = cfg;
  p->on_message = std::move(h);
  p->lag = opts.lag_out ? opts.lag_out : std::make_shared<std::atomic<int64_t>>(0);
  p->lag->store(0);
  p->owned = opts.partitions_out ? opts.partitions_out : std::make_shared<std::atomic<int64_t>>(0);
  p->owned->store(0);
  conf_ptr conf;
  if (auto err = make_conf(cfg, client_defaults({{"auto.offset.reset", opts.auto_offset_reset}}),
                           {{"group.id", opts.group_id},
                            {"enable.auto.commit", "false"},
                            {"enable.auto.offset.store", "false"},
                            {"enable.partition.eof", "false"},
                            // Eager: the rebalance callback uses rd_kafka_assign().
                            {"partition.assignment.strategy", "range,roundrobin"}},
                           conf))
    return err;
  set_opaque(conf.get(), p.get());
  rd_kafka_conf_set_rebalance_cb(conf.get(), &impl::on_rebalance);
  rd_kafka_conf_set_offset_commit_cb(conf.get(), &impl::on_commit);
  rd_kafka_conf_set_error_cb(conf.get(), &impl::on_error);
  char errstr[512];
  rd_kafka_t* raw = rd_kafka_new(RD_KAFKA_CONSUMER, conf.get(), errstr, sizeof errstr);
  if (!raw) return {error_code::bad_request, std::string("kafka consumer: ") + errstr};
  conf.release(); // owned by the handle now
  p->rk.reset(raw);
  rd_kafka_poll_set_consumer(raw);
  partition_list_ptr topics(
      rd_kafka_topic_partition_list_new(static_cast<int>(opts.topics.size())));
  for (const std::string& t : opts.topics)
    rd_kafka_topic_partition_list_add(topics.get(), t.c_str(), RD_KAFKA_PARTITION_UA);
  if (const rd_kafka_resp_err_t err = rd_kafka_subscribe(raw, topics.get()))
    return kafka_error(err, "kafka consumer: subscribe");
  p->opts = std::move(opts);
  p->zero_by_topic();
  impl* self = p.get();
  p->worker = std::thread([self] {
    pthread_setname_np(pthread_self(), "prov-kafka-cons");
    self->run();
  });
  out.reset(new consumer(std::move(p)));
  return {};
}

void consumer::done(const message_id& id) {
  impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mu);
  if (id.epoch != s.epoch) return; // delivered before a rebalance: the new owner redoes it
  auto it = s.trackers.find(partition_key(id.topic, id.partition));
  if (it == s.trackers.end()) return;
  impl::tracker& t = it->second;
  auto pos = std::lower_bound(t.inflight.begin(), t.inflight.end(), id.offset,
                              [](const std::pair<int64_t, bool>& e, int64_t off) {
                                return e.first < off;
                              });
  if (pos == t.inflight.end() || pos->first != id.offset || pos->second) return;
  pos->second = true;
  --s.in_flight;
  while (!t.inflight.empty() && t.inflight.front().second) {
    t.commit_next = t.inflight.front().first + 1;
    t.inflight.pop_front();
  }
  if (s.in_flight == 0) s.idle_cv.notify_all();
}

void consumer::close() { impl_->close(); }

std::vector<std::string> consumer::assignment() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<std::string> out;
  for (const auto& [key, t] : impl_->trackers) out.push_back(key);
  return out;
}

std::map<std::string, int64_t> consumer::committed() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->committed_offsets;
}

int64_t consumer::lag() const { return impl_->lag->load(); }

} // namespace prov::bus::kafka
