// X.509 attestation: the mechanism against enrollments built through the
// model (normalize, then the view), with certificates made here.
#include <doctest/doctest.h>

#include <cstdlib>
#include <ctime>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/attestation/x509.hpp"
#include "actors/enrollment/x509_certificates.hpp"
#include "messages/crypto.hpp"
#include "tests/support/test_certs.hpp"

using namespace prov;
using namespace prov::attestation;
namespace en = prov::enrollment;
using json = nlohmann::json;
using prov::test::test_cert;

namespace {

const std::string scope = "0ne00ABC123";

struct pki {
  test_cert root = test::make_ca("Test Root CA", nullptr, 1);
  test_cert inter = test::make_ca("Test Intermediate CA", &root, 2);
  test_cert other_root = test::make_ca("Other Root CA", nullptr, 3);
  test_cert leaf = test::make_device("dev-1", inter, 10);
  test_cert leaf2 = test::make_device("dev-2", inter, 11);
  test_cert direct = test::make_device("dev-3", root, 12); // issued by the root itself
  test_cert expired = test::make_device("dev-old", inter, 13, -7200, -3600);
  test_cert future = test::make_device("dev-new", inter, 14, 3600, 7200);
  test_cert stranger = test::make_device("dev-x", other_root, 15);
  test_cert self = test::make_self_signed_device("dev-self");
};

const pki& certs() {
  static const pki p;
  return p;
}

int64_t now() { return static_cast<int64_t>(std::time(nullptr)); }

// With PROV_X509_TEST_PARSED set (ctest test_actors_x509_parsed) every chain
// also carries its certificates parsed as a TLS listener hands them over
// (net::peer_chain): decoded from the DER into objects of their own, not the
// ones the certificates were made with. The mechanism then uses those (and
// re-encodes the DER from them), so every case here runs the parsed path too.
bool parsed_mode() {
  static const bool on = std::getenv("PROV_X509_TEST_PARSED") != nullptr;
  return on;
}

x509_credential chain(std::initializer_list<const test_cert*> cs) {
  x509_credential c;
  c.from_handshake = true; // as the listener hands it over
  for (const auto* t : cs)
    c.chain_der.push_back(t->der());
  if (parsed_mode())
    for (const auto& der : c.chain_der) {
      c.parsed.push_back(en::shared_der(der));
      REQUIRE(c.parsed.back());
    }
  return c;
}

error open(const device_credential& c, const std::string& reg_id, std::unique_ptr<proof>& p) {
  request_facts f;
  f.id_scope = scope;
  f.registration_id = reg_id;
  f.now_s = now();
  return x509{}.open(c, f, p);
}

en::enrollment_view view_of(en::kind k, const std::string& id, const json& x509,
                            const std::string& status = "enabled") {
  json body = {{"attestation", {{"type", "x509"}, {"x509", x509}}},
               {"provisioningStatus", status}};
  json doc;
  auto err = en::normalize(k, id, body, nullptr, 1'700'000'000'000, doc);
  REQUIRE_MESSAGE(err.ok(), err.message);
  en::enrollment_view v;
  auto verr = en::view_of_text(k, doc.dump(), v);
  REQUIRE_MESSAGE(verr.ok(), verr.message);
  return v;
}

en::enrollment_view individual(const json& primary, const json& secondary = nullptr) {
  json cc = {{"primary", primary}};
  if (!secondary.is_null())
    cc["secondary"] = secondary;
  return view_of(en::kind::individual, "dev-1", {{"clientCertificates", cc}});
}

en::enrollment_view group(const std::string& id, const test_cert& signer,
                          const std::string& status = "enabled") {
  return view_of(en::kind::group, id,
                 {{"signingCertificates", {{"primary", {{"certificate", signer.pem()}}}}}}, status);
}

std::string hex_upper(std::string_view raw) { return en::upper_hex(raw); }

} // namespace

TEST_CASE("x509: reads only client certificate chains") {
  x509 m;
  CHECK(m.type() == attestation_type::x509);
  CHECK(m.reads(x509_credential{}));
  CHECK_FALSE(m.reads(sas_credential{"x"}));
  CHECK_FALSE(m.reads(std::monostate{}));
}

TEST_CASE("x509: open() checks the chain on its own") {
  const auto& p = certs();
  std::unique_ptr<proof> pr;
  SUBCASE("no chain") {
    auto err = open(x509_credential{}, "dev-1", pr);
    CHECK(err.code == error_code::unauthorized_signature);
    CHECK(err.message.find("no client certificate") != std::string::npos);
  }
  SUBCASE("not DER") {
    auto err = open(x509_credential{{"garbage"}}, "dev-1", pr);
    CHECK(err.code == error_code::unauthorized_signature);
    CHECK(err.message.find("certificate 0 of the presented chain") != std::string::npos);
  }
  SUBCASE("the registration id must be the leaf's CN (case-insensitive, as ids are)") {
    auto err = open(chain({&p.leaf, &p.inter}), "dev-2", pr);
    CHECK(err.code == error_code::unauthorized_signature);
    CHECK(err.message
          == "the registration id 'dev-2' is not the client certificate's subject common name "
             "'dev-1'");
    CHECK(open(chain({&p.leaf, &p.inter}), "DEV-1", pr).ok());
  }
  SUBCASE("expired leaf") {
    auto err = open(chain({&p.expired, &p.inter}), "dev-old", pr);
    CHECK(err.code == error_code::unauthorized_signature);
    CHECK(err.message.find("the client certificate 'dev-old' expired at ") == 0);
  }
  SUBCASE("leaf not valid yet") {
    auto err = open(chain({&p.future, &p.inter}), "dev-new", pr);
    CHECK(err.message.find("is not valid before") != std::string::npos);
  }
  SUBCASE("identity: the whole chain; valid until the first expiry") {
    std::unique_ptr<proof> a, b, c;
    REQUIRE(open(chain({&p.leaf, &p.inter}), "dev-1", a).ok());
    REQUIRE(open(chain({&p.leaf}), "dev-1", b).ok());
    REQUIRE(open(chain({&p.leaf, &p.inter}), "dev-1", c).ok());
    CHECK(a->identity().size() == 32);
    CHECK(a->identity() != b->identity());
    CHECK(a->identity() == c->identity());
    CHECK(a->valid_until() > now());
    CHECK(a->valid_until()
          == en::epoch_of(X509_get0_notAfter(p.leaf.cert.get()))); // leaf expires first
  }
}

TEST_CASE("x509: a chain no handshake proved needs a signature by the leaf's key") {
  const auto& p = certs();
  std::unique_ptr<proof> pr;
  auto unproved = [&] {
    auto c = chain({&p.leaf, &p.inter});
    c.from_handshake = false; // as a direct publisher's request builds it
    c.parsed.clear();
    return c;
  };
  auto with_proof = [&](const test_cert& signer, const std::string& id, int64_t expiry) {
    auto c = unproved();
    c.possession = x509_credential::possession_proof{
      expiry, test::sign_possession(signer, scope, id, expiry)};
    return c;
  };
  const int64_t in_an_hour = now() + 3600;
  SUBCASE("neither a handshake nor a signature") {
    auto err = open(unproved(), "dev-1", pr);
    CHECK(err.code == error_code::unauthorized_signature);
    CHECK(err.message.find("no proof that the device holds its certificate's private key")
          == 0);
  }
  SUBCASE("the leaf's signature of this scope, id and expiry") {
    CHECK(open(with_proof(p.leaf, "dev-1", in_an_hour), "dev-1", pr).ok());
  }
  SUBCASE("another key's signature (a publisher that has only the certificate)") {
    auto err = open(with_proof(p.leaf2, "dev-1", in_an_hour), "dev-1", pr);
    CHECK(err.code == error_code::unauthorized_signature);
    CHECK(err.message
          == "x509.signature is not a signature by the client certificate's key of \"" + scope
               + "/registrations/dev-1\\n" + std::to_string(in_an_hour)
               + "\" (SHA-256; Ed25519 signs the text itself)");
  }
  SUBCASE("signed for another expiry than the one sent") {
    auto c = with_proof(p.leaf, "dev-1", in_an_hour);
    c.possession->expiry += 1;
    CHECK(open(c, "dev-1", pr).message.find("x509.signature is not a signature") == 0);
  }
  SUBCASE("an empty or truncated signature") {
    auto c = with_proof(p.leaf, "dev-1", in_an_hour);
    c.possession->signature.resize(c.possession->signature.size() / 2);
    CHECK(open(c, "dev-1", pr).message.find("x509.signature is not a signature") == 0);
    c.possession->signature.clear();
    CHECK(open(c, "dev-1", pr).message.find("x509.signature is not a signature") == 0);
  }
  SUBCASE("expired, or valid for longer than a SAS token may be") {
    auto err = open(with_proof(p.leaf, "dev-1", now() - 3600), "dev-1", pr);
    CHECK(err.code == error_code::unauthorized_signature);
    CHECK(err.message == "the proof of possession (x509.expiry): token expired");
    err = open(with_proof(p.leaf, "dev-1", now() + 2 * 365 * 86400), "dev-1", pr);
    CHECK(err.message.find("the proof of possession (x509.expiry): token lifetime exceeds") == 0);
  }
}

TEST_CASE("x509: individual enrollment by certificate or thumbprint") {
  const auto& p = certs();
  std::unique_ptr<proof> pr;
  REQUIRE(open(chain({&p.leaf, &p.inter}), "dev-1", pr).ok());

  SUBCASE("primary certificate (PEM)") {
    auto v = pr->check_individual(individual({{"certificate", p.leaf.pem()}}));
    CHECK_MESSAGE(v.is_accepted(), v.err.message);
    CHECK(v.type == attestation_type::x509);
    CHECK(v.enrollment_group_id.empty());
  }
  SUBCASE("secondary certificate, as bare base64 DER") {
    auto v = pr->check_individual(
      individual(json{{"certificate", p.leaf2.pem()}},
                 json{{"certificate", crypto::base64_encode(p.leaf.der())}}));
    CHECK_MESSAGE(v.is_accepted(), v.err.message);
  }
  SUBCASE("SHA-256 thumbprint") {
    auto v = pr->check_individual(
      individual({{"info", {{"sha256Thumbprint", hex_upper(en::sha256_of(p.leaf.der()))}}}}));
    CHECK_MESSAGE(v.is_accepted(), v.err.message);
  }
  SUBCASE("SHA-1 thumbprint, lower case with colons") {
    std::string h = crypto::hex(en::sha1_of(p.leaf.der()));
    std::string colons;
    for (std::size_t i = 0; i < h.size(); i += 2)
      colons += (i ? ":" : "") + h.substr(i, 2);
    json thumb = {{"info", {{"sha1Thumbprint", colons}}}};
    auto v = pr->check_individual(individual(thumb));
    CHECK_MESSAGE(v.is_accepted(), v.err.message);
  }
  SUBCASE("another certificate: refused, naming the presented one") {
    auto v = pr->check_individual(individual({{"certificate", p.leaf2.pem()}}));
    CHECK_FALSE(v.is_accepted());
    CHECK(v.err.code == error_code::unauthorized_signature);
    CHECK(v.err.message.find("is neither the primary nor the secondary certificate")
          != std::string::npos);
    CHECK(v.err.message.find(hex_upper(en::sha256_of(p.leaf.der()))) != std::string::npos);
  }
  SUBCASE("disabled: accepted as disabled (the stage answers `disabled`)") {
    auto v = pr->check_individual(view_of(
      en::kind::individual, "dev-1",
      {{"clientCertificates", {{"primary", {{"certificate", p.leaf.pem()}}}}}}, "disabled"));
    CHECK_MESSAGE(v.is_accepted(), v.err.message);
    CHECK_FALSE(v.enabled);
  }
  SUBCASE("a self-signed device certificate") {
    std::unique_ptr<proof> s;
    REQUIRE(open(chain({&p.self}), "dev-self", s).ok());
    auto v = s->check_individual(view_of(
      en::kind::individual, "dev-self",
      {{"clientCertificates", {{"primary", {{"certificate", p.self.pem()}}}}}}));
    CHECK_MESSAGE(v.is_accepted(), v.err.message);
  }
}

TEST_CASE("x509: enrollment groups by root or intermediate, the nearest wins") {
  const auto& p = certs();
  std::unique_ptr<proof> pr;
  REQUIRE(open(chain({&p.leaf, &p.inter}), "dev-1", pr).ok());

  SUBCASE("root CA group: the chain verifies through the presented intermediate") {
    auto v = pr->check_groups({group("by-root", p.root)});
    REQUIRE_MESSAGE(v.is_accepted(), v.err.message);
    CHECK(v.enrollment_group_id == "by-root");
    CHECK(v.type == attestation_type::x509);
  }
  SUBCASE("intermediate CA group (partial chain), leaf alone is enough") {
    std::unique_ptr<proof> only_leaf;
    REQUIRE(open(chain({&p.leaf}), "dev-1", only_leaf).ok());
    auto v = only_leaf->check_groups({group("by-inter", p.inter)});
    REQUIRE_MESSAGE(v.is_accepted(), v.err.message);
    CHECK(v.enrollment_group_id == "by-inter");
  }
  SUBCASE("the intermediate's group wins over the root's, in any order") {
    auto v1 = pr->check_groups({group("by-root", p.root), group("by-inter", p.inter)});
    auto v2 = pr->check_groups({group("by-inter", p.inter), group("by-root", p.root)});
    CHECK(v1.enrollment_group_id == "by-inter");
    CHECK(v2.enrollment_group_id == "by-inter");
  }
  SUBCASE("a disabled nearest group refuses the device although the root's is enabled") {
    auto v = pr->check_groups({group("by-root", p.root), group("by-inter", p.inter, "disabled")});
    CHECK_MESSAGE(v.is_accepted(), v.err.message);
    CHECK(v.enrollment_group_id == "by-inter");
    CHECK_FALSE(v.enabled);
  }
  SUBCASE("secondary signing certificate") {
    auto g = view_of(en::kind::group, "two",
                     {{"signingCertificates",
                       {{"primary", {{"certificate", p.other_root.pem()}}},
                        {"secondary", {{"certificate", p.root.pem()}}}}}});
    auto v = pr->check_groups({g});
    CHECK_MESSAGE(v.is_accepted(), v.err.message);
  }
  SUBCASE("a leaf issued by the root directly") {
    std::unique_ptr<proof> d;
    REQUIRE(open(chain({&p.direct}), "dev-3", d).ok());
    CHECK(d->check_groups({group("by-root", p.root)}).is_accepted());
  }
  SUBCASE("no intermediate sent: the root's group is not reached, and the message says why") {
    std::unique_ptr<proof> only_leaf;
    REQUIRE(open(chain({&p.leaf}), "dev-1", only_leaf).ok());
    auto v = only_leaf->check_groups({group("by-root", p.root)});
    CHECK_FALSE(v.is_accepted());
    CHECK(v.err.code == error_code::unauthorized_signature);
    CHECK(v.err.message.find("the last certificate presented ('CN=dev-1,O=provisiond tests') "
                             "is issued by 'CN=Test Intermediate CA,O=provisiond tests'")
          != std::string::npos);
    CHECK(v.err.message.find("CA certificate not found") == std::string::npos);
  }
  SUBCASE("another CA's device") {
    std::unique_ptr<proof> s;
    REQUIRE(open(chain({&p.stranger}), "dev-x", s).ok());
    auto v = s->check_groups({group("by-root", p.root), group("by-inter", p.inter)});
    CHECK_FALSE(v.is_accepted());
    CHECK(v.err.message.find("is issued by 'CN=Other Root CA,O=provisiond tests'")
          != std::string::npos);
  }
  SUBCASE("a chain under a forged root of the right name: verification says what failed") {
    test_cert fake_root = test::make_ca("Test Root CA", nullptr, 1);
    test_cert fake_inter = test::make_ca("Fake Intermediate CA", &fake_root, 2);
    test_cert dev = test::make_device("dev-9", fake_inter, 20);
    std::unique_ptr<proof> f;
    REQUIRE(open(chain({&dev, &fake_inter}), "dev-9", f).ok());
    auto v = f->check_groups({group("by-root", p.root)});
    CHECK_FALSE(v.is_accepted());
    INFO(v.err.message);
    CHECK(v.err.message.find("the certificate chain does not verify: enrollment group "
                             "'by-root' (signing certificate 'CN=Test Root CA,O=provisiond "
                             "tests'): ")
          == 0);
    CHECK(v.err.message.find("at depth 1 ('CN=Fake Intermediate CA,O=provisiond tests')")
          != std::string::npos);
  }
  SUBCASE("a group's secondary may be the nearer CA") {
    auto both = view_of(en::kind::group, "both",
                        {{"signingCertificates",
                          {{"primary", {{"certificate", p.root.pem()}}},
                           {"secondary", {{"certificate", p.inter.pem()}}}}}});
    // Ties with by-inter at depth 1: the first listed wins.
    auto v = pr->check_groups({both, group("by-inter", p.inter)});
    CHECK(v.enrollment_group_id == "both");
  }
  SUBCASE("caReferences: a verified CA admits; an unverified or missing one says so") {
    auto byref = [&](en::ca_reference::state st) {
      auto g = view_of(en::kind::group, "by-ref", {{"caReferences", {{"primary", "root"}}}});
      auto& x = std::get<en::x509_attestation>(g.attestation);
      REQUIRE(x.ca_references.size() == 1);
      CHECK(x.ca_references[0].status == en::ca_reference::state::unresolved);
      x.ca_references[0].status = st;
      if (st != en::ca_reference::state::missing)
        x.ca_references[0].der = p.root.der();
      return g;
    };
    auto v = pr->check_groups({byref(en::ca_reference::state::verified)});
    CHECK_MESSAGE(v.is_accepted(), v.err.message);
    CHECK(v.enrollment_group_id == "by-ref");
    v = pr->check_groups({byref(en::ca_reference::state::unverified)});
    CHECK_FALSE(v.is_accepted());
    CHECK(v.err.code == error_code::unauthorized_signature);
    CHECK_MESSAGE(v.err.message.find("the chain reaches CA 'root' ('CN=Test Root CA,O=provisiond "
                                     "tests') of enrollment group 'by-ref', but that CA is not "
                                     "verified")
                    != std::string::npos,
                  v.err.message);
    v = pr->check_groups({byref(en::ca_reference::state::missing)});
    CHECK_FALSE(v.is_accepted());
    CHECK_MESSAGE(v.err.message.find("enrollment group 'by-ref' names CA 'root' (caReferences), "
                                     "which is not in the certificate store")
                    != std::string::npos,
                  v.err.message);
    // Parsed but never resolved against the store: admits nothing.
    auto raw = view_of(en::kind::group, "by-ref", {{"caReferences", {{"primary", "root"}}}});
    CHECK_FALSE(pr->check_groups({raw}).is_accepted());
  }
  SUBCASE("symmetric-key groups are skipped") {
    en::enrollment_view sk;
    sk.id = "sk";
    sk.attestation = en::symmetric_key_attestation{"a2V5", ""};
    auto v = pr->check_groups({sk, group("by-root", p.root)});
    CHECK(v.enrollment_group_id == "by-root");
  }
}

TEST_CASE("x509 enrollments: normalize fills info, rejects what is not a certificate") {
  const auto& p = certs();
  json doc;
  json body = {{"attestation",
                {{"type", "x509"},
                 {"x509", {{"clientCertificates", {{"primary", {{"certificate", p.leaf.pem()}}}}}}}}}};
  REQUIRE(en::normalize(en::kind::individual, "dev-1", body, nullptr, 0, doc).ok());
  const auto& info = doc["attestation"]["x509"]["clientCertificates"]["primary"]["info"];
  CHECK(info["subjectName"] == "CN=dev-1,O=provisiond tests");
  CHECK(info["issuerName"] == "CN=Test Intermediate CA,O=provisiond tests");
  CHECK(info["sha256Thumbprint"] == hex_upper(en::sha256_of(p.leaf.der())));
  CHECK(info["sha1Thumbprint"] == hex_upper(en::sha1_of(p.leaf.der())));
  CHECK(info["serialNumber"] == "0A");
  CHECK(info["version"] == 3);

  json bad = body;
  bad["attestation"]["x509"]["clientCertificates"]["primary"]["certificate"] = "MIIB";
  auto err = en::normalize(en::kind::individual, "dev-1", bad, nullptr, 0, doc);
  CHECK(err.message.find("attestation.x509.clientCertificates.primary.certificate") != std::string::npos);

  json thumb = body;
  thumb["attestation"]["x509"]["clientCertificates"]["primary"] = {{"info", {{"sha256Thumbprint", "abc"}}}};
  err = en::normalize(en::kind::individual, "dev-1", thumb, nullptr, 0, doc);
  CHECK(err.message.find("sha256Thumbprint") != std::string::npos);

  json wrong = {{"attestation",
                 {{"type", "x509"},
                  {"x509", {{"signingCertificates", {{"primary", {{"certificate", p.root.pem()}}}}}}}}}};
  err = en::normalize(en::kind::individual, "dev-1", wrong, nullptr, 0, doc);
  CHECK(err.message.find("attestation.x509.signingCertificates") != std::string::npos);

  SUBCASE("the text reader gives up on x509 documents (one source of errors)") {
    REQUIRE(en::normalize(en::kind::individual, "dev-1", body, nullptr, 0, doc).ok());
    en::enrollment_view v;
    CHECK_FALSE(en::scan_view(en::kind::individual, doc.dump(), v));
    REQUIRE(en::view_of_text(en::kind::individual, doc.dump(), v).ok());
    const auto& x = std::get<en::x509_attestation>(v.attestation);
    REQUIRE(x.client_certificates.size() == 1);
    CHECK(x.client_certificates[0].der == p.leaf.der());
  }
}

TEST_CASE("x509 certificates as enrollments carry them: PEM, base64 DER, thumbprints") {
  const auto& p = certs();
  std::string der;
  SUBCASE("PEM, with real or escaped line breaks, or none") {
    REQUIRE(en::certificate_der(p.leaf.pem(), der));
    CHECK(der == p.leaf.der());
    std::string escaped;
    for (char c : p.leaf.pem())
      escaped += c == '\n' ? std::string("\\n") : std::string(1, c);
    REQUIRE(en::certificate_der(escaped, der));
    CHECK(der == p.leaf.der());
    REQUIRE(en::certificate_der(crypto::base64_encode(p.leaf.der()), der));
    CHECK(der == p.leaf.der());
  }
  SUBCASE("not exactly one certificate") {
    CHECK_FALSE(en::certificate_der(p.leaf.pem() + p.inter.pem(), der));
    CHECK_FALSE(en::certificate_der(crypto::base64_encode(p.leaf.der() + "x"), der));
    CHECK_FALSE(en::certificate_der("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
                                    der));
    CHECK_FALSE(en::certificate_der("", der));
    CHECK_FALSE(en::certificate_der(p.leaf.key_pem(), der));
  }
  SUBCASE("thumbprints") {
    std::string raw;
    CHECK(en::thumbprint_bytes(std::string(40, 'A'), raw));
    CHECK(raw.size() == 20);
    CHECK(en::thumbprint_bytes(std::string(64, 'f'), raw));
    CHECK(raw.size() == 32);
    CHECK(en::thumbprint_bytes("AB:cd" + std::string(36, '0'), raw));
    CHECK_FALSE(en::thumbprint_bytes(std::string(41, 'a'), raw));
    CHECK_FALSE(en::thumbprint_bytes(std::string(48, 'a'), raw)); // 24 bytes: neither
    CHECK_FALSE(en::thumbprint_bytes(std::string(39, 'a') + "g", raw));
  }
  SUBCASE("names and common names") {
    CHECK(en::common_name(p.leaf.cert.get()) == "dev-1");
    CHECK(en::name_text(X509_get_issuer_name(p.leaf.cert.get()))
          == "CN=Test Intermediate CA,O=provisiond tests");
    CHECK(en::utc_text(0) == "1970-01-01T00:00:00Z");
  }
}

TEST_CASE("x509: a CRL past its nextUpdate refuses the chains it covers; parsed once or not") {
  const auto& p = certs();
  // The root's CRL (lists nothing), valid for a day from now.
  const std::string pem = test::make_crl_pem(p.root, {});
  std::unique_ptr<BIO, decltype(&BIO_free)> in(BIO_new_mem_buf(pem.data(), -1), BIO_free);
  std::unique_ptr<X509_CRL, decltype(&X509_CRL_free)> crl(
    PEM_read_bio_X509_CRL(in.get(), nullptr, nullptr, nullptr), X509_CRL_free);
  REQUIRE(crl);
  unsigned char* der = nullptr;
  const int n = i2d_X509_CRL(crl.get(), &der);
  REQUIRE(n > 0);
  const std::string crl_der(reinterpret_cast<const char*>(der), static_cast<std::size_t>(n));
  OPENSSL_free(der);
  const int64_t next_update = en::epoch_of(X509_CRL_get0_nextUpdate(crl.get()));

  for (bool parsed : {true, false}) {
    CAPTURE(parsed);
    en::ca_reference ref;
    ref.name = "crl-root";
    ref.status = en::ca_reference::state::verified;
    ref.der = p.root.der();
    ref.crls = {crl_der};
    if (parsed) {
      ref.cert = en::shared_der(ref.der);
      ref.parsed_crls = {en::shared_crl_der(crl_der)};
    }
    en::x509_attestation x;
    x.ca_references.push_back(ref);
    en::enrollment_view g;
    g.k = en::kind::group;
    g.id = "crl-group";
    g.attestation = x;
    const std::vector<en::enrollment_view> groups{g};
    auto check_at = [&](int64_t at, std::unique_ptr<proof>& pr) {
      request_facts f;
      f.id_scope = scope;
      f.registration_id = "dev-1";
      f.now_s = at;
      REQUIRE(!x509{}.open(chain({&p.leaf, &p.inter}), f, pr));
      return pr->check_groups(groups);
    };
    std::unique_ptr<proof> pr;
    auto v = check_at(now(), pr);
    REQUIRE_MESSAGE(v.is_accepted(), v.err.message);
    // A cached admission ends no later than the CRL's nextUpdate.
    CHECK(pr->valid_until() <= next_update);
    v = check_at(next_update + 60, pr);
    REQUIRE_FALSE(v.is_accepted());
    CHECK(v.err.code == error_code::unauthorized_signature);
    CHECK_MESSAGE(v.err.message.find("the CRL of 'CN=Test Root CA,O=provisiond tests' stored "
                                     "with CA 'crl-root' is stale: its nextUpdate (")
                    != std::string::npos,
                  v.err.message);
    CHECK_MESSAGE(v.err.message.find("PUT /certificates/crl-root/crl") != std::string::npos,
                  v.err.message);
  }
}

TEST_CASE("x509: the handshake's parsed certificates give the same verdicts as the DER") {
  // What a TLS listener hands over (net::peer_chain): DER and the same
  // certificates parsed; the mechanism uses the parsed ones.
  const auto& p = certs();
  auto parsed = [](std::initializer_list<const test_cert*> cs) {
    auto c = chain(cs);
    c.parsed.clear();
    for (const auto* t : cs)
      c.parsed.push_back(en::shared_der(t->der()));
    return c;
  };
  const std::vector<en::enrollment_view> groups{group("by-root", p.root)};
  for (auto cs : {std::vector<const test_cert*>{&p.leaf, &p.inter},
                  std::vector<const test_cert*>{&p.stranger},
                  std::vector<const test_cert*>{&p.leaf}}) {
    CAPTURE(cs.size());
    std::unique_ptr<proof> from_der, from_parsed;
    x509_credential d, q;
    d.from_handshake = q.from_handshake = true;
    for (const auto* t : cs) {
      d.chain_der.push_back(t->der());
      q.chain_der.push_back(t->der());
      q.parsed.push_back(t->cert);
    }
    REQUIRE(open(d, cs.front() == &p.stranger ? "dev-x" : "dev-1", from_der).ok());
    REQUIRE(open(q, cs.front() == &p.stranger ? "dev-x" : "dev-1", from_parsed).ok());
    CHECK(from_der->identity() == from_parsed->identity());
    auto a = from_der->check_groups(groups);
    auto b = from_parsed->check_groups(groups);
    CHECK(a.is_accepted() == b.is_accepted());
    CHECK(a.err.message == b.err.message);
    CHECK(a.x509_json == b.x509_json);
    CHECK(a.enrollment_group_id == b.enrollment_group_id);
    CHECK(from_der->valid_until() == from_parsed->valid_until());
  }
  // The registration id is still checked against the (parsed) leaf's CN.
  std::unique_ptr<proof> pr;
  auto err = open(parsed({&p.leaf, &p.inter}), "dev-2", pr);
  CHECK(err.code == error_code::unauthorized_signature);
  // The parsed certificates are the chain: the DER, thumbprints and identity
  // come from them, so a `chain_der` that says otherwise changes nothing.
  std::unique_ptr<proof> honest;
  REQUIRE(open(parsed({&p.leaf, &p.inter}), "dev-1", honest).ok());
  auto odd = parsed({&p.leaf, &p.inter});
  odd.chain_der = {p.leaf2.der(), "not a certificate"};
  REQUIRE(open(odd, "dev-1", pr).ok());
  CHECK(pr->identity() == honest->identity());
  CHECK(pr->check_groups(groups).is_accepted());
  auto v = pr->check_individual(individual({{"certificate", p.leaf.pem()}}));
  CHECK_MESSAGE(v.is_accepted(), v.err.message);
  v = pr->check_individual(individual({{"certificate", p.leaf2.pem()}}));
  CHECK_FALSE(v.is_accepted());
  CHECK(v.err.message.find(hex_upper(en::sha256_of(p.leaf.der()))) != std::string::npos);
  // Not even a DER list is needed (only the parsed path passes this).
  odd.chain_der.clear();
  REQUIRE(open(odd, "dev-1", pr).ok());
  CHECK(pr->identity() == honest->identity());
  // A missing (null) parsed certificate is refused, not skipped.
  auto holed = parsed({&p.leaf, &p.inter});
  holed.parsed[1] = nullptr;
  auto err2 = open(holed, "dev-1", pr);
  CHECK(err2.code == error_code::unauthorized_signature);
  CHECK(err2.message.find("certificate 1 of the presented chain") != std::string::npos);
}
