#pragma once
// Secrets at rest for `provisiond serve` and `provisiond keys` (docs/security.md).

#include <memory>
#include <string>

#include "config/config.hpp"
#include "messages/error.hpp"

namespace CLI {
class App;
}

namespace prov::storage {
class keyring;
class store;
} // namespace prov::storage

namespace prov::app {

/// [secrets] key_file, or <data_dir>/secrets.key when unset; a relative
/// key_file is taken inside data_dir (never the working directory).
std::string key_file_path(const config::engine_config& cfg);

/// [log] audit_file, or <data_dir>/audit.log when unset; relative: inside
/// data_dir.
std::string audit_file_path(const config::engine_config& cfg);

/// The environment variable that, when set, holds the key-encryption keys
/// instead of the key file (docs/security.md#keys-from-the-environment).
extern const char* const secrets_key_env;

/// Moves secrets_key_env out of the environment: keeps its value in this
/// process, overwrites the bytes in the environment block (what
/// /proc/<pid>/environ shows) and unsets it, so no child process, crash
/// report or environment dump gets the key. Call first thing in main, before
/// any thread starts (app::run does).
void take_secrets_key_env() noexcept;

/// Whether secrets_key_env was set when take_secrets_key_env ran.
bool secrets_key_env_set() noexcept;

/// The keys from the value take_secrets_key_env kept; `out` stays empty when
/// the variable was not set. Errors name the variable (empty, not base64 of
/// 32 bytes, bad line), never quote the value. The kept value is wiped once
/// read: a second call is an error.
[[nodiscard]] error env_keyring(std::shared_ptr<const storage::keyring>& out);

/// Keys from secrets_key_env when set, else loads the key file (creating it, 0600, when it is missing and the data dir
/// was never sealed) and attaches it to `store`, which seals any plaintext an
/// older version left. `note` says what was done worth telling the operator.
/// Errors name the key file: missing for a sealed data dir, wrong key, mode.
[[nodiscard]] error open_secrets(const config::engine_config& cfg, storage::store& store,
                                 std::string& note);

} // namespace prov::app

/// Registers `keys rotate` and `keys list` on `app`.
void add_keys_command(CLI::App& app, int& exit_code);
