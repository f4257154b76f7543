#pragma once
// Symmetric key attestation (DPS): the device signs a SAS token for
// "{idScope}/registrations/{registrationId}" with its enrollment's key, or,
// in a group, with HMAC-SHA256(group key, registration id).

#include <cstdint>
#include <memory>

#include "actors/attestation/mechanism.hpp"

namespace prov::attestation {

class symmetric_key final : public mechanism {
public:
  /// Token lifetime bounds (device_api.max_sas_lifetime_seconds and
  /// clock_skew_seconds).
  symmetric_key(int64_t max_lifetime_s, int64_t clock_skew_s)
    : max_lifetime_s_(max_lifetime_s), clock_skew_s_(clock_skew_s) {}

  attestation_type type() const noexcept override { return attestation_type::symmetric_key; }
  bool reads(const device_credential& c) const noexcept override;
  error open(const device_credential& c, const request_facts& facts,
             std::unique_ptr<proof>& out) const override;

private:
  int64_t max_lifetime_s_;
  int64_t clock_skew_s_;
};

} // namespace prov::attestation
