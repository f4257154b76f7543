#include "bus/kafka_bus.hpp"

#include <exception>
#include <future>
#include <thread>
#include <utility>
#include <vector>

#include "bus/kafka_dead_letter.hpp"

namespace prov::bus::kafka {

kafka_bus::kafka_bus(const config::kafka_config& cfg, options opts)
    : cfg_(cfg), opts_(std::move(opts)) {
  for (auto& lag : consumer_lags_) lag = std::make_shared<std::atomic<int64_t>>(0);
  for (auto& n : consumer_partitions_) n = std::make_shared<std::atomic<int64_t>>(0);
}

kafka_bus::~kafka_bus() { close(); }

error kafka_bus::create(const config::kafka_config& cfg, options opts,
                        std::unique_ptr<kafka_bus>& out) {
  if (!opts.producer_options.log) opts.producer_options.log = opts.log;
  if (!opts.consumer_options.log) opts.consumer_options.log = opts.log;
  std::unique_ptr<kafka_bus> b(new kafka_bus(cfg, std::move(opts)));
  if (auto err = producer::create(cfg, b->opts_.producer_options, b->producer_)) return err;
  out = std::move(b);
  return {};
}

std::string kafka_bus::key_for(topic t, const registration_event& ev) {
  if (t == topic::device_assigned && !ev.device_id.empty()) return ev.device_id;
  return ev.registration_id;
}

error kafka_bus::publish(topic t, const registration_event& ev, delivery_fn done) {
  record r;
  r.topic = topic_for(cfg_, t);
  r.key = key_for(t, ev);
  r.value = encode_event(ev);
  r.headers = {{"operation_id", ev.operation_id},
               {"event_version", std::to_string(ev.version)}};
  return producer_->send(std::move(r), std::move(done));
}

void kafka_bus::publish(topic t, registration_event ev) {
  const log_fn log = opts_.log;
  const std::string what = std::string(topic_name(t)) + " for operation " + ev.operation_id;
  const error err = publish(t, ev, [log, what](const delivery& d) {
    if (!d.err.ok()) write_log(log, 3, "publish " + what + " failed: " + d.err.message);
  });
  if (err) write_log(log, 3, "publish " + what + " refused: " + err.message);
}

void kafka_bus::publish_durable(topic t, registration_event ev, durable_fn done) {
  auto shared = std::make_shared<durable_fn>(std::move(done));
  const error err = publish(t, ev, [shared](const delivery& d) { (*shared)(d.err); });
  if (err) (*shared)(err);
}

void kafka_bus::publish_raw_durable(topic t, raw_record rec, durable_fn done) {
  record r;
  r.topic = topic_for(cfg_, t);
  r.key = std::move(rec.key);
  r.value = std::move(rec.value);
  for (auto& [name, value] : rec.headers)
    r.headers.push_back({std::move(name), std::move(value)});
  auto shared = std::make_shared<durable_fn>(std::move(done));
  const error err =
    producer_->send(std::move(r), [shared](const delivery& d) { (*shared)(d.err); });
  if (err) (*shared)(err);
}

void kafka_bus::subscribe(topic t, handler h) {
  if (!h) {
    unsubscribe(t);
    return;
  }
  auto plain = std::make_shared<handler>(std::move(h));
  const error err = subscribe_acked(t, [plain](registration_event&& ev, std::function<void()> ack) {
    (*plain)(std::move(ev));
    ack();
  });
  if (err)
    write_log(opts_.log, 3,
              "subscribe to " + std::string(topic_name(t)) + " failed: " + err.message);
}

error kafka_bus::subscribe_acked(topic t, acked_handler h) {
  unsubscribe(t);
  consumer::options co = opts_.consumer_options;
  co.group_id = opts_.group_prefix + std::string(topic_name(t));
  co.topics = {topic_for(cfg_, t)};
  co.lag_out = consumer_lags_[static_cast<std::size_t>(t)]; // the old one closed above
  co.partitions_out = consumer_partitions_[static_cast<std::size_t>(t)];
  // The handler needs its own consumer (for done()); it is known only after
  // create() returns, which can be after the first message arrives.
  auto self = std::make_shared<std::weak_ptr<consumer>>();
  auto ready = std::make_shared<std::promise<void>>();
  std::shared_future<void> ready_f = ready->get_future().share();
  producer* prod = producer_.get(); // closed only after every consumer
  const std::string dlt = dead_letter_topic(cfg_);
  const log_fn log = opts_.log;
  std::atomic<uint64_t>* dead = dead_lettered_.get();
  const bool requested = t == topic::registration_requested;
  const bool attested = t == topic::registration_attested;
  auto on_message = [self, ready_f, prod, dlt, log, dead, requested, attested,
                     h = std::move(h)](message&& m) {
    ready_f.wait();
    std::weak_ptr<consumer> weak = *self;
    auto ack = [weak, id = m.id] {
      if (auto c = weak.lock()) c->done(id);
    };
    // A requested record carries a device credential: never copied as is.
    auto dead_letter = [&](std::string reason) {
      ++*dead;
      if (!requested) {
        forward_to_dead_letter(*prod, dlt, m, reason, ack, log);
        return;
      }
      message copy = m;
      copy.value = redact_credentials(copy.value);
      for (auto& hd : copy.headers)
        hd.value = redact_credentials(hd.value);
      // A parse error's message can quote the record ("last read: ...").
      forward_to_dead_letter(*prod, dlt, copy, redact_credentials(reason), ack, log);
    };
    registration_event ev;
    // registration.requested comes from outside (direct publishers): its own
    // schema, only the request fields (docs/events.md).
    if (error err = requested ? decode_requested_event(m.value, ev)
                              : decode_event(m.value, ev)) {
      dead_letter("undecodable event: " + err.message);
      return;
    }
    // The record's timestamp is pinned in the log: a stage that timestamps
    // its input from it reproduces the same bytes when the input is
    // redelivered (after a crash, allocation runs again with fused stages).
    if (m.timestamp_ms > 0) {
      if (requested && ev.accepted_ms == 0)
        ev.accepted_ms = m.timestamp_ms; // when the publisher sent it
      else if (attested && ev.allocated_ms == 0)
        ev.allocated_ms = m.timestamp_ms; // when it was handed to allocation
    }
    try {
      h(std::move(ev), ack);
    } catch (const std::exception& e) {
      dead_letter(std::string("handler threw: ") + e.what());
    }
  };
  std::unique_ptr<consumer> made;
  const error err = consumer::create(cfg_, std::move(co), std::move(on_message), made);
  std::shared_ptr<consumer> c(std::move(made));
  *self = c;
  ready->set_value();
  if (err) return err;
  std::lock_guard<std::mutex> lock(mu_);
  consumers_[t] = std::move(c);
  return {};
}

void kafka_bus::unsubscribe(topic t) {
  std::shared_ptr<consumer> c;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = consumers_.find(t);
    if (it == consumers_.end()) return;
    c = std::move(it->second);
    consumers_.erase(it);
  }
  c->close();
}

std::map<std::string, int64_t> kafka_bus::committed(topic t) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = consumers_.find(t);
  return it == consumers_.end() ? std::map<std::string, int64_t>{} : it->second->committed();
}

std::shared_ptr<const producer::counters> kafka_bus::producer_counters() const {
  return producer_->shared_counters();
}

error kafka_bus::send_record(record r, delivery_fn done) {
  return producer_->send(std::move(r), std::move(done));
}

void kafka_bus::dead_letter(const message& m, std::string_view reason) {
  ++*dead_lettered_;
  forward_to_dead_letter(*producer_, dead_letter_topic(cfg_), m, reason, [] {}, opts_.log);
}

void kafka_bus::stop_consuming() {
  std::map<topic, std::shared_ptr<consumer>> cs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cs.swap(consumers_);
  }
  // In parallel: each close waits up to its revoke grace for messages still
  // in flight (a draining engine leaves new input unacked), and the group
  // rebalances to the other members only once this member has left.
  std::vector<std::thread> closing;
  for (auto& [t, c] : cs) {
    try {
      closing.emplace_back([c = c] { c->close(); });
    } catch (...) {
      c->close(); // no thread: one after the other
    }
  }
  for (auto& th : closing) th.join();
}

void kafka_bus::close() {
  stop_consuming();
  if (producer_) producer_->close();
}

} // namespace prov::bus::kafka
