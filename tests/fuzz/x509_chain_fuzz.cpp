// An X.509 device's TLS client chain to its verdict: the chain as DER
// certificates (the input is split into up to 4 certificates, each preceded
// by a 2-byte big-endian length), opened by the x509 mechanism with the
// leaf's own CN as registration id (so the checks past the name run too),
// then matched against an individual enrollment naming the leaf and groups
// signed by each presented certificate.

#include <nlohmann/json.hpp>
#include <openssl/x509.h>

#include "actors/attestation/x509.hpp"
#include "actors/enrollment/enrollment_model.hpp"
#include "actors/enrollment/x509_certificates.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace at = prov::attestation;
namespace en = prov::enrollment;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  prov::x509_credential cred;
  cred.from_handshake = true; // reach the chain checks
  auto in = prov::fuzz::text_of(data, size);
  while (in.size() >= 2 && cred.chain_der.size() < 4) {
    std::size_t n = (std::size_t(uint8_t(in[0])) << 8) | uint8_t(in[1]);
    in.remove_prefix(2);
    n = std::min(n, in.size());
    cred.chain_der.emplace_back(in.substr(0, n));
    in.remove_prefix(n);
  }
  std::string cn;
  int64_t now_s = 1'700'000'000;
  for (const auto& der : cred.chain_der) {
    auto cert = en::parse_der(der);
    if (!cert)
      continue;
    (void)en::certificate_info(cert.get(), der);
    if (&der == &cred.chain_der.front()) {
      cn = en::common_name(cert.get());
      now_s = en::epoch_of(X509_get0_notBefore(cert.get()));
    }
  }
  at::x509 mech;
  at::request_facts facts;
  facts.id_scope = "0ne00000001";
  facts.registration_id = cn;
  facts.now_s = now_s;
  std::unique_ptr<at::proof> proof;
  if (mech.open(cred, facts, proof))
    return 0;
  PROV_FUZZ_CHECK(proof != nullptr);
  en::enrollment_view individual;
  en::x509_attestation leaf_ref;
  leaf_ref.client_certificates.push_back({cred.chain_der.front(), {}, {}});
  individual.attestation = leaf_ref;
  (void)proof->check_individual(individual);
  std::vector<en::enrollment_view> groups;
  for (const auto& der : cred.chain_der) {
    en::enrollment_view g;
    g.k = en::kind::group;
    g.id = "group-" + std::to_string(groups.size());
    en::x509_attestation ca;
    ca.signing_certificates.push_back({der, {}, {}});
    g.attestation = ca;
    groups.push_back(std::move(g));
  }
  (void)proof->check_groups(groups);
  (void)proof->identity();
  (void)proof->valid_until();
  return 0;
}
