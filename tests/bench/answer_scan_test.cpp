#include <doctest/doctest.h>

#include <ctime>
#include <string>

#include <nlohmann/json.hpp>

#include "benchmarks/harness/answer_scan.hpp"

using bench::dps_answer;
using bench::parse_utc_ms;
using bench::scan_answer;

namespace {

/// The DOM's reading of the same fields, for the differential checks.
struct dom_answer {
  std::string operation_id, status, updated;
};
dom_answer dom(const std::string& body) {
  auto j = nlohmann::json::parse(body);
  dom_answer d;
  if (j.contains("operationId") && j["operationId"].is_string())
    d.operation_id = j["operationId"];
  if (j.contains("status") && j["status"].is_string())
    d.status = j["status"];
  if (j.contains("registrationState") && j["registrationState"].is_object()) {
    auto& rs = j["registrationState"];
    if (rs.contains("lastUpdatedDateTimeUtc") && rs["lastUpdatedDateTimeUtc"].is_string())
      d.updated = rs["lastUpdatedDateTimeUtc"];
  }
  return d;
}

} // namespace

TEST_CASE("scan_answer reads what the DOM reads from real answer shapes") {
  const std::string bodies[] = {
    // provisiond's 200 with the outcome, nested payload and tags.
    R"({"operationId":"4.9a0e3c38-0d9d-4c5b-9f4e-1b2c3d4e5f60","status":"assigned","registrationState":{"x509":{},"registrationId":"dev-1","createdDateTimeUtc":"2026-11-27T08:00:00.1230000Z","assignedHub":"hub-a.example","deviceId":"dev-1","status":"assigned","substatus":"initialAssignment","lastUpdatedDateTimeUtc":"2026-11-27T08:00:00.4560000Z","etag":"IjEi","payload":{"a":[1,2.5e3,true,null,{"s":"q\"x"}]}}})",
    // A 202 while assigning.
    R"({"operationId":"op-2","status":"assigning"})",
    // Azure's spacing and key order, status nested first.
    "{\n  \"registrationState\" : { \"status\" : \"failed\", \"errorCode\" : 400209 },\n"
    "  \"operationId\" : \"op-3\" ,\r\n\t\"status\":\"failed\" }  \n",
    // A failure with an escaped message elsewhere.
    R"({"operationId":"op-4","status":"failed","registrationState":{"errorMessage":"a \"b\" \\ \u00e9","lastUpdatedDateTimeUtc":"2026-01-01T00:00:00Z"}})",
    // Nothing the harness wants.
    R"({"errorCode":401002,"message":"unauthorized","trackingId":"t"})",
    "{}",
  };
  for (const auto& b : bodies) {
    CAPTURE(b);
    dps_answer a;
    REQUIRE(scan_answer(b, a));
    auto d = dom(b);
    CHECK(std::string(a.operation_id) == d.operation_id);
    CHECK(std::string(a.status) == d.status);
    CHECK(std::string(a.updated) == d.updated);
  }
}

TEST_CASE("scan_answer refuses what it cannot read plainly") {
  const char* bad[] = {
    "",
    "[]",
    "\"assigned\"",
    R"({"status":"assigned")",                 // unterminated object
    R"({"status":"assigned"} x)",              // trailing text
    R"({"status":"assi)",                      // unterminated string
    R"({"status" "assigned"})",                // missing colon
    R"({"status":"assigned",})",               // trailing comma
    R"({"status":"ass\"igned"})",              // escaped wanted field: the DOM decides
    R"({"operationId":"a","registrationState":{"x":[1,2}})", // bracket mismatch
    "{\"status\":\"a\nb\"}",                   // raw control character in a string
  };
  for (const char* b : bad) {
    CAPTURE(b);
    dps_answer a;
    CHECK_FALSE(scan_answer(b, a));
  }
  // Deep nesting is refused, not recursed without bound.
  std::string deep = "{\"x\":" + std::string(10000, '[') + std::string(10000, ']') + "}";
  dps_answer a;
  CHECK_FALSE(scan_answer(deep, a));
}

TEST_CASE("parse_utc_ms matches timegm and reads the fraction as milliseconds") {
  std::tm tm{};
  tm.tm_year = 2026 - 1900;
  tm.tm_mon = 10;
  tm.tm_mday = 27;
  tm.tm_hour = 8;
  tm.tm_min = 5;
  tm.tm_sec = 9;
  const int64_t base = static_cast<int64_t>(::timegm(&tm)) * 1000;
  CHECK(parse_utc_ms("2026-11-27T08:05:09.1410000Z") == base + 141);
  CHECK(parse_utc_ms("2026-11-27T08:05:09.1Z") == base + 100);
  CHECK(parse_utc_ms("2026-11-27T08:05:09Z") == base);
  CHECK(parse_utc_ms("2026-11-27T08:05:09") == base);
  CHECK(parse_utc_ms("1970-01-01T00:00:00.000Z") == 0);
  CHECK(parse_utc_ms("2000-02-29T23:59:59.999Z") == 951868799999);
  CHECK(parse_utc_ms("") == -1);
  CHECK(parse_utc_ms("2026-11-27") == -1);
  CHECK(parse_utc_ms("2026-13-27T08:05:09Z") == -1);
  CHECK(parse_utc_ms("2026-11-27T08:05:09.Z") == -1);
  CHECK(parse_utc_ms("2026-11-27X08:05:09Z") == -1);
  CHECK(parse_utc_ms("20a6-11-27T08:05:09Z") == -1);
}
