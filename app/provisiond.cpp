// provisiond's composition root. Parses the command line and config, opens
// the store, starts the engine, the HTTPS gateway and the metrics exposer, and
// shuts them down in reverse order. main() is in main.cpp; the test binary
// (tests/testd/) runs the same code with its own extensions.

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <thread>

#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <sys/resource.h>

#include "actors/engine.hpp"
#include "app/client_commands.hpp"
#include "app/dev_kafka.hpp"
#include "app/identity.hpp"
#include "app/secrets.hpp"
#include "app/provisiond.hpp"
#include "app/signals.hpp"
#include "config/config.hpp"
#include "gateway/connection_slots.hpp"
#include "gateway/https_server.hpp"
#include "gateway/metrics_server.hpp"
#include "gateway/mqtt_server.hpp"
#include "net/tls_material.hpp"
#include "gateway/routes.hpp"
#include "metrics/diagnostic_log.hpp"
#include "metrics/instruments.hpp"
#include "storage/store.hpp"

namespace {

using namespace prov;

int die(const std::string& msg) {
  std::cerr << "provisiond: " << msg << std::endl;
  return 2;
}

bool make_dirs(const std::string& path) {
  std::string cur;
  for (std::size_t i = 0; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      if (!cur.empty() && ::mkdir(cur.c_str(), 0700) != 0 && errno != EEXIST)
        return false;
    }
    if (i < path.size())
      cur += path[i];
  }
  return true;
}

/// The data dir holds the owner keys, the CA key and enrollment keys (db/).
/// One that other users can enter is tightened to 0700 when it is ours
/// (`note` says so); else the start stops: the keys would be readable.
error secure_data_dir(const std::string& dir, std::string& note) {
  struct stat st{};
  if (::stat(dir.c_str(), &st) != 0)
    return {error_code::unavailable,
            "cannot inspect data directory '" + dir + "': " + std::strerror(errno)};
  const unsigned mode = st.st_mode & 07777;
  if ((mode & 077) == 0)
    return {};
  char octal[16];
  std::snprintf(octal, sizeof octal, "%04o", mode);
  if (st.st_uid != ::geteuid())
    return {error_code::unavailable,
            "data directory '" + dir + "' is mode " + octal + ", so other users can read the "
              + "keys in it, and it is owned by uid " + std::to_string(st.st_uid)
              + ", not by this user (uid " + std::to_string(::geteuid())
              + "): chmod 0700 it, or chown it to this user"};
  if (::chmod(dir.c_str(), 0700) != 0)
    return {error_code::unavailable, "data directory '" + dir + "' is mode " + octal
                                       + " and cannot be set to 0700: " + std::strerror(errno)};
  note = "data directory '" + dir + "' was mode " + octal
         + ", readable by other users; set it to 0700 (it holds keys)";
  return {};
}

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0)
    return {};
  return buf;
}

/// Raises the soft descriptor limit to the hard one: every connection is a
/// descriptor, and the usual soft default (1024) caps a server far below
/// what the machine allows. Returns the limit now in force (0 = unknown).
rlim_t raise_descriptor_limit() {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0)
    return 0;
  if (rl.rlim_cur < rl.rlim_max) {
    rlimit want = rl;
    want.rlim_cur = rl.rlim_max;
    if (want.rlim_cur == RLIM_INFINITY) {
      // Linux refuses an unlimited descriptor limit; fs.nr_open is the most.
      long nr_open = 0;
      if (FILE* f = std::fopen("/proc/sys/fs/nr_open", "r")) {
        if (std::fscanf(f, "%ld", &nr_open) != 1)
          nr_open = 0;
        std::fclose(f);
      }
      want.rlim_cur = nr_open > 0 ? static_cast<rlim_t>(nr_open) : rl.rlim_cur;
    }
    if (::setrlimit(RLIMIT_NOFILE, &want) == 0)
      rl = want;
  }
  return rl.rlim_cur;
}

/// Device API connections that leave `limit` descriptors room for the rest
/// of the process (RocksDB files, the log, the metrics listener, Kafka
/// sockets: about 30 when idle, plus an epoll, an eventfd and a timerfd per
/// I/O thread), so the cap is what refuses a flood, not running out of
/// descriptors.
int connections_within(rlim_t limit, int io_threads) {
  if (limit == 0 || limit == RLIM_INFINITY)
    return 0; // unknown: no cap
  const rlim_t reserve =
    std::clamp<rlim_t>(limit / 8, 64, 1024) + 3 * static_cast<rlim_t>(io_threads);
  if (limit <= reserve)
    return 1;
  return static_cast<int>(std::min<rlim_t>(limit - reserve, 10000000));
}

struct serve_args {
  std::string config_file;
  std::string data_dir;
  std::string listen;
  std::string metrics_listen;
  bool metrics_listen_set = false;
  std::string mqtt_listen;
  bool mqtt_listen_set = false;
  std::string roles; ///< "" = all
};

/// Gauges computed at scrape time from the engine, the store and the process.
void add_scrape_gauges(metrics::instruments& inst, engine& eng, storage::store& store,
                       metrics::diagnostic_log& dlog) {
  inst.add_gauge("dps_operations_inflight", "Accepted registrations not yet finished", "", "",
                 [&eng] { return static_cast<double>(eng.inflight()); });
  inst.add_gauge("dps_log_dropped_lines", "Diagnostic log lines dropped (writer behind)",
                 "", "", [&dlog] { return static_cast<double>(dlog.dropped()); });
  for (int i = 0; i < storage::cf_count; ++i) {
    auto family = static_cast<storage::cf>(i);
    inst.add_gauge("dps_storage_estimated_keys",
                   "RocksDB estimate of keys per column family", "column_family",
                   std::string(storage::to_string(family)), [&store, family] {
                     return static_cast<double>(
                       store.int_property(family, "rocksdb.estimate-num-keys"));
                   });
  }
  inst.add_gauge("dps_storage_memtable_bytes", "RocksDB memtable memory, all column families",
                 "", "", [&store] {
                   return static_cast<double>(
                     store.int_property("rocksdb.cur-size-all-mem-tables"));
                 });
  inst.add_gauge("dps_storage_sst_bytes", "RocksDB live SST file bytes", "", "", [&store] {
    return static_cast<double>(store.int_property("rocksdb.live-sst-files-size"));
  });
  inst.add_gauge("dps_storage_block_cache_bytes", "RocksDB block cache usage", "", "",
                 [&store] {
                   return static_cast<double>(
                     store.int_property(storage::cf::enrollments, "rocksdb.block-cache-usage"));
                 });
  inst.add_gauge("process_resident_memory_bytes", "Resident set size", "", "", [] {
    long pages = 0, resident = 0;
    if (FILE* f = std::fopen("/proc/self/statm", "r")) {
      if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2)
        resident = 0;
      std::fclose(f);
    }
    return static_cast<double>(resident) * static_cast<double>(::sysconf(_SC_PAGESIZE));
  });
  inst.add_gauge("process_cpu_seconds_total", "User and system CPU time", "", "", [] {
    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec)
           + static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
  });
}

int serve(const serve_args& args, const prov::app::extensions& ext) {
  config::engine_config cfg;
  if (!args.config_file.empty()) {
    if (auto err = config::load_file(args.config_file, cfg))
      return die(err.message);
  }
  if (!args.data_dir.empty())
    cfg.data_dir = args.data_dir;
  if (!args.listen.empty())
    cfg.device_api.listen = args.listen;
  if (args.metrics_listen_set)
    cfg.metrics.listen = args.metrics_listen;
  if (args.mqtt_listen_set)
    cfg.mqtt.listen = args.mqtt_listen;
  if (!args.roles.empty())
    if (auto err = config::parse_roles(args.roles, cfg.roles))
      return die(err.message);
  if (auto err = config::validate(cfg))
    return die(err.message);
  const rlim_t descriptors = raise_descriptor_limit();
  const int io_threads = cfg.device_api.threads > 0
                           ? cfg.device_api.threads
                           : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // The MQTT listener has as many I/O threads again (each an epoll, an
  // eventfd and a timerfd), and shares the connection caps (below).
  const bool mqtt_listener = cfg.roles.gateway && !cfg.mqtt.listen.empty();
  // MQTT over WebSocket runs on the HTTPS threads: no threads of its own.
  const bool mqtt_on = mqtt_listener || (cfg.roles.gateway && cfg.mqtt.websocket);
  const int fitting_connections =
    connections_within(descriptors, mqtt_listener ? 2 * io_threads : io_threads);
  int max_connections = cfg.device_api.max_connections;
  if (max_connections == 0)
    max_connections = fitting_connections;
  else if (fitting_connections > 0 && max_connections > fitting_connections)
    std::cerr << "provisiond: WARNING: device_api.max_connections = " << max_connections
              << " leaves too few of the " << descriptors
              << " file descriptors for the rest of the server (at most "
              << fitting_connections
              << " would): past that, accepting pauses until connections close\n";
  bool placeholder_hub = false;
  if (cfg.hubs.empty()) {
    // Nothing would be assignable without a hub; a placeholder keeps the
    // quickstart working until real [[hubs]] are configured.
    cfg.hubs.push_back({"hub.local", 1, true, "", ""});
    placeholder_hub = true;
  }
  if (!make_dirs(cfg.data_dir))
    return die("cannot create data directory '" + cfg.data_dir + "': " + std::strerror(errno));
  {
    std::string note;
    if (auto err = secure_data_dir(cfg.data_dir, note))
      return die(err.message);
    if (!note.empty())
      std::cerr << "provisiond: " << note << std::endl;
  }

  // Identity: id scope and owner policy, generated once.
  const auto service_host = cfg.device_api.hostnames.empty() ? std::string("localhost")
                                                             : cfg.device_api.hostnames[0];
  app::identity ident;
  bool created = false;
  if (auto err = app::load_or_create_identity(cfg.data_dir, service_host, ident, created))
    return die(err.message);
  std::string id_scope = cfg.id_scope ? *cfg.id_scope : ident.id_scope;
  std::vector<config::access_policy> policies = cfg.access_policies;
  if (policies.empty())
    policies.push_back({ident.policy_name, ident.primary_key, ident.secondary_key,
                        {"ServiceConfig", "EnrollmentRead", "EnrollmentWrite",
                         "RegistrationStatusRead", "RegistrationStatusWrite"}});

  // TLS material.
  std::string cert = cfg.device_api.tls_cert, key = cfg.device_api.tls_key;
  std::string ca_path;
  if (cert.empty()) {
    std::vector<std::string> sans = cfg.device_api.hostnames;
    for (const auto& s : {std::string("localhost"), std::string("127.0.0.1"), host_name()})
      if (!s.empty() && std::find(sans.begin(), sans.end(), s) == sans.end())
        sans.push_back(s);
    net::tls_paths paths;
    if (auto err = net::ensure_tls_material(cfg.data_dir + "/tls", sans, paths))
      return die(err.message);
    cert = paths.cert_pem;
    key = paths.key_pem;
    ca_path = paths.ca_pem;
  }

  // Diagnostic log and metrics first: everything after reports into them.
  std::unique_ptr<metrics::diagnostic_log> dlog;
  if (auto err = metrics::diagnostic_log::open({cfg.log.level, cfg.log.file}, dlog))
    return die(err.message);
  std::unique_ptr<metrics::diagnostic_log> audit;
  if (auto err = metrics::diagnostic_log::open({"info", app::audit_file_path(cfg)}, audit))
    return die(err.message);
  metrics::instruments inst;

  // Storage.
  std::unique_ptr<storage::store> store;
  storage::store_options store_opts;
  store_opts.block_cache_bytes = static_cast<std::size_t>(cfg.storage.block_cache_mb) << 20;
  store_opts.on_commit = [&inst](double secs, std::size_t batches, std::size_t bytes) {
    inst.storage_commit(secs, batches, bytes);
  };
  if (auto err = storage::store::open(cfg.data_dir + "/db", store_opts, store))
    return die(err.message);
  {
    // Secrets at rest: before anything reads or writes an enrollment.
    std::string note;
    if (auto err = app::open_secrets(cfg, *store, note))
      return die(err.message);
    if (!note.empty()) {
      std::cerr << "provisiond: " << note << std::endl;
      dlog->info(note);
    }
  }
  if (auto note = store->recovery_note(); !note.empty()) {
    auto line = cfg.data_dir + "/db: " + note
                + ". Expected after a power loss (the unsynced tail); otherwise check the disk.";
    std::cerr << "provisiond: WARNING: " << line << std::endl;
    dlog->warn(line);
  }

  // Engine.
  engine_options eopts;
  eopts.cfg = cfg;
  eopts.id_scope = id_scope;
  eopts.store = store.get();
  eopts.metrics = &inst;
  eopts.placeholder_hubs = placeholder_hub;
  eopts.policies = ext.policies;
  eopts.wrap_challenges = ext.wrap_challenges;
  eopts.in_challenge_write = ext.in_challenge_write;
  eopts.on_certificate_issued = [log = dlog.get()](std::string_view line) { log->info(line); };
  eopts.before_enrollments_apply = ext.before_enrollments_apply;
  std::unique_ptr<engine> eng;
  if (auto err = engine::start(eopts, eng))
    return die("engine: " + err.message);
  add_scrape_gauges(inst, *eng, *store, *dlog);

  // Gateway. One device API for both transports: its [throttling] quotas
  // (per scope, per device, per address) are one budget whichever protocol
  // a device or an address speaks.
  gateway::device_api device_api{*eng, id_scope, cfg.device_api.retry_after_seconds,
                                 cfg.throttling, &inst};
  gateway::routes_options ropts;
  ropts.api = &device_api;
  ropts.cfg = cfg;
  ropts.id_scope = id_scope;
  ropts.policies = policies;
  ropts.ready = [] { return true; };
  ropts.metrics = &inst;
  ropts.log = dlog.get();
  ropts.audit = audit.get();
  auto routes = gateway::make_routes(ropts, *eng);
  // One budget for both device listeners: the caps protect the descriptors
  // of one process, whichever protocol the connections speak.
  gateway::connection_slots device_slots{max_connections,
                                         cfg.device_api.max_connections_per_client};
  // What the two device listeners share: certificate, threads, timeouts, caps.
  auto device_settings = [&](gateway::listener_options& o, const std::string& listen) {
    o.listen = listen;
    o.cert_chain_file = cert;
    o.key_file = key;
    o.threads = cfg.device_api.threads;
    o.request_timeout_seconds = cfg.device_api.request_timeout_seconds;
    o.idle_timeout_seconds = cfg.device_api.idle_timeout_seconds;
    o.max_connections = max_connections;
    o.max_connections_per_client = cfg.device_api.max_connections_per_client;
    o.shared_slots = &device_slots;
    o.metrics = &inst;
    o.log = dlog.get();
  };
  gateway::server_options sopts;
  device_settings(sopts, cfg.device_api.listen);
  sopts.max_body_bytes = cfg.device_api.max_body_bytes;
  sopts.api = &device_api; // the per-address quota for WebSocket upgrades
  // The MQTT device transport: same certificate, threads count and timeouts
  // as the HTTPS device API, the same connection caps (shared: one count),
  // on its own listener and (WebSocket) on connections the HTTPS server
  // upgrades: so it starts first.
  std::unique_ptr<gateway::mqtt_server> mqtt;
  if (mqtt_on) {
    gateway::mqtt_server_options qopts;
    device_settings(qopts, mqtt_listener ? cfg.mqtt.listen : std::string());
    qopts.api = &device_api;
    qopts.id_scope = id_scope;
    qopts.retry_after_s = cfg.device_api.retry_after_seconds;
    qopts.max_packet_bytes = cfg.mqtt.max_packet_bytes;
    qopts.max_inflight = cfg.mqtt.max_inflight;
    if (auto err = gateway::mqtt_server::start(qopts, *eng, mqtt))
      return die(err.message + " (set [mqtt] listen to another address, or \"\" to turn "
                               "MQTT off)");
    const std::string help = "Open MQTT device connections, TLS handshakes included";
    if (mqtt_listener)
      inst.add_gauge("dps_mqtt_connections_open", help, "transport", "mqtt",
                     [&mqtt] { return static_cast<double>(mqtt->open_connections()); });
    if (cfg.mqtt.websocket)
      inst.add_gauge("dps_mqtt_connections_open", help, "transport", "mqtt_ws", [&mqtt] {
        return static_cast<double>(mqtt->open_websocket_connections());
      });
  }

  if (mqtt && cfg.mqtt.websocket)
    sopts.mqtt_ws = mqtt.get();
  std::unique_ptr<gateway::https_server> server;
  if (cfg.roles.gateway) {
    if (auto err = gateway::https_server::start(sopts, *routes, server))
      return die(err.message);
    inst.add_gauge("dps_connections_open",
                   "Open device API connections, TLS handshakes included (not those "
                   "upgraded to MQTT over WebSocket)",
                   "", "",
                   [&server] { return static_cast<double>(server->open_connections()); });
  }

  // Operations listener: /metrics, /healthz, /readyz (plain HTTP).
  std::unique_ptr<gateway::metrics_server> ops;
  std::string metrics_addr;
  std::atomic<bool> serving{false};
  if (!cfg.metrics.listen.empty()) {
    gateway::metrics_server_options mopts;
    mopts.listen = cfg.metrics.listen;
    mopts.scrape = [&inst] { return inst.scrape(); };
    mopts.not_ready_reason = [&serving, &store]() -> std::string {
      if (!serving.load())
        return "starting or stopping";
      // A background error (disk full, I/O error) makes RocksDB refuse writes.
      if (store->int_property(storage::cf::meta, "rocksdb.background-errors") > 0)
        return "storage has background errors (see the log); writes are refused";
      return {};
    };
    if (auto err = gateway::metrics_server::start(std::move(mopts), ops))
      return die(err.message);
    metrics_addr = ops->address() + ":" + std::to_string(ops->port());
  }
  serving = true;

  // Tell tools (CLI, tests) where we listen.
  std::string device_addr =
    server ? server->address() + ":" + std::to_string(server->port()) : std::string();
  const std::string mqtt_addr = mqtt && mqtt_listener
                                  ? mqtt->address() + ":" + std::to_string(mqtt->port())
                                  : std::string();
  const std::string mqtt_line =
    (mqtt_addr.empty() ? std::string("off") : "mqtts://" + mqtt_addr)
    + (server && sopts.mqtt_ws != nullptr ? ", and wss://" + device_addr + "/$iothub/websocket"
                                          : std::string());
  {
    nlohmann::json ep{{"device_api", device_addr},
                      {"mqtt", mqtt_addr},
                      {"metrics", metrics_addr},
                      {"pid", static_cast<int>(::getpid())},
                      {"id_scope", id_scope}};
    auto tmp = cfg.data_dir + "/endpoints.json.tmp";
    std::ofstream(tmp) << ep.dump() << "\n";
    std::rename(tmp.c_str(), (cfg.data_dir + "/endpoints.json").c_str());
  }
  const std::string api_line =
    server ? "https://" + device_addr : "none (roles: " + cfg.roles.to_string() + ")";
  dlog->info("serving: device API " + api_line + ", MQTT " + mqtt_line + ", metrics "
             + (metrics_addr.empty() ? std::string("disabled") : "http://" + metrics_addr)
             + ", id scope " + id_scope);
  std::cout << "provisiond serving\n"
            << "  id scope:          " << id_scope << "\n"
            << "  device/service API: " << api_line << "\n"
            << "  device MQTT:       "
            << mqtt_line << "\n"
            << "  metrics:           "
            << (metrics_addr.empty() ? "disabled" : "http://" + metrics_addr + "/metrics")
            << "\n"
            << "  data dir:          " << cfg.data_dir << "\n";
  if (server) {
    std::cout << "  connections:       "
              << (max_connections > 0 ? "at most " + std::to_string(max_connections)
                                      : std::string("no cap"));
    if (cfg.device_api.max_connections_per_client > 0)
      std::cout << ", " << cfg.device_api.max_connections_per_client << " per client";
    std::cout << " (file descriptor limit "
              << (descriptors == 0 ? std::string("unknown") : std::to_string(descriptors))
              << ")\n";
  }
  if (!ca_path.empty())
    std::cout << "  TLS CA:            " << ca_path << "\n";
  // The key only goes to a terminal: under systemd or a log collector,
  // stdout is kept (the journal) and readable by more people than the key.
  if (::isatty(STDOUT_FILENO) == 1) {
    std::cout << "  connection string: "
              << app::connection_string(
                   {id_scope, service_host, policies[0].name, policies[0].primary_key, {}})
              << "\n";
  } else {
    auto arg = [](const std::string& v) { // quoted for a shell when it needs it
      if (v.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                              "0123456789/._-+=:,@")
          == std::string::npos)
        return v;
      std::string q = "'";
      for (char c : v)
        q += c == '\'' ? std::string("'\\''") : std::string(1, c);
      return q + "'";
    };
    std::cout << "  connection string: not shown (stdout is not a terminal); run "
              << "provisiond connection-string"
              << (args.config_file.empty() ? "" : " --config " + arg(args.config_file))
              << " --data-dir " << arg(cfg.data_dir) << "\n";
  }
  std::cout << "  linked hubs:       ";
  {
    // The stored set: [[hubs]] seeds only the first start.
    std::vector<nlohmann::json> hubs;
    if (!eng->list_hubs(hubs))
      for (std::size_t i = 0; i < hubs.size(); ++i)
        std::cout << (i ? ", " : "") << hubs[i].value("name", std::string());
    bool only_placeholder = hubs.size() == 1 && hubs[0].value("name", std::string()) == "hub.local";
    std::cout << (only_placeholder ? " (placeholder: add [[hubs]] to the config, or "
                                     "provisiond hubs add)"
                                   : "")
              << "\n";
  }
  if (cfg.kafka.enabled())
    std::cout << "  kafka:             " << cfg.kafka.brokers << " (roles: "
              << cfg.roles.to_string() << ")\n";
  std::cout << std::flush;

  int sig = app::wait_for_stop_signal();
  std::cout << "provisiond: stopping (signal " << sig << ")" << std::endl;
  dlog->info("stopping on signal " + std::to_string(sig));
  serving = false;
  // Intake stops first, while the device API still answers: registers parked
  // for their outcome get it (or a 202) instead of a dropped connection.
  eng->drain();
  // Both listeners stop taking clients before either waits up to 2 s for
  // its answers in flight. MQTT first: from here its sessions take no new
  // request (a WebSocket one closes with 1001), so once the port refuses
  // connections no request is taken that might go unanswered.
  if (mqtt)
    mqtt->stop_accepting();
  if (server)
    server->stop_accepting();
  if (ext.listeners_stopping)
    ext.listeners_stopping();
  // MQTT first: it waits until the answers of its WebSocket sessions too
  // are written, which the HTTPS threads do.
  if (mqtt)
    mqtt->stop();
  if (server)
    server->stop();
  eng->shutdown();
  inst.clear_gauges(); // they read the engine and the store
  eng.reset();
  store->close();
  if (ops)
    ops->stop();
  dlog->flush();
  std::remove((cfg.data_dir + "/endpoints.json").c_str());
  return 0;
}

} // namespace

int prov::app::run(int argc, char** argv, const extensions& ext) {
  // The master key out of the environment before any thread could read or
  // inherit it (docs/security.md#keys-from-the-environment).
  app::take_secrets_key_env();
  // Block the stop signals in every thread; serve() waits for them.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
  // Everything provisiond creates is private: the data dir holds keys
  // (identity.json, tls/*.key, enrollment keys in RocksDB's files).
  ::umask(077);

  CLI::App app{"provisiond: a self-hosted, Azure DPS compatible device provisioning engine"};
  app.require_subcommand(1);
  int exit_code = 0;

  serve_args sa;
  auto* serve_cmd = app.add_subcommand("serve", "Run the provisioning service");
  serve_cmd->add_option("--config", sa.config_file, "TOML configuration file");
  serve_cmd->add_option("--data-dir", sa.data_dir, "Data directory (default ./data)");
  serve_cmd->add_option("--listen", sa.listen,
                        "Device and service API address HOST:PORT (default 0.0.0.0:8443)");
  serve_cmd->add_option("--metrics-listen", sa.metrics_listen,
                        "Metrics address HOST:PORT, \"\" to disable (default 127.0.0.1:9464)")
    ->each([&](const std::string&) { sa.metrics_listen_set = true; });
  serve_cmd->add_option("--mqtt-listen", sa.mqtt_listen,
                        "MQTT device transport address HOST:PORT, \"\" to disable "
                        "(default 0.0.0.0:8883)")
    ->each([&](const std::string&) { sa.mqtt_listen_set = true; });
  serve_cmd->add_option("--roles", sa.roles,
                        "Stages this process runs, comma-separated: gateway, registration, "
                        "attestation, allocation, configuration (default all). Splitting "
                        "needs [kafka] brokers; gateway and registration go together");
  serve_cmd->callback([&] { exit_code = serve(sa, ext); });

  std::string cs_dir, cs_config;
  auto* cs_cmd = app.add_subcommand("connection-string",
                                    "Print the service connection string of a data dir");
  cs_cmd->add_option("--data-dir", cs_dir, "Data directory (default ./data)");
  cs_cmd->add_option("--config", cs_config,
                     "Config file: use its data_dir, host name and first access policy");
  cs_cmd->callback([&] {
    config::engine_config cfg;
    if (!cs_config.empty())
      if (auto err = config::load_file(cs_config, cfg)) {
        exit_code = die(err.message);
        return;
      }
    if (!cs_dir.empty())
      cfg.data_dir = cs_dir;
    app::identity id;
    if (auto err = app::load_identity(cfg.data_dir, id)) {
      exit_code = die(err.message);
      return;
    }
    // What serve would accept: configured policies replace the generated one.
    if (!cs_config.empty()) {
      if (!cfg.device_api.hostnames.empty())
        id.service_host = cfg.device_api.hostnames[0];
      if (!cfg.access_policies.empty()) {
        id.policy_name = cfg.access_policies[0].name;
        id.primary_key = cfg.access_policies[0].primary_key;
      }
    }
    std::cout << app::connection_string(id) << std::endl;
  });

  add_client_commands(app, exit_code);
  add_dev_kafka_command(app, exit_code);
  add_keys_command(app, exit_code);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
