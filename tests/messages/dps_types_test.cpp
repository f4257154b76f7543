#include <doctest/doctest.h>

#include "messages/dps_types.hpp"

using namespace prov;

TEST_CASE("dps types: DPS spellings round-trip, unknown names are refused") {
  for (auto t : {attestation_type::none, attestation_type::symmetric_key, attestation_type::x509,
                 attestation_type::tpm}) {
    attestation_type back = attestation_type::none;
    REQUIRE(from_string(to_string(t), back));
    CHECK(back == t);
  }
  CHECK(to_string(attestation_type::symmetric_key) == "symmetricKey");
  for (auto p : {allocation_policy::hashed, allocation_policy::geo_latency,
                 allocation_policy::static_hub, allocation_policy::custom}) {
    allocation_policy back = allocation_policy::hashed;
    REQUIRE(from_string(to_string(p), back));
    CHECK(back == p);
  }
  CHECK(to_string(allocation_policy::geo_latency) == "geoLatency");
  CHECK(to_string(allocation_policy::static_hub) == "static");
  attestation_type t;
  allocation_policy p;
  CHECK_FALSE(from_string("SymmetricKey", t)); // DPS names are case-sensitive
  CHECK_FALSE(from_string("", t));
  CHECK_FALSE(from_string("Hashed", p));
  CHECK(to_string(assignment_substatus::initial_assignment) == "initialAssignment");
  CHECK(to_string(assignment_substatus::device_data_migrated) == "deviceDataMigrated");
  CHECK(to_string(assignment_substatus::device_data_reset) == "deviceDataReset");
  CHECK(to_string(assignment_substatus::reprovisioned_to_initial_assignment)
        == "reprovisionedToInitialAssignment");
}
