#include "actors/hub_prober.hpp"

#include <cstdio>
#include <map>
#include <memory>

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

void hub_prober::run() {
  client_pool pool;
  std::unique_lock<std::mutex> lk{mtx_};
  while (!stopping_) {
    woken_ = false;
    lk.unlock();
    auto set = hubs_.hubs();
    const auto timeout = std::chrono::milliseconds(cfg_.timeout_ms);
    for (const auto& h : *set) {
      {
        std::lock_guard<std::mutex> guard{mtx_};
        if (stopping_)
          return;
      }
      if (h.health_endpoint.empty())
        continue;
      probe_target t;
      bool ok = false;
      double rtt_ms = 0;
      std::string why;
      if (auto bad = parse_endpoint(h.health_endpoint, t)) {
        why = "health endpoint " + h.health_endpoint + ": " + bad.message;
      } else {
        auto& client = pool[h.health_endpoint];
        if (!client) {
          net::https_client_options o;
          o.host = t.host;
          o.port = t.port;
          o.ca_file = cfg_.ca_file;
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
          rtt_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now()
                                                             - start)
                     .count();
        }
        if (err) {
          why = "health probe " + h.health_endpoint + ": "
                + (err.code == error_code::request_timeout
                     ? "no answer within " + std::to_string(cfg_.timeout_ms) + " ms"
                     : err.message);
        } else if (resp.status < 200 || resp.status > 299) {
          why = "health probe " + h.health_endpoint + ": HTTP " + std::to_string(resp.status);
        } else {
          ok = true;
        }
        if (!ok)
          pool.erase(h.health_endpoint); // a fresh connection next time
      }
      const auto before = hubs_.health(h.hostname).state;
      const auto state = hubs_.report_probe(h.hostname, h.health_endpoint, ok, rtt_ms, why,
                                            cfg_.unhealthy_after, cfg_.healthy_after);
      if (metrics_ != nullptr) {
        metrics_->hub_probe(h.hostname, ok, rtt_ms / 1000.0);
        if (state != allocation::hub_health::status::unknown)
          metrics_->hub_health(h.hostname,
                               state == allocation::hub_health::status::healthy);
      }
      if (state != before && state == allocation::hub_health::status::unhealthy)
        std::fprintf(stderr, "provisiond: linked hub %s is unhealthy, skipped by allocation: %s\n",
                     h.hostname.c_str(), why.c_str());
      else if (state != before && before == allocation::hub_health::status::unhealthy)
        std::fprintf(stderr, "provisiond: linked hub %s is healthy again\n", h.hostname.c_str());
    }
    // Connections of hubs no longer probed.
    for (auto it = pool.begin(); it != pool.end();) {
      bool used = false;
      for (const auto& h : *set)
        used = used || h.health_endpoint == it->first;
      it = used ? std::next(it) : pool.erase(it);
    }
    lk.lock();
    cv_.wait_for(lk, std::chrono::milliseconds(cfg_.interval_ms),
                 [this] { return stopping_ || woken_; });
  }
}

} // namespace prov
