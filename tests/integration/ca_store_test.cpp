// The CA certificate store (/certificates, proof of possession) and groups
// that name a CA by caReferences, against the real provisiond process over
// real TLS, with certificates minted in the test.

#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <map>
#include <string>
#include <thread>

#include "actors/enrollment/x509_certificates.hpp"
#include "messages/crypto.hpp"
#include "tests/support/cli.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/kafka_it.hpp"
#include "tests/support/metrics_scrape.hpp"
#include "tests/support/server_process.hpp"
#include "tests/support/test_certs.hpp"
#include "tests/support/x509_client.hpp"

using namespace prov;
using nlohmann::json;
using test::test_cert;

namespace {

test::server_process& srv() { return test::shared_server(); }
json parse(const std::string& text) { return test::parse_json(text); }

using test::cert_dir;
using test::write_file;

/// A device client that opens a new connection for each request.
net::https_client fresh_client(const test::server_process& s, const test_cert& leaf,
                                std::initializer_list<const test_cert*> chain = {}) {
  return test::device_client(s, leaf, chain, /*reuse=*/false);
}

net::https_response put_register(net::https_client& c, const test::server_process& s,
                                 const std::string& id) {
  net::http_headers h;
  h.add("Content-Type", "application/json; charset=utf-8");
  net::https_response resp;
  auto err = c.request("PUT",
                       "/" + s.id_scope() + "/registrations/" + id
                         + "/register?api-version=2021-06-01",
                       h, json{{"registrationId", id}}.dump(), resp);
  REQUIRE_MESSAGE(!err, err.message);
  return resp;
}

/// PUT register, then (on 202) polls the operation until it is no longer
/// assigning: the outcome, whichever answer carried it (Kafka mode answers
/// 202 while the stages' consumer groups join).
json register_outcome(net::https_client& c, const test::server_process& s, const std::string& id) {
  auto r = put_register(c, s, id);
  REQUIRE_MESSAGE((r.status == 200 || r.status == 202), r.body);
  auto j = parse(r.body);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (j.value("status", "") == "assigning" && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    net::https_response resp;
    auto err = c.request("GET",
                         "/" + s.id_scope() + "/registrations/" + id + "/operations/"
                           + j.value("operationId", "") + "?api-version=2021-06-01",
                         {}, {}, resp);
    REQUIRE_MESSAGE(!err, err.message);
    REQUIRE_MESSAGE((resp.status == 200 || resp.status == 202), resp.body);
    j = parse(resp.body);
  }
  return j;
}

/// The error body of a refused call: status, errorCode, and a message part.
void check_error(const net::https_response& r, int status, int code, const std::string& text) {
  REQUIRE_MESSAGE(r.status == status, r.body);
  auto j = parse(r.body);
  CHECK(j["errorCode"] == code);
  CHECK_MESSAGE(j["message"].get<std::string>().find(text) != std::string::npos, r.body);
}

net::https_response upload(const test::server_process& s, const std::string& name,
                           const json& body) {
  return s.service("PUT", "/certificates/" + name, body.dump());
}

/// Upload, code, proof: the CA `name` ends verified.
void upload_and_verify(const test::server_process& s, const std::string& name,
                       const test_cert& ca) {
  auto r = upload(s, name, {{"certificate", ca.pem()}});
  REQUIRE_MESSAGE(r.status == 200, r.body);
  r = s.service("POST", "/certificates/" + name + "/generateVerificationCode");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto code = parse(r.body)["properties"]["verificationCode"].get<std::string>();
  auto proof = test::make_device(code, ca, 7000);
  r = s.service("POST", "/certificates/" + name + "/verify",
                json{{"certificate", proof.pem()}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  REQUIRE(parse(r.body)["properties"]["isVerified"] == true);
}

net::https_response put_ca_group(const test::server_process& s, const std::string& id,
                                 const std::string& ca_name) {
  json body{{"enrollmentGroupId", id},
            {"attestation",
             {{"type", "x509"}, {"x509", {{"caReferences", {{"primary", ca_name}}}}}}}};
  return s.service("PUT", "/enrollmentGroups/" + id, body.dump());
}

} // namespace

TEST_CASE("CA store: bad uploads are refused with the reason and store nothing") {
  auto& s = srv();
  auto root = test::make_ca("IT Store Bad Root", nullptr, 10);
  auto leaf = test::make_device("not-a-ca", root, 11);
  check_error(upload(s, "bad-1", {{"certificate", "-----BEGIN CERTIFICATE-----\nnope\n"
                                                  "-----END CERTIFICATE-----\n"}}),
              400, 400009, "not a PEM or base64 DER X.509 certificate");
  check_error(upload(s, "bad-1", {{"certificate", root.key_pem()}}), 400, 400009,
              "the text holds a private key");
  check_error(upload(s, "bad-1", {{"certificate", root.pem() + root.pem()}}), 400, 400009,
              "more than one certificate");
  check_error(upload(s, "bad-1", {{"certificate", leaf.pem()}}), 400, 400009,
              "is not a CA certificate");
  check_error(upload(s, "bad-1", json::object()), 400, 400009, "the body needs 'certificate'");
  check_error(upload(s, "bad-1", {{"certificate", root.pem()}, {"isVerified", true}}), 400,
              400000, "proof of possession");
  check_error(s.service("PUT", "/certificates/bad%2Fname", json{{"certificate", root.pem()}}.dump()),
              400, 400000, "a certificate name is");
  check_error(s.service("GET", "/certificates/bad-1"), 404, 404205,
              "CA 'bad-1' is not in the certificate store");
}

TEST_CASE("CA store: upload, get, list, verification code, proof of possession, delete") {
  auto& s = srv();
  auto root = test::make_ca("IT Store Root", nullptr, 20);
  auto other = test::make_ca("IT Store Other Root", nullptr, 21);

  auto r = upload(s, "store-root", {{"certificate", root.pem()}});
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto doc = parse(r.body);
  CHECK(doc["name"] == "store-root");
  CHECK(doc["type"] == "Microsoft.Devices/ProvisioningServices/Certificates");
  CHECK(doc["properties"]["isVerified"] == false);
  CHECK(doc["properties"]["subject"] == "CN=IT Store Root,O=provisiond tests");
  CHECK(doc["properties"]["thumbprint"] == enrollment::upper_hex(enrollment::sha1_of(root.der())));
  CHECK(doc["properties"]["certificate"].get<std::string>().find("-----BEGIN CERTIFICATE-----")
        == 0);
  for (const char* t : {"expiry", "created", "updated"})
    CHECK(doc["properties"][t].get<std::string>().find(" GMT") != std::string::npos);
  const std::string etag1 = doc["etag"];

  // The same CA under another name: refused, naming the first.
  check_error(upload(s, "store-root-again", {{"certificate", root.pem()}}), 409, 409000,
              "is already in the certificate store as 'store-root'");
  check_error(s.service("GET", "/certificates/store-root-again"), 404, 404205, "store-root-again");

  r = s.service("GET", "/certificates/store-root");
  REQUIRE(r.status == 200);
  CHECK(parse(r.body)["etag"] == etag1);
  r = s.service("GET", "/certificates");
  REQUIRE(r.status == 200);
  bool listed = false;
  const auto list = parse(r.body);
  for (const auto& c : list["value"])
    listed = listed || c["name"] == "store-root";
  CHECK_MESSAGE(listed, r.body);

  // No code yet.
  auto code_cert = test::make_device("0123", root, 22);
  check_error(s.service("POST", "/certificates/store-root/verify",
                        json{{"certificate", code_cert.pem()}}.dump()),
              400, 400009, "has no outstanding verification code");

  r = s.service("POST", "/certificates/store-root/generateVerificationCode");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  doc = parse(r.body);
  const std::string code = doc["properties"]["verificationCode"];
  CHECK(code.size() == 48);
  CHECK(doc["etag"] != etag1);

  // Wrong CN, signed by the CA.
  auto wrong_cn = test::make_device("not-the-code", root, 23);
  check_error(s.service("POST", "/certificates/store-root/verify",
                        json{{"certificate", wrong_cn.pem()}}.dump()),
              400, 400009, "subject CN is 'not-the-code', not CA 'store-root''s verification code");
  // Right CN, another CA's signature.
  auto forged = test::make_device(code, other, 24);
  check_error(s.service("POST", "/certificates/store-root/verify",
                        json{{"certificate", forged.pem()}}.dump()),
              400, 400009, "is not signed by CA 'store-root'");
  // Right CN, same subject as the CA's issuer but another key: still refused.
  auto twin = test::make_ca("IT Store Root", nullptr, 25);
  auto forged2 = test::make_device(code, twin, 26);
  check_error(s.service("POST", "/certificates/store-root/verify",
                        json{{"certificate", forged2.pem()}}.dump()),
              400, 400009, "is not signed by CA 'store-root'");
  r = s.service("GET", "/certificates/store-root");
  CHECK(parse(r.body)["properties"]["isVerified"] == false);

  // The proof.
  auto proof = test::make_device(code, root, 27);
  r = s.service("POST", "/certificates/store-root/verify",
                json{{"certificate", proof.pem()}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(parse(r.body)["properties"]["isVerified"] == true);
  r = s.service("GET", "/certificates/store-root");
  doc = parse(r.body);
  CHECK(doc["properties"]["isVerified"] == true);
  // The code is single-use.
  check_error(s.service("POST", "/certificates/store-root/verify",
                        json{{"certificate", proof.pem()}}.dump()),
              400, 400009, "has no outstanding verification code");

  // Delete: a stale etag is refused, the current one deletes.
  net::http_headers stale;
  stale.add("If-Match", etag1);
  check_error(s.service("DELETE", "/certificates/store-root", "", stale), 412, 412000,
              "etag mismatch");
  net::http_headers current;
  current.add("If-Match", doc["etag"].get<std::string>());
  r = s.service("DELETE", "/certificates/store-root", "", current);
  CHECK_MESSAGE(r.status == 204, r.body);
  check_error(s.service("GET", "/certificates/store-root"), 404, 404205, "store-root");
  check_error(s.service("DELETE", "/certificates/store-root"), 404, 404205, "store-root");
}

TEST_CASE("groups by caReferences: only verified CAs, the chain must reach the CA, a delete "
          "or replace stops admitting at once") {
  auto& s = srv();
  auto root = test::make_ca("IT Ref Root CA", nullptr, 50);
  auto inter = test::make_ca("IT Ref Intermediate CA", &root, 51);
  auto stranger = test::make_ca("IT Ref Stranger CA", nullptr, 52);

  check_error(put_ca_group(s, "ref-group", "ref-root"), 404, 404205,
              "attestation.x509.caReferences.primary: CA 'ref-root' is not in the certificate "
              "store");
  REQUIRE(upload(s, "ref-root", {{"certificate", root.pem()}}).status == 200);
  check_error(put_ca_group(s, "ref-group", "ref-root"), 400, 400005,
              "CA 'ref-root' is not verified");
  check_error(s.service("GET", "/enrollmentGroups/ref-group"), 404, 404203, "ref-group");
  // The same rule in bulk operations, per item.
  {
    json item{{"enrollmentGroupId", "ref-group"},
              {"attestation",
               {{"type", "x509"}, {"x509", {{"caReferences", {{"primary", "ref-root"}}}}}}}};
    auto b = s.service("POST", "/enrollmentGroups",
                       json{{"mode", "create"}, {"enrollmentGroups", json::array({item})}}.dump());
    REQUIRE_MESSAGE(b.status == 200, b.body);
    auto res = parse(b.body);
    CHECK(res["isSuccessful"] == false);
    REQUIRE(res["errors"].size() == 1);
    CHECK(res["errors"][0]["errorCode"] == 400005);
    CHECK(res["errors"][0]["errorStatus"].get<std::string>().find("is not verified")
          != std::string::npos);
    check_error(s.service("GET", "/enrollmentGroups/ref-group"), 404, 404203, "ref-group");
  }

  upload_and_verify(s, "ref-root", root);
  auto r = put_ca_group(s, "ref-group", "ref-root");
  REQUIRE_MESSAGE(r.status == 200, r.body);

  // A device whose chain (leaf + intermediate) reaches the verified CA.
  auto leaf = test::make_device("ref-dev-1", inter, 500);
  {
    auto c = fresh_client(s, leaf, {&inter});
    auto a = put_register(c, s, "ref-dev-1");
    REQUIRE_MESSAGE(a.status == 200, a.body);
    auto j = parse(a.body);
    CHECK(j["status"] == "assigned");
    CHECK(j["registrationState"]["x509"]["enrollmentGroupId"] == "ref-group");
  }
  // Without its intermediate, it does not reach the CA.
  {
    auto c = fresh_client(s, leaf);
    check_error(put_register(c, s, "ref-dev-1"), 401, 401002,
                "is issued by 'CN=IT Ref Intermediate CA");
  }
  // Another CA's device.
  {
    auto other = test::make_device("ref-dev-x", stranger, 501);
    auto c = fresh_client(s, other);
    check_error(put_register(c, s, "ref-dev-x"), 401, 401002,
                "is issued by 'CN=IT Ref Stranger CA");
  }
  // The admitted device again (its verdict is cached), then the CA goes.
  {
    auto c = fresh_client(s, leaf, {&inter});
    REQUIRE(put_register(c, s, "ref-dev-1").status == 200);
  }
  REQUIRE(s.service("DELETE", "/certificates/ref-root").status == 204);
  {
    auto c = fresh_client(s, leaf, {&inter});
    check_error(put_register(c, s, "ref-dev-1"), 401, 401002,
                "enrollment group 'ref-group' names CA 'ref-root' (caReferences), which is not "
                "in the certificate store");
  }
  // Uploaded again, it is unverified until proven again.
  REQUIRE(upload(s, "ref-root", {{"certificate", root.pem()}}).status == 200);
  {
    auto c = fresh_client(s, leaf, {&inter});
    check_error(put_register(c, s, "ref-dev-1"), 401, 401002,
                "the chain reaches CA 'ref-root' ('CN=IT Ref Root CA,O=provisiond tests') of "
                "enrollment group 'ref-group', but that CA is not verified");
  }
  upload_and_verify(s, "ref-root", root);
  {
    auto c = fresh_client(s, leaf, {&inter});
    auto a = put_register(c, s, "ref-dev-1");
    REQUIRE_MESSAGE(a.status == 200, a.body);
  }
  // Replaced by another certificate: unverified again, and the old chain no
  // longer reaches it.
  auto other_root = test::make_ca("IT Ref Replacement CA", nullptr, 53);
  REQUIRE(upload(s, "ref-root", {{"certificate", other_root.pem()}}).status == 200);
  {
    auto c = fresh_client(s, leaf, {&inter});
    check_error(put_register(c, s, "ref-dev-1"), 401, 401002,
                "is issued by 'CN=IT Ref Root CA");
  }
}

TEST_CASE("revocation: CRLs stored with a CA refuse a revoked leaf or intermediate, each "
          "with its own message") {
  auto& s = srv();
  auto root = test::make_ca("IT CRL Root CA", nullptr, 90);
  auto inter = test::make_ca("IT CRL Intermediate CA", &root, 91);
  auto inter2 = test::make_ca("IT CRL Second Intermediate CA", &root, 92);
  auto stranger = test::make_ca("IT CRL Stranger CA", nullptr, 93);
  upload_and_verify(s, "crl-root", root);
  REQUIRE(put_ca_group(s, "crl-group", "crl-root").status == 200);
  auto good = test::make_device("crl-good", inter, 900);
  auto bad = test::make_device("crl-bad", inter, 901);
  auto under2 = test::make_device("crl-under2", inter2, 902);
  auto crl_path = "/certificates/crl-root/crl";
  auto register_ok = [&](const test_cert& leaf, const test_cert& mid, const std::string& id) {
    auto c = fresh_client(s, leaf, {&mid});
    auto a = put_register(c, s, id);
    REQUIRE_MESSAGE(a.status == 200, a.body);
  };
  // Every device admitted before any CRL (bad's verdict is then cached).
  register_ok(good, inter, "crl-good");
  register_ok(bad, inter, "crl-bad");
  register_ok(under2, inter2, "crl-under2");

  // Bad uploads.
  check_error(s.service("PUT", crl_path, json{{"crl", "nope"}}.dump()), 400, 400009,
              "'crl' is not one PEM X509 CRL block");
  auto twin_root = test::make_ca("IT CRL Root CA", nullptr, 94);
  check_error(s.service("PUT", crl_path, json{{"crl", test::make_crl_pem(twin_root, {})}}.dump()),
              400, 400009, "is not signed by that CA's key");
  check_error(s.service("PUT", "/certificates/crl-nope/crl",
                        json{{"crl", test::make_crl_pem(root, {})}}.dump()),
              404, 404205, "crl-nope");
  // Already past its nextUpdate: it would refuse every device it covers.
  check_error(s.service("PUT", crl_path,
                        json{{"crl", test::make_crl_pem(root, {}, -7200, -3600)}}.dump()),
              400, 400009,
              "the CRL of 'CN=IT CRL Root CA,O=provisiond tests' is stale: its nextUpdate (");

  // The intermediate's CRL revokes one leaf.
  auto r = s.service("PUT", crl_path, json{{"crl", test::make_crl_pem(inter, {&bad})}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto crls = parse(r.body)["properties"]["crls"];
  REQUIRE(crls.size() == 1);
  CHECK(crls[0]["issuer"] == "CN=IT CRL Intermediate CA,O=provisiond tests");
  CHECK(crls[0]["revoked"] == 1);
  {
    auto c = fresh_client(s, bad, {&inter});
    check_error(put_register(c, s, "crl-bad"), 401, 401002,
                "the client certificate 'CN=crl-bad,O=provisiond tests' (serial 0385) is "
                "revoked: the CRL of 'CN=IT CRL Intermediate CA,O=provisiond tests' lists it");
  }
  register_ok(good, inter, "crl-good");
  // Revocation belongs to the certificate: a group holding the intermediate
  // inline (a nearer anchor, which would win) does not readmit it.
  {
    json body{{"enrollmentGroupId", "crl-inline"},
              {"attestation",
               {{"type", "x509"},
                {"x509", {{"signingCertificates", {{"primary", {{"certificate", inter.pem()}}}}}}}}}};
    REQUIRE(s.service("PUT", "/enrollmentGroups/crl-inline", body.dump()).status == 200);
    auto c = fresh_client(s, bad, {&inter});
    check_error(put_register(c, s, "crl-bad"), 401, 401002,
                "'CN=crl-bad,O=provisiond tests' (serial 0385) is revoked");
    c = fresh_client(s, good, {&inter});
    auto a = put_register(c, s, "crl-good");
    REQUIRE_MESSAGE(a.status == 200, a.body);
    CHECK(parse(a.body)["registrationState"]["x509"]["enrollmentGroupId"] == "crl-inline");
    REQUIRE(s.service("DELETE", "/enrollmentGroups/crl-inline").status == 204);
  }
  // A CRL naming the intermediate but signed by another key (it replaces the
  // real one: same issuer name, not checkable at upload) fails closed: every
  // device under that intermediate is refused, with the reason.
  auto fake_inter = test::make_ca("IT CRL Intermediate CA", &stranger, 95);
  r = s.service("PUT", crl_path, json{{"crl", test::make_crl_pem(fake_inter, {&good, &bad}, -50)}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  for (auto* d : {&good, &bad}) {
    auto c = fresh_client(s, *d, {&inter});
    check_error(put_register(c, s, d == &good ? "crl-good" : "crl-bad"), 401, 401002,
                "a CRL stored with CA 'crl-root' names 'CN=IT CRL Intermediate CA,O=provisiond "
                "tests' (the issuer of '");
  }
  // An older CRL of that issuer does not replace the stored one...
  check_error(s.service("PUT", crl_path, json{{"crl", test::make_crl_pem(inter, {}, -55)}}.dump()),
              400, 400009, "is not newer, so it does not replace it");
  // ...a newer one does: the real one again.
  r = s.service("PUT", crl_path, json{{"crl", test::make_crl_pem(inter, {}, -40)}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  register_ok(good, inter, "crl-good");
  register_ok(bad, inter, "crl-bad");

  // The root's CRL revokes the second intermediate: its devices are refused.
  r = s.service("PUT", crl_path, json{{"crl", test::make_crl_pem(root, {&inter2})}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(parse(r.body)["properties"]["crls"].size() == 2);
  {
    auto c = fresh_client(s, under2, {&inter2});
    check_error(put_register(c, s, "crl-under2"), 401, 401002,
                "the intermediate certificate 'CN=IT CRL Second Intermediate CA,O=provisiond "
                "tests' (serial 5C) is revoked");
  }
  register_ok(good, inter, "crl-good");
  // A new root CRL without it readmits.
  r = s.service("PUT", crl_path, json{{"crl", test::make_crl_pem(root, {}, -50)}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  register_ok(under2, inter2, "crl-under2");
}

TEST_CASE("CA store state survives a restart") {
  test::server_process s;
  REQUIRE(s.start().ok());
  auto root = test::make_ca("IT Durable Root CA", nullptr, 60);
  auto inter = test::make_ca("IT Durable Intermediate CA", &root, 61);
  upload_and_verify(s, "durable-root", root);
  REQUIRE(put_ca_group(s, "durable-group", "durable-root").status == 200);
  REQUIRE(s.stop() == 0);
  REQUIRE_MESSAGE(!s.restart(), s.log());
  auto r = s.service("GET", "/certificates/durable-root");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(parse(r.body)["properties"]["isVerified"] == true);
  auto leaf = test::make_device("durable-dev", inter, 600);
  auto c = fresh_client(s, leaf, {&inter});
  auto a = put_register(c, s, "durable-dev");
  REQUIRE_MESSAGE(a.status == 200, a.body);
  CHECK(parse(a.body)["registrationState"]["x509"]["enrollmentGroupId"] == "durable-group");
}

TEST_CASE("the CLI manages the CA store: certificate add, verification-code, verify, list, "
          "delete") {
  auto& s = srv();
  auto root = test::make_ca("IT CLI Store Root", nullptr, 70);
  const std::string common = " --data-dir " + s.data_dir();
  auto ca_file = write_file(cert_dir(), "cli-ca.pem", root.pem());
  int rc = -1;
  auto out = test::run_cli("certificate add cli-root --file " + ca_file + common, rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK(out.find("SUBJECT") != std::string::npos);
  CHECK(out.find("CN=IT CLI Store Root") != std::string::npos);
  // The VERIFIED row, not the label alone: a fresh upload is unverified.
  {
    auto row = out.find("\nVERIFIED ");
    REQUIRE_MESSAGE(row != std::string::npos, out);
    auto eol = out.find('\n', row + 1);
    const auto text = out.substr(row + 1, eol - row - 1);
    CHECK_MESSAGE(text.size() > 5, text);
    CHECK_MESSAGE(text.substr(text.size() - 5) == "false", text);
  }

  out = test::run_cli("certificate verification-code cli-root --json" + common, rc);
  REQUIRE_MESSAGE(rc == 0, out);
  const std::string code = parse(out)["properties"]["verificationCode"];
  auto proof = test::make_device(code, root, 71);
  auto proof_file = write_file(cert_dir(), "cli-proof.pem", proof.pem());
  auto wrong = test::make_device("wrong", root, 72);
  auto wrong_file = write_file(cert_dir(), "cli-wrong.pem", wrong.pem());
  out = test::run_cli("certificate verify cli-root --file " + wrong_file + common, rc);
  CHECK(rc != 0);
  CHECK_MESSAGE(out.find("error: 400009 the verification certificate's subject CN is 'wrong'")
                  != std::string::npos,
                out);
  out = test::run_cli("certificate verify cli-root --file " + proof_file + common, rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK(out.find("true") != std::string::npos);

  auto crl_file = write_file(cert_dir(), "cli-crl.pem", test::make_crl_pem(root, {&wrong}));
  out = test::run_cli("certificate crl cli-root --file " + crl_file + common, rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK_MESSAGE(out.find("CN=IT CLI Store Root,O=provisiond tests (1 revoked") != std::string::npos,
                out);

  out = test::run_cli("certificate list" + common, rc);
  REQUIRE_MESSAGE(rc == 0, out);
  CHECK(out.find("NAME") == 0);
  auto line = out.find("cli-root");
  REQUIRE(line != std::string::npos);
  auto eol = out.find('\n', line);
  CHECK(out.substr(line, eol - line).find("  yes  ") != std::string::npos);

  out = test::run_cli("certificate delete cli-root --if-match nope" + common, rc);
  CHECK(rc != 0);
  CHECK(out.find("412000") != std::string::npos);
  out = test::run_cli("certificate delete cli-root" + common, rc);
  REQUIRE_MESSAGE(rc == 0, out);
  out = test::run_cli("certificate get cli-root" + common, rc);
  CHECK(rc != 0);
  CHECK(out.find("404205") != std::string::npos);
}

TEST_CASE("Kafka mode: a CA written through one gateway reaches another, and its delete "
          "stops the first admitting") {
  test::kafka_fixture fx;
  auto with_scope = [](const std::string& cfg) { return "id_scope = \"0ne00CA5701\"\n" + cfg; };
  test::server_process a;
  REQUIRE_MESSAGE(!a.start(with_scope(fx.server_config()), fx.dir), a.log());
  auto root = test::make_ca("IT Kafka Root CA", nullptr, 80);
  auto inter = test::make_ca("IT Kafka Intermediate CA", &root, 81);
  upload_and_verify(a, "kafka-root", root);
  auto r = put_ca_group(a, "kafka-group", "kafka-root");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto leaf = test::make_device("kafka-ca-dev", inter, 800);
  {
    // Attested on the gateway: 200, or 202 while the mock's consumer
    // groups still join (the outcome follows); never 401.
    auto c = fresh_client(a, leaf, {&inter});
    auto res = put_register(c, a, "kafka-ca-dev");
    REQUIRE_MESSAGE((res.status == 200 || res.status == 202), res.body);
  }
  // On the shared compacted topic, under its own key prefix.
  bool on_topic = false;
  for (const auto& rec : test::read_topic(fx.cfg, "dps.enrollments", 1))
    on_topic = on_topic || rec.key == "certificate/kafka-root";
  CHECK(on_topic);

  // A second gateway with an empty data dir rebuilds the store from the topic.
  const auto dir_b = test::make_temp_dir("provisiond-ca-kafka-b");
  test::server_process b;
  b.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!b.start(with_scope(fx.server_config(dir_b)), dir_b), b.log());
  r = b.service("GET", "/certificates/kafka-root");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(parse(r.body)["properties"]["isVerified"] == true);
  {
    auto c = fresh_client(b, leaf, {&inter});
    auto res = register_outcome(c, b, "kafka-ca-dev");
    CHECK_MESSAGE(res.value("status", "") == "assigned", res.dump());
    CHECK(res["registrationState"]["x509"]["enrollmentGroupId"] == "kafka-group");
  }

  // Deleted through b: a (which admitted the device, and caches that) follows.
  REQUIRE(b.service("DELETE", "/certificates/kafka-root").status == 204);
  std::string last;
  bool refused = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!refused && std::chrono::steady_clock::now() < deadline) {
    auto c = fresh_client(a, leaf, {&inter});
    auto res = put_register(c, a, "kafka-ca-dev");
    last = res.body;
    refused = res.status == 401
              && res.body.find("names CA 'kafka-root' (caReferences), which is not in the "
                               "certificate store")
                   != std::string::npos;
    if (!refused)
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  CHECK_MESSAGE(refused, last);
  CHECK(b.stop() == 0);
  CHECK(a.stop() == 0);
}

TEST_CASE("Kafka mode: malformed certificate/ records on dps.enrollments are dead-lettered and "
          "the gateway keeps serving") {
  test::kafka_fixture fx;
  auto with_scope = [](const std::string& cfg) { return "id_scope = \"0ne00CA5702\"\n" + cfg; };
  test::server_process a;
  REQUIRE_MESSAGE(!a.start(with_scope(fx.server_config()), fx.dir), a.log());
  auto root = test::make_ca("IT Junk Root CA", nullptr, 90);
  auto inter = test::make_ca("IT Junk Intermediate CA", &root, 91);
  upload_and_verify(a, "junk-root", root);
  auto r = put_ca_group(a, "junk-group", "junk-root");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  // The stored document as replicated, made wrong-typed in ways the service
  // API never writes (each used to throw on the table reader thread).
  json stored;
  for (const auto& rec : test::read_topic(fx.cfg, "dps.enrollments", 1))
    if (rec.key == "certificate/junk-root")
      stored = parse(fx.open_enrollment_record(rec.key, rec.value));
  REQUIRE(stored.is_object());
  auto bad = [&](const char* field, json v) {
    auto d = stored;
    d[field] = std::move(v);
    return d.dump();
  };
  auto dotted = stored;
  dotted["name"] = "..";
  const std::vector<std::pair<std::string, std::string>> junk = {
    {"certificate/junk-root", bad("isVerified", "yes")},
    {"certificate/junk-root", bad("created", "x")},
    {"certificate/junk-root", bad("crls", json::array({1, 2}))},
    {"certificate/junk-root", bad("certificate", "bm90IGRlcg==")},
    {"certificate/..", dotted.dump()}};
  test::produce_raw(fx.cfg, "dps.enrollments", junk);
  // Read-your-writes after the junk: the enrollments reader got past it.
  r = put_ca_group(a, "junk-group-2", "junk-root");
  REQUIRE_MESSAGE(r.status == 200, r.body);

  std::size_t dead_certs = 0;
  for (const auto& rec : test::read_topic(fx.cfg, "dps.dead-letter", junk.size()))
    dead_certs += rec.key.rfind("certificate/", 0) == 0 ? 1 : 0;
  CHECK(dead_certs == junk.size());
  // The stored entry is the good one; the store lists; the group admits.
  r = a.service("GET", "/certificates/junk-root");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(parse(r.body)["properties"]["isVerified"] == true);
  r = a.service("GET", "/certificates");
  CHECK_MESSAGE(r.status == 200, r.body);
  auto leaf = test::make_device("junk-ca-dev", inter, 900);
  auto c = fresh_client(a, leaf, {&inter});
  auto res = register_outcome(c, a, "junk-ca-dev");
  CHECK_MESSAGE(res.value("status", "") == "assigned", res.dump());
  CHECK(res["registrationState"]["x509"]["enrollmentGroupId"] == "junk-group");
  // A new gateway replays the whole topic (junk included) and serves: the
  // restart that used to crash again on the same record.
  const auto dir_b = test::make_temp_dir("provisiond-ca-junk-b");
  test::server_process b;
  b.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!b.start(with_scope(fx.server_config(dir_b)), dir_b), b.log());
  r = b.service("GET", "/certificates/junk-root");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(parse(r.body)["properties"]["isVerified"] == true);
  CHECK(b.service("GET", "/certificates/..").status != 200);
  CHECK(b.stop() == 0);
  CHECK(a.stop() == 0);
}

TEST_CASE("Kafka mode: a stale certificate/ record after a delete does not bring the CA back") {
  // A slower gateway that had not applied the delete yet writes the CA it
  // still holds (a new verification code, a CRL), or an old copy arrives
  // late: on the compacted topic that record follows the delete. Every
  // instance must skip it, and so must one that rebuilds from the topic.
  test::kafka_fixture fx;
  auto with_scope = [](const std::string& cfg) { return "id_scope = \"0ne00CA5703\"\n" + cfg; };
  test::server_process a;
  REQUIRE_MESSAGE(!a.start(test::with_metrics(with_scope(fx.server_config())), fx.dir), a.log());
  auto root = test::make_ca("IT Stale Root CA", nullptr, 95);
  upload_and_verify(a, "stale-root", root);
  // The verified document as replicated: the last record of its key.
  json stored;
  for (const auto& rec : test::read_topic(fx.cfg, "dps.enrollments", 1))
    if (rec.key == "certificate/stale-root")
      stored = parse(fx.open_enrollment_record(rec.key, rec.value));
  REQUIRE(stored.is_object());
  REQUIRE(stored["isVerified"] == true);

  REQUIRE(a.service("DELETE", "/certificates/stale-root").status == 204);
  REQUIRE(a.service("GET", "/certificates/stale-root").status == 404);
  // What the slower gateway computes from the old state (the next revision,
  // as ca_store.hpp has every write do), and the old document itself.
  auto from_old = stored;
  from_old["verificationCode"] = "0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF";
  from_old["revision"] = stored.value("revision", 0) + 1;
  from_old["etag"] = "\"stale\"";
  test::produce_raw(fx.cfg, "dps.enrollments",
                    {{"certificate/stale-root", from_old.dump()},
                     {"certificate/stale-root", stored.dump()}});
  // Uploading the same certificate again through the API: its write follows
  // both records on the key's partition, and returns once applied. The CA
  // must start unverified (a new owner proves possession again); had a stale
  // record brought the verified one back, the re-upload would keep that
  // proof.
  auto r = upload(a, "stale-root", {{"certificate", root.pem()}});
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(parse(r.body)["properties"]["isVerified"] == false);
  r = a.service("GET", "/certificates/stale-root");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(parse(r.body)["properties"]["isVerified"] == false);
  auto m = test::scrape(test::metrics_addr(a));
  CHECK(test::sum(m, "dps_kafka_stale_certificate_records_total") == 2);

  // A gateway rebuilding from the topic applies the same records the same way.
  const auto dir_b = test::make_temp_dir("provisiond-ca-stale-b");
  test::server_process b;
  b.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!b.start(with_scope(fx.server_config(dir_b)), dir_b), b.log());
  r = b.service("GET", "/certificates/stale-root");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(parse(r.body)["properties"]["isVerified"] == false);
  CHECK(b.service("DELETE", "/certificates/stale-root").status == 204);
  // B's delete reaches A over the topic, not at once: wait for it (bounded).
  int a_status = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while ((a_status = a.service("GET", "/certificates/stale-root").status) != 404
         && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(a_status == 404);
  CHECK(b.stop() == 0);
  CHECK(a.stop() == 0);
}

TEST_CASE("revocation: a CRL past its nextUpdate refuses the devices it covers until replaced") {
  auto& s = srv();
  auto root = test::make_ca("IT Stale CRL Root CA", nullptr, 96);
  auto inter = test::make_ca("IT Stale CRL Intermediate CA", &root, 97);
  upload_and_verify(s, "stale-crl-root", root);
  REQUIRE(put_ca_group(s, "stale-crl-group", "stale-crl-root").status == 200);
  auto leaf = test::make_device("stale-crl-dev", inter, 950);
  // The root's CRL, current for 3 more seconds; it lists nothing.
  auto r = s.service("PUT", "/certificates/stale-crl-root/crl",
                     json{{"crl", test::make_crl_pem(root, {}, -60, 3)}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  {
    auto c = device_client(s, leaf, {&inter});
    auto a = put_register(c, s, "stale-crl-dev");
    REQUIRE_MESSAGE(a.status == 200, a.body); // admitted, and the verdict cached
  }
  // Past nextUpdate (whole seconds, so 4.5 s is safely after): refused,
  // cached admission or not, with what to do about it.
  std::this_thread::sleep_for(std::chrono::milliseconds(4500));
  {
    auto c = device_client(s, leaf, {&inter});
    check_error(put_register(c, s, "stale-crl-dev"), 401, 401002,
                "the CRL of 'CN=IT Stale CRL Root CA,O=provisiond tests' stored with CA "
                "'stale-crl-root' is stale: its nextUpdate (");
  }
  // A current CRL (a later lastUpdate) readmits the device.
  r = s.service("PUT", "/certificates/stale-crl-root/crl",
                json{{"crl", test::make_crl_pem(root, {}, -1)}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto c = device_client(s, leaf, {&inter});
  auto a = put_register(c, s, "stale-crl-dev");
  CHECK_MESSAGE(a.status == 200, a.body);
}

TEST_CASE("revocation for a group with inline signingCertificates: through a CA some group "
          "names by caReferences, never through an unreferenced store CA") {
  // docs/device-api.md, "Groups with inline signingCertificates".
  auto& s = srv();
  auto root = test::make_ca("IT Inline CRL Root CA", nullptr, 120);
  auto dev = test::make_device("inline-crl-dev", root, 1200);
  json body{{"enrollmentGroupId", "inline-crl-group"},
            {"attestation",
             {{"type", "x509"},
              {"x509", {{"signingCertificates", {{"primary", {{"certificate", root.pem()}}}}}}}}}};
  REQUIRE(s.service("PUT", "/enrollmentGroups/inline-crl-group", body.dump()).status == 200);
  auto admitted = [&] {
    auto c = fresh_client(s, dev);
    auto a = put_register(c, s, "inline-crl-dev");
    REQUIRE_MESSAGE(a.status == 200, a.body);
    CHECK(parse(a.body)["registrationState"]["x509"]["enrollmentGroupId"] == "inline-crl-group");
  };
  admitted();
  // The same CA in the store with a CRL revoking the device, named by no
  // group: not consulted.
  upload_and_verify(s, "inline-crl-root", root);
  auto r = s.service("PUT", "/certificates/inline-crl-root/crl",
                     json{{"crl", test::make_crl_pem(root, {&dev})}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  admitted();
  // Once a group names it, its CRL revokes the device for every group,
  // the inline one included.
  REQUIRE(put_ca_group(s, "inline-crl-ref", "inline-crl-root").status == 200);
  {
    auto c = fresh_client(s, dev);
    check_error(put_register(c, s, "inline-crl-dev"), 401, 401002,
                "the client certificate 'CN=inline-crl-dev,O=provisiond tests' (serial 04B0) is "
                "revoked: the CRL of 'CN=IT Inline CRL Root CA,O=provisiond tests' lists it");
  }
  REQUIRE(s.service("DELETE", "/enrollmentGroups/inline-crl-ref").status == 204);
  admitted();
  REQUIRE(s.service("DELETE", "/enrollmentGroups/inline-crl-group").status == 204);
}

TEST_CASE("Kafka split roles: an X.509 group device attested at the gateway is assigned by a "
          "worker; device.assigned carries its thumbprints; a stranger's refusal names its issuer") {
  // The gateway (no attestation role) still attests HTTPS registrations
  // itself, where the TLS session is (docs/kafka.md, roles): the verdict's
  // X.509 facts must travel on registration.attested to the worker's
  // allocation and configuration, which build device.assigned.
  test::kafka_fixture fx;
  auto with_scope = [](const std::string& cfg) { return "id_scope = \"0ne00CA5703\"\n" + cfg; };
  test::server_process gw;
  REQUIRE_MESSAGE(!gw.start(with_scope(fx.server_config()), fx.dir,
                            {"--roles", "gateway,registration"}),
                  gw.log());
  const auto worker_dir = test::make_temp_dir("provisiond-x509-worker");
  test::server_process worker;
  worker.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!worker.start(with_scope(fx.server_config(worker_dir)), worker_dir,
                                {"--roles", "attestation,allocation,configuration"}),
                  worker.log());

  auto root = test::make_ca("IT Split Root CA", nullptr, 95);
  auto inter = test::make_ca("IT Split Intermediate CA", &root, 96);
  upload_and_verify(gw, "split-root", root);
  auto r = put_ca_group(gw, "split-group", "split-root");
  REQUIRE_MESSAGE(r.status == 200, r.body);

  auto leaf = test::make_device("split-x509-dev", inter, 950);
  json outcome;
  {
    auto c = fresh_client(gw, leaf, {&inter});
    outcome = register_outcome(c, gw, "split-x509-dev");
  }
  REQUIRE_MESSAGE(outcome.value("status", "") == "assigned", outcome.dump());
  CHECK(outcome["registrationState"]["x509"]["enrollmentGroupId"] == "split-group");
  CHECK(outcome["registrationState"]["x509"]["certificateInfo"]["subjectName"]
        == "CN=split-x509-dev,O=provisiond tests");
  const auto op = outcome.value("operationId", "");

  // The event on the topic, as a hub reads it.
  json data;
  for (const auto& rec : test::read_topic(fx.cfg, "dps.device.assigned", 1))
    if (rec.operation_id == op)
      data = parse(rec.value)["data"];
  REQUIRE_MESSAGE(data.is_object(), "no dps.device.assigned record for operation " << op);
  CHECK(data["enrollmentGroupId"] == "split-group");
  CHECK(data["attestationType"] == "x509");
  const auto& x = data["x509"];
  INFO(x.dump());
  CHECK(x["authenticationType"] == "certificateAuthority");
  auto thumb = [](const test_cert& c, const EVP_MD* md) {
    unsigned char buf[EVP_MAX_MD_SIZE];
    unsigned n = 0;
    REQUIRE(X509_digest(c.cert.get(), md, buf, &n) == 1);
    std::string out;
    static const char* digits = "0123456789ABCDEF";
    for (unsigned i = 0; i < n; ++i)
      out += {digits[buf[i] >> 4], digits[buf[i] & 15]};
    return out;
  };
  CHECK(x["sha1Thumbprint"] == thumb(leaf, EVP_sha1()));
  CHECK(x["sha256Thumbprint"] == thumb(leaf, EVP_sha256()));
  CHECK(x["signingCertificate"]["sha256Thumbprint"] == thumb(root, EVP_sha256()));

  // Refused with the reason the embedded engine gives (401 on the PUT, or a
  // failed operation when the answer comes late).
  auto stranger_root = test::make_ca("IT Split Stranger CA", nullptr, 97);
  auto stranger = test::make_device("split-x509-stranger", stranger_root, 970);
  auto c = fresh_client(gw, stranger);
  auto first = put_register(c, gw, "split-x509-stranger");
  std::string text = first.body;
  if (first.status != 401) {
    REQUIRE_MESSAGE(first.status == 202, first.body);
    auto j = parse(first.body);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (j.value("status", "") == "assigning" && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      net::https_response resp;
      auto err = c.request("GET",
                           "/" + gw.id_scope() + "/registrations/split-x509-stranger/operations/"
                             + j.value("operationId", "") + "?api-version=2021-06-01",
                           {}, {}, resp);
      REQUIRE_MESSAGE(!err, err.message);
      text = resp.body;
      if (resp.status == 401)
        break;
      j = parse(resp.body);
    }
  }
  INFO(text);
  CHECK(text.find("401002") != std::string::npos);
  CHECK(text.find("is issued by 'CN=IT Split Stranger CA") != std::string::npos);
  CHECK(worker.stop() == 0);
  CHECK(gw.stop() == 0);
}

TEST_CASE("Kafka split roles: a worker attests an X.509 device that publishes its request "
          "directly, with a signature by its key") {
  test::kafka_fixture fx;
  auto with_scope = [](const std::string& cfg) { return "id_scope = \"0ne00CA5704\"\n" + cfg; };
  test::server_process gw;
  REQUIRE_MESSAGE(!gw.start(with_scope(fx.server_config()), fx.dir,
                            {"--roles", "gateway,registration"}),
                  gw.log());
  const auto worker_dir = test::make_temp_dir("provisiond-x509-direct-worker");
  test::server_process worker;
  worker.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!worker.start(with_scope(fx.server_config(worker_dir)), worker_dir,
                                {"--roles", "attestation,allocation,configuration"}),
                  worker.log());
  auto root = test::make_ca("IT Direct Root CA", nullptr, 98);
  auto inter = test::make_ca("IT Direct Intermediate CA", &root, 99);
  upload_and_verify(gw, "direct-root", root);
  auto r = put_ca_group(gw, "direct-group", "direct-root");
  REQUIRE_MESSAGE(r.status == 200, r.body);

  const auto expiry = static_cast<int64_t>(std::time(nullptr)) + 3600;
  auto request = [&](const std::string& id, const std::string& op, const test_cert& leaf,
                     const test_cert& signer, bool with_signature = true) {
    json x{{"certificates", {crypto::base64_encode(leaf.der()), crypto::base64_encode(inter.der())}},
           {"expiry", expiry}};
    if (with_signature)
      x["signature"] =
        crypto::base64_encode(test::sign_possession(signer, gw.id_scope(), id, expiry));
    return std::pair<std::string, std::string>{
      id, json{{"registrationId", id}, {"idScope", gw.id_scope()}, {"operationId", op},
               {"x509", x}}
            .dump()};
  };
  auto good = test::make_device("direct-x509-dev", inter, 980);
  auto other = test::make_device("direct-x509-other", inter, 981);
  test::produce_raw(fx.cfg, "dps.registration.requested",
                    {request("direct-x509-dev", "dx-op-1", good, good),
                     // Has the certificate, not its key.
                     request("direct-x509-other", "dx-op-2", other, good),
                     // No proof at all: not a request (dead-lettered).
                     request("direct-x509-nosig", "dx-op-3", other, other, false)});

  std::map<std::string, json> completed;
  for (const auto& rec : test::read_topic(fx.cfg, "dps.registration.completed", 2,
                                          std::chrono::seconds(1), std::chrono::seconds(60)))
    completed[rec.operation_id] = parse(rec.value);
  INFO(json(completed).dump());
  REQUIRE(completed.count("dx-op-1") == 1);
  CHECK(completed["dx-op-1"]["status"] == "assigned");
  CHECK(completed["dx-op-1"]["enrollmentGroupId"] == "direct-group");
  REQUIRE(completed.count("dx-op-2") == 1);
  CHECK(completed["dx-op-2"]["status"] == "failed");
  CHECK(completed["dx-op-2"]["errorCode"] == 401002);
  CHECK(completed["dx-op-2"]["errorMessage"].get<std::string>().find(
          "x509.signature is not a signature by the client certificate's key")
        == 0);
  CHECK(completed.count("dx-op-3") == 0);

  json data;
  for (const auto& rec : test::read_topic(fx.cfg, "dps.device.assigned", 1))
    if (rec.operation_id == "dx-op-1")
      data = parse(rec.value)["data"];
  REQUIRE(data.is_object());
  CHECK(data["attestationType"] == "x509");
  CHECK(data["x509"]["subjectName"] == "CN=direct-x509-dev,O=provisiond tests");

  bool dead = false;
  for (const auto& rec : test::read_topic(fx.cfg, "dps.dead-letter", 1))
    dead = dead || rec.key == "direct-x509-nosig";
  CHECK(dead);
  CHECK(worker.stop() == 0);
  CHECK(gw.stop() == 0);
}
