#include "benchmarks/harness/direct.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "benchmarks/harness/process.hpp"
#include "bus/kafka_common.hpp"
#include "bus/kafka_producer.hpp"
#include "bus/kafka_table.hpp"

namespace bench {

namespace kafka = prov::bus::kafka;
using steady = std::chrono::steady_clock;

namespace {

double ms_between(steady::time_point a, steady::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

int64_t system_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
           std::chrono::system_clock::now().time_since_epoch())
    .count();
}

enum class slot_state : uint8_t { idle, in_flight, assigned, failed };

struct slot {
  steady::time_point t0;
  int64_t sys_ms = 0;
  slot_state state = slot_state::idle;
  bool assigned_event = false;
};

/// Everything the producer's and the readers' threads share with the caller
/// (a copy of the options: late delivery callbacks outlive the caller's).
struct run_state {
  const direct_options o;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<slot> slots;
  uint64_t in_flight = 0;
  load_result r;

  explicit run_state(const direct_options& opts) : o(opts), slots(opts.count) {}

  /// The device index of an operationId of this run, or false.
  bool index_of(const std::string& op, uint64_t& idx) const {
    if (op.size() <= o.operation_prefix.size()
        || op.compare(0, o.operation_prefix.size(), o.operation_prefix) != 0)
      return false;
    char* end = nullptr;
    idx = std::strtoull(op.c_str() + o.operation_prefix.size(), &end, 10);
    return end && *end == '\0' && idx < slots.size();
  }

  // Callers hold mu.
  void error(const std::string& code, const std::string& msg) {
    ++r.errors[code];
    if (r.error_samples.size() < 10)
      r.error_samples.push_back(code + ": " + msg);
  }
  void fail(uint64_t i, const std::string& code, const std::string& msg) {
    auto& s = slots[i];
    if (s.state != slot_state::in_flight)
      return;
    s.state = slot_state::failed;
    --in_flight;
    ++r.failed;
    error(code, o.registration_id(i) + ": " + msg);
    cv.notify_one();
  }

  void on_completed(const std::vector<kafka::message>& batch) {
    auto now = steady::now();
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& m : batch) {
      const std::string* op = kafka::find_header(m.headers, "operation_id");
      uint64_t i = 0;
      if (!op || !index_of(*op, i))
        continue; // another run's (warm-up) or someone else's
      ++r.completed_records;
      auto& s = slots[i];
      if (s.state == slot_state::assigned) {
        ++r.duplicate_completed;
        continue;
      }
      if (s.state != slot_state::in_flight)
        continue; // timed out or failed already
      // Late is failed, even before the next timeout sweep saw it (as a
      // device that stopped polling would have).
      if (now - s.t0 > std::chrono::seconds(o.device_timeout_s)) {
        fail(i, "device_timeout",
             "registration.completed after " + std::to_string(o.device_timeout_s) + " s");
        continue;
      }
      auto j = nlohmann::json::parse(m.value, nullptr, false);
      if (!j.is_object()) {
        fail(i, "bad_record", "registration.completed is not JSON: " + m.value.substr(0, 200));
        continue;
      }
      std::string status = j.value("status", "");
      if (status != "assigned") {
        // The same "status:errorCode" key as the HTTPS path's terminal answers.
        std::string code = status.empty() ? "bad_record" : status;
        if (j.contains("errorCode"))
          code += ":" + j["errorCode"].dump();
        fail(i, code, "completed: " + j.value("errorMessage", std::string()));
        continue;
      }
      s.state = slot_state::assigned;
      --in_flight;
      ++r.succeeded;
      r.client_tta.push_back(ms_between(s.t0, now));
      int64_t completed = j.value("completedMs", int64_t{0});
      if (completed > 0)
        r.server_tta.push_back(completed > s.sys_ms ? static_cast<double>(completed - s.sys_ms)
                                                    : 0.0);
      cv.notify_one();
    }
  }

  void on_assigned(const std::vector<kafka::message>& batch) {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& m : batch) {
      const std::string* op = kafka::find_header(m.headers, "ce_id");
      uint64_t i = 0;
      if (!op || !index_of(*op, i))
        continue;
      ++r.assigned_events;
      if (slots[i].assigned_event)
        ++r.duplicate_assigned;
      slots[i].assigned_event = true;
    }
  }
};

} // namespace

struct direct_publisher::impl {
  std::unique_ptr<kafka::producer> prod;
  std::unique_ptr<kafka::table_reader> completed, assigned;
  std::string requested_topic;
  std::mutex cur_mu;
  std::shared_ptr<run_state> cur; ///< the run the readers report to

  std::shared_ptr<run_state> current() {
    std::lock_guard<std::mutex> lock(cur_mu);
    return cur;
  }
  /// Destroys the handles too: a closed reader's handle would still try to
  /// reconnect (and log it) once the brokers are gone.
  void close() {
    prod.reset();
    completed.reset();
    assigned.reset();
  }
};

direct_publisher::direct_publisher() : impl_(std::make_unique<impl>()) {}

direct_publisher::~direct_publisher() {
  close();
}

void direct_publisher::close() {
  impl_->close();
}

prov::error direct_publisher::start(const std::string& brokers,
                                    const std::map<std::string, std::string>& properties,
                                    const std::string& topic_prefix) {
  prov::config::kafka_config cfg;
  cfg.brokers = brokers;
  cfg.topic_prefix = topic_prefix;
  cfg.client_id = "provisiond-bench";
  cfg.properties = properties;
  // Errors only: consumer-only properties of the deployment (session.*)
  // draw a warning from the producer.
  kafka::log_fn log = [](int level, std::string_view msg) {
    if (level <= 3)
      std::fprintf(stderr, "provisiond-bench: kafka: %.*s\n", static_cast<int>(msg.size()),
                   msg.data());
  };
  impl* p = impl_.get();
  kafka::table_reader::options ro;
  ro.log = log;
  // Both readers hand their batches to the current run's state, if any.
  auto open_reader = [&](prov::bus::topic t,
                         void (run_state::*on)(const std::vector<kafka::message>&),
                         std::unique_ptr<kafka::table_reader>& out) {
    ro.topic = kafka::topic_for(cfg, t);
    return kafka::table_reader::create(
      cfg, ro,
      [p, on](const std::vector<kafka::message>& b) {
        if (auto st = p->current())
          (st.get()->*on)(b);
        return prov::error{};
      },
      out);
  };
  using prov::bus::topic;
  if (auto e = open_reader(topic::registration_completed, &run_state::on_completed, p->completed))
    return e;
  if (auto e = open_reader(topic::device_assigned, &run_state::on_assigned, p->assigned))
    return e;
  for (auto* t : {p->completed.get(), p->assigned.get()})
    if (auto e = t->wait_caught_up(30000))
      return e;
  kafka::producer::options po;
  po.log = log;
  if (auto e = kafka::producer::create(cfg, po, p->prod))
    return e;
  p->requested_topic = kafka::topic_for(cfg, prov::bus::topic::registration_requested);
  return {};
}

load_result direct_publisher::run(const direct_options& o, const tick_fn& tick) {
  auto stp = std::make_shared<run_state>(o);
  auto& st = *stp;
  auto& r = st.r;
  r.direct = true;
  if (!impl_->prod) {
    st.error("kafka", "direct_publisher::run before start()");
    r.failed = o.count;
    return r;
  }
  {
    std::lock_guard<std::mutex> lock(impl_->cur_mu);
    impl_->cur = stp;
  }

  const uint64_t limit = static_cast<uint64_t>(std::max(1, o.concurrency));
  double cpu0 = self_cpu_seconds();
  auto t0 = steady::now();
  auto next_tick = t0 + std::chrono::milliseconds(250);
  uint64_t next = 0;
  auto interrupted = [&] { return o.interrupted && o.interrupted->load(); };
  while (true) {
    {
      std::unique_lock<std::mutex> lock(st.mu);
      bool starting = next < o.count && !interrupted();
      if (!starting && st.in_flight == 0)
        break;
      if (!starting || st.in_flight >= limit)
        st.cv.wait_until(lock, next_tick);
    }
    auto now = steady::now();
    if (now >= next_tick) {
      next_tick = now + std::chrono::milliseconds(250);
      uint64_t ok = 0, bad = 0;
      {
        std::lock_guard<std::mutex> lock(st.mu);
        auto too_old = now - std::chrono::seconds(o.device_timeout_s);
        for (uint64_t i = 0; i < next; ++i)
          if (st.slots[i].state == slot_state::in_flight && st.slots[i].t0 <= too_old)
            st.fail(i, "device_timeout",
                    "no registration.completed after " + std::to_string(o.device_timeout_s)
                      + " s");
        ok = r.succeeded;
        bad = r.failed;
      }
      if (tick)
        tick(ms_between(t0, now) / 1000.0, ok, bad);
    }
    while (next < o.count && !interrupted()) {
      uint64_t i = next;
      {
        std::lock_guard<std::mutex> lock(st.mu);
        if (st.in_flight >= limit)
          break;
        ++st.in_flight;
        ++r.started;
        auto& s = st.slots[i];
        s.state = slot_state::in_flight;
        s.t0 = steady::now();
        s.sys_ms = system_ms();
      }
      ++next;
      std::string reg = o.registration_id(i);
      kafka::record rec;
      rec.topic = impl_->requested_topic;
      rec.key = reg;
      rec.value = nlohmann::json{{"registrationId", reg},
                                 {"idScope", o.id_scope},
                                 {"authorization", device_sas(o.id_scope, o.key_root, reg)},
                                 {"operationId", o.operation_prefix + std::to_string(i)}}
                    .dump();
      // The callback may come after this run ended (a timed-out device): it
      // holds the run's state.
      auto e = impl_->prod->send(std::move(rec), [stp, i](const kafka::delivery& d) {
        std::lock_guard<std::mutex> lock(stp->mu);
        if (d.err) {
          stp->fail(i, "produce", d.err.message);
          return;
        }
        ++stp->r.produced;
        stp->r.produce_ack.push_back(ms_between(stp->slots[i].t0, steady::now()));
      });
      if (e) {
        std::lock_guard<std::mutex> lock(st.mu);
        st.fail(i, "produce", e.message);
      }
    }
  }
  r.wall_s = ms_between(t0, steady::now()) / 1000.0;
  r.harness_cpu_s = self_cpu_seconds() - cpu0;

  // device.assigned is published with completed; give its reader a moment.
  auto deadline = steady::now() + std::chrono::seconds(5);
  while (steady::now() < deadline) {
    {
      std::lock_guard<std::mutex> lock(st.mu);
      if (r.assigned_events - r.duplicate_assigned >= r.succeeded)
        break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  {
    std::lock_guard<std::mutex> lock(impl_->cur_mu);
    impl_->cur.reset();
  }
  std::lock_guard<std::mutex> lock(st.mu);
  return r;
}

} // namespace bench
