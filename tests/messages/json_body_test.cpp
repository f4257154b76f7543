#include <doctest/doctest.h>

#include <string>

#include <nlohmann/json.hpp>

#include "messages/json_body.hpp"

using namespace prov;
using nlohmann::json;

TEST_CASE("parse_json_body refuses duplicate member names at any depth") {
  for (std::string text :
       {R"({"a":1,"a":1})", R"({"a":1,"b":2,"a":3})", R"({"o":{"k":[],"k":{}}})",
        R"([{"x":1},{"y":1,"y":2}])", R"({"a":{"b":{"c":{"d":0,"d":0}}}})",
        R"({"a":1,"\u0061":2})", R"({"":1,"":2})"}) {
    CAPTURE(text);
    json j;
    auto err = parse_json_body(text, j);
    CHECK(err.code == error_code::malformed_json);
    CHECK(err.message.find("duplicate") != std::string::npos);
  }
}

TEST_CASE("parse_json_body takes distinct names, equal ones in different objects, and any value") {
  for (std::string text :
       {R"({"a":1,"A":2})", R"({"a":{"a":{"a":1}},"b":{"a":2}})", R"([{"k":1},{"k":2}])",
        R"({})", R"([])", R"("s")", "7", "null", R"({"a":[{"b":1},{"b":2}],"c":{}})"}) {
    CAPTURE(text);
    json j;
    REQUIRE(!parse_json_body(text, j));
    CHECK(j == json::parse(text));
  }
}

TEST_CASE("parse_json_body: invalid JSON and deep nesting are malformed_json") {
  json j;
  CHECK(parse_json_body(R"({"a":)", j).message == "the body is not valid JSON");
  CHECK(parse_json_body("", j).code == error_code::malformed_json);
  auto deep = [](int n) { return std::string(n, '[') + std::string(n, ']'); };
  CHECK(!parse_json_body(deep(32), j));
  CHECK(parse_json_body(deep(33), j).message.find("deeper than 32") != std::string::npos);
  CHECK(parse_json_body("{\"a\":" + deep(40) + ",\"a\":1}", j).message.find("deeper")
        != std::string::npos);
}
