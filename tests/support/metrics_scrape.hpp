#pragma once
// Scraping the ops listener (plain HTTP, Prometheus text format) from
// integration tests.

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "tests/support/server_process.hpp"

namespace prov::test {

struct plain_response {
  int status = 0;
  std::string head, body;
};

/// Minimal HTTP/1.1 client over a plain TCP socket (the ops listener is not TLS).
inline plain_response http(const std::string& addr, const std::string& method,
                    const std::string& path) {
  plain_response out;
  auto colon = addr.rfind(':');
  REQUIRE(colon != std::string::npos);
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(std::stoi(addr.substr(colon + 1))));
  REQUIRE(::inet_pton(AF_INET, addr.substr(0, colon).c_str(), &sa.sin_addr) == 1);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0);
  auto req = method + " " + path + " HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
  REQUIRE(::send(fd, req.data(), req.size(), 0) == static_cast<ssize_t>(req.size()));
  std::string raw;
  char buf[16384];
  for (;;) {
    auto n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0)
      break;
    raw.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  auto split = raw.find("\r\n\r\n");
  REQUIRE_MESSAGE(split != std::string::npos, raw);
  out.head = raw.substr(0, split);
  out.body = raw.substr(split + 4);
  out.status = std::stoi(out.head.substr(9, 3));
  return out;
}

/// Series text ("name{a=\"b\"}") -> value, from the Prometheus text format.
inline std::map<std::string, double> parse_metrics(const std::string& text) {
  std::map<std::string, double> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#')
      continue;
    auto sp = line.rfind(' ');
    out[line.substr(0, sp)] = std::stod(line.substr(sp + 1));
  }
  return out;
}

/// Sum of every series of `name` whose labels contain all of `filters`
/// (each filter is `key="value"`).
inline double sum(const std::map<std::string, double>& m, const std::string& name,
           std::initializer_list<std::string> filters = {}) {
  double total = 0;
  for (const auto& [series, value] : m) {
    auto brace = series.find('{');
    if (series.substr(0, brace) != name)
      continue;
    bool ok = true;
    for (const auto& f : filters)
      ok = ok && series.find(f) != std::string::npos;
    if (ok)
      total += value;
  }
  return total;
}

inline std::string metrics_addr(const test::server_process& s) {
  std::ifstream in(s.data_dir() + "/endpoints.json");
  auto ep = nlohmann::json::parse(in);
  return ep.at("metrics").get<std::string>();
}

/// `cfg` (from default_config) with the metrics listener on an ephemeral port.
inline std::string with_metrics(std::string cfg) {
  const std::string off = "[metrics]\nlisten = \"\"\n";
  auto at = cfg.find(off);
  REQUIRE_MESSAGE(at != std::string::npos, "no disabled [metrics] table in the config");
  return cfg.replace(at, off.size(), "[metrics]\nlisten = \"127.0.0.1:0\"\n");
}

inline std::map<std::string, double> scrape(const std::string& addr) {
  auto r = http(addr, "GET", "/metrics");
  REQUIRE(r.status == 200);
  return parse_metrics(r.body);
}

/// Scrapes every 50 ms until `done(metrics)` holds or `limit` passes, and
/// returns the last scrape (for gauges that settle after the work is done).
template <class Pred>
std::map<std::string, double> scrape_until(const std::string& addr, Pred done,
                                           std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  auto m = scrape(addr);
  while (!done(m) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    m = scrape(addr);
  }
  return m;
}

/// Kafka mode, once a run is over: the producer's queue is empty and every
/// stage consumer of the process (the series that exist) has no lag.
inline bool kafka_drained(const std::map<std::string, double>& m) {
  return m.count("dps_kafka_producer_queue") == 1 && m.at("dps_kafka_producer_queue") == 0
         && sum(m, "dps_kafka_consumer_lag") == 0;
}

/// Metric names the example Grafana dashboard (docs/grafana-dashboard.json,
/// found through PROV_SOURCE_DIR, which CTest sets) queries, histogram
/// suffixes stripped.
inline std::set<std::string> dashboard_metrics() {
  const char* src = std::getenv("PROV_SOURCE_DIR");
  REQUIRE_MESSAGE(src != nullptr, "PROV_SOURCE_DIR is not set");
  std::ifstream dash(std::string(src) + "/docs/grafana-dashboard.json");
  REQUIRE(dash);
  std::string text((std::istreambuf_iterator<char>(dash)), std::istreambuf_iterator<char>());
  std::set<std::string> names;
  std::regex name_re("(dps_[a-z_]+|process_[a-z_]+)");
  for (std::sregex_iterator it(text.begin(), text.end(), name_re), end; it != end; ++it) {
    auto name = it->str();
    for (const char* suffix : {"_bucket", "_sum", "_count"})
      if (name.size() > std::strlen(suffix)
          && name.compare(name.size() - std::strlen(suffix), std::string::npos, suffix) == 0)
        name.resize(name.size() - std::strlen(suffix));
    names.insert(name);
  }
  return names;
}

/// The dashboard's metrics whose name starts with `prefix` (or does not,
/// with `exclude`) are all exported in `scrape_text`; returns how many.
inline int check_dashboard_metrics(const std::string& scrape_text, const std::string& prefix,
                                   bool exclude = false) {
  int n = 0;
  for (const auto& name : dashboard_metrics()) {
    if ((name.rfind(prefix, 0) == 0) == exclude)
      continue;
    ++n;
    CHECK_MESSAGE(scrape_text.find("# TYPE " + name + " ") != std::string::npos,
                  "the dashboard queries " << name << ", which is not exported");
  }
  return n;
}

/// The dashboard's metrics not starting with any of `excluded` are all
/// exported in `scrape_text`; returns how many.
inline int check_dashboard_metrics_except(const std::string& scrape_text,
                                          std::initializer_list<std::string> excluded) {
  int n = 0;
  for (const auto& name : dashboard_metrics()) {
    bool skip = false;
    for (const auto& prefix : excluded)
      skip = skip || name.rfind(prefix, 0) == 0;
    if (skip)
      continue;
    ++n;
    CHECK_MESSAGE(scrape_text.find("# TYPE " + name + " ") != std::string::npos,
                  "the dashboard queries " << name << ", which is not exported");
  }
  return n;
}

} // namespace prov::test
