// Certificate issuance from a CSR (RegisterDeviceAndIssueCertificate, DPS
// api-version 2025-07-01-preview) against the real provisiond process over
// real TLS: keys, CSRs and the issuing CAs are made here with OpenSSL; the
// issued chain is verified with X509_verify_cert and `openssl verify`, then
// used as the device's X.509 credential against a CA group.

#include <doctest/doctest.h>

#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "messages/crypto.hpp"
#include "tests/support/cli.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/server_process.hpp"
#include "tests/support/test_certs.hpp"
#include "tests/support/test_csr.hpp"
#include "tests/support/x509_client.hpp"

using namespace prov;
using nlohmann::json;
using test::test_cert;

namespace {

constexpr const char* api = "2025-07-01-preview";

struct issuing_pki {
  test_cert root = test::make_ca("CSR IT Root", nullptr, 1);
  test_cert issuing = test::make_ca("CSR IT Issuing CA", &root, 2);
  test_cert rsa_root = test::make_ca_with_key("CSR IT RSA CA", test::new_key("RSA-2048"));
};

const issuing_pki& pki() {
  static const issuing_pki p;
  return p;
}

std::string write_private(const std::string& name, const std::string& text, mode_t mode) {
  auto path = test::write_file(test::cert_dir(), name, text);
  REQUIRE(::chmod(path.c_str(), mode) == 0);
  return path;
}

/// [[issuing_cas]] "fleet" (intermediate + root, 12 hours) and "rsa" (an RSA
/// root, 2 days).
std::string issuing_cas_toml() {
  const auto& p = pki();
  auto fleet_key = write_private("fleet.key", p.issuing.key_pem(), 0600);
  auto fleet_pem = write_private("fleet.pem", p.issuing.pem() + p.root.pem(), 0644);
  auto rsa_key = write_private("rsa.key", p.rsa_root.key_pem(), 0600);
  auto rsa_pem = write_private("rsa.pem", p.rsa_root.pem(), 0644);
  return "[[issuing_cas]]\nname = \"fleet\"\nkey_file = \"" + fleet_key +
         "\"\ncertificate_file = \"" + fleet_pem + "\"\nvalidity_hours = 12\n"
         "[[issuing_cas]]\nname = \"rsa\"\nkey_file = \"" + rsa_key +
         "\"\ncertificate_file = \"" + rsa_pem + "\"\nvalidity_hours = 48\n";
}

test::server_process& srv() {
  static test::server_process s;
  static bool started = false;
  if (!started) {
    auto dir = test::make_temp_dir("provisiond-csr-it");
    s.remove_data_dir_at_exit();
    auto cfg = test::with_device_api(test::default_config(dir), "register_wait_ms = 5000") +
               issuing_cas_toml();
    auto err = s.start(cfg, dir);
    REQUIRE_MESSAGE(!err, err.message << "\n" << s.log());
    started = true;
  }
  return s;
}

json parse(const std::string& t) { return test::parse_json(t); }

/// A symmetric-key individual enrollment; `extra` merged into the body.
std::string put_sk_enrollment(const std::string& id, const json& extra = json::object()) {
  const std::string key = crypto::generate_key();
  json body{{"registrationId", id},
            {"attestation",
             {{"type", "symmetricKey"},
              {"symmetricKey", {{"primaryKey", key}, {"secondaryKey", key}}}}}};
  body.update(extra);
  auto r = srv().service("PUT", "/enrollments/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  return key;
}

/// PUT register with `body` (and the SAS when `key` is set), then polls
/// until the outcome; returns the final operation JSON.
json register_with(net::https_client& c, const std::string& id, const json& body,
                   const std::string& key = {}) {
  const auto& s = srv();
  net::http_headers h;
  if (!key.empty())
    h.add("Authorization", s.device_auth(id, key));
  h.add("Content-Type", "application/json; charset=utf-8");
  const std::string base = "/" + s.id_scope() + "/registrations/" + id;
  net::https_response resp;
  auto err = c.request("PUT", base + "/register?api-version=" + api, h, body.dump(), resp);
  REQUIRE_MESSAGE(!err, err.message);
  REQUIRE_MESSAGE((resp.status == 200 || resp.status == 202), resp.body);
  json j = parse(resp.body);
  for (int i = 0; i < 300 && j.value("status", "") == "assigning"; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    net::http_headers ph;
    if (!key.empty())
      ph.add("Authorization", s.device_auth(id, key));
    err = c.request("GET", base + "/operations/" + j["operationId"].get<std::string>() +
                             "?api-version=" + api,
                    ph, {}, resp);
    REQUIRE_MESSAGE(!err, err.message);
    j = parse(resp.body);
  }
  return j;
}

std::vector<std::string> chain_of(const json& op) {
  INFO(op.dump());
  REQUIRE(op["status"] == "assigned");
  const auto& chain = op["registrationState"]["issuedCertificateChain"];
  REQUIRE(chain.is_array());
  return chain.get<std::vector<std::string>>();
}

std::shared_ptr<X509> leaf_of(const std::vector<std::string>& chain) {
  return test::parse_der_cert(*crypto::base64_decode(chain.at(0)));
}

/// `openssl verify` of the chain (leaf, intermediates as untrusted) against
/// `root`: the command's output ("...: OK" when it verifies).
std::string openssl_verify(const std::vector<std::string>& chain, const test_cert& root,
                           const std::string& stem) {
  auto pem_of = [](const std::string& b64) {
    auto cert = test::parse_der_cert(*crypto::base64_decode(b64));
    test_cert t;
    t.cert = cert;
    return t.pem();
  };
  const auto& dir = test::cert_dir();
  auto root_file = test::write_file(dir, stem + "-root.pem", root.pem());
  std::string untrusted;
  for (std::size_t i = 1; i + 1 < chain.size(); ++i)
    untrusted += pem_of(chain[i]);
  auto leaf_file = test::write_file(dir, stem + "-leaf.pem", pem_of(chain[0]));
  std::string cmd = "openssl verify -purpose sslclient -CAfile " + root_file;
  if (!untrusted.empty())
    cmd += " -untrusted " + test::write_file(dir, stem + "-untrusted.pem", untrusted);
  cmd += " " + leaf_file + " 2>&1";
  std::string out;
  if (std::FILE* f = ::popen(cmd.c_str(), "r")) {
    char buf[512];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0)
      out.append(buf, n);
    ::pclose(f);
  }
  return out;
}

bool outbox_mentions(const std::string& id) {
  for (const auto& e : test::all_assignments(srv()))
    if (e.dump().find("\"" + id + "\"") != std::string::npos)
      return true;
  return false;
}

} // namespace

TEST_CASE("a symmetric-key device's CSR gets a chain that verifies; lookups do not repeat it") {
  auto& s = srv();
  const std::string id = "csr-sk-1";
  auto key = put_sk_enrollment(
    id, {{"certificatePolicyResourceId",
          "/subscriptions/0/resourceGroups/rg/providers/Microsoft.DeviceRegistry/"
          "deviceRegistryNamespaces/ns/certificateAuthorities/fleet/certificatePolicies/p1"}});
  auto device_key = test::new_key("P-256");
  auto c = s.client();
  auto op = register_with(c, id, {{"registrationId", id},
                                  {"csr", test::make_csr(device_key.get(), id)}}, key);
  auto chain = chain_of(op);
  REQUIRE(chain.size() == 3);
  CHECK(*crypto::base64_decode(chain[1]) == pki().issuing.der());
  CHECK(*crypto::base64_decode(chain[2]) == pki().root.der());
  CHECK(test::verify_issued_chain(chain, pki().root) == "");
  CHECK(test::verify_issued_chain({chain[0], chain[1]}, pki().issuing) == "");
  auto verified = openssl_verify(chain, pki().root, "sk1");
  CHECK_MESSAGE(verified.find(": OK") != std::string::npos, verified);
  auto leaf = leaf_of(chain);
  CHECK(EVP_PKEY_eq(X509_get0_pubkey(leaf.get()), device_key.get()) == 1);
  CHECK(X509_check_ca(leaf.get()) == 0);
  CHECK((X509_get_extended_key_usage(leaf.get()) & XKU_SSL_CLIENT) != 0);
  int days = 0, secs = 0;
  REQUIRE(ASN1_TIME_diff(&days, &secs, X509_get0_notBefore(leaf.get()),
                         X509_get0_notAfter(leaf.get())) == 1);
  CHECK(days * 86400 + secs == 12 * 3600 + 300); // validity_hours = 12, 5 min back
  CHECK(op["registrationState"]["symmetricKey"].is_object());
  // One diagnostic log line names what was issued (written by a background
  // thread: wait for it, without a time limit that a loaded machine misses).
  const std::string issued_line = "certificate issued: registrationId=" + id +
                                  " operationId=" + op["operationId"].get<std::string>() +
                                  " ca=fleet serial=";
  for (int i = 0; i < 600 && s.log().find(issued_line) == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK_MESSAGE(s.log().find(issued_line) != std::string::npos, s.log());

  // The operation poll repeats it (it is the operation's result)...
  net::http_headers h;
  h.add("Authorization", s.device_auth(id, key));
  net::https_response resp;
  const std::string base = "/" + s.id_scope() + "/registrations/" + id;
  REQUIRE(!c.request("GET", base + "/operations/" + op["operationId"].get<std::string>() +
                              "?api-version=" + api,
                     h, {}, resp));
  CHECK(parse(resp.body)["registrationState"]["issuedCertificateChain"] ==
        op["registrationState"]["issuedCertificateChain"]);
  // ...the status lookup and the service API do not (as DPS: the chain is
  // returned by the register operation only).
  h = {};
  h.add("Authorization", s.device_auth(id, key));
  h.add("Content-Type", "application/json");
  REQUIRE(!c.request("POST", base + "?api-version=" + std::string(api), h,
                     json{{"registrationId", id}}.dump(), resp));
  REQUIRE_MESSAGE(resp.status == 200, resp.body);
  CHECK_FALSE(parse(resp.body).contains("issuedCertificateChain"));
  auto svc = s.service("GET", "/registrations/" + id);
  REQUIRE_MESSAGE(svc.status == 200, svc.body);
  CHECK(parse(svc.body)["status"] == "assigned");
  CHECK_FALSE(parse(svc.body).contains("issuedCertificateChain"));

  // A register without a csr issues nothing.
  op = register_with(c, id, {{"registrationId", id}}, key);
  CHECK(op["status"] == "assigned");
  CHECK_FALSE(op["registrationState"].contains("issuedCertificateChain"));
}

TEST_CASE("P-384 and RSA requests; the RSA CA through clientCertificateIssuancePolicy") {
  auto c = srv().client();
  const std::string id = "csr-p384";
  auto key = put_sk_enrollment(id, {{"certificatePolicyResourceId", "fleet"}});
  auto p384 = test::new_key("P-384");
  auto chain = chain_of(register_with(
    c, id, {{"registrationId", id}, {"csr", test::make_csr(p384.get(), id)}}, key));
  CHECK(test::verify_issued_chain(chain, pki().root) == "");
  CHECK(EVP_PKEY_eq(X509_get0_pubkey(leaf_of(chain).get()), p384.get()) == 1);

  const std::string rid = "csr-rsa";
  auto rkey = put_sk_enrollment(
    rid, {{"clientCertificateIssuancePolicy", {{"certificateAuthorityName", "rsa"}}}});
  auto rsa = test::new_key("RSA-2048");
  chain = chain_of(register_with(
    c, rid, {{"registrationId", rid}, {"csr", test::make_csr(rsa.get(), rid)}}, rkey));
  REQUIRE(chain.size() == 2); // leaf, the RSA root
  CHECK(test::verify_issued_chain(chain, pki().rsa_root) == "");
  auto verified = openssl_verify(chain, pki().rsa_root, "rsa");
  CHECK_MESSAGE(verified.find(": OK") != std::string::npos, verified);
  auto leaf = leaf_of(chain);
  CHECK(EVP_PKEY_eq(X509_get0_pubkey(leaf.get()), rsa.get()) == 1);
  int days = 0, secs = 0;
  REQUIRE(ASN1_TIME_diff(&days, &secs, X509_get0_notBefore(leaf.get()),
                         X509_get0_notAfter(leaf.get())) == 1);
  CHECK(days * 86400 + secs == 48 * 3600 + 300);
}

TEST_CASE("the issued certificate registers as an X.509 credential against a CA group, and rolls") {
  auto& s = srv();
  // Onboarding: a symmetric-key group whose devices get certificates.
  const std::string group_key = crypto::generate_key();
  json sk_group{{"enrollmentGroupId", "csr-onboarding"},
                {"attestation",
                 {{"type", "symmetricKey"},
                  {"symmetricKey", {{"primaryKey", group_key}, {"secondaryKey", group_key}}}}},
                {"clientCertificateIssuancePolicy", {{"certificateAuthorityName", "fleet"}}}};
  auto r = s.service("PUT", "/enrollmentGroups/csr-onboarding", sk_group.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  // Operation: an X.509 group trusting the issuing CA, which issues too (the roll).
  json x509_group{{"enrollmentGroupId", "csr-fleet"},
                  {"attestation",
                   {{"type", "x509"},
                    {"x509", {{"signingCertificates",
                               {{"primary", {{"certificate", pki().issuing.pem()}}}}}}}}},
                  {"certificatePolicyResourceId",
                   "/subscriptions/0/x/certificateAuthorities/fleet/certificatePolicies/roll"}};
  r = s.service("PUT", "/enrollmentGroups/csr-fleet", x509_group.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);

  const std::string id = "csr-roll-1";
  auto device_key = *crypto::derive_device_key(group_key, id);
  auto k1 = test::new_key("P-256");
  auto c = s.client();
  auto op = register_with(c, id, {{"registrationId", id}, {"csr", test::make_csr(k1.get(), id)}},
                          device_key);
  CHECK(op["registrationState"]["symmetricKey"]["enrollmentGroupId"] == "csr-onboarding");
  auto chain = chain_of(op);
  test_cert issued;
  issued.key = k1;
  issued.cert = leaf_of(chain);

  // The issued certificate as the TLS client certificate (with the issuing
  // CA): attested by the X.509 group; a new CSR (new key) rolls it.
  auto k2 = test::new_key("P-256");
  auto xc = test::device_client(s, issued, {&pki().issuing});
  op = register_with(xc, id, {{"registrationId", id}, {"csr", test::make_csr(k2.get(), id)}});
  INFO(op.dump());
  REQUIRE(op["status"] == "assigned");
  CHECK(op["registrationState"]["x509"]["enrollmentGroupId"] == "csr-fleet");
  auto rolled = chain_of(op);
  CHECK(test::verify_issued_chain(rolled, pki().root) == "");
  auto leaf2 = leaf_of(rolled);
  CHECK(EVP_PKEY_eq(X509_get0_pubkey(leaf2.get()), k2.get()) == 1);
  CHECK(ASN1_INTEGER_cmp(X509_get0_serialNumber(leaf2.get()),
                         X509_get0_serialNumber(issued.cert.get())) != 0);

  // And the rolled certificate works in turn, without a csr.
  test_cert second;
  second.key = k2;
  second.cert = leaf2;
  auto xc2 = test::device_client(s, second, {&pki().issuing});
  op = register_with(xc2, id, {{"registrationId", id}});
  CHECK(op["status"] == "assigned");
  CHECK(op["registrationState"]["x509"]["enrollmentGroupId"] == "csr-fleet");
}

TEST_CASE("refused CSRs: each its own message and errorCode; nothing issued, no assignment") {
  auto c = srv().client();
  auto key = test::new_key("P-256");
  struct refusal {
    std::string id;
    std::string csr;
    int code;
    std::string message;
    std::string policy = "fleet";
  };
  auto good_der = test::make_csr_der(key.get(), "csr-bad-sig");
  good_der[good_der.size() - 3] = static_cast<char>(good_der[good_der.size() - 3] ^ 0x55);
  auto p521 = test::new_key("P-521");
  const std::vector<refusal> cases = {
    {"csr-bad-b64", "%%%", 400011,
     "csr: not base64 (expected the base64 of a DER PKCS#10 certificate signing request)"},
    {"csr-bad-der", crypto::base64_encode("not a request"), 400011,
     "csr: not a DER PKCS#10 certificate signing request"},
    {"csr-bad-sig", crypto::base64_encode(good_der), 400011,
     "csr: its signature does not verify with its public key"},
    {"csr-bad-cn", test::make_csr(key.get(), "someone-else"), 400011,
     "csr: subject CN 'someone-else' is not the registration id 'csr-bad-cn'"},
    {"csr-bad-key", test::make_csr(p521.get(), "csr-bad-key"), 400011,
     "csr: unsupported key EC secp521r1 (ECDSA P-256 or P-384, or RSA of 2048..8192 bits)"},
    {"csr-no-policy", test::make_csr(key.get(), "csr-no-policy"), 400012,
     "the device sent a csr, but its enrollment has no certificate issuance policy "
     "(certificatePolicyResourceId or clientCertificateIssuancePolicy)",
     ""},
    {"csr-no-ca", test::make_csr(key.get(), "csr-no-ca"), 500002,
     "the enrollment's issuing CA 'nope' is not configured on this instance ([[issuing_cas]])",
     "nope"},
  };
  for (const auto& rc : cases) {
    INFO(rc.id);
    auto sk = put_sk_enrollment(rc.id, rc.policy.empty()
                                         ? json::object()
                                         : json{{"certificatePolicyResourceId", rc.policy}});
    auto op = register_with(c, rc.id, {{"registrationId", rc.id}, {"csr", rc.csr}}, sk);
    INFO(op.dump());
    CHECK(op["status"] == "failed");
    const auto& rs = op["registrationState"];
    CHECK(rs["errorCode"] == rc.code);
    CHECK(rs["errorMessage"] == rc.message);
    CHECK_FALSE(rs.contains("issuedCertificateChain"));
    CHECK_FALSE(rs.contains("assignedHub"));
    CHECK_FALSE(outbox_mentions(rc.id));
  }
  // The body's shape is checked at once: 400 on the register itself.
  const auto& s = srv();
  auto sk = put_sk_enrollment("csr-not-string", {{"certificatePolicyResourceId", "fleet"}});
  net::http_headers h;
  h.add("Authorization", s.device_auth("csr-not-string", sk));
  h.add("Content-Type", "application/json");
  net::https_response resp;
  REQUIRE(!c.request("PUT", "/" + s.id_scope() + "/registrations/csr-not-string/register"
                              "?api-version=" + std::string(api),
                     h, json{{"registrationId", "csr-not-string"}, {"csr", 42}}.dump(), resp));
  CHECK(resp.status == 400);
  CHECK(parse(resp.body)["errorCode"] == 400011);
  CHECK(parse(resp.body)["message"] == "csr must be a string (base64 DER PKCS#10)");
  CHECK(s.service("GET", "/registrations/csr-not-string").status == 404);

  // A registration id too long for a certificate's CN (64): 400 at once,
  // not a 500 from the signer after attestation.
  const std::string long_id(65, 'L');
  sk = put_sk_enrollment(long_id, {{"certificatePolicyResourceId", "fleet"}});
  net::http_headers lh;
  lh.add("Authorization", s.device_auth(long_id, sk));
  lh.add("Content-Type", "application/json");
  REQUIRE(!c.request("PUT", "/" + s.id_scope() + "/registrations/" + long_id + "/register"
                              "?api-version=" + std::string(api),
                     lh, json{{"registrationId", long_id},
                              {"csr", test::make_csr(key.get(), std::string(64, 'L'))}}.dump(),
                     resp));
  CHECK(resp.status == 400);
  CHECK(parse(resp.body)["errorCode"] == 400011);
  CHECK(parse(resp.body)["message"] ==
        "csr: the registration id is 65 characters; an issued certificate's subject CN (the "
        "registration id) is limited to 64 characters (RFC 5280 ub-common-name)");
  CHECK(s.service("GET", "/registrations/" + long_id).status == 404);
  CHECK_FALSE(outbox_mentions(long_id));
}

TEST_CASE("service API and CLI: the issuance policy in both shapes") {
  auto& s = srv();
  json body{{"registrationId", "csr-svc"},
            {"attestation", {{"type", "symmetricKey"}}},
            {"clientCertificateIssuancePolicy", {{"certificateAuthorityName", "fleet"}}}};
  auto r = s.service("PUT", "/enrollments/csr-svc", body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(parse(r.body)["clientCertificateIssuancePolicy"]["certificateAuthorityName"] == "fleet");
  r = s.service("GET", "/enrollments/csr-svc");
  CHECK(parse(r.body)["clientCertificateIssuancePolicy"]["certificateAuthorityName"] == "fleet");
  body["certificatePolicyResourceId"] = ".../certificateAuthorities/rsa/certificatePolicies/p";
  r = s.service("PUT", "/enrollments/csr-svc", body.dump());
  CHECK(r.status == 400);
  CHECK(parse(r.body)["errorCode"] == 400005);
  CHECK(parse(r.body)["message"] == "certificatePolicyResourceId: names CA 'rsa' but "
                                    "clientCertificateIssuancePolicy names 'fleet'");
  body.erase("clientCertificateIssuancePolicy");
  body["certificatePolicyResourceId"] = "/not/a/policy";
  r = s.service("PUT", "/enrollments/csr-svc", body.dump());
  CHECK(r.status == 400);
  CHECK(parse(r.body)["errorCode"] == 400005);

  const std::string conn = "--data-dir " + s.data_dir();
  int rc = -1;
  auto out = test::run_cli("enrollment create csr-cli --issuing-ca fleet " + conn, rc);
  CHECK_MESSAGE(rc == 0, out);
  out = test::run_cli("enrollment get csr-cli " + conn, rc);
  CHECK_MESSAGE(rc == 0, out);
  CHECK_MESSAGE(out.find("ISSUING CA") != std::string::npos, out);
  CHECK_MESSAGE(out.find("fleet") != std::string::npos, out);
  r = s.service("GET", "/enrollments/csr-cli");
  CHECK(parse(r.body)["certificatePolicyResourceId"] == "fleet");
}
