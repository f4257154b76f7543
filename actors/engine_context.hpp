#pragma once
// State shared by the stage actors of one engine (CAF-free). Owned by the
// engine; actors hold a shared_ptr.

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "actors/allocation/policy.hpp"
#include "actors/attestation/mechanism.hpp"
#include "actors/engine.hpp"
#include "actors/enrollment/enrollment_model.hpp"
#include "actors/replication.hpp"
#include "storage/store.hpp"
#include "transport/bus.hpp"

namespace prov {

/// Snapshot of all enrollment groups. Symmetric-key devices of a group are
/// attested by trying each group's derived key (the SAS names no group), so the
/// groups (DPS allows 100 per kind) are kept in memory; rebuilt on every group
/// write by the enrollment actor.
///
/// When a rebuild fails, the snapshot fails closed: it is empty (no group
/// attests devices, rather than with keys rotated or deleted since) until a
/// rebuild succeeds. get() then retries it through `retry_with`, at most once
/// a second, so the groups come back by themselves once the store reads again.
class group_cache {
public:
  using snapshot = std::shared_ptr<const std::vector<enrollment::enrollment_view>>;
  snapshot get() const {
    if (failed_.load())
      retry();
    std::lock_guard<std::mutex> guard{mtx_};
    return groups_;
  }
  void set(snapshot s) {
    std::lock_guard<std::mutex> guard{mtx_};
    groups_ = std::move(s);
    failed_ = false;
  }
  /// Empties the snapshot until the next set().
  void fail_closed() {
    std::lock_guard<std::mutex> guard{mtx_};
    groups_ = std::make_shared<std::vector<enrollment::enrollment_view>>();
    failed_ = true;
  }
  bool failed() const { return failed_.load(); }
  /// What get() calls while failed (it should set() on success). Set once,
  /// before the cache is shared.
  void retry_with(std::function<void()> reload) { reload_ = std::move(reload); }

private:
  void retry() const {
    std::unique_lock<std::mutex> lock{retry_mtx_, std::try_to_lock};
    if (!lock.owns_lock() || !reload_)
      return; // another thread is retrying (or nothing can)
    auto now = std::chrono::steady_clock::now();
    if (now - last_retry_ < std::chrono::seconds(1))
      return;
    last_retry_ = now;
    reload_();
  }

  mutable std::mutex mtx_;
  snapshot groups_ = std::make_shared<std::vector<enrollment::enrollment_view>>();
  std::atomic<bool> failed_{false};
  std::function<void()> reload_;
  mutable std::mutex retry_mtx_;
  mutable std::chrono::steady_clock::time_point last_retry_{};
};

/// Credentials that passed attestation, so a device's polls (which repeat
/// the token of its PUT) skip the HMAC work. An entry is used only while the token
/// has not expired and no enrollment changed since it was verified (the
/// generation counter), so revoking or rotating a key takes effect at once.
/// Keys hold the exact token text: a different signature never matches.
class verified_tokens {
public:
  bool lookup(const std::string& key, int64_t now_s, uint64_t generation,
              attestation::verdict& out) const {
    std::lock_guard<std::mutex> guard{mtx_};
    auto it = map_.find(key);
    if (it == map_.end() || it->second.generation != generation
        || it->second.expiry_s <= now_s)
      return false;
    out = it->second.result;
    return true;
  }
  void insert(std::string key, int64_t expiry_s, uint64_t generation,
              const attestation::verdict& r) {
    std::lock_guard<std::mutex> guard{mtx_};
    if (map_.size() >= max_entries)
      map_.clear(); // crude but bounded; a miss only costs a re-verification
    map_[std::move(key)] = entry{expiry_s, generation, r};
  }

private:
  static constexpr std::size_t max_entries = 1 << 16;
  struct entry {
    int64_t expiry_s;
    uint64_t generation;
    attestation::verdict result;
  };
  mutable std::mutex mtx_;
  std::unordered_map<std::string, entry> map_;
};

/// Individual enrollment views parsed by attestation, reused by allocation a
/// few milliseconds later instead of a second RocksDB read and JSON parse.
/// Entries count only for the enrollment generation they were read in.
class recent_views {
public:
  /// The view, shared (not copied); null when absent or of another generation.
  std::shared_ptr<const enrollment::enrollment_view> lookup(const std::string& key,
                                                            uint64_t generation) const {
    std::lock_guard<std::mutex> guard{mtx_};
    auto it = map_.find(key);
    if (it == map_.end() || it->second.first != generation)
      return nullptr;
    return it->second.second;
  }
  void insert(std::string key, uint64_t generation, enrollment::enrollment_view v) {
    auto p = std::make_shared<const enrollment::enrollment_view>(std::move(v));
    std::lock_guard<std::mutex> guard{mtx_};
    if (map_.size() >= max_entries)
      map_.clear(); // bounded; allocation runs right after attestation
    map_[std::move(key)] = {generation, std::move(p)};
  }

private:
  static constexpr std::size_t max_entries = 16384;
  mutable std::mutex mtx_;
  std::unordered_map<std::string,
                     std::pair<uint64_t, std::shared_ptr<const enrollment::enrollment_view>>>
    map_;
};

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
  std::unique_ptr<transport::bus> bus;
  /// Kafka mode: the shared state topics (null in embedded mode).
  std::unique_ptr<replication> repl;
  group_cache groups;
  attestation::registry mechanisms; ///< built at start, read-only after
  allocation::registry policies;    ///< built at start, read-only after
  std::vector<allocation::candidate_hub> hubs;
  std::string instance_hex; ///< 16 hex digits, part of operation ids
  std::atomic<int64_t> inflight{0};
  /// Kafka: device.assigned records whose `pending` marker is not deleted yet
  /// (shutdown waits for them, else the next start publishes them again).
  std::atomic<int64_t> relaying{0};
  std::atomic<bool> accepting{true};
  /// Kafka: stages take new input from their topics. Cleared while draining,
  /// after this process's own registrations settled (engine drain()).
  std::atomic<bool> stage_intake{true};
  /// Kafka with kafka.fuse_stages (the default): when the stage consuming a topic
  /// runs in this process too, a stage hands it the event here instead of publishing
  /// (a produce, a consume and a broker round trip fewer). The ack passed
  /// along is the sender's own input ack, so its offset is committed only
  /// once the receiving stage's effect is durable. Indexed by topic; empty:
  /// publish. Set before the consumers start; never changed after.
  std::array<std::function<void(registration_event&&, transport::bus::ack_fn)>,
             transport::topic_count>
    in_process;
  /// Bumped by every enrollment or group write; invalidates `verified`.
  std::atomic<uint64_t> enrollment_generation{0};
  /// Bumped after every registration record delete through the service API
  /// (write_registrations): allocation's read of a device's registration
  /// record is reused by configuration, embedded, only while this is
  /// unchanged (registration_event::prior).
  std::atomic<uint64_t> registration_generation{0};
  mutable verified_tokens verified; ///< a cache: filled by const attest()
  mutable recent_views views;       ///< a cache: filled by attest(), read by allocation
  /// Serializes group snapshot rebuilds, so a slow one that read the
  /// groups before a write cannot install its snapshot after the write's.
  std::mutex reload_mtx;
  std::mutex commits_mtx; ///< guards the two below
  std::condition_variable commits_cv;
  std::size_t commits_inflight = 0;
  bool commits_stopped = false;
  metrics::instruments* metrics = nullptr; ///< never null once started
  std::unique_ptr<metrics::instruments> own_metrics; ///< when the caller gave none

  engine_context() {
    groups.retry_with([this] { static_cast<void>(reload_groups()); });
  }

  /// Rebuilds `groups` from the store. A group that cannot be read is left
  /// out (internal error naming it; the snapshot is replaced anyway); when
  /// the store cannot be scanned, the snapshot is left as it was.
  error reload_groups();
  /// After any enrollment or group write: refreshes the group snapshot (for a
  /// group) and then invalidates cached verdicts and views. Every writer of
  /// enrollments must call it. An error: the snapshot could not be rebuilt
  /// (even on a second try), so it failed closed (group_cache); the write
  /// itself stands.
  [[nodiscard]] error enrollments_changed(enrollment::kind k);

  /// Every enrollment write goes through here. Embedded: one synced RocksDB
  /// write. Kafka: through dps.enrollments, returning once this instance
  /// has applied it. Blocking: detached actors only.
  error write_enrollments(const storage::write_batch& batch, enrollment::kind k);
  /// The same for registration record deletes (dps.registrations on Kafka).
  error write_registrations(const storage::write_batch& batch);

  /// Every asynchronous commit of the stages goes through here (not
  /// store->commit), so shutdown can wait for the engine's own commits
  /// without closing the store, which the caller owns.
  void commit(storage::write_batch batch, storage::store::done_fn done);
  /// Refuses later commits (`done` gets unavailable at once, the operation
  /// stays in `pending`) and waits until those in flight are done.
  void stop_commits();

  bool kafka() const noexcept { return repl != nullptr; }
};

using engine_context_ptr = std::shared_ptr<engine_context>;

/// Seconds since `start` on the steady clock (stage latency metrics).
inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Verifies the credential of a register/poll request with its mechanism:
/// against the individual enrollment (first) or the enrollment groups.
/// Read-only; any thread.
attestation::verdict attest(const engine_context& ctx, const register_request& req);

} // namespace prov
