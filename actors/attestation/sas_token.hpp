#pragma once
// Shared access signature tokens, as DPS uses them for devices and for the
// service API. Pure functions: no I/O, no clock (the caller passes `now`).
//
//   SharedAccessSignature sr=<resource>&sig=<urlenc b64 hmac>&se=<expiry>[&skn=<name>]
//
// The HMAC is computed over the `sr` value exactly as transmitted (Node sends it
// raw, C/Python URL-encoded, embedded C with lower-case hex), then "\n" + se.

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "messages/error.hpp"

namespace prov::attestation {

/// A parsed token. Field values are as transmitted (sig and sr still encoded).
struct sas_token {
  std::string sr;       ///< resource as transmitted
  std::string sig;      ///< signature as transmitted (URL-encoded base64)
  std::string se;       ///< expiry as transmitted
  std::string skn;      ///< key name, may be empty
  int64_t expiry = 0;   ///< se as seconds since the epoch
  std::string resource; ///< sr URL-decoded
  /// sig decoded (parse_sas checks it decodes to 32 bytes); unset when the
  /// token was not made by parse_sas.
  std::optional<std::array<uint8_t, 32>> sig_bytes;
};

/// Parses an Authorization header value. Each field at most once; sr, sig and
/// se required; se a non-negative decimal that fits int64; total length bounded
/// (4 KB). Errors are `unauthorized` (401000) with a message naming the problem.
[[nodiscard]] error parse_sas(std::string_view header, sas_token& out);

/// Limits for `verify_sas`.
struct sas_limits {
  int64_t now = 0;                 ///< seconds since the epoch
  int64_t max_lifetime = 365 * 24 * 3600; ///< se may be at most now + this + skew
  int64_t clock_skew = 300;        ///< tolerated skew
};

/// Checks expiry against `limits` and the signature against `key_b64`
/// (base64-encoded key) in constant time. Does not check the resource. Errors
/// are 401002 with messages "token expired", "token lifetime exceeds ...",
/// "signature mismatch", "invalid key".
[[nodiscard]] error verify_sas(const sas_token& tok, std::string_view key_b64,
                               const sas_limits& limits);

/// Only the expiry checks of verify_sas (so they can run once before trying
/// several keys).
[[nodiscard]] error check_expiry(const sas_token& tok, const sas_limits& limits);

/// Only the signature check (constant time).
[[nodiscard]] bool signature_matches(const sas_token& tok, std::string_view key_b64);
/// The same with the key's bytes (a group device's derived key, without the
/// base64 round trip).
[[nodiscard]] bool signature_matches_raw(const sas_token& tok, std::string_view key);

/// True when the decoded resource is exactly "{id_scope}/registrations/{reg_id}"
/// (scope and registration id compared case-insensitively).
[[nodiscard]] bool device_resource_matches(const sas_token& tok,
                                           std::string_view id_scope,
                                           std::string_view registration_id);

/// A device's token, parsed and checked for all that needs no key: expiry
/// within `limits` and a resource that names this device. The one reading
/// of a device SAS shared by the mechanisms that take one (symmetric key,
/// TPM). Errors: parse_sas's (401000), else 401002.
[[nodiscard]] error read_device_sas(std::string_view header, const sas_limits& limits,
                                    std::string_view id_scope,
                                    std::string_view registration_id, sas_token& out);

/// True when the decoded resource names `host` (case-insensitive), optionally
/// followed by a path: prefix match by whole path segment only.
[[nodiscard]] bool service_resource_matches(const sas_token& tok,
                                            std::string_view host);

/// Builds a token: sr = url_encode(resource) when `encode_resource`, else the raw
/// resource (Node style). skn omitted when empty.
std::string make_sas(std::string_view resource, std::string_view key_b64,
                     int64_t expiry, std::string_view skn,
                     bool encode_resource = true);

} // namespace prov::attestation
