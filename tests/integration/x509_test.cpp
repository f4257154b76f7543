// X.509 attestation against the real provisiond process: a TLS client
// presents a client certificate chain (leaf first) and no Authorization
// header, as DPS X.509 devices do.

#include <doctest/doctest.h>

#include <cstdio>
#include <ctime>
#include <memory>
#include <string>


#include <openssl/ssl.h>

#include "actors/enrollment/x509_certificates.hpp"
#include "messages/crypto.hpp"
#include "tests/support/cli.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/raw_tls.hpp"
#include "tests/support/server_process.hpp"
#include "tests/support/test_certs.hpp"
#include "tests/support/x509_client.hpp"

using namespace prov;
using nlohmann::json;
using test::test_cert;

namespace {

test::server_process& srv() { return test::shared_server(); }
json parse(const std::string& text) { return test::parse_json(text); }

struct pki {
  test_cert root = test::make_ca("IT Root CA", nullptr, 1);
  test_cert inter = test::make_ca("IT Intermediate CA", &root, 2);
  test_cert root2 = test::make_ca("IT Second Root CA", nullptr, 3);
  test_cert inter2 = test::make_ca("IT Second Intermediate CA", &root2, 4);
};

const pki& certs() {
  static const pki p;
  return p;
}

using test::cert_dir;
using test::device_client;
using test::write_file;

std::string device_path(const test::server_process& s, const std::string& id) {
  return "/" + s.id_scope() + "/registrations/" + id;
}

net::https_response put_register(net::https_client& c, const test::server_process& s,
                                 const std::string& id, const std::string& auth = {}) {
  net::http_headers h;
  if (!auth.empty())
    h.add("Authorization", auth);
  h.add("Content-Type", "application/json; charset=utf-8");
  net::https_response resp;
  auto err = c.request("PUT", device_path(s, id) + "/register?api-version=2021-06-01", h,
                       json{{"registrationId", id}}.dump(), resp);
  REQUIRE_MESSAGE(!err, err.message);
  return resp;
}

void put_enrollment(const test::server_process& s, const std::string& id, const json& x509) {
  json body{{"registrationId", id}, {"attestation", {{"type", "x509"}, {"x509", x509}}}};
  auto r = s.service("PUT", "/enrollments/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

void put_group(const test::server_process& s, const std::string& id, const test_cert& signer,
               const std::string& status = "enabled") {
  json body{{"enrollmentGroupId", id},
            {"provisioningStatus", status},
            {"attestation",
             {{"type", "x509"},
              {"x509", {{"signingCertificates", {{"primary", {{"certificate", signer.pem()}}}}}}}}}};
  auto r = s.service("PUT", "/enrollmentGroups/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

/// The register answer of an assigned X.509 device: 200, with the x509
/// attestation result.
json check_assigned(const net::https_response& r, const std::string& id,
                    const std::string& group = {}) {
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto j = parse(r.body);
  CHECK(j["status"] == "assigned");
  const auto& rs = j["registrationState"];
  CHECK(rs["registrationId"] == id);
  CHECK(rs["deviceId"] == id);
  CHECK(rs["assignedHub"].is_string());
  REQUIRE(rs.contains("x509"));
  CHECK_FALSE(rs.contains("symmetricKey"));
  if (group.empty())
    CHECK_FALSE(rs["x509"].contains("enrollmentGroupId"));
  else
    CHECK(rs["x509"]["enrollmentGroupId"] == group);
  return j;
}

/// An X509CertificateInfo as DPS returns it for `c`, checked against
/// OpenSSL's own digests of the certificate (not our thumbprint code).
void check_info(const json& info, const test_cert& c, const std::string& subject,
                const std::string& issuer, const std::string& serial_hex) {
  INFO(info.dump());
  REQUIRE(info.is_object());
  auto digest = [&](const EVP_MD* md) {
    unsigned char buf[EVP_MAX_MD_SIZE];
    unsigned n = 0;
    REQUIRE(X509_digest(c.cert.get(), md, buf, &n) == 1);
    std::string out;
    static const char* digits = "0123456789ABCDEF";
    for (unsigned i = 0; i < n; ++i)
      out += {digits[buf[i] >> 4], digits[buf[i] & 15]};
    return out;
  };
  CHECK(info["subjectName"] == subject);
  CHECK(info["issuerName"] == issuer);
  CHECK(info["sha1Thumbprint"] == digest(EVP_sha1()));
  CHECK(info["sha256Thumbprint"] == digest(EVP_sha256()));
  CHECK(info["serialNumber"] == serial_hex);
  CHECK(info["version"] == 3);
  // ISO 8601 UTC, and the certificate's own notBefore/notAfter.
  for (const char* k : {"notBeforeUtc", "notAfterUtc"}) {
    REQUIRE(info[k].is_string());
    CHECK(info[k].get<std::string>().size() == 20);
    CHECK(info[k].get<std::string>().back() == 'Z');
  }
  int day = 0, sec = 0;
  std::tm tm{};
  const std::string na = info["notAfterUtc"];
  REQUIRE(strptime(na.c_str(), "%Y-%m-%dT%H:%M:%SZ", &tm) != nullptr);
  std::unique_ptr<ASN1_TIME, decltype(&ASN1_TIME_free)> t(ASN1_TIME_set(nullptr, timegm(&tm)),
                                                          ASN1_TIME_free);
  REQUIRE(ASN1_TIME_diff(&day, &sec, t.get(), X509_get0_notAfter(c.cert.get())) == 1);
  CHECK(day == 0);
  CHECK(sec == 0);
}

/// One TLS connection with raw OpenSSL presenting `leaf` + `chain`, a
/// register of `id`, and the session it ends with; `resume`: offer that
/// session. Returns whether the server resumed it; `body` is the answer.
bool tls_register(const test::server_process& s, int version, const test_cert& leaf,
                  const test_cert* chain, const std::string& id, SSL_SESSION* resume,
                  SSL_SESSION** out, std::string& body) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_min_proto_version(ctx, version);
  SSL_CTX_set_max_proto_version(ctx, version);
  REQUIRE(SSL_CTX_use_certificate(ctx, leaf.cert.get()) == 1);
  REQUIRE(SSL_CTX_use_PrivateKey(ctx, leaf.key.get()) == 1);
  if (chain != nullptr)
    REQUIRE(SSL_CTX_add1_chain_cert(ctx, chain->cert.get()) == 1);
  const std::string json_body = json{{"registrationId", id}}.dump();
  const std::string req = "PUT " + device_path(s, id) + "/register?api-version=2021-06-01 "
                          "HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                          "Content-Type: application/json\r\nContent-Length: "
                          + std::to_string(json_body.size()) + "\r\n\r\n" + json_body;
  std::string got;
  const bool reused = test::raw_tls_request(ctx, s.port(), req, resume, out, got);
  SSL_CTX_free(ctx);
  CHECK_MESSAGE(got.find(" 200 ") != std::string::npos, got);
  auto at = got.find("\r\n\r\n");
  body = at == std::string::npos ? std::string() : got.substr(at + 4);
  return reused;
}

void check_refused(const net::https_response& r, const std::string& text) {
  REQUIRE_MESSAGE(r.status == 401, r.body);
  auto j = parse(r.body);
  CHECK(j["errorCode"] == 401002);
  CHECK_MESSAGE(j["message"].get<std::string>().find(text) != std::string::npos, r.body);
}

} // namespace

TEST_CASE("x509 individual enrollment by certificate: register, poll and status lookup") {
  auto& s = srv();
  auto leaf = test::make_self_signed_device("x509-ind-cert");
  put_enrollment(s, "x509-ind-cert", {{"clientCertificates", {{"primary", {{"certificate", leaf.pem()}}}}}});

  // The service API shows the info it read from the certificate.
  auto g = s.service("GET", "/enrollments/x509-ind-cert");
  REQUIRE(g.status == 200);
  auto info = parse(g.body)["attestation"]["x509"]["clientCertificates"]["primary"]["info"];
  CHECK(info["subjectName"] == "CN=x509-ind-cert,O=provisiond tests");
  CHECK(info["sha256Thumbprint"] == enrollment::upper_hex(enrollment::sha256_of(leaf.der())));

  auto c = device_client(s, leaf);
  auto r = put_register(c, s, "x509-ind-cert");
  auto j = check_assigned(r, "x509-ind-cert");
  // As DPS: the device's certificate; no signing CA for an individual enrollment.
  const auto& x = j["registrationState"]["x509"];
  check_info(x["certificateInfo"], leaf, "CN=x509-ind-cert,O=provisiond tests",
             "CN=x509-ind-cert,O=provisiond tests", "01");
  CHECK_FALSE(x.contains("signingCertificateInfo"));

  // Polls and status lookups authenticate with the same certificate.
  net::https_response p;
  REQUIRE(!c.request("GET", device_path(s, "x509-ind-cert") + "/operations/"
                              + j["operationId"].get<std::string>() + "?api-version=2021-06-01",
                     p));
  CHECK_MESSAGE(p.status == 200, p.body);
  net::http_headers h;
  h.add("Content-Type", "application/json");
  REQUIRE(!c.request("POST", device_path(s, "x509-ind-cert") + "?api-version=2021-06-01", h,
                     json{{"registrationId", "x509-ind-cert"}}.dump(), p));
  CHECK_MESSAGE(p.status == 200, p.body);
  CHECK(parse(p.body)["status"] == "assigned");
  // The status lookup answers the same x509 result as the register.
  CHECK(parse(p.body)["x509"] == x);

  // The service API's record and the assignment event name the attestation.
  auto rec = s.service("GET", "/registrations/x509-ind-cert");
  REQUIRE_MESSAGE(rec.status == 200, rec.body);
  CHECK(parse(rec.body)["x509"] == x);
  bool seen = false;
  for (const auto& e : test::all_assignments(s))
    if (e["data"]["registrationId"] == "x509-ind-cert") {
      CHECK(e["data"]["attestationType"] == "x509");
      seen = true;
    }
  CHECK(seen);

  SUBCASE("a new connection (full handshake) each time works too") {
    auto fresh = device_client(s, leaf, {}, false);
    check_assigned(put_register(fresh, s, "x509-ind-cert"), "x509-ind-cert");
    check_assigned(put_register(fresh, s, "x509-ind-cert"), "x509-ind-cert");
  }
  SUBCASE("another certificate with the same CN is refused") {
    auto impostor = test::make_self_signed_device("x509-ind-cert");
    auto ci = device_client(s, impostor);
    check_refused(put_register(ci, s, "x509-ind-cert"),
                  "is neither the primary nor the secondary certificate of the individual "
                  "enrollment");
  }
}

TEST_CASE("x509 individual enrollment by thumbprint, CA-issued leaf with its chain") {
  auto& s = srv();
  const auto& p = certs();
  auto leaf = test::make_device("x509-ind-thumb", p.inter, 100);
  put_enrollment(s, "x509-ind-thumb",
                 {{"clientCertificates",
                   {{"primary",
                     {{"info", {{"sha256Thumbprint",
                                 crypto::hex(enrollment::sha256_of(leaf.der()))}}}}}}}});
  auto c = device_client(s, leaf, {&p.inter});
  check_assigned(put_register(c, s, "x509-ind-thumb"), "x509-ind-thumb");
}

TEST_CASE("x509 enrollment groups: by root, by intermediate; the nearest CA's group wins") {
  auto& s = srv();
  const auto& p = certs();
  put_group(s, "x509-by-root", p.root);
  auto a = test::make_device("x509-grp-a", p.inter, 101);
  auto ca = device_client(s, a, {&p.inter});
  auto ja = check_assigned(put_register(ca, s, "x509-grp-a"), "x509-grp-a", "x509-by-root");
  // certificateInfo is the device's, signingCertificateInfo the group's CA
  // that admitted it (the root here, reached through the intermediate).
  const auto xa = ja["registrationState"]["x509"];
  check_info(xa["certificateInfo"], a, "CN=x509-grp-a,O=provisiond tests",
             "CN=IT Intermediate CA,O=provisiond tests", "65"); // serial 101
  check_info(xa["signingCertificateInfo"], p.root, "CN=IT Root CA,O=provisiond tests",
             "CN=IT Root CA,O=provisiond tests", "01");
  auto rec = s.service("GET", "/registrations/x509-grp-a");
  REQUIRE_MESSAGE(rec.status == 200, rec.body);
  CHECK(parse(rec.body)["x509"]["enrollmentGroupId"] == "x509-by-root");
  CHECK(parse(rec.body)["x509"] == xa);

  SUBCASE("without its intermediate the chain does not reach the root's group") {
    auto b = test::make_device("x509-grp-b", p.inter, 102);
    auto cb = device_client(s, b);
    check_refused(put_register(cb, s, "x509-grp-b"),
                  "the last certificate presented ('CN=x509-grp-b,O=provisiond tests') is "
                  "issued by 'CN=IT Intermediate CA,O=provisiond tests', which no enrollment "
                  "group holds");
  }
  SUBCASE("a group of the intermediate takes its devices") {
    put_group(s, "x509-by-inter", p.inter);
    auto c = test::make_device("x509-grp-c", p.inter, 103);
    auto cc = device_client(s, c, {&p.inter});
    auto jc = check_assigned(put_register(cc, s, "x509-grp-c"), "x509-grp-c", "x509-by-inter");
    check_info(jc["registrationState"]["x509"]["signingCertificateInfo"], p.inter,
               "CN=IT Intermediate CA,O=provisiond tests", "CN=IT Root CA,O=provisiond tests",
               "02");
    auto d = test::make_device("x509-grp-d", p.inter, 104);
    auto cd = device_client(s, d); // the leaf alone reaches the intermediate
    check_assigned(put_register(cd, s, "x509-grp-d"), "x509-grp-d", "x509-by-inter");
    REQUIRE(s.service("DELETE", "/enrollmentGroups/x509-by-inter").status == 204);
  }
  SUBCASE("a disabled intermediate group refuses its devices although the root's is enabled") {
    put_group(s, "x509-by-inter2", p.inter2, "disabled");
    put_group(s, "x509-by-root2", p.root2);
    auto e = test::make_device("x509-grp-e", p.inter2, 105);
    auto ce = device_client(s, e, {&p.inter2});
    auto r = put_register(ce, s, "x509-grp-e");
    // disabled: answered on the first poll (or at once), never assigned
    REQUIRE_MESSAGE((r.status == 200 || r.status == 202), r.body);
    auto j = parse(r.body);
    CHECK(j["status"] != "assigned");
  }
}

TEST_CASE("x509 refusals say what is wrong") {
  auto& s = srv();
  const auto& p = certs();
  put_group(s, "x509-refusals", p.root);
  SUBCASE("expired leaf") {
    auto old = test::make_device("x509-expired", p.inter, 200, -7200, -3600);
    auto c = device_client(s, old, {&p.inter});
    check_refused(put_register(c, s, "x509-expired"),
                  "the client certificate 'x509-expired' expired at ");
  }
  SUBCASE("registration id is not the certificate's CN") {
    auto leaf = test::make_device("x509-cn-a", p.inter, 201);
    auto c = device_client(s, leaf, {&p.inter});
    check_refused(put_register(c, s, "x509-cn-b"),
                  "the registration id 'x509-cn-b' is not the client certificate's subject "
                  "common name 'x509-cn-a'");
  }
  SUBCASE("another CA's device") {
    auto stranger_root = test::make_ca("IT Stranger CA", nullptr, 9);
    auto leaf = test::make_device("x509-stranger", stranger_root, 202);
    auto c = device_client(s, leaf);
    check_refused(put_register(c, s, "x509-stranger"), "is issued by 'CN=IT Stranger CA");
  }
}

TEST_CASE("devices without a certificate still register with SAS; SAS wins over a certificate") {
  auto& s = srv();
  auto key = crypto::generate_key();
  json body{{"registrationId", "x509-sas-dev"},
            {"attestation", {{"type", "symmetricKey"}, {"symmetricKey", {{"primaryKey", key}}}}}};
  REQUIRE(s.service("PUT", "/enrollments/x509-sas-dev", body.dump()).status == 200);
  auto c = s.client();
  auto r = put_register(c, s, "x509-sas-dev", s.device_auth("x509-sas-dev", key));
  REQUIRE_MESSAGE(r.status == 200, r.body);
  CHECK(parse(r.body)["registrationState"].contains("symmetricKey"));

  // No certificate, no header: says what either kind of device sends.
  auto none = put_register(c, s, "x509-sas-dev");
  REQUIRE(none.status == 401);
  CHECK(parse(none.body)["message"].get<std::string>().find("client certificate in the TLS "
                                                            "handshake")
        != std::string::npos);

  // A certificate and a SAS: the SAS is the credential.
  auto leaf = test::make_self_signed_device("x509-sas-dev");
  auto cc = device_client(s, leaf);
  auto both = put_register(cc, s, "x509-sas-dev", s.device_auth("x509-sas-dev", key));
  REQUIRE_MESSAGE(both.status == 200, both.body);
}

TEST_CASE("a session that carried a client certificate is never resumed: its chain is read again") {
  // A ticket holds the leaf, not the intermediates a group needs, so the
  // server ignores it (TLS 1.2) or issues none (TLS 1.3); each connection
  // presents the whole chain again. Devices without a certificate resume
  // (it_device_api_test).
  auto& s = srv();
  auto root = test::make_ca("IT Resumption Root CA", nullptr, 30);
  auto inter = test::make_ca("IT Resumption Intermediate CA", &root, 31);
  put_group(s, "x509-resume-root", root);
  auto leaf = test::make_device("x509-resume", inter, 300);
  for (int version : {TLS1_2_VERSION, TLS1_3_VERSION}) {
    CAPTURE(version);
    SSL_SESSION* sess = nullptr;
    std::string body;
    CHECK_FALSE(tls_register(s, version, leaf, &inter, "x509-resume", nullptr, &sess, body));
    CHECK(parse(body)["registrationState"]["x509"]["enrollmentGroupId"] == "x509-resume-root");
    REQUIRE(sess != nullptr);
    if (version == TLS1_3_VERSION)
      CHECK(SSL_SESSION_is_resumable(sess) == 0); // no ticket was issued
    CHECK_FALSE(tls_register(s, version, leaf, &inter, "x509-resume", sess, nullptr, body));
    CHECK(parse(body)["registrationState"]["x509"]["enrollmentGroupId"] == "x509-resume-root");
    SSL_SESSION_free(sess);
  }
}

TEST_CASE("the CLI registers an X.509 device: provisiond register --cert --cert-key") {
  auto& s = srv();
  auto root = test::make_ca("IT CLI Root CA", nullptr, 40);
  auto inter = test::make_ca("IT CLI Intermediate CA", &root, 41);
  put_group(s, "x509-cli-root", root);
  auto leaf = test::make_device("x509-cli-dev", inter, 400);
  auto chain = write_file(cert_dir(), "cli.pem", leaf.pem() + inter.pem());
  auto key = write_file(cert_dir(), "cli.key", leaf.key_pem());
  int rc = -1;
  const std::string out = test::run_cli("register --data-dir " + s.data_dir()
                                            + " --registration-id x509-cli-dev --cert " + chain
                                            + " --cert-key " + key + " --json",
                                        rc);
  REQUIRE_MESSAGE(rc == 0, out);
  auto j = parse(out);
  CHECK(j["status"] == "assigned");
  CHECK(j["registrationState"]["x509"]["enrollmentGroupId"] == "x509-cli-root");
}

namespace {

/// Upper-case hex of OpenSSL's own digest of `c` (not our thumbprint code).
std::string openssl_thumbprint(const test_cert& c, const EVP_MD* md) {
  unsigned char buf[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  REQUIRE(X509_digest(c.cert.get(), md, buf, &n) == 1);
  std::string out;
  static const char* digits = "0123456789ABCDEF";
  for (unsigned i = 0; i < n; ++i)
    out += {digits[buf[i] >> 4], digits[buf[i] & 15]};
  return out;
}

/// The device.assigned event of the last assignment of `id`.
json last_assignment(const test::server_process& s, const std::string& id) {
  json last;
  for (const auto& e : test::all_assignments(s))
    if (e["data"]["registrationId"] == id)
      last = e;
  INFO("the device.assigned event of " << id);
  REQUIRE(last.is_object());
  return last;
}

} // namespace

TEST_CASE("device.assigned carries the device certificate's thumbprints, and the CA of a group") {
  auto& s = srv();
  SUBCASE("individual enrollment: a selfSigned hub identity, no signing CA") {
    auto leaf = test::make_self_signed_device("x509-ev-ind");
    put_enrollment(s, "x509-ev-ind",
                   {{"clientCertificates", {{"primary", {{"certificate", leaf.pem()}}}}}});
    auto c = device_client(s, leaf);
    check_assigned(put_register(c, s, "x509-ev-ind"), "x509-ev-ind");
    auto x = last_assignment(s, "x509-ev-ind")["data"]["x509"];
    INFO(x.dump());
    CHECK(x["authenticationType"] == "selfSigned");
    CHECK(x["subjectName"] == "CN=x509-ev-ind,O=provisiond tests");
    CHECK(x["sha1Thumbprint"] == openssl_thumbprint(leaf, EVP_sha1()));
    CHECK(x["sha256Thumbprint"] == openssl_thumbprint(leaf, EVP_sha256()));
    CHECK_FALSE(x.contains("signingCertificate"));
  }
  SUBCASE("group device: a certificateAuthority hub identity and the CA that admitted it") {
    auto root = test::make_ca("IT Event Root CA", nullptr, 50);
    auto inter = test::make_ca("IT Event Intermediate CA", &root, 51);
    put_group(s, "x509-ev-root", root);
    put_group(s, "x509-ev-inter", inter); // the nearer CA admits the device
    auto leaf = test::make_device("x509-ev-grp", inter, 500);
    auto c = device_client(s, leaf, {&inter});
    check_assigned(put_register(c, s, "x509-ev-grp"), "x509-ev-grp", "x509-ev-inter");
    auto d = last_assignment(s, "x509-ev-grp")["data"];
    INFO(d.dump());
    CHECK(d["enrollmentGroupId"] == "x509-ev-inter");
    const auto& x = d["x509"];
    CHECK(x["authenticationType"] == "certificateAuthority");
    CHECK(x["subjectName"] == "CN=x509-ev-grp,O=provisiond tests");
    CHECK(x["sha1Thumbprint"] == openssl_thumbprint(leaf, EVP_sha1()));
    CHECK(x["sha256Thumbprint"] == openssl_thumbprint(leaf, EVP_sha256()));
    CHECK(x["signingCertificate"]["subjectName"] == "CN=IT Event Intermediate CA,O=provisiond tests");
    CHECK(x["signingCertificate"]["sha1Thumbprint"] == openssl_thumbprint(inter, EVP_sha1()));
    CHECK(x["signingCertificate"]["sha256Thumbprint"] == openssl_thumbprint(inter, EVP_sha256()));
  }
  SUBCASE("a symmetric key device's event has no x509") {
    auto key = crypto::generate_key();
    json body{{"registrationId", "x509-ev-sas"},
              {"attestation", {{"type", "symmetricKey"}, {"symmetricKey", {{"primaryKey", key}}}}}};
    REQUIRE(s.service("PUT", "/enrollments/x509-ev-sas", body.dump()).status == 200);
    auto c = s.client();
    auto r = put_register(c, s, "x509-ev-sas", s.device_auth("x509-ev-sas", key));
    REQUIRE_MESSAGE(r.status == 200, r.body);
    CHECK_FALSE(last_assignment(s, "x509-ev-sas")["data"].contains("x509"));
  }
}
