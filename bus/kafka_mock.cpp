#include "bus/kafka_mock.hpp"

#include <algorithm>
#include <future>
#include <vector>

#include "bus/kafka_admin.hpp"
#include "bus/kafka_handles.hpp"

#include <librdkafka/rdkafka_mock.h>

namespace prov::bus::kafka {

using namespace internal;

struct mock_cluster::impl : opaque_base {
  handle_ptr rk; ///< bookkeeping handle the cluster lives on
  rd_kafka_mock_cluster_t* mc = nullptr;
  std::string bootstraps;
  int brokers = 0;

  ~impl() {
    // The cluster must go before the handle it was created on.
    if (mc) rd_kafka_mock_cluster_destroy(mc);
  }
};

namespace {

error mock_error(rd_kafka_resp_err_t err, const std::string& what) {
  if (err == RD_KAFKA_RESP_ERR_NO_ERROR) return {};
  return {error_code::internal, "mock cluster: " + what + ": " + rd_kafka_err2str(err)};
}

} // namespace

mock_cluster::mock_cluster(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
mock_cluster::~mock_cluster() = default;

error mock_cluster::start(int brokers, std::unique_ptr<mock_cluster>& out, const log_fn& log) {
  if (brokers < 1 || brokers > 64)
    return {error_code::bad_request, "mock cluster: broker count must be 1..64"};
  auto p = std::make_unique<impl>();
  p->log = log;
  conf_ptr conf(rd_kafka_conf_new());
  set_opaque(conf.get(), p.get());
  char errstr[512];
  rd_kafka_t* h = rd_kafka_new(RD_KAFKA_PRODUCER, conf.get(), errstr, sizeof errstr);
  if (!h) return {error_code::internal, std::string("mock cluster: ") + errstr};
  conf.release();
  p->rk.reset(h);
  p->mc = rd_kafka_mock_cluster_new(h, brokers);
  if (!p->mc) return {error_code::internal, "mock cluster: could not start (see log)"};
  p->bootstraps = rd_kafka_mock_cluster_bootstraps(p->mc);
  p->brokers = brokers;
  out.reset(new mock_cluster(std::move(p)));
  return {};
}

const std::string& mock_cluster::bootstrap_servers() const noexcept { return impl_->bootstraps; }

int mock_cluster::broker_count() const noexcept { return impl_->brokers; }

error mock_cluster::create_topic(const std::string& name, int partitions,
                                 int replication_factor) {
  const int rf = std::clamp(replication_factor, 1, impl_->brokers);
  const rd_kafka_resp_err_t err =
      rd_kafka_mock_topic_create(impl_->mc, name.c_str(), partitions, rf);
  if (err == RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS) return {};
  return mock_error(err, "create topic " + name);
}

error mock_cluster::create_topics(const std::vector<topic_spec>& specs) {
  // Each mock command waits for the mock's I/O loop (up to ~0.2 s), so ask
  // once which topics exist instead of creating every one again.
  config::kafka_config cfg;
  cfg.brokers = impl_->bootstraps;
  std::vector<std::string> existing;
  if (auto err = list_topics(cfg, existing, 5000, impl_->log)) return err;
  // Issued concurrently, the commands are served in one wake-up of the
  // mock's loop instead of one wake-up each.
  std::vector<std::future<error>> pending;
  for (const topic_spec& s : specs) {
    if (std::find(existing.begin(), existing.end(), s.name) != existing.end()) continue;
    pending.push_back(std::async(std::launch::async, [this, s] {
      return create_topic(s.name, s.partitions, s.replication_factor);
    }));
  }
  error first;
  for (auto& f : pending) {
    error err = f.get();
    if (err && first.ok()) first = std::move(err);
  }
  return first;
}

error mock_cluster::broker_down(int32_t broker_id) {
  return mock_error(rd_kafka_mock_broker_set_down(impl_->mc, broker_id), "broker down");
}

error mock_cluster::broker_up(int32_t broker_id) {
  return mock_error(rd_kafka_mock_broker_set_up(impl_->mc, broker_id), "broker up");
}

error mock_cluster::broker_rtt(int32_t broker_id, int rtt_ms) {
  return mock_error(rd_kafka_mock_broker_set_rtt(impl_->mc, broker_id, rtt_ms), "broker rtt");
}

error mock_cluster::group_coordinator(const std::string& group, int32_t broker_id) {
  return mock_error(rd_kafka_mock_coordinator_set(impl_->mc, "group", group.c_str(), broker_id),
                    "set coordinator of " + group);
}

error mock_cluster::partition_leader(const std::string& topic, int32_t partition,
                                     int32_t broker_id) {
  return mock_error(
      rd_kafka_mock_partition_set_leader(impl_->mc, topic.c_str(), partition, broker_id),
      "set leader of " + topic);
}

void mock_cluster::push_request_errors(api a, const std::vector<int>& codes) {
  std::vector<rd_kafka_resp_err_t> errs;
  for (int c : codes) errs.push_back(static_cast<rd_kafka_resp_err_t>(c));
  rd_kafka_mock_push_request_errors_array(impl_->mc, static_cast<int16_t>(a), errs.size(),
                                          errs.data());
}

error mock_cluster::delay_responses(int32_t broker_id, api a, int rtt_ms, int count) {
  for (int i = 0; i < count; ++i)
    if (auto err = mock_error(rd_kafka_mock_broker_push_request_error_rtts(
                                  impl_->mc, broker_id, static_cast<int16_t>(a), 1,
                                  RD_KAFKA_RESP_ERR_NO_ERROR, rtt_ms),
                              "delay responses"))
      return err;
  return {};
}

error mock_cluster::fail_next(int32_t broker_id, api a, int kafka_error_code, int rtt_ms) {
  return mock_error(rd_kafka_mock_broker_push_request_error_rtts(
                        impl_->mc, broker_id, static_cast<int16_t>(a), 1,
                        static_cast<rd_kafka_resp_err_t>(kafka_error_code), rtt_ms),
                    "fail next request");
}

std::size_t mock_cluster::pending_errors(int32_t broker_id, api a) const {
  size_t n = 0;
  if (rd_kafka_mock_broker_error_stack_cnt(impl_->mc, broker_id, static_cast<int16_t>(a), &n))
    return 0; // no such broker: nothing pending there
  return n;
}

void mock_cluster::clear_request_errors(api a) {
  rd_kafka_mock_clear_request_errors(impl_->mc, static_cast<int16_t>(a));
}

const std::vector<suggested_property>& mock_client_properties() {
  static const std::vector<suggested_property> props = {
    {"session.timeout.ms", "6000",
     "a dead worker's partitions move after this, plus the mock's join window (this less "
     "1 s): about 12 s instead of 90 s. It also keeps every SyncGroup the mock holds under "
     "the consumers' 10 s socket timeout; a SyncGroup sent again after that timeout aborts "
     "librdkafka 2.0.2's mock (rd_kafka_mock_cgrp_member_sync_set)"},
    {"heartbeat.interval.ms", "500",
     "members learn of a rebalance well inside the mock's 5 s join window"},
    {"fetch.wait.max.ms", "10",
     "the mock holds an empty fetch for the whole wait instead of answering when data "
     "arrives: with librdkafka's 500 ms, each stage hop costs up to 500 ms at idle"},
    {"max.in.flight.requests.per.connection", "1",
     "the mock checks idempotent-producer sequence numbers only for transactional "
     "producers: it appends a batch sent behind one it failed, and the client then reports "
     "the failed batch delivered (implicit ack, offset -1001) although it is not in the log. "
     "A real broker refuses the gap, so 5 (librdkafka's default) is safe there"},
  };
  return props;
}

} // namespace prov::bus::kafka
