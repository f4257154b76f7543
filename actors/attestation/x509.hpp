#pragma once
// X.509 attestation (DPS): the device presents its certificate chain (leaf
// first) in the TLS handshake, having proven it holds the leaf's key there.
// The leaf's subject CN is the registration id. An individual enrollment
// names the leaf (certificate or thumbprint); an enrollment group names a
// root or intermediate CA the chain must verify to, the nearest one winning.
// A chain that arrives without a handshake (a direct publisher on Kafka)
// carries a signature made with the leaf's key instead.

#include <cstdint>
#include <memory>

#include "actors/attestation/mechanism.hpp"

namespace prov::attestation {

class x509 final : public mechanism {
public:
  /// The limits of a direct publisher's proof of possession, as of a SAS
  /// token's expiry (device_api.max_sas_lifetime_seconds, clock_skew_seconds).
  x509(int64_t max_lifetime_s = 365 * 24 * 3600, int64_t clock_skew_s = 300)
    : max_lifetime_s_(max_lifetime_s), clock_skew_s_(clock_skew_s) {}
  attestation_type type() const noexcept override { return attestation_type::x509; }
  bool reads(const device_credential& c) const noexcept override;
  error open(const device_credential& c, const request_facts& facts,
             std::unique_ptr<proof>& out) const override;

private:
  int64_t max_lifetime_s_;
  int64_t clock_skew_s_;
};

} // namespace prov::attestation
