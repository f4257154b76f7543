#pragma once
// Key-encryption keys for secrets at rest (docs/security.md). The store seals
// the values of its secret-bearing column families with AES-256-GCM under the
// active key; each sealed value names its key's id, so after a rotation the
// older keys still open what they sealed. OpenSSL stays in keyring.cpp.
//
// Key file: text, 0600, one key a line, "<id> <base64 of 32 bytes>"; the last
// line is the active key; '#' lines are comments. The id is derived from the
// key (a SHA-256 prefix), so a line whose id and key disagree is refused
// instead of decrypting garbage.

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "messages/error.hpp"

namespace prov::storage {

class store;

class keyring {
public:
  struct key {
    std::string id;    ///< 16 lower-case hex characters
    std::string bytes; ///< 32 bytes
  };

  ~keyring();
  keyring(const keyring&) = delete;
  keyring& operator=(const keyring&) = delete;

  /// Reads `path`. Errors name the file and say what is wrong: missing,
  /// readable by group or others, malformed line, id that does not match its key.
  [[nodiscard]] static error load(const std::string& path, std::shared_ptr<const keyring>& out);
  /// Keys from an environment variable's `value` (named `name` in errors):
  /// base64 of 32 bytes (one key), or key file lines (the last active).
  [[nodiscard]] static error from_env(const std::string& name, std::string_view value,
                                      std::shared_ptr<const keyring>& out);
  /// Creates `path` (0600, refusing to overwrite) holding one fresh key.
  /// Written as `path`.tmp, fsync'd, linked to `path`, directory fsync'd: a
  /// crash leaves either no key file or a complete one (a stale .tmp is
  /// removed by the next call), and the key is durable before it seals anything.
  [[nodiscard]] static error create(const std::string& path, std::shared_ptr<const keyring>& out);
  /// Appends a fresh key to `path`, which becomes the active one; the file is
  /// replaced atomically (`path`.tmp written, fsync'd, renamed over `path`,
  /// directory fsync'd).
  [[nodiscard]] static error add_key(const std::string& path, std::shared_ptr<const keyring>& out);

  /// The key file; empty when the keys came from the environment.
  const std::string& path() const noexcept { return path_; }
  /// Where the keys came from, for messages: "key file '<path>'" or
  /// "environment variable <name>".
  const std::string& source() const noexcept { return source_; }
  const std::string& active_id() const noexcept { return keys_.back().id; }
  std::vector<std::string> ids() const;

  /// `plain` sealed under the active key, bound to `aad` (where it is stored:
  /// a sealed value moved to another key does not open).
  std::string seal(std::string_view plain, std::string_view aad) const;
  /// Opens a sealed value. Errors (code storage_failure): a key id this file
  /// does not hold (names both), a value that fails authentication (tampered,
  /// truncated, or moved), a malformed envelope.
  [[nodiscard]] error open(std::string_view sealed, std::string_view aad, std::string& out) const;

  /// Overwrites `n` bytes at `p` (OPENSSL_cleanse: not optimised away), for
  /// copies of key material that leave scope.
  static void wipe(void* p, std::size_t n) noexcept;
  /// wipe() of the string's bytes, then clear().
  static void wipe(std::string& s) noexcept;

  /// Whether a stored value is a sealed envelope (its magic prefix).
  static bool is_sealed(std::string_view value) noexcept;
  /// The key id a sealed value names; empty when it is not sealed. An id that
  /// is not 16 lower-case hex digits comes back hex-escaped (printable, and
  /// never equal to a real id).
  static std::string key_id_of(std::string_view value);

private:
  keyring() = default;
  const key* find(std::string_view id) const noexcept;

  std::string path_;
  std::string source_;
  std::vector<key> keys_; ///< file order; back() is active
};

/// The keyring store::attach_keyring attached to `s` (null before, and for
/// stores that are not RocksDB's): the Kafka table of enrollments seals its
/// records with it. A free function, so store.hpp (included everywhere)
/// stays as it is.
std::shared_ptr<const keyring> attached_keyring(const store& s);

} // namespace prov::storage
