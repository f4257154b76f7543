#include "app/secrets.hpp"

#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
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

const char* const secrets_key_env = "PROVISIOND_SECRETS_KEY";

namespace {

/// The variable's value once take_secrets_key_env moved it out of the
/// environment; wiped when env_keyring has read it (or at exit).
struct held_env_key {
  bool set = false;
  bool used = false;
  std::string value;
  ~held_env_key() { storage::keyring::wipe(value); }
};

held_env_key& held() {
  static held_env_key h;
  return h;
}

} // namespace

void take_secrets_key_env() noexcept {
  char* v = std::getenv(secrets_key_env);
  if (v == nullptr) return;
  auto& h = held();
  try {
    h.value.assign(v);
    h.set = true;
  } catch (...) {
    // Out of memory this early: the start fails later, as for a bad value.
    h.set = true;
    h.value.clear();
  }
  // unsetenv alone only drops the pointer from environ: the bytes stay in
  // the initial environment block, which /proc/<pid>/environ shows and a
  // core dump holds. So the value is overwritten in place first.
  storage::keyring::wipe(v, std::strlen(v));
  ::unsetenv(secrets_key_env);
}

bool secrets_key_env_set() noexcept { return held().set; }

error env_keyring(std::shared_ptr<const storage::keyring>& out) {
  out.reset();
  auto& h = held();
  if (!h.set) return {};
  if (h.used)
    return {error_code::internal, std::string("secrets: environment variable ") +
                                    secrets_key_env + " was read once already"};
  auto err = storage::keyring::from_env(secrets_key_env, h.value, out);
  storage::keyring::wipe(h.value);
  h.used = true;
  return err;
}

error open_secrets(const config::engine_config& cfg, storage::store& store, std::string& note) {
  note.clear();
  const std::string path = key_file_path(cfg);
  bool sealed = false;
  if (auto err = store.is_sealed(sealed)) return err;
  std::shared_ptr<const storage::keyring> ring;
  struct stat st {};
  if (auto err = env_keyring(ring)) return err;
  if (ring) {
    // The variable wins over the key file, which is neither read nor
    // created: a key kept out of every file (a secrets manager, systemd
    // credentials) must not get a copy on disk beside the data.
    note = "key-encryption keys from the environment variable " +
           std::string(secrets_key_env) + " (active key id " + ring->active_id() +
           "); the key file is not used";
  } else if (::stat(path.c_str(), &st) != 0 && errno == ENOENT) {
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
void audit_rotation(const prov::config::engine_config& cfg, const std::string& invoker,
                    const std::string& new_id, const prov::error& result) {
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
  r.identity = invoker;
  r.authenticated = true;
  if (result) {
    r.error_code = std::to_string(static_cast<int32_t>(result.code));
    r.description = result.message;
  }
  r.protocol = "Cli";
  log->audit(r);
  log->flush();
}

/// `keys rotate` or `keys list` run as root on a data dir another user owns
/// (the service user's, as a package sets it up): every file the command
/// creates (RocksDB's SST files, MANIFEST, WAL, OPTIONS, LOG, a
/// db.wal-damaged-* copy, the rewritten key file, a new audit file) must be
/// that user's, or the server can no longer open them. Handing files back
/// with chown afterwards is unsafe: db/ is writable by the service user, who
/// can swap a directory for a symlink or plant a hard link and have root
/// chown /etc files to itself. So the command becomes the data dir's owner
/// (its uid and gid, no supplementary groups) before it opens anything
/// there, and chowns nothing. Only the configuration file was read as root.
/// `invoker` gets who ran the command, for the audit line.
prov::error become_data_dir_owner(const std::string& data_dir, std::string& invoker) {
  using prov::error;
  using prov::error_code;
  const uid_t me = ::geteuid();
  const passwd* pw = ::getpwuid(me);
  invoker = "local user " + std::string(pw ? pw->pw_name : "?") + " (uid " + std::to_string(me) +
            ")";
  if (me != 0) return {}; // others cannot create files they do not own
  struct stat st {};
  // Missing: nothing to keep an owner for (the command fails or creates
  // root's own data dir, as `serve` run as root would).
  if (::stat(data_dir.c_str(), &st) != 0 || st.st_uid == 0) return {};
  const uid_t uid = st.st_uid;
  const gid_t gid = st.st_gid;
  auto failed = [&](const char* what) {
    return error{error_code::internal,
                 "cannot become the owner of the data dir '" + data_dir + "' (uid " +
                   std::to_string(uid) + ", gid " + std::to_string(gid) + "): " + what + ": " +
                   std::strerror(errno) + "; run the command as that user"};
  };
  // Groups first: after setuid, setgroups and setgid are no longer allowed.
  if (::setgroups(1, &gid) != 0) return failed("setgroups");
  if (::setgid(gid) != 0) return failed("setgid");
  if (::setuid(uid) != 0) return failed("setuid");
  // setuid as root sets the real, effective and saved ids: no way back.
  if (::getuid() != uid || ::geteuid() != uid || ::getgid() != gid || ::getegid() != gid ||
      ::setuid(0) == 0) {
    errno = EPERM;
    return failed("the ids did not all change");
  }
  const passwd* owner = ::getpwuid(uid);
  invoker += " as " + std::string(owner ? owner->pw_name : "?") + " (uid " + std::to_string(uid) +
             "), the data dir's owner";
  return {};
}

/// The values a rotation could not open, as a table on stderr.
void print_unreadable(const prov::storage::seal_report& rep) {
  std::cerr << "provisiond: " << rep.unreadable_total
            << " stored values did not open and were left as they are (still sealed under "
               "their old key id, unreadable until restored from a backup or written again):\n"
            << "FAMILY          KEY ID            KEY  REASON\n";
  for (const auto& u : rep.unreadable) {
    std::string fam(prov::storage::to_string(u.family));
    fam.resize(std::max<std::size_t>(fam.size(), 15), ' ');
    std::string id = u.key_id.empty() ? "-" : u.key_id;
    id.resize(std::max<std::size_t>(id.size(), 17), ' ');
    std::cerr << fam << " " << id << " " << u.key << "  " << u.why << "\n";
  }
  if (rep.unreadable_total > rep.unreadable.size())
    std::cerr << "... and " << rep.unreadable_total - rep.unreadable.size() << " more\n";
  std::cerr << std::flush;
}

int rotate(const keys_args& a) {
  using namespace prov;
  config::engine_config cfg;
  if (auto err = load_cfg(a, cfg)) return fail(err.message);
  if (app::secrets_key_env_set())
    return fail(std::string("keys rotate adds the new key to the key file, but ") +
                app::secrets_key_env +
                " is set and would override it: write the variable's key lines into a key "
                "file (0600), unset the variable, rotate, then put the file's lines back "
                "into the variable (docs/security.md)");
  const std::string path = app::key_file_path(cfg);
  std::string invoker;
  if (auto err = become_data_dir_owner(cfg.data_dir, invoker)) return fail(err.message);
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
    audit_rotation(cfg, invoker, "", err);
    return fail(err.message);
  }
  storage::seal_report moved;
  if (auto err = st->attach_keyring(ring, /*reseal_all=*/true, moved)) {
    st->close();
    audit_rotation(cfg, invoker, ring->active_id(), err);
    return fail(err.message + " (the key file already has the new key " + ring->active_id() +
                "; values not re-encrypted yet still open with the older keys: run "
                "`provisiond keys rotate` again once the cause is fixed)");
  }
  st->close();
  const std::size_t done = moved.resealed + moved.sealed + rep.sealed;
  if (moved.unreadable_total > 0) {
    print_unreadable(moved);
    const error partial{error_code::storage_failure,
                        std::to_string(moved.unreadable_total) +
                          " values did not open and stay under their old key"};
    audit_rotation(cfg, invoker, ring->active_id(), partial);
    return fail("new active key " + ring->active_id() + " in '" + path + "'; re-encrypted " +
                std::to_string(done) + " values, " + std::to_string(moved.unreadable_total) +
                " did not open (table above). Keep the older key lines; `provisiond keys "
                "list` shows what each key still seals.");
  }
  audit_rotation(cfg, invoker, ring->active_id(), {});
  std::cout << "new active key " << ring->active_id() << " in '" << path << "'; re-encrypted "
            << done
            << " values. The older keys stay in the file: remove a line only when no "
               "backup of this data dir still needs it (docs/security.md)."
            << std::endl;
  if (cfg.kafka.enabled())
    std::cout << "Kafka mode: copy '" << path
              << "' to every other process sharing the enrollments topic and restart them "
                 "before this one starts (it seals with the new key; a process without it "
                 "refuses to start), and keep the older key lines while the topic may hold "
                 "records sealed under them (docs/security.md#kafka-mode)."
              << std::endl;
  return 0;
}

int list(const keys_args& a) {
  using namespace prov;
  config::engine_config cfg;
  if (auto err = load_cfg(a, cfg)) return fail(err.message);
  std::string invoker;
  if (auto err = become_data_dir_owner(cfg.data_dir, invoker)) return fail(err.message);
  std::shared_ptr<const storage::keyring> ring;
  if (auto err = app::env_keyring(ring)) return fail(err.message);
  if (!ring)
    if (auto err = storage::keyring::load(app::key_file_path(cfg), ring)) return fail(err.message);
  // Counts need the data dir, opened read-only: listing writes nothing there
  // (no LOG, OPTIONS or MANIFEST of root's, nothing for a backup to see
  // change), takes no lock (it works beside a running server, counting what
  // was written so far), and a missing db/ is not created.
  storage::key_usage usage;
  std::string no_counts;
  const std::string db = cfg.data_dir + "/db";
  struct stat st {};
  if (::stat((db + "/CURRENT").c_str(), &st) != 0) {
    no_counts = "no data dir at '" + cfg.data_dir + "'";
  } else {
    std::unique_ptr<storage::store> store;
    storage::store_options ro;
    ro.read_only = true;
    if (auto err = storage::store::open(db, ro, store))
      no_counts = err.message;
    else if (auto err2 = store->count_key_usage(usage))
      no_counts = err2.message;
  }
  auto count_of = [&](const std::string& id) -> std::size_t {
    for (const auto& [k, n] : usage.by_key_id)
      if (k == id) return n;
    return 0;
  };
  std::size_t old_values = 0, foreign_values = 0;
  for (const auto& id : ring->ids()) {
    std::cout << id;
    if (no_counts.empty()) {
      std::cout << " " << count_of(id) << " values";
      if (id != ring->active_id()) old_values += count_of(id);
    }
    std::cout << (id == ring->active_id() ? " active" : "") << "\n";
  }
  if (!no_counts.empty()) {
    std::cout << "(values per key not counted: " << no_counts << ")" << std::endl;
    return 0;
  }
  for (const auto& [id, n] : usage.by_key_id) {
    const auto ids = ring->ids();
    if (std::find(ids.begin(), ids.end(), id) != ids.end()) continue;
    std::cout << id << " " << n << " values NOT IN THE KEY FILE\n";
    foreign_values += n;
  }
  if (usage.plaintext > 0) std::cout << "plaintext " << usage.plaintext << " values\n";
  if (old_values > 0)
    std::cout << "note: " << old_values
              << " values are not under the active key: a rotation did not complete, or "
                 "left values that did not open (run `provisiond keys rotate` again; it names "
                 "them)\n";
  std::cout << std::flush;
  if (foreign_values > 0)
    return fail(std::to_string(foreign_values) +
                " values are sealed under key ids the key file does not hold: they do not "
                "open (restore the key line from a backup of the key file)");
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
  auto* ls = keys->add_subcommand("list", "List the key ids in the key file (the active one last) and how many stored values each seals");
  add_common(ls);
  ls->callback([args, &exit_code] { exit_code = list(*args); });
}
