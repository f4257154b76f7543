#pragma once
// Hub allocation policies. Pure functions, deterministic: the same registration
// id and the same candidate set (in any order) always give the same hub.

#include <string>
#include <string_view>
#include <vector>

#include "messages/error.hpp"

namespace prov::allocation {

struct candidate_hub {
  std::string hostname;
  int weight = 1;                 ///< allocation_weight, 1..1000
  bool apply_allocation_policy = true;
};

/// Weighted rendezvous (highest random weight) hashing over candidates with
/// apply_allocation_policy = true, or over all candidates named explicitly by
/// the enrollment (`explicit_list` = true: the enrollment's iotHubs). Score =
/// -weight / ln(u) with u from SHA-256(lower(registration_id) + "\n" +
/// lower(hostname)), so shares are proportional to weights and independent of
/// list order. Empty result + error no_hub_available when nothing qualifies.
[[nodiscard]] error hashed(std::string_view registration_id,
                           const std::vector<candidate_hub>& hubs,
                           bool explicit_list, std::string& out);

/// The enrollment's single hub. Error no_hub_available when `hubs` does not
/// hold exactly one entry.
[[nodiscard]] error static_hub(const std::vector<candidate_hub>& hubs,
                               std::string& out);

} // namespace prov::allocation
