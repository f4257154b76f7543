#include "bus/kafka_admin.hpp"

#include <algorithm>
#include <memory>

#include "bus/kafka_handles.hpp"

namespace prov::bus::kafka {

using namespace internal;

namespace {

struct admin_options_deleter {
  void operator()(rd_kafka_AdminOptions_t* p) const noexcept { rd_kafka_AdminOptions_destroy(p); }
};
struct queue_deleter {
  void operator()(rd_kafka_queue_t* p) const noexcept { rd_kafka_queue_destroy(p); }
};
struct event_deleter {
  void operator()(rd_kafka_event_t* p) const noexcept { rd_kafka_event_destroy(p); }
};
struct new_topic_deleter {
  void operator()(rd_kafka_NewTopic_t* p) const noexcept { rd_kafka_NewTopic_destroy(p); }
};
using new_topic_ptr = std::unique_ptr<rd_kafka_NewTopic_t, new_topic_deleter>;

/// A short-lived client for admin requests.
struct admin_client : opaque_base {
  handle_ptr rk;

  error open(const config::kafka_config& cfg, const log_fn& sink) {
    log = sink;
    conf_ptr conf;
    if (auto err = make_conf(cfg, {}, {}, conf)) return err;
    set_opaque(conf.get(), this);
    char errstr[512];
    rd_kafka_t* h = rd_kafka_new(RD_KAFKA_PRODUCER, conf.get(), errstr, sizeof errstr);
    if (!h) return {error_code::bad_request, std::string("kafka admin: ") + errstr};
    conf.release();
    rk.reset(h);
    return {};
  }
};

error fetch_topic_names(rd_kafka_t* rk, int timeout_ms, std::vector<std::string>& out) {
  const rd_kafka_metadata_t* md = nullptr;
  // all_topics=1: a metadata request for named topics could auto-create them.
  if (const rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 1, nullptr, &md, timeout_ms))
    return kafka_error(err, "kafka metadata request");
  out.clear();
  for (int i = 0; i < md->topic_cnt; ++i)
    if (md->topics[i].err == RD_KAFKA_RESP_ERR_NO_ERROR) out.emplace_back(md->topics[i].topic);
  rd_kafka_metadata_destroy(md);
  return {};
}

} // namespace

error list_topics(const config::kafka_config& cfg, std::vector<std::string>& out, int timeout_ms,
                  const log_fn& log) {
  admin_client c;
  if (auto err = c.open(cfg, log)) return err;
  return fetch_topic_names(c.rk.get(), timeout_ms, out);
}

error ensure_topics(const config::kafka_config& cfg, const std::vector<topic_spec>& specs,
                    ensure_topics_result* result, int timeout_ms, const log_fn& log) {
  admin_client c;
  if (auto err = c.open(cfg, log)) return err;
  std::vector<std::string> names;
  if (auto err = fetch_topic_names(c.rk.get(), timeout_ms, names)) return err;

  ensure_topics_result res;
  std::vector<new_topic_ptr> missing;
  for (const topic_spec& s : specs) {
    if (std::find(names.begin(), names.end(), s.name) != names.end()) {
      res.existing.push_back(s.name);
      continue;
    }
    char errstr[512];
    new_topic_ptr t(rd_kafka_NewTopic_new(s.name.c_str(), s.partitions, s.replication_factor,
                                          errstr, sizeof errstr));
    if (!t) return {error_code::bad_request, "topic " + s.name + ": " + errstr};
    for (const auto& [k, v] : topic_configs(s))
      if (const rd_kafka_resp_err_t err = rd_kafka_NewTopic_set_config(t.get(), k.c_str(),
                                                                        v.c_str()))
        return kafka_error(err, "topic " + s.name + ": " + k);
    missing.push_back(std::move(t));
  }
  if (missing.empty()) {
    if (result) *result = std::move(res);
    return {};
  }

  std::unique_ptr<rd_kafka_queue_t, queue_deleter> q(rd_kafka_queue_new(c.rk.get()));
  std::unique_ptr<rd_kafka_AdminOptions_t, admin_options_deleter> opts(
      rd_kafka_AdminOptions_new(c.rk.get(), RD_KAFKA_ADMIN_OP_CREATETOPICS));
  char errstr[512];
  rd_kafka_AdminOptions_set_request_timeout(opts.get(), timeout_ms, errstr, sizeof errstr);
  rd_kafka_AdminOptions_set_operation_timeout(opts.get(), timeout_ms, errstr, sizeof errstr);
  std::vector<rd_kafka_NewTopic_t*> raw;
  for (auto& t : missing) raw.push_back(t.get());
  rd_kafka_CreateTopics(c.rk.get(), raw.data(), raw.size(), opts.get(), q.get());

  std::unique_ptr<rd_kafka_event_t, event_deleter> ev(
      rd_kafka_queue_poll(q.get(), timeout_ms + 5000));
  if (!ev) return {error_code::unavailable, "kafka CreateTopics: no answer in time"};
  if (const rd_kafka_resp_err_t err = rd_kafka_event_error(ev.get()))
    return {error_code::unavailable, std::string("kafka CreateTopics: ") +
                                         rd_kafka_event_error_string(ev.get())};
  const rd_kafka_CreateTopics_result_t* cr = rd_kafka_event_CreateTopics_result(ev.get());
  size_t n = 0;
  const rd_kafka_topic_result_t** results = rd_kafka_CreateTopics_result_topics(cr, &n);
  for (size_t i = 0; i < n; ++i) {
    const std::string name = rd_kafka_topic_result_name(results[i]);
    const rd_kafka_resp_err_t err = rd_kafka_topic_result_error(results[i]);
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
      res.created.push_back(name);
    else if (err == RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS)
      res.existing.push_back(name);
    else {
      const char* why = rd_kafka_topic_result_error_string(results[i]);
      return {error_code::unavailable,
              "create topic " + name + ": " + (why ? why : rd_kafka_err2str(err))};
    }
  }
  if (result) *result = std::move(res);
  return {};
}

} // namespace prov::bus::kafka
