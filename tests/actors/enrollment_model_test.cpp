#include <doctest/doctest.h>

#include <string>

#include <nlohmann/json.hpp>
#include <openssl/evp.h>

#include "actors/enrollment/enrollment_model.hpp"
#include "messages/crypto.hpp"
#include "messages/registration.hpp"

using nlohmann::json;
namespace en = prov::enrollment;
using prov::error_code;

namespace {

constexpr int64_t t0 = 1764158400123; // 2025-11-26T12:00:00.123Z
constexpr int64_t t1 = t0 + 60000;

// base64 of 32, 16, 15, 64 and 65 bytes.
const std::string key32 = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
/// An RSA-2048 EK made by swtpm (tpm2_createek -G rsa), base64 TPM2B_PUBLIC.
const std::string tpm_ek =
  "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAxmrFUdoY1MPm0Rpo"
  "gThkG6Geb31LV3sxI0bjsO3+nwsjfyRhcz55/JkJYdTg0wW5/X/00itnngirrF3G9IpUsjm0goeY5awie0Dmvb4xD5ajTzGc"
  "nTrQqbbHqG1DucxbBdPVZYu1fZKVDLIoDpPxbwFnFpdmId4zkHz55Ko78OLDfq3RzNDLBwsvo1wEhTHdOhbTknLVPrw1ghAe"
  "efgQoVKhznEzCjb8MpsqXkx4p9cbZlfb9+3RoRrkyfvQaORvYqBk1JbkmE2GulFUH6Fs5FPfqqZu4BTjDIxSYndinkM+LKgT"
  "WsM0GvUilF2zn/FoWypQ+UmW/z0dRuEEJsQzIQ==";
const std::string key16 = "MDEyMzQ1Njc4OWFiY2RlZg==";
const std::string key15 = "MDEyMzQ1Njc4OWFiY2Rl";
const std::string key64 = std::string(84, 'A') + "AQ==";

/// The view's symmetric keys; empty ones for another attestation type.
en::symmetric_key_attestation keys_of(const en::enrollment_view& v) {
  const auto* k = std::get_if<en::symmetric_key_attestation>(&v.attestation);
  return k != nullptr ? *k : en::symmetric_key_attestation{};
}
const std::string key65 = std::string(84, 'A') + "AAE=";

/// Decoded size of base64 (EVP_DecodeBlock pads to 3-byte groups).
std::size_t decoded_size(const std::string& b64) {
  std::string out(b64.size(), '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(b64.data()),
                          static_cast<int>(b64.size()));
  REQUIRE(n >= 0);
  std::size_t pad = 0;
  if (!b64.empty() && b64.back() == '=')
    pad = b64[b64.size() - 2] == '=' ? 2 : 1;
  return static_cast<std::size_t>(n) - pad;
}

json individual_body() {
  return {{"registrationId", "dev-01"},
          {"attestation",
           {{"type", "symmetricKey"},
            {"symmetricKey", {{"primaryKey", key32}, {"secondaryKey", key16}}}}},
          {"deviceId", "device.01"},
          {"provisioningStatus", "enabled"},
          {"allocationPolicy", "hashed"},
          {"iotHubs", {"hub1.example.net", "hub2.example.net"}},
          {"reprovisionPolicy", {{"updateHubAssignment", true}, {"migrateDeviceData", false}}},
          {"capabilities", {{"iotEdge", true}}},
          {"initialTwin",
           {{"tags", {{"site", "a"}}}, {"properties", {{"desired", {{"interval", 5}}}}}}},
          {"optionalDeviceInformation", {{"model", "x"}}}};
}

json group_body() {
  return {{"enrollmentGroupId", "Group-A"},
          {"attestation",
           {{"type", "x509"},
            {"x509", {{"caReferences", {{"primary", "my-root-ca"}}}}}}},
          {"allocationPolicy", "static"},
          {"iotHubs", {"hub1.example.net"}}};
}

prov::error norm(en::kind k, std::string_view id, const json& body, json& out,
                 const json* existing = nullptr, int64_t now = t0) {
  return en::normalize(k, id, body, existing, now, out);
}

/// Asserts `body` is rejected with `code` and a message mentioning `member`.
void expect_reject(en::kind k, std::string_view id, const json& body, error_code code,
                   const std::string& member) {
  json out = "untouched";
  auto e = norm(k, id, body, out);
  CHECK_MESSAGE(e.code == code, e.message);
  CHECK_MESSAGE(e.message.find(member) != std::string::npos, e.message);
  CHECK(out == "untouched"); // output left alone on failure
}

void expect_individual_reject(const json& body, const std::string& member,
                              error_code code = error_code::invalid_enrollment) {
  expect_reject(en::kind::individual, "dev-01", body, code, member);
}

} // namespace

TEST_CASE("enrollment: valid individual enrollment round-trips") {
  json doc;
  auto e = norm(en::kind::individual, "dev-01", individual_body(), doc);
  REQUIRE_MESSAGE(e.ok(), e.message);

  CHECK(doc["registrationId"] == "dev-01");
  CHECK(doc["attestation"]["symmetricKey"]["primaryKey"] == key32);
  CHECK(doc["attestation"]["symmetricKey"]["secondaryKey"] == key16);
  CHECK(doc["createdDateTimeUtc"] == "2025-11-26T12:00:00.1230000Z");
  CHECK(doc["lastUpdatedDateTimeUtc"] == doc["createdDateTimeUtc"]);
  CHECK(doc["etag"].get<std::string>().size() == 38); // quoted UUID
  CHECK(doc["optionalDeviceInformation"] == json{{"model", "x"}});

  en::enrollment_view v;
  REQUIRE(en::view_of(en::kind::individual, doc, v).ok());
  CHECK(v.k == en::kind::individual);
  CHECK(v.id == "dev-01");
  CHECK(type_of(v.attestation) == prov::attestation_type::symmetric_key);
  CHECK(keys_of(v).primary_key == key32);
  CHECK(keys_of(v).secondary_key == key16);
  CHECK(v.device_id == "device.01");
  CHECK(v.enabled);
  CHECK(v.allocation == prov::allocation_policy::hashed);
  CHECK(v.iot_hubs == std::vector<std::string>{"hub1.example.net", "hub2.example.net"});
  CHECK(json::parse(v.initial_twin_json) == individual_body()["initialTwin"]);
  CHECK(v.iot_edge);
  CHECK(v.update_hub_assignment);
  CHECK_FALSE(v.migrate_device_data);
  CHECK(v.etag == doc["etag"]);

  // Normalizing the stored document again (as a client echoing it) is stable.
  json again;
  REQUIRE(norm(en::kind::individual, "dev-01", doc, again, &doc, t1).ok());
  again.erase("etag");
  again.erase("lastUpdatedDateTimeUtc");
  json d2 = doc;
  d2.erase("etag");
  d2.erase("lastUpdatedDateTimeUtc");
  CHECK(again == d2);
}

TEST_CASE("enrollment: valid group round-trips with defaults stored explicitly") {
  json doc;
  auto e = norm(en::kind::group, "group-a", group_body(), doc);
  REQUIRE_MESSAGE(e.ok(), e.message);
  CHECK(doc["enrollmentGroupId"] == "Group-A"); // body spelling kept
  CHECK(doc["provisioningStatus"] == "enabled");
  CHECK(doc["reprovisionPolicy"] ==
        json{{"updateHubAssignment", true}, {"migrateDeviceData", true}});
  CHECK(doc["capabilities"] == json{{"iotEdge", false}});
  CHECK(doc["attestation"] == group_body()["attestation"]);
  CHECK_FALSE(doc.contains("initialTwin"));

  en::enrollment_view v;
  REQUIRE(en::view_of(en::kind::group, doc, v).ok());
  CHECK(v.k == en::kind::group);
  CHECK(v.id == "Group-A");
  CHECK(type_of(v.attestation) == prov::attestation_type::x509);
  CHECK(keys_of(v).primary_key.empty());
  CHECK(v.allocation == prov::allocation_policy::static_hub);
  CHECK(v.iot_hubs == std::vector<std::string>{"hub1.example.net"});
  CHECK(v.initial_twin_json.empty());
  CHECK_FALSE(v.iot_edge);
  CHECK(v.update_hub_assignment);
  CHECK(v.migrate_device_data);
  CHECK(en::key_of(v.id) == "group-a");
}

TEST_CASE("enrollment: minimal bodies, id from the path, view defaults") {
  json doc;
  REQUIRE(norm(en::kind::individual, "Dev-X", {{"attestation", {{"type", "none"}}}}, doc).ok());
  CHECK(doc["registrationId"] == "Dev-X");
  CHECK(doc["attestation"] == json{{"type", "none"}});
  CHECK_FALSE(doc.contains("allocationPolicy"));

  en::enrollment_view v;
  REQUIRE(en::view_of(en::kind::individual, doc, v).ok());
  CHECK_FALSE(v.allocation.has_value());
  CHECK(v.iot_hubs.empty());
  CHECK(v.device_id.empty());
  CHECK(v.initial_twin_json.empty());

  // TPM individual.
  json tpm = {{"attestation", {{"type", "tpm"}, {"tpm", {{"endorsementKey", tpm_ek}}}}}};
  REQUIRE(norm(en::kind::individual, "tpm-dev", tpm, doc).ok());
  CHECK(doc["attestation"]["tpm"]["endorsementKey"] == tpm_ek);

  // Explicit nulls are treated as absent.
  json nulls = {{"attestation", {{"type", "symmetricKey"}, {"x509", nullptr}}},
                {"iotHubs", nullptr}, {"initialTwin", nullptr}, {"deviceId", nullptr}};
  REQUIRE(norm(en::kind::individual, "n1", nulls, doc).ok());
  CHECK_FALSE(doc.contains("iotHubs"));
  CHECK_FALSE(doc["attestation"].contains("x509"));
}

TEST_CASE("enrollment: symmetric keys are generated when omitted") {
  json body = {{"enrollmentGroupId", "g1"}, {"attestation", {{"type", "symmetricKey"}}}};
  json doc;
  REQUIRE(norm(en::kind::group, "g1", body, doc).ok());
  const auto p = doc["attestation"]["symmetricKey"]["primaryKey"].get<std::string>();
  const auto s = doc["attestation"]["symmetricKey"]["secondaryKey"].get<std::string>();
  CHECK(decoded_size(p) == 64);
  CHECK(decoded_size(s) == 64);
  CHECK(p != s);

  // Only the missing one is generated; "" counts as missing.
  body["attestation"]["symmetricKey"] = {{"primaryKey", key16}, {"secondaryKey", ""}};
  REQUIRE(norm(en::kind::group, "g1", body, doc).ok());
  CHECK(doc["attestation"]["symmetricKey"]["primaryKey"] == key16);
  CHECK(decoded_size(doc["attestation"]["symmetricKey"]["secondaryKey"]) == 64);

  // On replace, omitted keys keep the stored ones (GET strips keys).
  json replaced;
  json stripped = en::public_document(doc);
  REQUIRE(norm(en::kind::group, "g1", stripped, replaced, &doc, t1).ok());
  CHECK(replaced["attestation"] == doc["attestation"]);

  // Case-insensitive type name, canonical spelling stored.
  json lower_type = {{"attestation", {{"type", "SYMMETRICKEY"}}}};
  REQUIRE(norm(en::kind::group, "g1", lower_type, doc).ok());
  CHECK(doc["attestation"]["type"] == "symmetricKey");
}

TEST_CASE("enrollment: created preserved on replace, etag and lastUpdated change") {
  json first;
  REQUIRE(norm(en::kind::individual, "dev-01", individual_body(), first).ok());
  json body = individual_body();
  body["provisioningStatus"] = "Disabled";
  body["createdDateTimeUtc"] = "2000-01-01T00:00:00Z"; // read-only: ignored
  body["etag"] = "\"client\"";
  body["registrationState"] = {{"status", "assigned"}};
  json second;
  REQUIRE(norm(en::kind::individual, "dev-01", body, second, &first, t1).ok());
  CHECK(second["createdDateTimeUtc"] == first["createdDateTimeUtc"]);
  CHECK(second["lastUpdatedDateTimeUtc"] == "2025-11-26T12:01:00.1230000Z");
  CHECK(second["etag"] != first["etag"]);
  CHECK(second["etag"] != "\"client\"");
  CHECK(second["provisioningStatus"] == "disabled");
  CHECK_FALSE(second.contains("registrationState"));

  en::enrollment_view v;
  REQUIRE(en::view_of(en::kind::individual, second, v).ok());
  CHECK_FALSE(v.enabled);
}

TEST_CASE("enrollment: id matching is case-insensitive, mismatches rejected") {
  json body = individual_body();
  body["registrationId"] = "DEV-01";
  json doc;
  REQUIRE(norm(en::kind::individual, "dev-01", body, doc).ok());
  CHECK(doc["registrationId"] == "DEV-01");
  CHECK(en::key_of("DEV-01") == en::key_of("dev-01"));

  body["registrationId"] = "dev-02";
  expect_individual_reject(body, "registrationId", error_code::id_mismatch);

  json g = group_body();
  g["enrollmentGroupId"] = "other";
  expect_reject(en::kind::group, "Group-A", g, error_code::id_mismatch, "enrollmentGroupId");

  // Invalid id in the path with no body id.
  json nobody = individual_body();
  nobody.erase("registrationId");
  expect_reject(en::kind::individual, "bad id", nobody, error_code::invalid_enrollment,
                "registrationId");
  expect_reject(en::kind::group, "../x", {{"attestation", {{"type", "x509"}}}},
                error_code::invalid_enrollment, "enrollmentGroupId");
}

TEST_CASE("enrollment: invalid bodies name the offending member") {
  auto with = [](const char* key, json value) {
    json b = individual_body();
    b[key] = std::move(value);
    return b;
  };
  auto with_att = [](json att) {
    json b = individual_body();
    b["attestation"] = std::move(att);
    return b;
  };

  SUBCASE("body shape") {
    expect_individual_reject(json::array(), "body");
    expect_individual_reject("text", "body");
    expect_individual_reject(with("surprise", 1), "surprise: unknown member");
    expect_individual_reject(with("trustBundleId", "x"), "trustBundleId");
    expect_individual_reject(with("registrationId", 5), "registrationId");
  }
  SUBCASE("attestation") {
    json b = individual_body();
    b.erase("attestation");
    expect_individual_reject(b, "attestation: required");
    expect_individual_reject(with_att("x"), "attestation");
    expect_individual_reject(with_att({{"symmetricKey", json::object()}}), "attestation.type");
    expect_individual_reject(with_att({{"type", "psk"}}), "attestation.type");
    expect_individual_reject(with_att({{"type", 3}}), "attestation.type");
    expect_individual_reject(with_att({{"type", "none"}, {"extra", 1}}), "attestation.extra");
    expect_individual_reject(
        with_att({{"type", "symmetricKey"}, {"x509", {{"caReferences", {{"primary", "a"}}}}}}),
        "attestation.x509");
  }
  SUBCASE("symmetric keys") {
    expect_individual_reject(with_att({{"type", "symmetricKey"}, {"symmetricKey", 1}}),
                             "attestation.symmetricKey");
    for (const std::string& bad : {key15, key65, std::string("not base64!"),
                                  std::string("MDEyMzQ1Njc4OWFiY2RlZg"), key32 + " "}) {
      CAPTURE(bad);
      expect_individual_reject(
          with_att({{"type", "symmetricKey"}, {"symmetricKey", {{"primaryKey", bad}}}}),
          "attestation.symmetricKey.primaryKey: must be base64 of 16..64 bytes");
    }
    expect_individual_reject(
        with_att({{"type", "symmetricKey"}, {"symmetricKey", {{"secondaryKey", 7}}}}),
        "attestation.symmetricKey.secondaryKey");
    expect_individual_reject(
        with_att({{"type", "symmetricKey"}, {"symmetricKey", {{"tertiaryKey", key32}}}}),
        "attestation.symmetricKey.tertiaryKey");
  }
  SUBCASE("key size bounds") {
    json ok;
    CHECK(norm(en::kind::individual, "dev-01",
               with_att({{"type", "symmetricKey"}, {"symmetricKey", {{"primaryKey", key64}}}}), ok)
              .ok());
    CHECK(decoded_size(key64) == 64);
    CHECK(decoded_size(key65) == 65);
    CHECK(decoded_size(key15) == 15);
  }
  SUBCASE("tpm") {
    expect_individual_reject(with_att({{"type", "tpm"}}), "attestation.tpm");
    expect_individual_reject(with_att({{"type", "tpm"}, {"tpm", json::object()}}),
                             "attestation.tpm.endorsementKey");
    expect_individual_reject(with_att({{"type", "tpm"}, {"tpm", {{"endorsementKey", "%%"}}}}),
                             "attestation.tpm.endorsementKey: must be base64");
    expect_individual_reject(
        with_att({{"type", "tpm"}, {"tpm", {{"endorsementKey", tpm_ek}, {"storageRootKey", 1}}}}),
        "attestation.tpm.storageRootKey");
    // Key bytes that are not a usable RSA-2048 TPM2B_PUBLIC: the reason.
    expect_individual_reject(with_att({{"type", "tpm"}, {"tpm", {{"endorsementKey", key32}}}}),
                             "attestation.tpm.endorsementKey: the key: TPM2B_PUBLIC size field");
    auto ecc = prov::crypto::base64_decode(tpm_ek).value();
    ecc[3] = 0x23; // TPM_ALG_ECC
    expect_individual_reject(
        with_att({{"type", "tpm"}, {"tpm", {{"endorsementKey", prov::crypto::base64_encode(ecc)}}}}),
        "attestation.tpm.endorsementKey: the key is an ECC key: only RSA 2048 keys are supported");
    expect_individual_reject(
        with_att({{"type", "tpm"},
                  {"tpm", {{"endorsementKey", tpm_ek},
                           {"storageRootKey", prov::crypto::base64_encode(ecc.substr(0, 100))}}}}),
        "attestation.tpm.storageRootKey: the key: TPM2B_PUBLIC size field says 314 bytes but 98 follow");
  }
  SUBCASE("x509") {
    expect_individual_reject(with_att({{"type", "x509"}}), "attestation.x509");
    expect_individual_reject(with_att({{"type", "x509"}, {"x509", json::object()}}),
                             "attestation.x509: needs");
    expect_individual_reject(
        with_att({{"type", "x509"}, {"x509", {{"clientCertificates", json::object()}}}}),
        "attestation.x509: needs");
    expect_individual_reject(
        with_att({{"type", "x509"}, {"x509", {{"clientCertificates", {{"primary", "pem"}}}}}}),
        "attestation.x509.clientCertificates.primary");
    expect_individual_reject(
        with_att({{"type", "x509"},
                  {"x509", {{"clientCertificates", {{"primary", {{"certificate", 1}}}}}}}}),
        "attestation.x509.clientCertificates.primary.certificate");
    expect_individual_reject(
        with_att({{"type", "x509"}, {"x509", {{"caReferences", {{"primary", 1}}}}}}),
        "attestation.x509.caReferences.primary");
    // A certificate slot is enough, but it must hold a certificate
    // (tests/actors/x509_test.cpp has the accepted forms).
    expect_individual_reject(
        with_att({{"type", "x509"},
                  {"x509", {{"clientCertificates", {{"secondary", {{"certificate", "MIIB"}}}}}}}}),
        "attestation.x509.clientCertificates.secondary.certificate: is not an X.509 certificate");
    json thumb = {{"info", {{"sha1Thumbprint", std::string(40, 'a')}}}};
    json x509 = {{"clientCertificates", {{"secondary", thumb}}}};
    json ok;
    CHECK(norm(en::kind::individual, "dev-01", with_att({{"type", "x509"}, {"x509", x509}}), ok)
              .ok());
  }
  SUBCASE("group attestation types") {
    json g = group_body();
    g["attestation"] = {{"type", "tpm"}, {"tpm", {{"endorsementKey", tpm_ek}}}};
    expect_reject(en::kind::group, "Group-A", g, error_code::invalid_enrollment,
                  "attestation.type");
    g["attestation"] = {{"type", "none"}};
    expect_reject(en::kind::group, "Group-A", g, error_code::invalid_enrollment,
                  "attestation.type");
    json g2 = group_body();
    g2["deviceId"] = "d";
    expect_reject(en::kind::group, "Group-A", g2, error_code::invalid_enrollment,
                  "deviceId: unknown member");
  }
  SUBCASE("status, policy, hubs") {
    expect_individual_reject(with("provisioningStatus", "paused"), "provisioningStatus");
    expect_individual_reject(with("provisioningStatus", true), "provisioningStatus");
    expect_individual_reject(with("allocationPolicy", "random"), "allocationPolicy");
    expect_individual_reject(with("allocationPolicy", 1), "allocationPolicy");
    expect_individual_reject(with("iotHubs", "hub1"), "iotHubs");
    expect_individual_reject(with("iotHubs", {"hub1", 2}), "iotHubs[1]");
    expect_individual_reject(with("iotHubs", {""}), "iotHubs[0]");
    expect_individual_reject(with("iotHubHostName", 1), "iotHubHostName");
    json s = with("allocationPolicy", "static");
    expect_individual_reject(s, "iotHubs: allocationPolicy static");
    s.erase("iotHubs");
    expect_individual_reject(s, "iotHubs");
  }
  SUBCASE("custom allocation") {
    json c = with("allocationPolicy", "custom");
    expect_individual_reject(c, "customAllocationDefinition",
                             error_code::custom_allocation_required);
    c["customAllocationDefinition"] = {{"webhookUrl", "https://fn.example.net/api/x"}};
    expect_individual_reject(c, "customAllocationDefinition.apiVersion",
                             error_code::custom_allocation_required);
    c["customAllocationDefinition"] = {{"webhookUrl", "http://fn.example.net/api/x"},
                                       {"apiVersion", "2021-10-01"}};
    expect_individual_reject(c, "customAllocationDefinition.webhookUrl");
    c["customAllocationDefinition"]["webhookUrl"] = "https://user:pw@fn.example.net/";
    expect_individual_reject(c, "customAllocationDefinition.webhookUrl");
    c["customAllocationDefinition"]["webhookUrl"] = "https://";
    expect_individual_reject(c, "customAllocationDefinition.webhookUrl");
    c["customAllocationDefinition"]["webhookUrl"] = 5;
    expect_individual_reject(c, "customAllocationDefinition.webhookUrl");
    c["customAllocationDefinition"] = "https://fn.example.net";
    expect_individual_reject(c, "customAllocationDefinition");
    c["customAllocationDefinition"] = {{"webhookUrl", "https://fn.example.net/api/x?code=abc"},
                                       {"apiVersion", "2021-10-01"}};
    json ok;
    REQUIRE(norm(en::kind::individual, "dev-01", c, ok).ok());
    CHECK(ok["allocationPolicy"] == "custom");
    CHECK(ok["customAllocationDefinition"] == c["customAllocationDefinition"]);
  }
  SUBCASE("reprovision, capabilities, twin, device info, deviceId") {
    expect_individual_reject(with("reprovisionPolicy", true), "reprovisionPolicy");
    expect_individual_reject(with("reprovisionPolicy", {{"updateHubAssignment", "yes"}}),
                             "reprovisionPolicy.updateHubAssignment");
    expect_individual_reject(with("reprovisionPolicy", {{"migrateDeviceData", 0}}),
                             "reprovisionPolicy.migrateDeviceData");
    expect_individual_reject(with("capabilities", {{"iotEdge", "true"}}), "capabilities.iotEdge");
    expect_individual_reject(with("capabilities", {{"gpu", true}}), "capabilities.gpu");
    expect_individual_reject(with("initialTwin", json::array()), "initialTwin");
    expect_individual_reject(with("initialTwin", {{"tags", 1}}), "initialTwin.tags");
    expect_individual_reject(with("initialTwin", {{"properties", {{"desired", "x"}}}}),
                             "initialTwin.properties.desired");
    expect_individual_reject(with("initialTwin", {{"properties", {{"reported", {}}}}}),
                             "initialTwin.properties.reported");
    expect_individual_reject(with("optionalDeviceInformation", "x"), "optionalDeviceInformation");
    expect_individual_reject(with("deviceId", ""), "deviceId");
    expect_individual_reject(with("deviceId", std::string(129, 'd')), "deviceId");
    expect_individual_reject(with("deviceId", "a/b"), "deviceId");
    expect_individual_reject(with("deviceId", 12), "deviceId");
  }
}

TEST_CASE("enrollment: allocation policy spellings are canonicalized") {
  for (auto [in, want] : {std::pair{"geolatency", "geoLatency"}, std::pair{"GEOLATENCY", "geoLatency"},
                          std::pair{"Hashed", "hashed"}, std::pair{"geoLatency", "geoLatency"}}) {
    CAPTURE(in);
    json body = individual_body();
    body["allocationPolicy"] = in;
    json doc;
    REQUIRE(norm(en::kind::individual, "dev-01", body, doc).ok());
    CHECK(doc["allocationPolicy"] == want);
  }
}

TEST_CASE("enrollment: public_document strips keys, attestation_mechanism keeps them") {
  json doc;
  REQUIRE(norm(en::kind::individual, "dev-01", individual_body(), doc).ok());
  json pub = en::public_document(doc);
  CHECK(pub["attestation"]["type"] == "symmetricKey");
  CHECK(pub["attestation"]["symmetricKey"] == json::object());
  CHECK(pub.dump().find(key32) == std::string::npos);
  json rest = pub, rest_doc = doc;
  rest.erase("attestation");
  rest_doc.erase("attestation");
  CHECK(rest == rest_doc);
  CHECK(doc["attestation"]["symmetricKey"]["primaryKey"] == key32); // source untouched

  json mech = en::attestation_mechanism(doc);
  CHECK(mech["symmetricKey"]["primaryKey"] == key32);
  CHECK(mech["symmetricKey"]["secondaryKey"] == key16);

  json x;
  REQUIRE(norm(en::kind::group, "Group-A", group_body(), x).ok());
  CHECK(en::public_document(x) == x); // nothing secret in x509
  CHECK(en::attestation_mechanism(json::object()) == json::object());
  CHECK(en::public_document(json("odd")) == json("odd"));
}

TEST_CASE("enrollment: etag_matches") {
  const std::string stored = en::new_etag();
  REQUIRE(stored.size() == 38);
  CHECK(stored.front() == '"');
  CHECK(stored.back() == '"');
  CHECK(stored[15] == '4'); // UUID v4 in quotes
  CHECK(en::new_etag() != stored);
  const std::string bare = stored.substr(1, stored.size() - 2);

  CHECK(en::etag_matches("*", stored));
  CHECK(en::etag_matches(" * ", "\"anything\""));
  CHECK(en::etag_matches(stored, stored));
  CHECK(en::etag_matches(bare, stored));
  CHECK(en::etag_matches("W/" + stored, stored));
  CHECK(en::etag_matches("\"other\", " + stored, stored));
  CHECK(en::etag_matches(stored, bare));
  CHECK_FALSE(en::etag_matches("\"other\"", stored));
  CHECK_FALSE(en::etag_matches("", stored));
  CHECK_FALSE(en::etag_matches("\"\"", "\"\""));
  CHECK_FALSE(en::etag_matches(bare.substr(1), stored));
  CHECK_FALSE(en::etag_matches("\"ABC\"", "\"abc\"")); // opaque: case-sensitive
}

TEST_CASE("enrollment: timestamps (utc_string)") {
  CHECK(prov::utc_string(0) == "1970-01-01T00:00:00.0000000Z");
  CHECK(prov::utc_string(t0) == "2025-11-26T12:00:00.1230000Z");
  CHECK(prov::utc_string(951782400999) == "2000-02-29T00:00:00.9990000Z"); // leap day
  CHECK(prov::utc_string(-1) == "1969-12-31T23:59:59.9990000Z");
  CHECK(prov::utc_string(INT64_MAX) == "9999-12-31T23:59:59.9990000Z"); // clamped
}

TEST_CASE("enrollment: registration and group id rules") {
  CHECK(en::valid_registration_id("a"));
  CHECK(en::valid_registration_id("dev-01.site_a:x"));
  CHECK(en::valid_registration_id("device-")); // trailing '-' allowed
  CHECK(en::valid_registration_id(std::string(128, 'a')));
  CHECK_FALSE(en::valid_registration_id(std::string(129, 'a')));
  CHECK_FALSE(en::valid_registration_id(""));
  CHECK_FALSE(en::valid_registration_id("device."));
  CHECK_FALSE(en::valid_registration_id("device_"));
  CHECK_FALSE(en::valid_registration_id("-device"));
  CHECK_FALSE(en::valid_registration_id(".device"));
  CHECK_FALSE(en::valid_registration_id("../x"));
  CHECK_FALSE(en::valid_registration_id("a/b"));
  CHECK_FALSE(en::valid_registration_id("a b"));
  CHECK_FALSE(en::valid_registration_id("d\xc3\xa9vice")); // "dévice"
  CHECK_FALSE(en::valid_registration_id(std::string_view("a\0b", 3)));
  CHECK(en::valid_group_id("Group-A"));
  CHECK_FALSE(en::valid_group_id("group."));
  CHECK_FALSE(en::valid_group_id(std::string(129, 'g')));
  CHECK(en::key_of("Dev-01.A") == "dev-01.a");
}

TEST_CASE("enrollment: view_of rejects malformed stored documents without throwing") {
  en::enrollment_view v;
  CHECK(en::view_of(en::kind::individual, json("x"), v).code == error_code::internal);
  CHECK(en::view_of(en::kind::individual, json::object(), v).code == error_code::internal);
  json doc = {{"registrationId", "d"}, {"attestation", {{"type", "none"}}}, {"iotHubs", "h"}};
  CHECK(en::view_of(en::kind::individual, doc, v).code == error_code::internal);
  doc["iotHubs"] = {"h"};
  doc["initialTwin"] = {{"tags", {{"bad", "\xff"}}}}; // invalid UTF-8 must not throw
  REQUIRE(en::view_of(en::kind::individual, doc, v).ok());
  CHECK_FALSE(v.initial_twin_json.empty());
}

namespace {

bool same_view(const en::enrollment_view& a, const en::enrollment_view& b) {
  return a.k == b.k && a.id == b.id && a.attestation == b.attestation
         && a.device_id == b.device_id && a.enabled == b.enabled
         && a.allocation == b.allocation && a.iot_hubs == b.iot_hubs
         && a.initial_twin_json == b.initial_twin_json && a.iot_edge == b.iot_edge
         && a.update_hub_assignment == b.update_hub_assignment
         && a.migrate_device_data == b.migrate_device_data && a.etag == b.etag;
}

/// The tree path's answer for `text`: ok and a view, or not.
bool tree_view(en::kind k, const std::string& text, en::enrollment_view& out) {
  auto j = json::parse(text, nullptr, false);
  return !j.is_discarded() && en::view_of(k, j, out).ok();
}

json stored_individual() {
  json body = individual_body();
  body.erase("initialTwin");
  json doc;
  REQUIRE(norm(en::kind::individual, "dev-01", body, doc).ok());
  return doc;
}

} // namespace

TEST_CASE("enrollment: view_of_text reads plain stored documents without a tree, as view_of") {
  json ind = stored_individual();
  json grp;
  json gbody = group_body();
  gbody["attestation"] = {{"type", "symmetricKey"}};
  gbody["provisioningStatus"] = "disabled";
  REQUIRE(norm(en::kind::group, "Group-A", gbody, grp).ok());
  for (auto [k, doc] : {std::pair{en::kind::individual, ind}, std::pair{en::kind::group, grp}}) {
    for (int indent : {-1, 2}) {
      std::string text = doc.dump(indent);
      en::enrollment_view fast, tree, both;
      CAPTURE(text);
      REQUIRE(en::scan_view(k, text, fast));
      REQUIRE(tree_view(k, text, tree));
      CHECK(same_view(fast, tree));
      REQUIRE(en::view_of_text(k, text, both).ok());
      CHECK(same_view(both, tree));
    }
  }
  en::enrollment_view v;
  REQUIRE(en::scan_view(en::kind::individual, ind.dump(), v));
  CHECK(v.id == "dev-01");
  CHECK(keys_of(v).primary_key == key32);
  CHECK(keys_of(v).secondary_key == key16);
  CHECK(v.device_id == "device.01");
  CHECK(v.iot_hubs == std::vector<std::string>{"hub1.example.net", "hub2.example.net"});
  CHECK(v.iot_edge);
  CHECK_FALSE(v.migrate_device_data);
  CHECK(v.etag.size() == 38); // the quotes were \" escapes in the text
  CHECK(v.etag.front() == '"');
}

TEST_CASE("enrollment: view_of_text leaves what it is unsure of to the tree") {
  auto k = en::kind::individual;
  en::enrollment_view v;
  auto tree_only = [&](const std::string& text) {
    CAPTURE(text);
    CHECK_FALSE(en::scan_view(k, text, v));
  };
  tree_only(individual_body().dump());                        // initialTwin
  tree_only(R"({"registrationId":"d","attestation":{"type":"none"},"etag":"\u0041"})");
  tree_only(R"({"registrationId":"d","registrationId":"e","attestation":{}})"); // duplicate
  tree_only(R"({"registrationId":"d","attestation":{"type":"none"},"iotHubs":"h"})");
  tree_only(R"({"registrationId":"d","attestation":{"type":1}})");
  tree_only(R"({"registrationId":"d"})");                       // no attestation
  tree_only(R"({"registrationId":"","attestation":{}})");
  tree_only(R"({"registrationId":"d","attestation":{}} x)");    // trailing bytes
  tree_only("{\"registrationId\":\"d\xff\",\"attestation\":{}}"); // invalid UTF-8
  tree_only("{\"registrationId\":\"d\x01\",\"attestation\":{}}"); // control character
  tree_only(R"({"registrationId":"d","attestation":{},"x":01})");
  tree_only(R"({"registrationId":"d","attestation":{},"x":[1,]})");
  tree_only(std::string(40, '[') + std::string(40, ']'));
  // Numbers nlohmann rejects because they overflow a double.
  for (const std::string& n : std::vector<std::string>{"1e400", "-1e400", "1E+309", std::string(400, '7'),
                              "1e99999"}) {
    auto text = R"({"registrationId":"d","attestation":{"type":"none"},"x":)" + n + "}";
    tree_only(text);
    CHECK(en::view_of_text(k, text, v).code == error_code::storage_failure);
  }
  // Large but finite, and underflow (to 0, which nlohmann accepts): read.
  for (const std::string& n :
       std::vector<std::string>{"1e298", std::string(299, '7'), "1e-400", "-0.0e0", "123.456E-7"}) {
    auto text = R"({"registrationId":"d","attestation":{"type":"none"},"x":[)" + n + "]}";
    CAPTURE(text);
    en::enrollment_view fast, tree;
    CHECK(en::scan_view(k, text, fast));
    REQUIRE(tree_view(k, text, tree));
    CHECK(same_view(fast, tree));
  }

  // The answers stay those of the tree path.
  CHECK(en::view_of_text(k, "not json", v).code == error_code::storage_failure);
  CHECK(en::view_of_text(k, R"({"registrationId":"d","attestation":{"type":1}})", v).code
        == error_code::internal);
  REQUIRE(en::view_of_text(k, individual_body().dump(), v).ok());
  CHECK(json::parse(v.initial_twin_json) == individual_body()["initialTwin"]);
  // Null members are absent, as member() has them; multi-byte UTF-8 and
  // short escapes are decoded.
  v = {};
  REQUIRE(en::scan_view(k,
                        "{\"registrationId\":\"d\",\"attestation\":{\"type\":\"none\"},"
                        "\"deviceId\":null,\"capabilities\":null,\"iotHubs\":null,"
                        "\"etag\":\"\\\"\xc3\xa9\\t\\/\\\"\"}",
                        v));
  CHECK(v.device_id.empty());
  CHECK(v.iot_hubs.empty());
  CHECK(v.etag == "\"\xc3\xa9\t/\"");
}

TEST_CASE("enrollment: view_of_text never accepts what the tree path rejects or reads otherwise") {
  // Every single-byte change of stored documents (a byte replaced by one of
  // the JSON-significant characters, or removed): whenever the reader
  // accepts the text, nlohmann must parse it and give the same view.
  const std::string alphabet = "{}[]:,\"\\ 0-1.eEtfnul\x01\xc3\xa9\xff";
  json plain = stored_individual();
  json with_nulls = json::parse(R"({"registrationId":"d-1","attestation":{"type":"symmetricKey",
      "symmetricKey":{"primaryKey":"a","secondaryKey":null}},"deviceId":null,"iotHubs":["h"],
      "capabilities":{"iotEdge":false},"reprovisionPolicy":null,"n":[1.5e3,-0,true,{"x":[]}],
      "etag":"\"e\""})");
  int accepted = 0, checked = 0;
  for (const json& doc : {plain, with_nulls}) {
    const std::string base = doc.dump();
    for (std::size_t i = 0; i < base.size(); ++i) {
      std::vector<std::string> variants;
      variants.push_back(base.substr(0, i) + base.substr(i + 1));
      for (char c : alphabet)
        if (c != base[i])
          variants.push_back(base.substr(0, i) + c + base.substr(i + 1));
      for (const auto& text : variants) {
        ++checked;
        en::enrollment_view fast, tree;
        if (!en::scan_view(en::kind::individual, text, fast))
          continue;
        ++accepted;
        CAPTURE(text);
        REQUIRE(tree_view(en::kind::individual, text, tree));
        REQUIRE(same_view(fast, tree));
      }
    }
  }
  MESSAGE(accepted << " of " << checked << " mutated documents read without a tree");
  CHECK(accepted > 1000); // the check above really ran
}

TEST_CASE("enrollment: the view carries each attestation type's own data") {
  const std::string& ek = tpm_ek;
  json doc;
  REQUIRE(norm(en::kind::individual, "tpm-1",
               {{"attestation", {{"type", "tpm"}, {"tpm", {{"endorsementKey", ek}}}}}}, doc)
            .ok());
  en::enrollment_view v;
  CHECK_FALSE(en::scan_view(en::kind::individual, doc.dump(), v)); // read from the tree
  REQUIRE(en::view_of_text(en::kind::individual, doc.dump(), v).ok());
  REQUIRE(type_of(v.attestation) == prov::attestation_type::tpm);
  CHECK(std::get<en::tpm_attestation>(v.attestation).endorsement_key == ek);
  // Names the engine does not know are stored-document errors, from both readers.
  doc["attestation"] = {{"type", "voice"}};
  CHECK_FALSE(en::scan_view(en::kind::individual, doc.dump(), v));
  CHECK(en::view_of_text(en::kind::individual, doc.dump(), v).message.find("unknown type")
        != std::string::npos);
  doc["attestation"] = {{"type", "none"}};
  doc["allocationPolicy"] = "nearest";
  CHECK_FALSE(en::scan_view(en::kind::individual, doc.dump(), v));
  CHECK(en::view_of_text(en::kind::individual, doc.dump(), v).message.find("unknown policy")
        != std::string::npos);
}
