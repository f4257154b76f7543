#include "storage/store.hpp"

#include <doctest/doctest.h>

#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <future>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

using namespace prov;
using namespace prov::storage;

namespace {

/// A fresh directory under /tmp, removed (with the DB in it) on scope exit.
struct temp_dir {
  std::string path;
  temp_dir() {
    char tmpl[] = "/tmp/prov_store_test_XXXXXX";
    char* p = mkdtemp(tmpl);
    REQUIRE(p != nullptr);
    path = std::string(p) + "/db";
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(std::filesystem::path(path).parent_path(), ec);
  }
};

std::unique_ptr<store> open_ok(const std::string& dir, store_options opts = {}) {
  std::unique_ptr<store> s;
  auto e = store::open(dir, opts, s);
  INFO(e.message);
  REQUIRE(e.ok());
  REQUIRE(s != nullptr);
  return s;
}

std::optional<std::string> get(const store& s, cf family, std::string_view key) {
  std::optional<std::string> out;
  auto e = s.get(family, key, out);
  INFO(e.message);
  REQUIRE(e.ok());
  return out;
}

std::vector<std::string> keys(const store& s, cf family, std::string_view start = {},
                              std::size_t limit = 0) {
  std::vector<std::string> out;
  auto e = s.scan(family, start, limit, [&](std::string_view k, std::string_view) {
    out.emplace_back(k);
    return true;
  });
  REQUIRE(e.ok());
  return out;
}

/// Waits for N `done` callbacks; records the first failure.
struct completion {
  std::mutex mu;
  std::condition_variable cv;
  std::size_t done = 0;
  std::size_t failed = 0;
  std::string first_error;

  store::done_fn callback() {
    return [this](const error& e) {
      std::lock_guard<std::mutex> lk(mu);
      ++done;
      if (!e.ok() && failed++ == 0) first_error = e.message;
      cv.notify_all();
    };
  }
  bool wait(std::size_t n, std::chrono::seconds timeout = std::chrono::seconds(120)) {
    std::unique_lock<std::mutex> lk(mu);
    return cv.wait_for(lk, timeout, [&] { return done >= n; });
  }
};

// ---- crash-durability child ------------------------------------------------
// The child is this test binary re-executed (fork + execve) so it starts with
// no inherited RocksDB state or half-copied background threads: earlier test
// cases leave RocksDB's static thread pools running, which makes a plain
// fork() of this process unsafe. The hook runs before doctest's main.

constexpr const char* child_dir_env = "PROV_STORE_CRASH_CHILD_DIR";
constexpr const char* child_fd_env = "PROV_STORE_CRASH_CHILD_FD";
/// "commit" (group commit, synced) or "replayable" (write() not fsync'd).
constexpr const char* child_mode_env = "PROV_STORE_CRASH_CHILD_MODE";

[[noreturn]] void crash_child_main(const std::string& dir, int fd, const std::string& mode) {
  std::unique_ptr<store> s;
  if (auto e = store::open(dir, {}, s)) {
    std::fprintf(stderr, "crash child: %s\n", e.message.c_str());
    std::_Exit(2);
  }
  if (mode == "replayable") {
    // Not fsync'd, but in the WAL (the OS page cache) once write() returns:
    // a killed process loses nothing that was reported.
    for (uint64_t i = 0;; ++i) {
      write_batch b;
      b.put(cf::outbox, seq_key(i), "event-" + std::to_string(i));
      b.put(cf::pending, "op-" + std::to_string(i), "");
      if (s->write(b, store::durability::replayable)) std::_Exit(3);
      if (::write(fd, &i, sizeof i) != sizeof i) std::_Exit(4);
    }
  }
  // Bounded in-flight window so the producer cannot outrun the disk forever.
  std::mutex mu;
  std::condition_variable cv;
  uint64_t in_flight = 0;
  for (uint64_t i = 0;; ++i) {
    {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [&] { return in_flight < 256; });
      ++in_flight;
    }
    write_batch b;
    b.put(cf::outbox, seq_key(i), "event-" + std::to_string(i));
    b.put(cf::pending, "op-" + std::to_string(i), "");
    s->commit(std::move(b), [&, i](const error& e) {
      if (e) std::_Exit(3);
      // 8 bytes < PIPE_BUF: atomic. Reported only after `done`, i.e. durable.
      if (::write(fd, &i, sizeof i) != sizeof i) std::_Exit(4);
      std::lock_guard<std::mutex> lk(mu);
      --in_flight;
      cv.notify_one();
    });
  }
}

const bool crash_child_hook = [] {
  const char* dir = std::getenv(child_dir_env);
  const char* fd = std::getenv(child_fd_env);
  const char* mode = std::getenv(child_mode_env);
  if (dir && fd) crash_child_main(dir, std::atoi(fd), mode ? mode : "commit");
  return false;
}();

} // namespace

TEST_CASE("to_string names every column family; write_batch::bytes") {
  CHECK(to_string(cf::meta) == "meta");
  CHECK(to_string(cf::enrollments) == "enrollments");
  CHECK(to_string(cf::groups) == "groups");
  CHECK(to_string(cf::registrations) == "registrations");
  CHECK(to_string(cf::operations) == "operations");
  CHECK(to_string(cf::pending) == "pending");
  CHECK(to_string(cf::outbox) == "outbox");

  write_batch b;
  CHECK(b.empty());
  CHECK(b.bytes() == 0);
  b.put(cf::meta, "abc", "12345");
  b.del(cf::meta, "xy");
  CHECK(b.size() == 2);
  CHECK(b.bytes() == 10);
}

TEST_CASE("seq_key sorts numerically and round-trips") {
  CHECK(seq_key(1) < seq_key(256));
  CHECK(seq_key(256) < seq_key(65536));
  CHECK(seq_key(65536) < seq_key(UINT64_MAX));
  CHECK(seq_key(0).size() == 8);
  for (uint64_t v : {uint64_t{0}, uint64_t{1}, uint64_t{255}, uint64_t{256},
                     uint64_t{65536}, uint64_t{0x0102030405060708}, UINT64_MAX}) {
    CHECK(parse_seq_key(seq_key(v)) == v);
  }
  CHECK(parse_seq_key("short") == 0);
  CHECK(parse_seq_key("nine byte") == 0);
}

TEST_CASE("put, get and delete are per column family") {
  temp_dir d;
  auto s = open_ok(d.path);
  const cf all[] = {cf::meta,       cf::enrollments, cf::groups, cf::registrations,
                    cf::operations, cf::pending,     cf::outbox, cf::tpm_challenges,
                    cf::certificates};
  write_batch b;
  for (cf c : all) b.put(c, "same-key", "value-" + std::string(to_string(c)));
  REQUIRE(s->write(b).ok());
  for (cf c : all) CHECK(get(*s, c, "same-key") == "value-" + std::string(to_string(c)));

  write_batch del;
  del.del(cf::groups, "same-key");
  REQUIRE(s->write(del).ok());
  CHECK_FALSE(get(*s, cf::groups, "same-key"));
  CHECK(get(*s, cf::enrollments, "same-key") == "value-enrollments");

  // Keys are bytes, not C strings.
  write_batch bin;
  bin.put(cf::meta, std::string("a\0b", 3), std::string("x\0y", 3));
  REQUIRE(s->write(bin).ok());
  CHECK(get(*s, cf::meta, std::string("a\0b", 3)) == std::string("x\0y", 3));
  CHECK_FALSE(get(*s, cf::meta, "a"));
}

TEST_CASE("get of a missing key resets the optional") {
  temp_dir d;
  auto s = open_ok(d.path);
  std::optional<std::string> out = "stale";
  REQUIRE(s->get(cf::registrations, "nobody", out).ok());
  CHECK_FALSE(out.has_value());
}

TEST_CASE("scan: order, start key, limit, early stop, family isolation") {
  temp_dir d;
  auto s = open_ok(d.path);
  write_batch b;
  for (const char* k : {"d", "a", "e", "c", "b"}) b.put(cf::groups, k, std::string("v") + k);
  b.put(cf::enrollments, "aa", "other family");
  REQUIRE(s->write(b).ok());

  CHECK(keys(*s, cf::groups) == std::vector<std::string>{"a", "b", "c", "d", "e"});
  CHECK(keys(*s, cf::groups, "c") == std::vector<std::string>{"c", "d", "e"});
  CHECK(keys(*s, cf::groups, "bb") == std::vector<std::string>{"c", "d", "e"});
  CHECK(keys(*s, cf::groups, "", 2) == std::vector<std::string>{"a", "b"});
  CHECK(keys(*s, cf::groups, "d", 10) == std::vector<std::string>{"d", "e"});
  CHECK(keys(*s, cf::groups, "f").empty());
  CHECK(keys(*s, cf::operations).empty());

  std::vector<std::pair<std::string, std::string>> seen;
  REQUIRE(s->scan(cf::groups, "b", 0, [&](std::string_view k, std::string_view v) {
               seen.emplace_back(k, v);
               return seen.size() < 2;
             }).ok());
  REQUIRE(seen.size() == 2);
  CHECK(seen[0] == std::pair<std::string, std::string>{"b", "vb"});
  CHECK(seen[1] == std::pair<std::string, std::string>{"c", "vc"});
}

TEST_CASE("scan turns a throwing visitor into an error") {
  temp_dir d;
  auto s = open_ok(d.path);
  write_batch b;
  b.put(cf::meta, "k", "v");
  REQUIRE(s->write(b).ok());
  auto e = s->scan(cf::meta, "", 0, [](std::string_view, std::string_view) -> bool {
    throw std::runtime_error("visitor blew up");
  });
  CHECK(e.code == error_code::internal);
  CHECK(e.message.find("visitor blew up") != std::string::npos);
}

TEST_CASE("last_key") {
  temp_dir d;
  auto s = open_ok(d.path);
  std::optional<std::string> out = "stale";
  REQUIRE(s->last_key(cf::outbox, out).ok());
  CHECK_FALSE(out);

  write_batch b;
  for (uint64_t v : {uint64_t{65536}, uint64_t{1}, uint64_t{256}}) b.put(cf::outbox, seq_key(v), "e");
  b.put(cf::pending, "zzz", ""); // another family's keys do not count
  REQUIRE(s->write(b).ok());
  REQUIRE(s->last_key(cf::outbox, out).ok());
  REQUIRE(out);
  CHECK(parse_seq_key(*out) == 65536);
  CHECK(keys(*s, cf::outbox) ==
        std::vector<std::string>{seq_key(1), seq_key(256), seq_key(65536)});
}

TEST_CASE("a batch is atomic") {
  temp_dir d;
  auto s = open_ok(d.path);

  SUBCASE("a batch with an invalid op applies nothing") {
    write_batch b;
    b.put(cf::registrations, "r1", "x");
    b.put(static_cast<cf>(42), "bad", "x");
    auto e = s->write(b);
    CHECK(e.code == error_code::internal);
    CHECK_FALSE(get(*s, cf::registrations, "r1"));

    std::promise<error> p;
    s->commit(b, [&](const error& err) { p.set_value(err); });
    CHECK(p.get_future().get().code == error_code::internal);
    CHECK_FALSE(get(*s, cf::registrations, "r1"));
  }

  SUBCASE("readers never see half a batch") {
    // Each batch moves both keys to the same value; an iterator (implicit
    // snapshot) must always see them equal.
    std::atomic<bool> stop{false};
    std::atomic<int> torn{0}, reads{0};
    {
      write_batch b;
      b.put(cf::operations, "a", "0");
      b.put(cf::operations, "b", "0");
      REQUIRE(s->write(b).ok());
    }
    std::thread reader([&] {
      while (!stop) {
        std::vector<std::string> vals;
        auto e = s->scan(cf::operations, "", 0, [&](std::string_view, std::string_view v) {
          vals.emplace_back(v);
          return true;
        });
        if (!e.ok() || vals.size() != 2 || vals[0] != vals[1]) ++torn;
        ++reads;
      }
    });
    for (int i = 1; i <= 2000; ++i) {
      write_batch b;
      b.put(cf::operations, "a", std::to_string(i));
      b.put(cf::operations, "b", std::to_string(i));
      REQUIRE(s->write(b).ok());
    }
    stop = true;
    reader.join();
    CHECK(torn == 0);
    CHECK(reads > 0);
  }
}

TEST_CASE("data persists across close and reopen") {
  temp_dir d;
  {
    auto s = open_ok(d.path);
    write_batch b;
    b.put(cf::enrollments, "dev-1", R"({"registrationId":"dev-1"})");
    b.put(cf::meta, "schema", "1");
    REQUIRE(s->write(b).ok());
    completion c;
    write_batch b2;
    b2.put(cf::registrations, "dev-1", "assigned");
    s->commit(std::move(b2), c.callback());
    s->close();
    REQUIRE(c.wait(1));
    CHECK(c.failed == 0);
  }
  auto s = open_ok(d.path);
  CHECK(get(*s, cf::enrollments, "dev-1") == R"({"registrationId":"dev-1"})");
  CHECK(get(*s, cf::meta, "schema") == "1");
  CHECK(get(*s, cf::registrations, "dev-1") == "assigned");
}

namespace {

/// The newest WAL file of a data dir.
std::filesystem::path newest_wal(const std::string& dir) {
  std::filesystem::path best;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ".log" && (best.empty() || e.path().filename() > best.filename()))
      best = e.path();
  return best;
}

} // namespace

TEST_CASE("a power loss that tears the unsynced WAL tail: the store opens with every synced write") {
  // Replayable writes (Kafka table readers) are not fsync'd, so after a
  // machine crash the WAL can end anywhere after the last synced write:
  // cut short, mid-record, or, where the size grew but the data never
  // reached the disk, zeros or stale bytes.
  // Open must then succeed, keeping every synced write and a prefix of the
  // rest, never refuse the data dir.
  temp_dir d;
  constexpr int synced = 200, replayable = 1000;
  auto value = [](int i) { return (i < synced ? "synced-" : "replayable-") + std::to_string(i)
                                  + std::string(static_cast<std::size_t>(i % 97), 'x'); };
  auto s = open_ok(d.path);
  for (int i = 0; i < synced; ++i) {
    write_batch b;
    b.put(cf::outbox, seq_key(static_cast<uint64_t>(i)), value(i));
    REQUIRE(s->write(b, store::durability::synced).ok());
  }
  const auto wal = newest_wal(d.path);
  REQUIRE(!wal.empty());
  const auto synced_end = std::filesystem::file_size(wal);
  for (int i = synced; i < synced + replayable; ++i) {
    write_batch b;
    b.put(cf::outbox, seq_key(static_cast<uint64_t>(i)), value(i));
    b.put(cf::meta, "position", std::to_string(i)); // as a table reader's batch
    REQUIRE(s->write(b, store::durability::replayable).ok());
  }
  const auto end = std::filesystem::file_size(wal);
  REQUIRE(end > synced_end + 32768); // spans WAL blocks (32 KiB)
  // The image a crash leaves: the files as written so far (page cache).
  const std::string image = d.path + "-image";
  std::filesystem::copy(d.path, image);
  s->close();
  s.reset();

  int recovered = 0;
  const std::uintmax_t block = 32768;
  const std::uintmax_t first_block_end = (synced_end / block + 1) * block;
  const std::vector<std::uintmax_t> cuts = {synced_end,          synced_end + 1,
                                            synced_end + 7,      synced_end + 100,
                                            first_block_end - 3, first_block_end,
                                            first_block_end + 5, (synced_end + end) / 2,
                                            end - 1};
  enum class tail { cut, zeros, stale }; // stale: old blocks' bytes, not ours
  for (tail how : {tail::cut, tail::zeros, tail::stale}) {
    for (auto cut : cuts) {
      CAPTURE(static_cast<int>(how));
      CAPTURE(cut);
      const std::string crashed = d.path + "-crashed";
      std::filesystem::remove_all(crashed);
      std::filesystem::copy(image, crashed);
      const auto crashed_wal = std::filesystem::path(crashed) / wal.filename();
      if (how == tail::cut) {
        std::filesystem::resize_file(crashed_wal, cut);
      } else { // same size, everything from the cut on never reached the disk
        std::string junk(static_cast<std::size_t>(end - cut), '\0');
        if (how == tail::stale) {
          uint32_t x = static_cast<uint32_t>(cut) | 1u; // xorshift: fixed per cut
          for (auto& c : junk) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            c = static_cast<char>(x);
          }
        }
        std::FILE* f = std::fopen(crashed_wal.c_str(), "r+b");
        REQUIRE(f != nullptr);
        REQUIRE(std::fseek(f, static_cast<long>(cut), SEEK_SET) == 0);
        REQUIRE(std::fwrite(junk.data(), 1, junk.size(), f) == junk.size());
        std::fclose(f);
      }
      auto r = open_ok(crashed);
      // A torn tail record is no damage; zeros usually are (at a record
      // boundary the strict mode takes them as the end). Damage is recovered
      // from, said, and the logs as found are kept.
      const auto note = r->recovery_note();
      if (how == tail::cut)
        CHECK(note.empty());
      CHECK(note.empty() == r->recovery_copy_dir().empty());
      if (!note.empty()) {
        ++recovered;
        const std::filesystem::path kept = r->recovery_copy_dir();
        CHECK(note.find(kept.string()) != std::string::npos);
        CHECK(std::filesystem::file_size(kept / wal.filename()) == end);
        std::filesystem::remove_all(kept);
      }
      int present = 0;
      REQUIRE(r->scan(cf::outbox, "", 0, [&](std::string_view k, std::string_view v) {
                 auto i = static_cast<int>(parse_seq_key(k));
                 CHECK(i == present); // no gaps: a prefix of what was written
                 CHECK(v == value(i));
                 ++present;
                 return true;
               }).ok());
      CHECK(present >= synced);
      if (present > synced)
        CHECK(get(*r, cf::meta, "position") == std::to_string(present - 1));
      r->close();
    }
  }
  CHECK(recovered >= 10); // most zero-filled and stale tails need the recovery
  std::filesystem::remove_all(image);
  std::filesystem::remove_all(d.path + "-crashed");
}

TEST_CASE("group commit: 8 threads x 2000 batches all complete and persist") {
  temp_dir d;
  constexpr int threads = 8, per_thread = 2000;
  completion c;
  commit_stats st;
  double seconds = 0;
  {
    auto s = open_ok(d.path); // sync = true
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        for (int i = 0; i < per_thread; ++i) {
          write_batch b;
          std::string id = "t" + std::to_string(t) + "-" + std::to_string(i);
          b.put(cf::registrations, id, "value-" + id);
          b.put(cf::operations, "op-" + id, "assigning");
          s->commit(std::move(b), c.callback());
        }
      });
    }
    for (auto& t : ts) t.join();
    REQUIRE(c.wait(threads * per_thread));
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    st = s->stats();
  }
  CHECK(c.failed == 0);
  CHECK(c.done == threads * per_thread);
  CHECK(st.batches == threads * per_thread);
  CHECK(st.commits >= 1);
  CHECK(st.commits < st.batches); // batches were actually grouped
  CHECK(st.bytes > 0);
  MESSAGE("group commit (sync=true): " << st.batches << " batches in " << st.commits
                                       << " writes, " << seconds << " s, "
                                       << static_cast<int>(st.batches / seconds) << " batches/s");

  auto s = open_ok(d.path);
  CHECK(keys(*s, cf::registrations).size() == threads * per_thread);
  CHECK(keys(*s, cf::operations).size() == threads * per_thread);
  for (int t = 0; t < threads; ++t) {
    std::string id = "t" + std::to_string(t) + "-" + std::to_string(per_thread - 1);
    CHECK(get(*s, cf::registrations, id) == "value-" + id);
  }
}

TEST_CASE("synchronous write() baseline (sync=true)") {
  temp_dir d;
  auto s = open_ok(d.path);
  constexpr int n = 200;
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) {
    write_batch b;
    b.put(cf::registrations, "k" + std::to_string(i), "v");
    REQUIRE(s->write(b).ok());
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  MESSAGE("write() (sync=true, one thread): " << static_cast<int>(n / seconds) << " batches/s");
}

TEST_CASE("commits from one caller apply in call order") {
  temp_dir d;
  completion c;
  {
    auto s = open_ok(d.path);
    for (int i = 0; i < 500; ++i) {
      std::string k = "k" + std::to_string(i);
      write_batch first, second;
      first.put(cf::registrations, k, "first");
      second.put(cf::registrations, k, "second");
      s->commit(std::move(first), c.callback());
      s->commit(std::move(second), c.callback());
      // put then delete: the delete wins.
      write_batch put, del;
      put.put(cf::pending, k, "");
      del.del(cf::pending, k);
      s->commit(std::move(put), c.callback());
      s->commit(std::move(del), c.callback());
    }
    REQUIRE(c.wait(2000));
    CHECK(c.failed == 0);
    for (int i = 0; i < 500; ++i)
      CHECK(get(*s, cf::registrations, "k" + std::to_string(i)) == "second");
    CHECK(keys(*s, cf::pending).empty());
  }
}

TEST_CASE("done runs in submission order for one caller") {
  temp_dir d;
  auto s = open_ok(d.path);
  std::mutex mu;
  std::vector<int> order;
  completion c;
  for (int i = 0; i < 1000; ++i) {
    write_batch b;
    b.put(cf::outbox, seq_key(static_cast<uint64_t>(i)), "e");
    auto cb = c.callback();
    s->commit(std::move(b), [&, i, cb](const error& e) {
      {
        std::lock_guard<std::mutex> lk(mu);
        order.push_back(i);
      }
      cb(e);
    });
  }
  REQUIRE(c.wait(1000));
  std::lock_guard<std::mutex> lk(mu);
  REQUIRE(order.size() == 1000);
  for (int i = 0; i < 1000; ++i) CHECK(order[static_cast<std::size_t>(i)] == i);
}

TEST_CASE("a second open of the same dir fails clearly while the first is open") {
  temp_dir d;
  auto first = open_ok(d.path);
  std::unique_ptr<store> second;
  auto e = store::open(d.path, {}, second);
  CHECK(e.code == error_code::storage_failure);
  CHECK(second == nullptr);
  INFO(e.message);
  CHECK(e.message.find("another provisiond may be running") != std::string::npos);
  CHECK(e.message.find(d.path) != std::string::npos);

  first.reset();
  auto again = open_ok(d.path); // the lock went with the first store
}

TEST_CASE("open fails with the directory named when it cannot be created") {
  temp_dir d;
  std::filesystem::create_directories(std::filesystem::path(d.path).parent_path());
  std::FILE* f = std::fopen(d.path.c_str(), "w"); // a file where the dir should be
  REQUIRE(f);
  std::fclose(f);
  std::unique_ptr<store> s;
  auto e = store::open(d.path, {}, s);
  CHECK(e.code == error_code::storage_failure);
  CHECK(e.message.find(d.path) != std::string::npos);
  CHECK(s == nullptr);
}

TEST_CASE("commits after close fail fast; close is idempotent; reads still work") {
  temp_dir d;
  auto s = open_ok(d.path);
  completion before;
  write_batch b;
  b.put(cf::meta, "k", "v");
  s->commit(std::move(b), before.callback());
  s->close();
  s->close();
  REQUIRE(before.wait(1, std::chrono::seconds(5))); // drained, not dropped
  CHECK(before.failed == 0);

  std::promise<error> p;
  auto f = p.get_future();
  write_batch late;
  late.put(cf::meta, "late", "v");
  s->commit(std::move(late), [&](const error& e) { p.set_value(e); });
  REQUIRE(f.wait_for(std::chrono::seconds(5)) == std::future_status::ready);
  auto e = f.get();
  CHECK(e.code == error_code::unavailable);
  CHECK(e.message == "store closed");
  CHECK(get(*s, cf::meta, "k") == "v");
  CHECK_FALSE(get(*s, cf::meta, "late"));
}

TEST_CASE("close from concurrent threads while commits are in flight") {
  temp_dir d;
  auto s = open_ok(d.path);
  completion c;
  constexpr int n = 5000;
  std::thread producer([&] {
    for (int i = 0; i < n; ++i) {
      write_batch b;
      b.put(cf::pending, "p" + std::to_string(i), "");
      s->commit(std::move(b), c.callback());
    }
  });
  std::thread closer1([&] { s->close(); });
  std::thread closer2([&] { s->close(); });
  producer.join();
  closer1.join();
  closer2.join();
  // Every commit got an answer: written, or "store closed".
  REQUIRE(c.wait(n, std::chrono::seconds(30)));
  CHECK(c.done == n);
  auto st = s->stats();
  CHECK(st.batches + c.failed == n);
}

namespace {

/// Runs the crash child in `mode` until it reported 3,000 writes done, kills
/// it with SIGKILL, and checks every reported write is in the reopened store.
void check_survives_sigkill(const std::string& mode) {
  temp_dir d;
  std::filesystem::create_directories(std::filesystem::path(d.path).parent_path());
  int fds[2];
  REQUIRE(::pipe(fds) == 0);

  // Everything the child needs is built before fork: between fork and
  // execve only async-signal-safe calls.
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) env_strings.emplace_back(*e);
  env_strings.push_back(std::string(child_dir_env) + "=" + d.path);
  env_strings.push_back(std::string(child_fd_env) + "=" + std::to_string(fds[1]));
  env_strings.push_back(std::string(child_mode_env) + "=" + mode);
  std::vector<char*> envp;
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  char arg0[] = "store_crash_child";
  char* argv[] = {arg0, nullptr};

  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(fds[0]);
    ::execve("/proc/self/exe", argv, envp.data());
    ::_exit(127);
  }
  ::close(fds[1]);

  std::vector<uint64_t> reported;
  bool tried_second_open = false;
  std::string second_open_error;
  constexpr std::size_t want = 3000;
  while (reported.size() < want) {
    pollfd p{fds[0], POLLIN, 0};
    int r = ::poll(&p, 1, 30000);
    if (r <= 0) break; // timeout: fail below
    uint64_t idx = 0;
    ssize_t n = ::read(fds[0], &idx, sizeof idx);
    if (n != static_cast<ssize_t>(sizeof idx)) break; // child died
    reported.push_back(idx);
    if (!tried_second_open && reported.size() == 100) {
      // Cross-process lock: the child holds the DB right now.
      tried_second_open = true;
      std::unique_ptr<store> s;
      auto e = store::open(d.path, {}, s);
      second_open_error = e.message;
      CHECK(e.code == error_code::storage_failure);
      CHECK(s == nullptr);
    }
  }
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  ::close(fds[0]);

  INFO("second open: " << second_open_error);
  CHECK(second_open_error.find("another provisiond may be running") != std::string::npos);
  REQUIRE(reported.size() == want);
  CHECK(WIFSIGNALED(status));
  // One producer, one writer: done order is submission order.
  for (std::size_t i = 0; i < reported.size(); ++i) REQUIRE(reported[i] == i);

  auto s = open_ok(d.path);
  std::set<uint64_t> present;
  REQUIRE(s->scan(cf::outbox, "", 0, [&](std::string_view k, std::string_view v) {
               uint64_t i = parse_seq_key(k);
               if (v == "event-" + std::to_string(i)) present.insert(i);
               return true;
             }).ok());
  std::size_t missing = 0;
  for (uint64_t i : reported) {
    if (!present.count(i)) ++missing;
  }
  CHECK(missing == 0);
  for (uint64_t i : {uint64_t{0}, uint64_t{want / 2}, uint64_t{want - 1}})
    CHECK(get(*s, cf::pending, "op-" + std::to_string(i)) == "");
  MESSAGE("crash test (" << mode << "): " << reported.size() << " reported done, "
                         << present.size() << " present after SIGKILL");
}

} // namespace

TEST_CASE("every commit reported done survives SIGKILL") {
  check_survives_sigkill("commit");
}

TEST_CASE("every replayable (unsynced) write survives SIGKILL") {
  // Kafka table readers write this way (actors/replication.cpp).
  check_survives_sigkill("replayable");
}

TEST_CASE("store: read_only opens beside a writer, reads what it wrote, writes nothing") {
  temp_dir d;
  auto w = open_ok(d.path);
  write_batch b;
  b.put(cf::enrollments, "ro-dev", R"({"registrationId":"ro-dev"})");
  REQUIRE(w->write(b).ok());
  store_options ro;
  ro.read_only = true;
  // The writer still holds the lock: a read-only open does not need it.
  auto r = open_ok(d.path, ro);
  CHECK(get(*r, cf::enrollments, "ro-dev").has_value());
  CHECK(keys(*r, cf::hubs).empty());
  CHECK_FALSE(r->write(b).ok());
  bool done = false;
  error got;
  r->commit(b, [&](const error& e) {
    done = true;
    got = e;
  });
  CHECK(done);
  CHECK_FALSE(got.ok());
  r.reset();
  w.reset();
  // A missing database is an error, and nothing is created.
  std::unique_ptr<store> none;
  CHECK_FALSE(store::open(d.path + "-missing", ro, none).ok());
  CHECK_FALSE(std::filesystem::exists(d.path + "-missing"));
}
