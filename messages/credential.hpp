#pragma once
// What a device presents to prove its identity. A device transport (the
// HTTP routes) fills it from the request; an attestation mechanism
// (actors/attestation/) checks it. Credentials never reach a log or a stored
// record: keep them out of inspect() and of every codec.

#include <string>
#include <variant>
#include <vector>

namespace prov {

/// A SharedAccessSignature (the Authorization header's value): symmetric keys.
struct sas_credential {
  std::string token;
};

/// The TLS client certificate chain as presented, leaf first, DER.
struct x509_credential {
  std::vector<std::string> chain_der;
};

/// The TPM's public keys from the register body (base64 TPM2B_PUBLIC), and
/// the SAS signed with the key the TPM imported, once it answers the challenge.
struct tpm_credential {
  std::string endorsement_key;
  std::string storage_root_key;
  std::string sas_token; ///< empty on the first request
};

/// Nothing presented: std::monostate.
using device_credential =
  std::variant<std::monostate, sas_credential, x509_credential, tpm_credential>;

/// The credential an Authorization header value carries: a SAS token, or
/// nothing when it is empty.
inline device_credential credential_of_authorization(std::string value) {
  if (value.empty())
    return std::monostate{};
  return sas_credential{std::move(value)};
}

} // namespace prov
