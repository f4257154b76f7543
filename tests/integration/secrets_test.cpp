// Secrets at rest against the real server: enrollment and group keys never
// reach RocksDB's files in plaintext, the service API still returns them as
// DPS does, `provisiond keys rotate` keeps devices registering, a wrong or
// missing key file stops the start naming it, and a tampered ciphertext is
// reported as a storage error while the server keeps serving. And the audit
// log: one JSON line per service API write (and key read, and key rotation).

#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "messages/crypto.hpp"
#include "storage/keyring.hpp"
#include "storage/store.hpp"
#include "tests/support/cli.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/metrics_scrape.hpp"
#include "tests/support/test_certs.hpp"

using namespace prov;
namespace fs = std::filesystem;

namespace {

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

/// Runs `provisiond <args>`; returns the exit status, output in `out`.
int run_provisiond(const std::string& args, std::string& out) {
  int st = -1;
  out = test::run_cli(args, st);
  REQUIRE_MESSAGE(st != -1, out);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

void put_enrollment(const test::server_process& s, const std::string& id, const std::string& key) {
  nlohmann::json body{{"registrationId", id},
                      {"attestation",
                       {{"type", "symmetricKey"},
                        {"symmetricKey", {{"primaryKey", key}, {"secondaryKey", key}}}}}};
  auto r = s.service("PUT", "/enrollments/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

void registers(const test::server_process& s, const std::string& id, const std::string& key) {
  auto c = s.client();
  int status = 0;
  auto res = test::register_device(c, s, id, key, status);
  CHECK_MESSAGE(res.value("status", "") == "assigned", res.dump());
}

/// Under a stopped server's feet: `key`'s value in `family` becomes a sealed
/// `plain` with one flipped bit, a value that does not open.
void store_unopenable(const std::string& dir, storage::cf family, const std::string& key,
                      const std::string& plain) {
  std::shared_ptr<const storage::keyring> ring;
  REQUIRE(storage::keyring::load(dir + "/secrets.key", ring).ok());
  auto sealed = ring->seal(plain, std::string(storage::to_string(family)) + "/" + key);
  sealed[sealed.size() - 3] ^= 0x10;
  std::unique_ptr<storage::store> st;
  REQUIRE(storage::store::open(dir + "/db", {}, st).ok());
  storage::write_batch b;
  b.put(family, key, sealed);
  REQUIRE(st->write(b).ok());
}

/// How many times `needle` occurs in `text`.
std::size_t occurrences(const std::string& text, const std::string& needle) {
  std::size_t n = 0;
  for (auto at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1))
    ++n;
  return n;
}

/// The audit log's lines, parsed (each must be one JSON object).
std::vector<nlohmann::json> audit_lines(const std::string& file) {
  std::vector<nlohmann::json> out;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    REQUIRE_MESSAGE(j.is_object(), "not a JSON line: " << line);
    out.push_back(std::move(j));
  }
  return out;
}

const nlohmann::json* find_audit(const std::vector<nlohmann::json>& lines, const std::string& op,
                                 const std::string& id, int status) {
  for (const auto& l : lines)
    if (l.value("operationName", "") == op && l["properties"].value("id", "") == id &&
        l.value("resultSignature", 0) == status)
      return &l;
  return nullptr;
}

} // namespace

TEST_SUITE("secrets") {

TEST_CASE("keys are sealed on disk, returned by the API, and devices register across a rotation") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  CHECK_MESSAGE(s.log().find("created the key-encryption key file '" + dir + "/secrets.key'") !=
                  std::string::npos,
                s.log());
  struct stat st {};
  REQUIRE(::stat((dir + "/secrets.key").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);

  const std::string raw = crypto::random_bytes(32);
  const std::string ind_key = crypto::base64_encode(raw);
  const std::string group_key = crypto::generate_key();
  put_enrollment(s, "sealed-dev", ind_key);
  test::create_group(s, "sealed-group", group_key);

  // As DPS: GET shows "symmetricKey": {}, the attestationmechanism route the keys.
  auto got = test::parse_json(s.service("GET", "/enrollments/sealed-dev").body);
  CHECK(got["attestation"]["symmetricKey"] == nlohmann::json::object());
  got = test::parse_json(s.service("POST", "/enrollments/sealed-dev/attestationmechanism").body);
  CHECK(got["symmetricKey"].value("primaryKey", "") == ind_key);
  auto grp = test::parse_json(
    s.service("POST", "/enrollmentGroups/sealed-group/attestationmechanism").body);
  CHECK(grp["symmetricKey"].value("secondaryKey", "") == group_key);

  registers(s, "sealed-dev", ind_key);
  registers(s, "sealed-member", *crypto::derive_device_key(group_key, "sealed-member"));
  CHECK(s.stop() == 0); // a clean stop: the memtables become SST files

  const std::string db = dir + "/db";
  CHECK_MESSAGE(files_containing(db, ind_key).empty(), files_containing(db, ind_key));
  CHECK(files_containing(db, raw).empty());
  CHECK_MESSAGE(files_containing(db, group_key).empty(), files_containing(db, group_key));
  CHECK(files_containing(db, *crypto::base64_decode(group_key)).empty());
  // The scan can find what is there: the registration id is a record key.
  CHECK(!files_containing(db, "sealed-member").empty());

  std::string out;
  const std::string cfg = "--config " + dir + "/cfg.toml";
  REQUIRE_MESSAGE(run_provisiond("keys list " + cfg, out) == 0, out);
  const std::string first_id = out.substr(0, 16);
  CHECK_MESSAGE(out == first_id + " 2 values active\n", out);
  REQUIRE_MESSAGE(run_provisiond("keys rotate " + cfg, out) == 0, out);
  CHECK_MESSAGE(out.find("new active key") != std::string::npos, out);
  CHECK_MESSAGE(out.find("re-encrypted 2 values") != std::string::npos, out);
  REQUIRE(run_provisiond("keys list " + cfg, out) == 0);
  CHECK_MESSAGE(out.find(first_id + " 0 values\n") == 0, out);
  CHECK_MESSAGE(out.find(" 2 values active\n") != std::string::npos, out);
  CHECK(out.find("note:") == std::string::npos);

  REQUIRE_MESSAGE(!s.restart(), s.log());
  registers(s, "sealed-dev", ind_key);
  registers(s, "sealed-member", *crypto::derive_device_key(group_key, "sealed-member"));
  registers(s, "sealed-member2", *crypto::derive_device_key(group_key, "sealed-member2"));
  got = test::parse_json(s.service("POST", "/enrollments/sealed-dev/attestationmechanism").body);
  CHECK(got["symmetricKey"].value("primaryKey", "") == ind_key);

  // Rotation is offline: the running server holds the data dir's lock.
  CHECK(run_provisiond("keys rotate " + cfg, out) != 0);
  CHECK_MESSAGE(out.find("another provisiond may be running") != std::string::npos, out);
  // `keys list` opens the data dir read-only, without its lock: it counts
  // beside the running server.
  CHECK(run_provisiond("keys list " + cfg, out) == 0);
  CHECK_MESSAGE(out.find(first_id + " 0 values\n") == 0, out);
  CHECK_MESSAGE(out.find(" 2 values active\n") != std::string::npos, out);
}

/// Every entry under `dir` (and `dir` itself) with its size, mtime and owner,
/// one a line: two listings differ when anything was written.
std::string tree_listing(const std::string& dir) {
  std::string out;
  auto add = [&](const std::string& path) {
    struct stat st {};
    REQUIRE(::lstat(path.c_str(), &st) == 0);
    out += path + " " + std::to_string(st.st_size) + " " + std::to_string(st.st_mtim.tv_sec) +
           "." + std::to_string(st.st_mtim.tv_nsec) + " " + std::to_string(st.st_uid) + " " +
           std::to_string(st.st_mode) + "\n";
  };
  add(dir);
  std::vector<std::string> paths;
  for (const auto& e : fs::recursive_directory_iterator(dir)) paths.push_back(e.path().string());
  std::sort(paths.begin(), paths.end());
  for (const auto& p : paths) add(p);
  return out;
}

TEST_CASE("keys list writes nothing to the data dir") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  test::create_group(s, "listed-group", crypto::generate_key());
  put_enrollment(s, "listed-dev", crypto::generate_key());
  CHECK(s.stop() == 0);
  const std::string before = tree_listing(dir);
  std::string out;
  REQUIRE_MESSAGE(run_provisiond("keys list --config " + dir + "/cfg.toml", out) == 0, out);
  CHECK_MESSAGE(out.find(" 2 values active\n") != std::string::npos, out);
  CHECK_MESSAGE(tree_listing(dir) == before, "before:\n" << before << "after:\n"
                                                          << tree_listing(dir));
  // No data dir at all: nothing is created.
  const std::string none = dir + "/no-such-data";
  const int rc =
    run_provisiond("keys list --config " + dir + "/cfg.toml --data-dir " + none, out);
  CHECK_MESSAGE((rc != 0 || out.find("not counted") != std::string::npos), out);
  CHECK(!fs::exists(none));
}

TEST_CASE("keys rotate goes past a value that does not open, names it and fails; keys list shows "
          "the incomplete rotation") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  const std::string key = crypto::generate_key();
  // "a-bad" sorts first: a rotation that stopped there would move nothing.
  put_enrollment(s, "a-bad", key);
  put_enrollment(s, "b-good", key);
  CHECK(s.stop() == 0);
  std::shared_ptr<const storage::keyring> ring;
  REQUIRE(storage::keyring::load(dir + "/secrets.key", ring).ok());
  const std::string old_id = ring->active_id();
  {
    auto sealed = ring->seal(R"({"registrationId":"a-bad"})", "enrollments/a-bad");
    sealed[sealed.size() - 3] ^= 0x10;
    std::unique_ptr<storage::store> st;
    REQUIRE(storage::store::open(dir + "/db", {}, st).ok());
    storage::write_batch b;
    b.put(storage::cf::enrollments, "a-bad", sealed);
    REQUIRE(st->write(b).ok());
  }
  std::string out;
  const std::string cfg = "--config " + dir + "/cfg.toml";
  CHECK(run_provisiond("keys rotate " + cfg, out) == 1);
  CHECK_MESSAGE(out.find("1 stored values did not open") != std::string::npos, out);
  CHECK_MESSAGE(out.find("FAMILY") != std::string::npos, out);
  CHECK_MESSAGE(out.find("enrollments     " + old_id + "  a-bad  ") != std::string::npos, out);
  CHECK_MESSAGE(out.find("re-encrypted 1 values, 1 did not open") != std::string::npos, out);
  REQUIRE(storage::keyring::load(dir + "/secrets.key", ring).ok());
  CHECK(ring->active_id() != old_id);
  CHECK(run_provisiond("keys list " + cfg, out) == 0);
  CHECK_MESSAGE(out.find(old_id + " 1 values\n") == 0, out);
  CHECK_MESSAGE(out.find(ring->active_id() + " 1 values active\n") != std::string::npos, out);
  CHECK_MESSAGE(out.find("note: 1 values are not under the active key") != std::string::npos, out);
  // The rotation's audit line records the failure.
  auto lines = audit_lines(dir + "/audit.log");
  REQUIRE(!lines.empty());
  CHECK(lines.back().value("operationName", "") == "RotateKeys");
  CHECK(lines.back().value("resultType", "") == "Failure");
  // Everything else moved: the server starts and the good device registers.
  REQUIRE_MESSAGE(!s.restart(), s.log());
  registers(s, "b-good", key);
}

// As root only (a visible skip otherwise): the case is root's, and the
// machines that run the suite run it as root.
TEST_CASE("keys rotate and keys list run as root become the data dir's owner and chown nothing" *
          doctest::skip(::geteuid() != 0)) {
  REQUIRE(::geteuid() == 0);
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  test::create_group(s, "owned-group", crypto::generate_key());
  CHECK(s.stop() == 0);
  // The service user's data dir (nobody here), as a package would set it up.
  const uid_t uid = 65534;
  const gid_t gid = 65534;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    REQUIRE(::lchown(e.path().c_str(), uid, gid) == 0);
  REQUIRE(::chown(dir.c_str(), uid, gid) == 0);
  fs::remove(dir + "/audit.log"); // a new one is created by the rotation
  // What the service user could plant in db/: a hard link to a file of
  // root's. Chowning "the data dir's files" would give that file away.
  const std::string outside = dir + ".outside";
  { std::ofstream(outside) << "root's\n"; }
  REQUIRE(::chown(outside.c_str(), 0, 0) == 0);
  REQUIRE(::link(outside.c_str(), (dir + "/db/planted").c_str()) == 0);
  std::string out;
  REQUIRE_MESSAGE(run_provisiond("keys rotate --config " + dir + "/cfg.toml", out) == 0, out);
  REQUIRE_MESSAGE(run_provisiond("keys list --config " + dir + "/cfg.toml", out) == 0, out);
  struct stat st {};
  REQUIRE(::stat(outside.c_str(), &st) == 0);
  CHECK_MESSAGE(st.st_uid == 0, "root's file given to uid " << st.st_uid);
  fs::remove(dir + "/db/planted");
  fs::remove(outside);
  std::string others;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    REQUIRE(::lstat(e.path().c_str(), &st) == 0);
    if (st.st_uid != uid || st.st_gid != gid) others += e.path().string() + "\n";
  }
  CHECK_MESSAGE(others.empty(), "owned by someone else now:\n" << others);
  CHECK(fs::exists(dir + "/audit.log"));
  // The audit line names who ran it and as whom.
  auto lines = audit_lines(dir + "/audit.log");
  REQUIRE(!lines.empty());
  CHECK_MESSAGE(lines.back()["identity"].get<std::string>().find(
                  "local user root (uid 0) as ") == 0,
                lines.back().dump());
  // The server, as that user, opens everything rotate wrote.
  REQUIRE_MESSAGE(!s.restart(), s.log());
  CHECK(s.service("GET", "/enrollmentGroups/owned-group").status == 200);
}

/// Sets an environment variable for this process (and the servers and CLI
/// runs it starts) while in scope.
struct env_var {
  std::string name;
  env_var(std::string n, const std::string& value) : name(std::move(n)) {
    ::setenv(name.c_str(), value.c_str(), 1);
  }
  ~env_var() { ::unsetenv(name.c_str()); }
  env_var(const env_var&) = delete;
  env_var& operator=(const env_var&) = delete;
};

TEST_CASE("the master key from PROVISIOND_SECRETS_KEY: no key file, wins over one, a bad value "
          "stops the start naming the variable") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  const std::string raw = crypto::random_bytes(32);
  std::string id;
  {
    env_var v("PROVISIOND_SECRETS_KEY", crypto::base64_encode(raw));
    REQUIRE_MESSAGE(!s.start({}, dir), s.log());
    CHECK_MESSAGE(s.log().find("from the environment variable PROVISIOND_SECRETS_KEY") !=
                    std::string::npos,
                  s.log());
    CHECK(!fs::exists(dir + "/secrets.key")); // no copy on disk
    // Taken out of the environment at start: the block /proc shows (and
    // children would inherit) holds neither the value nor the variable.
    std::ifstream env_in("/proc/" + std::to_string(s.pid()) + "/environ", std::ios::binary);
    const std::string environ_block((std::istreambuf_iterator<char>(env_in)),
                                    std::istreambuf_iterator<char>());
    REQUIRE(environ_block.find("PATH=") != std::string::npos); // really read it
    CHECK(environ_block.find(crypto::base64_encode(raw)) == std::string::npos);
    CHECK(environ_block.find("PROVISIOND_SECRETS_KEY=" + crypto::base64_encode(raw).substr(0, 1)) ==
          std::string::npos);
    CHECK(s.log().find(crypto::base64_encode(raw)) == std::string::npos);
    test::create_group(s, "env-group", crypto::generate_key());
    CHECK(s.stop() == 0);
    std::string out;
    REQUIRE_MESSAGE(run_provisiond("keys list --config " + dir + "/cfg.toml", out) == 0, out);
    id = out.substr(0, 16);
    CHECK_MESSAGE(out == id + " 1 values active\n", out);
    // Rotation writes a key file: refused while the variable would override it.
    CHECK(run_provisiond("keys rotate --config " + dir + "/cfg.toml", out) == 1);
    CHECK_MESSAGE(out.find("PROVISIOND_SECRETS_KEY is set") != std::string::npos, out);
  }
  // Without the variable the data dir is sealed and there is no key file.
  auto err = s.restart();
  REQUIRE(err);
  CHECK_MESSAGE(err.message.find("is missing") != std::string::npos, err.message);
  {
    // Key file lines work too (the last is active); a key file beside it is ignored.
    std::shared_ptr<const storage::keyring> other;
    REQUIRE(storage::keyring::create(dir + "/secrets.key", other).ok());
    env_var v("PROVISIOND_SECRETS_KEY", "# comment\n" + id + " " + crypto::base64_encode(raw) + "\n");
    REQUIRE_MESSAGE(!s.restart(), s.log());
    CHECK(s.service("GET", "/enrollmentGroups/env-group").status == 200);
    CHECK(s.stop() == 0);
  }
  // Key text in a bad value (a key alone with a typo, the fields of a line
  // swapped, a key id that does not match) is not quoted back, not even
  // hex-escaped.
  const std::string b64 = crypto::base64_encode(raw);
  const std::string typo = b64.substr(0, 20) + "!" + b64.substr(21);
  const std::string swapped = b64 + " " + id + "\n";
  const std::string other_id = "0123456789abcdef " + b64 + "\n";
  for (const std::string& bad : {std::string(), std::string("not base64!"),
                                 std::string("c2hvcnQ="), std::string("0123456789abcdef AAAA"),
                                 typo, swapped, other_id}) {
    env_var v("PROVISIOND_SECRETS_KEY", bad);
    err = s.restart();
    REQUIRE_MESSAGE(err, bad);
    CHECK_MESSAGE(err.message.find("environment variable PROVISIOND_SECRETS_KEY") !=
                    std::string::npos,
                  err.message);
    for (const std::string& text : {b64.substr(0, 12), crypto::hex(b64.substr(0, 12)),
                                    typo.substr(0, 12), crypto::hex(raw.substr(0, 8))})
      CHECK_MESSAGE(err.message.find(text) == std::string::npos, err.message);
  }
  {
    // Another valid key: the data dir's check names the variable.
    env_var v("PROVISIOND_SECRETS_KEY", crypto::base64_encode(crypto::random_bytes(32)));
    err = s.restart();
    REQUIRE(err);
    CHECK_MESSAGE(err.message.find("which environment variable PROVISIOND_SECRETS_KEY cannot "
                                   "open") != std::string::npos,
                  err.message);
  }
}

TEST_CASE("a wrong or missing key file stops the start with an error naming the file") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  test::create_group(s, "g", crypto::generate_key());
  CHECK(s.stop() == 0);

  const std::string key_file = dir + "/secrets.key";
  fs::rename(key_file, dir + "/secrets.key.saved");
  std::shared_ptr<const storage::keyring> other;
  REQUIRE(storage::keyring::create(key_file, other).ok()); // valid, but another key
  auto err = s.restart();
  REQUIRE(err);
  CHECK_MESSAGE(err.message.find("key file '" + key_file + "' cannot open") != std::string::npos,
                err.message);

  fs::remove(key_file);
  err = s.restart();
  REQUIRE(err);
  CHECK_MESSAGE(err.message.find("key file '" + key_file + "' is missing") != std::string::npos,
                err.message);
  CHECK(!fs::exists(key_file)); // not replaced by a fresh key

  fs::rename(dir + "/secrets.key.saved", key_file);
  REQUIRE_MESSAGE(!s.restart(), s.log());
  CHECK(s.service("GET", "/enrollmentGroups/g").status == 200);
}

TEST_CASE("an upgrade cut short, then the key file lost: the start is refused naming the file") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  CHECK(s.stop() == 0);
  const std::string key_file = dir + "/secrets.key";
  {
    // What an older version left: plaintext groups, no secrets markers.
    fs::remove(key_file);
    std::unique_ptr<storage::store> st;
    REQUIRE(storage::store::open(dir + "/db", {}, st).ok());
    storage::write_batch b;
    b.del(storage::cf::meta, "secrets/check");
    b.del(storage::cf::meta, "secrets/migrated");
    for (int i = 0; i < 600; ++i) { // more than one sealing chunk (512)
      const std::string id = "old-group-" + std::to_string(i);
      nlohmann::json g{{"enrollmentGroupId", id},
                       {"attestation",
                        {{"type", "symmetricKey"},
                         {"symmetricKey",
                          {{"primaryKey", crypto::generate_key()},
                           {"secondaryKey", crypto::generate_key()}}}}}};
      b.put(storage::cf::groups, id, g.dump());
    }
    REQUIRE(st->write(b).ok());
  }
  {
    // The first start of the new version seals the first chunk, then dies.
    std::shared_ptr<const storage::keyring> ring;
    REQUIRE(storage::keyring::create(key_file, ring).ok());
    std::unique_ptr<storage::store> st;
    storage::store_options o;
    o.on_seal_chunk = [] { throw std::runtime_error("killed mid-upgrade"); };
    REQUIRE(storage::store::open(dir + "/db", o, st).ok());
    storage::seal_report rep;
    REQUIRE(st->attach_keyring(ring, false, rep));
  }
  // The key file is lost. A fresh key would leave 512 groups unreadable.
  fs::remove(key_file);
  auto err = s.restart();
  REQUIRE(err);
  CHECK_MESSAGE(err.message.find("key file '" + key_file + "' is missing") != std::string::npos,
                err.message);
  CHECK(!fs::exists(key_file)); // not replaced by a fresh key
}

TEST_CASE("a tampered enrollment is a storage error, the server keeps serving the others") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  const std::string key = crypto::generate_key();
  put_enrollment(s, "good-dev", key);
  CHECK(s.stop() == 0);
  {
    // Under the server's feet: a ciphertext with one flipped bit.
    std::shared_ptr<const storage::keyring> ring;
    REQUIRE(storage::keyring::load(dir + "/secrets.key", ring).ok());
    auto sealed = ring->seal(R"({"registrationId":"bad-dev"})", "enrollments/bad-dev");
    sealed[sealed.size() - 3] ^= 0x10;
    std::unique_ptr<storage::store> st;
    REQUIRE(storage::store::open(dir + "/db", {}, st).ok());
    storage::write_batch b;
    b.put(storage::cf::enrollments, "bad-dev", sealed);
    REQUIRE(st->write(b).ok());
  }
  REQUIRE_MESSAGE(!s.restart(), s.log());
  auto r = s.service("GET", "/enrollments/bad-dev");
  CHECK(r.status == 500);
  auto j = test::parse_json(r.body);
  CHECK(j.value("errorCode", 0) == 500001);
  CHECK_MESSAGE(j.value("message", "").find("failed authentication") != std::string::npos, r.body);
  auto c = s.client();
  int status = 0;
  auto res = test::register_device(c, s, "bad-dev", key, status);
  CHECK(res.value("status", "") != "assigned");
  // The device learns nothing of the server's files or keys: no data dir,
  // no key file, no key id; the log has the details.
  {
    std::shared_ptr<const storage::keyring> ring;
    REQUIRE(storage::keyring::load(dir + "/secrets.key", ring).ok());
    const std::string body = res.dump();
    CHECK_MESSAGE(status == 500, body);
    CHECK_MESSAGE(res.value("errorCode", 0) == 500001, body);
    CHECK_MESSAGE(body.find(dir) == std::string::npos, body);
    CHECK_MESSAGE(body.find("secrets.key") == std::string::npos, body);
    CHECK_MESSAGE(body.find(ring->active_id()) == std::string::npos, body);
    CHECK_MESSAGE(body.find("failed authentication") == std::string::npos, body);
    CHECK_MESSAGE(res.value("message", "").find(res.value("trackingId", "?")) != std::string::npos,
                  body);
    // The operator finds the details under that tracking id. The log is
    // written asynchronously: wait (bounded) for the line.
    const std::string tracking = res.value("trackingId", "?");
    auto logged = [&] {
      std::istringstream lines(s.log());
      for (std::string line; std::getline(lines, line);)
        if (line.find(tracking) != std::string::npos
            && line.find("failed authentication") != std::string::npos)
          return true;
      return false;
    };
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!logged() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK_MESSAGE(logged(), s.log());
  }
  CHECK(s.alive());
  registers(s, "good-dev", key);
}

TEST_CASE("a group whose sealed value does not open is skipped; the server starts and the other groups attest") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  const std::string good_key = crypto::generate_key(), bad_key = crypto::generate_key();
  test::create_group(s, "good-group", good_key);
  test::create_group(s, "bad-group", bad_key);
  registers(s, "bad-group-dev", *crypto::derive_device_key(bad_key, "bad-group-dev"));
  CHECK(s.stop() == 0);
  {
    // Under the server's feet: the group's ciphertext with one flipped bit.
    std::shared_ptr<const storage::keyring> ring;
    REQUIRE(storage::keyring::load(dir + "/secrets.key", ring).ok());
    nlohmann::json g{{"enrollmentGroupId", "bad-group"},
                     {"attestation",
                      {{"type", "symmetricKey"},
                       {"symmetricKey", {{"primaryKey", bad_key}, {"secondaryKey", bad_key}}}}}};
    auto sealed = ring->seal(g.dump(), "groups/bad-group");
    sealed[sealed.size() - 3] ^= 0x10;
    std::unique_ptr<storage::store> st;
    REQUIRE(storage::store::open(dir + "/db", {}, st).ok());
    storage::write_batch b;
    b.put(storage::cf::groups, "bad-group", sealed);
    REQUIRE(st->write(b).ok());
  }
  // One unreadable group must not stop the start.
  REQUIRE_MESSAGE(!s.restart(), s.log());
  CHECK_MESSAGE(s.log().find("'bad-group' cannot be unsealed") != std::string::npos, s.log());
  registers(s, "good-dev", *crypto::derive_device_key(good_key, "good-dev"));
  // The tampered group's device is refused as by a group that does not
  // exist, not with a server error.
  {
    auto c = s.client();
    int status = 0;
    auto res = test::register_device(
      c, s, "bad-group-dev2", *crypto::derive_device_key(bad_key, "bad-group-dev2"), status);
    CHECK_MESSAGE(status == 401, res.dump());
    CHECK_MESSAGE(res.value("errorCode", 0) == 401002, res.dump());
  }
  // A later group write rebuilds the snapshot without shutting every group out.
  const std::string later_key = crypto::generate_key();
  test::create_group(s, "later-group", later_key);
  registers(s, "later-dev", *crypto::derive_device_key(later_key, "later-dev"));
  registers(s, "good-dev2", *crypto::derive_device_key(good_key, "good-dev2"));
  CHECK(s.alive());
}

TEST_CASE("a CA whose sealed value does not open is skipped for its groups; the server starts") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  auto ca = test::make_ca("IT Sealed Root CA", nullptr, 60);
  auto r = s.service("PUT", "/certificates/sealed-ca",
                     nlohmann::json{{"certificate", ca.pem()}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  r = s.service("POST", "/certificates/sealed-ca/generateVerificationCode");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto code = test::parse_json(r.body)["properties"]["verificationCode"].get<std::string>();
  auto proof = test::make_device(code, ca, 7000);
  r = s.service("POST", "/certificates/sealed-ca/verify",
                nlohmann::json{{"certificate", proof.pem()}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  nlohmann::json g{{"enrollmentGroupId", "ca-group"},
                   {"attestation",
                    {{"type", "x509"}, {"x509", {{"caReferences", {{"primary", "sealed-ca"}}}}}}}};
  r = s.service("PUT", "/enrollmentGroups/ca-group", g.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  const std::string key = crypto::generate_key();
  test::create_group(s, "sym-group", key);
  CHECK(s.stop() == 0);
  {
    std::shared_ptr<const storage::keyring> ring;
    REQUIRE(storage::keyring::load(dir + "/secrets.key", ring).ok());
    auto sealed = ring->seal(R"({"certificate":"x"})", "certificates/sealed-ca");
    sealed[sealed.size() - 3] ^= 0x10;
    std::unique_ptr<storage::store> st;
    REQUIRE(storage::store::open(dir + "/db", {}, st).ok());
    storage::write_batch b;
    b.put(storage::cf::certificates, "sealed-ca", sealed);
    REQUIRE(st->write(b).ok());
  }
  REQUIRE_MESSAGE(!s.restart(), s.log());
  CHECK_MESSAGE(s.log().find("CA 'sealed-ca' of enrollment group 'ca-group' cannot be unsealed") !=
                  std::string::npos,
                s.log());
  registers(s, "sym-dev", *crypto::derive_device_key(key, "sym-dev"));
  CHECK(s.alive());
}

TEST_CASE("a CA that does not open is left out of GET /certificates and named; the others are listed") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  // "ca-a" sorts first: a list that stopped at it would show nothing.
  for (const char* name : {"ca-a", "ca-b"}) {
    auto ca = test::make_ca(std::string("IT List ") + name, nullptr, 60);
    auto r = s.service("PUT", std::string("/certificates/") + name,
                       nlohmann::json{{"certificate", ca.pem()}}.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
  }
  CHECK(s.stop() == 0);
  {
    std::shared_ptr<const storage::keyring> ring;
    REQUIRE(storage::keyring::load(dir + "/secrets.key", ring).ok());
    auto sealed = ring->seal(R"({"certificate":"x"})", "certificates/ca-a");
    sealed[sealed.size() - 3] ^= 0x10;
    std::unique_ptr<storage::store> st;
    REQUIRE(storage::store::open(dir + "/db", {}, st).ok());
    storage::write_batch b;
    b.put(storage::cf::certificates, "ca-a", sealed);
    REQUIRE(st->write(b).ok());
  }
  REQUIRE_MESSAGE(!s.restart(), s.log());
  auto r = s.service("GET", "/certificates");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto j = test::parse_json(r.body);
  REQUIRE(j["value"].size() == 1);
  CHECK(j["value"][0].value("name", "") == "ca-b");
  CHECK(j["unreadable"] == nlohmann::json::array({"ca-a"}));
  CHECK(r.body.find("failed authentication") == std::string::npos); // details: the log
  // Uploading another CA compares thumbprints with every stored CA: the
  // unreadable one must not make that a 500.
  auto ca = test::make_ca("IT List ca-c", nullptr, 60);
  r = s.service("PUT", "/certificates/ca-c", nlohmann::json{{"certificate", ca.pem()}}.dump());
  CHECK_MESSAGE(r.status == 200, r.body);
  // A list polled again names it again, but the log says why once.
  r = s.service("GET", "/certificates");
  CHECK(test::parse_json(r.body)["unreadable"] == nlohmann::json::array({"ca-a"}));
  // The CLI's table says so too (on stderr), not only the JSON.
  int rc = -1;
  auto out = test::run_cli("certificate list --data-dir " + dir, rc);
  CHECK_MESSAGE(rc == 0, out);
  CHECK_MESSAGE(out.find("ca-b") != std::string::npos, out);
  CHECK_MESSAGE(out.find("warning: CA ca-a is stored but does not open") != std::string::npos, out);
  CHECK(s.stop() == 0);
  CHECK_MESSAGE(s.log().find("stored CA ca-a: ") != std::string::npos, s.log());
  const std::string log = s.log();
  std::size_t warnings = 0;
  for (auto at = log.find("left out of GET /certificates"); at != std::string::npos;
       at = log.find("left out of GET /certificates", at + 1))
    ++warnings;
  CHECK_MESSAGE(warnings == 1, log);
}

TEST_CASE("enrollment and group queries leave out a value that does not open, log it once and "
          "count it; the answer keeps DPS's shape") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start(test::with_metrics(test::default_config(dir)), dir), s.log());
  const std::string key = crypto::generate_key();
  for (const char* id : {"scan-a", "scan-b", "scan-c"})
    put_enrollment(s, id, key);
  test::create_group(s, "scan-group-a", key);
  test::create_group(s, "scan-group-b", key);
  CHECK(s.stop() == 0);
  // The enrollment in the middle (paging must step over it), the group first
  // (a scan that stopped at it would answer nothing).
  store_unopenable(dir, storage::cf::enrollments, "scan-b", R"({"registrationId":"scan-b"})");
  store_unopenable(dir, storage::cf::groups, "scan-group-a",
                   R"({"enrollmentGroupId":"scan-group-a"})");
  REQUIRE_MESSAGE(!s.restart(), s.log());

  auto ids = [](const nlohmann::json& arr, const char* member) {
    std::vector<std::string> out;
    for (const auto& d : arr)
      out.push_back(d.value(member, ""));
    return out;
  };
  using ids_t = std::vector<std::string>;
  auto r = s.service("POST", "/enrollments/query", R"({"query":"*"})");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(ids(test::parse_json(r.body), "registrationId") == ids_t{"scan-a", "scan-c"});
  CHECK(r.headers.find("x-ms-continuation") == nullptr);
  CHECK(r.body.find("failed authentication") == std::string::npos); // details: the log
  // One item a page: the unreadable value costs no item and no page of its
  // own; each continuation is one this server accepts back.
  {
    net::http_headers h;
    h.set("x-ms-max-item-count", "1");
    r = s.service("POST", "/enrollments/query", R"({"query":"*"})", h);
    REQUIRE_MESSAGE(r.status == 200, r.body);
    CHECK(ids(test::parse_json(r.body), "registrationId") == ids_t{"scan-a"});
    const std::string* next = r.headers.find("x-ms-continuation");
    REQUIRE(next != nullptr);
    h.set("x-ms-continuation", *next);
    r = s.service("POST", "/enrollments/query", R"({"query":"*"})", h);
    REQUIRE_MESSAGE(r.status == 200, r.body);
    CHECK(ids(test::parse_json(r.body), "registrationId") == ids_t{"scan-c"});
    CHECK(r.headers.find("x-ms-continuation") == nullptr);
  }
  for (int i = 0; i < 2; ++i) { // polled twice: logged once, counted twice
    r = s.service("POST", "/enrollmentGroups/query", R"({"query":"*"})");
    REQUIRE_MESSAGE(r.status == 200, r.body);
    CHECK(ids(test::parse_json(r.body), "enrollmentGroupId") == ids_t{"scan-group-b"});
  }
  // The CLI's list follows the continuations the same way.
  int rc = -1;
  auto out = test::run_cli("enrollment list --json --page-size 1 --data-dir " + dir, rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK(ids(test::parse_json(out), "registrationId") == ids_t{"scan-a", "scan-c"});
  out = test::run_cli("group list --data-dir " + dir, rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK(out.find("scan-group-b") != std::string::npos);

  // Each time a value is left out of an answer (the CLI's pages included).
  auto m = test::scrape(test::metrics_addr(s));
  CHECK(test::sum(m, "dps_unreadable_records_total", {R"(family="enrollments")"}) == 3);
  CHECK(test::sum(m, "dps_unreadable_records_total", {R"(family="groups")"}) == 3);
  CHECK(test::sum(m, "dps_unreadable_records_total", {R"(family="certificates")"}) == 0);
  CHECK(s.stop() == 0);
  const std::string log = s.log();
  CHECK_MESSAGE(log.find("stored individual enrollment scan-b: ") != std::string::npos, log);
  CHECK_MESSAGE(log.find("stored enrollment group scan-group-a: ") != std::string::npos, log);
  CHECK_MESSAGE(occurrences(log, "left out of POST /enrollments/query") == 1, log);
  CHECK_MESSAGE(occurrences(log, "left out of POST /enrollmentGroups/query") == 1, log);
}

TEST_CASE("the registrations query leaves out an undecodable record, logs it once and counts it") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start(test::with_metrics(test::default_config(dir)), dir), s.log());
  const std::string key = crypto::generate_key();
  test::create_group(s, "rq-group", key);
  auto c = s.client();
  for (const char* id : {"rq-a", "rq-c"}) {
    int status = 0;
    auto j = test::register_device(c, s, id, *crypto::derive_device_key(key, id), status, 20);
    REQUIRE_MESSAGE(j.value("status", "") == "assigned", j.dump());
  }
  CHECK(s.stop() == 0);
  {
    // Between the two (paging must step over it): a record of a format this
    // version does not read.
    std::unique_ptr<storage::store> st;
    REQUIRE(storage::store::open(dir + "/db", {}, st).ok());
    storage::write_batch b;
    b.put(storage::cf::registrations, "rq-b", "not a registration record {");
    REQUIRE(st->write(b).ok());
  }
  REQUIRE_MESSAGE(!s.restart(), s.log());
  for (int i = 0; i < 2; ++i) { // polled twice: logged once, counted twice
    auto r = s.service("POST", "/registrations/rq-group/query", R"({"query":"*"})");
    REQUIRE_MESSAGE(r.status == 200, r.body);
    std::vector<std::string> ids;
    for (const auto& d : test::parse_json(r.body))
      ids.push_back(d.value("registrationId", ""));
    CHECK(ids == std::vector<std::string>{"rq-a", "rq-c"});
  }
  auto m = test::scrape(test::metrics_addr(s));
  CHECK(test::sum(m, "dps_unreadable_records_total", {R"(family="registrations")"}) == 2);
  CHECK(s.stop() == 0);
  const std::string log = s.log();
  CHECK_MESSAGE(log.find("stored registration record rq-b: ") != std::string::npos, log);
  CHECK_MESSAGE(occurrences(log, "left out of POST /registrations/{groupId}/query") == 1, log);
}

TEST_CASE("a relative key_file and audit_file are taken inside data_dir, by serve and keys alike") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-secrets");
  s.remove_data_dir_at_exit();
  // The server and the CLI below run in this test's working directory,
  // which is not the data dir: a path taken against it would land here.
  REQUIRE(fs::current_path() != fs::path(dir));
  const std::string cfg = test::default_config(dir) +
                          "[secrets]\nkey_file = \"rel-secrets.key\"\n"
                          "[log]\naudit_file = \"rel-audit.log\"\n";
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  const bool stray_key = fs::exists("rel-secrets.key"), stray_audit = fs::exists("rel-audit.log");
  fs::remove("rel-secrets.key");
  fs::remove("rel-audit.log");
  CHECK_FALSE(stray_key);
  CHECK_FALSE(stray_audit);
  CHECK(fs::exists(dir + "/rel-secrets.key"));
  test::create_group(s, "rel-group", crypto::generate_key());
  CHECK(s.stop() == 0);
  CHECK(fs::exists(dir + "/rel-audit.log"));
  CHECK(!fs::exists(dir + "/secrets.key"));
  std::string out;
  REQUIRE_MESSAGE(run_provisiond("keys rotate --config " + dir + "/cfg.toml", out) == 0, out);
  CHECK_MESSAGE(out.find("'" + dir + "/rel-secrets.key'") != std::string::npos, out);
  CHECK(audit_lines(dir + "/rel-audit.log").size() == 2); // the Upsert, the rotation
  REQUIRE_MESSAGE(!s.restart(), s.log());
  CHECK(s.service("GET", "/enrollmentGroups/rel-group").status == 200);
}

} // TEST_SUITE

TEST_SUITE("audit") {

TEST_CASE("every service API write, key read and key rotation leaves one audit line, no secret") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-audit");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  const std::string key = crypto::generate_key();
  put_enrollment(s, "audit-dev", key);                                     // Upsert 200
  test::create_group(s, "audit-group", key);                               // Upsert 200
  CHECK(s.service("GET", "/enrollments/audit-dev").status == 200);         // not audited
  CHECK(s.service("POST", "/enrollments/query", R"({"query":"*"})").status == 200);      // not audited
  CHECK(s.service("POST", "/enrollments/audit-dev/attestationmechanism").status == 200);
  nlohmann::json items = nlohmann::json::array();
  for (const char* id : {"audit-bulk-1", "audit-bulk-2"})
    items.push_back({{"registrationId", id}, {"attestation", {{"type", "symmetricKey"}}}});
  CHECK(s.service("POST", "/enrollments",
                  nlohmann::json{{"mode", "create"}, {"enrollments", items}}.dump())
          .status == 200);
  CHECK(s.service("DELETE", "/enrollments/audit-dev").status == 204);
  CHECK(s.service("DELETE", "/certificates/audit-ca").status == 404);
  CHECK(s.service("DELETE", "/registrations/audit-dev").status == 404);
  // Under /certificates and /registrations `query` is an id, not a query:
  // writes to it, encoded or not, are audited as writes naming it.
  auto ca_cert = test::make_ca("IT Audit Root", nullptr, 30);
  CHECK(s.service("PUT", "/certificates/query",
                  nlohmann::json{{"certificate", ca_cert.pem()}}.dump())
          .status == 200);
  CHECK(s.service("DELETE", "/certificates/%71uery").status == 204);
  CHECK(s.service("DELETE", "/registrations/query").status == 404);
  // A forged token: the named policy is recorded, marked unauthenticated.
  const std::string forged = s.service_auth("provisioningserviceowner", crypto::generate_key());
  net::http_headers h;
  h.add("Authorization", forged);
  CHECK(s.service("DELETE", "/enrollmentGroups/audit-group", {}, h).status == 401);
  CHECK(s.stop() == 0); // the log's writer drains before exit

  std::string out;
  REQUIRE_MESSAGE(run_provisiond("keys rotate --config " + dir + "/cfg.toml", out) == 0, out);

  const std::string file = dir + "/audit.log";
  struct stat st {};
  REQUIRE(::stat(file.c_str(), &st) == 0);
  CHECK((st.st_mode & 0077) == 0);
  auto lines = audit_lines(file);
  CHECK(lines.size() == 12);

  auto* up = find_audit(lines, "Upsert", "audit-dev", 200);
  REQUIRE(up != nullptr);
  CHECK(up->value("category", "") == "Audit");
  CHECK(up->value("identity", "") == "provisioningserviceowner");
  CHECK(up->value("authenticated", false));
  CHECK(up->value("callerIpAddress", "") == "127.0.0.1");
  CHECK(up->value("resultType", "") == "Success");
  CHECK(!up->value("time", "").empty());
  CHECK(!up->value("correlationId", "").empty());
  CHECK((*up)["properties"].value("type", "") == "IndividualEnrollment");
  auto* grp = find_audit(lines, "Upsert", "audit-group", 200);
  REQUIRE(grp != nullptr);
  CHECK((*grp)["properties"].value("type", "") == "EnrollmentGroup");
  CHECK(find_audit(lines, "GetAttestationMechanism", "audit-dev", 200) != nullptr);
  auto* bulk = find_audit(lines, "BulkOperation", "", 200);
  REQUIRE(bulk != nullptr);
  CHECK((*bulk)["properties"].value("mode", "") == "create");
  CHECK((*bulk)["properties"]["ids"] == nlohmann::json::array({"audit-bulk-1", "audit-bulk-2"}));
  CHECK(find_audit(lines, "Delete", "audit-dev", 204) != nullptr);
  auto* ca = find_audit(lines, "Delete", "audit-ca", 404);
  REQUIRE(ca != nullptr);
  CHECK((*ca)["properties"].value("type", "") == "Certificate");
  CHECK(ca->value("resultType", "") == "ClientError");
  CHECK(ca->value("errorCode", "") == "404205");
  CHECK(find_audit(lines, "Delete", "audit-dev", 404) != nullptr); // registration state
  auto* ca_up = find_audit(lines, "Upsert", "query", 200);
  REQUIRE(ca_up != nullptr);
  CHECK((*ca_up)["properties"].value("type", "") == "Certificate");
  auto* ca_del = find_audit(lines, "Delete", "query", 204);
  REQUIRE(ca_del != nullptr);
  CHECK((*ca_del)["properties"].value("type", "") == "Certificate");
  auto* reg_del = find_audit(lines, "Delete", "query", 404);
  REQUIRE(reg_del != nullptr);
  CHECK((*reg_del)["properties"].value("type", "") == "DeviceRegistrationState");
  auto* bad = find_audit(lines, "Delete", "audit-group", 401);
  REQUIRE(bad != nullptr);
  CHECK(bad->value("identity", "") == "provisioningserviceowner");
  CHECK_FALSE(bad->value("authenticated", true));
  // Reads are not audited.
  for (const auto& l : lines) {
    CHECK(l.value("operationName", "") != "Get");
    CHECK(l.value("operationName", "") != "Query");
  }
  // The rotation, by the local user, naming the new key id.
  std::shared_ptr<const storage::keyring> ring;
  REQUIRE(storage::keyring::load(dir + "/secrets.key", ring).ok());
  auto* rot = find_audit(lines, "RotateKeys", ring->active_id(), 0);
  REQUIRE(rot != nullptr);
  CHECK(rot->value("identity", "").rfind("local user ", 0) == 0);
  CHECK((*rot)["properties"].value("protocol", "") == "Cli");
  CHECK(rot->value("resultType", "") == "Success");

  std::ifstream in(file);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(text.find(key) == std::string::npos);
  CHECK(text.find("SharedAccessSignature") == std::string::npos);
  CHECK(text.find(forged.substr(forged.find("sig=") + 4, 20)) == std::string::npos);
}

TEST_CASE("a bulk operation's ids are audited only once authenticated, the first 100 and a count") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-audit");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  auto bulk_of = [](const std::string& prefix, int n) {
    nlohmann::json items = nlohmann::json::array();
    for (int i = 0; i < n; ++i)
      items.push_back({{"registrationId", prefix + std::to_string(i)},
                       {"attestation", {{"type", "symmetricKey"}}}});
    return nlohmann::json{{"mode", "create"}, {"enrollments", items}}.dump();
  };
  // Unauthenticated (a forged signature): the body does not reach the line.
  const std::string forged = s.service_auth("provisioningserviceowner", crypto::generate_key());
  net::http_headers h;
  h.add("Authorization", forged);
  CHECK(s.service("POST", "/enrollments", bulk_of("forged-", 3), h).status == 401);
  // Authenticated, with many ids: the first 100 and the count.
  const int big_status = s.service("POST", "/enrollments", bulk_of("big-", 150)).status;
  CHECK(s.stop() == 0);
  auto lines = audit_lines(dir + "/audit.log");
  auto* unauth = find_audit(lines, "BulkOperation", "", 401);
  REQUIRE(unauth != nullptr);
  CHECK_FALSE(unauth->value("authenticated", true));
  CHECK_MESSAGE(!(*unauth)["properties"].contains("ids"), unauth->dump());
  CHECK_MESSAGE(!(*unauth)["properties"].contains("mode"), unauth->dump());
  CHECK(unauth->dump().find("forged-") == std::string::npos);
  auto* big = find_audit(lines, "BulkOperation", "", big_status);
  REQUIRE(big != nullptr);
  CHECK(big->value("authenticated", false));
  const auto& ids = (*big)["properties"]["ids"];
  REQUIRE(ids.is_array());
  CHECK(ids.size() == 100);
  CHECK(ids[0] == "big-0");
  CHECK(ids[99] == "big-99");
  CHECK((*big)["properties"].value("idsTotal", 0) == 150);
  CHECK((*big)["properties"].value("mode", "") == "create");
}

TEST_CASE("a request the address throttle refuses leaves no audit line") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it-audit");
  s.remove_data_dir_at_exit();
  const std::string cfg = test::default_config(dir) +
                          "\n[throttling]\nrequests_per_minute_per_address = 3\n";
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  const std::string key = crypto::generate_key();
  int admitted = 0, refused = 0;
  for (int i = 0; i < 10 && refused < 3; ++i) {
    const std::string id = "flood-" + std::to_string(i);
    nlohmann::json body{{"registrationId", id},
                        {"attestation",
                         {{"type", "symmetricKey"},
                          {"symmetricKey", {{"primaryKey", key}, {"secondaryKey", key}}}}}};
    auto r = s.service("PUT", "/enrollments/" + id, body.dump());
    if (r.status == 429) {
      ++refused;
      continue;
    }
    CHECK_MESSAGE(r.status == 200, r.body);
    ++admitted;
  }
  REQUIRE(refused == 3);
  // A bulk write refused as well (its body would be parsed for the ids).
  nlohmann::json bulk{{"mode", "create"},
                      {"enrollments",
                       {{{"registrationId", "flood-bulk"}, {"attestation", {{"type", "tpm"}}}}}}};
  CHECK(s.service("POST", "/enrollments", bulk.dump()).status == 429);
  CHECK(s.stop() == 0);
  auto lines = audit_lines(dir + "/audit.log");
  CHECK(static_cast<int>(lines.size()) == admitted);
  for (const auto& l : lines) {
    CHECK_MESSAGE(l.value("resultSignature", 0) == 200, l.dump());
    CHECK(l.value("operationName", "") != "BulkOperation");
  }
}

} // TEST_SUITE
