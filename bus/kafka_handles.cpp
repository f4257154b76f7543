#include "bus/kafka_handles.hpp"

#include <cstdlib>
#include <string>

namespace prov::bus::kafka::internal {
namespace {

error set(rd_kafka_conf_t* conf, const std::string& name, const std::string& value,
          const std::string& path) {
  char errstr[512];
  if (rd_kafka_conf_set(conf, name.c_str(), value.c_str(), errstr, sizeof errstr) !=
      RD_KAFKA_CONF_OK)
    return {error_code::bad_request, path + ": " + errstr};
  return {};
}

long conf_long(rd_kafka_conf_t* conf, const char* name) {
  char buf[64];
  size_t size = sizeof buf;
  if (rd_kafka_conf_get(conf, name, buf, &size) != RD_KAFKA_CONF_OK) return -1;
  return std::atol(buf);
}

/// A group member's SyncGroup may wait up to the session timeout for the
/// leader, and librdkafka abandons it after socket.timeout.ms, then sends
/// it again on a new connection. A real broker copes; librdkafka 2.0.2's mock
/// aborts (rd_kafka_mock_cgrp_member_sync_set). So a consumer's socket
/// timeout is at least the session + 3 s (librdkafka's own SyncGroup budget).
error fit_socket_timeout(rd_kafka_conf_t* conf) {
  char group[256];
  size_t size = sizeof group;
  if (rd_kafka_conf_get(conf, "group.id", group, &size) != RD_KAFKA_CONF_OK || group[0] == 0)
    return {}; // not a group member
  const long session = conf_long(conf, "session.timeout.ms");
  const long socket = conf_long(conf, "socket.timeout.ms");
  if (session < 0 || socket < 0 || socket >= session + 3000) return {};
  return set(conf, "socket.timeout.ms", std::to_string(session + 3000),
             "provisiond setting socket.timeout.ms (session.timeout.ms + 3000)");
}

} // namespace

error make_conf(const config::kafka_config& cfg, const property_list& defaults,
                const property_list& enforced, conf_ptr& out) {
  conf_ptr conf(rd_kafka_conf_new());
  if (!cfg.brokers.empty())
    if (auto err = set(conf.get(), "bootstrap.servers", cfg.brokers, "kafka.brokers"))
      return err;
  if (auto err = set(conf.get(), "client.id", cfg.client_id, "kafka.client_id")) return err;
  for (const auto& [k, v] : defaults) {
    std::string value = v;
    // Our 1 s cap must not undercut a longer base backoff the operator set
    // (librdkafka refuses max < base); their base then is the cap too.
    if (k == "reconnect.backoff.max.ms" && !cfg.properties.count(k))
      if (auto base = cfg.properties.find("reconnect.backoff.ms");
          base != cfg.properties.end() && std::atoll(base->second.c_str()) > std::atoll(v.c_str()))
        value = base->second;
    if (auto err = set(conf.get(), k, value, "provisiond default " + k)) return err;
  }
  for (const auto& [k, v] : cfg.properties)
    if (auto err = set(conf.get(), k, v, "kafka.properties." + k)) return err;
  for (const auto& [k, v] : enforced)
    if (auto err = set(conf.get(), k, v, "provisiond setting " + k)) return err;
  if (!cfg.properties.count("socket.timeout.ms"))
    if (auto err = fit_socket_timeout(conf.get())) return err;
  out = std::move(conf);
  return {};
}

property_list client_defaults(property_list own) {
  // A request stuck on a broker that went away without closing the
  // connection is abandoned after 10 s, not librdkafka's 60 s.
  own.emplace_back("socket.timeout.ms", "10000");
  // Reconnect to a broker that is back within about a second. librdkafka's
  // backoff doubles up to 10 s, so after a few seconds' outage some clients
  // came back up to 10 s late, and each late group member cost another
  // rebalance (docs/kafka.md). 1 s is the Java clients' default.
  own.emplace_back("reconnect.backoff.max.ms", "1000");
  return own;
}

void set_opaque(rd_kafka_conf_t* conf, opaque_base* self) {
  rd_kafka_conf_set_opaque(conf, self);
  if (!self->log) return;
  rd_kafka_conf_set_log_cb(conf, [](const rd_kafka_t* rk, int level, const char* fac,
                                    const char* buf) {
    const auto* base = static_cast<const opaque_base*>(rd_kafka_opaque(rk));
    if (!base) return;
    std::string line = "librdkafka ";
    line += rd_kafka_name(rk);
    line += " ";
    line += fac;
    line += ": ";
    line += buf;
    write_log(base->log, level, line);
  });
}

error kafka_error(rd_kafka_resp_err_t err, std::string_view what) {
  std::string msg(what);
  msg += ": ";
  msg += rd_kafka_err2str(err);
  return {error_code::unavailable, std::move(msg)};
}

std::vector<header> read_headers(const rd_kafka_message_t* m) {
  std::vector<header> out;
  rd_kafka_headers_t* hs = nullptr; // owned by the message
  if (rd_kafka_message_headers(m, &hs) != RD_KAFKA_RESP_ERR_NO_ERROR || !hs) return out;
  const char* name = nullptr;
  const void* value = nullptr;
  size_t size = 0;
  for (size_t i = 0; rd_kafka_header_get_all(hs, i, &name, &value, &size) ==
                     RD_KAFKA_RESP_ERR_NO_ERROR;
       ++i)
    out.push_back({name, value ? std::string(static_cast<const char*>(value), size)
                               : std::string()});
  return out;
}

headers_ptr make_headers(const std::vector<header>& hs) {
  if (hs.empty()) return nullptr;
  headers_ptr out(rd_kafka_headers_new(hs.size()));
  for (const header& h : hs)
    rd_kafka_header_add(out.get(), h.name.data(), static_cast<ssize_t>(h.name.size()),
                        h.value.data(), static_cast<ssize_t>(h.value.size()));
  return out;
}

} // namespace prov::bus::kafka::internal
