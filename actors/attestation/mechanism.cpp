#include "actors/attestation/mechanism.hpp"

namespace prov::attestation {

void registry::add(std::unique_ptr<mechanism> m) { mechanisms_.push_back(std::move(m)); }

const mechanism* registry::reading(const device_credential& c) const noexcept {
  for (const auto& m : mechanisms_)
    if (m->reads(c))
      return m.get();
  return nullptr;
}

const mechanism* registry::of_type(attestation_type t) const noexcept {
  for (const auto& m : mechanisms_)
    if (m->type() == t)
      return m.get();
  return nullptr;
}

attestation_type registry::attempted(const device_credential& c) const noexcept {
  const mechanism* m = reading(c);
  return m != nullptr ? m->type() : attestation_type::none;
}

} // namespace prov::attestation
