#pragma once
// Small, allocation-light crypto and encoding helpers over OpenSSL. OpenSSL
// headers stay in crypto.cpp.

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace prov::crypto {

using sha256_digest = std::array<uint8_t, 32>;

/// Standard base64 (with padding).
std::string base64_encode(std::string_view bytes);
/// Strict standard base64 decode; nullopt on any invalid character or padding.
std::optional<std::string> base64_decode(std::string_view text);

/// HMAC-SHA256(key, msg).
sha256_digest hmac_sha256(std::string_view key, std::string_view msg);
/// SHA-256(data).
sha256_digest sha256(std::string_view data);

/// Constant-time equality (CRYPTO_memcmp); false when sizes differ.
bool equal_constant_time(std::string_view a, std::string_view b);

/// Cryptographically secure random bytes (RAND_bytes).
std::string random_bytes(std::size_t n);
/// Lower-case hex of bytes.
std::string hex(std::string_view bytes);
/// RFC 4122 version 4 UUID, lower-case. Unique, not unpredictable (a seeded
/// per-thread PRNG): fine for request ids, operation ids and etags, never for
/// anything that grants access.
std::string uuid4();
/// RFC 9562 version 7 UUID: 48-bit Unix milliseconds, then random bits. Lets
/// whoever sees an id tell roughly when it was made (operation ids).
std::string uuid7(int64_t unix_ms);
/// The milliseconds of a lower-case version 7 UUID; 0 for anything else.
int64_t uuid7_time_ms(std::string_view uuid);

/// Percent-encode everything but RFC 3986 unreserved characters (upper-case hex).
std::string url_encode(std::string_view s);
/// Percent-decode; '+' is kept literally. nullopt on a malformed escape.
std::optional<std::string> url_decode(std::string_view s);

/// Symmetric key of a device in an enrollment group:
/// base64(HMAC-SHA256(base64decode(group_key), registration_id)).
/// nullopt when group_key is not valid base64.
std::optional<std::string> derive_device_key(std::string_view group_key_b64,
                                             std::string_view registration_id);
/// The same key's bytes (before base64).
std::optional<sha256_digest> derive_device_key_raw(std::string_view group_key_b64,
                                                   std::string_view registration_id);

/// A fresh 64-byte key, base64 encoded (what DPS generates when keys are omitted).
std::string generate_key();

} // namespace prov::crypto
