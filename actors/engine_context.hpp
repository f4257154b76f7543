#pragma once
// State shared by the stage actors of one engine (CAF-free). Owned by the
// engine; actors hold a shared_ptr.

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "actors/allocation/allocation_policy.hpp"
#include "actors/engine.hpp"
#include "actors/enrollment/enrollment_model.hpp"
#include "storage/store.hpp"
#include "transport/bus.hpp"

namespace prov {

/// Snapshot of all enrollment groups. Symmetric-key devices of a group are
/// attested by trying each group's derived key (the SAS names no group), so the
/// groups (DPS allows 100 per kind) are kept in memory; rebuilt on every group
/// write by the enrollment actor.
class group_cache {
public:
  using snapshot = std::shared_ptr<const std::vector<enrollment::enrollment_view>>;
  snapshot get() const {
    std::lock_guard<std::mutex> guard{mtx_};
    return groups_;
  }
  void set(snapshot s) {
    std::lock_guard<std::mutex> guard{mtx_};
    groups_ = std::move(s);
  }

private:
  mutable std::mutex mtx_;
  snapshot groups_ = std::make_shared<std::vector<enrollment::enrollment_view>>();
};

struct engine_context {
  engine_options opts;
  storage::store* store = nullptr;
  std::unique_ptr<transport::bus> bus;
  group_cache groups;
  std::vector<allocation::candidate_hub> hubs;
  std::string instance_hex; ///< 16 hex digits, part of operation ids
  std::atomic<int64_t> inflight{0};
  std::atomic<bool> accepting{true};
  metrics::instruments* metrics = nullptr; ///< never null once started
  std::unique_ptr<metrics::instruments> own_metrics; ///< when the caller gave none

  /// Rebuilds `groups` from the store.
  error reload_groups();
};

using engine_context_ptr = std::shared_ptr<engine_context>;

/// Seconds since `start` on the steady clock (stage latency metrics).
inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Outcome of attestation, stored with the accepted operation so resuming
/// after a restart never needs the device's credential again.
struct attestation_result {
  error err;
  std::string attestation_type;    ///< "symmetricKey"
  std::string enrollment_group_id; ///< "" for individual enrollments
  bool enabled = true;
};

/// Verifies the credential of a register/poll request against the individual
/// enrollment (first) or the enrollment groups. Read-only; any thread.
attestation_result attest(const engine_context& ctx, const register_request& req);

} // namespace prov
