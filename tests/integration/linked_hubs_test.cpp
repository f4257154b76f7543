// Linked hubs at run time, against the real provisiond process over TLS:
// the service API (/linkedHubs) and the CLI (`provisiond hubs ...`) add,
// update and remove hubs without a restart; bad input stores nothing;
// devices register throughout a change; the set survives a restart and
// [[hubs]] only seeds it. Health: small local HTTPS servers answer each
// hub's health probe; a hub that fails it is skipped and comes back.

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gateway/https_server.hpp"
#include "messages/crypto.hpp"
#include "tests/support/cli.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/kafka_it.hpp"
#include "tests/support/local_https.hpp"
#include "tests/support/server_process.hpp"
#include "tests/support/test_certs.hpp"

using namespace prov;
using nlohmann::json;

namespace {

const char* const hub_a = "hub-a.example.net";
const char* const hub_b = "hub-b.example.net";

/// The hubs' health endpoints: GET /health/<name> answers the status set
/// for <name> (200 unless changed), after the delay set for it.
class health_handler final : public gateway::handler {
public:
  void handle(gateway::http_request req, gateway::respond_fn respond) override {
    int status = 200;
    int delay_ms = 0;
    if (req.path.rfind("/health/gate-", 0) == 0)
      return gate(std::move(respond));
    {
      std::lock_guard<std::mutex> lk(mtx_);
      ++probes_[req.path];
      if (auto it = status_.find(req.path); it != status_.end())
        status = it->second;
      if (auto it = delay_.find(req.path); it != delay_.end())
        delay_ms = it->second;
    }
    if (delay_ms > 0)
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    gateway::http_response r;
    r.status = status;
    r.body = status == 200 ? R"({"status":"ok"})" : R"({"status":"down"})";
    r.headers.emplace_back("Content-Type", "application/json");
    respond(std::move(r));
  }
  void set_status(const std::string& name, int status) {
    std::lock_guard<std::mutex> lk(mtx_);
    status_["/health/" + name] = status;
  }
  void set_delay(const std::string& name, int ms) {
    std::lock_guard<std::mutex> lk(mtx_);
    delay_["/health/" + name] = ms;
  }
  int probes(const std::string& name) {
    std::lock_guard<std::mutex> lk(mtx_);
    return probes_["/health/" + name];
  }

  /// /health/gate-*: each probe is held until `n` are waiting at once, then
  /// all are answered 200. A prober that waits for one answer before it
  /// sends the next never gets one.
  void set_gate(std::size_t n) {
    std::lock_guard<std::mutex> lk(mtx_);
    gate_n_ = n;
  }
  std::size_t gate_peak() {
    std::lock_guard<std::mutex> lk(mtx_);
    return gate_peak_;
  }
  /// Answers the held probes (the test's end).
  void open_gate() {
    std::vector<gateway::respond_fn> held;
    {
      std::lock_guard<std::mutex> lk(mtx_);
      held.swap(gate_held_);
      gate_n_ = 0;
    }
    for (auto& r : held)
      r(ok());
  }

private:
  static gateway::http_response ok() {
    gateway::http_response r;
    r.status = 200;
    r.body = R"({"status":"ok"})";
    r.headers.emplace_back("Content-Type", "application/json");
    return r;
  }
  void gate(gateway::respond_fn respond) {
    std::vector<gateway::respond_fn> release;
    {
      std::lock_guard<std::mutex> lk(mtx_);
      gate_held_.push_back(std::move(respond));
      gate_peak_ = std::max(gate_peak_, gate_held_.size());
      if (gate_held_.size() >= gate_n_)
        release.swap(gate_held_);
    }
    for (auto& r : release)
      r(ok());
  }

  std::vector<gateway::respond_fn> gate_held_;
  std::size_t gate_n_ = 0, gate_peak_ = 0;
  std::mutex mtx_;
  std::map<std::string, int> status_, delay_, probes_;
};

/// The health server and provisiond, started once for the file. hub-a and
/// hub-b have health endpoints, probed every 200 ms; one failed probe makes
/// a hub unhealthy, one good one healthy again.
struct fixture {
  health_handler handler;
  test::local_https_server health{handler, "Hub Health Test Root", 31, 4};
  test::server_process prov;
  std::string base = health.base(); ///< https://localhost:PORT

  fixture() {
    const std::string ca = health.ca_file();
    const std::string data = test::make_temp_dir("provisiond-hubs-data");
    prov.remove_data_dir_at_exit();
    std::string cfg = "data_dir = \"" + data + "\"\n"
                      "[device_api]\nlisten = \"127.0.0.1:0\"\nretry_after_seconds = 1\n"
                      "register_wait_ms = 5000\n"
                      "[metrics]\nlisten = \"127.0.0.1:0\"\n"
                      "[hub_health]\ninterval_ms = 200\ntimeout_ms = 1500\n"
                      "unhealthy_after = 1\nhealthy_after = 1\nca_file = \"" + ca + "\"\n"
                      "[[hubs]]\nhostname = \"" + hub_a + "\"\nhealth_endpoint = \"" + base
                      + "/health/a\"\n"
                      "[[hubs]]\nhostname = \"" + hub_b + "\"\nhealth_endpoint = \"" + base
                      + "/health/b\"\nregion = \"westeurope\"\n";
    auto err = prov.start(cfg, data);
    REQUIRE_MESSAGE(!err, err.message);
  }
  ~fixture() {
    prov.stop();
    health.stop();
  }
};

fixture& fx() {
  static fixture f;
  return f;
}

const std::string group_key = crypto::base64_encode(std::string(32, 'g'));

std::string device_key(const std::string& id) {
  return *crypto::derive_device_key(group_key, id);
}

/// The linked hubs' names, in the order the API lists them.
std::vector<std::string> hub_names(const test::server_process& s) {
  auto r = s.service("GET", "/linkedHubs");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  std::vector<std::string> out;
  const json doc = test::parse_json(r.body);
  for (const auto& h : doc["value"])
    out.push_back(h["name"].get<std::string>());
  return out;
}

std::string joined(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& x : v)
    out += (out.empty() ? "" : ",") + x;
  return out;
}

/// The linked hubs are exactly `want`, in that order.
#define CHECK_HUBS(srv, ...)                                                                  \
  do {                                                                                        \
    auto got_ = hub_names(srv);                                                               \
    std::vector<std::string> want_ = __VA_ARGS__;                                             \
    CHECK_MESSAGE(got_ == want_, "linked hubs: " << joined(got_));                            \
  } while (false)

json get_hub(const std::string& name) {
  auto r = fx().prov.service("GET", "/linkedHubs/" + name);
  REQUIRE_MESSAGE(r.status == 200, r.body);
  return test::parse_json(r.body);
}

/// Waits (up to 30 s) until the hub's health status is `status`.
json wait_health(const std::string& name, const std::string& status) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  json h;
  while (std::chrono::steady_clock::now() < deadline) {
    h = get_hub(name);
    if (h.contains("health") && h["health"].value("status", "") == status)
      return h;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  FAIL("hub " << name << " did not become " << status << ": " << h.dump());
  return h;
}

json register_one(const std::string& id, const std::string& key) {
  auto c = fx().prov.client();
  int status = 0;
  auto j = test::register_device(c, fx().prov, id, key, status, 100);
  REQUIRE_MESSAGE(status == 200, j.dump());
  return j;
}

/// Expects `r` to be an Azure error body with `code`.
void check_error(const net::https_response& r, int code) {
  CHECK_MESSAGE(r.status == code / 1000, r.body);
  auto j = json::parse(r.body, nullptr, false);
  REQUIRE_MESSAGE(j.is_object(), r.body);
  CHECK_MESSAGE(j.value("errorCode", 0) == code, r.body);
  CHECK(!j.value("message", "").empty());
}

} // namespace

TEST_CASE("the service API lists, adds, updates and removes linked hubs; [[hubs]] seeded them") {
  auto& s = fx().prov;
  CHECK_HUBS(s, std::vector<std::string>{hub_a, hub_b});
  auto b = get_hub(hub_b);
  CHECK(b["allocationWeight"] == 1);
  CHECK(b["applyAllocationPolicy"] == true);
  CHECK(b["location"] == "westeurope");
  CHECK(b["healthEndpoint"] == fx().base + "/health/b");

  auto r = s.service("PUT", "/linkedHubs/hub-c.example.net",
                     R"({"allocationWeight":5,"location":"northeurope"})");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto c = test::parse_json(r.body);
  CHECK(c == json{{"name", "hub-c.example.net"},
                  {"allocationWeight", 5},
                  {"applyAllocationPolicy", true},
                  {"location", "northeurope"}});
  CHECK(get_hub("hub-c.example.net") == c);
  // Update: a full replacement (the CLI's update merges before it PUTs).
  r = s.service("PUT", "/linkedHubs/hub-c.example.net",
                R"({"name":"hub-c.example.net","allocationWeight":7,"applyAllocationPolicy":false})");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(get_hub("hub-c.example.net")["allocationWeight"] == 7);
  CHECK(get_hub("hub-c.example.net")["applyAllocationPolicy"] == false);
  CHECK_HUBS(s, std::vector<std::string>{hub_a, hub_b, "hub-c.example.net"});

  r = s.service("DELETE", "/linkedHubs/hub-c.example.net");
  CHECK_MESSAGE(r.status == 204, r.body);
  CHECK_HUBS(s, std::vector<std::string>{hub_a, hub_b});
  check_error(s.service("GET", "/linkedHubs/hub-c.example.net"), 404206);
  check_error(s.service("DELETE", "/linkedHubs/hub-c.example.net"), 404206);
}

TEST_CASE("bad input to the hubs API is refused with the right errorCode and stores nothing") {
  auto& s = fx().prov;
  const std::string h = "/linkedHubs/hub-bad.example.net";
  const std::pair<const char*, int> bodies[] = {
    {R"({"allocationWeight":0})", 400010},
    {R"({"allocationWeight":1001})", 400010},
    {R"({"allocationWeight":"5"})", 400010},
    {R"({"allocationWeight":2.5})", 400010},
    {R"({"applyAllocationPolicy":"yes"})", 400010},
    {R"({"location":42})", 400010},
    {R"({"healthEndpoint":"http://localhost/health"})", 400010},
    {R"({"healthEndpoint":"https://"})", 400010},
    {R"({"connectionString":"HostName=x"})", 400010},
    {R"({"name":"other.example.net"})", 400007},
    {R"([1,2])", 400010},
    {R"({"allocationWeight":)", 400001},
  };
  for (const auto& [body, code] : bodies) {
    CAPTURE(body);
    check_error(s.service("PUT", h, body), code);
  }
  // Not a host name in the path.
  check_error(s.service("PUT", "/linkedHubs/bad_host!", "{}"), 400010);
  check_error(s.service("PUT", "/linkedHubs/-x.example.net", "{}"), 400010);
  // The same checks as every service route: api-version, credential, rights,
  // content type, method.
  {
    auto c = s.client();
    net::http_headers hd;
    hd.add("Authorization", s.service_auth());
    net::https_response resp;
    REQUIRE(!c.request("GET", "/linkedHubs", hd, {}, resp));
    check_error(resp, 400003);
    net::https_response anon;
    REQUIRE(!c.request("GET", "/linkedHubs?api-version=2021-10-01", anon));
    check_error(anon, 401000);
  }
  {
    net::http_headers xml;
    xml.add("Content-Type", "application/xml");
    check_error(s.service("PUT", h, "<hub/>", xml), 415000);
  }
  check_error(s.service("POST", h, "{}"), 405000);
  check_error(s.service("PUT", "/linkedHubs", "{}"), 405000);
  // Nothing was stored.
  CHECK_HUBS(s, std::vector<std::string>{hub_a, hub_b});
  check_error(s.service("GET", h), 404206);
}

TEST_CASE("devices registering throughout hub add and remove: none fails, none lands on a "
          "removed hub afterwards, polls of devices on a removed hub still answer") {
  auto& s = fx().prov;
  test::create_group(s, "hubs-churn", group_key);
  std::atomic<bool> stop{false};
  std::atomic<int> phase{0}; ///< 0 before hub-c, 1 with hub-c, 2 after hub-c was removed
  struct outcome {
    std::string id, operation, hub, status;
    int phase = 0; ///< when the register was sent
  };
  std::mutex mtx;
  std::vector<outcome> done;
  std::vector<std::thread> pool;
  for (int t = 0; t < 4; ++t)
    pool.emplace_back([&, t] {
      auto c = s.client();
      for (int i = 0; !stop.load(); ++i) {
        const std::string id = "churn-" + std::to_string(t) + "-" + std::to_string(i);
        const int sent_in = phase.load();
        int status = 0;
        auto j = test::register_device(c, s, id, device_key(id), status, 50);
        outcome o{id, j.value("operationId", ""),
                  j.contains("registrationState")
                    ? j["registrationState"].value("assignedHub", "")
                    : "",
                  j.value("status", "http " + std::to_string(status)), sent_in};
        std::lock_guard<std::mutex> lk(mtx);
        done.push_back(std::move(o));
      }
    });
  auto count = [&] {
    std::lock_guard<std::mutex> lk(mtx);
    return done.size();
  };
  auto wait_for = [&](std::size_t n) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (count() < n && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    REQUIRE(count() >= n);
  };
  wait_for(40);
  auto r = s.service("PUT", "/linkedHubs/hub-c.example.net", "{}");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  phase = 1;
  wait_for(count() + 150);
  r = s.service("DELETE", "/linkedHubs/hub-c.example.net");
  REQUIRE_MESSAGE(r.status == 204, r.body);
  phase = 2;
  wait_for(count() + 100);
  stop = true;
  for (auto& th : pool)
    th.join();

  int failed = 0, on_c = 0, on_c_after_removal = 0;
  const outcome* moved_away = nullptr;
  for (const auto& o : done) {
    if (o.status != "assigned") {
      ++failed;
      MESSAGE(o.id << ": " << o.status);
    }
    if (o.hub == "hub-c.example.net") {
      ++on_c;
      if (o.phase == 2)
        ++on_c_after_removal;
      if (moved_away == nullptr)
        moved_away = &o;
    }
  }
  MESSAGE(done.size() << " registrations, " << on_c << " on the added (then removed) hub");
  CHECK(failed == 0);
  CHECK(on_c > 0);             // the added hub was used at once
  CHECK(on_c_after_removal == 0);
  // A device assigned to the removed hub: its operation and its record
  // still answer, unchanged.
  REQUIRE(moved_away != nullptr);
  auto c = s.client();
  net::http_headers ph;
  ph.add("Authorization", s.device_auth(moved_away->id, device_key(moved_away->id)));
  net::https_response resp;
  REQUIRE(!c.request("GET", "/" + s.id_scope() + "/registrations/" + moved_away->id
                              + "/operations/" + moved_away->operation
                              + "?api-version=2021-06-01",
                     ph, {}, resp));
  REQUIRE_MESSAGE(resp.status == 200, resp.body);
  CHECK(test::parse_json(resp.body)["registrationState"]["assignedHub"] == "hub-c.example.net");
  auto rec = s.service("GET", "/registrations/" + moved_away->id);
  REQUIRE_MESSAGE(rec.status == 200, rec.body);
  CHECK(test::parse_json(rec.body)["assignedHub"] == "hub-c.example.net");
}

TEST_CASE("an unhealthy hub is skipped by every policy, fails a registration that has no "
          "other with its own errorCode, and comes back when healthy") {
  auto& s = fx().prov;
  auto& health = fx().handler;
  // Both hubs are probed and healthy, with a measured round trip.
  auto a = wait_health(hub_a, "healthy");
  auto b = wait_health(hub_b, "healthy");
  CHECK(b["health"]["rttMs"].get<double>() >= 0);
  CHECK(health.probes("a") > 0);

  test::create_group(s, "hubs-health", group_key);
  // A static enrollment on hub-b alone.
  const std::string pinned = "pinned-to-b";
  const std::string pinned_key = crypto::base64_encode(std::string(32, 'p'));
  json body{{"registrationId", pinned},
            {"attestation", {{"type", "symmetricKey"},
                             {"symmetricKey", {{"primaryKey", pinned_key},
                                               {"secondaryKey", pinned_key}}}}},
            {"allocationPolicy", "static"},
            {"iotHubs", {hub_b}}};
  auto r = s.service("PUT", "/enrollments/" + pinned, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);

  health.set_status("b", 503);
  auto sick = wait_health(hub_b, "unhealthy");
  CHECK(sick["health"]["lastError"] == "health probe " + fx().base + "/health/b: HTTP 503");
  {
    auto m = test::scrape(test::metrics_addr(s));
    CHECK(test::sum(m, "dps_hub_healthy", {"hub=\"hub-b.example.net\""}) == 0);
    CHECK(test::sum(m, "dps_hub_healthy", {"hub=\"hub-a.example.net\""}) == 1);
    CHECK(test::sum(m, "dps_hub_health_probes_total",
                    {"hub=\"hub-b.example.net\"", "result=\"failure\""}) >= 1);
    CHECK(test::sum(m, "dps_hub_probe_rtt_seconds", {"hub=\"hub-a.example.net\""}) > 0);
  }
  // hashed: every device goes to the healthy hub.
  for (int i = 0; i < 12; ++i) {
    const std::string id = "sick-b-" + std::to_string(i);
    auto j = register_one(id, device_key(id));
    CHECK_MESSAGE(j["registrationState"]["assignedHub"] == hub_a, j.dump());
  }
  // static on the unhealthy hub: fails with no_healthy_hub, naming why.
  auto failed = register_one(pinned, pinned_key);
  CHECK(failed["status"] == "failed");
  CHECK(failed["registrationState"]["errorCode"] == 400210);
  const std::string msg = failed["registrationState"].value("errorMessage", "");
  CHECK_MESSAGE(msg.find("hub-b.example.net") != std::string::npos, msg);
  CHECK_MESSAGE(msg.find("HTTP 503") != std::string::npos, msg);

  // Healthy again: used again.
  health.set_status("b", 200);
  wait_health(hub_b, "healthy");
  auto ok = register_one(pinned, pinned_key);
  CHECK(ok["status"] == "assigned");
  CHECK(ok["registrationState"]["assignedHub"] == hub_b);
  std::set<std::string> hubs_used;
  for (int i = 0; i < 12; ++i) {
    const std::string id = "back-b-" + std::to_string(i);
    hubs_used.insert(register_one(id, device_key(id))["registrationState"]["assignedHub"]
                       .get<std::string>());
  }
  CHECK(hubs_used == std::set<std::string>{hub_a, hub_b});
  auto m = test::scrape(test::metrics_addr(s));
  CHECK(test::sum(m, "dps_hub_healthy", {"hub=\"hub-b.example.net\""}) == 1);
}

TEST_CASE("the CLI lists, adds, updates and removes hubs") {
  auto& s = fx().prov;
  const std::string common = " --data-dir " + s.data_dir();
  int rc = -1;
  auto out = test::run_cli("hubs add hub-cli.example.net --weight 3 --region eastus" + common, rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK(out.find("HOSTNAME") != std::string::npos);
  CHECK(out.find("hub-cli.example.net") != std::string::npos);
  out = test::run_cli("hubs update hub-cli.example.net --apply-allocation-policy false" + common, rc);
  REQUIRE_MESSAGE(rc == 0, out);
  auto h = get_hub("hub-cli.example.net");
  CHECK(h["allocationWeight"] == 3); // kept
  CHECK(h["location"] == "eastus");  // kept
  CHECK(h["applyAllocationPolicy"] == false);
  out = test::run_cli("hubs list" + common, rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK(out.find("HEALTH") != std::string::npos);
  CHECK(out.find("hub-a.example.net") != std::string::npos);
  CHECK(out.find("hub-cli.example.net") != std::string::npos);
  out = test::run_cli("hubs add bad_name" + common, rc);
  CHECK(rc != 0);
  CHECK_MESSAGE(out.find("400010") != std::string::npos, out);
  out = test::run_cli("hubs update hub-none.example.net --weight 2" + common, rc);
  CHECK(rc != 0);
  CHECK_MESSAGE(out.find("404206") != std::string::npos, out);
  out = test::run_cli("hubs remove hub-cli.example.net" + common, rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK_HUBS(s, std::vector<std::string>{hub_a, hub_b});
}

TEST_CASE("hub changes survive a restart, and [[hubs]] only seeds the first start") {
  test::server_process s;
  const std::string dir = test::make_temp_dir("provisiond-hubs-restart");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start(test::default_config(dir), dir), s.log());
  CHECK_HUBS(s, std::vector<std::string>{hub_a, hub_b});
  auto r = s.service("PUT", "/linkedHubs/hub-x.example.net", R"({"allocationWeight":9})");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  r = s.service("DELETE", std::string("/linkedHubs/") + hub_a);
  REQUIRE_MESSAGE(r.status == 204, r.body);
  REQUIRE(s.stop() == 0);
  REQUIRE_MESSAGE(!s.restart(), s.log());
  CHECK_HUBS(s, std::vector<std::string>{hub_b, "hub-x.example.net"});
  // A changed [[hubs]] on a later start: the stored set stays, with a note.
  REQUIRE(s.stop() == 0);
  std::string other = "data_dir = \"" + dir + "\"\n"
                      "[device_api]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"\"\n"
                      "[[hubs]]\nhostname = \"hub-new.example.net\"\n";
  test::server_process again;
  REQUIRE_MESSAGE(!again.start(other, dir), again.log());
  CHECK_HUBS(again, std::vector<std::string>{hub_b, "hub-x.example.net"});
  CHECK(again.log().find("[[hubs]] differs from the 2 stored linked hub(s)") != std::string::npos);
  again.stop();
}

TEST_CASE("geoLatency: the hub with the lowest probe RTT wins for devices at the gateway, the "
          "region table for devices elsewhere; data.allocation shows the figures") {
  auto& health = fx().handler;
  health.set_delay("near", 0);
  health.set_delay("far", 1000);
  test::server_process s;
  const std::string dir = test::make_temp_dir("provisiond-hubs-geo");
  s.remove_data_dir_at_exit();
  const std::string base = fx().base;
  std::string cfg = "data_dir = \"" + dir + "\"\n"
                    "[device_api]\nlisten = \"127.0.0.1:0\"\nregister_wait_ms = 5000\n"
                    "[metrics]\nlisten = \"\"\n"
                    "[hub_health]\ninterval_ms = 200\ntimeout_ms = 5000\nunhealthy_after = 1\n"
                    "ca_file = \"" + fx().health.ca_file() + "\"\n"
                    "[geo_latency]\nregion = \"westeurope\"\n"
                    "[[geo_latency.client_ranges]]\ncidr = \"127.0.0.0/8\"\nregion = \"westeurope\"\n"
                    "[[geo_latency.latencies]]\nfrom = \"westeurope\"\nto = \"eastus\"\nms = 5000\n"
                    "[[hubs]]\nhostname = \"geo-near.example.net\"\nregion = \"westeurope\"\n"
                    "health_endpoint = \"" + base + "/health/near\"\n"
                    "[[hubs]]\nhostname = \"geo-far.example.net\"\nregion = \"westeurope\"\n"
                    "health_endpoint = \"" + base + "/health/far\"\n"
                    "[[hubs]]\nhostname = \"geo-us.example.net\"\nregion = \"eastus\"\n";
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  // Wait until both probed hubs have a measured RTT, far's above its delay.
  // Delays of a second and more keep the order clear on a loaded machine.
  auto rtt_of = [&](const std::string& hub) {
    auto r = s.service("GET", "/linkedHubs/" + hub);
    REQUIRE_MESSAGE(r.status == 200, r.body);
    auto j = test::parse_json(r.body);
    return j.contains("health") && j["health"].contains("rttMs") ? j["health"]["rttMs"].get<double>()
                                                                 : -1.0;
  };
  auto wait_rtt = [&](const std::string& hub, double above) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (rtt_of(hub) <= above && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    REQUIRE(rtt_of(hub) > above);
  };
  wait_rtt("geo-near.example.net", -1);
  wait_rtt("geo-far.example.net", 900);
  REQUIRE(rtt_of("geo-near.example.net") < 900);
  test::create_group(s, "geo", group_key);
  auto reg = [&](const std::string& id, const json& payload) {
    auto c = s.client();
    net::http_headers h;
    h.add("Authorization", s.device_auth(id, device_key(id)));
    h.add("Content-Type", "application/json");
    json body{{"registrationId", id}};
    if (!payload.is_null())
      body["payload"] = payload;
    net::https_response resp;
    REQUIRE(!c.request("PUT", "/" + s.id_scope() + "/registrations/" + id
                                + "/register?api-version=2021-06-01",
                       h, body.dump(), resp));
    REQUIRE_MESSAGE(resp.status == 200, resp.body);
    auto j = test::parse_json(resp.body);
    REQUIRE_MESSAGE(j["status"] == "assigned", resp.body);
    auto rec = s.service("GET", "/registrations/" + id);
    REQUIRE_MESSAGE(rec.status == 200, rec.body);
    return test::parse_json(rec.body);
  };
  // The group's policy is geoLatency.
  {
    json g{{"enrollmentGroupId", "geo"},
           {"attestation", {{"type", "symmetricKey"},
                            {"symmetricKey", {{"primaryKey", group_key},
                                              {"secondaryKey", group_key}}}}},
           {"allocationPolicy", "geoLatency"}};
    auto r = s.service("PUT", "/enrollmentGroups/geo", g.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
  }
  // At the gateway (the client range says westeurope): the fastest probe.
  for (int i = 0; i < 5; ++i) {
    auto rec = reg("geo-dev-" + std::to_string(i), nullptr);
    CHECK(rec["assignedHub"] == "geo-near.example.net");
    const json& why = rec["allocation"];
    CHECK(why["policy"] == "geoLatency");
    CHECK(why["why"]["deviceRegion"] == "westeurope");
    CHECK(why["why"]["regionFrom"] == "client address 127.0.0.0/8");
    CHECK(why["why"]["latencyFrom"]["geo-near.example.net"] == "probe");
    CHECK(why["why"]["latencyMs"]["geo-far.example.net"].get<double>() > 900);
    CHECK(why["why"]["latencyMs"]["geo-us.example.net"] == 5000.0);
    CHECK(why["why"]["tied"] == json::array({"geo-near.example.net"}));
  }
  // A device that says it is in eastus: the table puts it on the eastus hub.
  auto us = reg("geo-dev-us", json{{"region", "eastus"}});
  CHECK(us["assignedHub"] == "geo-us.example.net");
  CHECK(us["allocation"]["why"]["regionFrom"] == "payload");
  CHECK(us["allocation"]["why"]["latencyMs"]["geo-us.example.net"] == 0.0);
  // near slows down: far is now the fastest; near comes back later.
  health.set_delay("near", 2000);
  wait_rtt("geo-near.example.net", 1900);
  CHECK(reg("geo-dev-slow", nullptr)["assignedHub"] == "geo-far.example.net");
  // near fails its probe: skipped even when it is the fastest again.
  health.set_delay("near", 0);
  health.set_status("near", 500);
  {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline) {
      auto j = test::parse_json(s.service("GET", "/linkedHubs/geo-near.example.net").body);
      if (j["health"].value("status", "") == "unhealthy")
        break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  CHECK(reg("geo-dev-sick", nullptr)["assignedHub"] == "geo-far.example.net");
  health.set_status("near", 200);
  {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline && rtt_of("geo-near.example.net") > 900)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK(reg("geo-dev-back", nullptr)["assignedHub"] == "geo-near.example.net");
  health.set_delay("far", 0);
  s.stop();
}

TEST_CASE("the hubs of a round are probed at once: three probes held until all three are "
          "waiting all turn healthy") {
  // A probe is held until the other two arrive; with a 20 s timeout, probes
  // sent one after the other would each time out (unhealthy) instead.
  auto& health = fx().handler;
  health.set_gate(3);
  test::server_process s;
  const std::string dir = test::make_temp_dir("provisiond-hubs-gate");
  s.remove_data_dir_at_exit();
  std::string cfg = "data_dir = \"" + dir + "\"\n"
                    "[device_api]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"\"\n"
                    "[hub_health]\ninterval_ms = 200\ntimeout_ms = 20000\nunhealthy_after = 1\n"
                    "healthy_after = 1\nca_file = \"" + fx().health.ca_file() + "\"\n";
  for (const char* n : {"1", "2", "3"})
    cfg += std::string("[[hubs]]\nhostname = \"gate-") + n + ".example.net\"\n"
           "health_endpoint = \"" + fx().base + "/health/gate-" + n + "\"\n";
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  auto status_of = [&](const std::string& hub) {
    auto r = s.service("GET", "/linkedHubs/" + hub);
    REQUIRE_MESSAGE(r.status == 200, r.body);
    auto j = test::parse_json(r.body);
    return j.contains("health") ? j["health"].value("status", "") : std::string();
  };
  for (const char* n : {"1", "2", "3"}) {
    const std::string hub = std::string("gate-") + n + ".example.net";
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (status_of(hub) != "healthy" && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK_MESSAGE(status_of(hub) == "healthy", hub);
  }
  CHECK(health.gate_peak() == 3);
  s.stop();
  health.open_gate();
}

TEST_CASE("Kafka mode: hub changes through one process reach another via dps.enrollments; "
          "[[hubs]] seeds once per deployment") {
  test::kafka_fixture kfx;
  auto with_scope = [](const std::string& cfg) { return "id_scope = \"0ne00AB5701\"\n" + cfg; };
  test::server_process a;
  REQUIRE_MESSAGE(!a.start(with_scope(kfx.server_config()), kfx.dir), a.log());
  CHECK_HUBS(a, std::vector<std::string>{hub_a, hub_b});
  // A second process with an empty data dir and other [[hubs]]: the
  // deployment was seeded already, so it takes the stored set.
  const auto dir_b = test::make_temp_dir("provisiond-hubs-kafka-b");
  test::server_process b;
  b.remove_data_dir_at_exit();
  std::string cfg_b = kfx.server_config(dir_b);
  for (auto at = cfg_b.find(hub_a); at != std::string::npos; at = cfg_b.find(hub_a))
    cfg_b.replace(at, std::string(hub_a).size(), "hub-z.example.net");
  REQUIRE_MESSAGE(!b.start(with_scope(cfg_b), dir_b), b.log());
  CHECK_HUBS(b, std::vector<std::string>{hub_a, hub_b});

  auto wait_hubs = [](const test::server_process& s, const std::vector<std::string>& want) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (hub_names(s) != want && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK_HUBS(s, want);
  };
  auto r = a.service("PUT", "/linkedHubs/hub-k.example.net", R"({"allocationWeight":3})");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK_HUBS(a, std::vector<std::string>{hub_a, hub_b, "hub-k.example.net"}); // read-your-writes
  wait_hubs(b, {hub_a, hub_b, "hub-k.example.net"});
  r = b.service("DELETE", std::string("/linkedHubs/") + hub_a);
  REQUIRE_MESSAGE(r.status == 204, r.body);
  wait_hubs(a, {hub_b, "hub-k.example.net"});

  bool hub_record = false, seeded_record = false;
  for (const auto& rec : test::read_topic(kfx.cfg, "dps.enrollments", 4)) {
    hub_record = hub_record || rec.key == "hub/hub-k.example.net";
    seeded_record = seeded_record || rec.key == "deployment/hubs_seeded";
  }
  CHECK(hub_record);
  CHECK(seeded_record);
  // A device registered through b lands on a hub of the live set.
  test::create_group(b, "kafka-hubs", group_key);
  auto c = b.client();
  int status = 0;
  auto j = test::register_device(c, b, "kafka-hub-dev", device_key("kafka-hub-dev"), status, 100);
  REQUIRE_MESSAGE(status == 200, j.dump());
  CHECK(j["status"] == "assigned");
  const std::string hub = j["registrationState"].value("assignedHub", "");
  CHECK((hub == hub_b || hub == "hub-k.example.net"));
  b.stop();
  a.stop();
}

namespace {

/// Health endpoints that answer 200 after 300 ms, from a thread of their own
/// (so the server's threads are not what limits the probes in flight),
/// counting the probes in flight and the most there ever were.
class counting_handler final : public gateway::handler {
public:
  void handle(gateway::http_request req, gateway::respond_fn respond) override {
    {
      std::lock_guard<std::mutex> lk(mtx_);
      ++in_flight_;
      ++threads_;
      peak_ = std::max(peak_, in_flight_);
      ++seen_[req.path];
    }
    std::thread([this, respond = std::move(respond)]() mutable {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      gateway::http_response r;
      r.status = 200;
      r.body = R"({"status":"ok"})";
      r.headers.emplace_back("Content-Type", "application/json");
      {
        // Before the answer: once it is sent the prober may send the next.
        std::lock_guard<std::mutex> lk(mtx_);
        --in_flight_;
      }
      respond(std::move(r));
      std::lock_guard<std::mutex> lk(mtx_);
      --threads_;
    }).detach();
  }
  int peak() {
    std::lock_guard<std::mutex> lk(mtx_);
    return peak_;
  }
  std::size_t paths() {
    std::lock_guard<std::mutex> lk(mtx_);
    return seen_.size();
  }
  /// Waits (bounded) until every answer was sent: the threads use `this`.
  void drain() {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline) {
      {
        std::lock_guard<std::mutex> lk(mtx_);
        if (threads_ == 0)
          return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

private:
  std::mutex mtx_;
  int in_flight_ = 0, peak_ = 0;
  int threads_ = 0; ///< answering threads still running (they use `this`)
  std::map<std::string, int> seen_;
};

/// The health status of every linked hub of `s`, by name.
std::map<std::string, std::string> health_by_hub(const test::server_process& s) {
  auto r = s.service("GET", "/linkedHubs");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  std::map<std::string, std::string> out;
  const json doc = test::parse_json(r.body);
  for (const auto& h : doc["value"])
    out[h.value("name", "")] = h.contains("health") ? h["health"].value("status", "") : "";
  return out;
}

} // namespace

TEST_CASE("many hubs: at most max_concurrent_probes probes are in flight, and every hub is "
          "probed") {
  // 24 hubs, each probe held 300 ms, at most 3 at a time: unbounded (a
  // thread per hub) would have about 24 in flight.
  counting_handler counting;
  auto server = std::make_unique<test::local_https_server>(counting, "Hub Cap Test Root", 41, 2);
  const std::string base = server->base();

  constexpr int hubs = 24;
  test::server_process s;
  const std::string dir = test::make_temp_dir("provisiond-hubs-cap");
  s.remove_data_dir_at_exit();
  std::string cfg = "data_dir = \"" + dir + "\"\n"
                    "[device_api]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"\"\n"
                    "[hub_health]\ninterval_ms = 200\ntimeout_ms = 10000\nunhealthy_after = 1\n"
                    "healthy_after = 1\nmax_concurrent_probes = 3\nca_file = \""
                    + server->ca_file() + "\"\n";
  for (int i = 1; i <= hubs; ++i)
    cfg += "[[hubs]]\nhostname = \"cap-" + std::to_string(i) + ".example.net\"\n"
           "health_endpoint = \"" + base + "/cap/" + std::to_string(i) + "\"\n";
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  auto all_healthy = [&] {
    auto h = health_by_hub(s);
    int n = 0;
    for (const auto& [name, status] : h)
      n += status == "healthy" ? 1 : 0;
    return n == hubs && h.size() == hubs;
  };
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!all_healthy() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(all_healthy());
  CHECK(counting.paths() == hubs);
  MESSAGE("most probes in flight at once: " << counting.peak());
  CHECK(counting.peak() >= 1);
  CHECK(counting.peak() <= 3);
  s.stop();
  counting.drain();
  server->stop();
}

TEST_CASE("Kafka mode: a gateway-only process probes the hubs too, so GET /linkedHubs shows "
          "their health") {
  test::kafka_fixture kfx;
  test::server_process g;
  const std::string cfg = kfx.server_config()
                          + "[hub_health]\ninterval_ms = 200\ntimeout_ms = 5000\n"
                            "unhealthy_after = 1\nhealthy_after = 1\nca_file = \""
                          + fx().health.ca_file() + "\"\n";
  REQUIRE_MESSAGE(!g.start(cfg, kfx.dir, {"--roles", "gateway,registration"}), g.log());
  auto r = g.service("PUT", "/linkedHubs/hub-g.example.net",
                     json{{"healthEndpoint", fx().base + "/health/g"}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (health_by_hub(g)["hub-g.example.net"] != "healthy"
         && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK_MESSAGE(health_by_hub(g)["hub-g.example.net"] == "healthy",
                g.service("GET", "/linkedHubs").body);
  CHECK(fx().handler.probes("g") >= 1);
  g.stop();
}

namespace {

/// Produces `records` to dps.enrollments as provisiond's producer does
/// (murmur2_random: a key lands on the partition provisiond would pick), as
/// another provisiond process of the deployment would.
void produce_as_provisiond(const config::kafka_config& cfg,
                           const std::vector<std::pair<std::string, std::string>>& records) {
  char errstr[512];
  rd_kafka_conf_t* conf = rd_kafka_conf_new();
  rd_kafka_conf_set(conf, "bootstrap.servers", cfg.brokers.c_str(), errstr, sizeof errstr);
  rd_kafka_conf_set(conf, "log_level", "0", errstr, sizeof errstr);
  REQUIRE(rd_kafka_conf_set(conf, "partitioner", "murmur2_random", errstr, sizeof errstr)
          == RD_KAFKA_CONF_OK);
  rd_kafka_t* rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
  REQUIRE_MESSAGE(rk, errstr);
  for (const auto& [key, value] : records)
    REQUIRE(rd_kafka_producev(rk, RD_KAFKA_V_TOPIC("dps.enrollments"),
                              RD_KAFKA_V_KEY(const_cast<char*>(key.data()), key.size()),
                              RD_KAFKA_V_VALUE(const_cast<char*>(value.data()), value.size()),
                              RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END)
            == RD_KAFKA_RESP_ERR_NO_ERROR);
  REQUIRE(rd_kafka_flush(rk, 10000) == RD_KAFKA_RESP_ERR_NO_ERROR);
  rd_kafka_destroy(rk);
}

std::size_t count_key(const std::vector<test::kafka_record>& recs, const std::string& key) {
  return static_cast<std::size_t>(
    std::count_if(recs.begin(), recs.end(), [&](const auto& r) { return r.key == key; }));
}

/// `cfg` with its [[hubs]] (hub-a, hub-b) renamed to hub-<prefix>a, hub-<prefix>b.
std::string with_hubs(std::string cfg, const std::string& prefix) {
  for (const char* h : {hub_a, hub_b}) {
    const std::string from(h);
    const std::string to = "hub-" + prefix + from.substr(4);
    for (auto at = cfg.find(from); at != std::string::npos; at = cfg.find(from, at + to.size()))
      cfg.replace(at, from.size(), to);
  }
  return cfg;
}

} // namespace

TEST_CASE("Kafka mode: a new process that finds another's seed claim first waits for that "
          "seed instead of seeding its own [[hubs]]") {
  test::kafka_fixture kfx;
  // Another process of the new deployment claimed the seed a moment ago.
  const auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                     std::chrono::system_clock::now().time_since_epoch())
                     .count();
  produce_as_provisiond(kfx.cfg, {{"deployment/hubs_seed_claim",
                                   std::to_string(now) + " other-process -"}});
  test::server_process b;
  error started;
  std::thread starter([&] { started = b.start(kfx.server_config(), kfx.dir); });
  // b publishes its own claim (second in order: it loses) and waits.
  std::vector<test::kafka_record> recs;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (count_key(recs, "deployment/hubs_seed_claim") < 2
         && std::chrono::steady_clock::now() < deadline)
    recs = test::read_topic(kfx.cfg, "dps.enrollments", 2, std::chrono::milliseconds(300));
  CHECK(count_key(recs, "deployment/hubs_seed_claim") == 2);
  CHECK(count_key(recs, "deployment/hubs_seeded") == 0); // b did not seed
  // The other process seeds.
  produce_as_provisiond(
    kfx.cfg, {{"hub/hub-x1.example.net",
               R"({"name":"hub-x1.example.net","allocationWeight":1,"applyAllocationPolicy":true,"location":""})"},
              {"hub/hub-x2.example.net",
               R"({"name":"hub-x2.example.net","allocationWeight":2,"applyAllocationPolicy":true,"location":""})"},
              {"deployment/hubs_seeded", "config"}});
  starter.join();
  REQUIRE_MESSAGE(!started, started.message << "\n" << b.log());
  auto wait_for = [&](const std::vector<std::string>& want) {
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (hub_names(b) != want && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK_HUBS(b, want);
  };
  wait_for({"hub-x1.example.net", "hub-x2.example.net"}); // not hub-a, hub-b
  CHECK(b.log().find("another process is seeding the linked hubs") != std::string::npos);
  CHECK(b.log().find("[[hubs]] differs from the 2 stored linked hub(s)") != std::string::npos);
  recs = test::read_topic(kfx.cfg, "dps.enrollments", 4);
  CHECK(count_key(recs, "hub/hub-a.example.net") == 0);
  CHECK(count_key(recs, "deployment/hubs_seeded") == 1);
  b.stop();
}

TEST_CASE("Kafka mode: two new processes starting at once with different [[hubs]] end with the "
          "same one of the two sets, never a mix") {
  test::kafka_fixture kfx;
  const auto dir_b = test::make_temp_dir("provisiond-hubs-seed-b");
  const std::string scope = "id_scope = \"0ne00AB5702\"\n";
  test::server_process a, b;
  b.remove_data_dir_at_exit();
  error err_a, err_b;
  std::thread ta([&] { err_a = a.start(scope + with_hubs(kfx.server_config(), "1"), kfx.dir); });
  std::thread tb([&] { err_b = b.start(scope + with_hubs(kfx.server_config(dir_b), "2"), dir_b); });
  ta.join();
  tb.join();
  REQUIRE_MESSAGE(!err_a, err_a.message << "\n" << a.log());
  REQUIRE_MESSAGE(!err_b, err_b.message << "\n" << b.log());
  const std::vector<std::string> one{"hub-1a.example.net", "hub-1b.example.net"};
  const std::vector<std::string> two{"hub-2a.example.net", "hub-2b.example.net"};
  const auto got_a = hub_names(a);
  CHECK_MESSAGE((got_a == one || got_a == two), "linked hubs: " << joined(got_a));
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (hub_names(b) != got_a && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK_HUBS(b, got_a);
  auto recs = test::read_topic(kfx.cfg, "dps.enrollments", 4);
  // Usually both claimed; one that came late found the marker and did not.
  CHECK(count_key(recs, "deployment/hubs_seed_claim") >= 1);
  CHECK(count_key(recs, "deployment/hubs_seed_claim") <= 2);
  CHECK(count_key(recs, "deployment/hubs_seeded") == 1); // one seed, not two
  b.stop();
  a.stop();
}

TEST_CASE("the example dashboard's hub health panels query metrics a probing process exports") {
  fx().handler.set_status("a", 200);
  wait_health(hub_a, "healthy");
  const auto body = test::http(test::metrics_addr(fx().prov), "GET", "/metrics").body;
  CHECK(test::check_dashboard_metrics(body, "dps_hub_") == 3);
}

TEST_CASE("a data dir first started without [[hubs]] has the placeholder hub; the first start "
          "with [[hubs]] replaces it, later ones keep the stored set") {
  test::server_process s;
  const std::string dir = test::make_temp_dir("provisiond-hubs-placeholder");
  s.remove_data_dir_at_exit();
  const std::string bare = "data_dir = \"" + dir + "\"\n"
                           "[device_api]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"\"\n";
  REQUIRE_MESSAGE(!s.start(bare, dir), s.log());
  CHECK_HUBS(s, std::vector<std::string>{"hub.local"});
  REQUIRE(s.stop() == 0);
  test::server_process with;
  REQUIRE_MESSAGE(!with.start(test::default_config(dir), dir), with.log());
  CHECK_HUBS(with, std::vector<std::string>{hub_a, hub_b});
  REQUIRE(with.stop() == 0);
  // Seeded from config now: another [[hubs]] only gets the note.
  test::server_process later;
  REQUIRE_MESSAGE(!later.start(bare + "[[hubs]]\nhostname = \"hub-other.example.net\"\n", dir),
                  later.log());
  CHECK_HUBS(later, std::vector<std::string>{hub_a, hub_b});
  CHECK(later.log().find("[[hubs]] differs from the 2 stored linked hub(s)") != std::string::npos);
  later.stop();
}
