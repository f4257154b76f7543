// TPM attestation end to end: a software TPM (swtpm, started here on a free
// port) driven by tpm2-tools plays the device against the real provisiond
// over real TLS: EK and SRK made in the TPM, the 401 challenge, then
// ActivateCredential, Import, Load and an HMAC of the SAS inside the TPM,
// and the second register. Skipped, loudly, only when swtpm or tpm2-tools
// are not installed (scripts/install-test-deps.sh installs them).

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "messages/crypto.hpp"
#include "messages/registration.hpp"
#include "storage/keyring.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/kafka_it.hpp"
#include "tests/support/metrics_scrape.hpp"
#include "tests/support/mqtt_client.hpp"
#include "tests/support/server_process.hpp"
#include "tests/support/soft_tpm.hpp"

using namespace prov;
using nlohmann::json;
using test::tpm_device::have_tools;
using test::tpm_device::soft_tpm;

namespace {

std::string device_path(const test::server_process& s, const std::string& id) {
  return "/" + s.id_scope() + "/registrations/" + id;
}

net::https_response put_register(const test::server_process& s, const std::string& id,
                                 const json& tpm, const std::string& auth = {}) {
  auto c = s.client();
  net::http_headers h;
  if (!auth.empty())
    h.add("Authorization", auth);
  h.add("Content-Type", "application/json; charset=utf-8");
  json body{{"registrationId", id}};
  if (!tpm.is_null())
    body["tpm"] = tpm;
  net::https_response resp;
  auto err = c.request("PUT", device_path(s, id) + "/register?api-version=2021-06-01", h,
                       body.dump(), resp);
  REQUIRE_MESSAGE(!err, err.message);
  return resp;
}

/// `provisiond <args> --data-dir <server's>`: its stdout and stderr.
std::string cli(const test::server_process& s, const std::string& args, int& rc) {
  const std::string line = std::string(std::getenv("PROVISIOND_BIN")) + " " + args
                           + " --data-dir '" + s.data_dir() + "' 2>&1";
  std::string out;
  FILE* p = ::popen(line.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0)
    out.append(buf, n);
  const int st = ::pclose(p);
  rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

void put_tpm_enrollment(const test::server_process& s, const std::string& id,
                        const std::string& ek_b64) {
  json body{{"registrationId", id},
            {"attestation", {{"type", "tpm"}, {"tpm", {{"endorsementKey", ek_b64}}}}}};
  auto r = s.service("PUT", "/enrollments/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

/// The 401 challenge: its authenticationKey.
std::string expect_challenge(const net::https_response& r) {
  REQUIRE_MESSAGE(r.status == 401, r.body);
  auto j = test::parse_json(r.body);
  CHECK(j["keyName"] == "registration");
  CHECK_FALSE(j.contains("status")); // the C SDK reads "no status" as the challenge
  REQUIRE(j["authenticationKey"].is_string());
  return j["authenticationKey"].get<std::string>();
}

void expect_refused(const net::https_response& r, int status, const std::string& text) {
  REQUIRE_MESSAGE(r.status == status, r.body);
  auto j = test::parse_json(r.body);
  CHECK(j["errorCode"].get<int>() / 1000 == status);
  CHECK_MESSAGE(j["message"].get<std::string>().find(text) != std::string::npos, r.body);
}

json tpm_body(const soft_tpm& t) {
  return {{"endorsementKey", t.ek_b64}, {"storageRootKey", t.srk_b64}};
}

/// Register answered, the outcome polled with the TPM-signed SAS.
json wait_assigned(const test::server_process& s, const std::string& id,
                   const net::https_response& first, const std::string& auth) {
  REQUIRE_MESSAGE((first.status == 200 || first.status == 202), first.body);
  auto j = test::parse_json(first.body);
  const std::string op = j["operationId"].get<std::string>();
  auto c = s.client();
  net::http_headers h;
  h.add("Authorization", auth);
  // Up to ~60 s: the machine is shared and slow; the TPM work is RSA.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (j["status"] == "assigning") {
    REQUIRE_MESSAGE(std::chrono::steady_clock::now() < deadline,
                    "registration '" << id << "' (operation " << op
                                     << ") still assigning after 60 s of polling; last answer: "
                                     << j.dump());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    net::https_response p;
    REQUIRE(!c.request("GET", device_path(s, id) + "/operations/" + op + "?api-version=2021-06-01",
                       h, "", p));
    REQUIRE_MESSAGE(p.status / 100 == 2, p.body);
    j = test::parse_json(p.body);
  }
  return j;
}

/// The device's status lookup with `auth`: 200, and its authenticationKey
/// is the hub key `tpm` signed `hub_sig` with (every answer of the
/// operation wraps the same key; the TPM signs alike with the key imported
/// from any of them).
void check_status_key(const test::server_process& s, const std::string& id,
                      const std::string& auth, soft_tpm& tpm, const std::string& hub_sig) {
  auto c = s.client();
  net::http_headers h;
  h.add("Authorization", auth);
  h.add("Content-Type", "application/json");
  net::https_response p;
  REQUIRE(!c.request("POST", device_path(s, id) + "?api-version=2021-06-01", h,
                     json{{"registrationId", id}}.dump(), p));
  REQUIRE_MESSAGE(p.status == 200, p.body);
  auto st = test::parse_json(p.body);
  REQUIRE_MESSAGE(st["tpm"]["authenticationKey"].is_string(), p.body);
  REQUIRE_MESSAGE(tpm.activate(st["tpm"]["authenticationKey"].get<std::string>()), tpm.log());
  CHECK(tpm.hmac("hub") == hub_sig);
}

/// Every case drives swtpm with tpm2-tools: without them it is skipped,
/// loudly (scripts/install-test-deps.sh installs them).
bool skipped_without_tools() {
  if (have_tools())
    return false;
  MESSAGE("SKIPPED LOUDLY: swtpm or tpm2-tools not installed (scripts/install-test-deps.sh)");
  return true;
}

/// A server of its own on a fresh data dir (removed at exit), configured by
/// `cfg_of(data_dir)`.
void start_fresh(test::server_process& s,
                 const std::function<std::string(const std::string&)>& cfg_of) {
  auto dir = test::make_temp_dir("provisiond-it");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start(cfg_of(dir), dir), s.log());
}

/// The whole device flow: a challenge from `s` activated in `tpm`, answered
/// on `answer_on` (default `s`) with the TPM-signed SAS and polled until
/// assigned. The SAS (for more polls and lookups) and the final answer.
struct device_flow {
  std::string auth;
  json done;
};
device_flow register_with_tpm(const test::server_process& s, const std::string& id,
                              soft_tpm& tpm, const test::server_process* answer_on = nullptr) {
  const auto& a = answer_on != nullptr ? *answer_on : s;
  REQUIRE_MESSAGE(tpm.activate(expect_challenge(put_register(s, id, tpm_body(tpm)))), tpm.log());
  device_flow f;
  f.auth = tpm.sas(a, id);
  f.done = wait_assigned(a, id, put_register(a, id, tpm_body(tpm), f.auth), f.auth);
  REQUIRE_MESSAGE(f.done["status"] == "assigned", f.done.dump());
  return f;
}

} // namespace

TEST_CASE("tpm: swtpm device: challenge, activate, import, HMAC-signed SAS, assigned") {
  if (skipped_without_tools())
    return;
  auto& s = test::shared_server();
  soft_tpm tpm;
  const std::string id = "tpm-dev-1";
  put_tpm_enrollment(s, id, tpm.ek_b64);

  // The service API shows the EK as enrolled.
  auto g = s.service("GET", "/enrollments/" + id);
  REQUIRE(g.status == 200);
  CHECK(test::parse_json(g.body)["attestation"]["type"] == "tpm");
  CHECK(test::parse_json(g.body)["attestation"]["tpm"]["endorsementKey"] == tpm.ek_b64);

  // The CLI creates and shows TPM enrollments (the EK as size and SHA-256).
  {
    const auto ek = crypto::base64_decode(tpm.ek_b64).value();
    const auto d = crypto::sha256(ek);
    const std::string digest =
      crypto::hex(std::string_view(reinterpret_cast<const char*>(d.data()), d.size()));
    int rc = 0;
    auto out = cli(s, "enrollment create tpm-cli-1 --tpm-ek " + tpm.ek_b64 + " --tpm-srk "
                        + tpm.srk_b64, rc);
    CHECK_MESSAGE(rc == 0, out);
    out = cli(s, "enrollment get tpm-cli-1", rc);
    CHECK_MESSAGE(rc == 0, out);
    CHECK_MESSAGE(out.find("tpm") != std::string::npos, out);
    CHECK_MESSAGE(out.find(std::to_string(ek.size()) + " bytes, SHA-256 " + digest)
                    != std::string::npos,
                  out);
    out = cli(s, "enrollment create tpm-cli-2 --tpm-ek " + crypto::base64_encode(ek.substr(0, 50)),
              rc);
    CHECK(rc != 0);
    CHECK_MESSAGE(out.find("attestation.tpm.endorsementKey: the key: TPM2B_PUBLIC size field")
                    != std::string::npos,
                  out);
    CHECK(s.service("GET", "/enrollments/tpm-cli-2").status == 404);
  }

  // 1. No Authorization: the challenge.
  const auto blob = expect_challenge(put_register(s, id, tpm_body(tpm)));
  REQUIRE_MESSAGE(tpm.activate(blob), tpm.log());

  // 2. The SAS signed inside the TPM: the normal flow, polls with the same SAS.
  const auto auth = tpm.sas(s, id);
  auto first = put_register(s, id, tpm_body(tpm), auth);
  auto done = wait_assigned(s, id, first, auth);
  CHECK_MESSAGE(done["status"] == "assigned", done.dump());
  CHECK(done["registrationState"]["deviceId"] == id);
  CHECK(done["registrationState"]["assignedHub"].is_string());
  // The result carries the IoT Hub key as a fresh activation blob, which
  // this TPM activates and imports like the challenge's (SDK step 7).
  const auto hub_blob = done["registrationState"]["tpm"]["authenticationKey"];
  REQUIRE_MESSAGE(hub_blob.is_string(), done.dump());
  CHECK(hub_blob != blob);
  REQUIRE_MESSAGE(tpm.activate(hub_blob.get<std::string>()), tpm.log());
  const std::string hub_sig = tpm.hmac("hub");

  // Status lookup with the SAS alone (no body).
  check_status_key(s, id, auth, tpm, hub_sig);
  // The CLI shows the hub key the hub side reads (with --show-keys only).
  {
    int rc = 0;
    auto out = cli(s, "enrollment get " + id + " --show-keys", rc);
    CHECK_MESSAGE(rc == 0, out);
    CHECK_MESSAGE(out.find("IOT HUB KEY") != std::string::npos, out);
    CHECK_MESSAGE(out.find(done["operationId"].get<std::string>()) != std::string::npos, out);
    out = cli(s, "enrollment get " + id, rc);
    CHECK_MESSAGE(rc == 0, out);
    CHECK_MESSAGE(out.find("REGISTRATION ID") != std::string::npos, out); // it printed the enrollment
    CHECK_MESSAGE(out.find("IOT HUB KEY") == std::string::npos, out);
  }
  auto rec = s.service("GET", "/registrations/" + id);
  REQUIRE_MESSAGE(rec.status == 200, rec.body);
  CHECK(test::parse_json(rec.body)["status"] == "assigned");

  // 3. The same answer again: a replay.
  expect_refused(put_register(s, id, tpm_body(tpm), auth), 401, "already answered (a replay)");

  // 4. A new challenge (anyone can ask: the EK is public), answered with the
  //    previous key: still a replay of the answered challenge.
  const auto blob2 = expect_challenge(put_register(s, id, tpm_body(tpm)));
  expect_refused(put_register(s, id, tpm_body(tpm), auth), 401, "already answered (a replay)");
  // The new challenge leaves the answered one alone: the device's status
  // lookup still works and still carries its authenticationKey.
  check_status_key(s, id, auth, tpm, hub_sig);
  // ...and with the new key: accepted again (a re-registration).
  REQUIRE_MESSAGE(tpm.activate(blob2), tpm.log());
  const auto auth2 = tpm.sas(s, id);
  auto again = wait_assigned(s, id, put_register(s, id, tpm_body(tpm), auth2), auth2);
  CHECK(again["status"] == "assigned");
}

TEST_CASE("tpm: refusals: EK not enrolled or another's, tampered blobs, malformed keys") {
  if (skipped_without_tools())
    return;
  auto& s = test::shared_server();
  soft_tpm tpm;
  soft_tpm other;

  // Not enrolled at all.
  expect_refused(put_register(s, "tpm-nobody", tpm_body(tpm)), 401,
                 "no individual enrollment for this registration id");

  // Enrolled with another TPM's EK.
  put_tpm_enrollment(s, "tpm-other", other.ek_b64);
  expect_refused(put_register(s, "tpm-other", tpm_body(tpm)), 401,
                 "endorsement key is not the one enrolled");
  // A SAS made by a TPM that never got the challenge: nothing outstanding.
  put_tpm_enrollment(s, "tpm-fresh", tpm.ek_b64);

  // Tampered blobs: the TPM itself refuses them (integrity HMACs).
  put_tpm_enrollment(s, "tpm-tamper", tpm.ek_b64);
  CHECK_FALSE(tpm.activate(expect_challenge(put_register(s, "tpm-tamper", tpm_body(tpm))),
                           "credential"));
  CHECK_FALSE(tpm.activate(expect_challenge(put_register(s, "tpm-tamper", tpm_body(tpm))),
                           "duplicate"));
  // The untampered one still works (the TPM is fine).
  CHECK(tpm.activate(expect_challenge(put_register(s, "tpm-tamper", tpm_body(tpm)))));
  // A TPM-signed SAS for a registration id that has no challenge.
  expect_refused(put_register(s, "tpm-fresh", tpm_body(tpm), tpm.sas(s, "tpm-fresh")), 401,
                 "no TPM challenge is outstanding");

  // Malformed keys in the register body: 400 with the reason.
  const auto ek = crypto::base64_decode(tpm.ek_b64).value();
  expect_refused(put_register(s, "tpm-tamper",
                              {{"endorsementKey", crypto::base64_encode(ek.substr(0, 100))},
                               {"storageRootKey", tpm.srk_b64}}),
                 400, "tpm.endorsementKey: TPM2B_PUBLIC size field says");
  std::string ecc = ek;
  ecc[3] = 0x23;
  expect_refused(put_register(s, "tpm-tamper",
                              {{"endorsementKey", crypto::base64_encode(ecc)},
                               {"storageRootKey", tpm.srk_b64}}),
                 400, "is an ECC key: only RSA 2048");
  expect_refused(put_register(s, "tpm-tamper", {{"endorsementKey", "%%%"}}), 400, "base64");
  expect_refused(put_register(s, "tpm-tamper",
                              {{"endorsementKey", tpm.ek_b64},
                               {"storageRootKey", crypto::base64_encode(
                                                    crypto::base64_decode(tpm.srk_b64)->substr(0, 60))}}),
                 400, "tpm.storageRootKey");

  // Malformed keys in an enrollment: 400 with the reason, nothing stored.
  json bad{{"registrationId", "tpm-bad"},
           {"attestation", {{"type", "tpm"},
                            {"tpm", {{"endorsementKey", crypto::base64_encode(ecc)}}}}}};
  auto r = s.service("PUT", "/enrollments/tpm-bad", bad.dump());
  expect_refused(r, 400, "attestation.tpm.endorsementKey: the key is an ECC key");
  bad["attestation"]["tpm"]["endorsementKey"] = crypto::base64_encode(ek + "x");
  expect_refused(s.service("PUT", "/enrollments/tpm-bad", bad.dump()), 400,
                 "size field says 314 bytes but 315 follow");
  CHECK(s.service("GET", "/enrollments/tpm-bad").status == 404);

  // A real ECC EK (made by swtpm): refused at enrollment create (400005,
  // nothing stored) and in a register body (400000).
  const auto ecc_ek = tpm.ecc_ek_b64();
  bad["attestation"]["tpm"]["endorsementKey"] = ecc_ek;
  r = s.service("PUT", "/enrollments/tpm-bad", bad.dump());
  expect_refused(r, 400, "attestation.tpm.endorsementKey: the key is an ECC key: only RSA 2048");
  CHECK(test::parse_json(r.body)["errorCode"] == 400005);
  CHECK(s.service("GET", "/enrollments/tpm-bad").status == 404);
  r = s.service("POST", "/enrollments",
                json{{"mode", "create"}, {"enrollments", json::array({bad})}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(test::parse_json(r.body)["isSuccessful"] == false);
  CHECK(s.service("GET", "/enrollments/tpm-bad").status == 404);
  r = put_register(s, "tpm-tamper", {{"endorsementKey", ecc_ek}, {"storageRootKey", tpm.srk_b64}});
  expect_refused(r, 400, "tpm.endorsementKey is an ECC key");
  CHECK(test::parse_json(r.body)["errorCode"] == 400000);
  // Nothing stored by the refused registers: no registration record, and the
  // challenge activated above is still the pending one (it is answered now).
  CHECK(s.service("GET", "/registrations/tpm-tamper").status == 404);
  const auto auth = tpm.sas(s, "tpm-tamper");
  auto done = wait_assigned(s, "tpm-tamper", put_register(s, "tpm-tamper", tpm_body(tpm), auth),
                            auth);
  CHECK_MESSAGE(done["status"] == "assigned", done.dump());
}

/// POST status lookup signed with `auth` (no body member but the id).
net::https_response status_lookup(const test::server_process& s, const std::string& id,
                                  const std::string& auth) {
  auto c = s.client();
  net::http_headers h;
  h.add("Authorization", auth);
  h.add("Content-Type", "application/json");
  net::https_response p;
  REQUIRE(!c.request("POST", device_path(s, id) + "?api-version=2021-06-01", h,
                     json{{"registrationId", id}}.dump(), p));
  return p;
}

TEST_CASE("tpm: deleting the enrollment deletes its challenges; metrics count them") {
  if (skipped_without_tools())
    return;
  test::server_process s;
  start_fresh(s, [](const std::string& dir) { return test::with_metrics(test::default_config(dir)); });
  const auto addr = test::metrics_addr(s);
  // dps_tpm_challenges_total by outcome, all three at once.
  auto check_counts = [&](double issued, double answered, double rejected) {
    const auto text = test::scrape(addr);
    auto count = [&](const char* outcome) {
      return test::sum(text, "dps_tpm_challenges_total",
                       {"outcome=\"" + std::string(outcome) + "\""});
    };
    CHECK(count("issued") == issued);
    CHECK(count("answered") == answered);
    CHECK(count("rejected") == rejected);
  };
  check_counts(0, 0, 0); // every outcome exists from the start
  soft_tpm tpm;
  const std::string id = "tpm-deleted";
  put_tpm_enrollment(s, id, tpm.ek_b64);
  const auto auth = register_with_tpm(s, id, tpm).auth;
  expect_refused(put_register(s, id, tpm_body(tpm), auth), 401, "already answered (a replay)");
  // A second challenge, pending: both slots are now in use.
  expect_challenge(put_register(s, id, tpm_body(tpm)));
  REQUIRE(status_lookup(s, id, auth).status == 200); // the answered slot serves lookups
  check_counts(2, 1, 1);

  // Deleted and enrolled again with the same EK: nothing from before counts,
  // neither the answered challenge (lookups) nor the pending one (registers).
  REQUIRE(s.service("DELETE", "/enrollments/" + id).status == 204);
  put_tpm_enrollment(s, id, tpm.ek_b64);
  expect_refused(status_lookup(s, id, auth), 401, "no TPM challenge is outstanding");
  expect_refused(put_register(s, id, tpm_body(tpm), auth), 401,
                 "no TPM challenge is outstanding");
  check_counts(2, 1, 2);
  // The device starts over and gets in.
  register_with_tpm(s, id, tpm);
  check_counts(3, 2, 2);
}

TEST_CASE("tpm: an expired challenge is refused with its own message") {
  if (skipped_without_tools())
    return;
  test::server_process s;
  start_fresh(s, [](const std::string& dir) {
    return test::with_device_api(test::default_config(dir), "tpm_challenge_seconds = 1");
  });
  soft_tpm tpm;
  put_tpm_enrollment(s, "tpm-late", tpm.ek_b64);
  REQUIRE(tpm.activate(expect_challenge(put_register(s, "tpm-late", tpm_body(tpm)))));
  // Expiry is "issued + 1 s < now" in whole seconds: 2.5 s later it has passed.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  expect_refused(put_register(s, "tpm-late", tpm_body(tpm), tpm.sas(s, "tpm-late")), 401,
                 "the TPM challenge expired");
}

TEST_CASE("tpm over Kafka: the challenge from one gateway is answered on another") {
  if (skipped_without_tools())
    return;
  test::kafka_fixture fx;
  // Gateways of one deployment share the id scope (devices sign it).
  auto cfg = [&](const std::string& dir) {
    return "id_scope = \"0ne00AB7123\"\n" + fx.server_config(dir);
  };
  test::server_process gw1, gw2, worker;
  REQUIRE_MESSAGE(!gw1.start(cfg(fx.dir), fx.dir, {"--roles", "gateway,registration"}),
                  gw1.log());
  auto dir2 = test::make_temp_dir("provisiond-tpm-gw2");
  gw2.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!gw2.start(cfg(dir2), dir2, {"--roles", "gateway,registration"}), gw2.log());
  auto dir3 = test::make_temp_dir("provisiond-tpm-worker");
  worker.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!worker.start(cfg(dir3), dir3, {"--roles", "attestation,allocation,configuration"}),
                  worker.log());

  soft_tpm tpm;
  const std::string id = "tpm-kafka-1";
  put_tpm_enrollment(gw1, id, tpm.ek_b64);
  // The challenge from gateway 1, its answer to gateway 2.
  const auto auth = register_with_tpm(gw1, id, tpm, &gw2).auth;
  // Consumed: the same answer again is a replay.
  expect_refused(put_register(gw2, id, tpm_body(tpm), auth), 401, "already answered (a replay)");
  REQUIRE(status_lookup(gw1, id, auth).status == 200);

  // Deleted through gateway 1 and enrolled again: the challenge slots (issued
  // on 1, answered on 2) went with the replicated delete on both.
  REQUIRE(gw1.service("DELETE", "/enrollments/" + id).status == 204);
  put_tpm_enrollment(gw1, id, tpm.ek_b64);
  expect_refused(status_lookup(gw1, id, auth), 401, "no TPM challenge is outstanding");
  // Gateway 2 has applied the delete once it has the new enrollment (same
  // key, same partition, later offset): its etag.
  const auto fresh = test::parse_json(gw1.service("GET", "/enrollments/" + id).body)["etag"];
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  auto etag_at_2 = [&] {
    auto r = gw2.service("GET", "/enrollments/" + id);
    return r.status == 200 ? test::parse_json(r.body)["etag"] : json();
  };
  while (etag_at_2() != fresh && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  REQUIRE(etag_at_2() == fresh);
  expect_refused(status_lookup(gw2, id, auth), 401, "no TPM challenge is outstanding");
}

TEST_CASE("tpm over Kafka, sealed: no key on the topic, a peer with the key attests, another key is refused") {
  if (skipped_without_tools())
    return;
  test::kafka_fixture fx; // every server_config shares fx.key_file()
  auto cfg = [&](const std::string& dir) {
    return "id_scope = \"0ne00AB7124\"\n" + fx.server_config(dir);
  };
  test::server_process gw1, gw2, worker, stranger;
  REQUIRE_MESSAGE(!gw1.start(cfg(fx.dir), fx.dir, {"--roles", "gateway,registration"}),
                  gw1.log());
  auto wdir = test::make_temp_dir("provisiond-sealed-worker");
  worker.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!worker.start(cfg(wdir), wdir, {"--roles", "attestation,allocation,configuration"}),
                  worker.log());

  soft_tpm tpm;
  const std::string id = "tpm-sealed-1", sym_id = "sym-sealed-1";
  const std::string sym_key = crypto::generate_key();
  put_tpm_enrollment(gw1, id, tpm.ek_b64);
  {
    json body{{"registrationId", sym_id},
              {"attestation",
               {{"type", "symmetricKey"},
                {"symmetricKey", {{"primaryKey", sym_key}, {"secondaryKey", sym_key}}}}}};
    auto r = gw1.service("PUT", "/enrollments/" + sym_id, body.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
  }
  // The challenge from gateway 1: its state goes through dps.enrollments.
  REQUIRE_MESSAGE(tpm.activate(expect_challenge(put_register(gw1, id, tpm_body(tpm)))), tpm.log());

  // The raw bytes on the topic: every record that carries a secret is an
  // envelope, and no key, EK or document text is there to read.
  auto recs = test::read_topic(fx.cfg, "dps.enrollments", 5);
  int enrollments = 0, challenges = 0;
  for (const auto& r : recs) {
    const bool secret = r.key.rfind("enrollment/", 0) == 0 || r.key.rfind("tpm-challenge/", 0) == 0
                        || r.key.rfind("group/", 0) == 0 || r.key.rfind("certificate/", 0) == 0;
    enrollments += r.key.rfind("enrollment/", 0) == 0;
    challenges += r.key.rfind("tpm-challenge/", 0) == 0;
    if (secret && !r.value.empty())
      CHECK_MESSAGE(storage::keyring::is_sealed(r.value), r.key << " = " << r.value);
    CHECK_MESSAGE(r.value.find(sym_key) == std::string::npos, r.key);
    CHECK_MESSAGE(r.value.find(tpm.ek_b64.substr(0, 40)) == std::string::npos, r.key);
    CHECK_MESSAGE(r.value.find("primaryKey") == std::string::npos, r.key);
    CHECK_MESSAGE(r.value.find("registrationId") == std::string::npos, r.key);
  }
  CHECK(enrollments >= 2);
  CHECK(challenges >= 1);

  // A gateway started later with the same key file rebuilds from the topic,
  // answers the challenge gateway 1 issued, and registers the symmetric key.
  auto dir2 = test::make_temp_dir("provisiond-sealed-gw2");
  gw2.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!gw2.start(cfg(dir2), dir2, {"--roles", "gateway,registration"}), gw2.log());
  const auto auth = tpm.sas(gw2, id);
  auto done = wait_assigned(gw2, id, put_register(gw2, id, tpm_body(tpm), auth), auth);
  CHECK_MESSAGE(done["status"] == "assigned", done.dump());
  auto c = gw2.client();
  int status = 0;
  // An individual enrollment's device key is the enrollment key itself.
  auto sym = test::register_device(c, gw2, sym_id, sym_key, status, 20);
  CHECK_MESSAGE(sym.value("status", "") == "assigned", sym.dump());

  // Upgrade path: a plaintext record as an older version wrote it is applied.
  const std::string old_key = crypto::generate_key();
  test::produce_raw(fx.cfg, "dps.enrollments",
                    {{"enrollment/plain-old-1",
                      json{{"registrationId", "plain-old-1"},
                           {"attestation",
                            {{"type", "symmetricKey"},
                             {"symmetricKey", {{"primaryKey", old_key}, {"secondaryKey", old_key}}}}}}
                        .dump()}});
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (gw2.service("GET", "/enrollments/plain-old-1").status != 200
         && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  auto old = test::register_device(c, gw2, "plain-old-1", old_key, status, 20);
  CHECK_MESSAGE(old.value("status", "") == "assigned", old.dump());

  // A process with a key file of its own refuses to start, naming the key
  // id it lacks, instead of taking envelopes for documents.
  std::shared_ptr<const storage::keyring> shared;
  REQUIRE(!storage::keyring::load(fx.key_file(), shared));
  auto dir4 = test::make_temp_dir("provisiond-sealed-stranger");
  stranger.remove_data_dir_at_exit();
  auto other = cfg(dir4);
  other.replace(other.find(fx.key_file()), fx.key_file().size(), dir4 + "/other.key");
  CHECK(static_cast<bool>(stranger.start(other, dir4, {"--roles", "gateway,registration"})));
  CHECK_FALSE(stranger.alive());
  const auto log = stranger.log();
  CHECK_MESSAGE(log.find("is sealed under key id " + shared->active_id()) != std::string::npos, log);
  CHECK_MESSAGE(log.find("does not hold: every process sharing dps.enrollments needs the same "
                         "key-encryption keys")
                  != std::string::npos,
                log);
}

namespace {

/// The test binary's TPM challenge store gates (tests/testd/held_challenges.hpp):
/// while `hold-<call>` exists in `dir`, that call waits; the server removes
/// `held-<call>` when the call goes on. The dir is removed (every gate open)
/// when this goes.
struct gates {
  std::string dir;
  gates() = default;
  gates(const gates&) = delete;
  gates& operator=(const gates&) = delete;
  ~gates() {
    if (!dir.empty())
      test::remove_tree(dir);
  }
  /// A stale `held-` (there should be none) must not count as an arrival.
  void close(const std::string& call) const {
    if (call.find('@') != std::string::npos)
      per_id.push_back(call);
    std::remove((dir + "/held-" + call).c_str());
    std::ofstream(dir + "/hold-" + call) << "1";
  }
  void open(const std::string& call) const { std::remove((dir + "/hold-" + call).c_str()); }
  void open_all() const {
    for (const char* c : {"load", "issue", "promote", "issue-locked", "promote-locked"})
      open(c);
    for (const auto& c : per_id)
      open(c);
  }
  /// Gates of one registration id's calls (`call@id`) closed so far.
  mutable std::vector<std::string> per_id;
  /// Whether a request reached the closed gate (since close()) within `limit`.
  bool reached(const std::string& call,
               std::chrono::seconds limit = std::chrono::seconds(60)) const {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      if (std::ifstream(dir + "/held-" + call).good())
        return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }
};

/// Sets an environment variable for its scope (also when a REQUIRE throws).
struct scoped_env {
  const char* name;
  scoped_env(const char* n, const std::string& value) : name(n) { ::setenv(n, value.c_str(), 1); }
  ~scoped_env() { ::unsetenv(name); }
};

/// A server running the test binary with the gates in a temp dir.
void start_gated(test::server_process& s, gates& g, const std::string& cfg_extra = {}) {
  g.dir = test::make_temp_dir("provisiond-tpm-gates");
  s.set_pipeline_delay_ms(0); // the test binary, no delay
  scoped_env env("PROVISIOND_TEST_TPM_HOLD_DIR", g.dir);
  start_fresh(s, [&](const std::string& dir) {
    auto cfg = test::default_config(dir);
    return cfg_extra.empty() ? cfg : test::with_device_api(cfg, cfg_extra);
  });
}

/// A thread joined when this goes, after `unblock` (opening the gates it may
/// wait at): an assertion that throws while it runs neither terminates the
/// test binary (a joinable std::thread) nor waits out the server's gate.
struct joined_thread {
  std::function<void()> unblock;
  std::thread t;
  joined_thread(std::function<void()> unblock_with, std::function<void()> body)
    : unblock(std::move(unblock_with)), t(std::move(body)) {}
  ~joined_thread() {
    if (t.joinable()) {
      if (unblock)
        unblock();
      t.join();
    }
  }
  void join() { t.join(); }
};

/// A PUT register on its own thread (no assertions there): join() gives
/// the answer.
struct register_in_background {
  net::https_response resp;
  error err;
  joined_thread t;
  register_in_background(const test::server_process& s, const gates& g, const std::string& id,
                         json tpm, std::string auth = {})
    : t([&g] { g.open_all(); },
        [this, &s, id, tpm = std::move(tpm), auth = std::move(auth)] {
          auto c = s.client();
          net::http_headers h;
          if (!auth.empty())
            h.add("Authorization", auth);
          h.add("Content-Type", "application/json; charset=utf-8");
          json body{{"registrationId", id}, {"tpm", tpm}};
          err = c.request("PUT", device_path(s, id) + "/register?api-version=2021-06-01", h,
                          body.dump(), resp);
        }) {}
  const net::https_response& join() {
    t.join();
    REQUIRE_MESSAGE(!err, err.message);
    return resp;
  }
};

} // namespace

TEST_CASE("tpm over Kafka: every gateway answers the hub key of the device's latest assignment") {
  if (skipped_without_tools())
    return;
  test::kafka_fixture fx;
  auto cfg = [&](const std::string& dir) {
    return "id_scope = \"0ne00AB7124\"\n" + fx.server_config(dir);
  };
  test::server_process gw1, gw2, worker;
  REQUIRE_MESSAGE(!gw1.start(cfg(fx.dir), fx.dir, {"--roles", "gateway,registration"}),
                  gw1.log());
  // Gateway 2 runs the test binary: the gate `apply-enrollments` keeps it
  // behind on dps.enrollments (tests/testd/held_challenges.hpp).
  gates g;
  g.dir = test::make_temp_dir("provisiond-tpm-gates");
  auto dir2 = test::make_temp_dir("provisiond-tpm-gw2");
  gw2.remove_data_dir_at_exit();
  gw2.set_pipeline_delay_ms(0);
  {
    scoped_env env("PROVISIOND_TEST_TPM_HOLD_DIR", g.dir);
    REQUIRE_MESSAGE(!gw2.start(cfg(dir2), dir2, {"--roles", "gateway,registration"}),
                    gw2.log());
  }
  auto dir3 = test::make_temp_dir("provisiond-tpm-worker");
  worker.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!worker.start(cfg(dir3), dir3, {"--roles", "attestation,allocation,configuration"}),
                  worker.log());

  soft_tpm tpm;
  const std::string id = "tpm-kafka-hubkey";
  const std::string path = "/enrollments/" + id + "/attestationmechanism";
  put_tpm_enrollment(gw1, id, tpm.ek_b64);

  // The key `gw` gives for operation `op`: asked until its record names `op`
  // (its dps.registrations reader may be behind: then the key is absent or
  // names the previous operation, which the consumer's check refuses). A
  // 503 (a catch-up that timed out on a loaded machine) says when to retry.
  auto key_for = [&](const test::server_process& gw, const std::string& op) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    for (;;) {
      auto r = gw.service("POST", path);
      if (r.status == 503) {
        CHECK_MESSAGE(r.headers.contains("Retry-After"), r.body);
      } else {
        REQUIRE_MESSAGE(r.status == 200, r.body);
        const auto hk = test::parse_json(r.body)["tpm"].value("iotHubKey", json());
        if (hk.is_object() && hk["operationId"] == op) {
          auto key = crypto::base64_decode(hk["primaryKey"].get<std::string>());
          REQUIRE(key);
          return *key;
        }
      }
      REQUIRE_MESSAGE(std::chrono::steady_clock::now() < deadline,
                      "no hub key for operation " << op << ": " << r.body);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  };
  // The key verifies what the TPM signs with the key it imported.
  auto verifies = [&](const std::string& key) {
    const auto d = crypto::hmac_sha256(key, "check");
    return tpm.hmac("check") == std::string(reinterpret_cast<const char*>(d.data()), d.size());
  };

  // Challenged on 1, answered on 2: each gateway's key for the operation is
  // the one the device's TPM holds.
  auto flow = register_with_tpm(gw1, id, tpm, &gw2);
  REQUIRE_MESSAGE(tpm.activate(flow.done["registrationState"]["tpm"]["authenticationKey"]
                                 .get<std::string>()),
                  tpm.log());
  const std::string op1 = flow.done["operationId"].get<std::string>();
  const std::string key1 = key_for(gw1, op1);
  CHECK(key1.size() == 32);
  CHECK_MESSAGE(verifies(key1), "gateway 1: the key does not verify the TPM");
  CHECK(key_for(gw2, op1) == key1);

  // Gateway 2 stops applying dps.enrollments; the device registers again on
  // gateway 1. Gateway 2 still applies dps.registrations, so its record
  // names the new operation while its answered challenge is the old one.
  // Before the two reads were made to agree, it answered HMAC(old
  // challenge, new operation) labelled with the new operation: a wrong key
  // the consumer's check accepts. Now: 503 with Retry-After until it has
  // caught up.
  g.close("apply-enrollments");
  flow = register_with_tpm(gw1, id, tpm);
  REQUIRE_MESSAGE(tpm.activate(flow.done["registrationState"]["tpm"]["authenticationKey"]
                                 .get<std::string>()),
                  tpm.log());
  const std::string op2 = flow.done["operationId"].get<std::string>();
  CHECK(g.reached("apply-enrollments")); // held: the new challenge is not applied on 2
  {
    bool refused = false;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!refused && std::chrono::steady_clock::now() < deadline) {
      auto r = gw2.service("POST", path);
      if (r.status == 503) {
        CHECK_MESSAGE(r.headers.contains("Retry-After"), r.body);
        CHECK_MESSAGE(test::parse_json(r.body).value("errorCode", 0) == 503000, r.body);
        refused = true;
        break;
      }
      REQUIRE_MESSAGE(r.status == 200, r.body);
      const auto hk = test::parse_json(r.body)["tpm"].value("iotHubKey", json());
      if (hk.is_object() && hk["operationId"] == op2) {
        auto key = crypto::base64_decode(hk["primaryKey"].get<std::string>());
        REQUIRE(key);
        CHECK_MESSAGE(verifies(*key),
                      "gateway 2, behind on dps.enrollments, gave a wrong key for " << op2);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    CHECK_MESSAGE(refused, "gateway 2 did not answer 503 while behind on dps.enrollments");
  }
  g.open("apply-enrollments");
  const std::string key2 = key_for(gw1, op2);
  CHECK(key2 != key1);
  CHECK_MESSAGE(verifies(key2), "gateway 1: the new key does not verify the TPM");
  CHECK(key_for(gw2, op2) == key2);
}

TEST_CASE("tpm: a challenge issued or answered while the enrollment is deleted is not kept") {
  if (skipped_without_tools())
    return;
  test::server_process s;
  gates g;
  start_gated(s, g);
  soft_tpm tpm;
  const std::string id = "tpm-race";
  put_tpm_enrollment(s, id, tpm.ek_b64);
  auto delete_and_recreate = [&] {
    REQUIRE(s.service("DELETE", "/enrollments/" + id).status == 204);
    put_tpm_enrollment(s, id, tpm.ek_b64); // same EK: only the incarnation differs
  };

  // 1. Issue: the register read the enrollment; its challenge write waits
  //    at the gate while the enrollment is deleted and created again.
  g.close("issue");
  {
    register_in_background r(s, g, id, tpm_body(tpm));
    const bool reached = g.reached("issue");
    if (reached)
      delete_and_recreate();
    g.open("issue");
    const auto& resp = r.join();
    REQUIRE(reached);
    // No challenge from the old incarnation (before: a 401 with a blob this
    // TPM could activate and answer for the new enrollment).
    expect_refused(resp, 401, "deleted or replaced while this TPM register was in flight");
    CHECK_FALSE(test::parse_json(resp.body).contains("authenticationKey"));
  }

  // 2. Answer: a challenge of the current enrollment, activated; the
  //    answer's mark (pending -> answered) waits while the enrollment is
  //    replaced (same EK, new etag: e.g. disabled, or another hub).
  REQUIRE_MESSAGE(tpm.activate(expect_challenge(put_register(s, id, tpm_body(tpm)))), tpm.log());
  const auto auth = tpm.sas(s, id);
  g.close("promote");
  {
    register_in_background r(s, g, id, tpm_body(tpm), auth);
    const bool reached = g.reached("promote");
    if (reached)
      put_tpm_enrollment(s, id, tpm.ek_b64);
    g.open("promote");
    const auto& resp = r.join();
    REQUIRE(reached);
    // Before: accepted, on the strength of the enrollment as it was before
    // the replacement.
    expect_refused(resp, 401, "deleted or replaced while this TPM register was in flight");
  }
  // Nothing was marked answered: lookups are refused, and the challenge is
  // still pending, so the same answer is accepted now.
  expect_refused(status_lookup(s, id, auth), 401, "has not been answered by a register yet");
  auto done = wait_assigned(s, id, put_register(s, id, tpm_body(tpm), auth), auth);
  CHECK_MESSAGE(done["status"] == "assigned", done.dump());

  // 3. The same with a delete and a new enrollment: nothing of the old one
  //    is left, neither answered nor pending.
  REQUIRE_MESSAGE(tpm.activate(expect_challenge(put_register(s, id, tpm_body(tpm)))), tpm.log());
  const auto auth2 = tpm.sas(s, id);
  g.close("promote");
  {
    register_in_background r(s, g, id, tpm_body(tpm), auth2);
    const bool reached = g.reached("promote");
    if (reached)
      delete_and_recreate();
    g.open("promote");
    const auto& resp = r.join();
    REQUIRE(reached);
    expect_refused(resp, 401, "deleted or replaced while this TPM register was in flight");
  }
  expect_refused(status_lookup(s, id, auth2), 401, "no TPM challenge is outstanding");
  expect_refused(put_register(s, id, tpm_body(tpm), auth2), 401,
                 "no TPM challenge is outstanding");
  // The device starts over and gets in.
  register_with_tpm(s, id, tpm);
}

TEST_CASE("tpm: an enrollment delete waits for a challenge write that checked the enrollment") {
  if (skipped_without_tools())
    return;
  test::server_process s;
  gates g;
  start_gated(s, g);
  soft_tpm tpm;
  const std::string id = "tpm-locked";
  put_tpm_enrollment(s, id, tpm.ek_b64);

  // The register's challenge write passed the etag check and waits inside
  // the enrollment lock; a DELETE of the enrollment meanwhile.
  g.close("issue-locked");
  register_in_background r(s, g, id, tpm_body(tpm));
  if (!g.reached("issue-locked")) {
    g.open_all();
    FAIL("the register did not reach the challenge write: " << r.join().body);
  }
  std::atomic<int> delete_status{0};
  joined_thread del([&] { g.open_all(); }, [&] {
    auto c = s.client(false);
    net::http_headers h;
    h.add("Authorization", s.service_auth());
    net::https_response resp;
    delete_status = c.request("DELETE", "/enrollments/" + id + "?api-version=2021-10-01", h, "",
                              resp)
                      ? -1
                      : resp.status;
  });
  // Not a timing assertion that can fail when the code is right: with the
  // lock the DELETE cannot finish before the gate opens, however long we
  // wait. Without it (compare, then write unlocked) it finishes at once.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (delete_status == 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const int finished_while_held = delete_status;
  g.open("issue-locked");
  const auto& resp = r.join();
  del.join();
  CHECK_MESSAGE(finished_while_held == 0, "the DELETE finished while the challenge write "
                                          "held the enrollment lock: status "
                                            << finished_while_held);
  CHECK(delete_status.load() == 204);
  // The challenge was written before the delete, so the delete took it.
  REQUIRE_MESSAGE(tpm.activate(expect_challenge(resp)), tpm.log());
  put_tpm_enrollment(s, id, tpm.ek_b64); // same EK: only the incarnation differs
  const auto auth = tpm.sas(s, id);
  expect_refused(put_register(s, id, tpm_body(tpm), auth), 401, "no TPM challenge is outstanding");
  register_with_tpm(s, id, tpm);
}

TEST_CASE("tpm: an MQTT CONNECT for a TPM-enrolled id is refused without reading challenges") {
  if (skipped_without_tools())
    return;
  test::server_process s;
  gates g;
  start_gated(s, g);
  REQUIRE(s.mqtt_port() != 0);
  soft_tpm tpm;
  const std::string id = "tpm-mqtt";
  put_tpm_enrollment(s, id, tpm.ek_b64);
  const auto flow = register_with_tpm(s, id, tpm); // a SAS the TPM signed, valid over HTTPS
  const std::string user = s.id_scope() + "/registrations/" + id + "/api-version=2021-06-01";
  auto connect = [&](const std::string& sas) {
    test::mqtt_client c(s.mqtt_port(), s.data_dir() + "/tls/ca.pem");
    const int code = c.connect(id, user, sas);
    CHECK(c.closed_by_server());
    return code;
  };
  // The challenge read is held: a CONNECT that read challenges (on the
  // MQTT I/O thread) would not be answered until the gate opens.
  g.close("load");
  CHECK(connect(flow.auth) == 5); // not authorized: DPS has no TPM over MQTT
  CHECK(connect(s.device_auth(id, crypto::generate_key())) == 5);
  CHECK_FALSE(g.reached("load", std::chrono::seconds(1)));
  g.open("load");
  CHECK(s.log().find("DPS has no TPM attestation over MQTT") != std::string::npos);
  // The same SAS over HTTPS: the device is fine.
  REQUIRE(status_lookup(s, id, flow.auth).status == 200);
}

TEST_CASE("tpm: a malformed or foreign SAS is refused without waiting for the TPM worker") {
  if (skipped_without_tools())
    return;
  test::server_process s;
  gates g;
  start_gated(s, g);
  soft_tpm tpm;
  const std::string id = "tpm-cheap";
  put_tpm_enrollment(s, id, tpm.ek_b64);
  // The one TPM worker is busy: a register's challenge write is held.
  g.close("issue");
  register_in_background held(s, g, id, tpm_body(tpm));
  REQUIRE(g.reached("issue"));
  // Before, these queued behind it (and could fill the queue): now they are
  // refused on the I/O thread while the worker is still held.
  const std::vector<std::string> bad = {
    "SharedAccessSignature garbage",
    s.device_auth("someone-else", crypto::generate_key()), // another id's resource
  };
  for (const auto& auth : bad) {
    std::atomic<int> status{0};
    std::string body;
    joined_thread t(nullptr, [&] {
      auto c = s.client(false);
      net::http_headers h;
      h.add("Authorization", auth);
      h.add("Content-Type", "application/json; charset=utf-8");
      net::https_response r;
      json req{{"registrationId", id}, {"tpm", tpm_body(tpm)}};
      if (!c.request("PUT", device_path(s, id) + "/register?api-version=2021-06-01", h,
                     req.dump(), r)) {
        body = r.body;
        status = r.status;
      } else {
        status = -1;
      }
    });
    // Bounded: held behind the worker it would not be answered before the
    // gate opens (never, within the bound).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (status == 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const int answered_while_held = status;
    if (answered_while_held == 0)
      g.open_all();
    t.join();
    CHECK_MESSAGE(answered_while_held == 401, "status " << answered_while_held << ": " << body);
  }
  g.open("issue");
  CHECK(tpm.activate(expect_challenge(held.join())));
}

TEST_CASE("tpm: polls and status lookups of TPM devices do not hold the gateway's I/O thread") {
  if (skipped_without_tools())
    return;
  // One I/O thread: whatever holds it holds every request.
  test::server_process s;
  gates g;
  start_gated(s, g, "threads = 1");
  soft_tpm tpm;
  const std::string id = "tpm-io";
  put_tpm_enrollment(s, id, tpm.ek_b64);
  const auto flow = register_with_tpm(s, id, tpm);
  const auto& auth = flow.auth;
  const std::string op = flow.done["operationId"].get<std::string>();

  // A TPM device's request whose challenge read is held at the gate (with
  // Kafka that read may wait for a catch-up of dps.enrollments, up to 5 s),
  // and meanwhile another client's request on the same server.
  auto other_served_meanwhile = [&](auto tpm_request) {
    g.close("load");
    std::atomic<int> tpm_status{0};
    joined_thread device([&] { g.open_all(); }, [&] { tpm_status = tpm_request(); });
    const bool reached = g.reached("load");
    std::atomic<int> other_status{0};
    joined_thread other(nullptr, [&] {
      auto c = s.client(false);
      net::http_headers h;
      h.add("Authorization", s.service_auth());
      net::https_response r;
      if (!c.request("GET", "/enrollments/" + id + "?api-version=2021-10-01", h, "", r))
        other_status = r.status;
    });
    // Bounded: before, the other request could not be served until the
    // gate opened (never, within the bound); after, it takes milliseconds.
    const auto asked = std::chrono::steady_clock::now();
    const auto deadline = asked + std::chrono::seconds(30);
    while (other_status == 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const int served_while_held = other_status;
    MESSAGE("the other request, while the TPM request was held: status " << served_while_held
            << " after ~" << std::chrono::duration_cast<std::chrono::milliseconds>(
                                 std::chrono::steady_clock::now() - asked).count()
            << " ms (20 ms polling)");
    g.open("load");
    device.join();
    other.join();
    REQUIRE(reached);
    CHECK(served_while_held == 200); // 0: not served within 30 s
    CHECK(tpm_status.load() == 200); // and the held request itself finished fine
  };
  // Operation status poll.
  other_served_meanwhile([&] {
    auto c = s.client(false);
    net::http_headers h;
    h.add("Authorization", auth);
    net::https_response p;
    if (c.request("GET", device_path(s, id) + "/operations/" + op + "?api-version=2021-06-01", h,
                  "", p))
      return -1;
    return p.status;
  });
  // Registration status lookup.
  other_served_meanwhile([&] {
    auto c = s.client(false);
    net::http_headers h;
    h.add("Authorization", auth);
    h.add("Content-Type", "application/json");
    net::https_response p;
    if (c.request("POST", device_path(s, id) + "?api-version=2021-06-01", h,
                  json{{"registrationId", id}}.dump(), p))
      return -1;
    return p.status;
  });
}

TEST_CASE("tpm: a held TPM request of one device does not hold another device's TPM register") {
  if (skipped_without_tools())
    return;
  test::server_process s;
  gates g;
  start_gated(s, g);
  soft_tpm tpm_a, tpm_b;
  const std::string a = "tpm-pool-a", b = "tpm-pool-b";
  put_tpm_enrollment(s, a, tpm_a.ek_b64);
  put_tpm_enrollment(s, b, tpm_b.ek_b64);
  const auto flow = register_with_tpm(s, a, tpm_a);

  // Device a's status lookup is held in its challenge read (as one waiting
  // for a Kafka catch-up of dps.enrollments, up to 5 s), on a TPM worker.
  g.close("load@" + a);
  std::atomic<int> a_status{0};
  // (No assertions on these threads: raw requests, checked on this one.)
  joined_thread held([&] { g.open_all(); }, [&] {
    auto c = s.client(false);
    net::http_headers h;
    h.add("Authorization", flow.auth);
    h.add("Content-Type", "application/json");
    net::https_response p;
    a_status = c.request("POST", device_path(s, a) + "?api-version=2021-06-01", h,
                         json{{"registrationId", a}}.dump(), p)
                 ? -1
                 : p.status;
  });
  REQUIRE(g.reached("load@" + a));
  // Meanwhile device b asks for its challenge. Before: one TPM thread, so it
  // queued behind a's held lookup and was not answered until the gate opened.
  std::atomic<int> b_status{0};
  std::string b_body;
  joined_thread other(nullptr, [&] {
    auto c = s.client(false);
    net::http_headers h;
    h.add("Content-Type", "application/json; charset=utf-8");
    net::https_response r;
    const json body{{"registrationId", b}, {"tpm", tpm_body(tpm_b)}};
    if (c.request("PUT", device_path(s, b) + "/register?api-version=2021-06-01", h, body.dump(),
                  r)) {
      b_status = -1;
      return;
    }
    b_body = r.body;
    b_status = r.status;
  });
  // Bounded: held behind a, it would not be answered before the gate opens.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (b_status == 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const int b_while_held = b_status;
  g.open("load@" + a);
  held.join();
  other.join();
  // Before (one TPM thread): 0 or -1, not answered within 30 s (the
  // client's own timeout is 30 s too).
  REQUIRE_MESSAGE(b_while_held == 401, "b's challenge while a was held: status "
                                         << b_while_held << ": " << b_body);
  CHECK(a_status.load() == 200); // the held lookup itself finished fine
  // b's challenge is a real one: b answers it and is assigned.
  net::https_response first;
  first.status = b_status;
  first.body = b_body;
  REQUIRE_MESSAGE(tpm_b.activate(expect_challenge(first)), tpm_b.log());
  const auto auth_b = tpm_b.sas(s, b);
  auto done = wait_assigned(s, b, put_register(s, b, tpm_body(tpm_b), auth_b), auth_b);
  CHECK_MESSAGE(done["status"] == "assigned", done.dump());
}

namespace {

/// A service API call signed with `auth` ("" = no Authorization).
net::https_response service_as(const test::server_process& s, const std::string& auth,
                               const std::string& method, const std::string& path,
                               const std::string& body = {}) {
  auto c = s.client(false);
  net::http_headers h;
  if (!auth.empty())
    h.add("Authorization", auth);
  if (!body.empty())
    h.add("Content-Type", "application/json");
  net::https_response r;
  auto err = c.request(method, path + "?api-version=2021-10-01", h, body, r);
  REQUIRE_MESSAGE(!err, err.message);
  return r;
}

/// An IoT Hub device SAS, sr = `<hub>/devices/<id>`, signed by `sign`.
std::string hub_sas(const std::string& hub, const std::string& id, const std::string& se,
                    const std::function<std::string(const std::string&)>& sign) {
  const std::string sr = crypto::url_encode(hub + "/devices/" + id);
  return "SharedAccessSignature sr=" + sr + "&sig="
         + crypto::url_encode(crypto::base64_encode(sign(sr + "\n" + se))) + "&se=" + se;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

} // namespace

TEST_CASE("tpm: the hub side reads a TPM device's IoT Hub key where it reads symmetric keys") {
  if (skipped_without_tools())
    return;
  const auto owner = crypto::generate_key(), hub_side = crypto::generate_key(),
             feed = crypto::generate_key();
  test::server_process s;
  // The default clock skew allowance (300 s): embedded, the hub key's
  // "challenge newer than the assignment" check uses none (one clock), so
  // the failed re-registration below is told apart from the assignment.
  start_fresh(s, [&](const std::string& dir) {
    return test::default_config(dir)
           + "[[access_policies]]\nname = \"owner\"\nprimary_key = \""
           + owner
           + "\"\nrights = [\"ServiceConfig\", \"EnrollmentRead\", \"EnrollmentWrite\", "
             "\"RegistrationStatusRead\", \"RegistrationStatusWrite\"]\n"
             "[[access_policies]]\nname = \"hubside\"\nprimary_key = \""
           + hub_side + "\"\nrights = [\"EnrollmentRead\", \"RegistrationStatusRead\"]\n"
           + "[[access_policies]]\nname = \"feed\"\nprimary_key = \"" + feed
           + "\"\nrights = [\"RegistrationStatusRead\"]\n";
  });
  const auto as_owner = s.service_auth("owner", owner);
  const auto as_hub = s.service_auth("hubside", hub_side);
  // The CLI as the owner (this server has no provisioningserviceowner).
  const std::string owner_cs =
    " --connection-string 'HostName="
    + test::parse_json(read_text(s.data_dir() + "/identity.json")).value("service_host",
                                                                        "localhost")
    + ";SharedAccessKeyName=owner;SharedAccessKey=" + owner + "'";
  soft_tpm tpm;
  const std::string id = "tpm-hubkey";
  const std::string path = "/enrollments/" + id + "/attestationmechanism";
  {
    json body{{"registrationId", id},
              {"attestation", {{"type", "tpm"}, {"tpm", {{"endorsementKey", tpm.ek_b64}}}}}};
    auto r = service_as(s, as_owner, "PUT", "/enrollments/" + id, body.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
  }
  // Enrolled, never registered: the EK, no hub key yet.
  {
    auto r = service_as(s, as_hub, "POST", path);
    REQUIRE_MESSAGE(r.status == 200, r.body);
    auto j = test::parse_json(r.body);
    CHECK(j["type"] == "tpm");
    CHECK(j["tpm"]["endorsementKey"] == tpm.ek_b64);
    CHECK_FALSE(j["tpm"].contains("iotHubKey"));
    int rc = 0;
    auto out = cli(s, "enrollment get " + id + " --show-keys" + owner_cs, rc);
    CHECK_MESSAGE(rc == 0, out);
    CHECK_MESSAGE(out.find("(none: no assigned TPM registration)") != std::string::npos, out);
  }

  // The device registers; its result's authenticationKey is imported into
  // its TPM (what the SDKs do), which then signs its IoT Hub SAS.
  auto flow = register_with_tpm(s, id, tpm);
  const auto& rs = flow.done["registrationState"];
  REQUIRE_MESSAGE(tpm.activate(rs["tpm"]["authenticationKey"].get<std::string>()), tpm.log());
  const std::string hub = rs["assignedHub"].get<std::string>();
  const std::string se = std::to_string(std::time(nullptr) + 3600);
  const std::string device_sas = hub_sas(hub, id, se, [&](const std::string& m) {
    return tpm.hmac(m);
  });

  // The hub side: what its device.assigned names, then the key, with the
  // same right as a symmetric key (EnrollmentRead).
  auto read_key = [&](const json& done) {
    auto r = service_as(s, as_hub, "POST", path);
    REQUIRE_MESSAGE(r.status == 200, r.body);
    auto j = test::parse_json(r.body);
    CHECK(j["tpm"]["endorsementKey"] == tpm.ek_b64);
    const auto& hk = j["tpm"]["iotHubKey"];
    REQUIRE_MESSAGE(hk.is_object(), r.body);
    CHECK(hk["operationId"] == done["operationId"]);
    CHECK(hk["assignedHub"] == done["registrationState"]["assignedHub"]);
    CHECK(hk["deviceId"] == done["registrationState"]["deviceId"]);
    auto key = crypto::base64_decode(hk["primaryKey"].get<std::string>());
    REQUIRE(key);
    CHECK(key->size() == 32);
    return *key;
  };
  const std::string key = read_key(flow.done);
  // The hub verifies the TPM-signed SAS with the key it got.
  const std::string hub_signed = hub_sas(hub, id, se, [&](const std::string& m) {
    const auto d = crypto::hmac_sha256(key, m);
    return std::string(reinterpret_cast<const char*>(d.data()), d.size());
  });
  CHECK_MESSAGE(hub_signed == device_sas, "the hub's key does not verify the TPM's SAS");
  const std::string key_b64 = crypto::base64_encode(key);

  // Wrong or insufficient credentials: 401/403, and no key in the answer.
  auto refused = [&](const std::string& auth, int status, int code) {
    auto r = service_as(s, auth, "POST", path);
    CHECK_MESSAGE(r.status == status, r.body);
    CHECK_MESSAGE(test::parse_json(r.body).value("errorCode", 0) == code, r.body);
    CHECK(r.body.find(key_b64) == std::string::npos);
    CHECK(r.body.find("iotHubKey") == std::string::npos);
  };
  refused("", 401, 401000);
  refused(s.service_auth("hubside", crypto::generate_key()), 401, 401002); // wrong key
  refused(s.service_auth("nobody", hub_side), 401, 401002);                // unknown policy
  refused(s.service_auth("feed", feed), 403, 403000);                      // no EnrollmentRead
  // The device's own SAS (its registration key) is no service credential.
  refused(flow.auth, 401, 401002);

  // Audited: the read that returned the key, and the refused attempts; the
  // key itself is in neither the audit log nor the server's log.
  const std::string audit = read_text(s.data_dir() + "/audit.log");
  auto audited = [&](const std::string& identity, int status) {
    std::istringstream lines(audit);
    std::string line;
    while (std::getline(lines, line)) {
      auto j = json::parse(line, nullptr, false);
      if (j.is_object() && j.value("operationName", "") == "GetAttestationMechanism"
          && j.value("identity", "") == identity && j.value("resultSignature", 0) == status
          && j.value("authenticated", false))
        return true;
    }
    return false;
  };
  CHECK_MESSAGE(audited("hubside", 200), audit);
  CHECK_MESSAGE(audited("feed", 403), audit);
  CHECK(audit.find(key_b64) == std::string::npos);
  CHECK(s.log().find(key_b64) == std::string::npos);

  // A new registration (new challenge, new operation) gets a new key; the
  // hub side reads the new one, which verifies the TPM's new signature.
  flow = register_with_tpm(s, id, tpm);
  REQUIRE_MESSAGE(tpm.activate(flow.done["registrationState"]["tpm"]["authenticationKey"]
                                 .get<std::string>()),
                  tpm.log());
  const std::string key2 = read_key(flow.done);
  CHECK(key2 != key);
  const auto d = crypto::hmac_sha256(key2, "check");
  CHECK(tpm.hmac("check") == std::string(reinterpret_cast<const char*>(d.data()), d.size()));

  // A later register that answers a new challenge but fails (the enrollment
  // now names only a hub that is not linked: 400208): the record stays on
  // the last assignment, whose challenge is gone, so there is no key to
  // give. Before: a key made from the new challenge, which the device never
  // received for that assignment. (The wait only makes the new challenge's
  // issue second later than the assignment; nothing is timed.)
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  {
    json body{{"registrationId", id},
              {"iotHubs", {"not-linked.example.net"}},
              {"attestation", {{"type", "tpm"}, {"tpm", {{"endorsementKey", tpm.ek_b64}}}}}};
    auto r = service_as(s, as_owner, "PUT", "/enrollments/" + id, body.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
  }
  REQUIRE_MESSAGE(tpm.activate(expect_challenge(put_register(s, id, tpm_body(tpm)))), tpm.log());
  const auto auth3 = tpm.sas(s, id);
  auto failed = wait_assigned(s, id, put_register(s, id, tpm_body(tpm), auth3), auth3);
  REQUIRE_MESSAGE(failed["status"] == "failed", failed.dump());
  {
    auto rec = service_as(s, as_owner, "GET", "/registrations/" + id);
    REQUIRE_MESSAGE(rec.status == 200, rec.body);
    CHECK(test::parse_json(rec.body)["status"] == "assigned"); // the old assignment stays
    auto r = service_as(s, as_hub, "POST", path);
    REQUIRE_MESSAGE(r.status == 200, r.body);
    CHECK_MESSAGE(!test::parse_json(r.body)["tpm"].contains("iotHubKey"), r.body);
    // The CLI says why there is none, not "no assigned registration".
    int rc = 0;
    auto out = cli(s, "enrollment get " + id + " --show-keys" + owner_cs, rc);
    CHECK_MESSAGE(rc == 0, out);
    CHECK_MESSAGE(out.find("a later register answered a newer TPM challenge and failed")
                    != std::string::npos,
                  out);
  }
}

TEST_CASE("tpm over Kafka: a direct publisher's request for a TPM-enrolled id is refused") {
  if (skipped_without_tools())
    return;
  test::kafka_fixture fx;
  test::server_process s;
  REQUIRE_MESSAGE(!s.start(fx.server_config(), fx.dir), s.log());
  soft_tpm tpm;
  const std::string id = "tpm-direct-1";
  put_tpm_enrollment(s, id, tpm.ek_b64);
  // A real answer: the challenge over HTTPS, activated in the TPM, the SAS
  // signed inside it; then published on registration.requested instead.
  REQUIRE_MESSAGE(tpm.activate(expect_challenge(put_register(s, id, tpm_body(tpm)))), tpm.log());
  const auto auth = tpm.sas(s, id);
  const json v{{"registrationId", id}, {"idScope", s.id_scope()}, {"authorization", auth},
               {"operationId", "tpm-direct-op-1"}};
  test::produce_raw(fx.cfg, "dps.registration.requested", {{id, v.dump()}});
  const auto records = test::read_topic(fx.cfg, "dps.registration.completed", 1);
  json done;
  for (const auto& r : records)
    if (r.key == id)
      done = json::parse(r.value, nullptr, false);
  REQUIRE_MESSAGE(done.is_object(), records.size() << " records on registration.completed");
  // Before: attested on the stage's thread (the challenge write blocking
  // it on Kafka) and assigned, with no tpm.authenticationKey anywhere.
  CHECK(done.value("status", "") == "failed");
  CHECK(done.value("errorCode", 0) == 401002);
  CHECK_MESSAGE(done.value("errorMessage", "").find("TPM devices register over HTTPS")
                  != std::string::npos,
                done.dump());
  CHECK(done.value("operationId", "") == "tpm-direct-op-1");
  // Nothing was consumed: the challenge is still pending, and the same
  // answer over HTTPS is accepted.
  auto ok = wait_assigned(s, id, put_register(s, id, tpm_body(tpm), auth), auth);
  CHECK_MESSAGE(ok["status"] == "assigned", ok.dump());
}
