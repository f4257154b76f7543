// What `provisiond serve` does to its surroundings at start: the data dir
// and everything in it private to the server's user, and no key in the
// banner when stdout is not a terminal.

#include <doctest/doctest.h>

#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "messages/crypto.hpp"
#include "tests/support/it_common.hpp"

using namespace prov;
namespace fs = std::filesystem;

namespace {

unsigned mode_of(const std::string& path) {
  struct stat st{};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

/// Every file and directory under `dir` whose mode has group or other bits,
/// with its mode. The test harness's own files (cfg.toml, server.log) are
/// not provisiond's and are skipped.
std::string readable_by_others(const std::string& dir) {
  std::string out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    auto name = e.path().filename().string();
    if (e.path().parent_path() == fs::path(dir) && (name == "cfg.toml" || name == "server.log"))
      continue;
    auto m = mode_of(e.path().string());
    if ((m & 077) != 0) {
      char octal[16];
      std::snprintf(octal, sizeof octal, "%04o", m);
      out += e.path().string() + " " + octal + "\n";
    }
  }
  return out;
}

} // namespace

TEST_SUITE("startup") {

TEST_CASE("a pre-made 0755 data dir is set to 0700 and nothing in it is readable by others") {
  // Before: only a data dir provisiond created was 0700; in a pre-made 0755
  // one, db/ was 0755 and RocksDB's files 0644, and they hold enrollment keys.
  auto dir = test::make_temp_dir("provisiond-it-perm");
  REQUIRE(::chmod(dir.c_str(), 0755) == 0);
  test::server_process s;
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  test::create_group(s, "perm-group", crypto::generate_key()); // a key into RocksDB
  CHECK(mode_of(dir) == 0700);
  CHECK_MESSAGE(s.log().find("was mode 0755, readable by other users; set it to 0700")
                  != std::string::npos,
                s.log());
  auto open = readable_by_others(dir);
  CHECK_MESSAGE(open.empty(), "readable by others while serving:\n" << open);
  CHECK(s.stop() == 0); // a clean stop flushes the memtable into an SST file
  open = readable_by_others(dir);
  CHECK_MESSAGE(open.empty(), "readable by others after a stop:\n" << open);
}

TEST_CASE("a data dir other users can read and that is not ours stops the start") {
  if (::geteuid() != 0) {
    MESSAGE("skipped: needs root to give the data dir to another user");
    return;
  }
  const passwd* nobody = ::getpwnam("nobody");
  REQUIRE(nobody != nullptr);
  auto dir = test::make_temp_dir("provisiond-it-perm");
  test::server_process s;
  s.remove_data_dir_at_exit();
  REQUIRE(::chmod(dir.c_str(), 0755) == 0);
  REQUIRE(::chown(dir.c_str(), nobody->pw_uid, nobody->pw_gid) == 0);
  auto err = s.start(test::default_config(dir), dir);
  REQUIRE(err);
  CHECK_MESSAGE(err.message.find("is mode 0755, so other users can read the keys in it, and it "
                                 "is owned by uid "
                                 + std::to_string(nobody->pw_uid))
                  != std::string::npos,
                err.message);
  CHECK(mode_of(dir) == 0755); // left as it was
}

TEST_CASE("the banner shows no key when stdout is not a terminal, and says how to get it") {
  // Before: the owner policy's connection string, key included, was printed
  // on every start; under systemd it landed in the journal.
  test::server_process s; // stdout is a file (server.log)
  auto dir = test::make_temp_dir("provisiond-it-banner");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start({}, dir), s.log());
  std::ifstream in(dir + "/identity.json");
  auto key = nlohmann::json::parse(in).value("primary_key", "");
  REQUIRE(!key.empty());
  auto log = s.log();
  CHECK_MESSAGE(log.find(key) == std::string::npos, log);
  CHECK(log.find("SharedAccessKey=") == std::string::npos);
  // The command the banner points at prints it.
  const std::string run = "not shown (stdout is not a terminal); run provisiond ";
  auto at = log.find(run);
  REQUIRE_MESSAGE(at != std::string::npos, log);
  auto args = log.substr(at + run.size(), log.find('\n', at) - at - run.size());
  CHECK(args == "connection-string --config " + dir + "/cfg.toml --data-dir " + dir);
  std::string out;
  if (FILE* p = ::popen((std::string(std::getenv("PROVISIOND_BIN")) + " " + args).c_str(), "r")) {
    char buf[512];
    while (std::fgets(buf, sizeof buf, p))
      out += buf;
    CHECK(::pclose(p) == 0);
  }
  CHECK_MESSAGE(out.find("SharedAccessKey=" + key) != std::string::npos, out);
}

} // TEST_SUITE
