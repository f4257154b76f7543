#include "app/secrets.hpp"

#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <iostream>
#include <memory>

#include <CLI/CLI.hpp>

#include "metrics/diagnostic_log.hpp"
#include "storage/keyring.hpp"
#include "storage/store.hpp"

namespace prov::app {

namespace {

/// `file` (default `fallback`) with a relative path taken inside the data
/// dir, as the default is. Against the working directory instead, `serve`
/// under systemd and `keys rotate` from a shell would read different files
/// (or `serve` would create a second key beside a data dir it cannot open).
std::string in_data_dir(const config::engine_config& cfg, const std::string& file,
                        const char* fallback) {
  if (file.empty()) return cfg.data_dir + "/" + fallback;
  if (file[0] == '/') return file;
  return cfg.data_dir + "/" + file;
}

} // namespace

std::string key_file_path(const config::engine_config& cfg) {
  return in_data_dir(cfg, cfg.secrets.key_file, "secrets.key");
}

std::string audit_file_path(const config::engine_config& cfg) {
  return in_data_dir(cfg, cfg.log.audit_file, "audit.log");
}

error open_secrets(const config::engine_config& cfg, storage::store& store, std::string& note) {
  note.clear();
  const std::string path = key_file_path(cfg);
  bool sealed = false;
  if (auto err = store.is_sealed(sealed)) return err;
  std::shared_ptr<const storage::keyring> ring;
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 && errno == ENOENT) {
    // A new key for a data dir sealed before would only hide the real
    // problem (the old key is gone) behind "cannot decrypt" later.
    if (sealed)
      return {error_code::storage_failure,
              "secrets: key file '" + path + "' is missing, and the data dir '" + cfg.data_dir +
                "' was sealed with a key from it: restore the key file from your backup "
                "(docs/security.md), or set [secrets] key_file to where it is"};
    if (auto err = storage::keyring::create(path, ring)) return err;
    note = "created the key-encryption key file '" + path +
           "' (0600): back it up apart from the data dir; without it the enrollments "
           "cannot be read";
  } else if (auto err = storage::keyring::load(path, ring)) {
    return err;
  }
  storage::seal_report rep;
  if (auto err = store.attach_keyring(ring, /*reseal_all=*/false, rep)) return err;
  if (rep.sealed > 0) {
    if (!note.empty()) note += "; ";
    note += "sealed " + std::to_string(rep.sealed) +
            " stored values that an older version kept in plaintext";
  }
  return {};
}

} // namespace prov::app

namespace {

int fail(const std::string& msg) {
  std::cerr << "provisiond: " << msg << std::endl;
  return 1;
}

struct keys_args {
  std::string config_file;
  std::string data_dir;
};

prov::error load_cfg(const keys_args& a, prov::config::engine_config& cfg) {
  if (!a.config_file.empty())
    if (auto err = prov::config::load_file(a.config_file, cfg)) return err;
  if (!a.data_dir.empty()) cfg.data_dir = a.data_dir;
  return {};
}

/// Appends the rotation's audit line (docs/operations.md#audit-log); the
/// operator is the local user who ran the command.
void audit_rotation(const prov::config::engine_config& cfg, const std::string& new_id,
                    const prov::error& result) {
  using namespace prov;
  std::unique_ptr<metrics::diagnostic_log> log;
  if (auto err = metrics::diagnostic_log::open({"info", app::audit_file_path(cfg)}, log)) {
    std::cerr << "provisiond: WARNING: no audit line for this rotation: " << err.message
              << std::endl;
    return;
  }
  metrics::audit_record r;
  r.operation = "RotateKeys";
  r.type = "KeyEncryptionKey";
  r.id = new_id;
  const passwd* pw = ::getpwuid(::geteuid());
  r.identity = "local user " + std::string(pw ? pw->pw_name : "?") + " (uid " +
               std::to_string(::geteuid()) + ")";
  r.authenticated = true;
  if (result) {
    r.error_code = std::to_string(static_cast<int32_t>(result.code));
    r.description = result.message;
  }
  r.protocol = "Cli";
  log->audit(r);
  log->flush();
}

int rotate(const keys_args& a) {
  using namespace prov;
  config::engine_config cfg;
  if (auto err = load_cfg(a, cfg)) return fail(err.message);
  const std::string path = app::key_file_path(cfg);
  // The store's lock keeps a running server out: rotation is offline.
  std::unique_ptr<storage::store> st;
  if (auto err = storage::store::open(cfg.data_dir + "/db", {}, st)) return fail(err.message);
  std::shared_ptr<const storage::keyring> old_ring;
  if (auto err = storage::keyring::load(path, old_ring)) return fail(err.message);
  storage::seal_report rep;
  // Proves the file opens this data dir before it is changed.
  if (auto err = st->attach_keyring(old_ring, false, rep)) return fail(err.message);
  std::shared_ptr<const storage::keyring> ring;
  if (auto err = storage::keyring::add_key(path, ring)) {
    audit_rotation(cfg, "", err);
    return fail(err.message);
  }
  storage::seal_report moved;
  if (auto err = st->attach_keyring(ring, /*reseal_all=*/true, moved)) {
    audit_rotation(cfg, ring->active_id(), err);
    return fail(err.message + " (the key file already has the new key " + ring->active_id() +
                "; values not re-encrypted yet still open with the older keys: run "
                "`provisiond keys rotate` again once the cause is fixed)");
  }
  st->close();
  audit_rotation(cfg, ring->active_id(), {});
  std::cout << "new active key " << ring->active_id() << " in '" << path << "'; re-encrypted "
            << moved.resealed + moved.sealed + rep.sealed
            << " values. The older keys stay in the file: remove a line only when no "
               "backup of this data dir still needs it (docs/security.md)."
            << std::endl;
  return 0;
}

int list(const keys_args& a) {
  using namespace prov;
  config::engine_config cfg;
  if (auto err = load_cfg(a, cfg)) return fail(err.message);
  std::shared_ptr<const storage::keyring> ring;
  if (auto err = storage::keyring::load(app::key_file_path(cfg), ring)) return fail(err.message);
  for (const auto& id : ring->ids())
    std::cout << id << (id == ring->active_id() ? " active" : "") << "\n";
  return 0;
}

} // namespace

void add_keys_command(CLI::App& app, int& exit_code) {
  auto* keys = app.add_subcommand("keys", "Key-encryption keys of the secrets at rest");
  keys->require_subcommand(1);
  auto args = std::make_shared<keys_args>();
  auto add_common = [&](CLI::App* c) {
    c->add_option("--config", args->config_file, "TOML configuration file ([secrets] key_file)");
    c->add_option("--data-dir", args->data_dir, "Data directory (default ./data)");
  };
  auto* rot = keys->add_subcommand(
    "rotate",
    "Add a new key-encryption key and re-encrypt every sealed value with it (server stopped)");
  add_common(rot);
  rot->callback([args, &exit_code] { exit_code = rotate(*args); });
  auto* ls = keys->add_subcommand("list", "List the key ids in the key file; the active one last");
  add_common(ls);
  ls->callback([args, &exit_code] { exit_code = list(*args); });
}
