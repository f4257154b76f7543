// Secrets at rest: the keyring's AES-256-GCM envelopes and the store sealing
// its secret-bearing families, over a real RocksDB in a temp dir whose files
// are scanned for the key bytes.

#include "storage/keyring.hpp"
#include "storage/store.hpp"

#include <doctest/doctest.h>

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "messages/crypto.hpp"

using namespace prov;
using namespace prov::storage;
namespace fs = std::filesystem;

namespace {

struct temp_dir {
  std::string path;
  temp_dir() {
    char tmpl[] = "/tmp/prov_secrets_test_XXXXXX";
    char* p = mkdtemp(tmpl);
    REQUIRE(p != nullptr);
    path = p;
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string db() const { return path + "/db"; }
  std::string keys() const { return path + "/secrets.key"; }
};

std::shared_ptr<const keyring> make_ring(const std::string& path) {
  std::shared_ptr<const keyring> r;
  auto e = keyring::create(path, r);
  INFO(e.message);
  REQUIRE(e.ok());
  return r;
}

std::unique_ptr<store> open_store(const std::string& dir) {
  std::unique_ptr<store> s;
  auto e = store::open(dir, {}, s);
  INFO(e.message);
  REQUIRE(e.ok());
  return s;
}

std::unique_ptr<store> open_sealed(const std::string& dir, std::shared_ptr<const keyring> r,
                                   seal_report* rep = nullptr, bool reseal = false) {
  auto s = open_store(dir);
  seal_report local;
  auto e = s->attach_keyring(std::move(r), reseal, rep ? *rep : local);
  INFO(e.message);
  REQUIRE(e.ok());
  return s;
}

/// An enrollment document as the service API stores it, with its keys.
struct secret_doc {
  std::string raw_key = crypto::random_bytes(64);
  std::string b64 = crypto::base64_encode(raw_key);
  std::string json(const std::string& id) const {
    return R"({"registrationId":")" + id +
           R"(","attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":")" + b64 +
           R"(","secondaryKey":")" + b64 + R"("}}})";
  }
};

/// Every file under `dir` (SSTs, WAL, MANIFEST, ...) that contains `needle`.
std::string files_containing(const std::string& dir, const std::string& needle) {
  std::string hits;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    std::ifstream in(e.path(), std::ios::binary);
    std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (data.find(needle) != std::string::npos) hits += e.path().string() + "\n";
  }
  return hits;
}

std::string get_ok(const store& s, cf family, const std::string& key) {
  std::optional<std::string> out;
  auto e = s.get(family, key, out);
  INFO(e.message);
  REQUIRE(e.ok());
  REQUIRE(out.has_value());
  return *out;
}

} // namespace

TEST_SUITE("secrets") {

TEST_CASE("the key file is created 0600 and a sealed value opens only where it was sealed") {
  temp_dir d;
  auto r = make_ring(d.keys());
  struct stat st {};
  REQUIRE(::stat(d.keys().c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(r->active_id().size() == 16);

  auto sealed = r->seal("hello", "enrollments/dev1");
  CHECK(keyring::is_sealed(sealed));
  CHECK(keyring::key_id_of(sealed) == r->active_id());
  CHECK(sealed.find("hello") == std::string::npos);
  std::string out;
  REQUIRE(r->open(sealed, "enrollments/dev1", out).ok());
  CHECK(out == "hello");
  // Same plaintext, fresh nonce: no two envelopes alike.
  CHECK(r->seal("hello", "enrollments/dev1") != sealed);

  // Moved to another key: the authenticated data differs.
  auto moved = r->open(sealed, "enrollments/dev2", out);
  CHECK(moved.code == error_code::storage_failure);
  CHECK(moved.message.find("failed authentication") != std::string::npos);
  // Every single flipped bit of nonce, ciphertext or tag is caught.
  for (std::size_t i = 5 + r->active_id().size(); i < sealed.size(); ++i) {
    auto bad = sealed;
    bad[i] = static_cast<char>(bad[i] ^ 0x01);
    auto e = r->open(bad, "enrollments/dev1", out);
    CHECK_MESSAGE(e.message.find("failed authentication") != std::string::npos, i);
    CHECK(out.empty());
  }
  // Every flipped bit of the id length and of the id is caught too, and the
  // message stays printable: never the raw damaged bytes (a JSON dump of a
  // message with invalid UTF-8 throws).
  for (std::size_t i = 4; i < 5 + r->active_id().size(); ++i)
    for (int bit = 0; bit < 8; ++bit) {
      auto bad = sealed;
      bad[i] = static_cast<char>(bad[i] ^ (1 << bit));
      auto e = r->open(bad, "enrollments/dev1", out);
      CHECK_MESSAGE(e.code == error_code::storage_failure, i << "/" << bit);
      CHECK(out.empty());
      for (unsigned char c : e.message)
        CHECK_MESSAGE((c >= 0x20 && c < 0x7f), i << "/" << bit << ": " << e.message);
      for (unsigned char c : keyring::key_id_of(bad))
        CHECK_MESSAGE((c >= 0x20 && c < 0x7f), i << "/" << bit);
      CHECK(keyring::key_id_of(bad) != r->active_id());
    }
  // Truncated.
  CHECK(r->open(sealed.substr(0, 20), "enrollments/dev1", out).message.find("malformed") !=
        std::string::npos);

  // The same file loads to the same key.
  std::shared_ptr<const keyring> again;
  REQUIRE(keyring::load(d.keys(), again).ok());
  REQUIRE(again->open(sealed, "enrollments/dev1", out).ok());
  CHECK(out == "hello");
  // A different key file names the key id it lacks and itself.
  auto other = make_ring(d.path + "/other.key");
  auto e = other->open(sealed, "enrollments/dev1", out);
  CHECK(e.message.find(r->active_id()) != std::string::npos);
  CHECK(e.message.find(d.path + "/other.key") != std::string::npos);
  // create never overwrites.
  std::shared_ptr<const keyring> dup;
  CHECK(keyring::create(d.keys(), dup).message.find(d.keys()) != std::string::npos);
}

TEST_CASE("a key file others can read, or a damaged one, is refused naming the file") {
  temp_dir d;
  make_ring(d.keys());
  REQUIRE(::chmod(d.keys().c_str(), 0644) == 0);
  std::shared_ptr<const keyring> r;
  auto e = keyring::load(d.keys(), r);
  CHECK(e.message.find(d.keys()) != std::string::npos);
  CHECK(e.message.find("mode 0644") != std::string::npos);
  REQUIRE(::chmod(d.keys().c_str(), 0600) == 0);
  REQUIRE(keyring::load(d.keys(), r).ok());

  // One changed character in the key: its id no longer matches.
  std::ifstream in(d.keys());
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto at = text.rfind(' ') + 3;
  text[at] = text[at] == 'A' ? 'B' : 'A';
  std::ofstream(d.keys(), std::ios::trunc) << text;
  e = keyring::load(d.keys(), r);
  CHECK(e.message.find(d.keys()) != std::string::npos);
  CHECK((e.message.find("does not match its key") != std::string::npos ||
         e.message.find("not base64") != std::string::npos));

  e = keyring::load(d.path + "/missing.key", r);
  CHECK(e.message.find(d.path + "/missing.key") != std::string::npos);
}

/// Runs `fn` in a child process that the kernel kills (SIGXFSZ) at its first
/// write() of a byte to any file: a crash between open() and write().
template <class Fn>
void crash_at_first_write(Fn&& fn) {
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::signal(SIGXFSZ, SIG_DFL);
    struct rlimit none {0, 0};
    ::setrlimit(RLIMIT_CORE, &none);
    ::setrlimit(RLIMIT_FSIZE, &none);
    fn();
    ::_exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGXFSZ);
}

TEST_CASE("a crash while the key file is written leaves no truncated key file") {
  temp_dir d;
  crash_at_first_write([&] {
    std::shared_ptr<const keyring> r;
    (void)keyring::create(d.keys(), r);
  });
  // The next start creates the key file as if the crashed one never ran.
  CHECK(!fs::exists(d.keys()));
  auto r = make_ring(d.keys());
  CHECK(!fs::exists(d.keys() + ".tmp"));
  std::shared_ptr<const keyring> loaded;
  REQUIRE(keyring::load(d.keys(), loaded).ok());
  CHECK(loaded->active_id() == r->active_id());

  // A rotation that crashes keeps the old file whole; the next one works.
  crash_at_first_write([&] {
    std::shared_ptr<const keyring> x;
    (void)keyring::add_key(d.keys(), x);
  });
  REQUIRE(keyring::load(d.keys(), loaded).ok());
  CHECK(loaded->ids() == r->ids());
  std::shared_ptr<const keyring> rotated;
  auto e = keyring::add_key(d.keys(), rotated);
  INFO(e.message);
  REQUIRE(e.ok());
  CHECK(rotated->ids().size() == 2);
  CHECK(!fs::exists(d.keys() + ".tmp"));

  // A link planted at the .tmp name is removed, not written through.
  const std::string victim = d.path + "/victim";
  std::ofstream(victim) << "untouched";
  fs::remove(d.keys());
  fs::create_symlink(victim, d.keys() + ".tmp");
  make_ring(d.keys());
  std::ifstream in(victim);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(text == "untouched");
  CHECK(!fs::is_symlink(d.keys()));
}

TEST_CASE("no key bytes reach RocksDB's files, in the WAL or in SST files") {
  temp_dir d;
  auto r = make_ring(d.keys());
  secret_doc doc;
  {
    auto s = open_sealed(d.db(), r);
    write_batch b;
    b.put(cf::enrollments, "dev1", doc.json("dev1"));
    b.put(cf::groups, "grp1", doc.json("grp1"));
    b.put(cf::certificates, "ca1", doc.json("ca1"));
    REQUIRE(s->write(b).ok());
    CHECK(get_ok(*s, cf::enrollments, "dev1") == doc.json("dev1"));
    // The WAL now holds the writes.
    CHECK_MESSAGE(files_containing(d.db(), doc.b64).empty(), files_containing(d.db(), doc.b64));
    CHECK(files_containing(d.db(), doc.raw_key).empty());
    CHECK(files_containing(d.db(), "registrationId").empty());
  }
  {
    // Reopening flushes the recovered memtable into an SST file.
    auto s = open_sealed(d.db(), r);
    bool any_sst = false;
    for (const auto& e : fs::directory_iterator(d.db()))
      any_sst = any_sst || e.path().extension() == ".sst";
    CHECK(any_sst);
    CHECK_MESSAGE(files_containing(d.db(), doc.b64).empty(), files_containing(d.db(), doc.b64));
    CHECK(files_containing(d.db(), doc.raw_key).empty());
    CHECK(get_ok(*s, cf::groups, "grp1") == doc.json("grp1"));
    std::size_t seen = 0;
    REQUIRE(s->scan(cf::enrollments, "", 0, [&](std::string_view k, std::string_view v) {
                 CHECK(k == "dev1");
                 CHECK(v == doc.json("dev1"));
                 ++seen;
                 return true;
               }).ok());
    CHECK(seen == 1);
  }
}

TEST_CASE("a plaintext store left by an older version is sealed on open, files included") {
  temp_dir d;
  secret_doc doc;
  {
    auto s = open_store(d.db()); // no keyring: what 0.x wrote
    write_batch b;
    for (int i = 0; i < 1200; ++i) // more than one migration chunk
      b.put(cf::enrollments, "dev" + std::to_string(i), doc.json("dev" + std::to_string(i)));
    b.put(cf::registrations, "dev1", "not a secret");
    REQUIRE(s->write(b).ok());
  }
  CHECK(!files_containing(d.db(), doc.b64).empty()); // the test can see plaintext
  auto r = make_ring(d.keys());
  seal_report rep;
  {
    auto s = open_sealed(d.db(), r, &rep);
    CHECK(rep.sealed == 1200);
    bool sealed = false;
    REQUIRE(s->is_sealed(sealed).ok());
    CHECK(sealed);
    CHECK(get_ok(*s, cf::enrollments, "dev1199") == doc.json("dev1199"));
    CHECK(get_ok(*s, cf::registrations, "dev1") == "not a secret");
  }
  CHECK_MESSAGE(files_containing(d.db(), doc.b64).empty(), files_containing(d.db(), doc.b64));
  // A second open has nothing left to seal.
  auto s = open_sealed(d.db(), r, &rep);
  CHECK(rep.sealed == 0);
}

TEST_CASE("a migration cut short leaves the data dir marked sealed before any value was sealed") {
  temp_dir d;
  secret_doc doc;
  {
    auto s = open_store(d.db()); // no keyring: what 0.x wrote
    write_batch b;
    for (int i = 0; i < 1200; ++i) // more than one migration chunk
      b.put(cf::groups, "grp" + std::to_string(i), doc.json("grp" + std::to_string(i)));
    REQUIRE(s->write(b).ok());
  }
  auto r = make_ring(d.keys());
  {
    std::unique_ptr<store> s;
    store_options o;
    std::size_t chunks = 0;
    o.on_seal_chunk = [&] {
      if (++chunks == 1) throw std::runtime_error("crash after the first chunk");
    };
    REQUIRE(store::open(d.db(), o, s).ok());
    seal_report rep;
    auto e = s->attach_keyring(r, false, rep);
    CHECK(e.message.find("crash after the first chunk") != std::string::npos);
    REQUIRE(chunks == 1);
  }
  // Half the store is sealed. The data dir must say so, or a start that
  // finds the key file gone creates a new key (app/secrets.cpp: it refuses
  // only when is_sealed) and the sealed half can never be read again.
  auto s = open_store(d.db());
  bool sealed = false;
  REQUIRE(s->is_sealed(sealed).ok());
  CHECK(sealed);
  // With the right key the migration finishes on the next start.
  seal_report rep;
  REQUIRE(s->attach_keyring(r, false, rep).ok());
  CHECK(rep.sealed == 1200 - 512);
  CHECK(get_ok(*s, cf::groups, "grp0") == doc.json("grp0"));
  CHECK(get_ok(*s, cf::groups, "grp1199") == doc.json("grp1199"));
  // A fresh key (what a start without the key file would make) is refused.
  s.reset();
  auto other = make_ring(d.path + "/new.key");
  s = open_store(d.db());
  auto e = s->attach_keyring(other, false, rep);
  CHECK(e.code == error_code::storage_failure);
  CHECK(e.message.find(d.path + "/new.key") != std::string::npos);
}

TEST_CASE("after the first complete pass a start skips the scan, and a plaintext value is damage") {
  temp_dir d;
  secret_doc doc;
  {
    auto s = open_store(d.db());
    write_batch b;
    b.put(cf::groups, "old", doc.json("old"));
    REQUIRE(s->write(b).ok());
  }
  auto r = make_ring(d.keys());
  seal_report rep;
  {
    auto s = open_sealed(d.db(), r, &rep);
    CHECK(rep.sealed == 1);
  }
  {
    // Under the server's feet, after the migration: a plaintext document.
    auto s = open_store(d.db());
    write_batch b;
    b.put(cf::groups, "planted", doc.json("planted"));
    REQUIRE(s->write(b).ok());
  }
  auto s = open_sealed(d.db(), r, &rep);
  CHECK(rep.sealed == 0); // no second full pass: it was not sealed
  CHECK(get_ok(*s, cf::groups, "old") == doc.json("old"));
  std::optional<std::string> out;
  auto e = s->get(cf::groups, "planted", out);
  CHECK(e.code == error_code::storage_failure);
  CHECK(e.message.find("groups 'planted'") != std::string::npos);
  CHECK(e.message.find("is not sealed") != std::string::npos);
  CHECK(!out);
  e = s->scan(cf::groups, "", 0, [](std::string_view, std::string_view) { return true; });
  CHECK(e.message.find("is not sealed") != std::string::npos);
  std::vector<std::string> read, unreadable;
  e = s->scan_tolerant(
    cf::groups, "", 0,
    [&](std::string_view k, std::string_view) {
      read.emplace_back(k);
      return true;
    },
    [&](std::string_view k, const error&) {
      unreadable.emplace_back(k);
      return true;
    });
  CHECK(e.ok());
  CHECK(read == std::vector<std::string>{"old"});
  CHECK(unreadable == std::vector<std::string>{"planted"});
  // Families that are not sealed are not affected.
  write_batch b;
  b.put(cf::registrations, "dev", "plain");
  REQUIRE(s->write(b).ok());
  CHECK(get_ok(*s, cf::registrations, "dev") == "plain");
}

TEST_CASE("a data dir sealed with another key is refused, naming the key file") {
  temp_dir d;
  auto r = make_ring(d.keys());
  { auto s = open_sealed(d.db(), r); }
  auto wrong = make_ring(d.path + "/wrong.key");
  auto s = open_store(d.db());
  seal_report rep;
  auto e = s->attach_keyring(wrong, false, rep);
  REQUIRE(e);
  CHECK(e.message.find(d.path + "/wrong.key") != std::string::npos);
  CHECK(e.message.find(r->active_id()) != std::string::npos);
}

TEST_CASE("a tampered or moved ciphertext is reported, not returned and not a crash") {
  temp_dir d;
  auto r = make_ring(d.keys());
  secret_doc doc;
  auto sealed = r->seal(doc.json("dev1"), "enrollments/dev1");
  auto tampered = sealed;
  tampered[tampered.size() / 2] ^= 0x40;
  auto elsewhere = r->seal(doc.json("dev2"), "enrollments/dev2");
  {
    // Written under the store's feet: a store without the keyring writes raw.
    auto s = open_store(d.db());
    write_batch b;
    b.put(cf::enrollments, "dev1", tampered);
    b.put(cf::enrollments, "dev3", elsewhere); // dev2's ciphertext under dev3
    REQUIRE(s->write(b).ok());
  }
  auto s = open_sealed(d.db(), r);
  std::optional<std::string> out;
  auto e = s->get(cf::enrollments, "dev1", out);
  CHECK(e.code == error_code::storage_failure);
  CHECK(e.message.find("enrollments 'dev1'") != std::string::npos);
  CHECK(e.message.find("failed authentication") != std::string::npos);
  CHECK(!out);
  e = s->get(cf::enrollments, "dev3", out);
  CHECK(e.message.find("failed authentication") != std::string::npos);
  e = s->scan(cf::enrollments, "", 0, [](std::string_view, std::string_view) { return true; });
  CHECK(e.message.find("failed authentication") != std::string::npos);
  // Other keys still work.
  write_batch b;
  b.put(cf::enrollments, "dev4", doc.json("dev4"));
  REQUIRE(s->write(b).ok());
  CHECK(get_ok(*s, cf::enrollments, "dev4") == doc.json("dev4"));
  // scan_tolerant hands each value that does not open to its caller and goes
  // on: one damaged value does not hide the others.
  std::vector<std::string> read, unreadable;
  e = s->scan_tolerant(
    cf::enrollments, "", 0,
    [&](std::string_view k, std::string_view v) {
      read.emplace_back(k);
      CHECK(v == doc.json(std::string(k)));
      return true;
    },
    [&](std::string_view k, const error& why) {
      unreadable.emplace_back(k);
      CHECK(why.message.find("failed authentication") != std::string::npos);
      return true;
    });
  INFO(e.message);
  CHECK(e.ok());
  CHECK(read == std::vector<std::string>{"dev4"});
  CHECK(unreadable == std::vector<std::string>{"dev1", "dev3"});
  // The limit counts unreadable values too; false stops the scan.
  unreadable.clear();
  read.clear();
  CHECK(s->scan_tolerant(
           cf::enrollments, "", 1, [&](std::string_view, std::string_view) { return true; },
           [&](std::string_view k, const error&) {
             unreadable.emplace_back(k);
             return true;
           })
          .ok());
  CHECK(unreadable == std::vector<std::string>{"dev1"});
}

TEST_CASE("rotation re-encrypts every value under the new key; the old key is no longer needed") {
  temp_dir d;
  auto r1 = make_ring(d.keys());
  secret_doc doc;
  {
    auto s = open_sealed(d.db(), r1);
    write_batch b;
    for (int i = 0; i < 700; ++i) b.put(cf::groups, "g" + std::to_string(i), doc.json("g"));
    b.put(cf::tpm_challenges, "t1", "challenge state");
    REQUIRE(s->write(b).ok());
  }
  std::shared_ptr<const keyring> r2;
  REQUIRE(keyring::add_key(d.keys(), r2).ok());
  CHECK(r2->ids().size() == 2);
  CHECK(r2->active_id() != r1->active_id());
  {
    auto s = open_store(d.db());
    seal_report rep;
    auto e = s->attach_keyring(r2, /*reseal_all=*/true, rep);
    INFO(e.message);
    REQUIRE(e.ok());
    CHECK(rep.resealed == 701);
  }
  // A key file holding only the new key opens everything: nothing is left
  // under the old one.
  std::ifstream in(d.keys());
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty() && line[0] != '#') last = line;
  const std::string only_new = d.path + "/new-only.key";
  {
    std::ofstream out(only_new);
    out << last << "\n";
  }
  REQUIRE(::chmod(only_new.c_str(), 0600) == 0);
  std::shared_ptr<const keyring> r3;
  REQUIRE(keyring::load(only_new, r3).ok());
  auto s = open_sealed(d.db(), r3);
  CHECK(get_ok(*s, cf::groups, "g699") == doc.json("g"));
  CHECK(get_ok(*s, cf::tpm_challenges, "t1") == "challenge state");
  std::size_t n = 0;
  REQUIRE(s->scan(cf::groups, "", 0, [&](std::string_view, std::string_view) {
               ++n;
               return true;
             }).ok());
  CHECK(n == 700);
}

TEST_CASE("a rotation goes past a value that does not open and reports it; key usage shows "
          "what is left under the old key") {
  temp_dir d;
  auto r1 = make_ring(d.keys());
  secret_doc doc;
  {
    auto s = open_sealed(d.db(), r1);
    write_batch b;
    for (const char* id : {"g0", "g1", "g2"}) b.put(cf::groups, id, doc.json(id));
    b.put(cf::tpm_challenges, "t1", "challenge state");
    REQUIRE(s->write(b).ok());
    key_usage u;
    REQUIRE(s->count_key_usage(u).ok());
    using usage = std::vector<std::pair<std::string, std::size_t>>;
    CHECK(u.by_key_id == usage{{r1->active_id(), 4}});
    CHECK(u.plaintext == 0);
  }
  {
    // "g1" tampered under the server's feet (written raw: no keyring attached).
    auto sealed = r1->seal(doc.json("g1"), "groups/g1");
    sealed[sealed.size() - 3] ^= 0x10;
    auto s = open_store(d.db());
    write_batch b;
    b.put(cf::groups, "g1", sealed);
    REQUIRE(s->write(b).ok());
  }
  std::shared_ptr<const keyring> r2;
  REQUIRE(keyring::add_key(d.keys(), r2).ok());
  auto s = open_store(d.db());
  seal_report rep;
  auto e = s->attach_keyring(r2, /*reseal_all=*/true, rep);
  INFO(e.message);
  REQUIRE(e.ok());
  CHECK(rep.resealed == 3); // g0, g2, t1
  CHECK(rep.unreadable_total == 1);
  REQUIRE(rep.unreadable.size() == 1);
  CHECK(rep.unreadable[0].family == cf::groups);
  CHECK(rep.unreadable[0].key == "g1");
  CHECK(rep.unreadable[0].key_id == r1->active_id());
  CHECK(rep.unreadable[0].why.find("failed authentication") != std::string::npos);
  CHECK(get_ok(*s, cf::groups, "g2") == doc.json("g2"));
  key_usage u;
  REQUIRE(s->count_key_usage(u).ok());
  std::vector<std::pair<std::string, std::size_t>> want{{r1->active_id(), 1},
                                                        {r2->active_id(), 3}};
  std::sort(want.begin(), want.end());
  CHECK(u.by_key_id == want);
}

TEST_CASE("keys from an environment variable: one base64 key or key file lines; errors name it") {
  const std::string raw = crypto::random_bytes(32);
  std::shared_ptr<const keyring> r;
  REQUIRE(keyring::from_env("K", " " + crypto::base64_encode(raw) + "\n", r).ok());
  CHECK(r->ids().size() == 1);
  CHECK(r->path().empty());
  CHECK(r->source() == "environment variable K");
  const std::string id = r->active_id();
  auto sealed = r->seal("x", "a");
  temp_dir d;
  auto file_ring = make_ring(d.keys());
  std::ifstream in(d.keys());
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::shared_ptr<const keyring> two;
  REQUIRE(keyring::from_env("K", id + " " + crypto::base64_encode(raw) + "\n" + text, two).ok());
  CHECK(two->ids().size() == 2);
  CHECK(two->active_id() == file_ring->active_id());
  std::string plain;
  CHECK(two->open(sealed, "a", plain).ok());
  CHECK(plain == "x");
  for (const char* bad : {"", "  ", "nope", "c2hvcnQ=", "0123456789abcdef AAAA", "a b c\n"}) {
    auto e = keyring::from_env("K", bad, r);
    CHECK_MESSAGE(e.message.rfind("secrets: environment variable K: ", 0) == 0, e.message);
    CHECK(!r);
  }
}

} // TEST_SUITE
