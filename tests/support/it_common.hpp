#pragma once
// Helpers shared by integration test files that use one server per executable.

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "storage/store.hpp"
#include "tests/support/metrics_scrape.hpp"
#include "tests/support/server_process.hpp"

namespace prov::test {

/// Starts `s` on a fresh data dir (removed at exit) with `register_wait_ms`
/// set, and a metrics listener when `metrics`; returns the dir.
inline std::string start_with_wait(server_process& s, int register_wait_ms,
                                   bool metrics = false) {
  auto dir = make_temp_dir("provisiond-it");
  s.remove_data_dir_at_exit();
  auto cfg = with_device_api(default_config(dir),
                             "register_wait_ms = " + std::to_string(register_wait_ms));
  if (metrics)
    cfg = with_metrics(cfg);
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  return dir;
}

/// How many `pending` entries (accepted, unfinished operations) a stopped
/// server left in the store under `dir`.
inline std::size_t pending_entries(const std::string& dir) {
  std::unique_ptr<storage::store> db;
  auto err = storage::store::open(dir + "/db", storage::store_options{}, db);
  REQUIRE_MESSAGE(!err, err.message);
  std::size_t n = 0;
  REQUIRE(!db->scan(storage::cf::pending, "", 0, [&](std::string_view, std::string_view) {
    ++n;
    return true;
  }));
  return n;
}

/// One server for the whole executable; tests use distinct ids. A register
/// waits up to 5 s for its outcome, so a 200 answer on register is certain
/// even on a loaded machine (the product default is 250 ms).
inline server_process& shared_server() {
  static server_process s;
  static bool started = false;
  if (!started) {
    auto dir = make_temp_dir("provisiond-it");
    s.remove_data_dir_at_exit();
    auto err = s.start(with_device_api(default_config(dir), "register_wait_ms = 5000"), dir);
    REQUIRE_MESSAGE(!err, err.message);
    started = true;
  }
  return s;
}

/// Parses a response body, failing the test when it is not JSON.
inline nlohmann::json parse_json(const std::string& text) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  REQUIRE_MESSAGE(!j.is_discarded(), "not JSON: " << text);
  return j;
}

/// Creates (or replaces) a symmetric-key enrollment group whose primary and
/// secondary key are both `key`.
inline void create_group(const server_process& s, const std::string& id,
                         const std::string& key) {
  nlohmann::json body{{"enrollmentGroupId", id},
                      {"attestation",
                       {{"type", "symmetricKey"},
                        {"symmetricKey", {{"primaryKey", key}, {"secondaryKey", key}}}}}};
  auto r = s.service("PUT", "/enrollmentGroups/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

/// Every assignment event of the outbox (GET /assignments), following `next`.
inline std::vector<nlohmann::json> all_assignments(const server_process& s) {
  std::vector<nlohmann::json> out;
  uint64_t after = 0;
  for (;;) {
    auto r = s.service("GET", "/assignments?after=" + std::to_string(after) + "&limit=1000");
    REQUIRE_MESSAGE(r.status == 200, r.body);
    auto j = parse_json(r.body);
    REQUIRE(j["events"].is_array());
    for (auto& e : j["events"])
      out.push_back(e);
    if (j["events"].empty()) {
      CHECK(j["next"].get<uint64_t>() == after); // the last page does not move `next`
      return out;
    }
    after = j["next"].get<uint64_t>();
  }
}

/// Registers devices `<prefix><thread>-<n>` from 16 threads for `burst`,
/// then SIGKILLs the server. Returns the operations that got their 202 (or
/// 200) answer (operation id -> registration id); `sent` counts the PUTs.
template <class KeyOf>
std::map<std::string, std::string> burst_then_kill9(server_process& s, const std::string& prefix,
                                                    KeyOf key_of,
                                                    std::chrono::milliseconds burst,
                                                    int& sent, int* answered_202 = nullptr) {
  std::atomic<bool> stop{false};
  std::atomic<int> puts{0};
  std::mutex mtx;
  std::map<std::string, std::string> accepted;
  std::vector<std::thread> pool;
  for (int t = 0; t < 16; ++t)
    pool.emplace_back([&, t] {
      auto c = s.client();
      for (int i = 0; !stop.load(); ++i) {
        auto id = prefix + std::to_string(t) + "-" + std::to_string(i);
        net::http_headers h;
        h.add("Authorization", s.device_auth(id, key_of(id)));
        h.add("Content-Type", "application/json");
        net::https_response resp;
        ++puts;
        auto err = c.request("PUT", "/" + s.id_scope() + "/registrations/" + id
                                      + "/register?api-version=2019-03-31",
                             h, nlohmann::json{{"registrationId", id}}.dump(), resp);
        if (err)
          break; // the server is gone
        // 202, or 200 when the outcome arrived within register_wait_ms:
        // either way the operation was recorded durably before the answer.
        if (resp.status == 202 || resp.status == 200) {
          auto j = nlohmann::json::parse(resp.body);
          std::lock_guard<std::mutex> g{mtx};
          if (answered_202 && resp.status == 202)
            ++*answered_202;
          accepted[j.value("operationId", "")] = id;
        }
      }
    });
  std::this_thread::sleep_for(burst);
  s.kill9();
  stop = true;
  for (auto& th : pool)
    th.join();
  sent = puts.load();
  return accepted;
}

/// Polls every accepted operation (operation id -> registration id) until it
/// is terminal or `attempts` polls 20 ms apart have passed; returns how many
/// did not end `assigned` (each one is reported with MESSAGE).
template <class KeyOf>
int count_not_assigned(const server_process& s, net::https_client& c,
                       const std::map<std::string, std::string>& accepted, KeyOf key_of,
                       int attempts) {
  int not_assigned = 0;
  for (const auto& [op, id] : accepted) {
    nlohmann::json j;
    for (int attempt = 0; attempt < attempts; ++attempt) {
      net::http_headers h;
      h.add("Authorization", s.device_auth(id, key_of(id)));
      net::https_response resp;
      REQUIRE(!c.request("GET", "/" + s.id_scope() + "/registrations/" + id + "/operations/"
                                  + op + "?api-version=2019-03-31",
                         h, {}, resp));
      j = nlohmann::json::parse(resp.body);
      if (resp.status == 200)
        break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (j.value("status", "") != "assigned") {
      ++not_assigned;
      MESSAGE("operation " << op << " of " << id << ": " << j.dump());
    }
  }
  return not_assigned;
}

} // namespace prov::test
