#include "bus/kafka_common.hpp"

#include <cstdio>
#include <string>

namespace prov::bus::kafka {

const std::string* find_header(const std::vector<header>& hs, std::string_view name) noexcept {
  for (const header& h : hs)
    if (h.name == name) return &h.value;
  return nullptr;
}

void write_log(const log_fn& log, int level, std::string_view message) {
  if (log) {
    log(level, message);
    return;
  }
  std::fprintf(stderr, "provisiond kafka: %.*s\n", static_cast<int>(message.size()),
               message.data());
}

std::string topic_for(const config::kafka_config& cfg, topic t) {
  return cfg.topic_prefix + std::string(topic_name(t));
}

std::string enrollments_topic(const config::kafka_config& cfg) {
  return cfg.topic_prefix + "enrollments";
}

std::string registrations_topic(const config::kafka_config& cfg) {
  return cfg.topic_prefix + "registrations";
}

std::string dead_letter_topic(const config::kafka_config& cfg) {
  return cfg.topic_prefix + "dead-letter";
}

std::vector<topic_spec> topic_table(const config::kafka_config& cfg) {
  const int p = cfg.partitions;
  const int r = cfg.replication_factor;
  std::vector<topic_spec> out;
  for (int i = 0; i < topic_count; ++i) {
    const auto t = static_cast<topic>(i);
    out.push_back({topic_for(cfg, t), p, r, false,
                   t == topic::registration_requested || t == topic::registration_attested});
  }
  out.push_back({enrollments_topic(cfg), p, r, true});
  out.push_back({registrations_topic(cfg), p, r, true});
  out.push_back({dead_letter_topic(cfg), p, r, false});
  return out;
}

std::map<std::string, std::string> topic_configs(const topic_spec& spec) {
  std::map<std::string, std::string> out;
  if (spec.compacted) out["cleanup.policy"] = "compact";
  if (spec.log_append_time) out["message.timestamp.type"] = "LogAppendTime";
  return out;
}

} // namespace prov::bus::kafka
