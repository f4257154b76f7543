#include <doctest/doctest.h>

#include <cctype>
#include <string>

#include "messages/ascii.hpp"

using namespace prov;

TEST_CASE("ascii::lower folds A-Z only, like std::tolower in the C locale") {
  for (int c = 0; c < 256; ++c) {
    CAPTURE(c);
    const char ch = static_cast<char>(c);
    const char expected = c < 128 ? static_cast<char>(std::tolower(c)) : ch;
    CHECK(ascii::lower(ch) == expected);
  }
  CHECK(ascii::to_lower("Bench-ABC.z_09:\xC3\x89") == "bench-abc.z_09:\xC3\x89");
}

TEST_CASE("ascii::iequals") {
  CHECK(ascii::iequals("Registrations", "registrations"));
  CHECK(ascii::iequals("", ""));
  CHECK_FALSE(ascii::iequals("register", "registe"));
  CHECK_FALSE(ascii::iequals("a-b", "a_b"));
  CHECK_FALSE(ascii::iequals("\xC3\x89", "\xC3\xA9")); // not Unicode folding
  static_assert(ascii::iequals("HUB-A.example", "hub-a.EXAMPLE"));
}
