#include "config/config.hpp"

#include "messages/ascii.hpp"
#include "messages/crypto.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include <toml++/toml.h>

namespace prov::config {
namespace {

using line_t = toml::source_index; // 0 = unknown

// ---------------------------------------------------------------------------
// Value rules shared by the TOML loader and validate().

struct int_rule {
  int64_t lo;
  int64_t hi;
};

constexpr int_rule retry_after_rule{1, 300};
constexpr int_rule validity_hours_rule{1, 87600};
constexpr int_rule register_wait_rule{0, 10000};
constexpr int_rule threads_rule{0, 64};
constexpr int_rule max_body_rule{1024, 1048576};
constexpr int_rule request_timeout_rule{1, 3600};
constexpr int_rule idle_timeout_rule{1, 86400};
constexpr int_rule max_sas_rule{60, std::numeric_limits<int>::max()};
constexpr int_rule tpm_challenge_rule{1, 86400};
constexpr int_rule tpm_threads_rule{1, 64};
constexpr int_rule clock_skew_rule{0, 3600};
constexpr int_rule max_connections_rule{0, 10000000};
constexpr int_rule weight_rule{1, 1000};
constexpr int_rule probe_interval_rule{100, 3600000};
constexpr int_rule probe_timeout_rule{50, 600000};
constexpr int_rule probe_threshold_rule{1, 100};
constexpr int_rule probe_concurrency_rule{1, 256};
constexpr int_rule tie_rule{0, 60000};
constexpr int_rule latency_rule{0, 600000};
constexpr int_rule max_packet_rule{1024, 2 * 1048576};
constexpr int_rule max_inflight_rule{1, 1024};
constexpr int_rule partitions_rule{1, 10000};
constexpr int_rule replication_rule{1, 32};
constexpr int_rule resend_rule{0, 3600};
constexpr int_rule block_cache_rule{8, 65536};
constexpr int_rule quota_rule{0, 10000000};
constexpr int_rule poll_window_rule{1, 3600};
constexpr int_rule tracked_keys_rule{1, 10000000};
constexpr int_rule webhook_timeout_rule{100, 600000};
constexpr int_rule webhook_retries_rule{0, 10};
constexpr int_rule webhook_backoff_rule{0, 60000};
constexpr int_rule webhook_threads_rule{1, 256};

constexpr std::string_view known_rights[] = {
    "ServiceConfig", "EnrollmentRead", "EnrollmentWrite", "RegistrationStatusRead",
    "RegistrationStatusWrite"};
// Each reserved key with what to do instead; the check names it.
struct reserved_property {
  std::string_view key;
  std::string_view why;
};
constexpr reserved_property reserved_kafka_properties[] = {
    {"bootstrap.servers", "set kafka.brokers instead"},
    {"metadata.broker.list", "set kafka.brokers instead"},
    {"client.id", "set kafka.client_id instead"},
    {"group.id", "consumer groups are chosen per stage by provisiond"},
    {"enable.idempotence", "provisiond always produces idempotently"},
    {"acks", "provisiond always produces with acks=all"},
    {"request.required.acks", "provisiond always produces with acks=all"},
    {"enable.auto.commit", "provisiond commits offsets only after an effect is durable"},
    {"enable.auto.offset.store", "provisiond commits offsets only after an effect is durable"},
    {"partition.assignment.strategy", "provisiond uses eager range/roundrobin rebalancing"},
    {"transactional.id", "not supported"},
    {"test.mock.num.brokers", "use `provisiond dev-kafka` for a development cluster"},
};

constexpr std::string_view log_levels[] = {"trace", "debug", "info", "warn", "error", "off"};

std::string range_message(const int_rule& r, int64_t v) {
  // Always both bounds: ">= 60" for a value refused for being too large
  // (2^31 does not fit the field) read as nonsense.
  return "must be " + std::to_string(r.lo) + ".." + std::to_string(r.hi) + ", got " +
         std::to_string(v);
}

/// The value in double quotes, escaped and shortened so a message stays one
/// readable line whatever the file contains.
std::string quote(std::string_view s) {
  constexpr std::size_t max_shown = 80;
  std::string out = "\"";
  for (std::size_t i = 0; i < s.size() && i < max_shown; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > max_shown) out += "...";
  out += '"';
  return out;
}

using ascii::iequals;

bool is_hex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

bool is_alnum(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

bool valid_id_scope(std::string_view s) {
  return s.size() == 11 && s.substr(0, 3) == "0ne" &&
         std::all_of(s.begin() + 3, s.end(), is_hex);
}

/// RFC 1123 host name: dot-separated labels of 1..63 letters, digits and
/// hyphens, no leading/trailing hyphen, at most 253 characters overall.
bool dns_name(std::string_view s) {
  if (s.empty() || s.size() > 253) return false;
  std::size_t start = 0;
  while (true) {
    const std::size_t dot = s.find('.', start);
    const std::string_view label =
        s.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start);
    if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-')
      return false;
    for (char c : label)
      if (!is_alnum(c) && c != '-') return false;
    if (dot == std::string_view::npos) return true;
    start = dot + 1;
  }
}

bool valid_ip(const std::string& s) {
  unsigned char buf[16];
  return inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

/// Kafka's legal topic characters.
bool valid_topic_chars(std::string_view s) {
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return is_alnum(c) || c == '.' || c == '_' || c == '-'; });
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool valid_policy_name(std::string_view s) {
  return !s.empty() && s.size() <= 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return is_alnum(c) || c == '_' || c == '-' || c == '.';
         });
}

/// What is wrong with a shared access key, or "" when it is fine. Never
/// echoes the key itself.
std::string key_problem(std::string_view key) {
  auto raw = crypto::base64_decode(key);
  if (!raw) return "not valid base64";
  const auto n = raw->size();
  if (n < 16 || n > 64) return "must decode to 16..64 bytes, got " + std::to_string(n);
  return {};
}

std::string join(const std::string& prefix, std::string_view key) {
  return prefix.empty() ? std::string(key) : prefix + "." + std::string(key);
}

std::string indexed(const std::string& path, std::size_t i) {
  return path + "[" + std::to_string(i) + "]";
}

/// "hubs[1].hostname" -> "hubs[1]" -> "hubs" -> "".
std::string parent_path(const std::string& path) {
  const std::size_t dot = path.rfind('.');
  const std::size_t bracket = path.rfind('[');
  std::size_t cut = std::string::npos;
  if (dot != std::string::npos) cut = dot;
  if (bracket != std::string::npos && (cut == std::string::npos || bracket > cut)) cut = bracket;
  return cut == std::string::npos ? std::string() : path.substr(0, cut);
}

// ---------------------------------------------------------------------------
// Cross-field and value checks on the typed struct. `report(path, what)` is
// called for every problem, in a fixed order.

using report_fn = std::function<void(const std::string& path, std::string what)>;

void check_range(const report_fn& report, const std::string& path, int64_t v, const int_rule& r) {
  if (v < r.lo || v > r.hi) report(path, range_message(r, v));
}

void check_listen(const report_fn& report, const std::string& path, const std::string& v) {
  std::string host;
  uint16_t port = 0;
  if (!split_host_port(v, host, port)) return report(path, "expected HOST:PORT, got " + quote(v));
  // Bound as an address literal, never resolved: "999.1.1.1" or "localhost"
  // would only fail at bind time, as "Invalid argument". An IPv6 zone
  // ("fe80::1%eth0") is for the kernel to check.
  const std::size_t zone = host.find('%');
  unsigned char buf[16];
  const bool ok = zone == std::string::npos
                    ? valid_ip(host)
                    : inet_pton(AF_INET6, host.substr(0, zone).c_str(), buf) == 1;
  if (!ok)
    report(path, "expected an IPv4 or IPv6 address as HOST in HOST:PORT, got " + quote(v));
}

void check_config(const engine_config& c, const report_fn& report) {
  if (c.id_scope && !valid_id_scope(*c.id_scope))
    report("id_scope", "expected \"0ne\" followed by 8 hex digits, got " + quote(*c.id_scope));
  if (c.data_dir.empty()) report("data_dir", "must not be empty");

  const device_api_config& d = c.device_api;
  check_listen(report, "device_api.listen", d.listen);
  if (d.hostnames.empty())
    report("device_api.hostnames", "must list at least one host name");
  for (std::size_t i = 0; i < d.hostnames.size(); ++i) {
    const std::string& h = d.hostnames[i];
    if (!dns_name(h) && !valid_ip(h))
      report(indexed("device_api.hostnames", i),
             "expected a DNS name or IP address, got " + quote(h));
  }
  if (!d.tls_cert.empty() && d.tls_key.empty())
    report("device_api.tls_cert", "set without device_api.tls_key (set both or neither)");
  if (d.tls_cert.empty() && !d.tls_key.empty())
    report("device_api.tls_key", "set without device_api.tls_cert (set both or neither)");
  check_range(report, "device_api.retry_after_seconds", d.retry_after_seconds, retry_after_rule);
  check_range(report, "device_api.register_wait_ms", d.register_wait_ms, register_wait_rule);
  check_range(report, "device_api.threads", d.threads, threads_rule);
  // size_t may exceed int64_t; anything that large is out of range anyway.
  const int64_t body = d.max_body_bytes > static_cast<std::size_t>(max_body_rule.hi)
                           ? std::numeric_limits<int64_t>::max()
                           : static_cast<int64_t>(d.max_body_bytes);
  check_range(report, "device_api.max_body_bytes", body, max_body_rule);
  check_range(report, "device_api.request_timeout_seconds", d.request_timeout_seconds,
              request_timeout_rule);
  check_range(report, "device_api.idle_timeout_seconds", d.idle_timeout_seconds,
              idle_timeout_rule);
  check_range(report, "device_api.max_sas_lifetime_seconds", d.max_sas_lifetime_seconds,
              max_sas_rule);
  check_range(report, "device_api.clock_skew_seconds", d.clock_skew_seconds, clock_skew_rule);
  check_range(report, "device_api.tpm_challenge_seconds", d.tpm_challenge_seconds,
              tpm_challenge_rule);
  check_range(report, "device_api.tpm_threads", d.tpm_threads, tpm_threads_rule);
  check_range(report, "device_api.max_connections", d.max_connections, max_connections_rule);
  check_range(report, "device_api.max_connections_per_client", d.max_connections_per_client,
              max_connections_rule);
  check_range(report, "storage.block_cache_mb", c.storage.block_cache_mb, block_cache_rule);
  if (!c.mqtt.listen.empty()) {
    check_listen(report, "mqtt.listen", c.mqtt.listen);
    if (c.mqtt.listen == d.listen && c.mqtt.listen.substr(c.mqtt.listen.size() - 2) != ":0")
      report("mqtt.listen", "must differ from device_api.listen (" + quote(d.listen) + ")");
  }
  const int64_t packet = c.mqtt.max_packet_bytes > static_cast<std::size_t>(max_packet_rule.hi)
                           ? std::numeric_limits<int64_t>::max()
                           : static_cast<int64_t>(c.mqtt.max_packet_bytes);
  check_range(report, "mqtt.max_packet_bytes", packet, max_packet_rule);
  check_range(report, "mqtt.max_inflight", c.mqtt.max_inflight, max_inflight_rule);
  const throttling_config& th = c.throttling;
  check_range(report, "throttling.registrations_per_minute_per_scope",
              th.registrations_per_minute_per_scope, quota_rule);
  check_range(report, "throttling.registrations_per_minute_per_group",
              th.registrations_per_minute_per_group, quota_rule);
  check_range(report, "throttling.polls_per_device", th.polls_per_device, quota_rule);
  check_range(report, "throttling.poll_window_seconds", th.poll_window_seconds, poll_window_rule);
  check_range(report, "throttling.requests_per_minute_per_address",
              th.requests_per_minute_per_address, quota_rule);
  check_range(report, "throttling.max_tracked_keys", th.max_tracked_keys, tracked_keys_rule);

  for (std::size_t i = 0; i < c.access_policies.size(); ++i) {
    const access_policy& p = c.access_policies[i];
    const std::string base = indexed("access_policies", i);
    if (p.name.empty())
      report(base + ".name", "must not be empty");
    else if (!valid_policy_name(p.name))
      report(base + ".name",
             "must be 1..64 characters of A-Z a-z 0-9 _ - ., got " + quote(p.name));
    for (std::size_t j = 0; j < i; ++j)
      if (!p.name.empty() && iequals(c.access_policies[j].name, p.name)) {
        report(base + ".name", "duplicate policy name " + quote(p.name) + " (same as " +
                                   indexed("access_policies", j) + ")");
        break;
      }
    if (p.primary_key.empty())
      report(base + ".primary_key", "must not be empty");
    else if (std::string why = key_problem(p.primary_key); !why.empty())
      report(base + ".primary_key", std::move(why));
    if (!p.secondary_key.empty())
      if (std::string why = key_problem(p.secondary_key); !why.empty())
        report(base + ".secondary_key", std::move(why));
    if (p.rights.empty())
      report(base + ".rights",
             "must list at least one of ServiceConfig, EnrollmentRead, EnrollmentWrite, "
             "RegistrationStatusRead, RegistrationStatusWrite");
    for (std::size_t r = 0; r < p.rights.size(); ++r) {
      const std::string& right = p.rights[r];
      const std::string rpath = indexed(base + ".rights", r);
      if (std::find(std::begin(known_rights), std::end(known_rights), right) ==
          std::end(known_rights))
        report(rpath, "unknown right " + quote(right) +
                          " (expected ServiceConfig, EnrollmentRead, EnrollmentWrite, "
                          "RegistrationStatusRead or RegistrationStatusWrite)");
      else if (std::find(p.rights.begin(), p.rights.begin() + static_cast<long>(r), right) !=
               p.rights.begin() + static_cast<long>(r))
        report(rpath, quote(right) + " listed twice");
    }
  }

  for (std::size_t i = 0; i < c.hubs.size(); ++i) {
    const hub_config& h = c.hubs[i];
    const std::string base = indexed("hubs", i);
    if (h.hostname.empty())
      report(base + ".hostname", "must not be empty");
    else if (!dns_name(h.hostname))
      report(base + ".hostname", "expected a DNS name, got " + quote(h.hostname));
    for (std::size_t j = 0; j < i; ++j)
      if (!h.hostname.empty() && iequals(c.hubs[j].hostname, h.hostname)) {
        report(base + ".hostname", "duplicate hub hostname " + quote(h.hostname) +
                                       " (same as " + indexed("hubs", j) + ")");
        break;
      }
    check_range(report, base + ".allocation_weight", h.allocation_weight, weight_rule);
    if (!h.health_endpoint.empty() && !valid_health_endpoint(h.health_endpoint))
      report(base + ".health_endpoint",
             "expected an https://host[:port]/path URL, got " + quote(h.health_endpoint));
  }
  for (std::size_t i = 0; i < c.issuing_cas.size(); ++i) {
    const issuing_ca_config& ca = c.issuing_cas[i];
    const std::string base = indexed("issuing_cas", i);
    if (!valid_policy_name(ca.name))
      report(base + ".name",
             "must be 1..64 characters of A-Z a-z 0-9 _ - ., got " + quote(ca.name));
    for (std::size_t j = 0; j < i; ++j)
      if (!ca.name.empty() && iequals(c.issuing_cas[j].name, ca.name)) {
        report(base + ".name", "duplicate issuing CA name " + quote(ca.name) + " (same as " +
                                   indexed("issuing_cas", j) + ")");
        break;
      }
    check_range(report, base + ".validity_hours", ca.validity_hours, validity_hours_rule);
    if (ca.certificate_file.empty())
      report(base + ".certificate_file", "must not be empty");
    // Syntax only: every process (gateways, `connection-string`, `secrets`)
    // reads this file, and only the configuration role needs the key. The
    // file, its mode and its contents are checked where it is loaded
    // (configuration::certificate_issuer::load, at start of that role).
    if (ca.key_file.empty())
      report(base + ".key_file", "must not be empty");
  }
  for (std::size_t i = 0; i < c.geo_latency.client_ranges.size(); ++i) {
    const auto& r = c.geo_latency.client_ranges[i];
    if (!cidr_ok(r.cidr))
      report(indexed("geo_latency.client_ranges", i) + ".cidr",
             "expected an IPv4 or IPv6 CIDR such as 10.1.0.0/16, got " + quote(r.cidr));
  }
  {
    const hub_health_config& h = c.hub_health;
    check_range(report, "hub_health.interval_ms", h.interval_ms, probe_interval_rule);
    check_range(report, "hub_health.timeout_ms", h.timeout_ms, probe_timeout_rule);
    check_range(report, "hub_health.unhealthy_after", h.unhealthy_after, probe_threshold_rule);
    check_range(report, "hub_health.healthy_after", h.healthy_after, probe_threshold_rule);
    check_range(report, "hub_health.max_concurrent_probes", h.max_concurrent_probes,
                probe_concurrency_rule);
  }

  const custom_allocation_config& w = c.custom_allocation;
  check_range(report, "custom_allocation.timeout_ms", w.timeout_ms, webhook_timeout_rule);
  check_range(report, "custom_allocation.retries", w.retries, webhook_retries_rule);
  check_range(report, "custom_allocation.retry_backoff_ms", w.retry_backoff_ms,
              webhook_backoff_rule);
  check_range(report, "custom_allocation.threads", w.threads, webhook_threads_rule);

  if (!c.metrics.listen.empty()) check_listen(report, "metrics.listen", c.metrics.listen);

  if (std::find(std::begin(log_levels), std::end(log_levels), c.log.level) ==
      std::end(log_levels))
    report("log.level",
           "must be one of trace, debug, info, warn, error, off, got " + quote(c.log.level));

  const kafka_config& k = c.kafka;
  if (!k.brokers.empty()) {
    std::string_view rest = k.brokers;
    while (true) {
      const std::size_t comma = rest.find(',');
      const std::string entry(trim(rest.substr(0, comma)));
      std::string host;
      uint16_t port = 0;
      if (!split_host_port(entry, host, port) || port == 0) {
        report("kafka.brokers",
               "expected \"HOST:PORT,HOST:PORT,...\", got " + quote(k.brokers));
        break;
      }
      if (comma == std::string_view::npos) break;
      rest.remove_prefix(comma + 1);
    }
  }
  // Kafka topic names are at most 249 characters; leave room for ours.
  if (k.topic_prefix.size() > 200 || !valid_topic_chars(k.topic_prefix))
    report("kafka.topic_prefix",
           "must be at most 200 characters of A-Z a-z 0-9 . _ -, got " + quote(k.topic_prefix));
  check_range(report, "kafka.partitions", k.partitions, partitions_rule);
  check_range(report, "kafka.replication_factor", k.replication_factor, replication_rule);
  check_range(report, "kafka.resend_after_s", k.resend_after_s, resend_rule);
  if (k.client_id.empty() || k.client_id.size() > 255 || !valid_topic_chars(k.client_id))
    report("kafka.client_id",
           "must be 1..255 characters of A-Z a-z 0-9 . _ -, got " + quote(k.client_id));
  for (const auto& [key, value] : k.properties) {
    const std::string path = "kafka.properties." + key;
    if (key.empty()) {
      report("kafka.properties", "property names must not be empty");
      continue;
    }
    for (const reserved_property& r : reserved_kafka_properties)
      if (r.key == key) report(path, "set by provisiond, remove it (" + std::string(r.why) + ")");
  }
}

// ---------------------------------------------------------------------------
// TOML -> struct. Structural problems (unknown keys, wrong types, missing
// required keys) are found here; value rules are left to check_config, whose
// key paths are mapped back to lines through `lines_`.

struct issue {
  line_t line = 0;
  std::string path;
  std::string what;
};

std::string_view type_name(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::string: return "string";
    case toml::node_type::integer: return "integer";
    case toml::node_type::floating_point: return "float";
    case toml::node_type::boolean: return "boolean";
    case toml::node_type::date: return "date";
    case toml::node_type::time: return "time";
    case toml::node_type::date_time: return "date-time";
    case toml::node_type::table: return "table";
    case toml::node_type::array: return "array";
    default: return "nothing";
  }
}

line_t line_of(const toml::node& n) { return n.source().begin.line; }

class loader {
 public:
  std::vector<issue> structural;

  void load(const toml::table& root, engine_config& c) {
    check_keys(root, "",
               {"id_scope", "data_dir", "device_api", "mqtt", "throttling", "access_policies", "hubs",
                "custom_allocation", "hub_health", "geo_latency", "issuing_cas", "metrics", "storage",
                "secrets", "log", "kafka"});
    if (const toml::node* n = field(root, "", "id_scope")) {
      std::string v;
      if (as_string(*n, "id_scope", v)) c.id_scope = std::move(v);
    }
    get(root, "", "data_dir", c.data_dir);

    if (const toml::table* t = sub_table(root, "", "device_api")) {
      const std::string p = "device_api";
      device_api_config& d = c.device_api;
      check_keys(*t, p,
                 {"listen", "hostnames", "tls_cert", "tls_key", "retry_after_seconds",
                  "register_wait_ms", "threads",
                  "max_body_bytes", "request_timeout_seconds", "idle_timeout_seconds",
                  "max_sas_lifetime_seconds", "clock_skew_seconds", "max_connections",
                  "max_connections_per_client", "tpm_challenge_seconds", "tpm_threads"});
      get(*t, p, "listen", d.listen);
      get_strings(*t, p, "hostnames", d.hostnames);
      get(*t, p, "tls_cert", d.tls_cert);
      get(*t, p, "tls_key", d.tls_key);
      get_int(*t, p, "retry_after_seconds", d.retry_after_seconds, retry_after_rule);
      get_int(*t, p, "register_wait_ms", d.register_wait_ms, register_wait_rule);
      get_int(*t, p, "threads", d.threads, threads_rule);
      get_int(*t, p, "max_body_bytes", d.max_body_bytes, max_body_rule);
      get_int(*t, p, "request_timeout_seconds", d.request_timeout_seconds, request_timeout_rule);
      get_int(*t, p, "idle_timeout_seconds", d.idle_timeout_seconds, idle_timeout_rule);
      get_int(*t, p, "max_sas_lifetime_seconds", d.max_sas_lifetime_seconds, max_sas_rule);
      get_int(*t, p, "clock_skew_seconds", d.clock_skew_seconds, clock_skew_rule);
      get_int(*t, p, "tpm_challenge_seconds", d.tpm_challenge_seconds, tpm_challenge_rule);
      get_int(*t, p, "tpm_threads", d.tpm_threads, tpm_threads_rule);
      get_int(*t, p, "max_connections", d.max_connections, max_connections_rule);
      get_int(*t, p, "max_connections_per_client", d.max_connections_per_client,
              max_connections_rule);
    }

    if (const toml::table* t = sub_table(root, "", "throttling")) {
      const std::string p = "throttling";
      throttling_config& th = c.throttling;
      check_keys(*t, p,
                 {"registrations_per_minute_per_scope", "registrations_per_minute_per_group",
                  "polls_per_device", "poll_window_seconds",
                  "requests_per_minute_per_address", "max_tracked_keys"});
      get_int(*t, p, "registrations_per_minute_per_scope",
              th.registrations_per_minute_per_scope, quota_rule);
      get_int(*t, p, "registrations_per_minute_per_group",
              th.registrations_per_minute_per_group, quota_rule);
      get_int(*t, p, "polls_per_device", th.polls_per_device, quota_rule);
      get_int(*t, p, "poll_window_seconds", th.poll_window_seconds, poll_window_rule);
      get_int(*t, p, "requests_per_minute_per_address", th.requests_per_minute_per_address,
              quota_rule);
      get_int(*t, p, "max_tracked_keys", th.max_tracked_keys, tracked_keys_rule);
    }

    for_each_entry(root, "access_policies", [&](const toml::table& t, const std::string& p) {
      access_policy a;
      check_keys(t, p, {"name", "primary_key", "secondary_key", "rights"});
      require(t, p, {"name", "primary_key"});
      get(t, p, "name", a.name);
      get(t, p, "primary_key", a.primary_key);
      get(t, p, "secondary_key", a.secondary_key);
      get_strings(t, p, "rights", a.rights);
      c.access_policies.push_back(std::move(a));
    });

    for_each_entry(root, "hubs", [&](const toml::table& t, const std::string& p) {
      hub_config h;
      check_keys(t, p, {"hostname", "allocation_weight", "apply_allocation_policy", "region",
                        "health_endpoint"});
      require(t, p, {"hostname"});
      get(t, p, "hostname", h.hostname);
      get_int(t, p, "allocation_weight", h.allocation_weight, weight_rule);
      get(t, p, "apply_allocation_policy", h.apply_allocation_policy);
      get(t, p, "region", h.region);
      get(t, p, "health_endpoint", h.health_endpoint);
      c.hubs.push_back(std::move(h));
    });

    if (const toml::table* t = sub_table(root, "", "mqtt")) {
      check_keys(*t, "mqtt", {"listen", "max_packet_bytes", "max_inflight", "websocket"});
      get(*t, "mqtt", "listen", c.mqtt.listen);
      get_int(*t, "mqtt", "max_packet_bytes", c.mqtt.max_packet_bytes, max_packet_rule);
      get_int(*t, "mqtt", "max_inflight", c.mqtt.max_inflight, max_inflight_rule);
      get(*t, "mqtt", "websocket", c.mqtt.websocket);
    }
    if (const toml::table* t = sub_table(root, "", "custom_allocation")) {
      const std::string p = "custom_allocation";
      custom_allocation_config& w = c.custom_allocation;
      check_keys(*t, p, {"ca_file", "timeout_ms", "retries", "retry_backoff_ms", "threads"});
      get(*t, p, "ca_file", w.ca_file);
      get_int(*t, p, "timeout_ms", w.timeout_ms, webhook_timeout_rule);
      get_int(*t, p, "retries", w.retries, webhook_retries_rule);
      get_int(*t, p, "retry_backoff_ms", w.retry_backoff_ms, webhook_backoff_rule);
      get_int(*t, p, "threads", w.threads, webhook_threads_rule);
    }
    if (const toml::table* t = sub_table(root, "", "hub_health")) {
      const std::string p = "hub_health";
      hub_health_config& h = c.hub_health;
      check_keys(*t, p, {"interval_ms", "timeout_ms", "unhealthy_after", "healthy_after",
                         "max_concurrent_probes", "ca_file"});
      get_int(*t, p, "interval_ms", h.interval_ms, probe_interval_rule);
      get_int(*t, p, "timeout_ms", h.timeout_ms, probe_timeout_rule);
      get_int(*t, p, "unhealthy_after", h.unhealthy_after, probe_threshold_rule);
      get_int(*t, p, "healthy_after", h.healthy_after, probe_threshold_rule);
      get_int(*t, p, "max_concurrent_probes", h.max_concurrent_probes, probe_concurrency_rule);
      get(*t, p, "ca_file", h.ca_file);
    }
    if (const toml::table* t = sub_table(root, "", "geo_latency")) {
      const std::string p = "geo_latency";
      geo_latency_config& g = c.geo_latency;
      check_keys(*t, p, {"region", "tie_ms", "client_ranges", "latencies"});
      get(*t, p, "region", g.region);
      get_int(*t, p, "tie_ms", g.tie_ms, tie_rule);
      for_each_entry(*t, "client_ranges", [&](const toml::table& e, const std::string& ep) {
        geo_latency_config::client_range r;
        const std::string full = p + "." + ep;
        check_keys(e, full, {"cidr", "region"});
        require(e, full, {"cidr", "region"});
        get(e, full, "cidr", r.cidr);
        get(e, full, "region", r.region);
        g.client_ranges.push_back(std::move(r));
      });
      for_each_entry(*t, "latencies", [&](const toml::table& e, const std::string& ep) {
        geo_latency_config::latency l;
        const std::string full = p + "." + ep;
        check_keys(e, full, {"from", "to", "ms"});
        require(e, full, {"from", "to", "ms"});
        get(e, full, "from", l.from);
        get(e, full, "to", l.to);
        get_int(e, full, "ms", l.ms, latency_rule);
        g.latencies.push_back(std::move(l));
      });
    }
    for_each_entry(root, "issuing_cas", [&](const toml::table& e, const std::string& ep) {
      issuing_ca_config ca;
      check_keys(e, ep, {"name", "key_file", "certificate_file", "validity_hours"});
      require(e, ep, {"name", "key_file", "certificate_file"});
      get(e, ep, "name", ca.name);
      get(e, ep, "key_file", ca.key_file);
      get(e, ep, "certificate_file", ca.certificate_file);
      get_int(e, ep, "validity_hours", ca.validity_hours, validity_hours_rule);
      c.issuing_cas.push_back(std::move(ca));
    });
    if (const toml::table* t = sub_table(root, "", "metrics")) {
      check_keys(*t, "metrics", {"listen"});
      get(*t, "metrics", "listen", c.metrics.listen);
    }
    if (const toml::table* t = sub_table(root, "", "storage")) {
      check_keys(*t, "storage", {"block_cache_mb"});
      get_int(*t, "storage", "block_cache_mb", c.storage.block_cache_mb, block_cache_rule);
    }
    if (const toml::table* t = sub_table(root, "", "secrets")) {
      check_keys(*t, "secrets", {"key_file"});
      get(*t, "secrets", "key_file", c.secrets.key_file);
    }
    if (const toml::table* t = sub_table(root, "", "log")) {
      check_keys(*t, "log", {"level", "file", "audit_file"});
      get(*t, "log", "level", c.log.level);
      get(*t, "log", "file", c.log.file);
      get(*t, "log", "audit_file", c.log.audit_file);
    }
    if (const toml::table* t = sub_table(root, "", "kafka")) {
      const std::string p = "kafka";
      kafka_config& k = c.kafka;
      check_keys(*t, p,
                 {"brokers", "topic_prefix", "partitions", "replication_factor", "client_id",
                  "resend_after_s", "fuse_stages", "properties"});
      get(*t, p, "brokers", k.brokers);
      get(*t, p, "topic_prefix", k.topic_prefix);
      get_int(*t, p, "partitions", k.partitions, partitions_rule);
      get_int(*t, p, "replication_factor", k.replication_factor, replication_rule);
      get_int(*t, p, "resend_after_s", k.resend_after_s, resend_rule);
      get(*t, p, "fuse_stages", k.fuse_stages);
      get(*t, p, "client_id", k.client_id);
      if (const toml::table* props = sub_table(*t, p, "properties"))
        get_properties(*props, "", k.properties);
    }
  }

  /// Line of the closest node at or above `path` that was seen in the file.
  line_t line_for(std::string path) const {
    while (!path.empty()) {
      if (auto it = lines_.find(path); it != lines_.end() && it->second != 0) return it->second;
      path = parent_path(path);
    }
    return 0;
  }

 private:
  std::unordered_map<std::string, line_t> lines_;

  void fail(line_t line, std::string path, std::string what) {
    structural.push_back({line, std::move(path), std::move(what)});
  }

  void check_keys(const toml::table& t, const std::string& prefix,
                  std::initializer_list<std::string_view> known) {
    for (auto&& [k, v] : t) {
      if (std::find(known.begin(), known.end(), k.str()) != known.end()) continue;
      const line_t line = k.source().begin.line ? k.source().begin.line : line_of(v);
      fail(line, join(prefix, k.str()), "unknown key");
    }
  }

  void require(const toml::table& t, const std::string& prefix,
               std::initializer_list<std::string_view> keys) {
    for (std::string_view k : keys)
      if (!t.contains(k)) fail(line_of(t), join(prefix, k), "missing required key");
  }

  /// The node at `key`, remembering its line under its key path.
  const toml::node* field(const toml::table& t, const std::string& prefix,
                          std::string_view key) {
    const toml::node* n = t.get(key);
    if (n) lines_[join(prefix, key)] = line_of(*n);
    return n;
  }

  void wrong_type(const toml::node& n, const std::string& path, std::string_view expected) {
    fail(line_of(n), path, "expected " + std::string(expected) + ", got " +
                               std::string(type_name(n)));
  }

  bool as_string(const toml::node& n, const std::string& path, std::string& out) {
    if (const auto* s = n.as_string()) {
      out = s->get();
      return true;
    }
    wrong_type(n, path, "string");
    return false;
  }

  void get(const toml::table& t, const std::string& prefix, std::string_view key,
           std::string& out) {
    if (const toml::node* n = field(t, prefix, key)) as_string(*n, join(prefix, key), out);
  }

  void get(const toml::table& t, const std::string& prefix, std::string_view key, bool& out) {
    const toml::node* n = field(t, prefix, key);
    if (!n) return;
    if (const auto* b = n->as_boolean())
      out = b->get();
    else
      wrong_type(*n, join(prefix, key), "boolean");
  }

  /// Integers are range-checked later on the struct; here only values that
  /// would not even fit the field are rejected (with the same message).
  template <class Int>
  void get_int(const toml::table& t, const std::string& prefix, std::string_view key, Int& out,
               const int_rule& rule) {
    const toml::node* n = field(t, prefix, key);
    if (!n) return;
    const auto* i = n->as_integer();
    if (!i) return wrong_type(*n, join(prefix, key), "integer");
    const int64_t v = i->get();
    const bool fits =
        v >= 0 ? static_cast<std::make_unsigned_t<int64_t>>(v) <=
                     static_cast<std::make_unsigned_t<int64_t>>(std::numeric_limits<Int>::max())
               : std::is_signed_v<Int> &&
                     v >= static_cast<int64_t>(std::numeric_limits<Int>::min());
    if (fits)
      out = static_cast<Int>(v);
    else
      fail(line_of(*n), join(prefix, key), range_message(rule, v));
  }

  void get_strings(const toml::table& t, const std::string& prefix, std::string_view key,
                   std::vector<std::string>& out) {
    const toml::node* n = field(t, prefix, key);
    if (!n) return;
    const std::string path = join(prefix, key);
    const toml::array* a = n->as_array();
    if (!a) return wrong_type(*n, path, "array of strings");
    std::vector<std::string> values;
    for (std::size_t i = 0; i < a->size(); ++i) {
      const toml::node& e = (*a)[i];
      const std::string epath = indexed(path, i);
      lines_[epath] = line_of(e);
      std::string s;
      if (as_string(e, epath, s)) values.push_back(std::move(s));
    }
    out = std::move(values);
  }

  /// librdkafka properties. An unquoted dotted key (`security.protocol =
  /// "SSL"`) is a nested table in TOML; it is flattened back into its dotted
  /// name, so quoting is optional. Integers and booleans become strings.
  void get_properties(const toml::table& t, const std::string& name_prefix,
                      std::map<std::string, std::string>& out) {
    for (auto&& [k, v] : t) {
      const std::string name = join(name_prefix, k.str());
      const std::string path = "kafka.properties." + name;
      lines_[path] = k.source().begin.line ? k.source().begin.line : line_of(v);
      if (const toml::table* sub = v.as_table())
        get_properties(*sub, name, out);
      else if (const auto* s = v.as_string())
        out[name] = s->get();
      else if (const auto* i = v.as_integer())
        out[name] = std::to_string(i->get());
      else if (const auto* b = v.as_boolean())
        out[name] = b->get() ? "true" : "false";
      else
        wrong_type(v, path, "string, integer or boolean");
    }
  }

  const toml::table* sub_table(const toml::table& t, const std::string& prefix,
                               std::string_view key) {
    const toml::node* n = field(t, prefix, key);
    if (!n) return nullptr;
    if (const toml::table* sub = n->as_table()) return sub;
    wrong_type(*n, join(prefix, key), "table");
    return nullptr;
  }

  template <class Fn>
  void for_each_entry(const toml::table& root, std::string_view key, Fn&& fn) {
    const toml::node* n = field(root, "", key);
    if (!n) return;
    const std::string path(key);
    const toml::array* a = n->as_array();
    if (!a) return wrong_type(*n, path, "array of tables ([[" + path + "]])");
    for (std::size_t i = 0; i < a->size(); ++i) {
      const toml::node& e = (*a)[i];
      const std::string epath = indexed(path, i);
      lines_[epath] = line_of(e);
      if (const toml::table* t = e.as_table())
        fn(*t, epath);
      else
        wrong_type(e, epath, "table");
    }
  }
};

std::string format(const std::string& origin, const issue& i) {
  std::string out = origin;
  if (i.line != 0) out += ":" + std::to_string(i.line);
  out += ": ";
  if (!i.path.empty()) out += i.path + ": ";
  out += i.what;
  return out;
}

/// The issue with the lowest line (first reported wins ties), so the message
/// points at the earliest problem in the file.
const issue& earliest(const std::vector<issue>& issues) {
  return *std::min_element(issues.begin(), issues.end(), [](const issue& a, const issue& b) {
    const auto key = [](const issue& i) {
      return i.line == 0 ? std::numeric_limits<line_t>::max() : i.line;
    };
    return key(a) < key(b);
  });
}

error load_impl(std::string_view text, const std::string& origin, engine_config& out) {
  toml::table root;
  try {
    root = toml::parse(text, std::string_view(origin));
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    return {error_code::bad_request, origin + ":" + std::to_string(where.line) + ":" +
                                         std::to_string(where.column) + ": " +
                                         std::string(e.description())};
  }

  engine_config cfg; // start from defaults, whatever `out` held
  loader l;
  l.load(root, cfg);
  // Structural problems first: after a wrong type the field holds its
  // default, so value checks would only add noise.
  if (!l.structural.empty())
    return {error_code::bad_request, format(origin, earliest(l.structural))};

  std::vector<issue> issues;
  check_config(cfg, [&](const std::string& path, std::string what) {
    issues.push_back({l.line_for(path), path, std::move(what)});
  });
  if (!issues.empty()) return {error_code::bad_request, format(origin, earliest(issues))};

  cfg.source_file = origin;
  out = std::move(cfg);
  return {};
}

} // namespace

error load_string(std::string_view toml, const std::string& origin, engine_config& out) {
  const std::string name = origin.empty() ? std::string("<string>") : origin;
  try {
    return load_impl(toml, name, out);
  } catch (const std::exception& e) { // e.g. bad_alloc: never escapes the API
    return {error_code::bad_request, name + ": " + e.what()};
  }
}

error load_file(const std::string& path, engine_config& out) {
  const auto cannot_read = [&](int err) {
    return error{error_code::bad_request,
                 path + ": cannot read config file: " + std::strerror(err)};
  };
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return cannot_read(errno);
  std::string text;
  char buf[8192];
  std::size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  // fopen() succeeds on a directory on Linux; the read then fails (EISDIR).
  const bool failed = std::ferror(f) != 0;
  const int err = errno;
  std::fclose(f);
  if (failed) return cannot_read(err ? err : EIO);
  return load_string(text, path, out);
}

std::string roles_config::to_string() const {
  std::string out;
  auto add = [&](bool on, const char* name) {
    if (!on)
      return;
    if (!out.empty())
      out += ',';
    out += name;
  };
  add(gateway, "gateway");
  add(registration, "registration");
  add(attestation, "attestation");
  add(allocation, "allocation");
  add(configuration, "configuration");
  return out;
}

error parse_roles(std::string_view list, roles_config& out) {
  roles_config r{false, false, false, false, false};
  static constexpr const char* known =
    "gateway, registration, attestation, allocation, configuration";
  std::size_t start = 0;
  bool any = false;
  while (start <= list.size()) {
    auto end = list.find(',', start);
    if (end == std::string_view::npos)
      end = list.size();
    auto name = list.substr(start, end - start);
    while (!name.empty() && name.front() == ' ')
      name.remove_prefix(1);
    while (!name.empty() && name.back() == ' ')
      name.remove_suffix(1);
    if (name == "gateway") r.gateway = true;
    else if (name == "registration") r.registration = true;
    else if (name == "attestation") r.attestation = true;
    else if (name == "allocation") r.allocation = true;
    else if (name == "configuration") r.configuration = true;
    else if (name == "all") r = roles_config{};
    else
      return {error_code::bad_request,
              "--roles: unknown role " + quote(std::string(name)) + " (known: " + known
                + ", or all)"};
    any = true;
    start = end + 1;
  }
  if (!any)
    return {error_code::bad_request, std::string("--roles: empty (known: ") + known + ")"};
  out = r;
  return {};
}

error validate(const engine_config& cfg) {
  const auto& r = cfg.roles;
  if (!r.all() && !cfg.kafka.enabled())
    return {error_code::bad_request,
            "--roles " + r.to_string()
              + ": splitting the stages across processes needs [kafka] brokers; without "
                "Kafka one process runs every stage (omit --roles)"};
  if (r.gateway != r.registration)
    return {error_code::bad_request,
            "--roles " + r.to_string()
              + ": gateway and registration run together (the gateway answers 202 only "
                "after the registration stage has recorded the operation)"};
  error first;
  check_config(cfg, [&](const std::string& path, std::string what) {
    if (!first.ok()) return;
    std::string msg = cfg.source_file.empty() ? std::string() : cfg.source_file + ": ";
    first = error{error_code::bad_request, msg + path + ": " + what};
  });
  return first;
}

bool is_reserved_kafka_property(std::string_view key) noexcept {
  return std::any_of(std::begin(reserved_kafka_properties), std::end(reserved_kafka_properties),
                     [&](const reserved_property& r) { return r.key == key; });
}

bool split_host_port(const std::string& s, std::string& host, uint16_t& port) {
  std::string h;
  std::string_view rest;
  if (!s.empty() && s.front() == '[') {
    const std::size_t close = s.find(']');
    if (close == std::string::npos || close + 1 >= s.size() || s[close + 1] != ':') return false;
    h = s.substr(1, close - 1);
    rest = std::string_view(s).substr(close + 2);
  } else {
    const std::size_t colon = s.rfind(':');
    if (colon == std::string::npos) return false;
    h = s.substr(0, colon);
    // A bare IPv6 address ("::1:443") is ambiguous; it must be bracketed.
    if (h.find(':') != std::string::npos) return false;
    rest = std::string_view(s).substr(colon + 1);
  }
  if (h.empty() || h.find_first_of("[] \t\r\n") != std::string::npos) return false;
  if (rest.empty() || rest.size() > 5) return false;
  unsigned long p = 0;
  for (char c : rest) {
    if (c < '0' || c > '9') return false;
    p = p * 10 + static_cast<unsigned long>(c - '0');
  }
  if (p > 65535) return false;
  host = std::move(h);
  port = static_cast<uint16_t>(p);
  return true;
}

bool valid_dns_name(std::string_view s) { return dns_name(s); }

bool cidr_ok(const std::string& cidr) {
  const auto slash = cidr.find('/');
  if (slash == std::string::npos)
    return false;
  const std::string ip = cidr.substr(0, slash), len = cidr.substr(slash + 1);
  unsigned char buf[16];
  int max = 0;
  if (::inet_pton(AF_INET, ip.c_str(), buf) == 1)
    max = 32;
  else if (::inet_pton(AF_INET6, ip.c_str(), buf) == 1)
    max = 128;
  else
    return false;
  if (len.empty() || len.size() > 3 || len.find_first_not_of("0123456789") != std::string::npos)
    return false;
  return std::stoi(len) <= max;
}

bool valid_health_endpoint(std::string_view url) {
  constexpr std::string_view scheme = "https://";
  if (url.size() > 2048 || url.substr(0, scheme.size()) != scheme)
    return false;
  auto rest = url.substr(scheme.size());
  auto slash = rest.find('/');
  auto authority = rest.substr(0, slash);
  for (char c : url)
    if (static_cast<unsigned char>(c) <= ' ' || c == 0x7f)
      return false;
  std::string host;
  uint16_t port = 0;
  std::string a(authority);
  if (a.find(':') == std::string::npos || a.front() == '[') {
    if (a.empty())
      return false;
    if (a.front() == '[')
      return a.find("]:") != std::string::npos && split_host_port(a, host, port) && port != 0;
    host = a;
  } else if (!split_host_port(a, host, port) || port == 0) {
    return false;
  }
  return !host.empty() && (dns_name(host) || valid_ip(host));
}

} // namespace prov::config
