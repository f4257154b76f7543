#include "actors/allocation/policy.hpp"

namespace prov::allocation {

void registry::add(std::shared_ptr<const policy> p) {
  if (p == nullptr)
    return;
  const auto k = p->kind();
  add_as(k, std::move(p));
}

void registry::add_as(allocation_policy as, std::shared_ptr<const policy> p) {
  if (p != nullptr)
    policies_[static_cast<std::size_t>(as)] = std::move(p);
}

} // namespace prov::allocation
