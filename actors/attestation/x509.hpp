#pragma once
// X.509 attestation (DPS): the device presents its certificate chain (leaf
// first) in the TLS handshake, having proven it holds the leaf's key there.
// The leaf's subject CN is the registration id. An individual enrollment
// names the leaf (certificate or thumbprint); an enrollment group names a
// root or intermediate CA the chain must verify to, the nearest one winning.

#include <memory>

#include "actors/attestation/mechanism.hpp"

namespace prov::attestation {

class x509 final : public mechanism {
public:
  attestation_type type() const noexcept override { return attestation_type::x509; }
  bool reads(const device_credential& c) const noexcept override;
  error open(const device_credential& c, const request_facts& facts,
             std::unique_ptr<proof>& out) const override;
};

} // namespace prov::attestation
