#pragma once
// Helpers shared by integration test files that use one server per executable.

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "tests/support/server_process.hpp"

namespace prov::test {

/// One server for the whole executable; tests use distinct ids.
inline server_process& shared_server() {
  static server_process s;
  static bool started = false;
  if (!started) {
    auto err = s.start();
    REQUIRE_MESSAGE(!err, err.message);
    started = true;
  }
  return s;
}

/// Parses a response body, failing the test when it is not JSON.
inline nlohmann::json parse_json(const std::string& text) {
  auto j = nlohmann::json::parse(text, nullptr, false);
  REQUIRE_MESSAGE(!j.is_discarded(), "not JSON: " << text);
  return j;
}

} // namespace prov::test
