#include <doctest/doctest.h>

#include <cctype>
#include <string>

#include "actors/attestation/sas_token.hpp"
#include "messages/crypto.hpp"

using namespace prov;
using namespace prov::attestation;

namespace {

// The published group vector's derived device key (see crypto_test.cpp).
const std::string key = "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=";
const std::string other_key = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==";
const std::string scope = "0ne00ABC123";
const std::string reg = "dev-1";
constexpr int64_t now = 1'700'000'000;

sas_limits limits() {
  sas_limits l;
  l.now = now;
  return l;
}

/// base64(HMAC(key, sr + "\n" + se)), URL-encoded: what every SDK sends.
std::string sign(const std::string& sr, const std::string& se,
                 const std::string& k = key) {
  const auto raw = crypto::base64_decode(k);
  REQUIRE(raw.has_value());
  const auto d = crypto::hmac_sha256(*raw, sr + "\n" + se);
  return crypto::url_encode(crypto::base64_encode(
      std::string_view(reinterpret_cast<const char*>(d.data()), d.size())));
}

std::string token(const std::string& sr, const std::string& se,
                  const std::string& tail = "&skn=registration") {
  return "SharedAccessSignature sr=" + sr + "&sig=" + sign(sr, se) + "&se=" + se + tail;
}

error parse_and_verify(const std::string& header, const std::string& k = key) {
  sas_token t;
  if (auto e = parse_sas(header, t)) return e;
  return verify_sas(t, k, limits());
}

const std::string se_ok = std::to_string(now + 3600);

} // namespace

TEST_CASE("make_sas round-trips through parse and verify") {
  for (bool encode : {true, false}) {
    CAPTURE(encode);
    const std::string h =
        make_sas(scope + "/registrations/" + reg, key, now + 3600, "registration", encode);
    sas_token t;
    REQUIRE(parse_sas(h, t).ok());
    CHECK(t.resource == scope + "/registrations/" + reg);
    CHECK(t.expiry == now + 3600);
    CHECK(t.skn == "registration");
    CHECK(t.sr == (encode ? scope + "%2Fregistrations%2F" + reg
                          : scope + "/registrations/" + reg));
    CHECK(verify_sas(t, key, limits()).ok());
    CHECK(device_resource_matches(t, scope, reg));
  }
  CHECK(make_sas("x", "not base64", now, "").empty());
  CHECK(make_sas("x", key, now, "").find("skn") == std::string::npos);
}

TEST_CASE("make_sas matches an independently computed token (Python hmac/urllib)") {
  CHECK(make_sas(scope + "/registrations/" + reg, key, 1700003600, "registration") ==
        "SharedAccessSignature sr=0ne00ABC123%2Fregistrations%2Fdev-1"
        "&sig=c37jiqpeUpSLSpTLGHcoKo465P2ApMN1e6bJ9LR%2FNNs%3D&se=1700003600&skn=registration");
  CHECK(make_sas(scope + "/registrations/" + reg, key, 1700003600, "registration", false) ==
        "SharedAccessSignature sr=0ne00ABC123/registrations/dev-1"
        "&sig=%2BcJ6FQYEKN6uz85uo7lPhs73elcQd8YxqLxWoUFCzLY%3D&se=1700003600&skn=registration");
}

TEST_CASE("sr is verified exactly as transmitted: upper hex, lower hex, raw") {
  const std::string variants[] = {
      scope + "%2Fregistrations%2F" + reg, // docs, C, Python
      scope + "%2fregistrations%2f" + reg, // embedded C SDK
      scope + "/registrations/" + reg,     // Node
  };
  for (const auto& sr : variants) {
    CAPTURE(sr);
    sas_token t;
    REQUIRE(parse_sas(token(sr, se_ok), t).ok());
    CHECK(t.sr == sr);
    CHECK(t.resource == scope + "/registrations/" + reg);
    CHECK(verify_sas(t, key, limits()).ok());
    CHECK(device_resource_matches(t, scope, reg));
  }
  // Signed over the decoded resource but transmitted encoded: must fail.
  const std::string sr = scope + "%2Fregistrations%2F" + reg;
  const std::string h = "SharedAccessSignature sr=" + sr + "&sig=" +
                        sign(scope + "/registrations/" + reg, se_ok) + "&se=" + se_ok;
  const error e = parse_and_verify(h);
  CHECK(e.code == error_code::unauthorized_signature);
  CHECK(e.message == "signature mismatch");
}

TEST_CASE("fields in any order; skn optional or empty") {
  const std::string sr = scope + "%2Fregistrations%2F" + reg;
  const std::string sig = sign(sr, se_ok);
  const std::string orders[] = {
      "sr=" + sr + "&sig=" + sig + "&skn=registration&se=" + se_ok, // Node
      "sig=" + sig + "&se=" + se_ok + "&skn=registration&sr=" + sr, // docs
      "se=" + se_ok + "&sr=" + sr + "&sig=" + sig,                  // no skn
      "sr=" + sr + "&sig=" + sig + "&se=" + se_ok + "&skn=",        // empty skn
  };
  for (const auto& body : orders) {
    CAPTURE(body);
    CHECK(parse_and_verify("SharedAccessSignature " + body).ok());
  }
  // The scheme is case-insensitive (RFC 7235).
  CHECK(parse_and_verify("sharedaccesssignature sr=" + sr + "&sig=" + sig + "&se=" + se_ok).ok());
}

TEST_CASE("expiry and lifetime limits") {
  const std::string sr = scope + "%2Fregistrations%2F" + reg;
  auto at = [&](int64_t se) { return parse_and_verify(token(sr, std::to_string(se))); };
  CHECK(at(now + 1).ok());
  CHECK(at(now - 299).ok()); // within the 300 s skew
  for (int64_t se : {now - 300, now - 301, now - 100000, int64_t{0}}) {
    CAPTURE(se);
    const error e = at(se);
    CHECK(e.code == error_code::unauthorized_signature);
    CHECK(e.message == "token expired");
  }
  const int64_t year = 365 * 24 * 3600;
  CHECK(at(now + year + 300).ok());
  for (int64_t se : {now + year + 301, int64_t{9223372036854775807}}) {
    CAPTURE(se);
    const error e = at(se);
    CHECK(e.code == error_code::unauthorized_signature);
    CHECK(e.message.find("lifetime") != std::string::npos);
  }
  // check_expiry alone, with custom limits.
  sas_token t;
  REQUIRE(parse_sas(token(sr, std::to_string(now + 100)), t).ok());
  sas_limits l = limits();
  l.max_lifetime = 50;
  l.clock_skew = 0;
  CHECK(check_expiry(t, l).code == error_code::unauthorized_signature);
  l.max_lifetime = 100;
  CHECK(check_expiry(t, l).ok());
  l.now = now + 100;
  CHECK(check_expiry(t, l).message == "token expired");
}

TEST_CASE("malformed se is rejected at parse time") {
  const std::string sr = scope + "%2Fregistrations%2F" + reg;
  const char* bad[] = {"-1",        "abc",  "18446744073709551616", "9223372036854775808",
                       "+5",        " 5",   "5 ",                   "1e9",
                       "0x10",      "1.5",  "99999999999999999999999"};
  for (const char* se : bad) {
    CAPTURE(se);
    const std::string h = "SharedAccessSignature sr=" + sr + "&sig=" + sign(sr, se) + "&se=" + se;
    sas_token t;
    const error e = parse_sas(h, t);
    CHECK(e.code == error_code::unauthorized);
  }
  sas_token t;
  CHECK(parse_sas(token(sr, "9223372036854775807"), t).ok());
  CHECK(t.expiry == 9223372036854775807);
  CHECK(parse_sas(token(sr, "0001700003600"), t).ok()); // leading zeros are digits
  CHECK(t.expiry == 1700003600);
  CHECK(verify_sas(t, key, limits()).ok()); // signed over "0001700003600" as sent
}

TEST_CASE("structural errors: duplicates, missing, unknown, prefix, length") {
  const std::string sr = scope + "%2Fregistrations%2F" + reg;
  const std::string sig = sign(sr, se_ok);
  const std::string good = "sr=" + sr + "&sig=" + sig + "&se=" + se_ok;
  const std::string bad[] = {
      // duplicates
      good + "&sr=" + sr,
      good + "&sig=" + sig,
      good + "&se=" + se_ok,
      good + "&skn=a&skn=b",
      "sr=" + scope + "%2Fregistrations%2Fother&" + good,
      // missing / empty required fields
      "sig=" + sig + "&se=" + se_ok,
      "sr=" + sr + "&se=" + se_ok,
      "sr=" + sr + "&sig=" + sig,
      "sr=&sig=" + sig + "&se=" + se_ok,
      "sr=" + sr + "&sig=&se=" + se_ok,
      "sr=" + sr + "&sig=" + sig + "&se=",
      // unknown, empty and nameless fields
      good + "&foo=bar",
      good + "&SR=" + sr,
      good + "&",
      "&" + good,
      "sr=" + sr + "&&sig=" + sig + "&se=" + se_ok,
      good + "&skn",
      good + "&=x",
      // sig not a base64 HMAC-SHA256; sr with a broken escape
      "sr=" + sr + "&sig=%%%&se=" + se_ok,
      "sr=" + sr + "&sig=" + crypto::url_encode(crypto::base64_encode(std::string(31, 'x'))) + "&se=" + se_ok,
      "sr=" + sr + "&sig=" + crypto::url_encode(crypto::base64_encode(std::string(33, 'x'))) + "&se=" + se_ok,
      "sr=" + scope + "%2Gregistrations&sig=" + sig + "&se=" + se_ok,
      // over-long fields
      "sr=" + std::string(1025, 'a') + "&sig=" + sig + "&se=" + se_ok,
      good + "&skn=" + std::string(257, 'k'),
  };
  for (const auto& body : bad) {
    CAPTURE(body);
    sas_token t;
    const error e = parse_sas("SharedAccessSignature " + body, t);
    CHECK(e.code == error_code::unauthorized);
    CHECK(e.message.find(sig) == std::string::npos);
  }
  const std::string bad_prefix[] = {
      good,
      "Bearer " + good,
      "SharedAccessSignature" + good,
      "SharedAccessSignature  " + good,
      " SharedAccessSignature " + good,
      "SharedAccessSignatur " + good,
      "SharedAccessSignature",
      "SharedAccessSignature ",
      "",
  };
  for (const auto& h : bad_prefix) {
    CAPTURE(h);
    sas_token t;
    CHECK(parse_sas(h, t).code == error_code::unauthorized);
  }
  sas_token t;
  CHECK(parse_sas("SharedAccessSignature " + good + std::string(4100, ' '), t).code ==
        error_code::unauthorized);
  CHECK(parse_sas("SharedAccessSignature " + good, t).ok());
}

TEST_CASE("signature checks: wrong key, flipped byte, invalid key") {
  const std::string sr = scope + "%2Fregistrations%2F" + reg;
  sas_token t;
  REQUIRE(parse_sas(token(sr, se_ok), t).ok());
  CHECK(signature_matches(t, key));
  CHECK_FALSE(signature_matches(t, other_key));
  CHECK_FALSE(signature_matches(t, "***"));
  CHECK_FALSE(signature_matches(t, ""));

  error e = verify_sas(t, other_key, limits());
  CHECK(e.code == error_code::unauthorized_signature);
  CHECK(e.message == "signature mismatch");
  e = verify_sas(t, "not-base64!", limits());
  CHECK(e.message == "invalid key");
  CHECK(verify_sas(t, "", limits()).message == "invalid key");

  // Every single-byte change of the raw signature is rejected.
  const auto raw = crypto::base64_decode(*crypto::url_decode(t.sig));
  REQUIRE(raw.has_value());
  REQUIRE(raw->size() == 32);
  for (std::size_t i = 0; i < raw->size(); ++i) {
    std::string flipped = *raw;
    flipped[i] = static_cast<char>(flipped[i] ^ 0x01);
    const std::string h = "SharedAccessSignature sr=" + sr + "&sig=" +
                          crypto::url_encode(crypto::base64_encode(flipped)) + "&se=" + se_ok;
    sas_token f;
    REQUIRE(parse_sas(h, f).ok());
    CHECK_FALSE(signature_matches(f, key));
    const error fe = verify_sas(f, key, limits());
    CHECK(fe.message == "signature mismatch");
    CHECK(fe.message.find(key) == std::string::npos);
  }

  // The sig is compared decoded: lower-case escapes or an unescaped '=' still match.
  std::string lower_sig = t.sig;
  for (std::size_t p = lower_sig.find('%'); p != std::string::npos; p = lower_sig.find('%', p + 1))
    for (std::size_t j = p + 1; j < p + 3; ++j)
      lower_sig[j] = static_cast<char>(std::tolower(static_cast<unsigned char>(lower_sig[j])));
  sas_token lp;
  REQUIRE(parse_sas("SharedAccessSignature sr=" + sr + "&sig=" + lower_sig + "&se=" + se_ok, lp).ok());
  CHECK(signature_matches(lp, key));
  // A token not made by parse_sas has its sig decoded on the spot.
  sas_token l = t;
  l.sig_bytes.reset();
  l.sig = lower_sig;
  CHECK(signature_matches(l, key));
  l.sig = *crypto::url_decode(t.sig);
  CHECK(signature_matches(l, key));
  l.sig = "bm90IGEgZGlnZXN0"; // base64, but not 32 bytes
  CHECK_FALSE(signature_matches(l, key));

  // With the key's bytes (a group device's derived key).
  CHECK(signature_matches_raw(t, *crypto::base64_decode(key)));
  CHECK_FALSE(signature_matches_raw(t, *crypto::base64_decode(other_key)));
  CHECK_FALSE(signature_matches_raw(t, ""));

  // se is covered by the signature.
  sas_token moved = t;
  moved.se = std::to_string(now + 7200);
  moved.expiry = now + 7200;
  CHECK_FALSE(signature_matches(moved, key));
}

TEST_CASE("device resource matching") {
  auto tok_for = [](const std::string& resource) {
    sas_token t;
    REQUIRE(parse_sas(token(crypto::url_encode(resource), se_ok), t).ok());
    return t;
  };
  const sas_token t = tok_for(scope + "/registrations/" + reg);
  CHECK(device_resource_matches(t, scope, reg));
  CHECK(device_resource_matches(t, "0ne00abc123", "DEV-1")); // case-insensitive
  CHECK_FALSE(device_resource_matches(t, scope, "dev-2"));   // another device
  CHECK_FALSE(device_resource_matches(t, "0ne00ABC124", reg)); // another scope
  CHECK_FALSE(device_resource_matches(t, scope, ""));
  CHECK_FALSE(device_resource_matches(t, "", reg));

  // Prefix tricks: "ab" must not authorize "abc" or the reverse.
  const sas_token ab = tok_for(scope + "/registrations/ab");
  const sas_token abc = tok_for(scope + "/registrations/abc");
  CHECK(device_resource_matches(ab, scope, "ab"));
  CHECK_FALSE(device_resource_matches(ab, scope, "abc"));
  CHECK_FALSE(device_resource_matches(abc, scope, "ab"));
  CHECK_FALSE(device_resource_matches(tok_for(scope + "/registrations/" + reg + "/x"), scope, reg));
  CHECK_FALSE(device_resource_matches(tok_for(scope + "X/registrations/" + reg), scope, reg));
  CHECK_FALSE(device_resource_matches(tok_for(scope + "/registration/" + reg), scope, reg));
  CHECK_FALSE(device_resource_matches(tok_for("/registrations/" + reg), scope, reg));
  CHECK_FALSE(device_resource_matches(tok_for("x" + scope + "/registrations/" + reg), scope, reg));
  CHECK(device_resource_matches(tok_for("0NE00abc123/Registrations/Dev-1"), scope, reg));
}

TEST_CASE("service resource matching by whole path segment") {
  auto tok_for = [](const std::string& resource) {
    sas_token t;
    const std::string h = make_sas(resource, key, now + 3600, "provisioningserviceowner");
    REQUIRE(parse_sas(h, t).ok());
    REQUIRE(verify_sas(t, key, limits()).ok());
    return t;
  };
  const std::string host = "dps.example.com";
  CHECK(service_resource_matches(tok_for(host), host));
  CHECK(service_resource_matches(tok_for("DPS.Example.COM"), host));
  CHECK(service_resource_matches(tok_for(host + "/"), host));
  CHECK(service_resource_matches(tok_for(host + "/enrollments"), host));
  CHECK_FALSE(service_resource_matches(tok_for(host + "X"), host));
  CHECK_FALSE(service_resource_matches(tok_for(host + ".evil.com"), host));
  CHECK_FALSE(service_resource_matches(tok_for("x" + host), host));
  CHECK_FALSE(service_resource_matches(tok_for("dps.example.co"), host));
  CHECK_FALSE(service_resource_matches(tok_for("https://" + host), host));
  CHECK_FALSE(service_resource_matches(tok_for(host), ""));
  sas_token t = tok_for(host);
  CHECK(t.skn == "provisioningserviceowner");
}
