// provisiond: the composition root. Parses the command line and config, opens
// the store, starts the engine, the HTTPS gateway and the metrics exposer, and
// shuts them down in reverse order.

#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>

#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <prometheus/exposer.h>
#include <prometheus/registry.h>

#include "actors/engine.hpp"
#include "app/client_commands.hpp"
#include "app/dev_kafka.hpp"
#include "app/identity.hpp"
#include "config/config.hpp"
#include "gateway/https_server.hpp"
#include "gateway/net/tls_material.hpp"
#include "gateway/routes.hpp"
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

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0)
    return {};
  return buf;
}

struct serve_args {
  std::string config_file;
  std::string data_dir;
  std::string listen;
  std::string metrics_listen;
  bool metrics_listen_set = false;
};

int serve(const serve_args& args) {
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
  if (auto err = config::validate(cfg))
    return die(err.message);
  bool placeholder_hub = false;
  if (cfg.hubs.empty()) {
    // Nothing would be assignable without a hub; a placeholder keeps the
    // quickstart working until real [[hubs]] are configured.
    cfg.hubs.push_back({"hub.local", 1, true, ""});
    placeholder_hub = true;
  }
  if (!make_dirs(cfg.data_dir))
    return die("cannot create data directory '" + cfg.data_dir + "': " + std::strerror(errno));

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

  // Storage.
  std::unique_ptr<storage::store> store;
  if (auto err = storage::store::open(cfg.data_dir + "/db", {}, store))
    return die(err.message);

  // Engine.
  engine_options eopts;
  eopts.cfg = cfg;
  eopts.id_scope = id_scope;
  eopts.store = store.get();
  std::unique_ptr<engine> eng;
  if (auto err = engine::start(eopts, eng))
    return die("engine: " + err.message);

  // Metrics exposer (counters arrive with the metrics work; the endpoint is up).
  std::unique_ptr<prometheus::Exposer> exposer;
  auto registry = std::make_shared<prometheus::Registry>();
  std::string metrics_addr;
  if (!cfg.metrics.listen.empty()) {
    try {
      exposer = std::make_unique<prometheus::Exposer>(cfg.metrics.listen);
      exposer->RegisterCollectable(registry);
      auto ports = exposer->GetListeningPorts();
      std::string host;
      uint16_t port = 0;
      config::split_host_port(cfg.metrics.listen, host, port);
      metrics_addr = host + ":" + std::to_string(ports.empty() ? port : ports.front());
    } catch (const std::exception& e) {
      return die("metrics: cannot listen on " + cfg.metrics.listen + ": " + e.what());
    }
  }

  // Gateway.
  gateway::routes_options ropts;
  ropts.cfg = cfg;
  ropts.id_scope = id_scope;
  ropts.policies = policies;
  ropts.ready = [] { return true; };
  auto routes = gateway::make_routes(ropts, *eng);
  gateway::server_options sopts;
  sopts.listen = cfg.device_api.listen;
  sopts.cert_chain_file = cert;
  sopts.key_file = key;
  sopts.threads = cfg.device_api.threads;
  sopts.max_body_bytes = cfg.device_api.max_body_bytes;
  sopts.request_timeout_seconds = cfg.device_api.request_timeout_seconds;
  sopts.idle_timeout_seconds = cfg.device_api.idle_timeout_seconds;
  std::unique_ptr<gateway::https_server> server;
  if (auto err = gateway::https_server::start(sopts, *routes, server))
    return die(err.message);

  // Tell tools (CLI, tests) where we listen.
  std::string device_addr = server->address() + ":" + std::to_string(server->port());
  {
    nlohmann::json ep{{"device_api", device_addr},
                      {"metrics", metrics_addr},
                      {"pid", static_cast<int>(::getpid())},
                      {"id_scope", id_scope}};
    auto tmp = cfg.data_dir + "/endpoints.json.tmp";
    std::ofstream(tmp) << ep.dump() << "\n";
    std::rename(tmp.c_str(), (cfg.data_dir + "/endpoints.json").c_str());
  }
  std::cout << "provisiond serving\n"
            << "  id scope:          " << id_scope << "\n"
            << "  device/service API: https://" << device_addr << "\n"
            << "  metrics:           "
            << (metrics_addr.empty() ? "disabled" : "http://" + metrics_addr + "/metrics")
            << "\n"
            << "  data dir:          " << cfg.data_dir << "\n";
  if (!ca_path.empty())
    std::cout << "  TLS CA:            " << ca_path << "\n";
  std::cout << "  connection string: " << app::connection_string(
                 {id_scope, service_host, policies[0].name, policies[0].primary_key, {}})
            << "\n"
            << "  linked hubs:       ";
  for (std::size_t i = 0; i < cfg.hubs.size(); ++i)
    std::cout << (i ? ", " : "") << cfg.hubs[i].hostname;
  std::cout << (placeholder_hub ? " (placeholder: add [[hubs]] to the config)" : "")
            << std::endl;

  // Wait for SIGINT/SIGTERM.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  int sig = 0;
  sigwait(&set, &sig);
  std::cout << "provisiond: stopping (signal " << sig << ")" << std::endl;
  server->stop();
  eng->shutdown();
  eng.reset();
  store->close();
  exposer.reset();
  std::remove((cfg.data_dir + "/endpoints.json").c_str());
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  // Block the stop signals in every thread; serve() waits for them.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

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
  serve_cmd->callback([&] { exit_code = serve(sa); });

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

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
