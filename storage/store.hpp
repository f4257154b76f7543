#pragma once
// The durable state of one provisiond instance: a RocksDB database with one
// column family per record kind. RocksDB headers stay in store.cpp (pimpl).
//
// Thread safety: all methods may be called from any thread concurrently.
// Reads never block on writes. `commit` groups concurrent batches into one
// synced WAL write (group commit) on a dedicated writer thread, so callers on
// CAF's scheduler never wait for fsync.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "messages/error.hpp"

namespace prov::storage {

class keyring;

/// Column families. The numeric values are part of nothing durable; the names
/// (see to_string) are what RocksDB stores.
enum class cf : uint8_t {
  meta,          ///< instance metadata (schema version, counters)
  enrollments,   ///< lower(registration id) -> individual enrollment JSON
  groups,        ///< lower(group id) -> enrollment group JSON
  registrations, ///< lower(registration id) -> registration record JSON
  operations,    ///< operation id -> operation record JSON
  pending,       ///< operation id -> "" for accepted, unfinished operations
  outbox,        ///< big-endian uint64 sequence -> assignment event JSON
  /// lower(registration id) -> answered TPM challenge, lower(id) + "/pending"
  /// -> the pending one (binary, actors/attestation/tpm.hpp)
  tpm_challenges,
  certificates,  ///< lower(CA name) -> CA certificate store entry JSON
  hubs,          ///< lower(hub host name) -> linked hub JSON (actors/allocation/linked_hubs.hpp)
};
inline constexpr int cf_count = 10;
std::string_view to_string(cf c) noexcept;

/// An atomic set of puts and deletes.
class write_batch {
public:
  struct op {
    cf family;
    bool is_delete;
    std::string key;
    std::string value;
  };
  void put(cf family, std::string key, std::string value) {
    ops_.push_back({family, false, std::move(key), std::move(value)});
  }
  void del(cf family, std::string key) {
    ops_.push_back({family, true, std::move(key), {}});
  }
  const std::vector<op>& ops() const noexcept { return ops_; }
  bool empty() const noexcept { return ops_.empty(); }
  std::size_t size() const noexcept { return ops_.size(); }
  std::size_t bytes() const noexcept;

private:
  std::vector<op> ops_;
};

struct store_options {
  bool sync = true;                 ///< fsync the WAL on every (group) commit
  /// Opens an existing database without writing to its directory (RocksDB's
  /// OpenForReadOnly: no LOG, OPTIONS, MANIFEST or WAL written, no lock
  /// taken, a missing database is an error). Writes and commits fail.
  /// `provisiond keys list`.
  bool read_only = false;
  std::size_t block_cache_bytes = 64u << 20; ///< [storage] block_cache_mb
  std::size_t write_buffer_bytes = 16u << 20; /// per column family
  std::size_t max_group_batches = 4096; ///< upper bound merged into one commit
  /// Called on the writer thread after every successful group commit with its
  /// duration, caller batches merged and bytes (metrics). Keep it cheap.
  std::function<void(double seconds, std::size_t batches, std::size_t bytes)> on_commit;
  /// Tests: called after each chunk attach_keyring seals and writes; an
  /// exception thrown here stops it there, as a crash mid-migration would.
  std::function<void()> on_seal_chunk;
};

/// A stored value a rotation could not open (left as it was).
struct unreadable_value {
  cf family;
  std::string key;
  std::string key_id; ///< the id its envelope names (printable)
  std::string why;
};

/// What attach_keyring did to the values already stored.
struct seal_report {
  std::size_t sealed = 0;   ///< plaintext values (an older version's) sealed now
  std::size_t resealed = 0; ///< values moved from an older key to the active one
  /// With reseal_all: values that did not open (tampered, key id not in the
  /// key file). The rotation goes on past them; the first 1000 are kept.
  std::vector<unreadable_value> unreadable;
  std::size_t unreadable_total = 0;
};

/// How many stored values of the sealed families name each key id
/// (`provisiond keys list`): an id other than the active one still in use
/// means an incomplete rotation.
struct key_usage {
  std::vector<std::pair<std::string, std::size_t>> by_key_id; ///< id order
  std::size_t plaintext = 0; ///< not sealed (an older version's, or damage)
};

/// Families whose values are sealed once a keyring is attached: they hold
/// symmetric keys (enrollments, groups), webhook URLs with their credentials
/// (custom allocation definitions), TPM challenge secrets and CA entries.
bool sealed_family(cf c) noexcept;

/// Statistics of the group-commit writer (for metrics and tests).
struct commit_stats {
  uint64_t commits = 0;  ///< synced RocksDB writes done
  uint64_t batches = 0;  ///< caller batches contained in them
  uint64_t bytes = 0;
};

class store {
public:
  using done_fn = std::function<void(const error&)>;
  using visit_fn = std::function<bool(std::string_view key, std::string_view value)>;

  virtual ~store() = default;

  /// Opens (creating when missing) the database in `dir`. Errors name the
  /// directory and RocksDB's reason (e.g. "lock held by another process").
  [[nodiscard]] static error open(const std::string& dir, const store_options& opts,
                                  std::unique_ptr<store>& out);

  /// Point read. Not found is not an error: `out` is reset instead.
  [[nodiscard]] virtual error get(cf family, std::string_view key,
                                  std::optional<std::string>& out) const = 0;

  /// Visits keys >= `start` in ascending order until `fn` returns false or
  /// `limit` entries were visited (0 = no limit).
  [[nodiscard]] virtual error scan(cf family, std::string_view start, std::size_t limit,
                                   const visit_fn& fn) const = 0;

  /// Called by scan_tolerant for a sealed value that does not open (tampered,
  /// key missing from the key file): its key and why. Return false to stop.
  using unreadable_fn = std::function<bool(std::string_view key, const error& why)>;

  /// scan(), except that a sealed value that does not open is handed to
  /// `unreadable` and the scan goes on, so one damaged value does not hide
  /// the others. Other read errors still end the scan. The default (for
  /// stores that seal nothing) is scan().
  [[nodiscard]] virtual error scan_tolerant(cf family, std::string_view start, std::size_t limit,
                                            const visit_fn& fn,
                                            const unreadable_fn& unreadable) const;

  /// The greatest key of a family, or nullopt when empty.
  [[nodiscard]] virtual error last_key(cf family, std::optional<std::string>& out) const = 0;

  /// How durable a synchronous write is when it returns.
  enum class durability {
    synced, ///< fsync'd WAL (when store_options::sync): survives a machine crash
    /// In the WAL, not fsync'd: survives kill -9 but not a machine crash. Only
    /// for state rebuilt from elsewhere (Kafka tables) whose read position is
    /// in the same batch, so a lost tail is re-applied on the next start;
    /// and embedded TPM challenges, which a device asks for again.
    replayable,
  };

  /// Synchronous atomic write (synced when store_options::sync).
  [[nodiscard]] error write(const write_batch& batch) { return write(batch, durability::synced); }
  [[nodiscard]] virtual error write(const write_batch& batch, durability d) = 0;

  /// Asynchronous atomic write with group commit. `done` runs on the writer
  /// thread once the batch is durable (or failed); keep it short (post a
  /// message, complete a promise). Batches from one caller apply in call order.
  virtual void commit(write_batch batch, done_fn done) = 0;

  /// Stops the writer thread after draining queued batches. Idempotent; the
  /// destructor calls it.
  virtual void close() = 0;

  virtual commit_stats stats() const = 0;

  /// Seals the values of sealed_family()s from now on (docs/security.md).
  /// Call once, right after open(), before any other thread uses the store.
  /// First checks the data dir's check value (meta "secrets/check"): a data
  /// dir sealed before with a key this keyring does not hold fails here,
  /// naming the key id and the key file. Then writes the check value (synced)
  /// under the active key, before anything is sealed, then seals every plaintext value
  /// left by an older version and, with `reseal_all`, re-encrypts values
  /// sealed under an older key with the active one (`provisiond keys rotate`).
  /// After the first complete pass it writes meta "secrets/migrated": later
  /// attaches skip the scan (unless `reseal_all`), and from then on a value
  /// of a sealed family that is not an envelope reads as storage_failure.
  [[nodiscard]] virtual error attach_keyring(std::shared_ptr<const keyring> k, bool reseal_all,
                                             seal_report& report) = 0;
  /// Whether this data dir has been sealed (its check value exists). Lets the
  /// caller refuse to create a new key file for a data dir sealed before.
  [[nodiscard]] virtual error is_sealed(bool& out) const = 0;
  /// Counts the values of sealed_family()s by the key id their envelope
  /// names, without opening them (no keyring needed). The default (stores
  /// that seal nothing) reports nothing.
  [[nodiscard]] virtual error count_key_usage(key_usage& out) const;

  /// Non-empty when open() found the WAL damaged after its last intact
  /// record and recovered to that point (see store.cpp): what RocksDB
  /// reported. The caller logs it; writes after that point are gone.
  virtual std::string recovery_note() const = 0;
  /// Where open() kept a copy of the damaged logs (empty: no recovery).
  virtual std::string recovery_copy_dir() const = 0;

  /// A RocksDB integer property summed over all column families (e.g.
  /// "rocksdb.cur-size-all-mem-tables", "rocksdb.estimate-num-keys"); 0 when
  /// unknown. For metrics gauges.
  virtual uint64_t int_property(std::string_view name) const = 0;
  /// The same for one column family.
  virtual uint64_t int_property(cf family, std::string_view name) const = 0;
};

/// Big-endian fixed-width key for outbox sequence numbers (sorts numerically).
std::string seq_key(uint64_t seq);
/// Inverse of seq_key; 0 when the key is not 8 bytes.
uint64_t parse_seq_key(std::string_view key);

} // namespace prov::storage
