#include <doctest/doctest.h>

#include <random>

#include <nlohmann/json.hpp>

#include "messages/json_text.hpp"

using namespace prov;
using nlohmann::json;

namespace {
std::string as_literal(std::string_view s) {
  std::string out;
  json_text::append_string(out, s);
  return out;
}
} // namespace

TEST_CASE("json_text strings: valid UTF-8 and escapes round-trip exactly") {
  for (std::string s : {std::string(""), std::string("plain"), std::string("q\"b\\s/"),
                        std::string("\n\r\t\b\f\x01\x1f"), std::string("caf\xc3\xa9 \xe2\x82\xac"),
                        std::string("\xf0\x9f\x98\x80 emoji"), std::string("\x7f")}) {
    auto parsed = json::parse(as_literal(s));
    CHECK(parsed.get<std::string>() == s);
  }
  CHECK(as_literal(std::string("a\0b", 3)) == "\"a\\u0000b\"");
}

TEST_CASE("json_text strings: invalid UTF-8 becomes U+FFFD, output always parses") {
  CHECK(as_literal("\xff") == "\"\\ufffd\"");
  CHECK(as_literal("a\xc0\x80z") == "\"a\\ufffd\\ufffdz\"");        // overlong NUL
  CHECK(as_literal("\xed\xa0\x80") == "\"\\ufffd\\ufffd\\ufffd\""); // UTF-16 surrogate
  CHECK(as_literal("\xe2\x82") == "\"\\ufffd\\ufffd\"");            // truncated
  CHECK(as_literal("\xf4\x90\x80\x80") == "\"\\ufffd\\ufffd\\ufffd\\ufffd\""); // > U+10FFFF
  std::mt19937 gen(42);
  std::uniform_int_distribution<int> byte(0, 255), len(0, 24);
  for (int i = 0; i < 20000; ++i) {
    std::string s(static_cast<std::size_t>(len(gen)), '\0');
    for (auto& c : s)
      c = static_cast<char>(byte(gen));
    auto text = as_literal(s);
    auto parsed = json::parse(text, nullptr, false);
    REQUIRE_MESSAGE(!parsed.is_discarded(), text);
  }
}

TEST_CASE("json_text objects nest and separate fields") {
  std::string out;
  json_text::object o(out);
  o.str("a", "x").num("n", -5).boolean("b", true);
  json_text::object inner(o.nested("in"));
  inner.raw("r", "[1,2]").close();
  o.close();
  CHECK(json::parse(out) == json{{"a", "x"}, {"n", -5}, {"b", true}, {"in", {{"r", {1, 2}}}}});
}

TEST_CASE("json_text strings: byte for byte nlohmann's dump() wherever the special byte sits") {
  // Long plain runs with one byte that needs attention at every position:
  // the 16-byte scan and the tail loop must stop at the same place.
  const std::string specials[] = {"\"", "\\", "\n", "\x01", "\x1f", "\x7f", "\xc3\xa9",
                                  "\xe2\x82\xac", "\xf0\x9f\x98\x80"};
  for (std::size_t len = 0; len <= 70; ++len) {
    for (std::size_t pos = 0; pos <= len; ++pos) {
      for (const auto& sp : specials) {
        std::string s(len, 'a');
        for (std::size_t k = 0; k < len; ++k)
          s[k] = static_cast<char>('a' + (k * 7) % 26);
        s.insert(pos, sp);
        std::string out;
        REQUIRE(json_text::append_string_as_dump(out, s));
        REQUIRE_MESSAGE(out == json(s).dump(), s);
      }
    }
  }
  // Invalid UTF-8 after a long plain run is still replaced.
  CHECK(as_literal(std::string(40, 'x') + "\xff") == "\"" + std::string(40, 'x') + "\\ufffd\"");
  CHECK(as_literal(std::string(33, 'x') + "\xe2\x82") ==
        "\"" + std::string(33, 'x') + "\\ufffd\\ufffd\"");
}

TEST_CASE("json_text objects: one-append fields equal key and append_string, at every size") {
  // str() writes `,"key":"value"` at once when it fits its buffer and the
  // value needs no escaping; keys alone are buffered up to 60 bytes. Both
  // paths, and the edges between them, must write the same text.
  for (std::size_t klen : {1u, 59u, 60u, 61u, 100u}) {
    for (std::size_t vlen = 0; vlen <= 170; ++vlen) {
      for (const char* special : {"", "\"", "\xc3\xa9"}) {
        std::string key(klen, 'k');
        std::string value(vlen, 'v');
        if (*special && vlen > 0)
          value.replace(vlen / 2, 1, special);
        std::string out;
        json_text::object o(out);
        o.str("first", "1").str(key, value);
        o.close();
        std::string expected = "{\"first\":\"1\",\"" + key + "\":";
        json_text::append_string(expected, value);
        expected += "}";
        CAPTURE(klen);
        CAPTURE(vlen);
        REQUIRE(out == expected);
      }
    }
  }
}
