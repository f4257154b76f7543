// TPM attestation end to end: a software TPM (swtpm, started here on a free
// port) driven by tpm2-tools plays the device against the real provisiond
// over real TLS: EK and SRK made in the TPM, the 401 challenge, then
// ActivateCredential, Import, Load and an HMAC of the SAS inside the TPM,
// and the second register. Skipped, loudly, only when swtpm or tpm2-tools
// are not installed (scripts/install-test-deps.sh installs them).

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "messages/crypto.hpp"
#include "messages/registration.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/server_process.hpp"

using namespace prov;
using nlohmann::json;

namespace {

bool have_tools() {
  return std::system("command -v swtpm >/dev/null 2>&1 && command -v tpm2_createek >/dev/null 2>&1"
                     " && command -v tpm2_activatecredential >/dev/null 2>&1") == 0;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

void write_file(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary);
  f << data;
}

/// A TCP port p on loopback with p + 1 free too (swtpm's control port).
int free_port_pair() {
  for (int attempt = 0; attempt < 50; ++attempt) {
    int a = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    socklen_t len = sizeof addr;
    if (::bind(a, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0
        || ::getsockname(a, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ::close(a);
      continue;
    }
    const int p = ntohs(addr.sin_port);
    int b = ::socket(AF_INET, SOCK_STREAM, 0);
    addr.sin_port = htons(static_cast<uint16_t>(p + 1));
    const bool ok = p < 65535 && ::bind(b, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    ::close(a);
    ::close(b);
    if (ok)
      return p;
  }
  return 0;
}

bool can_connect(int port) {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const bool ok = ::connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(s);
  return ok;
}

/// The six TPM2B parts of an activation blob, each with its size field.
std::vector<std::string> split_blob(const std::string& blob) {
  std::vector<std::string> parts;
  std::size_t at = 0;
  while (at + 2 <= blob.size()) {
    const std::size_t n = (static_cast<uint8_t>(blob[at]) << 8) | static_cast<uint8_t>(blob[at + 1]);
    REQUIRE(at + 2 + n <= blob.size());
    parts.push_back(blob.substr(at, 2 + n));
    at += 2 + n;
  }
  CHECK(at == blob.size());
  return parts;
}

/// swtpm plus tpm2-tools: a device's TPM, with its EK (0x81010001) and SRK
/// (0x81000001) persisted as the DPS SDKs expect them.
class soft_tpm {
public:
  soft_tpm() {
    dir_ = test::make_temp_dir("provisiond-swtpm");
    port_ = free_port_pair();
    REQUIRE(port_ != 0);
    ::mkdir((dir_ + "/state").c_str(), 0700);
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      const std::string server = "type=tcp,port=" + std::to_string(port_) + ",bindaddr=127.0.0.1";
      const std::string ctrl = "type=tcp,port=" + std::to_string(port_ + 1) + ",bindaddr=127.0.0.1";
      const std::string state = "dir=" + dir_ + "/state";
      const std::string log = "file=" + dir_ + "/swtpm.log";
      ::execlp("swtpm", "swtpm", "socket", "--tpm2", "--server", server.c_str(), "--ctrl",
               ctrl.c_str(), "--flags", "not-need-init,startup-clear", "--tpmstate",
               state.c_str(), "--log", log.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    for (int i = 0; i < 200 && !can_connect(port_); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    REQUIRE_MESSAGE(can_connect(port_), "swtpm did not listen: " << read_file(dir_ + "/swtpm.log"));
    REQUIRE_MESSAGE(run("tpm2_createek -c 0x81010001 -G rsa -u ek.pub"), log());
    REQUIRE_MESSAGE(run("tpm2_createprimary -C o -g sha256 -G rsa -c srk.ctx"), log());
    REQUIRE_MESSAGE(run("tpm2_evictcontrol -C o -c srk.ctx 0x81000001"), log());
    REQUIRE_MESSAGE(run("tpm2_flushcontext -t"), log());
    REQUIRE_MESSAGE(run("tpm2_readpublic -c 0x81000001 -o srk.pub"), log());
    ek_b64 = crypto::base64_encode(read_file(dir_ + "/ek.pub"));
    srk_b64 = crypto::base64_encode(read_file(dir_ + "/srk.pub"));
  }
  ~soft_tpm() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int st = 0;
      ::waitpid(pid_, &st, 0);
    }
    test::remove_tree(dir_);
  }
  soft_tpm(const soft_tpm&) = delete;
  soft_tpm& operator=(const soft_tpm&) = delete;

  /// Runs a tpm2-tools command line in the TPM's dir, against this swtpm.
  bool run(const std::string& cmd) const {
    const std::string line = "cd '" + dir_ + "' && TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port="
                             + std::to_string(port_) + " " + cmd + " >>tools.log 2>&1";
    return std::system(line.c_str()) == 0;
  }
  std::string log() const { return read_file(dir_ + "/tools.log"); }

  /// What the SDKs do with the 401's authenticationKey: ActivateCredential
  /// (EK policy session) for the inner wrap key, Import under the SRK, Load.
  /// False when the TPM refuses the blob.
  bool activate(const std::string& blob_b64, const std::string& tamper = {}) const {
    auto blob = crypto::base64_decode(blob_b64);
    REQUIRE(blob);
    auto parts = split_blob(*blob);
    REQUIRE(parts.size() == 6);
    if (tamper == "credential") // flip a bit of encIdentity: its HMAC must catch it
      parts[0].back() = static_cast<char>(parts[0].back() ^ 1);
    if (tamper == "duplicate")
      parts[2].back() = static_cast<char>(parts[2].back() ^ 1);
    // tpm2_makecredential's file: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
    write_file(dir_ + "/cred.blob", std::string("\xBA\xDC\xC0\xDE\x00\x00\x00\x01", 8) + parts[0]
                                      + parts[1]);
    write_file(dir_ + "/dup.priv", parts[2]);
    write_file(dir_ + "/dup.seed", parts[3]);
    write_file(dir_ + "/dup.pub", parts[4]);
    const bool activated =
      run("tpm2_startauthsession --policy-session -S session.ctx")
      && run("tpm2_policysecret -S session.ctx -c e")
      && run("tpm2_activatecredential -c 0x81000001 -C 0x81010001 -i cred.blob -o inner.key"
             " -P session:session.ctx");
    run("tpm2_flushcontext session.ctx");
    run("tpm2_flushcontext -t");
    if (!activated)
      return false;
    const bool ok = run("tpm2_import -C 0x81000001 -u dup.pub -i dup.priv -s dup.seed -k inner.key"
                        " -r key.priv")
                    && run("tpm2_flushcontext -t")
                    && run("tpm2_load -C 0x81000001 -u dup.pub -r key.priv -c key.ctx");
    run("tpm2_flushcontext -t");
    return ok;
  }

  /// HMAC-SHA256 inside the TPM with the imported key.
  std::string hmac(const std::string& msg) const {
    write_file(dir_ + "/msg", msg);
    std::remove((dir_ + "/sig").c_str());
    REQUIRE_MESSAGE(run("tpm2_hmac -c key.ctx -g sha256 -o sig msg"), log());
    run("tpm2_flushcontext -t");
    auto sig = read_file(dir_ + "/sig");
    REQUIRE(sig.size() == 32);
    return sig;
  }

  /// A device SAS for `id`, signed in the TPM (C SDK style: sr URL-encoded).
  std::string sas(const test::server_process& s, const std::string& id,
                  int64_t lifetime_s = 3600) const {
    const std::string sr = crypto::url_encode(s.id_scope() + "/registrations/" + id);
    const std::string se = std::to_string(now_ms() / 1000 + lifetime_s);
    return "SharedAccessSignature sr=" + sr + "&sig="
           + crypto::url_encode(crypto::base64_encode(hmac(sr + "\n" + se))) + "&se=" + se
           + "&skn=registration";
  }

  std::string ek_b64, srk_b64;

private:
  std::string dir_;
  int port_ = 0;
  pid_t pid_ = -1;
};

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
  for (int i = 0; i < 300 && j["status"] == "assigning"; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    net::https_response p;
    REQUIRE(!c.request("GET", device_path(s, id) + "/operations/" + op + "?api-version=2021-06-01",
                       h, "", p));
    REQUIRE_MESSAGE(p.status / 100 == 2, p.body);
    j = test::parse_json(p.body);
  }
  return j;
}

} // namespace

TEST_CASE("tpm: swtpm device: challenge, activate, import, HMAC-signed SAS, assigned") {
  if (!have_tools()) {
    MESSAGE("SKIPPED LOUDLY: swtpm or tpm2-tools not installed (scripts/install-test-deps.sh)");
    return;
  }
  auto& s = test::shared_server();
  soft_tpm tpm;
  const std::string id = "tpm-dev-1";
  put_tpm_enrollment(s, id, tpm.ek_b64);

  // The service API shows the EK as enrolled.
  auto g = s.service("GET", "/enrollments/" + id);
  REQUIRE(g.status == 200);
  CHECK(test::parse_json(g.body)["attestation"]["type"] == "tpm");

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

  // Status lookup with the SAS alone (no body).
  {
    auto c = s.client();
    net::http_headers h;
    h.add("Authorization", auth);
    h.add("Content-Type", "application/json");
    net::https_response p;
    REQUIRE(!c.request("POST", device_path(s, id) + "?api-version=2021-06-01", h,
                       json{{"registrationId", id}}.dump(), p));
    CHECK_MESSAGE(p.status == 200, p.body);
  }
  auto rec = s.service("GET", "/registrations/" + id);
  REQUIRE_MESSAGE(rec.status == 200, rec.body);
  CHECK(test::parse_json(rec.body)["status"] == "assigned");

  // 3. The same answer again: a replay.
  expect_refused(put_register(s, id, tpm_body(tpm), auth), 401, "already answered (a replay)");

  // 4. A new challenge, answered with the previous (wrong) key: refused.
  const auto blob2 = expect_challenge(put_register(s, id, tpm_body(tpm)));
  expect_refused(put_register(s, id, tpm_body(tpm), auth), 401, "signature mismatch");
  // ...and with the new key: accepted again (a re-registration).
  REQUIRE_MESSAGE(tpm.activate(blob2), tpm.log());
  const auto auth2 = tpm.sas(s, id);
  auto again = wait_assigned(s, id, put_register(s, id, tpm_body(tpm), auth2), auth2);
  CHECK(again["status"] == "assigned");
}

TEST_CASE("tpm: refusals: EK not enrolled or another's, tampered blobs, malformed keys") {
  if (!have_tools()) {
    MESSAGE("SKIPPED LOUDLY: swtpm or tpm2-tools not installed (scripts/install-test-deps.sh)");
    return;
  }
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
}

TEST_CASE("tpm: an expired challenge is refused with its own message") {
  if (!have_tools()) {
    MESSAGE("SKIPPED LOUDLY: swtpm or tpm2-tools not installed (scripts/install-test-deps.sh)");
    return;
  }
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it");
  s.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!s.start(test::with_device_api(test::default_config(dir),
                                                 "tpm_challenge_seconds = 1"),
                           dir),
                  s.log());
  soft_tpm tpm;
  put_tpm_enrollment(s, "tpm-late", tpm.ek_b64);
  REQUIRE(tpm.activate(expect_challenge(put_register(s, "tpm-late", tpm_body(tpm)))));
  // Expiry is "issued + 1 s < now" in whole seconds: 2.5 s later it has passed.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  expect_refused(put_register(s, "tpm-late", tpm_body(tpm), tpm.sas(s, "tpm-late")), 401,
                 "the TPM challenge expired");
}
