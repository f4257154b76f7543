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
#include "tests/support/metrics_scrape.hpp"
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

/// Exactly one assignment event per accepted operation (operation id ->
/// registration id), and none for any operation twice.
void check_assigned_once(const test::server_process& s,
                         const std::map<std::string, std::string>& accepted) {
  std::map<std::string, int> count;
  for (auto& e : all_assignments(s))
    ++count[e["data"].value("operationId", "")];
  for (auto& [op, n] : count)
    CHECK_MESSAGE(n == 1, "operation " << op << " has " << n << " events");
  for (auto& [op, id] : accepted)
    CHECK_MESSAGE(count.count(op) == 1, "accepted operation " << op << " has no event");
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
  test::start_with_wait(s, 0);
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
  check_assigned_once(s, accepted);
}

TEST_CASE("kill -9 with deferred accepts: every 200 and 202 ends assigned once, none left pending") {
  // Embedded with register_wait_ms > 0 a register's accept is recorded only
  // by its terminal commit, or first when its wait expires into a 202. In
  // the clean run the hand-off is held back as long as the wait, so both
  // answers occur (about 15% 202s: a wait's timer can fire late) and many
  // late accept records land after their terminal commit (about 320 of 640
  // left a stale `pending` entry before the outcome deleted it).
  test::server_process s;
  s.set_pipeline_delay_ms(10);
  auto dir = test::start_with_wait(s, 10);
  create_group(s, "deferred-group");
  { // a clean run first: a late accept record whose terminal commit came
    // first is deleted once the outcome arrives, so a clean stop leaves no
    // `pending` entry behind
    std::atomic<int> not_assigned{0};
    std::vector<std::thread> pool;
    for (int t = 0; t < 16; ++t)
      pool.emplace_back([&, t] {
        auto c = s.client();
        for (int i = 0; i < 40; ++i) {
          auto id = "clean-" + std::to_string(t) + "-" + std::to_string(i);
          int status = 0;
          auto res = test::register_device(c, s, id, device_key(id), status);
          if (res.value("status", "") != "assigned")
            ++not_assigned;
        }
      });
    for (auto& th : pool)
      th.join();
    CHECK(not_assigned.load() == 0);
    REQUIRE(s.stop() == 0);
    CHECK(test::pending_entries(dir) == 0);
  }
  // Now every wait expires long before its outcome, so at the kill hundreds
  // of operations were answered 202 with only their late accept record.
  s.set_pipeline_delay_ms(300);
  REQUIRE_MESSAGE(!s.restart(), s.log());
  int sent = 0, answered_202 = 0;
  auto accepted = test::burst_then_kill9(s, "deferred-", device_key,
                                         std::chrono::milliseconds(1500), sent, &answered_202);
  MESSAGE("requests sent: " << sent << ", answered before kill: " << accepted.size()
                            << " (202: " << answered_202 << ")");
  REQUIRE(accepted.size() > 50);
  CHECK(answered_202 == static_cast<int>(accepted.size()));
  s.set_pipeline_delay_ms(0);
  REQUIRE_MESSAGE(!s.restart(), s.log());
  auto c = s.client();
  CHECK(test::count_not_assigned(s, c, accepted, device_key, 500) == 0);
  check_assigned_once(s, accepted);
  REQUIRE(s.stop() == 0);
  CHECK(test::pending_entries(dir) == 0);
}

TEST_CASE("SIGTERM with registers parked before their accept is recorded: each gets a 202 that holds") {
  // The hand-off is held back 8 s, longer than the drain lets in-flight
  // work settle (5 s), so at drain_atom the registers still wait with no
  // record: the drain records each accept before its 202.
  test::server_process s;
  s.set_pipeline_delay_ms(8000);
  auto dir = test::start_with_wait(s, 10000, true);
  create_group(s, "drain-group");
  constexpr int devices = 4;
  std::vector<net::https_response> answers(devices);
  std::vector<std::thread> pool;
  for (int i = 0; i < devices; ++i)
    pool.emplace_back([&, i] {
      auto id = "drain-" + std::to_string(i);
      auto c = s.client();
      net::http_headers h;
      h.add("Authorization", s.device_auth(id, device_key(id)));
      h.add("Content-Type", "application/json");
      if (auto err = c.request("PUT", "/" + s.id_scope() + "/registrations/" + id
                                        + "/register?api-version=2021-06-01",
                               h, json{{"registrationId", id}}.dump(), answers[i]))
        answers[i].status = -1;
    });
  // SIGTERM only once all of them are parked (a register read after the
  // signal would get 503, one not yet connected no answer at all).
  auto addr = test::metrics_addr(s);
  REQUIRE(!addr.empty());
  double inflight = 0;
  for (int i = 0; i < 200 && inflight < devices; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
    inflight = test::sum(test::scrape(addr), "dps_operations_inflight");
  }
  REQUIRE(inflight == devices);
  CHECK(s.stop() == 0);
  for (auto& th : pool)
    th.join();
  std::map<std::string, std::string> accepted;
  for (int i = 0; i < devices; ++i) {
    CHECK_MESSAGE(answers[i].status == 202, answers[i].body);
    if (answers[i].status == 202)
      accepted[json::parse(answers[i].body).value("operationId", "")] = "drain-" + std::to_string(i);
  }
  CHECK(test::pending_entries(dir) == devices);
  s.set_pipeline_delay_ms(0);
  REQUIRE_MESSAGE(!s.restart(), s.log());
  auto c = s.client();
  CHECK(test::count_not_assigned(s, c, accepted, device_key, 500) == 0);
  CHECK(all_assignments(s).size() == devices);
}

} // TEST_SUITE
