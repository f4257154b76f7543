#include "bus/kafka_bus.hpp"

#include <algorithm>
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

void kafka_bus::on_record(topic t, const acked_handler& h, message&& m, const ack_fn& ack) {
  const bool requested = t == topic::registration_requested;
  // A requested record carries a device credential: never copied as is.
  auto dead_letter = [&](std::string reason) {
    ++*dead_lettered_;
    const std::string dlt = dead_letter_topic(cfg_);
    if (!requested) {
      forward_to_dead_letter(*producer_, dlt, m, reason, ack, opts_.log);
      return;
    }
    message copy = m;
    copy.value = redact_credentials(copy.value);
    for (auto& hd : copy.headers)
      hd.value = redact_credentials(hd.value);
    // A parse error's message can quote the record ("last read: ...").
    forward_to_dead_letter(*producer_, dlt, copy, redact_credentials(reason), ack, opts_.log);
  };
  registration_event ev;
  // registration.requested comes from outside (direct publishers): its own
  // schema, only the request fields (docs/events.md).
  if (error err = requested ? decode_requested_event(m.value, ev) : decode_event(m.value, ev)) {
    dead_letter("undecodable event: " + err.message);
    return;
  }
  // The record's timestamp is pinned in the log: a stage that timestamps
  // its input from it reproduces the same bytes when the input is
  // redelivered (after a crash, allocation runs again with fused stages).
  if (m.timestamp_ms > 0) {
    if (requested && ev.accepted_ms == 0)
      ev.accepted_ms = m.timestamp_ms; // when the publisher sent it
    else if (t == topic::registration_attested && ev.allocated_ms == 0)
      ev.allocated_ms = m.timestamp_ms; // when it was handed to allocation
  }
  try {
    h(std::move(ev), ack);
  } catch (const std::exception& e) {
    dead_letter(std::string("handler threw: ") + e.what());
  }
}

error kafka_bus::subscribe_acked(topic t, acked_handler h) {
  if (opts_.one_consumer) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      handlers_[static_cast<std::size_t>(t)] = std::make_shared<const acked_handler>(std::move(h));
      const bool consumed = std::find(shared_topics_.begin(), shared_topics_.end(), t) !=
                            shared_topics_.end();
      if (!started_ || (consumed && shared_))
        return {}; // start_consuming() picks it up, or the running consumer has it
    }
    return restart_shared();
  }
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
  // `this` outlives the consumer: close() closes every consumer first.
  auto on_message = [this, t, self, ready_f, h = std::move(h)](message&& m) {
    ready_f.wait();
    std::weak_ptr<consumer> weak = *self;
    ack_fn ack = [weak, id = m.id] {
      if (auto c = weak.lock()) c->done(id);
    };
    on_record(t, h, std::move(m), ack);
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

error kafka_bus::start_consuming() {
  if (!opts_.one_consumer) return {};
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (started_) return {};
    started_ = true;
  }
  return restart_shared();
}

error kafka_bus::restart_shared() {
  std::shared_ptr<consumer> old;
  std::vector<topic> topics;
  {
    std::lock_guard<std::mutex> lock(mu_);
    old = std::move(shared_);
    shared_topics_.clear();
    for (int i = 0; i < topic_count; ++i)
      if (handlers_[static_cast<std::size_t>(i)]) topics.push_back(static_cast<topic>(i));
  }
  if (old) old->close(); // commits what was acked, leaves the group
  if (topics.empty()) return {};
  consumer::options co = opts_.consumer_options;
  co.group_id = opts_.group_prefix + "stages";
  co.max_in_flight *= topics.size(); // the bound was per topic
  std::map<std::string, topic> by_name;
  for (topic t : topics) {
    const std::string name = topic_for(cfg_, t);
    by_name[name] = t;
    co.topics.push_back(name);
    // Upgrades: start where this stage's own group (the versions before
    // one_consumer) left off rather than at the beginning of the topic.
    co.seed_groups[name] = opts_.group_prefix + std::string(topic_name(t));
    co.lag_by_topic[name] = consumer_lags_[static_cast<std::size_t>(t)];
    co.partitions_by_topic[name] = consumer_partitions_[static_cast<std::size_t>(t)];
  }
  auto self = std::make_shared<std::weak_ptr<consumer>>();
  auto ready = std::make_shared<std::promise<void>>();
  std::shared_future<void> ready_f = ready->get_future().share();
  auto on_message = [this, self, ready_f, by_name = std::move(by_name)](message&& m) {
    ready_f.wait();
    auto it = by_name.find(m.id.topic);
    if (it == by_name.end()) return; // not subscribed: never finished, never committed
    std::shared_ptr<const acked_handler> h;
    {
      std::lock_guard<std::mutex> lock(mu_);
      h = handlers_[static_cast<std::size_t>(it->second)];
    }
    if (!h) return; // unsubscribed: left unacked for the partition's next owner
    std::weak_ptr<consumer> weak = *self;
    ack_fn ack = [weak, id = m.id] {
      if (auto c = weak.lock()) c->done(id);
    };
    on_record(it->second, *h, std::move(m), ack);
  };
  std::unique_ptr<consumer> made;
  const error err = consumer::create(cfg_, std::move(co), std::move(on_message), made);
  std::shared_ptr<consumer> c(std::move(made));
  *self = c;
  ready->set_value();
  if (err) return err;
  std::lock_guard<std::mutex> lock(mu_);
  shared_ = std::move(c);
  shared_topics_ = std::move(topics);
  return {};
}

void kafka_bus::unsubscribe(topic t) {
  std::shared_ptr<consumer> c;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (opts_.one_consumer) {
      handlers_[static_cast<std::size_t>(t)].reset();
      for (const auto& h : handlers_)
        if (h) return; // the others keep the consumer
      c = std::move(shared_);
      shared_topics_.clear();
    } else {
      auto it = consumers_.find(t);
      if (it == consumers_.end()) return;
      c = std::move(it->second);
      consumers_.erase(it);
    }
  }
  if (c) c->close();
}

std::map<std::string, int64_t> kafka_bus::committed(topic t) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (opts_.one_consumer) {
    if (!shared_) return {};
    const std::string prefix = topic_for(cfg_, t) + "/";
    std::map<std::string, int64_t> out;
    for (auto& [key, offset] : shared_->committed())
      if (key.compare(0, prefix.size(), prefix) == 0) out.emplace(key, offset);
    return out;
  }
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
    // The shared consumer under any of its topics: closed like the others.
    if (shared_) cs.emplace(shared_topics_.empty() ? topic{} : shared_topics_.front(),
                            std::move(shared_));
    shared_topics_.clear();
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
