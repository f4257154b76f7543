#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "metrics/diagnostic_log.hpp"

using namespace prov;

namespace {

std::string temp_file() {
  char tmpl[] = "/tmp/provisiond-log-XXXXXX";
  int fd = ::mkstemp(tmpl);
  REQUIRE(fd >= 0);
  ::close(fd);
  return tmpl;
}

// A record views its text: a temporary std::string is refused at compile time.
static_assert(!std::is_assignable_v<metrics::text_ref&, std::string>);
static_assert(!std::is_constructible_v<metrics::text_ref, std::string>);
static_assert(std::is_assignable_v<metrics::text_ref&, const std::string&>);
static_assert(std::is_assignable_v<metrics::text_ref&, const char*>);
static_assert(std::is_assignable_v<metrics::text_ref&, std::string_view>);

/// The record views `id`: the caller keeps it alive while the record is used.
/// (It took a const std::string&, so record(400, "dev") viewed a temporary
/// that was gone before the record was logged.)
metrics::operation_record record(int status, std::string_view id) {
  metrics::operation_record r;
  r.category = "DeviceOperations";
  r.operation = "DeviceRegistration";
  r.status = status;
  r.id = id;
  r.type = "Registration";
  r.protocol = "Http";
  r.caller_ip = "203.0.113.77";
  r.correlation_id = "c";
  return r;
}

std::vector<nlohmann::json> read_lines(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    REQUIRE_MESSAGE(!j.is_discarded(), "not JSON: " << line);
    out.push_back(std::move(j));
  }
  return out;
}

} // namespace

TEST_CASE("diagnostic log: every line from concurrent writers arrives once, as JSON") {
  auto path = temp_file();
  {
    std::unique_ptr<metrics::diagnostic_log> log;
    REQUIRE(!metrics::diagnostic_log::open({"info", path}, log));
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
      threads.emplace_back([&, t] {
        for (int i = 0; i < 2500; ++i)
          log->operation(record(202, "dev-" + std::to_string(t) + "-" + std::to_string(i)));
      });
    for (auto& th : threads)
      th.join();
    log->flush(); // everything enqueued so far is in the file after this
    auto lines = read_lines(path);
    CHECK(lines.size() == 10000);
    CHECK(log->dropped() == 0);
    std::set<std::string> ids;
    for (const auto& j : lines) {
      ids.insert(j.at("properties").at("id").get<std::string>());
      CHECK(j.at("callerIpAddress") == "203.0.113.XXX");
    }
    CHECK(ids.size() == 10000);
  }
  std::remove(path.c_str());
}

TEST_CASE("diagnostic log: level warn keeps only 5xx and warnings; shutdown drains") {
  auto path = temp_file();
  {
    std::unique_ptr<metrics::diagnostic_log> log;
    REQUIRE(!metrics::diagnostic_log::open({"warn", path}, log));
    log->operation(record(202, "ok-device"));
    log->operation(record(401, "client-error"));
    log->operation(record(503, "server-error"));
    log->info("not written");
    log->warn("written");
  } // the destructor writes what is pending
  auto lines = read_lines(path);
  REQUIRE(lines.size() == 2);
  CHECK(lines[0].at("resultSignature") == 503);
  CHECK(lines[0].at("level") == "Warning");
  CHECK(lines[1].at("message") == "written");
  std::remove(path.c_str());
}

TEST_CASE("mask_ip hides the host part") {
  CHECK(metrics::mask_ip("10.1.2.3") == "10.1.2.XXX");
  CHECK(metrics::mask_ip("2001:db8:1:2::5") == "2001:db8:1::XXXX");
  CHECK(metrics::mask_ip("") == "");
}

TEST_CASE("append_fixed3 writes what %.3f writes") {
  auto fixed3 = [](double v) {
    std::string s;
    prov::metrics::append_fixed3(s, v);
    return s;
  };
  auto printf3 = [](double v) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.3f", v);
    return std::string(buf);
  };
  for (double v : {0.0, -0.0, 0.0004, -0.0004, 0.001, 1.5, 12.25, 999.9994, 1234567.891, -3.25,
                   1e14, 1e16, -1e16, std::nan(""), HUGE_VAL, -HUGE_VAL})
    CHECK_MESSAGE(fixed3(v) == printf3(v), v);
  // Durations as they come: microsecond clock readings divided into ms.
  std::mt19937_64 gen(7);
  std::uniform_int_distribution<int64_t> ns(0, 600'000'000'000);
  for (int i = 0; i < 100000; ++i) {
    double v = static_cast<double>(ns(gen)) / 1e6;
    auto a = fixed3(v), b = printf3(v);
    if (a != b) // only a tie at the last digit may round the other way
      REQUIRE_MESSAGE(std::abs(std::stod(a) - std::stod(b)) <= 0.0010001, v);
  }
}

TEST_CASE("diagnostic log: fields keep their text whether plain, escaped or long") {
  auto path = temp_file();
  const std::vector<std::string> values = {"", "plain-id.01", "quote\"and\\slash",
                                           "tab\there", "caf\xc3\xa9", std::string(185, 'x'),
                                           std::string(186, 'y'), std::string(400, 'z')};
  {
    std::unique_ptr<metrics::diagnostic_log> log;
    REQUIRE(!metrics::diagnostic_log::open({"info", path}, log));
    std::vector<std::string> codes; // the record holds views
    for (const auto& v : values)
      codes.push_back(v.empty() ? "" : "400" + v);
    for (std::size_t i = 0; i < values.size(); ++i) {
      const auto& v = values[i];
      auto r = record(400, "dev");
      r.correlation_id = v;
      r.error_code = codes[i];
      r.description = v;
      log->operation(r);
    }
    log->flush();
    auto lines = read_lines(path);
    REQUIRE(lines.size() == values.size());
    for (std::size_t i = 0; i < values.size(); ++i) {
      CAPTURE(values[i]);
      CHECK(lines[i].at("correlationId") == values[i]);
      CHECK(lines[i].at("operationName") == "DeviceRegistration");
      if (!values[i].empty()) {
        CHECK(lines[i].at("errorCode") == "400" + values[i]);
        CHECK(lines[i].at("resultDescription") == values[i]);
      }
    }
  }
  std::remove(path.c_str());
}

TEST_CASE("diagnostic log: a new log file is created 0600 whatever the umask") {
  auto path = temp_file();
  std::remove(path.c_str());
  const mode_t old = ::umask(0); // the CLI's umask is not the library's to rely on
  std::unique_ptr<metrics::diagnostic_log> log;
  auto err = metrics::diagnostic_log::open({"info", path}, log);
  ::umask(old);
  REQUIRE_MESSAGE(err.ok(), err.message);
  log->info("created");
  log->flush();
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  log.reset();
  std::remove(path.c_str());
}

namespace {

/// Runs `fn` with stderr redirected to a file; returns what was written.
template <class Fn>
std::string capture_stderr(Fn&& fn) {
  const std::string path = temp_file();
  std::fflush(stderr);
  const int saved = ::dup(2);
  REQUIRE(saved >= 0);
  const int fd = ::open(path.c_str(), O_WRONLY | O_TRUNC);
  REQUIRE(fd >= 0);
  ::dup2(fd, 2);
  ::close(fd);
  fn();
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::remove(path.c_str());
  return text;
}

} // namespace

TEST_CASE("diagnostic log: an existing file others may read is tightened to 0600, or named") {
  auto path = temp_file();
  REQUIRE(::chmod(path.c_str(), 0644) == 0);
  std::unique_ptr<metrics::diagnostic_log> log;
  auto out = capture_stderr([&] { REQUIRE(metrics::diagnostic_log::open({"info", path}, log).ok()); });
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK_MESSAGE(out.find("'" + path + "' was mode 0644") != std::string::npos, out);
  log.reset();
  // Another user's file: left as it is, with a warning naming it (root can
  // hand the file to another user; others cannot make that case).
  if (::geteuid() == 0) {
    REQUIRE(::chmod(path.c_str(), 0640) == 0);
    REQUIRE(::chown(path.c_str(), 65534, 65534) == 0);
    out = capture_stderr([&] { REQUIRE(metrics::diagnostic_log::open({"info", path}, log).ok()); });
    REQUIRE(::stat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0640);
    CHECK_MESSAGE(out.find("WARNING: log file '" + path + "' is mode 0640") != std::string::npos,
                  out);
    CHECK_MESSAGE(out.find("owned by uid 65534") != std::string::npos, out);
    log.reset();
  }
  std::remove(path.c_str());
}
