#include <doctest/doctest.h>

#include <set>
#include <string>
#include <vector>

#include "messages/crypto.hpp"

using namespace prov::crypto;

namespace {

std::string hex_of(const sha256_digest& d) {
  return hex(std::string_view(reinterpret_cast<const char*>(d.data()), d.size()));
}

} // namespace

TEST_CASE("base64 encode/decode round-trips the RFC 4648 vectors") {
  const std::pair<const char*, const char*> vectors[] = {
      {"", ""},         {"f", "Zg=="},         {"fo", "Zm8="},
      {"foo", "Zm9v"},  {"foob", "Zm9vYg=="},  {"fooba", "Zm9vYmE="},
      {"foobar", "Zm9vYmFy"}};
  for (const auto& [plain, enc] : vectors) {
    CAPTURE(plain);
    CHECK(base64_encode(plain) == enc);
    auto dec = base64_decode(enc);
    REQUIRE(dec.has_value());
    CHECK(*dec == plain);
  }
  std::string all;
  for (int i = 0; i < 256; ++i) all += static_cast<char>(i);
  CHECK(base64_decode(base64_encode(all)) == all);
}

TEST_CASE("base64 decode is strict") {
  const char* bad[] = {
      "Zg=",       // length not a multiple of 4
      "Zg",        // missing padding
      "Z===",      // too much padding
      "====",      // padding only
      "Zm9v\n",    // whitespace
      "Zm9v ",     // whitespace
      " Zm9v",     // whitespace
      "Zm8=Zm8=",  // padding in the middle
      "Zm=v",      // '=' inside a quantum
      "=Zm9",      // leading '='
      "Zm-v",      // base64url alphabet
      "Zm_v",      // base64url alphabet
      "Zh==",      // non-zero unused bits
      "Zm9=",      // non-zero unused bits
  };
  for (const char* s : bad) {
    CAPTURE(s);
    CHECK_FALSE(base64_decode(s).has_value());
  }
  CHECK_FALSE(base64_decode(std::string_view("Zm9v\0\0\0\0", 8)).has_value());
}

TEST_CASE("hmac_sha256 matches RFC 4231") {
  CHECK(hex_of(hmac_sha256(std::string(20, '\x0b'), "Hi There")) ==
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  CHECK(hex_of(hmac_sha256("Jefe", "what do ya want for nothing?")) ==
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  CHECK(hex_of(hmac_sha256(std::string(131, '\xaa'),
                           "Test Using Larger Than Block-Size Key - Hash Key First")) ==
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
  // Empty key and message (openssl dgst -sha256 -mac HMAC -macopt key: </dev/null).
  CHECK(hex_of(hmac_sha256("", "")) ==
        "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad");
}

TEST_CASE("sha256 known answers") {
  CHECK(hex_of(sha256("")) ==
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(hex_of(sha256("abc")) ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST_CASE("equal_constant_time") {
  CHECK(equal_constant_time("", ""));
  CHECK(equal_constant_time("abc", "abc"));
  CHECK_FALSE(equal_constant_time("abc", "abd"));
  CHECK_FALSE(equal_constant_time("abc", "abcd"));
  CHECK_FALSE(equal_constant_time("", "a"));
  CHECK(equal_constant_time(std::string_view("a\0b", 3), std::string_view("a\0b", 3)));
  CHECK_FALSE(equal_constant_time(std::string_view("a\0b", 3), std::string_view("a\0c", 3)));
}

TEST_CASE("random_bytes, hex and uuid4") {
  CHECK(random_bytes(0).empty());
  const auto a = random_bytes(32), b = random_bytes(32);
  CHECK(a.size() == 32);
  CHECK(a != b);
  CHECK(hex(std::string_view("\x00\x0f\xab\xff", 4)) == "000fabff");

  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    const std::string u = uuid4();
    REQUIRE(u.size() == 36);
    CHECK(u[8] == '-');
    CHECK(u[13] == '-');
    CHECK(u[18] == '-');
    CHECK(u[23] == '-');
    CHECK(u[14] == '4');
    CHECK(std::string("89ab").find(u[19]) != std::string::npos);
    for (std::size_t j = 0; j < u.size(); ++j)
      if (u[j] != '-') CHECK(std::string("0123456789abcdef").find(u[j]) != std::string::npos);
    seen.insert(u);
  }
  CHECK(seen.size() == 1000);
}

TEST_CASE("uuid7 carries its milliseconds; anything else reads as 0") {
  const int64_t ms = 1795000000123; // 2026
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    const std::string u = uuid7(ms);
    REQUIRE(u.size() == 36);
    CHECK(u[14] == '7');
    CHECK(std::string("89ab").find(u[19]) != std::string::npos);
    CHECK(uuid7_time_ms(u) == ms);
    seen.insert(u);
  }
  CHECK(seen.size() == 1000);
  CHECK(uuid7_time_ms(uuid4()) == 0);
  CHECK(uuid7_time_ms("") == 0);
  CHECK(uuid7_time_ms("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4g50") != 0); // random part not parsed
  CHECK(uuid7_time_ms("0190a1b2-c3dX-7e5f-8a9b-0c1d2e3f4a50") == 0);
}

TEST_CASE("url_encode keeps only unreserved characters") {
  CHECK(url_encode("0ne00000A0A/registrations/dev 1") ==
        "0ne00000A0A%2Fregistrations%2Fdev%201");
  CHECK(url_encode("AZaz09-._~") == "AZaz09-._~");
  CHECK(url_encode("a+b=c&d") == "a%2Bb%3Dc%26d");
  CHECK(url_encode("\xc3\xa9") == "%C3%A9");
  CHECK(url_encode(std::string_view("\0", 1)) == "%00");
}

TEST_CASE("url_decode is strict about escapes") {
  CHECK(url_decode("a%2Fb%2fc") == std::optional<std::string>("a/b/c"));
  CHECK(url_decode("a+b") == std::optional<std::string>("a+b"));
  CHECK(url_decode("") == std::optional<std::string>(""));
  CHECK(url_decode("%00") == std::optional<std::string>(std::string(1, '\0')));
  CHECK(url_decode("%C3%A9") == std::optional<std::string>("\xc3\xa9"));
  for (const char* bad : {"%", "%2", "abc%", "abc%2", "%zz", "%2g", "%g2", "%%41", "% 41"}) {
    CAPTURE(bad);
    CHECK_FALSE(url_decode(bad).has_value());
  }
  const std::string s = "sn-007/registrations/x y+z~\x01";
  CHECK(url_decode(url_encode(s)) == s);
}

TEST_CASE("derive_device_key: published Azure DPS group enrollment vector") {
  // learn.microsoft.com, "How to provision devices using symmetric key
  // enrollment groups" (az iot dps enrollment-group compute-device-key).
  const auto key = derive_device_key(
      "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
      "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6");
  REQUIRE(key.has_value());
  CHECK(*key == "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=");
  CHECK_FALSE(derive_device_key("not base64!", "dev").has_value());
}

TEST_CASE("generate_key makes 64 random bytes") {
  const std::string k1 = generate_key(), k2 = generate_key();
  auto raw = base64_decode(k1);
  REQUIRE(raw.has_value());
  CHECK(raw->size() == 64);
  CHECK(k1 != k2);
}

TEST_CASE("derive_device_key: the per-thread cache of group keys gives the uncached answer") {
  // More keys than the cache's slots, in turns, so entries are reused and
  // replaced: every answer must equal HMAC(decoded key, id) computed afresh.
  std::vector<std::string> keys;
  for (int i = 0; i < 7; ++i)
    keys.push_back(base64_encode(std::string(static_cast<std::size_t>(16 + 9 * i),
                                             static_cast<char>('a' + i))));
  keys.push_back(base64_encode(std::string(100, 'k'))); // longer than a block: hashed first
  keys.push_back("");                                   // valid base64, empty key
  for (int round = 0; round < 3; ++round)
    for (const auto& k : keys)
      for (const char* id : {"dev-1", "Dev-2", ""}) {
        CAPTURE(k);
        CAPTURE(id);
        auto raw = base64_decode(k);
        REQUIRE(raw.has_value());
        auto d = hmac_sha256(*raw, id);
        auto expected = base64_encode(std::string_view(reinterpret_cast<const char*>(d.data()), d.size()));
        auto got = derive_device_key(k, id);
        REQUIRE(got.has_value());
        CHECK(*got == expected);
      }
  CHECK_FALSE(derive_device_key("not base64!", "dev").has_value());
}
