#pragma once
// What the stages know of enrollments: the group snapshot, the caches of
// accepted credentials and parsed views, the generations that invalidate
// them, and the writes that keep them current (embedded: RocksDB; Kafka: the
// shared topics). CAF-free; every member is safe from any thread.

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "actors/attestation/mechanism.hpp"
#include "actors/enrollment/enrollment_model.hpp"
#include "storage/store.hpp"

namespace prov {

class replication;

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

class enrollment_catalog {
public:
  enrollment_catalog() {
    groups_.retry_with([this] { static_cast<void>(reload_groups()); });
  }
  enrollment_catalog(const enrollment_catalog&) = delete;
  enrollment_catalog& operator=(const enrollment_catalog&) = delete;

  /// Where enrollments live. Set once at start, before any other call.
  void attach(storage::store* store) { store_ = store; }
  /// Kafka mode: writes go to every instance through the shared topics. Set
  /// once at start, before the first write.
  void replicate_through(replication* repl) { repl_ = repl; }

  // -- reads ------------------------------------------------------------------

  group_cache::snapshot groups() const { return groups_.get(); }
  /// Bumped by every enrollment or group write; invalidates `verified()`.
  uint64_t generation() const noexcept { return generation_.load(); }
  /// Bumped after every registration record delete through the service API
  /// (write_registrations): allocation's read of a device's registration
  /// record is reused by configuration, embedded, only while this is
  /// unchanged (registration_event::prior).
  uint64_t registration_generation() const noexcept { return registration_generation_.load(); }
  /// A cache: filled by attest().
  verified_tokens& verified() const noexcept { return verified_; }
  /// A cache: filled by attest(), read by allocation.
  recent_views& views() const noexcept { return views_; }
  /// After a lookup missed: Kafka, waits (up to `timeout_ms`) until this
  /// instance has applied the enrollment writes published before the call,
  /// so a write made through another instance a moment ago is seen; true
  /// when it did and the lookup is worth repeating. Embedded the store is
  /// the truth: false at once. Blocking.
  bool caught_up(int timeout_ms) const;
  /// Kafka: other instances write the shared state too, so caught_up() can
  /// be true. A plain read, for callers that must not do work (take a lock,
  /// remember a key) before asking it embedded.
  bool replicated() const noexcept { return repl_ != nullptr; }

  // -- writes (blocking: detached actors only) ----------------------------------

  /// Every enrollment write goes through here. Embedded: one synced RocksDB
  /// write. Kafka: through dps.enrollments, returning once this instance
  /// has applied it.
  [[nodiscard]] error write_enrollments(const storage::write_batch& batch, enrollment::kind k);
  /// The same for CA certificate store writes (cf certificates; on Kafka
  /// through dps.enrollments too). Rebuilds the group snapshot, which
  /// carries the CAs that caReferences name.
  [[nodiscard]] error write_certificates(const storage::write_batch& batch);
  /// The same for registration record deletes (dps.registrations on Kafka).
  [[nodiscard]] error write_registrations(const storage::write_batch& batch);
  /// Other state every instance shares (linked hubs, TPM challenges):
  /// embedded, a RocksDB write with durability `d`; Kafka, through
  /// dps.enrollments, returning once this instance has applied it.
  [[nodiscard]] error write_shared(const storage::write_batch& batch,
                                   storage::store::durability d);
  /// Runs `write` (state that belongs to individual enrollment `key`: its
  /// TPM challenges) only while that enrollment is stored with etag `etag`,
  /// and atomically against this instance's individual enrollment writes
  /// of that key (write_enrollments holds the same lock stripe), so a delete or a
  /// replacement cannot land between the check and `write`. `current`:
  /// false (and `write` not run) when the enrollment went or changed. With
  /// Kafka the check is against this instance's copy: another instance's
  /// delete is not ordered against it (docs/device-api.md#tpm-attestation).
  [[nodiscard]] error write_if_enrollment(std::string_view key, std::string_view etag,
                                          bool& current,
                                          const std::function<error()>& write) const;
  /// After any enrollment or group write: refreshes the group snapshot (for a
  /// group) and then invalidates cached verdicts and views. Every writer of
  /// enrollments must call it. An error: the snapshot could not be rebuilt
  /// (even on a second try), so it failed closed (group_cache); the write
  /// itself stands.
  [[nodiscard]] error enrollments_changed(enrollment::kind k);
  /// Rebuilds the group snapshot from the store. A group that cannot be read
  /// is left out (internal error naming it; the snapshot is replaced anyway);
  /// when the store cannot be scanned, the snapshot is left as it was.
  error reload_groups();

private:
  error rebuild_groups(bool& replaced);

  storage::store* store_ = nullptr;
  replication* repl_ = nullptr;
  group_cache groups_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> registration_generation_{0};
  mutable verified_tokens verified_;
  mutable recent_views views_;
  /// Serializes group snapshot rebuilds, so a slow one that read the
  /// groups before a write cannot install its snapshot after the write's.
  std::mutex reload_mtx_;
  /// Held by individual enrollment writes and write_if_enrollment(), striped
  /// by enrollment key: with Kafka a holder waits for its publish (seconds),
  /// which must not stall writes of other enrollments. A batch takes its
  /// keys' stripes in ascending order (no deadlock).
  static constexpr std::size_t individual_stripes = 64;
  static std::size_t stripe_of(std::string_view key) {
    return std::hash<std::string_view>{}(key) % individual_stripes;
  }
  mutable std::array<std::mutex, individual_stripes> individual_mtx_;
};

} // namespace prov
