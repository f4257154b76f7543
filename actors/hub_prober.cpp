#include "actors/hub_prober.hpp"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "messages/ascii.hpp"
#include "metrics/instruments.hpp"
#include "net/https_client.hpp"

namespace prov {

namespace {

struct probe_target {
  std::string host;
  uint16_t port = 443;
  std::string path; ///< "/" at least
};

error parse_endpoint(std::string_view url, probe_target& out) {
  constexpr std::string_view scheme = "https://";
  if (url.size() <= scheme.size() || !ascii::iequals(url.substr(0, scheme.size()), scheme))
    return {error_code::bad_request, "not an https URL"};
  url.remove_prefix(scheme.size());
  const auto end = url.find_first_of("/?#");
  if (auto err = net::split_host_port(url.substr(0, end), 443, out.host, out.port))
    return err;
  std::string_view rest = end == std::string_view::npos ? std::string_view{} : url.substr(end);
  rest = rest.substr(0, rest.find('#'));
  out.path = rest.empty() || rest.front() != '/' ? "/" + std::string(rest) : std::string(rest);
  return {};
}

/// One open connection per endpoint, kept between rounds (this thread only).
using client_pool = std::map<std::string, std::unique_ptr<net::https_client>>;

} // namespace

hub_prober::hub_prober(allocation::hub_set& hubs, config::hub_health_config cfg,
                       metrics::instruments* metrics)
  : hubs_(hubs), cfg_(std::move(cfg)), metrics_(metrics) {
  thread_ = std::thread([this] { run(); });
}

hub_prober::~hub_prober() {
  stop();
}

void hub_prober::wake() {
  {
    std::lock_guard<std::mutex> guard{mtx_};
    woken_ = true;
  }
  cv_.notify_all();
}

void hub_prober::stop() {
  {
    std::lock_guard<std::mutex> guard{mtx_};
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable())
    thread_.join();
}

namespace {

/// One probe's outcome, reported after the round.
struct probe_result {
  bool ok = false;
  double rtt_ms = 0;
  std::string why;
};

/// One probe of `endpoint` on `client` (made here when null; reset after a
/// failure, so the next round connects afresh).
probe_result probe_once(const std::string& endpoint, std::unique_ptr<net::https_client>& client,
                        const config::hub_health_config& cfg) {
  probe_result r;
  probe_target t;
  if (auto bad = parse_endpoint(endpoint, t)) {
    r.why = "health endpoint " + endpoint + ": " + bad.message;
    return r;
  }
  const auto timeout = std::chrono::milliseconds(cfg.timeout_ms);
  if (!client) {
    net::https_client_options o;
    o.host = t.host;
    o.port = t.port;
    o.ca_file = cfg.ca_file;
    o.connect_timeout = timeout;
    o.request_timeout = timeout;
    o.user_agent = "provisiond-hub-health/0.1";
    client = std::make_unique<net::https_client>(o);
  }
  error err;
  if (!client->connected())
    err = client->connect();
  net::https_response resp;
  if (!err) {
    const auto start = std::chrono::steady_clock::now();
    err = client->request("GET", t.path, resp);
    r.rtt_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  }
  if (err)
    r.why = "health probe " + endpoint + ": "
            + (err.code == error_code::request_timeout
                 ? "no answer within " + std::to_string(cfg.timeout_ms) + " ms"
                 : err.message);
  else if (resp.status < 200 || resp.status > 299)
    r.why = "health probe " + endpoint + ": HTTP " + std::to_string(resp.status);
  else
    r.ok = true;
  if (!r.ok)
    client.reset(); // a fresh connection next time
  return r;
}

} // namespace

void hub_prober::run() {
  client_pool pool;
  std::unique_lock<std::mutex> lk{mtx_};
  while (!stopping_) {
    woken_ = false;
    lk.unlock();
    auto set = hubs_.hubs();
    // The round's probes run at once on up to max_concurrent_probes threads
    // (made for the round, then joined), so a round takes one probe's bound
    // per wave however many hubs hang, and many hubs cannot make a thread
    // each. Each endpoint's pool slot is made before the threads start (the
    // map is not touched while they run) and used by one thread at a time.
    // Hubs sharing an endpoint are probed once.
    std::vector<const allocation::linked_hub*> probed;
    std::map<std::string, probe_result> results;
    for (const auto& h : *set) {
      if (h.health_endpoint.empty())
        continue;
      probed.push_back(&h);
      results.emplace(h.health_endpoint, probe_result{});
      pool.emplace(h.health_endpoint, nullptr);
    }
    {
      struct job {
        const std::string* endpoint;
        probe_result* result;
        std::unique_ptr<net::https_client>* client;
      };
      std::vector<job> jobs;
      jobs.reserve(results.size());
      for (auto& [endpoint, result] : results)
        jobs.push_back({&endpoint, &result, &pool[endpoint]});
      std::atomic<std::size_t> next{0};
      const std::size_t workers =
        std::min(jobs.size(), static_cast<std::size_t>(std::max(1, cfg_.max_concurrent_probes)));
      std::vector<std::thread> threads;
      threads.reserve(workers);
      for (std::size_t i = 0; i < workers; ++i)
        threads.emplace_back([this, &jobs, &next] {
          for (std::size_t j = next++; j < jobs.size(); j = next++)
            *jobs[j].result = probe_once(*jobs[j].endpoint, *jobs[j].client, cfg_);
        });
      for (auto& t : threads)
        t.join();
    }
    for (const auto* hp : probed) {
      const auto& h = *hp;
      const auto& r = results[h.health_endpoint];
      const auto before = hubs_.health(h.hostname).state;
      const auto state = hubs_.report_probe(h.hostname, h.health_endpoint, r.ok, r.rtt_ms, r.why,
                                            cfg_.unhealthy_after, cfg_.healthy_after);
      if (metrics_ != nullptr) {
        metrics_->hub_probe(h.hostname, r.ok, r.rtt_ms / 1000.0);
        if (state != allocation::hub_health::status::unknown)
          metrics_->hub_health(h.hostname,
                               state == allocation::hub_health::status::healthy);
      }
      if (state != before && state == allocation::hub_health::status::unhealthy)
        std::fprintf(stderr, "provisiond: linked hub %s is unhealthy, skipped by allocation: %s\n",
                     h.hostname.c_str(), r.why.c_str());
      else if (state != before && before == allocation::hub_health::status::unhealthy)
        std::fprintf(stderr, "provisiond: linked hub %s is healthy again\n", h.hostname.c_str());
    }
    // Connections of hubs no longer probed.
    for (auto it = pool.begin(); it != pool.end();)
      it = results.count(it->first) ? std::next(it) : pool.erase(it);
    lk.lock();
    cv_.wait_for(lk, std::chrono::milliseconds(cfg_.interval_ms),
                 [this] { return stopping_ || woken_; });
  }
}

} // namespace prov
