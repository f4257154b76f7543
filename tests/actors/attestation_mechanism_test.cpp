#include <doctest/doctest.h>

#include <memory>
#include <string>
#include <vector>

#include "actors/attestation/sas_token.hpp"
#include "actors/attestation/symmetric_key.hpp"
#include "messages/crypto.hpp"

using namespace prov;
using namespace prov::attestation;
namespace en = prov::enrollment;

namespace {

const std::string group_key = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==";
const std::string other_key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const std::string scope = "0ne00ABC123";
const std::string reg = "dev-1";
constexpr int64_t now = 1'700'000'000;

request_facts facts(const std::string& id = reg) {
  request_facts f;
  f.id_scope = scope;
  f.registration_id = id;
  f.now_s = now;
  return f;
}

device_credential sas_for(const std::string& key_b64, const std::string& id = reg) {
  return sas_credential{make_sas(scope + "/registrations/" + id, key_b64, now + 3600,
                                 "registration")};
}

en::enrollment_view symmetric(const std::string& id, std::string primary,
                              std::string secondary = {}, bool enabled = true) {
  en::enrollment_view v;
  v.id = id;
  v.enabled = enabled;
  v.attestation = en::symmetric_key_attestation{std::move(primary), std::move(secondary)};
  return v;
}

std::unique_ptr<proof> open_ok(const mechanism& m, const device_credential& c) {
  std::unique_ptr<proof> p;
  auto err = m.open(c, facts(), p);
  REQUIRE_MESSAGE(err.ok(), err.message);
  REQUIRE(p != nullptr);
  return p;
}

} // namespace

TEST_CASE("attestation registry: the mechanism reading a credential, and what was tried") {
  registry reg_;
  CHECK(reg_.reading(sas_credential{"x"}) == nullptr);
  reg_.add(std::make_unique<symmetric_key>(3600 * 24, 300));
  const mechanism* m = reg_.reading(sas_credential{"x"});
  REQUIRE(m != nullptr);
  CHECK(m->type() == attestation_type::symmetric_key);
  CHECK(reg_.reading(std::monostate{}) == nullptr);
  CHECK(reg_.reading(x509_credential{}) == nullptr);
  CHECK(reg_.attempted(sas_credential{"x"}) == attestation_type::symmetric_key);
  CHECK(reg_.attempted(tpm_credential{}) == attestation_type::none);
  CHECK(credential_of_authorization("").index() == 0);
  CHECK(std::get<sas_credential>(credential_of_authorization("SharedAccessSignature a")).token
        == "SharedAccessSignature a");
}

TEST_CASE("symmetric key: open checks the token on its own") {
  symmetric_key m(3600 * 24, 300);
  std::unique_ptr<proof> p;
  auto err = m.open(sas_credential{"Bearer abc"}, facts(), p);
  CHECK(err.code == error_code::unauthorized);
  CHECK(p == nullptr);
  // Signed for another device: the resource check, before any key.
  err = m.open(sas_for(other_key, "dev-2"), facts(), p);
  CHECK(err.code == error_code::unauthorized_signature);
  CHECK(err.message.find("does not name") != std::string::npos);
  // Expired.
  auto old = sas_credential{make_sas(scope + "/registrations/" + reg, other_key, now - 3600,
                                     "registration")};
  err = m.open(old, facts(), p);
  CHECK(err.code == error_code::unauthorized_signature);
  // A good one: the cache identity is the exact token, valid until its expiry.
  auto good = sas_for(other_key);
  auto ok = open_ok(m, good);
  CHECK(ok->identity() == std::get<sas_credential>(good).token);
  CHECK(ok->valid_until() == now + 3600);
}

TEST_CASE("symmetric key: individual enrollment, primary or secondary key") {
  symmetric_key m(3600 * 24, 300);
  auto p = open_ok(m, sas_for(other_key));
  auto v = p->check_individual(symmetric(reg, other_key));
  CHECK(v.is_accepted());
  CHECK(v.type == attestation_type::symmetric_key);
  CHECK(v.enrollment_group_id.empty());
  CHECK(v.key_used == "primary");
  CHECK(p->check_individual(symmetric(reg, group_key, other_key, false)).is_accepted());
  CHECK(p->check_individual(symmetric(reg, group_key, other_key)).key_used == "secondary");
  CHECK_FALSE(p->check_individual(symmetric(reg, group_key, other_key, false)).enabled);
  auto bad = p->check_individual(symmetric(reg, group_key));
  CHECK(bad.result == verdict::outcome::rejected);
  CHECK(bad.err.code == error_code::unauthorized_signature);
  CHECK(bad.err.message.find("signature mismatch") == 0);
}

TEST_CASE("symmetric key: groups derive the device key; other types are skipped") {
  symmetric_key m(3600 * 24, 300);
  const auto device_key = crypto::derive_device_key(group_key, reg);
  REQUIRE(device_key.has_value());
  auto p = open_ok(m, sas_for(*device_key));
  en::enrollment_view x509;
  x509.id = "certs";
  x509.attestation = en::x509_attestation{};
  std::vector<en::enrollment_view> groups = {x509, symmetric("g-other", other_key),
                                             symmetric("g-right", other_key, group_key, false)};
  auto v = p->check_groups(groups);
  REQUIRE(v.is_accepted());
  CHECK(v.enrollment_group_id == "g-right");
  CHECK_FALSE(v.enabled);
  CHECK(v.key_used == "secondary"); // g-right's secondary key is the group key
  CHECK(p->check_groups({symmetric("g-first", group_key, other_key)}).key_used == "primary");
  groups.pop_back();
  auto none = p->check_groups(groups);
  CHECK(none.result == verdict::outcome::rejected);
  CHECK(none.err.message.find("no enrollment matches") == 0);
}
