// Certificate issuance from a CSR (actors/configuration/certificate_issuer):
// the CSR checks, each refusal's message, the issued certificate and chain,
// CA loading, and the parser on garbage (a libFuzzer-free robustness pass).
#include <doctest/doctest.h>

#include <sys/stat.h>

#include <cstdio>
#include <ctime>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/configuration/certificate_issuer.hpp"
#include "actors/enrollment/enrollment_model.hpp"
#include "messages/crypto.hpp"
#include "tests/support/temp_dir.hpp"
#include "tests/support/test_csr.hpp"

using namespace prov;
using prov::configuration::certificate_issuer;
using prov::test::test_cert;

namespace {

std::string write(const std::string& dir, const std::string& name, const std::string& text,
                  mode_t mode = 0600) {
  const std::string path = dir + "/" + name;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  std::fwrite(text.data(), 1, text.size(), f);
  std::fclose(f);
  REQUIRE(::chmod(path.c_str(), mode) == 0);
  return path;
}

struct issuing_pki {
  test::temp_dir dir{"prov_issuer"};
  test_cert root = test::make_ca("Issuer Test Root", nullptr, 1);
  test_cert inter = test::make_ca("Issuer Test Issuing CA", &root, 2);
  test_cert rsa_root = test::make_ca_with_key("Issuer Test RSA CA", test::new_key("RSA-2048"));
  std::shared_ptr<const certificate_issuer> issuer;

  issuing_pki() {
    config::issuing_ca_config a;
    a.name = "fleet";
    a.key_file = write(dir.path, "fleet.key", inter.key_pem());
    a.certificate_file = write(dir.path, "fleet.pem", inter.pem() + root.pem(), 0644);
    a.validity_hours = 12;
    config::issuing_ca_config b;
    b.name = "rsa";
    b.key_file = write(dir.path, "rsa.key", rsa_root.key_pem());
    b.certificate_file = write(dir.path, "rsa.pem", rsa_root.pem(), 0644);
    b.validity_hours = 48;
    auto err = certificate_issuer::load({a, b}, issuer);
    REQUIRE_MESSAGE(!err, err.message);
  }
};

issuing_pki& pki() {
  static issuing_pki p;
  return p;
}

std::vector<std::string> split(const std::string& chain) {
  std::vector<std::string> out;
  std::size_t at = 0;
  while (at <= chain.size()) {
    auto nl = chain.find('\n', at);
    out.push_back(chain.substr(at, nl == std::string::npos ? std::string::npos : nl - at));
    if (nl == std::string::npos)
      break;
    at = nl + 1;
  }
  return out;
}

} // namespace

TEST_CASE("csr: valid requests of each supported key type pass; their type is named") {
  for (const char* type : {"P-256", "P-384", "RSA-2048", "RSA-3072"}) {
    INFO(type);
    auto key = test::new_key(type);
    configuration::csr_summary s;
    auto err = configuration::check_csr(test::make_csr(key.get(), "dev-1"), "dev-1", s);
    CHECK_MESSAGE(!err, err.message);
    CHECK(s.key_type == type);
  }
}

TEST_CASE("csr: each refusal has its own message and code invalid_csr") {
  auto key = test::new_key("P-256");
  const std::string der = test::make_csr_der(key.get(), "dev-1");
  auto msg = [](const std::string& csr, const std::string& id = "dev-1") {
    configuration::csr_summary s;
    auto e = configuration::check_csr(csr, id, s);
    CHECK(e.code == error_code::invalid_csr);
    return e.message;
  };
  CHECK(msg("") == "csr: empty");
  CHECK(msg("!!!notbase64") ==
        "csr: not base64 (expected the base64 of a DER PKCS#10 certificate signing request)");
  CHECK(msg(crypto::base64_encode("hello world")) ==
        "csr: not a DER PKCS#10 certificate signing request");
  CHECK(msg("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----") ==
        "csr: PEM armour is not accepted: send the base64 of the DER only");
  CHECK(msg(crypto::base64_encode(der + "x")) ==
        "csr: trailing bytes after the certificate signing request");
  std::string bad_sig = der;
  bad_sig[bad_sig.size() - 3] = static_cast<char>(bad_sig[bad_sig.size() - 3] ^ 0x55);
  CHECK(msg(crypto::base64_encode(bad_sig)) ==
        "csr: its signature does not verify with its public key");
  CHECK(msg(test::make_csr(key.get(), "someone-else")) ==
        "csr: subject CN 'someone-else' is not the registration id 'dev-1'");
  CHECK(msg(test::make_csr(key.get(), "")) ==
        "csr: the subject has no CN (it must be the registration id)");
  auto p521 = test::new_key("P-521");
  CHECK(msg(test::make_csr(p521.get(), "dev-1")) ==
        "csr: unsupported key EC secp521r1 (ECDSA P-256 or P-384, or RSA of 2048..8192 bits)");
  auto rsa1024 = test::new_key("RSA-1024");
  CHECK(msg(test::make_csr(rsa1024.get(), "dev-1")) ==
        "csr: unsupported key RSA 1024 bits (ECDSA P-256 or P-384, or RSA of 2048..8192 bits)");
}

TEST_CASE("csr: a registration id longer than a certificate's 64-character CN is refused") {
  auto key = test::new_key("P-256");
  const std::string id64(64, 'a');
  const std::string id65(65, 'a');
  configuration::csr_summary s;
  CHECK(!configuration::check_issuable_id(id64));
  auto err = configuration::check_csr(test::make_csr(key.get(), id64), id64, s);
  CHECK_MESSAGE(!err, err.message);
  const std::string msg = "csr: the registration id is 65 characters; an issued certificate's "
                          "subject CN (the registration id) is limited to 64 characters (RFC 5280 "
                          "ub-common-name)";
  CHECK(configuration::check_issuable_id(id65).code == error_code::invalid_csr);
  CHECK(configuration::check_issuable_id(id65).message == msg);
  CHECK(configuration::check_csr(test::make_csr(key.get(), id64), id65, s).message == msg);
  // The id is checked first (the CSR is not even decoded). The 64-character
  // id is issued (OpenSSL's own CN limit), the 65 refused
  // before any signing: never a 500.
  registration_event ev;
  ev.registration_id = id64;
  ev.issuing_ca = "fleet";
  ev.csr = test::make_csr(key.get(), id64);
  err = configuration::issue_for(pki().issuer.get(), ev, now_ms());
  CHECK_MESSAGE(!err, err.message);
  CHECK(!ev.issued_chain.empty());
  ev = registration_event{};
  ev.registration_id = id65;
  ev.issuing_ca = "fleet";
  ev.csr = test::make_csr(key.get(), id64);
  err = configuration::issue_for(pki().issuer.get(), ev, now_ms());
  CHECK(err.code == error_code::invalid_csr);
  CHECK(err.message == msg);
  CHECK(ev.issued_chain.empty());
}

TEST_CASE("csr: RSA keys must have public exponent 65537") {
  configuration::csr_summary s;
  auto f4 = test::new_rsa_key(2048, 65537);
  auto err = configuration::check_csr(test::make_csr(f4.get(), "dev-1"), "dev-1", s);
  CHECK_MESSAGE(!err, err.message);
  auto e3 = test::new_rsa_key(2048, 3);
  err = configuration::check_csr(test::make_csr(e3.get(), "dev-1"), "dev-1", s);
  CHECK(err.code == error_code::invalid_csr);
  CHECK(err.message == "csr: unsupported RSA public exponent 3 (only 65537 is accepted)");
  auto big = test::new_rsa_key(2048, 4294967311UL); // 2^32 + 15: prime, 33 bits
  err = configuration::check_csr(test::make_csr(big.get(), "dev-1"), "dev-1", s);
  CHECK(err.message == "csr: unsupported RSA public exponent (33 bits) (only 65537 is accepted)");
}

TEST_CASE("csr parser on garbage: truncations, bit flips and random bytes are refused cleanly") {
  // No sanitizer-only harness: every input must come back as invalid_csr (or,
  // for a flip outside the signed/verified parts, pass), never crash.
  auto key = test::new_key("P-256");
  const std::string der = test::make_csr_der(key.get(), "dev-1");
  configuration::csr_summary s;
  for (std::size_t n = 0; n < der.size(); ++n) {
    auto e = configuration::check_csr(crypto::base64_encode(der.substr(0, n)), "dev-1", s);
    CHECK(e.code == error_code::invalid_csr);
  }
  std::mt19937 rng(22);
  int passed = 0;
  for (std::size_t i = 0; i < der.size() * 8; ++i) {
    std::string flipped = der;
    flipped[i / 8] = static_cast<char>(flipped[i / 8] ^ (1 << (i % 8)));
    auto e = configuration::check_csr(crypto::base64_encode(flipped), "dev-1", s);
    CHECK((e.ok() || e.code == error_code::invalid_csr));
    passed += e.ok();
  }
  // A flip in the signed content or the signature must not pass.
  CHECK(passed < 8);
  for (int i = 0; i < 2000; ++i) {
    std::string junk(rng() % 600, '\0');
    for (auto& c : junk)
      c = static_cast<char>(rng());
    if (i % 2 == 0 && junk.size() > 2) { // a plausible DER SEQUENCE header
      junk[0] = 0x30;
      junk[1] = static_cast<char>(0x82);
    }
    auto e = configuration::check_csr(crypto::base64_encode(junk), "dev-1", s);
    CHECK(e.code == error_code::invalid_csr);
    // And as raw text, not base64 at all.
    e = configuration::check_csr(junk, "dev-1", s);
    CHECK(e.code == error_code::invalid_csr);
  }
}

TEST_CASE("issue: the chain is leaf, issuing CA, root; verifies; clientAuth, not a CA") {
  auto& p = pki();
  for (const char* type : {"P-256", "P-384", "RSA-2048"}) {
    INFO(type);
    auto key = test::new_key(type);
    std::vector<std::string> chain;
    auto err = p.issuer->issue("fleet", "dev-7", test::make_csr(key.get(), "dev-7"),
                               now_ms(), chain);
    REQUIRE_MESSAGE(!err, err.message);
    REQUIRE(chain.size() == 3);
    CHECK(*crypto::base64_decode(chain[1]) == p.inter.der());
    CHECK(*crypto::base64_decode(chain[2]) == p.root.der());
    CHECK(test::verify_issued_chain(chain, p.root) == "");
    auto leaf = test::parse_der_cert(*crypto::base64_decode(chain[0]));
    CHECK(EVP_PKEY_eq(X509_get0_pubkey(leaf.get()), key.get()) == 1);
    CHECK(X509_check_ca(leaf.get()) == 0);
    CHECK((X509_get_extended_key_usage(leaf.get()) & XKU_SSL_CLIENT) != 0);
    char cn[256] = {0};
    X509_NAME_get_text_by_NID(X509_get_subject_name(leaf.get()), NID_commonName, cn, sizeof cn);
    CHECK(std::string(cn) == "dev-7");
    // authorityKeyIdentifier: the issuing CA's subjectKeyIdentifier.
    const ASN1_OCTET_STRING* aki = X509_get0_authority_key_id(leaf.get());
    REQUIRE(aki != nullptr);
    CHECK(ASN1_OCTET_STRING_cmp(aki, X509_get0_subject_key_id(p.inter.cert.get())) == 0);
    // 12 hours from now, starting 5 minutes back.
    int days = 0, secs = 0;
    REQUIRE(ASN1_TIME_diff(&days, &secs, X509_get0_notBefore(leaf.get()),
                           X509_get0_notAfter(leaf.get())) == 1);
    CHECK(days * 86400 + secs == 12 * 3600 + 300);
  }
  // The RSA CA, which is a root itself: chain of two.
  auto key = test::new_key("P-256");
  std::vector<std::string> chain;
  REQUIRE(!p.issuer->issue("RSA", "dev-8", test::make_csr(key.get(), "dev-8"), now_ms(), chain));
  REQUIRE(chain.size() == 2);
  CHECK(test::verify_issued_chain(chain, p.rsa_root) == "");
  CHECK(test::verify_issued_chain(chain, p.root) != "");
}

TEST_CASE("issue: serial numbers are unique and positive") {
  auto key = test::new_key("P-256");
  const auto csr = test::make_csr(key.get(), "dev-s");
  std::set<std::string> serials;
  for (int i = 0; i < 50; ++i) {
    std::vector<std::string> chain;
    REQUIRE(!pki().issuer->issue("fleet", "dev-s", csr, now_ms(), chain));
    auto leaf = test::parse_der_cert(*crypto::base64_decode(chain[0]));
    const ASN1_INTEGER* sn = X509_get0_serialNumber(leaf.get());
    CHECK(ASN1_STRING_type(sn) == V_ASN1_INTEGER); // not V_ASN1_NEG_INTEGER
    serials.insert(std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(sn)),
                               static_cast<std::size_t>(ASN1_STRING_length(sn))));
  }
  CHECK(serials.size() == 50);
}

TEST_CASE("issue_for: the event's csr and policy decide; nothing issued on a refusal") {
  auto key = test::new_key("P-256");
  registration_event ev;
  ev.registration_id = "dev-9";
  // No csr: nothing to do.
  CHECK(!configuration::issue_for(pki().issuer.get(), ev, now_ms()));
  CHECK(ev.issued_chain.empty());
  ev.csr = test::make_csr(key.get(), "dev-9");
  auto e = configuration::issue_for(pki().issuer.get(), ev, now_ms());
  CHECK(e.code == error_code::no_issuance_policy);
  CHECK(e.message == "the device sent a csr, but its enrollment has no certificate issuance "
                     "policy (certificatePolicyResourceId or clientCertificateIssuancePolicy)");
  ev.enrollment_group_id = "g";
  CHECK(configuration::issue_for(pki().issuer.get(), ev, now_ms()).message ==
        "the device sent a csr, but its enrollment group has no certificate issuance "
        "policy (certificatePolicyResourceId or clientCertificateIssuancePolicy)");
  ev.issuing_ca = "nope";
  e = configuration::issue_for(pki().issuer.get(), ev, now_ms());
  CHECK(e.code == error_code::issuing_ca_unavailable);
  CHECK(e.message == "the enrollment's issuing CA 'nope' is not configured on this instance "
                     "([[issuing_cas]])");
  CHECK(ev.issued_chain.empty());
  ev.issuing_ca = "fleet";
  REQUIRE(!configuration::issue_for(pki().issuer.get(), ev, now_ms()));
  CHECK(split(ev.issued_chain).size() == 3);
  CHECK(ev.csr.empty());
}

TEST_CASE("issue_for: a retry of an issued event keeps its chain") {
  // What a failed store commit (embedded) or a failed device.assigned
  // publish (Kafka) sends back to the stage: the event as issue_for left it.
  auto key = test::new_key("P-256");
  registration_event ev;
  ev.registration_id = "dev-retry";
  ev.operation_id = "op-retry";
  ev.id_scope = "0ne00000001";
  ev.issuing_ca = "fleet";
  ev.csr = test::make_csr(key.get(), "dev-retry");
  REQUIRE(!configuration::issue_for(pki().issuer.get(), ev, now_ms()));
  const std::string first = ev.issued_chain;
  REQUIRE(split(first).size() == 3);
  for (int attempt = 0; attempt < 2; ++attempt) {
    registration_event retry = ev; // the copy the retry re-delivers
    retry.status = registration_status::assigning;
    REQUIRE(!configuration::issue_for(pki().issuer.get(), retry, now_ms()));
    CHECK(retry.issued_chain == first); // same certificate, not none, not a new one
    // Also through the codec the Kafka relay and the outbox use.
    registration_event decoded;
    REQUIRE(!decode_event(encode_event(retry), decoded));
    REQUIRE(!configuration::issue_for(pki().issuer.get(), decoded, now_ms()));
    CHECK(decoded.issued_chain == first);
  }
  // Without an issuer at all (a retry never needs one).
  registration_event retry = ev;
  REQUIRE(!configuration::issue_for(nullptr, retry, now_ms()));
  CHECK(retry.issued_chain == first);
}

TEST_CASE("issue_for: the certificate's CN must be the device's identity exactly") {
  auto key = test::new_key("P-256");
  auto event = [&](const std::string& id) {
    registration_event ev;
    ev.registration_id = id;
    ev.issuing_ca = "fleet";
    ev.csr = test::make_csr(key.get(), id);
    return ev;
  };
  // The CSR's CN is compared exactly (no case folding).
  auto ev = event("dev-case");
  ev.csr = test::make_csr(key.get(), "Dev-Case");
  auto e = configuration::issue_for(pki().issuer.get(), ev, now_ms());
  CHECK(e.code == error_code::invalid_csr);
  CHECK(e.message == "csr: subject CN 'Dev-Case' is not the registration id 'dev-case'");
  // An enrollment that assigns another device id: refused, nothing issued.
  ev = event("dev-a");
  ev.device_id = "device-a";
  e = configuration::issue_for(pki().issuer.get(), ev, now_ms());
  CHECK(e.code == error_code::invalid_enrollment);
  CHECK(e.message == "certificate issuance: the enrollment assigns device id 'device-a', not the "
                     "registration id 'dev-a'; an issued certificate's CN is the registration id "
                     "(remove the enrollment's deviceId, or register without a csr)");
  CHECK(ev.issued_chain.empty());
  ev.device_id = "DEV-A"; // case counts: IoT Hub device ids are case-sensitive
  CHECK(configuration::issue_for(pki().issuer.get(), ev, now_ms()).code ==
        error_code::invalid_enrollment);
  ev.device_id = "dev-a";
  CHECK(!configuration::issue_for(pki().issuer.get(), ev, now_ms()));
  CHECK(!ev.issued_chain.empty());
  // X.509-attested (attestation matched the CN ignoring case): the
  // registration id must be the certificate's CN exactly.
  auto x509 = [](const std::string& subject) {
    return nlohmann::json{{"certificateInfo", {{"subjectName", subject}}}}.dump();
  };
  ev = event("dev-x");
  ev.x509_json = x509("CN=Dev-X");
  e = configuration::issue_for(pki().issuer.get(), ev, now_ms());
  CHECK(e.code == error_code::invalid_csr);
  CHECK(e.message == "csr: the registration id 'dev-x' is not spelled exactly as the client "
                     "certificate's subject (CN=Dev-X): register with the id exactly as in the "
                     "certificate's CN");
  CHECK(ev.issued_chain.empty());
  ev.x509_json = x509("O=a\\,CN=dev-x"); // an escaped comma is not a CN
  CHECK(configuration::issue_for(pki().issuer.get(), ev, now_ms()).code ==
        error_code::invalid_csr);
  ev.x509_json = x509("CN=dev-x,O=Contoso,C=US");
  e = configuration::issue_for(pki().issuer.get(), ev, now_ms());
  CHECK_MESSAGE(!e, e.message);
  CHECK(!ev.issued_chain.empty());
}

TEST_CASE("issue_for: one log line per issued certificate, none on a refusal or a retry") {
  test::temp_dir dir{"prov_issuer_log"};
  auto ca = test::make_ca("Log Issuing CA", nullptr, 7);
  config::issuing_ca_config c;
  c.name = "Audit-CA";
  c.key_file = write(dir.path, "a.key", ca.key_pem());
  c.certificate_file = write(dir.path, "a.pem", ca.pem(), 0644);
  std::vector<std::string> lines;
  std::shared_ptr<const certificate_issuer> issuer;
  REQUIRE(!certificate_issuer::load({c}, issuer,
                                    [&](std::string_view l) { lines.emplace_back(l); }));
  auto key = test::new_key("P-256");
  registration_event ev;
  ev.registration_id = "dev-log";
  ev.operation_id = "op-log";
  ev.issuing_ca = "audit-ca"; // names match ignoring case; the log names it as configured
  ev.csr = test::make_csr(key.get(), "someone-else");
  CHECK(configuration::issue_for(issuer.get(), ev, now_ms()).code == error_code::invalid_csr);
  CHECK(lines.empty());
  ev.csr = test::make_csr(key.get(), "dev-log");
  REQUIRE(!configuration::issue_for(issuer.get(), ev, now_ms()));
  REQUIRE(lines.size() == 1);
  auto leaf = test::parse_der_cert(*crypto::base64_decode(split(ev.issued_chain)[0]));
  std::unique_ptr<BIGNUM, decltype(&BN_free)> sn(
    ASN1_INTEGER_to_BN(X509_get0_serialNumber(leaf.get()), nullptr), BN_free);
  char* hex = BN_bn2hex(sn.get());
  std::string serial = hex;
  OPENSSL_free(hex);
  serial.insert(0, 32 - serial.size(), '0');
  struct tm tm {};
  REQUIRE(ASN1_TIME_to_tm(X509_get0_notAfter(leaf.get()), &tm) == 1);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
  CHECK(lines[0] == "certificate issued: registrationId=dev-log operationId=op-log ca=Audit-CA "
                    "serial=" + serial + " notAfter=" + when);
  REQUIRE(!configuration::issue_for(issuer.get(), ev, now_ms())); // a retry: nothing issued
  CHECK(lines.size() == 1);
}

TEST_CASE("load: key files readable by others, mismatched keys and non-CA certificates") {
  test::temp_dir dir{"prov_issuer_load"};
  auto root = test::make_ca("Load Root", nullptr, 1);
  auto other = test::make_ca("Load Other", nullptr, 2);
  auto leaf = test::make_device("not-a-ca", root, 3);
  config::issuing_ca_config c;
  c.name = "x";
  c.key_file = write(dir.path, "x.key", root.key_pem(), 0640);
  c.certificate_file = write(dir.path, "x.pem", root.pem(), 0644);
  std::shared_ptr<const certificate_issuer> out;
  auto e = certificate_issuer::load({c}, out);
  CHECK(e.message == "issuing_cas[0] (x).key_file: '" + c.key_file +
                       "' is accessible by group or others; chmod 600 it");
  REQUIRE(::chmod(c.key_file.c_str(), 0600) == 0);
  CHECK(!certificate_issuer::load({c}, out));
  c.certificate_file = write(dir.path, "other.pem", other.pem(), 0644);
  e = certificate_issuer::load({c}, out);
  CHECK(e.message == "issuing_cas[0] (x).key_file: the key is not the one of the first "
                     "certificate in '" + c.certificate_file + "'");
  c.key_file = write(dir.path, "leaf.key", leaf.key_pem());
  c.certificate_file = write(dir.path, "leaf.pem", leaf.pem(), 0644);
  e = certificate_issuer::load({c}, out);
  CHECK(e.message == "issuing_cas[0] (x).certificate_file: the first certificate in '" +
                       c.certificate_file +
                       "' is not a CA (basicConstraints CA:TRUE with keyCertSign)");
  // A CA without subjectKeyIdentifier: refused at load, not at signing.
  auto no_ski = test::make_ca_with_key("Load No SKI", test::new_key("P-256"), nullptr, 4, false);
  c.key_file = write(dir.path, "noski.key", no_ski.key_pem());
  c.certificate_file = write(dir.path, "noski.pem", no_ski.pem(), 0644);
  e = certificate_issuer::load({c}, out);
  CHECK(e.message == "issuing_cas[0] (x).certificate_file: the first certificate in '" +
                       c.certificate_file +
                       "' has no subjectKeyIdentifier extension (issued certificates' "
                       "authorityKeyIdentifier needs it)");
  // An encrypted key: a clear error, never a passphrase prompt on the TTY.
  {
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
    static char pass[] = "secret";
    REQUIRE(PEM_write_bio_PrivateKey(bio.get(), root.key.get(), EVP_aes_256_cbc(), nullptr, 0,
                                     nullptr, pass) == 1);
    char* data = nullptr;
    long n = BIO_get_mem_data(bio.get(), &data);
    c.key_file = write(dir.path, "enc.key", std::string(data, static_cast<std::size_t>(n)));
    c.certificate_file = write(dir.path, "root.pem", root.pem(), 0644);
    e = certificate_issuer::load({c}, out);
    CHECK(e.message == "issuing_cas[0] (x).key_file: '" + c.key_file +
                         "' is encrypted: encrypted keys are not supported (store it "
                         "unencrypted, chmod 600)");
  }
  // An absent key file (the configuration role checks it; config does not).
  c.key_file = dir.path + "/absent.key";
  e = certificate_issuer::load({c}, out);
  CHECK(e.message == "issuing_cas[0] (x).key_file: cannot read '" + c.key_file +
                       "': No such file or directory");
  c.key_file = write(dir.path, "junk.key", "not a key");
  e = certificate_issuer::load({c}, out);
  CHECK(e.message.rfind("issuing_cas[0] (x).key_file: '" + c.key_file +
                          "' holds no PEM private key",
                        0) == 0);
}

TEST_CASE("issuance policy: both DPS shapes name the CA; conflicting ones are refused") {
  namespace en = prov::enrollment;
  CHECK(en::issuing_ca_of_resource_id(
          "/subscriptions/0/resourceGroups/rg/providers/Microsoft.DeviceRegistry/"
          "deviceRegistryNamespaces/ns/certificateAuthorities/fleet/certificatePolicies/p1") ==
        "fleet");
  CHECK(en::issuing_ca_of_resource_id("fleet") == "fleet");
  CHECK(en::issuing_ca_of_resource_id("/a/b/c").empty());
  auto view = [](const nlohmann::json& extra, en::enrollment_view& v) {
    nlohmann::json body{{"registrationId", "dev-1"},
                        {"attestation", {{"type", "symmetricKey"}}}};
    body.update(extra);
    nlohmann::json doc;
    if (auto e = en::normalize(en::kind::individual, "dev-1", body, nullptr, 0, doc))
      return e;
    return en::view_of_text(en::kind::individual, doc.dump(), v);
  };
  en::enrollment_view v;
  REQUIRE(!view({{"clientCertificateIssuancePolicy", {{"certificateAuthorityName", "fleet"}}}}, v));
  CHECK(v.issuing_ca == "fleet");
  v = {};
  REQUIRE(!view({{"certificatePolicyResourceId",
                  ".../certificateAuthorities/rsa/certificatePolicies/p"}}, v));
  CHECK(v.issuing_ca == "rsa");
  v = {};
  REQUIRE(!view(nlohmann::json::object(), v));
  CHECK(v.issuing_ca.empty());
  auto e = view({{"clientCertificateIssuancePolicy", {{"certificateAuthorityName", "fleet"}}},
                 {"certificatePolicyResourceId", "rsa"}}, v);
  CHECK(e.code == error_code::invalid_enrollment);
  CHECK(e.message == "certificatePolicyResourceId: names CA 'rsa' but "
                     "clientCertificateIssuancePolicy names 'fleet'");
  e = view({{"certificatePolicyResourceId", "/a/b/c"}}, v);
  CHECK(e.code == error_code::invalid_enrollment);
}
