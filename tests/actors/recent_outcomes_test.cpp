#include <doctest/doctest.h>

#include <string>

#include "actors/configuration/recent_outcomes.hpp"

using prov::registration_state;
using prov::registration_status;
using prov::configuration::recent_outcomes;

namespace {

/// A fully filled record, so a lookup that loses or mixes up any field shows.
registration_state outcome(const std::string& op, const std::string& hub = "hub-a.example") {
  registration_state s;
  s.registration_id = "dev-" + op;
  s.created_ms = 1764158400123;
  s.updated_ms = 1764158400456;
  s.assigned_hub = hub;
  s.device_id = "device-" + op;
  s.status = registration_status::assigned;
  s.substatus = "initialAssignment";
  s.etag = "\"etag-" + op + "\"";
  s.attestation_type = "symmetricKey";
  s.enrollment_group_id = "factory-a";
  s.payload_json = R"({"k":1})";
  s.last_operation_id = op;
  return s;
}

std::string op_id(int i) { return "5.op-" + std::to_string(i); }

} // namespace

TEST_SUITE("recent_outcomes") {

TEST_CASE("a remembered operation is found with exactly the recorded state") {
  recent_outcomes recent(4);
  CHECK(recent.find("5.a") == nullptr);
  auto a = outcome("5.a");
  CHECK(recent.remember("5.a", a));
  CHECK(recent.remember("5.b", outcome("5.b", "hub-b.example")));
  const auto* found = recent.find("5.a");
  REQUIRE(found != nullptr);
  // Field by field: the republished CloudEvent is rebuilt from these bytes.
  CHECK(encode_record(*found) == encode_record(a));
  CHECK(found->updated_ms == a.updated_ms);
  CHECK(found->etag == a.etag);
  CHECK(found->last_operation_id == "5.a");
  CHECK(recent.find("5.b")->assigned_hub == "hub-b.example");
  CHECK(recent.find("5.c") == nullptr);
  CHECK(recent.size() == 2);
}

TEST_CASE("first write wins: a second remember of one operation changes nothing") {
  recent_outcomes recent(4);
  auto first = outcome("5.a");
  auto second = outcome("5.a", "hub-other.example");
  second.updated_ms += 1000;
  CHECK(recent.remember("5.a", first));
  CHECK_FALSE(recent.remember("5.a", second));
  REQUIRE(recent.find("5.a") != nullptr);
  CHECK(encode_record(*recent.find("5.a")) == encode_record(first));
  CHECK(recent.size() == 1);
}

TEST_CASE("the oldest is forgotten once the bound is exceeded") {
  recent_outcomes recent(3);
  for (int i = 0; i < 3; ++i)
    recent.remember(op_id(i), outcome(op_id(i)));
  CHECK(recent.size() == 3);
  for (int i = 0; i < 3; ++i)
    CHECK(recent.find(op_id(i)) != nullptr);

  recent.remember(op_id(3), outcome(op_id(3)));
  CHECK(recent.size() == 3);
  CHECK(recent.find(op_id(0)) == nullptr);
  for (int i = 1; i < 4; ++i)
    CHECK(recent.find(op_id(i)) != nullptr);

  SUBCASE("a repeated remember does not make an entry younger") {
    CHECK_FALSE(recent.remember(op_id(1), outcome(op_id(1))));
    recent.remember(op_id(4), outcome(op_id(4)));
    CHECK(recent.find(op_id(1)) == nullptr);
    CHECK(recent.find(op_id(2)) != nullptr);
    CHECK(recent.find(op_id(4)) != nullptr);
  }
  SUBCASE("a forgotten operation can be remembered again, as the newest") {
    CHECK(recent.remember(op_id(0), outcome(op_id(0), "hub-z.example")));
    CHECK(recent.find(op_id(0))->assigned_hub == "hub-z.example");
    CHECK(recent.find(op_id(1)) == nullptr);
    CHECK(recent.size() == 3);
  }
}

TEST_CASE("no unbounded growth: many operations keep exactly the newest capacity") {
  constexpr int cap = 64;
  constexpr int n = 10000;
  recent_outcomes recent(cap);
  CHECK(recent.capacity() == cap);
  for (int i = 0; i < n; ++i) {
    recent.remember(op_id(i), outcome(op_id(i)));
    // Duplicates interleaved (a resend racing its record) must not grow it.
    if (i % 7 == 0 && i > 0)
      CHECK_FALSE(recent.remember(op_id(i - 1), outcome(op_id(i - 1))));
    REQUIRE(recent.size() <= cap);
  }
  CHECK(recent.size() == cap);
  int held = 0;
  for (int i = 0; i < n; ++i)
    held += recent.find(op_id(i)) != nullptr;
  CHECK(held == cap);
  for (int i = n - cap; i < n; ++i)
    CHECK(recent.find(op_id(i)) != nullptr);
}

} // TEST_SUITE

TEST_CASE("recorded: only after mark_recorded, only for remembered operations, forgotten with them") {
  recent_outcomes recent(2);
  CHECK(recent.remember("r.1", outcome("r.1")));
  CHECK_FALSE(recent.recorded("r.1"));
  recent.mark_recorded("r.1");
  CHECK(recent.recorded("r.1"));
  recent.mark_recorded("r.unknown"); // not remembered: nothing to mark
  CHECK_FALSE(recent.recorded("r.unknown"));
  CHECK(recent.find("r.unknown") == nullptr);
  CHECK_FALSE(recent.remember("r.1", outcome("r.1"))); // a repeat keeps the mark
  CHECK(recent.recorded("r.1"));
  CHECK(recent.remember("r.2", outcome("r.2")));
  CHECK(recent.remember("r.3", outcome("r.3"))); // evicts r.1
  CHECK_FALSE(recent.recorded("r.1"));
  CHECK(recent.find("r.1") == nullptr);
}
