#pragma once
// State shared by the stage actors of one engine (CAF-free). Owned by the
// engine; actors hold a shared_ptr.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "actors/allocation/linked_hubs.hpp"
#include "actors/allocation/policy.hpp"
#include "actors/attestation/mechanism.hpp"
#include "actors/attestation/tpm.hpp"
#include "actors/configuration/certificate_issuer.hpp"
#include "actors/engine.hpp"
#include "actors/enrollment/enrollment_model.hpp"
#include "actors/enrollment_catalog.hpp"
#include "actors/hub_prober.hpp"
#include "actors/replication.hpp"
#include "actors/stage_sink.hpp"
#include "storage/store.hpp"
#include "bus/bus.hpp"

namespace prov {

/// Kafka recovery events, for metrics (shared: a scrape may outlive the engine).
struct kafka_counters {
  std::atomic<uint64_t> resends{0};         ///< operations handed off again (no outcome)
  std::atomic<uint64_t> publish_retries{0}; ///< failed publishes retried after 1 s
  /// Operations configuration saw again after publishing their
  /// device.assigned (resends, redeliveries): answered without a second one.
  std::atomic<uint64_t> assigned_not_republished{0};
};

struct engine_context {
  engine_options opts;
  std::shared_ptr<kafka_counters> kafka_stats = std::make_shared<kafka_counters>();
  storage::store* store = nullptr;
  std::unique_ptr<bus::stage_bus> bus;
  /// Kafka mode: the shared state topics (null in embedded mode).
  std::unique_ptr<replication> repl;
  enrollment_catalog catalog;
  attestation::registry mechanisms; ///< built at start, read-only after
  /// TPM challenges, in the store's `tpm_challenges` family (engine.cpp).
  std::unique_ptr<attestation::challenge_store> tpm_challenges;
  allocation::registry policies;    ///< built at start, read-only after
  /// The [[issuing_cas]] that sign devices' CSRs (processes with the
  /// configuration role); null elsewhere. Read-only after start.
  std::shared_ptr<const configuration::certificate_issuer> issuer;
  /// The linked hubs now (service API, [[hubs]] seed, Kafka: dps.enrollments)
  /// and their health; actors/hub_store.hpp keeps it in step with the store.
  allocation::hub_set hubs;
  /// Probes the hubs' health endpoints (processes with the allocation role);
  /// after `hubs`, so it stops before the set goes away.
  std::unique_ptr<hub_prober> prober;
  std::string instance_hex; ///< 16 hex digits, part of operation ids
  std::atomic<int64_t> inflight{0};
  /// Kafka: device.assigned records whose `pending` marker is not deleted yet
  /// (shutdown waits for them, else the next start publishes them again).
  std::atomic<int64_t> relaying{0};
  std::atomic<bool> accepting{true};
  /// Kafka: stages take new input from their topics. Cleared while draining,
  /// after this process's own registrations settled (engine drain()).
  std::atomic<bool> stage_intake{true};
  /// Where the stages' outputs go (in process or Kafka, fused or not): chosen
  /// once at start, after `bus`, which it uses.
  std::unique_ptr<stage_sink> sink;
  std::mutex commits_mtx; ///< guards the two below
  std::condition_variable commits_cv;
  std::size_t commits_inflight = 0;
  bool commits_stopped = false;
  metrics::instruments* metrics = nullptr; ///< never null once started
  std::unique_ptr<metrics::instruments> own_metrics; ///< when the caller gave none

  /// Every asynchronous commit of the stages goes through here (not
  /// store->commit), so shutdown can wait for the engine's own commits
  /// without closing the store, which the caller owns.
  void commit(storage::write_batch batch, storage::store::done_fn done);
  /// Refuses later commits (`done` gets unavailable at once, the operation
  /// stays in `pending`) and waits until those in flight are done.
  void stop_commits();

  /// Kafka mode. For the composition (engine.cpp) only: the stages see the
  /// mode through `sink` and the catalog.
  bool kafka() const noexcept { return repl != nullptr; }
};

using engine_context_ptr = std::shared_ptr<engine_context>;

/// Seconds since `start` on the steady clock (stage latency metrics).
inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

} // namespace prov
