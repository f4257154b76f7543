#include "storage/store.hpp"

#include "storage/keyring.hpp"

#include <pthread.h>

#include <algorithm>
#include <array>
#include <cstdarg>
#include <chrono>
#include <condition_variable>
#include <map>
#include <deque>
#include <exception>
#include <filesystem>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include <rocksdb/cache.h>
#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/options.h>
#include <rocksdb/perf_level.h>
#include <rocksdb/slice.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

namespace prov::storage {

namespace {

constexpr std::array<cf, cf_count> all_families = {
    cf::meta,       cf::enrollments, cf::groups, cf::registrations,
    cf::operations, cf::pending,     cf::outbox, cf::tpm_challenges, cf::certificates,
    cf::hubs,
};

bool valid(cf c) noexcept { return static_cast<int>(c) < cf_count; }

/// Families read mostly by exact key: a bloom filter saves a block read per
/// miss (e.g. "is this registration id enrolled?"). pending/outbox are only
/// scanned, meta is tiny.
bool point_lookup(cf c) noexcept {
  return c == cf::enrollments || c == cf::groups || c == cf::registrations ||
         c == cf::operations || c == cf::tpm_challenges;
}

rocksdb::Slice slice(std::string_view s) noexcept { return {s.data(), s.size()}; }

/// Where a sealed value lives: its authenticated data, so a ciphertext copied
/// to another family or key fails to open.
std::string seal_aad(cf c, std::string_view key) {
  std::string a(to_string(c));
  a += '/';
  a += key;
  return a;
}

constexpr std::string_view check_key = "secrets/check";
constexpr std::string_view check_plain = "provisiond sealed data dir";
/// Written once a migration pass has sealed every value: later starts skip
/// the full scan, and a value that is not an envelope in a sealed family is
/// then a damage (or a write under the server's feet), not an old plaintext.
constexpr std::string_view migrated_key = "secrets/migrated";

/// RocksDB counts into a thread-local perf context by default (kEnableCount):
/// a TLS lookup through the shared library on every key comparison (perf
/// showed __tls_get_addr at 2% of a Kafka gateway). Nothing reads those
/// counters, so each thread that calls RocksDB turns them off once.
void no_perf_counters() noexcept {
  static thread_local const bool off = [] {
    rocksdb::SetPerfLevel(rocksdb::PerfLevel::kDisable);
    return true;
  }();
  static_cast<void>(off);
}

/// The one place a rocksdb::Status becomes a prov::error. `family` is named
/// when the failure concerns one column family.
error to_error(const rocksdb::Status& s, std::string_view what, const std::string& dir,
               const cf* family = nullptr) {
  if (s.ok()) return {};
  std::string text = s.ToString();
  std::string msg;
  // PosixEnv reports "While lock file: <dir>/LOCK: ..." (other process) and
  // "lock hold by current process ..." (same process, second DB::Open).
  if (s.IsIOError() && (text.find("lock file") != std::string::npos ||
                        text.find("lock hold") != std::string::npos)) {
    msg = "storage: cannot open data dir '" + dir +
          "': its lock is held, another provisiond may be running on this data dir (" +
          text + ")";
    return {error_code::storage_failure, std::move(msg)};
  }
  msg = "storage: " + std::string(what) + " failed in '" + dir + "'";
  if (family) msg += " (column family '" + std::string(to_string(*family)) + "')";
  msg += ": " + text;
  return {error_code::storage_failure, std::move(msg)};
}

error internal_error(std::string_view what, const std::string& dir, const char* why) {
  return {error_code::internal,
          "storage: " + std::string(what) + " failed in '" + dir + "': " + why};
}

error unknown_family(cf c) {
  return {error_code::internal,
          "storage: unknown column family #" + std::to_string(static_cast<int>(c))};
}

/// Runs `fn` and turns any exception (bad_alloc, a throwing visitor) into an
/// error so none escapes the store's API.
template <class Fn>
error guarded(std::string_view what, const std::string& dir, Fn&& fn) noexcept {
  try {
    return fn();
  } catch (const std::exception& e) {
    return internal_error(what, dir, e.what());
  } catch (...) {
    return internal_error(what, dir, "unknown exception");
  }
}

/// A `done` callback must not take the writer thread down with it.
void call_done(const store::done_fn& done, const error& e) noexcept {
  if (!done) return;
  try {
    done(e);
  } catch (...) {
  }
}

/// RocksDB's info log, discarded: a read-only open must not create LOG.
class silent_logger final : public rocksdb::Logger {
public:
  using rocksdb::Logger::Logv;
  void Logv(const char*, va_list) override {}
};

class rocks_store final : public store {
public:
  rocks_store(std::string dir, store_options opts) : dir_(std::move(dir)), opts_(opts) {
    opts_.max_group_batches = std::max<std::size_t>(opts_.max_group_batches, 1);
  }

  ~rocks_store() override {
    close();
    if (!db_) return;
    // Handles must go before the DB that owns them.
    for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
    handles_.clear();
    (void)db_->Close();
    delete db_;
    db_ = nullptr;
  }

  error open_db() {
    if (opts_.read_only) return open_read_only();
    std::error_code ec;
    std::filesystem::create_directories(dir_, ec);
    if (ec) {
      return {error_code::storage_failure,
              "storage: cannot create data dir '" + dir_ + "': " + ec.message()};
    }

    rocksdb::DBOptions db_opts;
    db_opts.create_if_missing = true;
    db_opts.create_missing_column_families = true;
    db_opts.paranoid_checks = true;
    db_opts.max_background_jobs = 2;
    db_opts.manual_wal_flush = false;
    // First tolerate only a torn tail record (a crash mid-append). A power
    // loss can also leave the unsynced tail as zeros or stale blocks (file
    // size extended, data never written: XFS, ext4 data=writeback, drives
    // without power-loss protection), which this mode calls corruption; on
    // that, open again with kPointInTimeRecovery, which replays up to the
    // last intact record (below). Every acknowledged write was fsync'd
    // before the damage, so only unacknowledged ones (and replayable table
    // writes, applied again from Kafka) are dropped, unless the medium
    // corrupted synced data, which RocksDB cannot tell apart: hence the
    // loud recovery_note().
    db_opts.wal_recovery_mode = rocksdb::WALRecoveryMode::kTolerateCorruptedTailRecords;
    db_opts.keep_log_file_num = 10;

    auto cache = rocksdb::NewLRUCache(opts_.block_cache_bytes);
    rocksdb::BlockBasedTableOptions plain_table;
    plain_table.block_cache = cache;
    rocksdb::BlockBasedTableOptions bloom_table = plain_table;
    bloom_table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
    std::shared_ptr<rocksdb::TableFactory> plain_factory(
        rocksdb::NewBlockBasedTableFactory(plain_table));
    std::shared_ptr<rocksdb::TableFactory> bloom_factory(
        rocksdb::NewBlockBasedTableFactory(bloom_table));

    auto family_options = [&](cf c) {
      rocksdb::ColumnFamilyOptions o;
      o.write_buffer_size = opts_.write_buffer_bytes;
      o.compaction_style = rocksdb::kCompactionStyleLevel;
      o.level_compaction_dynamic_level_bytes = true;
      o.table_factory = point_lookup(c) ? bloom_factory : plain_factory;
      return o;
    };

    std::vector<rocksdb::ColumnFamilyDescriptor> descs;
    descs.emplace_back(rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions());
    for (cf c : all_families) descs.emplace_back(std::string(to_string(c)), family_options(c));

    // A family this build does not know (written by a newer provisiond) would
    // make DB::Open fail; open it with defaults and leave it alone.
    std::vector<std::string> existing;
    if (rocksdb::DB::ListColumnFamilies(db_opts, dir_, &existing).ok()) {
      for (auto& name : existing) {
        bool known = std::any_of(descs.begin(), descs.end(),
                                 [&](const auto& d) { return d.name == name; });
        if (!known) descs.emplace_back(name, rocksdb::ColumnFamilyOptions());
      }
    }

    rocksdb::Status s = rocksdb::DB::Open(db_opts, dir_, descs, &handles_, &db_);
    if (s.IsCorruption()) {
      db_ = nullptr;
      handles_.clear();
      // The recovery deletes the damaged logs once replayed: keep a copy
      // for whoever has to judge what happened.
      std::string kept;
      if (auto err = keep_wal_copy(kept))
        return {error_code::storage_failure,
                "storage: open of '" + dir_ + "' failed (" + s.ToString()
                  + ") and the write-ahead logs could not be copied aside before a recovery: "
                  + err.message};
      db_opts.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
      rocksdb::Status again = rocksdb::DB::Open(db_opts, dir_, descs, &handles_, &db_);
      if (!again.ok()) {
        db_ = nullptr;
        handles_.clear();
        return {error_code::storage_failure,
                "storage: open of '" + dir_ + "' failed: " + s.ToString()
                  + "; recovering to the last intact log record failed too: "
                  + again.ToString() + " (copy of the logs: " + kept + ")"};
      }
      recovery_note_ = "the write-ahead log was damaged after its last intact record ("
                       + s.ToString() + "); recovered up to that record; the damaged logs "
                       "are kept in " + kept;
      recovery_copy_ = kept;
      s = again;
    }
    if (!s.ok()) {
      db_ = nullptr;
      handles_.clear();
      return to_error(s, "open", dir_);
    }
    for (std::size_t i = 0; i < all_families.size(); ++i) by_cf_[i] = handles_[i + 1];

    try {
      writer_ = std::thread([this] { writer_loop(); });
      writer_id_ = writer_.get_id(); // before `out` is published: no race
    } catch (const std::exception& e) {
      return internal_error("starting the writer thread", dir_, e.what());
    }
    return {};
  }

  /// What open_db does, without a byte written to the directory: the WAL is
  /// replayed into memory only, a damaged one is an error (no recovery, no
  /// copy aside), and no writer thread runs.
  error open_read_only() {
    rocksdb::DBOptions db_opts;
    db_opts.paranoid_checks = true;
    // RocksDB's info LOG would be created (and an old one renamed) even here.
    db_opts.info_log = std::make_shared<silent_logger>();
    db_opts.wal_recovery_mode = rocksdb::WALRecoveryMode::kTolerateCorruptedTailRecords;
    std::vector<std::string> existing;
    rocksdb::Status s = rocksdb::DB::ListColumnFamilies(db_opts, dir_, &existing);
    if (!s.ok()) return to_error(s, "read-only open", dir_);
    // Unknown families (a newer provisiond's) are opened with defaults; a
    // family this build knows but the database lacks is simply empty.
    std::vector<rocksdb::ColumnFamilyDescriptor> descs;
    descs.emplace_back(rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions());
    for (cf c : all_families)
      if (std::find(existing.begin(), existing.end(), to_string(c)) != existing.end())
        descs.emplace_back(std::string(to_string(c)), rocksdb::ColumnFamilyOptions());
    for (auto& name : existing)
      if (std::none_of(descs.begin(), descs.end(), [&](const auto& d) { return d.name == name; }))
        descs.emplace_back(name, rocksdb::ColumnFamilyOptions());
    s = rocksdb::DB::OpenForReadOnly(db_opts, dir_, descs, &handles_, &db_);
    if (!s.ok()) {
      db_ = nullptr;
      handles_.clear();
      return to_error(s, "read-only open", dir_);
    }
    // A family the database lacks reads as the default one, which nothing
    // writes to: empty, as it would be once created.
    by_cf_.fill(handles_[0]);
    for (std::size_t i = 1; i < descs.size(); ++i)
      for (std::size_t f = 0; f < all_families.size(); ++f)
        if (descs[i].name == to_string(all_families[f])) by_cf_[f] = handles_[i];
    return {};
  }

  error get(cf family, std::string_view key, std::optional<std::string>& out) const override {
    out.reset();
    if (!valid(family)) return unknown_family(family);
    no_perf_counters();
    return guarded("get", dir_, [&]() -> error {
      rocksdb::PinnableSlice value;
      auto s = db_->Get(rocksdb::ReadOptions(), handle(family), slice(key), &value);
      if (s.IsNotFound()) return {};
      if (!s.ok()) return to_error(s, "get", dir_, &family);
      std::string_view raw(value.data(), value.size());
      if (!sealed_family(family)) {
        out.emplace(raw);
        return {};
      }
      if (!keyring::is_sealed(raw)) {
        if (migrated_) return not_sealed(family, key);
        out.emplace(raw);
        return {};
      }
      std::string plain;
      if (auto e = unseal(family, key, raw, plain)) return e;
      out.emplace(std::move(plain));
      return {};
    });
  }

  error scan(cf family, std::string_view start, std::size_t limit,
             const visit_fn& fn) const override {
    return scan_tolerant(family, start, limit, fn, nullptr);
  }

  error scan_tolerant(cf family, std::string_view start, std::size_t limit, const visit_fn& fn,
                      const unreadable_fn& unreadable) const override {
    if (!valid(family)) return unknown_family(family);
    no_perf_counters();
    return guarded("scan", dir_, [&]() -> error {
      std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handle(family)));
      std::size_t visited = 0;
      const bool sealed = sealed_family(family);
      std::string plain;
      for (it->Seek(slice(start)); it->Valid(); it->Next()) {
        auto k = it->key();
        auto v = it->value();
        ++visited;
        std::string_view key(k.data(), k.size()), value(v.data(), v.size());
        if (sealed && (migrated_ || keyring::is_sealed(value))) {
          auto e = keyring::is_sealed(value) ? unseal(family, key, value, plain)
                                             : not_sealed(family, key);
          if (e) {
            if (!unreadable) return e;
            if (!unreadable(key, e)) break;
            if (limit != 0 && visited >= limit) break;
            continue;
          }
          value = plain;
        }
        if (!fn(key, value)) break;
        if (limit != 0 && visited >= limit) break;
      }
      return to_error(it->status(), "scan", dir_, &family);
    });
  }

  error last_key(cf family, std::optional<std::string>& out) const override {
    out.reset();
    if (!valid(family)) return unknown_family(family);
    return guarded("last_key", dir_, [&]() -> error {
      std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handle(family)));
      it->SeekToLast();
      if (it->Valid()) out.emplace(it->key().data(), it->key().size());
      return to_error(it->status(), "last_key", dir_, &family);
    });
  }

  using store::write;
  error write(const write_batch& batch, durability d) override {
    no_perf_counters();
    return guarded("write", dir_, [&]() -> error {
      rocksdb::WriteBatch wb;
      if (auto e = append(wb, batch)) return e;
      rocksdb::WriteOptions wo;
      wo.sync = opts_.sync && d == durability::synced;
      return to_error(db_->Write(wo, &wb), "write", dir_);
    });
  }

  void commit(write_batch batch, done_fn done) override {
    if (opts_.read_only)
      return call_done(done, {error_code::internal, "storage: '" + dir_ + "' is open read-only"});
    // Reject a bad batch alone instead of failing the whole group it joins.
    for (const auto& op : batch.ops()) {
      if (!valid(op.family)) return call_done(done, unknown_family(op.family));
    }
    pending_batch p{std::move(batch), std::move(done)};
    bool accepted = false;
    try {
      std::lock_guard<std::mutex> lk(mu_);
      if (!stopping_) {
        queue_.push_back(std::move(p));
        accepted = true;
      }
    } catch (const std::exception& e) {
      return call_done(p.done, internal_error("commit", dir_, e.what()));
    }
    if (accepted) {
      cv_.notify_one();
    } else {
      call_done(p.done, {error_code::unavailable, "store closed"});
    }
  }

  void close() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stopping_ = true;
    }
    cv_.notify_one();
    // From a `done` callback: the writer exits after the current group; the
    // destructor joins it.
    if (std::this_thread::get_id() == writer_id_) return;
    std::lock_guard<std::mutex> lk(close_mu_);
    if (writer_.joinable()) writer_.join();
    // Without per-commit sync, make a clean shutdown durable at least.
    if (db_ && !opts_.sync && !wal_synced_) {
      (void)db_->FlushWAL(/*sync=*/true);
      wal_synced_ = true;
    }
  }

  uint64_t int_property(std::string_view name) const override {
    uint64_t sum = 0;
    for (int i = 0; i < cf_count; ++i)
      sum += int_property(static_cast<cf>(i), name);
    return sum;
  }

  uint64_t int_property(cf family, std::string_view name) const override {
    uint64_t v = 0;
    if (!valid(family) || db_ == nullptr)
      return 0;
    if (!db_->GetIntProperty(by_cf_[static_cast<int>(family)], slice(name), &v))
      return 0;
    return v;
  }

  std::string recovery_note() const override { return recovery_note_; }
  std::string recovery_copy_dir() const override { return recovery_copy_; }

  /// Copies the data dir's write-ahead logs to a sibling directory named
  /// after the newest log and its size, so a restart loop on the same
  /// damage reuses one copy instead of filling the disk. Written under a
  /// temporary name and renamed: a copy that exists is complete.
  error keep_wal_copy(std::string& where) const {
    namespace fs = std::filesystem;
    std::error_code ec;
    std::vector<fs::path> logs;
    for (fs::directory_iterator it(dir_, ec), end; !ec && it != end; it.increment(ec))
      if (it->path().extension() == ".log")
        logs.push_back(it->path());
    if (ec)
      return {error_code::storage_failure, dir_ + ": " + ec.message()};
    std::sort(logs.begin(), logs.end());
    std::string tag = "none";
    if (!logs.empty()) {
      auto size = fs::file_size(logs.back(), ec);
      tag = logs.back().stem().string() + "-" + std::to_string(ec ? 0 : size);
    }
    where = dir_ + ".wal-damaged-" + tag;
    if (fs::is_directory(where, ec))
      return {};
    const std::string partial = where + ".partial";
    fs::remove_all(partial, ec);
    ec.clear();
    fs::create_directories(partial, ec);
    for (const auto& log : logs) {
      if (ec)
        break;
      fs::copy_file(log, fs::path(partial) / log.filename(), ec);
    }
    if (!ec)
      fs::rename(partial, where, ec);
    if (ec) {
      std::error_code ignored;
      fs::remove_all(partial, ignored);
      return {error_code::storage_failure, where + ": " + ec.message()};
    }
    return {};
  }

  commit_stats stats() const override {
    std::lock_guard<std::mutex> lk(stats_mu_);
    return stats_;
  }

  error is_sealed(bool& out) const override {
    out = false;
    std::optional<std::string> check;
    if (auto e = get(cf::meta, check_key, check)) return e;
    out = check.has_value();
    return {};
  }

  error attach_keyring(std::shared_ptr<const keyring> k, bool reseal_all,
                       seal_report& report) override {
    report = {};
    if (!k) return internal_error("attach_keyring", dir_, "no keyring");
    return guarded("sealing stored secrets", dir_, [&]() -> error {
      std::optional<std::string> check;
      if (auto e = get(cf::meta, check_key, check)) return e;
      if (check) {
        std::string plain;
        if (auto e = k->open(*check, seal_aad(cf::meta, check_key), plain))
          return {e.code, "storage: data dir '" + dir_ + "' is sealed with key id " +
                            keyring::key_id_of(*check) + ", which " + k->source() +
                            " cannot open: " + e.message};
      }
      std::optional<std::string> migrated;
      if (auto e = get(cf::meta, migrated_key, migrated)) return e;
      keyring_ = std::move(k);
      // The check value goes first (synced), before any value is sealed: a
      // migration or rotation cut short leaves a data dir that says it is
      // sealed, so a lost key file refuses the start (app/secrets.cpp)
      // instead of a new key being created beside values it cannot open.
      if (!check || keyring::key_id_of(*check) != keyring_->active_id()) {
        rocksdb::WriteOptions wo;
        wo.sync = true;
        auto sealed = keyring_->seal(check_plain, seal_aad(cf::meta, check_key));
        if (auto e = to_error(db_->Put(wo, handle(cf::meta), slice(check_key), slice(sealed)),
                              "writing the secrets check value", dir_))
          return e;
      }
      // In chunks, so a large store is never held in memory at once.
      constexpr std::size_t chunk = 512;
      // Once a pass has completed, only a rotation scans everything again.
      for (cf c : all_families) {
        if (!sealed_family(c) || (migrated && !reseal_all)) continue;
        std::string from;
        for (;;) {
          write_batch wb;
          std::size_t seen = 0, moved = 0;
          std::string last;
          auto e = raw_scan(c, from, chunk, [&](std::string_view key, std::string_view value) {
            ++seen;
            last.assign(key);
            if (!keyring::is_sealed(value)) {
              wb.put(c, std::string(key), std::string(value));
              ++report.sealed;
            } else if (reseal_all && keyring::key_id_of(value) != keyring_->active_id()) {
              std::string plain;
              // One value that does not open must not stop the rotation of
              // the others: left as it is, and reported.
              if (auto why = unseal(c, key, value, plain)) {
                if (report.unreadable.size() < 1000)
                  report.unreadable.push_back(
                    {c, std::string(key), keyring::key_id_of(value), why.message});
                ++report.unreadable_total;
                return true;
              }
              wb.put(c, std::string(key), std::move(plain));
              ++moved;
            }
            return true;
          });
          if (e) return e;
          report.resealed += moved;
          if (!wb.empty()) {
            if (auto we = write(wb, durability::synced)) return we;
            if (opts_.on_seal_chunk) opts_.on_seal_chunk();
          }
          if (seen < chunk) break;
          from = last;
          from.push_back('\0');
        }
      }
      // The plaintext (or old-key) versions still sit in SST files until a
      // compaction drops them: flush and compact the families now, so the
      // files hold only what was just sealed.
      if (report.sealed + report.resealed > 0) {
        for (cf c : all_families) {
          if (!sealed_family(c)) continue;
          if (auto e = to_error(db_->Flush(rocksdb::FlushOptions(), handle(c)), "flush", dir_, &c))
            return e;
          rocksdb::CompactRangeOptions co;
          co.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForce;
          if (auto e = to_error(db_->CompactRange(co, handle(c), nullptr, nullptr), "compaction",
                                dir_, &c))
            return e;
        }
      }
      if (!migrated) {
        rocksdb::WriteOptions wo;
        wo.sync = true;
        if (auto e = to_error(db_->Put(wo, handle(cf::meta), slice(migrated_key), slice("1")),
                              "writing the secrets migration marker", dir_))
          return e;
      }
      migrated_ = true;
      return {};
    });
  }

  std::shared_ptr<const keyring> attached_keyring() const { return keyring_; }

  error count_key_usage(key_usage& out) const override {
    out = {};
    std::map<std::string, std::size_t> ids;
    for (cf c : all_families) {
      if (!sealed_family(c)) continue;
      auto e = raw_scan(c, "", 0, [&](std::string_view, std::string_view value) {
        if (keyring::is_sealed(value))
          ++ids[keyring::key_id_of(value)];
        else
          ++out.plaintext;
        return true;
      });
      if (e) return e;
    }
    out.by_key_id.assign(ids.begin(), ids.end());
    return {};
  }

private:
  struct pending_batch {
    write_batch batch;
    done_fn done;
  };

  /// A sealed value's plaintext; errors name the family and key (never the value).
  error unseal(cf family, std::string_view key, std::string_view sealed, std::string& out) const {
    if (!keyring_)
      return {error_code::storage_failure,
              "storage: " + std::string(to_string(family)) + " '" + std::string(key) +
                "' in '" + dir_ + "' is sealed, but no key file is loaded"};
    if (auto e = keyring_->open(sealed, seal_aad(family, key), out))
      return {e.code, "storage: " + std::string(to_string(family)) + " '" + std::string(key) +
                        "' in '" + dir_ + "': " + e.message};
    return {};
  }

  error not_sealed(cf family, std::string_view key) const {
    return {error_code::storage_failure,
            "storage: " + std::string(to_string(family)) + " '" + std::string(key) + "' in '" +
              dir_ + "' is not sealed, though every value of this data dir was (damaged, or "
              "written by something other than provisiond)"};
  }

  /// scan() without unsealing (migration and rotation see the envelopes).
  error raw_scan(cf family, std::string_view start, std::size_t limit, const visit_fn& fn) const {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handle(family)));
    std::size_t visited = 0;
    for (it->Seek(slice(start)); it->Valid(); it->Next()) {
      auto k = it->key();
      auto v = it->value();
      ++visited;
      if (!fn({k.data(), k.size()}, {v.data(), v.size()})) break;
      if (limit != 0 && visited >= limit) break;
    }
    return to_error(it->status(), "scan", dir_, &family);
  }

  rocksdb::ColumnFamilyHandle* handle(cf c) const noexcept {
    return by_cf_[static_cast<std::size_t>(c)];
  }

  error append(rocksdb::WriteBatch& wb, const write_batch& batch) const {
    std::string sealed;
    for (const auto& op : batch.ops()) {
      if (!valid(op.family)) return unknown_family(op.family);
      std::string_view value = op.value;
      if (!op.is_delete && keyring_ && sealed_family(op.family)) {
        sealed = keyring_->seal(value, seal_aad(op.family, op.key));
        value = sealed;
      }
      auto s = op.is_delete ? wb.Delete(handle(op.family), slice(op.key))
                            : wb.Put(handle(op.family), slice(op.key), slice(value));
      if (!s.ok()) return to_error(s, "building a write batch", dir_, &op.family);
    }
    return {};
  }

  void writer_loop() {
    pthread_setname_np(pthread_self(), "prov-store-wr");
    no_perf_counters();
    std::vector<pending_batch> group;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) break; // stopping and drained
      std::size_t n = std::min(queue_.size(), opts_.max_group_batches);
      group.clear();
      for (std::size_t i = 0; i < n; ++i) {
        group.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      lk.unlock();
      write_group(group);
      lk.lock();
    }
  }

  /// One merged batch, one (synced) write, every caller gets its result.
  /// Queue order is kept inside the merged batch, so a caller's later batch
  /// overwrites its earlier one.
  void write_group(std::vector<pending_batch>& group) noexcept {
    uint64_t bytes = 0;
    auto started = std::chrono::steady_clock::now();
    error result = guarded("commit", dir_, [&]() -> error {
      rocksdb::WriteBatch merged;
      for (const auto& p : group) {
        if (auto e = append(merged, p.batch)) return e;
        bytes += p.batch.bytes();
      }
      rocksdb::WriteOptions wo;
      wo.sync = opts_.sync;
      return to_error(db_->Write(wo, &merged), "commit", dir_);
    });
    if (result.ok()) {
      std::lock_guard<std::mutex> lk(stats_mu_);
      stats_.commits += 1;
      stats_.batches += group.size();
      stats_.bytes += bytes;
    }
    if (result.ok() && opts_.on_commit) {
      auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started);
      opts_.on_commit(secs.count(), group.size(), bytes);
    }
    for (auto& p : group) call_done(p.done, result);
    group.clear(); // release callbacks' captures now, not at the next group
  }

  const std::string dir_;
  store_options opts_;
  rocksdb::DB* db_ = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_; // [0] = default, then cf order, then unknown
  std::array<rocksdb::ColumnFamilyHandle*, cf_count> by_cf_{};

  std::mutex mu_; // guards queue_, stopping_
  std::condition_variable cv_;
  std::deque<pending_batch> queue_;
  bool stopping_ = false;

  std::mutex close_mu_; // serialises join in concurrent close() calls
  std::thread writer_;
  std::thread::id writer_id_;
  bool wal_synced_ = false;
  std::string recovery_note_; ///< set by open(), read-only after
  std::string recovery_copy_; ///< likewise

  mutable std::mutex stats_mu_;
  commit_stats stats_;
  /// Set by attach_keyring before other threads use the store; read-only after.
  std::shared_ptr<const keyring> keyring_;
  /// Likewise: the data dir's migration marker is set (see migrated_key).
  bool migrated_ = false;
};

} // namespace

std::string_view to_string(cf c) noexcept {
  switch (c) {
    case cf::meta: return "meta";
    case cf::enrollments: return "enrollments";
    case cf::groups: return "groups";
    case cf::registrations: return "registrations";
    case cf::operations: return "operations";
    case cf::pending: return "pending";
    case cf::outbox: return "outbox";
    case cf::tpm_challenges: return "tpm_challenges";
    case cf::certificates: return "certificates";
    case cf::hubs: return "hubs";
  }
  return "unknown";
}

bool sealed_family(cf c) noexcept {
  return c == cf::enrollments || c == cf::groups || c == cf::tpm_challenges ||
         c == cf::certificates;
}

error store::scan_tolerant(cf family, std::string_view start, std::size_t limit,
                           const visit_fn& fn, const unreadable_fn&) const {
  return scan(family, start, limit, fn);
}

error store::count_key_usage(key_usage& out) const {
  out = {};
  return {};
}

std::shared_ptr<const keyring> attached_keyring(const store& s) {
  auto* rs = dynamic_cast<const rocks_store*>(&s);
  return rs != nullptr ? rs->attached_keyring() : nullptr;
}

std::size_t write_batch::bytes() const noexcept {
  std::size_t n = 0;
  for (const auto& op : ops_) n += op.key.size() + op.value.size();
  return n;
}

error store::open(const std::string& dir, const store_options& opts,
                  std::unique_ptr<store>& out) {
  out.reset();
  return guarded("open", dir, [&]() -> error {
    auto s = std::make_unique<rocks_store>(dir, opts);
    if (auto e = s->open_db()) return e;
    out = std::move(s);
    return {};
  });
}

std::string seq_key(uint64_t seq) {
  std::string k(8, '\0');
  for (int i = 7; i >= 0; --i) {
    k[static_cast<std::size_t>(i)] = static_cast<char>(seq & 0xff);
    seq >>= 8;
  }
  return k;
}

uint64_t parse_seq_key(std::string_view key) {
  if (key.size() != 8) return 0;
  uint64_t v = 0;
  for (unsigned char c : key) v = (v << 8) | c;
  return v;
}

} // namespace prov::storage
