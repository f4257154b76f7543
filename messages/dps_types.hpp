#pragma once
// DPS vocabulary as enums: attestation types, allocation policies and the
// substatus of an assignment. Code decides on these; the wire and stored
// records carry their DPS spelling (to_string / from_string).

#include <cstdint>
#include <string_view>

namespace prov {

/// attestation.type of an enrollment: "none" | "symmetricKey" | "x509" | "tpm".
enum class attestation_type : uint8_t { none, symmetric_key, x509, tpm };
std::string_view to_string(attestation_type t) noexcept;
[[nodiscard]] bool from_string(std::string_view s, attestation_type& out) noexcept;

/// allocationPolicy of an enrollment: "hashed" | "geoLatency" | "static" | "custom".
enum class allocation_policy : uint8_t { hashed, geo_latency, static_hub, custom };
std::string_view to_string(allocation_policy p) noexcept;
[[nodiscard]] bool from_string(std::string_view s, allocation_policy& out) noexcept;

/// registrationState.substatus: how an assignment relates to the device's
/// previous one (reprovisioning).
enum class assignment_substatus : uint8_t {
  initial_assignment,   ///< "initialAssignment": first assignment, or the same hub
  device_data_migrated, ///< "deviceDataMigrated": moved, twin data carried over
  device_data_reset,    ///< "deviceDataReset": moved, twin from the enrollment
  /// "reprovisionedToInitialAssignment": moved back to a hub the device was
  /// assigned to before (its twin per migrateDeviceData, as for the others)
  reprovisioned_to_initial_assignment,
};
std::string_view to_string(assignment_substatus s) noexcept;

} // namespace prov
