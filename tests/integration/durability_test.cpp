// Load, persistence and crash durability against the real server process.

#include <doctest/doctest.h>

#include <atomic>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "messages/crypto.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/server_process.hpp"

using namespace prov;
using nlohmann::json;

namespace {

const std::string group_key = crypto::generate_key();

void create_group(const test::server_process& s, const std::string& id) {
  test::create_group(s, id, group_key);
}

using test::all_assignments;

std::string device_key(const std::string& reg_id) {
  return *crypto::derive_device_key(group_key, reg_id);
}

} // namespace

TEST_SUITE("durability") {

TEST_CASE("1,000 devices register concurrently over HTTPS and each is assigned once") {
  test::server_process s;
  REQUIRE_MESSAGE(!s.start(), s.log());
  create_group(s, "load-group");
  constexpr int threads = 200, per_thread = 5;
  std::atomic<int> assigned{0}, failures{0};
  std::mutex mtx;
  std::map<std::string, std::string> hub_of;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      auto c = s.client();
      for (int i = 0; i < per_thread; ++i) {
        auto id = "load-" + std::to_string(t) + "-" + std::to_string(i);
        int status = 0;
        auto res = test::register_device(c, s, id, device_key(id), status, 50);
        if (status == 200 && res.value("status", "") == "assigned") {
          ++assigned;
          std::lock_guard<std::mutex> g{mtx};
          hub_of[id] = res["registrationState"].value("assignedHub", "");
        } else {
          ++failures;
          std::lock_guard<std::mutex> g{mtx};
          MESSAGE("device " << id << " status " << status << ": " << res.dump());
        }
      }
    });
  for (auto& th : pool)
    th.join();
  CHECK(failures.load() == 0);
  CHECK(assigned.load() == threads * per_thread);
  std::map<std::string, int> per_hub;
  for (auto& [id, hub] : hub_of)
    ++per_hub[hub];
  CHECK(per_hub.size() == 2); // both linked hubs used
  auto events = all_assignments(s);
  CHECK(events.size() == static_cast<size_t>(threads * per_thread));
  std::set<std::string> ops;
  for (auto& e : events)
    ops.insert(e["data"].value("operationId", ""));
  CHECK(ops.size() == events.size());

  SUBCASE("and everything survives a restart") {
    REQUIRE(s.stop() == 0);
    REQUIRE_MESSAGE(!s.restart(), s.log());
    for (const auto* id : {"load-0-0", "load-199-4", "load-100-2"}) {
      auto r = s.service("GET", std::string("/registrations/") + id);
      REQUIRE_MESSAGE(r.status == 200, r.body);
      auto j = json::parse(r.body);
      CHECK(j.value("status", "") == "assigned");
      CHECK(j.value("assignedHub", "") == hub_of[id]);
    }
    CHECK(all_assignments(s).size() == events.size());
  }
}

TEST_CASE("kill -9 during a burst: every 202 ends assigned, no operation assigned twice") {
  test::server_process s;
  // 202 at once (no wait for the outcome): operations are still in flight
  // at the kill and must resume after the restart.
  auto dir = test::make_temp_dir("provisiond-it");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start(test::with_device_api(test::default_config(dir), "register_wait_ms = 0"),
                           dir),
                  s.log());
  create_group(s, "crash-group");
  // Let the burst run, then kill without warning.
  int sent = 0;
  auto accepted =
    test::burst_then_kill9(s, "crash-", device_key, std::chrono::milliseconds(1500), sent);
  MESSAGE("requests sent: " << sent << ", accepted before kill: " << accepted.size());
  REQUIRE(accepted.size() > 50);
  REQUIRE_MESSAGE(!s.restart(), s.log());
  // Every accepted operation reaches `assigned` after the restart.
  auto c = s.client();
  int not_assigned = test::count_not_assigned(s, c, accepted, device_key, 500);
  CHECK(not_assigned == 0);
  // Exactly one assignment event per accepted operation, none twice.
  auto events = all_assignments(s);
  std::map<std::string, int> count;
  for (auto& e : events)
    ++count[e["data"].value("operationId", "")];
  for (auto& [op, n] : count)
    CHECK_MESSAGE(n == 1, "operation " << op << " has " << n << " events");
  for (auto& [op, id] : accepted)
    CHECK_MESSAGE(count.count(op) == 1, "accepted operation " << op << " has no event");
}

} // TEST_SUITE
