#pragma once
// What a device presents to prove its identity. A device transport (the
// HTTP routes) fills it from the request; an attestation mechanism
// (actors/attestation/) checks it. Credentials never reach a log or a stored
// record: keep them out of inspect() and of every codec.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

struct x509_st; // OpenSSL's X509, opaque here: this header stays light

namespace prov {

/// A SharedAccessSignature (the Authorization header's value): symmetric keys.
struct sas_credential {
  std::string token;
};

/// Certificates as OpenSSL parsed them (X509), leaf first.
using parsed_certificates = std::vector<std::shared_ptr<x509_st>>;

/// A TLS client certificate chain as the handshake left it, leaf first:
/// DER, and the same certificates already parsed (net::peer_chain).
struct client_chain {
  std::vector<std::string> der;
  parsed_certificates parsed; ///< one per `der`, same order
};

/// The TLS client certificate chain as presented, leaf first, DER.
struct x509_credential {
  std::vector<std::string> chain_der;
  /// In-process only (never encoded): the certificates as the TLS handshake
  /// parsed them, so attestation does not decode them again (OpenSSL 3.0's
  /// public key decoding costs more than the chain's signature check). When
  /// not empty it is the chain: the mechanism re-encodes the DER from it and
  /// ignores `chain_der`, so the two can never disagree. Empty when built
  /// from DER alone; then the mechanism parses `chain_der`.
  parsed_certificates parsed{};
  /// A signature made with the leaf's private key, for chains that no TLS
  /// handshake proved the device holds (direct publishers on Kafka,
  /// docs/events.md): over "<idScope>/registrations/<registrationId>\n<expiry>"
  /// as a SAS token signs, `expiry` in seconds since the epoch. The
  /// mechanism refuses a chain that carries neither: only the transports'
  /// x509_credential_of (a handshake) leaves it unset.
  struct possession_proof {
    int64_t expiry = 0;
    std::string signature; ///< raw bytes (DER for ECDSA)
  };
  std::optional<possession_proof> possession{};
  /// True only when a TLS handshake verified the client's CertificateVerify
  /// for this chain (x509_credential_of).
  bool from_handshake = false;
};

inline x509_credential x509_credential_of(const client_chain& c) {
  x509_credential out{c.der, c.parsed};
  out.from_handshake = true;
  return out;
}

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
