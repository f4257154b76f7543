// Key rolling (issue 19): a symmetric-key device rolls primary -> secondary ->
// primary while the operator only edits its enrollment (or group). Every
// replaced key is refused on the very next request, even though the device's
// token was verified (and cached) a moment before; the registration record
// and `provisiond registration get` show which key the device used last.
// Embedded on the shared server, and over Kafka with the key replaced through
// another process, so the change reaches the device's gateway only over the
// compacted dps.enrollments topic.

#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <thread>

#include "messages/crypto.hpp"
#include "tests/support/cli.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/kafka_it.hpp"
#include "tests/support/server_process.hpp"

using namespace prov;
using nlohmann::json;

namespace {

json parse(const std::string& text) { return test::parse_json(text); }

json sym(const std::string& primary, const std::string& secondary) {
  return json{{"type", "symmetricKey"},
              {"symmetricKey", {{"primaryKey", primary}, {"secondaryKey", secondary}}}};
}

void put_individual(const test::server_process& s, const std::string& id,
                    const std::string& primary, const std::string& secondary) {
  json body{{"registrationId", id}, {"attestation", sym(primary, secondary)}};
  auto r = s.service("PUT", "/enrollments/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

void put_group(const test::server_process& s, const std::string& id, const std::string& primary,
               const std::string& secondary) {
  json body{{"enrollmentGroupId", id}, {"attestation", sym(primary, secondary)}};
  auto r = s.service("PUT", "/enrollmentGroups/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

std::string device_path(const test::server_process& s, const std::string& id) {
  return "/" + s.id_scope() + "/registrations/" + id;
}

net::https_response put_register(net::https_client& c, const test::server_process& s,
                                 const std::string& id, const std::string& auth) {
  net::http_headers h;
  h.add("Authorization", auth);
  h.add("Content-Type", "application/json; charset=utf-8");
  net::https_response resp;
  auto err = c.request("PUT", device_path(s, id) + "/register?api-version=2021-06-01", h,
                       json{{"registrationId", id}}.dump(), resp);
  REQUIRE_MESSAGE(!err, err.message);
  return resp;
}

/// One GET of the operation (no waiting): its HTTP status and body.
net::https_response get_operation(net::https_client& c, const test::server_process& s,
                                  const std::string& id, const std::string& auth,
                                  const std::string& op) {
  net::http_headers h;
  h.add("Authorization", auth);
  net::https_response resp;
  auto err = c.request("GET", device_path(s, id) + "/operations/" + op + "?api-version=2021-06-01",
                       h, {}, resp);
  REQUIRE_MESSAGE(!err, err.message);
  return resp;
}

/// Registers with `auth` and polls until the outcome; returns the final
/// operation JSON (requires assigned). The operation id goes to `op_out`.
json register_assigned(net::https_client& c, const test::server_process& s, const std::string& id,
                       const std::string& auth, std::string* op_out = nullptr) {
  auto r = put_register(c, s, id, auth);
  REQUIRE_MESSAGE((r.status == 200 || r.status == 202), r.body);
  auto j = parse(r.body);
  const auto op = j.value("operationId", "");
  REQUIRE(!op.empty());
  if (op_out)
    *op_out = op;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (r.status == 202 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    r = get_operation(c, s, id, auth, op);
    j = parse(r.body);
  }
  REQUIRE_MESSAGE(r.status == 200, r.body);
  REQUIRE_MESSAGE(j.value("status", "") == "assigned", r.body);
  return j;
}

void check_refused(const net::https_response& r) {
  CHECK_MESSAGE(r.status == 401, r.body);
  CHECK_MESSAGE(parse(r.body).value("errorCode", 0) == 401002, r.body);
}

/// The service API's registration record.
json registration(const test::server_process& s, const std::string& id) {
  auto r = s.service("GET", "/registrations/" + id);
  REQUIRE_MESSAGE(r.status == 200, r.body);
  return parse(r.body);
}

std::string key_used(const test::server_process& s, const std::string& id) {
  auto rs = registration(s, id);
  return rs.value("symmetricKey", json::object()).value("keyUsed", "");
}

/// The value of `label`'s row in the CLI's field listing ("" when absent).
std::string cli_field(const std::string& out, const std::string& label) {
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line))
    if (line.compare(0, label.size() + 1, label + " ") == 0) {
      auto b = line.find_first_not_of(' ', label.size());
      return b == std::string::npos ? std::string() : line.substr(b);
    }
  return {};
}

/// Over Kafka a record reaches each process's store through
/// dps.registrations: waits (bounded) until `s` shows `want`; returns the
/// last value seen.
std::string wait_key_used(const test::server_process& s, const std::string& id,
                          const std::string& want) {
  std::string seen;
  for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
       std::chrono::steady_clock::now() < deadline;) {
    auto got = s.service("GET", "/registrations/" + id);
    if (got.status == 200) {
      seen = parse(got.body).value("symmetricKey", json::object()).value("keyUsed", "");
      if (seen == want)
        break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return seen;
}

/// A device of a group signs with a key derived from the group key.
std::string derived(const std::string& group_key, const std::string& id) {
  auto dk = crypto::derive_device_key(group_key, id);
  REQUIRE(dk);
  return *dk;
}

} // namespace

TEST_SUITE("key_roll") {

TEST_CASE("individual enrollment: primary -> secondary -> primary, each old key refused at once") {
  auto& s = test::shared_server();
  const std::string id = "roll-ind-1";
  const auto p1 = crypto::generate_key(), s1 = crypto::generate_key();
  const auto p2 = crypto::generate_key(), s2 = crypto::generate_key();
  put_individual(s, id, p1, s1);
  auto c = s.client();

  // 1. The device uses its primary key. Its poll is answered from the cache
  //    of verified tokens the second time.
  std::string op;
  auto first = register_assigned(c, s, id, s.device_auth(id, p1), &op);
  const auto hub = first["registrationState"].value("assignedHub", "");
  REQUIRE(get_operation(c, s, id, s.device_auth(id, p1), op).status == 200);
  CHECK(key_used(s, id) == "primary");
  int rc = -1;
  auto out = test::run_cli("registration get " + id + " --data-dir " + s.data_dir(), rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK_MESSAGE(cli_field(out, "KEY USED") == "primary", out);
  // Devices never see it: it is the operator's view.
  CHECK(!first["registrationState"].value("symmetricKey", json::object()).contains("keyUsed"));

  // 2. The operator replaces the primary key. The old one is refused on the
  //    very next request (its verified token must not come from the cache),
  //    for a poll and for a new register alike.
  const auto old_token = s.device_auth(id, p1);
  put_individual(s, id, p2, s1);
  check_refused(get_operation(c, s, id, old_token, op));
  check_refused(put_register(c, s, id, old_token));

  // 3. The device falls back to its secondary key: assigned again, same hub
  //    (nothing else changed), and the record says so.
  auto second = register_assigned(c, s, id, s.device_auth(id, s1));
  CHECK(second["registrationState"].value("assignedHub", "") == hub);
  CHECK(key_used(s, id) == "secondary");
  out = test::run_cli("registration get " + id + " --data-dir " + s.data_dir() + " --json", rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK_MESSAGE(out.find("\"keyUsed\": \"secondary\"") != std::string::npos, out);

  // 4. The operator replaces the secondary too; the device moves to its new
  //    primary. The old secondary is refused at once.
  const auto old_secondary = s.device_auth(id, s1);
  REQUIRE(get_operation(c, s, id, old_secondary, op).status == 200); // cached now
  put_individual(s, id, p2, s2);
  check_refused(get_operation(c, s, id, old_secondary, op));
  check_refused(put_register(c, s, id, old_secondary));
  auto third = register_assigned(c, s, id, s.device_auth(id, p2));
  CHECK(third["registrationState"].value("assignedHub", "") == hub);
  CHECK(key_used(s, id) == "primary");
  out = test::run_cli("registration get " + id + " --data-dir " + s.data_dir(), rc);
  CHECK_MESSAGE(cli_field(out, "KEY USED") == "primary", out);
}

TEST_CASE("enrollment group: derived keys roll primary -> secondary -> primary") {
  auto& s = test::shared_server();
  const std::string group = "roll-grp-1", id = "roll-grp-dev-1";
  const auto g1 = crypto::generate_key(), h1 = crypto::generate_key();
  const auto g2 = crypto::generate_key(), h2 = crypto::generate_key();
  put_group(s, group, g1, h1);
  auto c = s.client();

  std::string op;
  auto first = register_assigned(c, s, id, s.device_auth(id, derived(g1, id)), &op);
  CHECK(first["registrationState"]["symmetricKey"].value("enrollmentGroupId", "") == group);
  const auto old_token = s.device_auth(id, derived(g1, id));
  REQUIRE(get_operation(c, s, id, old_token, op).status == 200); // cached now
  CHECK(key_used(s, id) == "primary");

  put_group(s, group, g2, h1);
  check_refused(get_operation(c, s, id, old_token, op));
  check_refused(put_register(c, s, id, old_token));
  register_assigned(c, s, id, s.device_auth(id, derived(h1, id)));
  auto rs = registration(s, id);
  CHECK(rs["symmetricKey"].value("keyUsed", "") == "secondary");
  CHECK(rs["symmetricKey"].value("enrollmentGroupId", "") == group);

  const auto old_secondary = s.device_auth(id, derived(h1, id));
  put_group(s, group, g2, h2);
  check_refused(put_register(c, s, id, old_secondary));
  register_assigned(c, s, id, s.device_auth(id, derived(g2, id)));
  CHECK(key_used(s, id) == "primary");
  int rc = -1;
  auto out = test::run_cli("registration get " + id + " --data-dir " + s.data_dir(), rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK_MESSAGE(cli_field(out, "KEY USED") == "primary", out);
  CHECK_MESSAGE(cli_field(out, "ENROLLMENT GROUP") == group, out);
}

TEST_CASE("the record keeps the key used across a restart (stored, not derived)") {
  // The record is binary on disk (version 3 adds the key used): a restart
  // must read it back, not lose it.
  test::server_process s;
  REQUIRE_MESSAGE(!s.start(), s.log());
  s.remove_data_dir_at_exit();
  const std::string id = "roll-restart-1";
  const auto p = crypto::generate_key(), k2 = crypto::generate_key();
  put_individual(s, id, p, k2);
  {
    auto c = s.client();
    register_assigned(c, s, id, s.device_auth(id, k2));
  }
  CHECK(key_used(s, id) == "secondary");
  REQUIRE(s.stop() == 0);
  REQUIRE_MESSAGE(!s.restart(), s.log());
  CHECK(key_used(s, id) == "secondary");
}

TEST_CASE("Kafka: a key replaced through another process is refused by this gateway at once") {
  // Two full processes over one mock cluster, each with its own data dir:
  // the key is replaced through B's service API, so A learns it only from
  // dps.enrollments. Once A accepts the new key (it has applied the change),
  // the old token, verified and cached by A a moment before, must be refused.
  test::kafka_fixture fx;
  const std::string scope = "id_scope = \"0ne00AB12CD\"\n";
  test::server_process a, b;
  REQUIRE_MESSAGE(!a.start(scope + fx.server_config(), fx.dir), a.log());
  const auto b_dir = test::make_temp_dir("provisiond-keyroll-b");
  b.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!b.start(scope + fx.server_config(b_dir), b_dir), b.log());
  REQUIRE(a.id_scope() == b.id_scope());

  const std::string id = "roll-kafka-1";
  const auto p1 = crypto::generate_key(), s1 = crypto::generate_key();
  const auto p2 = crypto::generate_key();
  put_individual(b, id, p1, s1);
  auto c = a.client();

  // A applies B's write asynchronously: retry the first register until the
  // enrollment has arrived (bounded; the first consumer joins take seconds).
  const auto t1 = a.device_auth(id, p1);
  std::string op;
  net::https_response r;
  for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);;) {
    r = put_register(c, a, id, t1);
    if (r.status != 401 || std::chrono::steady_clock::now() > deadline)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  REQUIRE_MESSAGE((r.status == 200 || r.status == 202), r.body);
  op = parse(r.body).value("operationId", "");
  for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
       std::chrono::steady_clock::now() < deadline;) {
    r = get_operation(c, a, id, t1, op);
    if (r.status != 202)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  REQUIRE_MESSAGE(r.status == 200, r.body);
  REQUIRE(get_operation(c, a, id, t1, op).status == 200); // cached on A now

  // The key used reaches the record over dps.registrations too.
  CHECK(wait_key_used(a, id, "primary") == "primary");

  put_individual(b, id, p2, s1);
  const auto t2 = a.device_auth(id, p2);
  for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);;) {
    r = get_operation(c, a, id, t2, op);
    if (r.status == 200 || std::chrono::steady_clock::now() > deadline)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  REQUIRE_MESSAGE(r.status == 200, "A never applied the new key: " << r.body);
  check_refused(get_operation(c, a, id, t1, op));
  check_refused(put_register(c, a, id, t1));

  // The secondary still works on A, and the record says so on both
  // processes (B learns it over dps.registrations).
  register_assigned(c, a, id, a.device_auth(id, s1));
  CHECK(wait_key_used(a, id, "secondary") == "secondary");
  CHECK(wait_key_used(b, id, "secondary") == "secondary");
}

} // TEST_SUITE
