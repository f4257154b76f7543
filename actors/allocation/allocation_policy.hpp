#pragma once
// The hashed and static allocation policies, and the pure functions behind
// them: deterministic, the same registration id and the same candidate set
// (in any order) always give the same hub.

#include <string>
#include <string_view>
#include <vector>

#include "actors/allocation/policy.hpp"
#include "messages/error.hpp"

namespace prov::allocation {

/// Weighted rendezvous (highest random weight) hashing over candidates with
/// apply_allocation_policy = true, or over all candidates named explicitly by
/// the enrollment (`explicit_list` = true: the enrollment's iotHubs). Score =
/// -weight / ln(u) with u from SHA-256(lower(registration_id) + "\n" +
/// lower(hostname)), so shares are proportional to weights and independent of
/// list order. Empty result + error no_hub_available when nothing qualifies.
[[nodiscard]] error hashed(std::string_view registration_id,
                           const std::vector<candidate_hub>& hubs,
                           bool explicit_list, std::string& out);

/// hashed(), and why: {"weights":{hub:w,...},"scores":{hub:s,...}} over the
/// hubs that took part (no scores when only one did: nothing was hashed).
[[nodiscard]] error hashed_explained(std::string_view registration_id,
                                     const std::vector<candidate_hub>& hubs,
                                     bool explicit_list, std::string& out,
                                     std::string& why_json);

/// The enrollment's single hub. Error no_hub_available when `hubs` does not
/// hold exactly one entry.
[[nodiscard]] error static_hub(const std::vector<candidate_hub>& hubs,
                               std::string& out);

/// "hashed": weighted rendezvous hashing over the candidates (hashed()).
class hashed_policy final : public policy {
public:
  allocation_policy kind() const noexcept override { return allocation_policy::hashed; }
  bool synchronous() const noexcept override { return true; }
  void allocate(const request& in, done_fn done) const override;
};

/// "static": the enrollment's single hub (static_hub()).
class static_policy final : public policy {
public:
  allocation_policy kind() const noexcept override { return allocation_policy::static_hub; }
  bool synchronous() const noexcept override { return true; }
  void allocate(const request& in, done_fn done) const override;
};

} // namespace prov::allocation
