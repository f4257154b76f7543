#pragma once
// Probes the health endpoint of each linked hub that has one (an HTTPS GET;
// a 2xx answer within the timeout is a success) and reports into the hub
// set, which allocation reads, and into the metrics. One thread of its own,
// never CAF's scheduler: a probe waits on the network. The probes of one
// round run at once on at most [hub_health] max_concurrent_probes threads,
// so a round is bounded by one probe's timeout per wave of that many hubs,
// not by the number of hubs times it, and many hubs do not mean as many
// threads.
//
// The RTT recorded is the GET on an open connection (connect and TLS are
// timed out but not counted), so it measures the network path, not the
// handshake; a connection is reused from probe to probe and dropped after a
// failure.

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "actors/allocation/linked_hubs.hpp"
#include "config/config.hpp"

namespace prov::metrics {
class instruments;
}

namespace prov {

class hub_prober {
public:
  /// Starts the thread; the first round runs at once.
  hub_prober(allocation::hub_set& hubs, config::hub_health_config cfg,
             metrics::instruments* metrics);
  ~hub_prober(); ///< stop()
  hub_prober(const hub_prober&) = delete;
  hub_prober& operator=(const hub_prober&) = delete;

  /// Runs the next round now (the set changed: a new hub is probed at once).
  void wake();
  /// Stops the thread; a round in progress finishes first (bounded by one
  /// probe's timeout). Idempotent.
  void stop();

private:
  void run();

  allocation::hub_set& hubs_;
  config::hub_health_config cfg_;
  metrics::instruments* metrics_;
  std::mutex mtx_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool woken_ = false;
  std::thread thread_;
};

} // namespace prov
