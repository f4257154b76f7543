#include "messages/dps_types.hpp"

namespace prov {

namespace {

template <class Enum, std::size_t N>
bool lookup(const std::string_view (&names)[N], std::string_view s, Enum& out) noexcept {
  for (std::size_t i = 0; i < N; ++i)
    if (names[i] == s) {
      out = static_cast<Enum>(i);
      return true;
    }
  return false;
}

// Indexed by the enums' values.
constexpr std::string_view attestation_names[] = {"none", "symmetricKey", "x509", "tpm"};
constexpr std::string_view policy_names[] = {"hashed", "geoLatency", "static", "custom"};
constexpr std::string_view substatus_names[] = {"initialAssignment", "deviceDataMigrated",
                                                "deviceDataReset",
                                                "reprovisionedToInitialAssignment"};

} // namespace

std::string_view to_string(attestation_type t) noexcept {
  return attestation_names[static_cast<std::size_t>(t)];
}

bool from_string(std::string_view s, attestation_type& out) noexcept {
  return lookup(attestation_names, s, out);
}

std::string_view to_string(allocation_policy p) noexcept {
  return policy_names[static_cast<std::size_t>(p)];
}

bool from_string(std::string_view s, allocation_policy& out) noexcept {
  return lookup(policy_names, s, out);
}

std::string_view to_string(assignment_substatus s) noexcept {
  return substatus_names[static_cast<std::size_t>(s)];
}

} // namespace prov
