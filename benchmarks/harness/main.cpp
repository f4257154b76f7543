// provisiond-bench: spawns (or targets) a provisiond server, creates an
// enrollment group (or N individual enrollments), and registers devices the
// way an SDK does: PUT register with a SAS token, then poll the operation
// until it is terminal (or, with --kafka --direct, publishes
// registration.requested to Kafka and reads registration.completed). Prints
// measured numbers only. See docs/benchmarking.md.

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>
#include <thread>

#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <openssl/ssl.h>
#include <nlohmann/json.hpp>

#include "actors/attestation/sas_token.hpp"
#include "benchmarks/harness/direct.hpp"
#include "benchmarks/harness/kafka_mode.hpp"
#include "benchmarks/harness/load.hpp"
#include "benchmarks/harness/process.hpp"
#include "gateway/https_server.hpp"
#include "net/https_client.hpp"
#include "net/tls_material.hpp"
#include "messages/crypto.hpp"
#include "tests/support/test_certs.hpp"

namespace {

using namespace bench;
using steady = std::chrono::steady_clock;

std::atomic<bool> g_interrupted{false};

struct options {
  std::string mode = "keepalive";
  bool reference = false;
  uint64_t devices = 1000;
  double duration_s = 0;
  double rate = 0;
  int concurrency = 100;
  int threads = 1;
  int poll_interval_ms = -1;
  int request_timeout_s = 30;
  int device_timeout_s = 120;
  std::string json_file;
  bool no_progress = false;
  std::string id_prefix;
  std::string api_version = "2021-06-01";

  // Spawned server.
  std::string server_bin;
  std::string config_file;
  std::string data_dir;
  bool keep_data = false;
  int register_wait_ms = -1; ///< device_api.register_wait_ms of spawned servers; -1 = default
  /// --webhook: the group's allocationPolicy is custom, answered by a local
  /// HTTPS webhook in this process (set by main: its URL and CA file).
  bool webhook = false;
  int webhook_client_threads = 0; ///< custom_allocation.threads of the server; 0 = its default
  /// --allocation-policy hashed|geoLatency: the group's allocationPolicy;
  /// the spawned server gets three hubs in three regions and a latency
  /// table (the same for both, so the two compare on the same hubs).
  std::string allocation_policy;
  std::string webhook_url;
  std::string webhook_ca;

  // External server.
  std::string target;
  std::string connection_string;
  std::string id_scope;
  std::string ca_file;
  bool insecure = false;
  std::string tls_name;
  int server_pid = 0;

  // Enrollments.
  std::string group_id = "bench-group";
  std::string group_key;
  uint64_t individual = 0;
  int enroll_concurrency = 16;
  std::string enrollment_key;
  bool enrolled = false; ///< the individual enrollments exist already: no creation

  // Reference.
  std::string nginx_bin = "/usr/sbin/nginx";
  uint64_t reference_count = 0;
  int reference_workers = 0;
  int rounds = 3;

  // Kafka mode.
  bool kafka = false;
  int kafka_workers = 2;
  int kafka_partitions = 6;
  int kafka_brokers = 1;
  std::vector<std::string> kafka_properties;
  bool kafka_unfused = false;
  uint64_t kafka_warmup = 100;
  int kafka_start_timeout_s = 60;
  bool direct = false; ///< --kafka --direct: produce registration.requested, no HTTPS
  /// --x509: X.509 devices (ECDSA P-256 leaf certificates issued by a CA made
  /// at start, an enrollment group whose signing certificate it is), newconn.
  bool x509 = false;
};

/// The server under test, however it was found.
struct server_info {
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  uint16_t mqtt_port = 0; ///< spawned: its MQTT listener
  std::string id_scope;
  std::string ca_file;
  std::string tls_name;
  std::string service_host = "localhost";
  std::string policy = "provisioningserviceowner";
  std::string policy_key;
  pid_t pid = 0;
  std::string data_dir; ///< spawned: its data dir
  std::string cert_pem, key_pem; ///< spawned: its TLS material (for nginx)
};

void log(const std::string& s) {
  std::cerr << "provisiond-bench: " << s << std::endl;
}

// -- numbers ----------------------------------------------------------------------------

struct pct {
  std::size_t n = 0;
  double p50 = 0, p95 = 0, p99 = 0, max = 0, mean = 0;
};

pct percentiles(std::vector<double> v) {
  pct r;
  r.n = v.size();
  if (v.empty())
    return r;
  std::sort(v.begin(), v.end());
  auto at = [&](double p) {
    auto rank = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
    return v[std::min(v.size() - 1, rank ? rank - 1 : 0)];
  };
  r.p50 = at(50);
  r.p95 = at(95);
  r.p99 = at(99);
  r.max = v.back();
  double sum = 0;
  for (double x : v)
    sum += x;
  r.mean = sum / static_cast<double>(v.size());
  return r;
}

nlohmann::json to_json(const pct& p) {
  return {{"n", p.n}, {"p50", p.p50}, {"p95", p.p95}, {"p99", p.p99}, {"max", p.max},
          {"mean", p.mean}};
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

/// Server/machine resource use around one phase.
/// A server process whose CPU and memory a phase reports.
struct watched {
  std::string name; ///< "gateway", "worker-1", ... (Kafka mode); "" for the one server
  pid_t pid = 0;
  bool tree = false; ///< include its direct children (nginx master + workers)
};

struct usage {
  proc_sample server0, server1; ///< summed over `procs`
  std::vector<watched> procs;
  std::vector<proc_sample> each0, each1; ///< per entry of `procs`
  bool per_process = false; ///< Kafka mode: print the per-process table
  /// Kafka mode: CPU of the harness's librdkafka threads (the in-process
  /// mock broker) over the phase; < 0 = not measured.
  double mock_cpu = -1;
  machine_sample m0, m1;
  std::string load0, load1;
  double server_cpu() const { return server1.cpu_seconds - server0.cpu_seconds; }
  double cpu_of(std::size_t i) const { return each1[i].cpu_seconds - each0[i].cpu_seconds; }
  double machine_busy() const { return m1.busy - m0.busy; }
  double machine_total() const { return m1.total - m0.total; }
};

proc_sample sample_server(pid_t pid, bool tree = false) {
  if (pid <= 0)
    return {};
  return tree ? sample_process_tree(pid) : sample_process(pid);
}

/// Samples every watched process; returns their sum (ok only if all are).
proc_sample sample_servers(const std::vector<watched>& procs, std::vector<proc_sample>& each) {
  each.clear();
  proc_sample sum;
  sum.ok = !procs.empty();
  for (const auto& w : procs) {
    each.push_back(sample_server(w.pid, w.tree));
    const auto& x = each.back();
    sum.ok = sum.ok && x.ok;
    sum.cpu_seconds += x.cpu_seconds;
    sum.rss_kb += x.rss_kb;
    sum.hwm_kb += x.hwm_kb;
  }
  return sum;
}

/// librdkafka names its threads "rdk:...". The mock cluster's are the ones
/// alive right after it started: --direct adds the harness's own clients.
constexpr const char* mock_thread_prefix = "rdk:";
std::vector<long> g_mock_threads;

// -- progress line -------------------------------------------------------------------------

class progress {
public:
  progress(std::string label, uint64_t total, bool enabled)
    : label_(std::move(label)), total_(total), enabled_(enabled), tty_(::isatty(2) != 0) {}

  void operator()(double t, uint64_t done, uint64_t failed) {
    if (!enabled_)
      return;
    if (t - last_t_ < (tty_ ? 0.25 : 1.0))
      return;
    double rate = (static_cast<double>(done) - static_cast<double>(last_done_)) / (t - last_t_);
    last_t_ = t;
    last_done_ = done;
    char line[256];
    std::snprintf(line, sizeof line,
                  "[%s] %6.1fs  %llu%s%s done  %.0f/s now  %.0f/s avg  errors %llu",
                  label_.c_str(), t, static_cast<unsigned long long>(done),
                  total_ ? "/" : "", total_ ? std::to_string(total_).c_str() : "", rate,
                  t > 0 ? static_cast<double>(done) / t : 0.0,
                  static_cast<unsigned long long>(failed));
    if (tty_)
      std::fprintf(stderr, "\r%s\033[K", line);
    else
      std::fprintf(stderr, "%s\n", line);
    std::fflush(stderr);
    printed_ = true;
  }

  void end() {
    if (enabled_ && tty_ && printed_)
      std::fprintf(stderr, "\n");
  }

private:
  std::string label_;
  uint64_t total_;
  bool enabled_, tty_;
  double last_t_ = 0;
  uint64_t last_done_ = 0;
  bool printed_ = false;
};

// -- server setup --------------------------------------------------------------------------

bool parse_connection_string(const std::string& cs, server_info& s) {
  std::stringstream ss(cs);
  std::string part;
  while (std::getline(ss, part, ';')) {
    auto eq = part.find('=');
    if (eq == std::string::npos)
      continue;
    auto k = part.substr(0, eq), v = part.substr(eq + 1);
    if (k == "HostName")
      s.service_host = v;
    else if (k == "SharedAccessKeyName")
      s.policy = v;
    else if (k == "SharedAccessKey")
      s.policy_key = v;
  }
  return !s.policy_key.empty();
}

int spawn_server(const options& o, child_process& server, server_info& s, bool& own_dir) {
  std::string bin = o.server_bin.empty() ? self_dir() + "/provisiond" : o.server_bin;
  if (!file_exists(bin)) {
    log("server binary " + bin + " not found (build it, or pass --server-bin / --target)");
    return 2;
  }
  own_dir = o.data_dir.empty();
  s.data_dir = own_dir ? make_temp_dir("provisiond-bench") : o.data_dir;
  if (s.data_dir.empty()) {
    log("cannot create a temp dir");
    return 2;
  }
  ::unlink((s.data_dir + "/endpoints.json").c_str());
  std::vector<std::string> argv{bin, "serve"};
  std::string config_file = o.config_file;
  const bool geo = !o.allocation_policy.empty(); // the hubs and regions
  if (o.register_wait_ms >= 0 || o.webhook || geo) { // main() rejects these with --config
    config_file = s.data_dir + "/bench.toml";
    std::ofstream f(config_file);
    f << "# generated by provisiond-bench\n";
    if (o.register_wait_ms >= 0)
      f << "[device_api]\nregister_wait_ms = " << o.register_wait_ms << "\n";
    if (o.webhook) {
      f << "[custom_allocation]\nca_file = \"" << o.webhook_ca << "\"\n";
      if (o.webhook_client_threads > 0)
        f << "threads = " << o.webhook_client_threads << "\n";
    }
    if (geo) {
      // Devices are in the gateway's region (no payload, no client ranges):
      // the table's figures are the estimates (the hubs have no health
      // endpoint, so no probe RTT), and tie_ms = 25 ties the two European
      // hubs, so the tie is hashed too: every step of the policy runs.
      f << "[geo_latency]\nregion = \"westeurope\"\ntie_ms = 25\n";
      for (const auto& [to, ms] : {std::pair<const char*, int>{"northeurope", 20}, {"eastus", 85}})
        f << "[[geo_latency.latencies]]\nfrom = \"westeurope\"\nto = \"" << to
          << "\"\nms = " << ms << "\n";
      for (const char* region : {"westeurope", "northeurope", "eastus"})
        f << "[[hubs]]\nhostname = \"bench-" << region << ".example.net\"\nregion = \""
          << region << "\"\n";
    }
    if (!f) {
      log("cannot write " + config_file);
      return 2;
    }
  }
  if (!config_file.empty()) {
    argv.push_back("--config");
    argv.push_back(config_file);
  }
  for (const char* a : {"--data-dir", "", "--listen", "127.0.0.1:0", "--metrics-listen",
                        "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"})
    argv.push_back(*a ? a : s.data_dir);
  std::string err;
  if (!server.start(argv, s.data_dir + "/server.log", err)) {
    log(err);
    return 2;
  }
  auto deadline = steady::now() + std::chrono::seconds(60);
  while (true) {
    auto j = nlohmann::json::parse(read_file(s.data_dir + "/endpoints.json"), nullptr, false);
    if (j.is_object() && j.contains("device_api")) {
      auto addr = j.value("device_api", "");
      s.port = static_cast<uint16_t>(std::stoi(addr.substr(addr.rfind(':') + 1)));
      auto mq = j.value("mqtt", "");
      if (!mq.empty())
        s.mqtt_port = static_cast<uint16_t>(std::stoi(mq.substr(mq.rfind(':') + 1)));
      s.id_scope = j.value("id_scope", "");
      s.pid = j.value("pid", 0);
      break;
    }
    if (!server.alive()) {
      log("the server exited during start; its log (" + s.data_dir + "/server.log):\n"
          + read_file(s.data_dir + "/server.log"));
      return 2;
    }
    if (steady::now() > deadline) {
      log("the server did not write endpoints.json within 60 s");
      return 2;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  auto ident = nlohmann::json::parse(read_file(s.data_dir + "/identity.json"), nullptr, false);
  if (!ident.is_object()) {
    log("cannot read " + s.data_dir + "/identity.json");
    return 2;
  }
  s.policy = ident.value("policy_name", "provisioningserviceowner");
  s.policy_key = ident.value("primary_key", "");
  s.service_host = ident.value("service_host", "localhost");
  s.ca_file = s.data_dir + "/tls/ca.pem";
  s.cert_pem = s.data_dir + "/tls/server.pem";
  s.key_pem = s.data_dir + "/tls/server.key";
  s.tls_name = "127.0.0.1";
  if (s.pid <= 0)
    s.pid = server.pid();
  return 0;
}

/// --kafka: the mock cluster and the processes (kafka_mode.hpp); `s` becomes
/// the gateway (the all-roles process with --kafka-workers 0).
int start_kafka(const options& o, kafka_deployment& kd, server_info& s, bool& own_dir) {
  kafka_options ko;
  ko.server_bin = o.server_bin.empty() ? self_dir() + "/provisiond" : o.server_bin;
  if (!file_exists(ko.server_bin)) {
    log("server binary " + ko.server_bin + " not found (build it, or pass --server-bin)");
    return 2;
  }
  for (const auto& kv : o.kafka_properties)
    if (kv.find('=') == std::string::npos || kv[0] == '=') {
      log("--kafka-property expects NAME=VALUE, got '" + kv + "'");
      return 2;
    }
  own_dir = o.data_dir.empty();
  s.data_dir = own_dir ? make_temp_dir("provisiond-bench-kafka") : o.data_dir;
  if (s.data_dir.empty() || (::mkdir(s.data_dir.c_str(), 0700) != 0 && errno != EEXIST)) {
    log("cannot create the data dir " + s.data_dir);
    return 2;
  }
  ko.root_dir = s.data_dir;
  ko.workers = o.kafka_workers;
  ko.partitions = o.kafka_partitions;
  ko.brokers = o.kafka_brokers;
  ko.properties = o.kafka_properties;
  ko.fuse_stages = !o.kafka_unfused;
  ko.start_timeout_s = o.kafka_start_timeout_s;
  ko.interrupted = &g_interrupted;
  // One id scope and one owner policy in every process's config.
  ko.id_scope = "0ne" + prov::crypto::hex(prov::crypto::random_bytes(4));
  std::transform(ko.id_scope.begin() + 3, ko.id_scope.end(), ko.id_scope.begin() + 3,
                 [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  ko.register_wait_ms = o.register_wait_ms;
  ko.policy_name = "provisioningserviceowner";
  ko.policy_key = prov::crypto::generate_key();
  std::string err;
  if (!kd.start(ko, err)) {
    log(err);
    kd.stop(10);
    log("data dir kept (configs and logs): " + s.data_dir);
    return 2;
  }
  auto& g = kd.front();
  auto j = nlohmann::json::parse(read_file(g.dir + "/endpoints.json"), nullptr, false);
  auto addr = j.value("device_api", "");
  s.port = static_cast<uint16_t>(std::stoi(addr.substr(addr.rfind(':') + 1)));
  s.id_scope = j.value("id_scope", ko.id_scope);
  s.pid = g.pid;
  s.policy = ko.policy_name;
  s.policy_key = ko.policy_key;
  s.service_host = "localhost"; // device_api.hostnames[0], the default
  s.ca_file = g.dir + "/tls/ca.pem";
  s.cert_pem = g.dir + "/tls/server.pem";
  s.key_pem = g.dir + "/tls/server.key";
  s.tls_name = "127.0.0.1";
  log("kafka mode: " + std::to_string(kd.processes().size()) + " process(es) ready, "
      + g.name + " on 127.0.0.1:" + std::to_string(s.port) + ", data dir " + s.data_dir
      + ", id scope " + s.id_scope);
  return 0;
}

std::string service_auth(const server_info& s) {
  return prov::attestation::make_sas(s.service_host, s.policy_key, ::time(nullptr) + 24 * 3600,
                                     s.policy);
}

prov::net::https_client service_client(const server_info& s, bool insecure) {
  prov::net::https_client_options co;
  co.host = s.host;
  co.port = s.port;
  co.ca_file = s.ca_file;
  co.server_name = s.tls_name;
  co.insecure_skip_verify = insecure;
  return prov::net::https_client(co);
}

/// --webhook: a custom allocation webhook that answers at once, with the
/// linked hub chosen by the registration id's hash (so the server's cost of
/// the policy is measured, not the webhook's).
class bench_webhook_handler final : public prov::gateway::handler {
public:
  std::atomic<uint64_t> calls{0};
  void handle(prov::gateway::http_request req, prov::gateway::respond_fn respond) override {
    calls.fetch_add(1, std::memory_order_relaxed);
    prov::gateway::http_response r;
    r.headers.emplace_back("Content-Type", "application/json");
    auto j = nlohmann::json::parse(req.body, nullptr, false);
    const nlohmann::json* hubs = j.is_object() ? &j["linkedHubs"] : nullptr;
    if (hubs == nullptr || !hubs->is_array() || hubs->empty()) {
      r.status = 400;
      respond(std::move(r));
      return;
    }
    auto id = j["deviceRuntimeContext"].value("registrationId", "");
    auto& hub = (*hubs)[std::hash<std::string>{}(id) % hubs->size()];
    r.body = nlohmann::json{{"iotHubHostName", hub}, {"payload", {{"bench", true}}}}.dump();
    respond(std::move(r));
  }
};

struct bench_webhook {
  std::string dir;
  bench_webhook_handler handler;
  std::unique_ptr<prov::gateway::https_server> server;
  ~bench_webhook() {
    if (server) {
      server->stop();
      log("webhook: " + std::to_string(handler.calls.load()) + " calls answered");
    }
    if (!dir.empty())
      std::system(("rm -rf '" + dir + "'").c_str());
  }
};

int start_webhook(options& o, bench_webhook& w) {
  w.dir = make_temp_dir("provisiond-bench-webhook");
  prov::net::tls_paths tls;
  if (w.dir.empty()) {
    log("cannot create a temp dir");
    return 2;
  }
  if (auto err = prov::net::ensure_tls_material(w.dir, {"localhost", "127.0.0.1"}, tls)) {
    log("webhook TLS material: " + err.message);
    return 2;
  }
  prov::gateway::server_options so;
  so.listen = "127.0.0.1:0";
  so.cert_chain_file = tls.cert_pem;
  so.key_file = tls.key_pem;
  so.threads = 1;
  if (auto err = prov::gateway::https_server::start(so, w.handler, w.server)) {
    log("webhook: " + err.message);
    return 2;
  }
  o.webhook_ca = tls.ca_pem;
  o.webhook_url = "https://localhost:" + std::to_string(w.server->port()) + "/allocate?code=bench";
  log("webhook on " + o.webhook_url);
  return 0;
}

/// --x509: a P-256 root CA, its enrollment group `<group id>-x509`
/// (signingCertificates), and one P-256 leaf per device (CN = its
/// registration id), all made before the measured phase; `lo` presents
/// device i's certificate in its handshake.
int x509_fleet(const options& o, const server_info& s, uint64_t devices, load_options& lo) {
  struct fleet {
    prov::test::test_cert root;
    std::vector<prov::test::test_cert> leaves;
  };
  auto f = std::make_shared<fleet>();
  f->root = prov::test::make_ca("provisiond-bench root " + o.id_prefix, nullptr, 1);
  const std::string group = o.group_id + "-x509";
  auto c = service_client(s, o.insecure);
  prov::net::http_headers h;
  h.add("Authorization", service_auth(s));
  h.add("Content-Type", "application/json; charset=utf-8");
  nlohmann::json body{
    {"enrollmentGroupId", group},
    {"attestation",
     {{"type", "x509"},
      {"x509", {{"signingCertificates", {{"primary", {{"certificate", f->root.pem()}}}}}}}}}};
  prov::net::https_response r;
  if (auto err = c.request("PUT", "/enrollmentGroups/" + group + "?api-version=2021-10-01", h,
                           body.dump(), r)) {
    log("service API: " + err.message);
    return 2;
  }
  if (r.status != 200) {
    log("creating enrollment group '" + group + "' failed: HTTP " + std::to_string(r.status)
        + " " + r.body);
    return 2;
  }
  const auto start = std::chrono::steady_clock::now();
  const std::string prefix = o.id_prefix + "x509-";
  f->leaves.reserve(devices);
  for (uint64_t i = 0; i < devices; ++i)
    f->leaves.push_back(
      prov::test::make_device(prefix + std::to_string(i), f->root, static_cast<long>(1000 + i)));
  log("enrollment group '" + group + "' (X.509, P-256 root); " + std::to_string(devices)
      + " device certificates made in "
      + std::to_string(std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
                         .count())
      + " s");
  lo.registration_id = [prefix](uint64_t i) { return prefix + std::to_string(i); };
  lo.client_identity = [f](uint64_t i, ssl_st* ssl) {
    if (i >= f->leaves.size())
      return false;
    const auto& leaf = f->leaves[i];
    return SSL_use_certificate(ssl, leaf.cert.get()) == 1
           && SSL_use_PrivateKey(ssl, leaf.key.get()) == 1;
  };
  return 0;
}

/// Reuses the group's key when the group exists; otherwise creates it.
int ensure_group(const options& o, const server_info& s, std::string& key) {
  auto c = service_client(s, o.insecure);
  prov::net::http_headers h;
  h.add("Authorization", service_auth(s));
  h.add("Content-Type", "application/json; charset=utf-8");
  const std::string q = "?api-version=2021-10-01";
  prov::net::https_response r;
  if (o.group_key.empty() && o.webhook_url.empty() && o.allocation_policy.empty()) {
    if (auto err = c.request("POST", "/enrollmentGroups/" + o.group_id + "/attestationmechanism" + q,
                             h, {}, r)) {
      log("service API: " + err.message);
      return 2;
    }
    if (r.status == 200) {
      auto j = nlohmann::json::parse(r.body, nullptr, false);
      if (j.is_object() && j.contains("symmetricKey")
          && j["symmetricKey"].value("primaryKey", "") != "") {
        key = j["symmetricKey"]["primaryKey"].get<std::string>();
        log("reusing enrollment group '" + o.group_id + "'");
        return 0;
      }
    }
  }
  key = o.group_key.empty() ? prov::crypto::generate_key() : o.group_key;
  nlohmann::json body{{"enrollmentGroupId", o.group_id},
                      {"attestation",
                       {{"type", "symmetricKey"}, {"symmetricKey", {{"primaryKey", key}}}}}};
  if (!o.allocation_policy.empty())
    body["allocationPolicy"] = o.allocation_policy;
  if (!o.webhook_url.empty()) {
    body["allocationPolicy"] = "custom";
    body["customAllocationDefinition"] = {{"webhookUrl", o.webhook_url},
                                          {"apiVersion", "2021-10-01"}};
  }
  if (auto err = c.request("PUT", "/enrollmentGroups/" + o.group_id + q, h, body.dump(), r)) {
    log("service API: " + err.message);
    return 2;
  }
  if (r.status != 200) {
    log("creating enrollment group '" + o.group_id + "' failed: HTTP "
        + std::to_string(r.status) + " " + r.body);
    return 2;
  }
  log("enrollment group '" + o.group_id + "' created");
  return 0;
}

// -- nginx reference -------------------------------------------------------------------------

/// --mode reference or reference-keepalive: nginx only, no devices.
bool reference_only(const options& o) {
  return o.mode == "reference" || o.mode == "reference-keepalive";
}

int start_nginx(const options& o, const server_info& s, child_process& nginx, uint16_t& port,
                std::string& dir) {
  if (!file_exists(o.nginx_bin)) {
    log("nginx not found at " + o.nginx_bin
        + ": skipping the TLS reference (install nginx-light: scripts/install-deps.sh)");
    return 1;
  }
  if (s.cert_pem.empty()) {
    log("no server certificate known (external --target): skipping the TLS reference");
    return 1;
  }
  dir = make_temp_dir("provisiond-bench-nginx");
  ::chmod(dir.c_str(), 0755); // nginx workers may run as nobody
  ::mkdir((dir + "/www").c_str(), 0755);
  std::ofstream(dir + "/www/index.html") << "{\"status\":\"ok\"}\n";
  ::chmod((dir + "/www/index.html").c_str(), 0644);
  port = pick_free_port();
  int workers = o.reference_workers > 0 ? o.reference_workers
                                        : static_cast<int>(std::thread::hardware_concurrency());
  std::ofstream conf(dir + "/nginx.conf");
  conf << "# generated by provisiond-bench: TLS reference with the server's certificate\n"
       << "daemon off;\nmaster_process on;\nworker_processes " << workers << ";\n"
       << "pid " << dir << "/nginx.pid;\nerror_log " << dir << "/error.log warn;\n"
       << "events { worker_connections 8192; }\n"
       << "http {\n  access_log off;\n"
       << "  client_body_temp_path " << dir << "/body;\n  proxy_temp_path " << dir << "/proxy;\n"
       << "  fastcgi_temp_path " << dir << "/fastcgi;\n  uwsgi_temp_path " << dir << "/uwsgi;\n"
       << "  scgi_temp_path " << dir << "/scgi;\n"
       << "  default_type application/json;\n"
       // Keep-alive reference: one connection serves a whole run.
       << "  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n"
       << "  server {\n    listen 127.0.0.1:" << port << " ssl;\n"
       << "    ssl_certificate " << s.cert_pem << ";\n    ssl_certificate_key " << s.key_pem
       << ";\n"
       // The same protocol versions and TLS 1.2 suites as provisiond's gateway.
       << "    ssl_protocols TLSv1.2 TLSv1.3;\n"
       << "    ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
          "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
          "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305;\n"
       << "    ssl_prefer_server_ciphers on;\n"
       << "    location / { root " << dir << "/www; }\n  }\n}\n";
  conf.close();
  std::string err;
  if (!nginx.start({o.nginx_bin, "-p", dir, "-e", dir + "/error.log", "-c", dir + "/nginx.conf"},
                   dir + "/nginx.out", err)) {
    log("cannot start nginx: " + err);
    return 1;
  }
  // Wait until it accepts TLS.
  auto deadline = steady::now() + std::chrono::seconds(10);
  while (steady::now() < deadline) {
    if (!nginx.alive()) {
      log("nginx exited: " + read_file(dir + "/error.log") + read_file(dir + "/nginx.out"));
      return 1;
    }
    prov::net::https_client_options co;
    co.host = "127.0.0.1";
    co.port = port;
    co.ca_file = s.ca_file;
    prov::net::https_client c(co);
    prov::net::https_response r;
    if (!c.request("GET", "/index.html", r) && r.status == 200)
      return 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  log("nginx did not answer within 10 s: " + read_file(dir + "/error.log"));
  return 1;
}

// -- report ---------------------------------------------------------------------------------

void print_latency(std::ostream& out, const char* name, const std::vector<double>& v,
                   nlohmann::json& j, const char* key) {
  auto p = percentiles(v);
  j[key] = to_json(p);
  if (p.n == 0)
    return;
  char line[200];
  std::snprintf(line, sizeof line, "  %-28s %9.2f %9.2f %9.2f %9.2f %9.2f %9zu\n", name, p.p50,
                p.p95, p.p99, p.max, p.mean, p.n);
  out << line;
}

nlohmann::json report(std::ostream& out, const std::string& title, const load_result& r,
                      const usage& u, bool server_known, const char* unit, int threads) {
  nlohmann::json j;
  std::string singular(unit);
  if (!singular.empty() && singular.back() == 's')
    singular.pop_back();
  double rate = r.wall_s > 0 ? static_cast<double>(r.succeeded) / r.wall_s : 0;
  j["title"] = title;
  j["wall_seconds"] = r.wall_s;
  j["connect_phase_seconds"] = r.connect_phase_s;
  j["started"] = r.started;
  j["succeeded"] = r.succeeded;
  j["failed"] = r.failed;
  j["existing"] = r.existing;
  j["rate_per_second"] = rate;
  j["requests"] = r.requests;
  j["puts"] = r.puts;
  j["polls"] = r.polls;
  j["tls_connections"] = r.connections;
  j["reconnects"] = r.reconnects;
  j["errors"] = r.errors;
  j["error_samples"] = r.error_samples;
  j["harness_cpu_seconds"] = r.harness_cpu_s;
  if (r.direct)
    j["kafka_direct"] = {{"requested_records_acked", r.produced},
                         {"completed_records", r.completed_records},
                         {"duplicate_completed", r.duplicate_completed},
                         {"device_assigned_records", r.assigned_events},
                         {"duplicate_device_assigned", r.duplicate_assigned}};

  out << "\n== " << title << " ==\n";
  char line[300];
  std::snprintf(line, sizeof line, "  %-28s %llu (failed %llu%s)\n",
                (std::string(unit) + " ok").c_str(),
                static_cast<unsigned long long>(r.succeeded),
                static_cast<unsigned long long>(r.failed),
                r.existing ? (", already existing " + std::to_string(r.existing)).c_str() : "");
  out << line;
  std::snprintf(line, sizeof line, "  %-28s %.3f s%s\n", "measured wall time", r.wall_s,
                r.connect_phase_s > 0
                  ? ((r.direct ? " (after starting the Kafka clients: "
                               : " (after opening the connections: ")
                     + fmt("%.3f", r.connect_phase_s) + " s)")
                      .c_str()
                  : "");
  out << line;
  std::snprintf(line, sizeof line, "  %-28s %.1f\n", (std::string(unit) + "/s").c_str(), rate);
  out << line;
  auto ull = [](uint64_t v) { return static_cast<unsigned long long>(v); };
  if (r.direct) {
    std::snprintf(line, sizeof line, "  %-28s %llu produced and acknowledged\n",
                  "registration.requested", ull(r.produced));
    out << line;
    std::snprintf(line, sizeof line, "  %-28s %llu seen (duplicates %llu)\n",
                  "registration.completed", ull(r.completed_records),
                  ull(r.duplicate_completed));
    out << line;
    std::snprintf(line, sizeof line, "  %-28s %llu seen (duplicates %llu)\n",
                  "device.assigned", ull(r.assigned_events), ull(r.duplicate_assigned));
    out << line;
  } else if (r.puts)
    std::snprintf(line, sizeof line,
                  "  %-28s %llu (PUT %llu, polls %llu = %.2f per device)\n", "HTTP requests",
                  static_cast<unsigned long long>(r.requests),
                  static_cast<unsigned long long>(r.puts),
                  static_cast<unsigned long long>(r.polls),
                  r.puts ? static_cast<double>(r.polls) / static_cast<double>(r.puts) : 0.0);
  else
    std::snprintf(line, sizeof line, "  %-28s %llu\n", "HTTP requests",
                  static_cast<unsigned long long>(r.requests));
  if (!r.direct)
    out << line;
  std::snprintf(line, sizeof line, "  %-28s %llu (re-opened %llu)\n", "TLS connections opened",
                static_cast<unsigned long long>(r.connections),
                static_cast<unsigned long long>(r.reconnects));
  if (!r.direct)
    out << line;
  out << "  latency (ms)                       p50       p95       p99       max      mean   samples\n";
  if (r.direct) {
    // client: produce call -> completed record seen; server: completedMs - produce call.
    print_latency(out, "time-to-assigned", r.client_tta, j, "client_time_to_assigned_ms");
    print_latency(out, "  server side (completedMs)", r.server_tta, j,
                  "server_time_to_assigned_ms");
    print_latency(out, "produce -> acked (acks=all)", r.produce_ack, j, "produce_ack_ms");
  } else {
    print_latency(out, "server time-to-assigned", r.server_tta, j,
                  "server_time_to_assigned_ms");
    print_latency(out, "client time-to-assigned", r.client_tta, j,
                  "client_time_to_assigned_ms");
    if (!r.scheduled_tta.empty())
      print_latency(out, "  from the due time (--rate)", r.scheduled_tta, j,
                    "scheduled_time_to_assigned_ms");
  }
  if (u.per_process)
    out << "  (no server-side time-to-assigned over Kafka: the records' clock readings are "
           "pinned in the log)\n";
  print_latency(out, "PUT register -> answer", r.put_latency, j, "put_latency_ms");
  print_latency(out, "poll -> answer", r.poll_latency, j, "poll_latency_ms");
  print_latency(out, "request -> answer", r.request_latency, j, "request_latency_ms");
  print_latency(out, "TCP connect + TLS handshake", r.handshake, j, "handshake_ms");
  if (r.errors.empty()) {
    out << "  errors by errorCode           none\n";
  } else {
    out << "  errors by errorCode\n";
    for (auto& [k, v] : r.errors) {
      std::snprintf(line, sizeof line, "    %-26s %llu\n", k.c_str(),
                    static_cast<unsigned long long>(v));
      out << line;
    }
    out << "  first errors:\n";
    for (auto& e : r.error_samples)
      out << "    " << e << "\n";
  }
  double wall = r.wall_s > 0 ? r.wall_s : 1;
  if (server_known && u.server1.ok) {
    const std::string n_procs = std::to_string(u.procs.size());
    std::snprintf(line, sizeof line, "  %-28s %.2f s (%.2f cores)%s\n", "server CPU",
                  u.server_cpu(), u.server_cpu() / wall,
                  u.per_process ? ("   sum of the " + n_procs + " processes below").c_str()
                                : "");
    out << line;
    if (r.succeeded) {
      std::snprintf(line, sizeof line, "  %-28s %.1f us\n",
                    (std::string("server CPU per ") + singular).c_str(),
                    u.server_cpu() / static_cast<double>(r.succeeded) * 1e6);
      out << line;
    }
    std::snprintf(line, sizeof line, "  %-28s %.1f MB (now %.1f MB)%s\n",
                  "server peak RSS (VmHWM)", static_cast<double>(u.server1.hwm_kb) / 1024.0,
                  static_cast<double>(u.server1.rss_kb) / 1024.0,
                  u.per_process ? "   sum of the processes' peaks" : "");
    out << line;
    if (u.per_process) {
      out << "  server processes                  CPU s     cores  us/" << singular
          << "  peak RSS MB    RSS MB\n";
      nlohmann::json procs = nlohmann::json::array();
      auto row = [&](const std::string& name, double cpu, const proc_sample& x) {
        double per_unit = r.succeeded ? cpu / static_cast<double>(r.succeeded) * 1e6 : 0;
        std::snprintf(line, sizeof line, "    %-26s %9.2f %9.2f %9.1f %12.1f %9.1f\n",
                      name.c_str(), cpu, cpu / wall, per_unit,
                      static_cast<double>(x.hwm_kb) / 1024.0,
                      static_cast<double>(x.rss_kb) / 1024.0);
        out << line;
      };
      for (std::size_t i = 0; i < u.procs.size() && i < u.each1.size(); ++i) {
        const auto& w = u.procs[i];
        row(w.name + " (pid " + std::to_string(w.pid) + ")", u.cpu_of(i), u.each1[i]);
        nlohmann::json pj{{"name", w.name},
                          {"pid", w.pid},
                          {"measured", u.each1[i].ok},
                          {"cpu_seconds", u.cpu_of(i)},
                          {"cores", u.cpu_of(i) / wall},
                          {"peak_rss_mb", static_cast<double>(u.each1[i].hwm_kb) / 1024.0},
                          {"rss_mb", static_cast<double>(u.each1[i].rss_kb) / 1024.0}};
        if (r.succeeded)
          pj["cpu_us_per_unit"] = u.cpu_of(i) / static_cast<double>(r.succeeded) * 1e6;
        procs.push_back(pj);
      }
      row("sum", u.server_cpu(), u.server1);
      j["processes"] = procs;
      j["server_totals_are_sums_over_processes"] = true;
    }
    j["server_cpu_seconds"] = u.server_cpu();
    if (r.succeeded)
      j["server_cpu_us_per_unit"] = u.server_cpu() / static_cast<double>(r.succeeded) * 1e6;
    j["server_cores"] = u.server_cpu() / wall;
    j["server_peak_rss_mb"] = static_cast<double>(u.server1.hwm_kb) / 1024.0;
    j["server_rss_mb"] = static_cast<double>(u.server1.rss_kb) / 1024.0;
  } else {
    out << (u.per_process
              ? "  server CPU / RSS              not measured (a server process ended during "
                "the phase)\n"
              : "  server CPU / RSS              not measured (no local server pid)\n");
  }
  std::snprintf(line, sizeof line, "  %-28s %.2f s (%.2f cores)\n",
                u.per_process ? "harness CPU (*)" : "harness CPU", r.harness_cpu_s,
                r.harness_cpu_s / wall);
  out << line;
  // The client's own share: in Kafka mode without the mock broker's threads.
  double client_cpu = r.harness_cpu_s;
  if (u.per_process) {
    j["harness_cpu_includes_mock_broker"] = true;
    if (u.mock_cpu >= 0) {
      std::snprintf(line, sizeof line, "    %-26s %.2f s (%.2f cores)\n",
                    "of which the mock broker", u.mock_cpu, u.mock_cpu / wall);
      out << line;
      j["mock_broker_cpu_seconds"] = u.mock_cpu;
      client_cpu = std::max(0.0, r.harness_cpu_s - u.mock_cpu);
    }
  }
  bool client_bound = client_cpu / wall > 0.85 * threads;
  j["harness_cpu_bound"] = client_bound;
  if (client_bound) {
    std::snprintf(line, sizeof line,
                  "  WARNING: the harness used %.2f cores%s with %d client thread(s): the "
                  "client may be what limits this rate (try --threads)\n",
                  client_cpu / wall, u.per_process ? " (without the mock broker)" : "",
                  threads);
    out << line;
  }
  std::snprintf(line, sizeof line,
                "  %-28s %.2f of %.2f core-seconds busy (%.0f%%); load %s -> %s\n",
                "machine CPU", u.machine_busy(), u.machine_total(),
                u.machine_total() > 0 ? 100.0 * u.machine_busy() / u.machine_total() : 0.0,
                u.load0.c_str(), u.load1.c_str());
  out << line;
  if (u.per_process)
    out << "  (*) the librdkafka mock broker runs inside the harness process: its CPU is counted\n"
           "      in the harness line (its threads, rdk:*, on the line below it), not in the\n"
           "      server lines\n";
  j["machine_busy_core_seconds"] = u.machine_busy();
  j["machine_total_core_seconds"] = u.machine_total();
  j["loadavg_before"] = u.load0;
  j["loadavg_after"] = u.load1;
  out.flush();
  return j;
}

/// After a bulk load, waits until the servers are idle (under 5% of a core
/// over half a second, at most `limit_s`): RocksDB compacts what was just
/// written, and that CPU belongs to the load, not to the registrations
/// measured next.
struct settle_result {
  bool sampled = false; ///< false: the servers' CPU cannot be read (no pid)
  bool idle = false;
  double waited_s = 0;
};
settle_result wait_until_idle(const std::vector<watched>& procs, double limit_s) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  std::vector<proc_sample> each;
  settle_result r;
  for (;;) {
    auto a = sample_servers(procs, each);
    if (!a.ok)
      return r;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    auto b = sample_servers(procs, each);
    r.waited_s = std::chrono::duration<double>(clock::now() - t0).count();
    if (!b.ok)
      return r;
    r.sampled = true;
    r.idle = b.cpu_seconds - a.cpu_seconds < 0.025;
    if (r.idle || r.waited_s >= limit_s || g_interrupted.load())
      return r;
  }
}

/// Runs one load phase with server/machine sampling around it.
/// `watchdog` (optional) runs with the progress tick, about 4 times a second.
/// `run` is run_load or run_direct, given the progress tick.
/// `run` gets the progress callback and `rebase`, which it calls when its
/// measured phase starts (after opening connections): the resource samples
/// then start there.
using measured_run = std::function<load_result(const tick_fn&, const std::function<void()>&)>;

load_result measured(const measured_run& run, const std::string& label,
                     const std::vector<watched>& procs, bool kafka, uint64_t total, usage& u,
                     bool show_progress, const std::function<void()>& watchdog = {}) {
  progress prog(label, total, show_progress);
  u.procs = procs;
  u.per_process = kafka;
  double mock0 = 0;
  auto rebase = [&] {
    if (kafka)
      mock0 = self_threads_cpu_seconds(g_mock_threads);
    u.server0 = sample_servers(procs, u.each0);
    u.m0 = sample_machine();
    u.load0 = load_average();
  };
  rebase();
  auto r = run(
    [&](double t, uint64_t done, uint64_t failed) {
      prog(t, done, failed);
      if (watchdog)
        watchdog();
    },
    rebase);
  u.server1 = sample_servers(procs, u.each1);
  u.m1 = sample_machine();
  u.load1 = load_average();
  if (kafka) {
    u.mock_cpu = self_threads_cpu_seconds(g_mock_threads) - mock0;
    // Over Kafka a record's times are pinned in the log (the input records'
    // timestamps, so a redelivery reproduces them, docs/kafka.md): its
    // completedMs is when the event was handed to allocation, not when it
    // was assigned. Only the client's times measure the pipeline.
    r.server_tta.clear();
  }
  prog.end();
  return r;
}

load_result measured(const load_options& lo, const std::vector<watched>& procs, bool kafka,
                     uint64_t total, usage& u, bool show_progress,
                     const std::function<void()>& watchdog = {}) {
  return measured(
    [&lo](const tick_fn& t, const std::function<void()>& rebase) {
      auto l = lo;
      l.on_go = rebase;
      return run_load(l, t);
    },
    lo.label, procs, kafka, total, u, show_progress, watchdog);
}

std::vector<watched> one_process(pid_t pid, bool tree = false) {
  return {watched{"", pid, tree}};
}

/// Adds one round's result and resource use to the totals.
void accumulate(load_result& total, const load_result& r, usage& tu, const usage& u,
                bool first) {
  if (first) {
    total = r;
    tu = u;
    return;
  }
  total.wall_s += r.wall_s;
  total.connect_phase_s += r.connect_phase_s;
  total.started += r.started;
  total.succeeded += r.succeeded;
  total.failed += r.failed;
  total.existing += r.existing;
  total.requests += r.requests;
  total.puts += r.puts;
  total.polls += r.polls;
  total.connections += r.connections;
  total.reconnects += r.reconnects;
  total.harness_cpu_s += r.harness_cpu_s;
  for (auto& [k, v] : r.errors)
    total.errors[k] += v;
  for (auto& e : r.error_samples)
    if (total.error_samples.size() < 10)
      total.error_samples.push_back(e);
  for (auto v : {&load_result::server_tta, &load_result::client_tta,
                  &load_result::scheduled_tta, &load_result::put_latency,
                  &load_result::poll_latency, &load_result::handshake,
                  &load_result::request_latency})
    (total.*v).insert((total.*v).end(), (r.*v).begin(), (r.*v).end());
  // CPU and machine time: sums of the rounds' deltas; memory: the latest.
  tu.server1.cpu_seconds += u.server_cpu();
  tu.server1.rss_kb = u.server1.rss_kb;
  tu.server1.hwm_kb = std::max(tu.server1.hwm_kb, u.server1.hwm_kb);
  tu.server1.ok = tu.server1.ok && u.server1.ok;
  for (std::size_t i = 0; i < tu.each1.size() && i < u.each1.size(); ++i) {
    tu.each1[i].cpu_seconds += u.cpu_of(i);
    tu.each1[i].rss_kb = u.each1[i].rss_kb;
    tu.each1[i].hwm_kb = std::max(tu.each1[i].hwm_kb, u.each1[i].hwm_kb);
    tu.each1[i].ok = tu.each1[i].ok && u.each1[i].ok;
  }
  if (tu.mock_cpu >= 0 && u.mock_cpu >= 0)
    tu.mock_cpu += u.mock_cpu;
  tu.m1.busy += u.machine_busy();
  tu.m1.total += u.machine_total();
  tu.load1 = u.load1;
}

int run(int argc, char** argv) {
  options o;
  CLI::App app{"provisiond-bench: registers simulated devices against provisiond (Azure DPS "
               "device API) and reports measured throughput and latency"};
  app.add_option("--mode", o.mode,
                 "keepalive | newconn | mqtt | mqtt-ws | reference | reference-keepalive (mqtt: "
                 "DPS over MQTT, one connection per device, spawned server only; mqtt-ws: the "
                 "same over WebSocket on the HTTPS port)")
    ->check(CLI::IsMember(
      {"keepalive", "newconn", "mqtt", "mqtt-ws", "reference", "reference-keepalive"}));
  app.add_flag("--reference", o.reference,
               "Also measure nginx serving a static file over HTTPS with the server's certificate "
               "and print the ratio: GETs over the same kept-alive connections with --mode "
               "keepalive, a new connection per GET with --mode newconn");
  app.add_option("--devices", o.devices, "Devices to register (0 with --duration: unlimited)");
  app.add_option("--duration", o.duration_s, "Stop starting devices after this many seconds");
  app.add_option("-c,--concurrency", o.concurrency, "Concurrent devices (= connections)");
  app.add_option("--rate", o.rate,
                 "Open loop: start devices at this many per second over the connections "
                 "(default 0: closed loop, each connection starts its next device when the last "
                 "is assigned). Adds the time-to-assigned from each device's due time, which "
                 "counts any wait for a free connection")
    ->check(CLI::NonNegativeNumber);
  app.add_option("--threads", o.threads, "Client I/O threads (each an io_context)");
  app.add_option("--poll-interval-ms", o.poll_interval_ms,
                 "Wait between polls; default: honour Retry-After");
  app.add_option("--request-timeout", o.request_timeout_s, "Seconds per request");
  app.add_option("--device-timeout", o.device_timeout_s, "Seconds until a device gives up");
  app.add_option("--json", o.json_file, "Write all numbers to this JSON file");
  app.add_flag("--no-progress", o.no_progress, "No progress line on stderr");
  app.add_option("--id-prefix", o.id_prefix, "Registration id prefix (default bench-<random>-)");
  app.add_option("--api-version", o.api_version, "Device API version sent");
  app.add_option("--server-bin", o.server_bin, "provisiond binary (default: next to this one)");
  app.add_option("--config", o.config_file, "Config file passed to the spawned server");
  app.add_flag("--webhook", o.webhook,
               "Custom allocation: the group's policy is custom, answered by a local HTTPS "
               "webhook in the harness (spawned single server only)");
  app.add_option("--allocation-policy", o.allocation_policy,
                 "The enrollment group's allocationPolicy: hashed or geoLatency; either way the "
                 "spawned server gets the same three hubs in three regions and a region "
                 "latency table (spawned single server only). Default: none set, the "
                 "instance's (hashed) on the server's own hubs")
    ->check(CLI::IsMember({"hashed", "geoLatency"}));
  app.add_option("--webhook-client-threads", o.webhook_client_threads,
                 "custom_allocation.threads of the spawned server (default: its own)");
  app.add_option("--register-wait-ms", o.register_wait_ms,
                 "device_api.register_wait_ms of the spawned server(s): how long a register "
                 "waits for its outcome (0 = always 202, then polls; default: the server's)")
    ->check(CLI::Range(0, 10000));
  app.add_option("--data-dir", o.data_dir,
                 "Data dir for the spawned server (kept; default: a temp dir, removed)");
  app.add_flag("--keep-data", o.keep_data, "Keep the temp data dir");
  app.add_option("--target", o.target, "External server HOST:PORT (no server is spawned)");
  app.add_option("--connection-string", o.connection_string,
                 "Service connection string of the external server");
  app.add_option("--id-scope", o.id_scope, "ID scope of the external server");
  app.add_option("--ca", o.ca_file, "CA file to trust for the external server");
  app.add_flag("--insecure", o.insecure, "Do not verify the server certificate");
  app.add_option("--tls-name", o.tls_name, "Name checked in the certificate (default: host)");
  app.add_option("--server-pid", o.server_pid,
                 "PID of the external server (for CPU and RSS; same machine only)");
  app.add_option("--group", o.group_id, "Enrollment group id (created or reused)");
  app.add_option("--group-key", o.group_key, "Group primary key (default: reuse or generate)");
  app.add_option("--individual-enrollments", o.individual,
                 "Bulk-create N individual enrollments and register --devices of them");
  app.add_option("--enroll-concurrency", o.enroll_concurrency,
                 "Concurrent bulk requests while creating enrollments");
  app.add_option("--enrollment-key", o.enrollment_key,
                 "Master key: individual enrollment keys are HMAC(master, id) (default: random)");
  app.add_flag("--enrolled", o.enrolled,
               "With --individual-enrollments and --enrollment-key: the N enrollments exist "
               "already (a reused --data-dir or --target); register without creating them")
      ->needs("--enrollment-key")
      ->needs("--individual-enrollments");
  app.add_option("--nginx-bin", o.nginx_bin, "nginx for the TLS reference");
  app.add_option("--reference-count", o.reference_count,
                 "Connections for the reference (default: --devices)");
  app.add_option("--rounds", o.rounds,
                 "With --reference: alternate device and reference runs this many times "
                 "(each does 1/rounds of the work), so both see the same machine load");
  app.add_option("--reference-workers", o.reference_workers,
                 "nginx worker processes (default: cores)");
  app.add_flag("--kafka", o.kafka,
               "Distributed mode: a Kafka mock cluster in this process, a gateway and "
               "--kafka-workers worker processes over it");
  app.add_option("--kafka-workers", o.kafka_workers,
                 "Worker processes (--roles " + std::string(worker_roles)
                   + "); 0 = one process with every role")
    ->check(CLI::NonNegativeNumber);
  app.add_option("--kafka-partitions", o.kafka_partitions, "Partitions of every topic")
    ->check(CLI::Range(1, 10000));
  app.add_option("--kafka-brokers", o.kafka_brokers, "Mock brokers")->check(CLI::Range(1, 64));
  app.add_option("--kafka-property", o.kafka_properties,
                 "NAME=VALUE for [kafka.properties] of every process (repeatable; replaces the "
                 "harness default of the same name)");
  app.add_flag("--kafka-unfused", o.kafka_unfused,
               "kafka.fuse_stages = false in every process: every stage hands over through "
               "its topic, even to a stage of the same process (docs/kafka.md)");
  app.add_option("--kafka-warmup", o.kafka_warmup,
                 "Devices registered (not measured) before the run, until the consumer groups "
                 "have joined");
  app.add_option("--kafka-start-timeout", o.kafka_start_timeout_s,
                 "Seconds each process may take to answer /readyz");
  app.add_flag("--x509", o.x509,
               "X.509 devices: a P-256 CA and a leaf per device made at start, an enrollment "
               "group <group>-x509 whose signing certificate the CA is; each device presents "
               "its certificate in a new TLS handshake (needs --mode newconn, --devices N)");
  app.add_flag("--direct", o.direct,
               "With --kafka: no HTTPS for devices. The harness produces registration.requested "
               "records itself (key = registration id, the device's SAS token, an operationId it "
               "chooses; docs/events.md) and reads the outcomes from registration.completed "
               "(and counts device.assigned). Time-to-assigned = produce call -> completed record "
               "seen; -c = devices produced and not yet completed. The processes are as without "
               "--direct: the workers' attestation role consumes registration.requested; the "
               "gateway (or the all-roles process with --kafka-workers 0) serves the service API "
               "that creates the enrollment group and still follows registration.completed. The "
               "warm-up is published directly too");
  CLI11_PARSE(app, argc, argv);

  std::signal(SIGPIPE, SIG_IGN);
  // Ctrl-C or SIGTERM: stop starting devices, report, stop the servers.
  std::signal(SIGINT, [](int) { g_interrupted.store(true); });
  std::signal(SIGTERM, [](int) { g_interrupted.store(true); });

  if (o.devices == 0 && o.duration_s <= 0) {
    log("--devices 0 needs --duration");
    return 2;
  }
  if (o.concurrency < 1 || o.threads < 1) {
    log("--concurrency and --threads must be at least 1");
    return 2;
  }
  if (o.webhook && (o.kafka || o.reference || !o.config_file.empty() || !o.target.empty()
                    || o.individual > 0 || o.enrolled)) {
    log("--webhook runs with a spawned single server and the enrollment group only (not with "
        "--kafka, --reference, --config, --target or individual enrollments)");
    return 2;
  }
  if (!o.allocation_policy.empty()
      && (o.kafka || o.reference || !o.config_file.empty() || !o.target.empty() || o.webhook
          || o.individual > 0 || o.enrolled)) {
    log("--allocation-policy runs with a spawned single server and the enrollment "
        "group only (not with --kafka, --reference, --config, --target, --webhook or "
        "individual enrollments)");
    return 2;
  }
  if (o.register_wait_ms >= 0 && (!o.config_file.empty() || !o.target.empty())) {
    log("--register-wait-ms configures a spawned server: with --config, set "
        "device_api.register_wait_ms in that file; with --target, in the target's config");
    return 2;
  }
  if (o.kafka && (!o.target.empty() || !o.config_file.empty() || reference_only(o))) {
    log("--kafka spawns its own processes with generated configs: it does not combine with "
        "--target, --config or --mode reference / reference-keepalive");
    return 2;
  }
  if ((o.mode == "mqtt" || o.mode == "mqtt-ws") && (!o.target.empty() || o.kafka || o.reference)) {
    log("--mode mqtt / mqtt-ws spawns its own server (its MQTT port comes from endpoints.json): "
        "it does not combine with --target, --kafka or --reference");
    return 2;
  }
  if (o.rate > 0 && (o.direct || reference_only(o))) {
    log("--rate paces devices over HTTPS: it does not combine with --direct or --mode "
        "reference / reference-keepalive");
    return 2;
  }
  if (o.direct && (!o.kafka || o.mode != "keepalive" || o.reference || o.duration_s > 0
                   || o.devices == 0)) {
    log("--direct needs --kafka and --devices N; it does not combine with --mode, --reference "
        "or --duration");
    return 2;
  }
  if (o.x509 && (o.mode != "newconn" || o.kafka || o.devices == 0 || o.duration_s > 0
                 || o.webhook || o.individual > 0)) {
    log("--x509 needs --mode newconn and --devices N (certificates are made before the run); "
        "it does not combine with --kafka, --duration, --webhook or --individual-enrollments");
    return 2;
  }
  if (o.id_prefix.empty())
    o.id_prefix = "bench-" + prov::crypto::hex(prov::crypto::random_bytes(3)) + "-";
  const bool show_progress = !o.no_progress;

  // ---- the server ----
  bench_webhook hook; // --webhook: outlives the server's last call
  server_info s;
  child_process server;
  bool own_dir = false;
  kafka_deployment kd; // stops its processes, then the mock cluster, when run() returns
  direct_publisher publisher; // --direct: the harness's Kafka clients; closed before kd stops
  std::vector<watched> servers; // whose CPU and memory the phases report
  if (o.kafka) {
    if (int rc = start_kafka(o, kd, s, own_dir))
      return rc;
    // Before the harness starts Kafka clients of its own (--direct).
    g_mock_threads = self_thread_ids(mock_thread_prefix);
    for (auto& p : kd.processes())
      servers.push_back({p->name, p->pid, false});
  } else if (o.target.empty()) {
    if (o.webhook)
      if (int rc = start_webhook(o, hook))
        return rc;
    if (int rc = spawn_server(o, server, s, own_dir))
      return rc;
    log("server pid " + std::to_string(s.pid) + " on 127.0.0.1:" + std::to_string(s.port)
        + ", data dir " + s.data_dir + ", id scope " + s.id_scope);
  } else {
    if (auto err = prov::net::split_host_port(o.target, 443, s.host, s.port)) {
      log(err.message);
      return 2;
    }
    if (!parse_connection_string(o.connection_string, s) || o.id_scope.empty()) {
      log("--target needs --connection-string (with SharedAccessKey) and --id-scope");
      return 2;
    }
    if (o.ca_file.empty() && !o.insecure) {
      log("--target needs --ca FILE or --insecure");
      return 2;
    }
    s.id_scope = o.id_scope;
    s.ca_file = o.ca_file;
    s.pid = o.server_pid;
    s.tls_name = o.tls_name.empty() ? s.host : o.tls_name;
  }
  if (!o.tls_name.empty())
    s.tls_name = o.tls_name;
  if (!o.kafka)
    servers = one_process(s.pid);
  // Kafka mode: the temp dir (configs, logs) stays when a server process or
  // the setup failed (`keep_logs`, or a process that does not exit cleanly),
  // so the messages that point to a log stay true.
  auto cleanup = [&](bool keep_logs) {
    publisher.close();
    if (o.kafka) {
      if (!kd.stop(60))
        keep_logs = true;
      if (own_dir && !o.keep_data && !keep_logs)
        remove_tree(s.data_dir);
      else
        log("data dir kept (configs and logs): " + s.data_dir);
      return;
    }
    if (server.pid() > 0) {
      int st = server.stop(60);
      if (st != 0)
        log("server exit status " + std::to_string(st) + " (log: " + s.data_dir
            + "/server.log)");
    }
    if (own_dir && !o.keep_data)
      remove_tree(s.data_dir);
    else if (!s.data_dir.empty())
      log("data dir kept: " + s.data_dir);
  };

  nlohmann::json out_json;
  out_json["machine"] = machine_description();
  out_json["command"] = [&] {
    // Keys never go to stdout or the JSON file.
    std::string c;
    bool hide_next = false;
    for (int i = 0; i < argc; ++i) {
      std::string a = argv[i];
      if (hide_next) {
        a = "<redacted>";
        hide_next = false;
      }
      for (const char* opt : {"--connection-string", "--group-key", "--enrollment-key"}) {
        std::string o(opt);
        if (a == o)
          hide_next = true;
        else if (a.rfind(o + "=", 0) == 0)
          a = o + "=<redacted>";
      }
      c += (i ? " " : "") + a;
    }
    return c;
  }();
  // kafka-direct | kafka-https | keepalive | newconn | reference
  const std::string run_mode = o.kafka ? (o.direct ? "kafka-direct" : "kafka-https") : o.mode;
  out_json["mode"] = run_mode;
  out_json["options"] = {{"mode", o.direct ? "direct" : o.mode},
                         {"attestation", o.x509 ? "x509" : "symmetricKey"},
                         {"devices", o.devices},
                         {"duration_s", o.duration_s},
                         {"concurrency", o.concurrency},
                         {"rate", o.rate},
                         {"threads", o.threads},
                         {"poll_interval_ms", o.poll_interval_ms},
                         {"reference", o.reference},
                         {"rounds", o.rounds},
                         {"individual_enrollments", o.individual}};
  std::cout << "provisiond-bench  " << out_json["command"].get<std::string>() << "\n"
            << "  machine: " << out_json["machine"].get<std::string>() << "\n"
            << "  server:  " << s.host << ":" << s.port
            << (s.pid > 0 ? " pid " + std::to_string(s.pid) : std::string(" (pid unknown)"))
            << (o.kafka ? " (" + kd.front().name + ")" : std::string()) << "\n";
  if (o.kafka) {
    nlohmann::json kj{{"mock_brokers", o.kafka_brokers},
                      {"bootstrap_servers", kd.bootstrap_servers()},
                      {"partitions", o.kafka_partitions},
                      {"workers", o.kafka_workers},
                      {"warmup_devices", o.kafka_warmup},
                      {"direct", o.direct},
                      {"fuse_stages", !o.kafka_unfused},
                      {"properties", o.kafka_properties}};
    std::cout << "  kafka:   librdkafka mock cluster in this process, " << o.kafka_brokers
              << " broker(s) at " << kd.bootstrap_servers() << ", " << o.kafka_partitions
              << " partitions per topic"
              << (o.kafka_unfused ? ", unfused stages" : ", fused stages") << "\n";
    for (auto& p : kd.processes()) {
      std::cout << "  " << p->name << ": pid " << p->pid << ", "
                << (p->roles.empty() ? std::string("every role") : "--roles " + p->roles)
                << ", log " << p->log_file << "\n";
      kj["processes"].push_back({{"name", p->name},
                                 {"pid", p->pid},
                                 {"roles", p->roles.empty() ? "all" : p->roles},
                                 {"config", p->config_file},
                                 {"log", p->log_file},
                                 {"metrics_port", p->metrics_port}});
    }
    out_json["kafka"] = kj;
  }
  std::cout.flush();
  bool any_failure = false;
  // Kafka mode: a process that dies mid-run is named at once; new devices
  // stop (the ones in flight end by --device-timeout).
  std::string died;
  std::function<void()> watchdog;
  if (o.kafka)
    watchdog = [&] {
      if (!died.empty())
        return;
      died = kd.check_alive();
      if (!died.empty()) {
        log("a server process died: " + died);
        g_interrupted.store(true);
      }
    };

  load_options lo;
  lo.host = s.host;
  lo.port = s.port;
  lo.tls_name = s.tls_name;
  lo.ca_file = s.ca_file;
  lo.insecure = o.insecure;
  lo.threads = o.threads;
  lo.request_timeout_s = o.request_timeout_s;
  lo.device_timeout_s = o.device_timeout_s;
  lo.poll_interval_ms = o.poll_interval_ms;
  lo.rate = o.rate;
  lo.id_scope = s.id_scope;
  lo.api_version = o.api_version;
  lo.interrupted = &g_interrupted;
  lo.progress = show_progress;
  // --direct: the same devices, published to Kafka instead of over HTTPS.
  if (o.direct) {
    if (auto e = publisher.start(kd.bootstrap_servers(), kd.properties())) {
      log("--direct: starting the harness's Kafka clients: " + e.message);
      cleanup(true);
      return 2;
    }
  }
  auto run_direct_phase = [&](const load_options& l, const std::string& op_prefix, usage& u) {
    direct_options d;
    d.count = l.count;
    d.concurrency = l.concurrency;
    d.device_timeout_s = l.device_timeout_s;
    d.id_scope = l.id_scope;
    d.key_root = l.key_root;
    d.registration_id = l.registration_id;
    d.operation_prefix = op_prefix;
    d.interrupted = l.interrupted;
    // No connect phase: the samples start with the run.
    return measured(
      [&](const tick_fn& t, const std::function<void()>&) { return publisher.run(d, t); },
      l.label, servers, true, l.count, u, show_progress, watchdog);
  };

  // ---- Kafka mode: warm-up ----
  // The first consumer-group joins take seconds on the mock (its initial
  // rebalance delay); devices registered before they are done wait for them.
  // Registered through the enrollment group, ids <prefix>warmup-<i>, not in
  // any result.
  std::string group_key;
  if (o.kafka && o.kafka_warmup > 0) {
    if (int rc = ensure_group(o, s, group_key)) {
      cleanup(true);
      return rc;
    }
    load_options w = lo;
    w.mode = load_mode::keepalive;
    w.count = o.kafka_warmup;
    w.concurrency = static_cast<int>(std::min<uint64_t>(o.kafka_warmup,
                                                         static_cast<uint64_t>(o.concurrency)));
    w.key_root = group_key;
    auto prefix = o.id_prefix + "warmup-";
    w.registration_id = [prefix](uint64_t i) { return prefix + std::to_string(i); };
    w.device_timeout_s = std::max(o.device_timeout_s, 60);
    w.label = o.direct ? "warm-up (direct)" : "warm-up";
    usage u;
    auto r = o.direct ? run_direct_phase(w, o.id_prefix + "warmup-op-", u)
                      : measured(w, servers, true, w.count, u, show_progress, watchdog);
    char line[200];
    std::snprintf(line, sizeof line,
                  "  warm-up: %llu/%llu devices assigned in %.2f s (%.2f s after the "
                  "connections were open); not part of any result below\n",
                  static_cast<unsigned long long>(r.succeeded),
                  static_cast<unsigned long long>(w.count), r.connect_phase_s + r.wall_s,
                  r.wall_s);
    std::cout << line << std::flush;
    out_json["kafka"]["warmup"] = {{"devices", w.count},
                                   {"assigned", r.succeeded},
                                   {"failed", r.failed},
                                   {"seconds", r.connect_phase_s + r.wall_s},
                                   {"errors", r.errors}};
    if (r.succeeded < w.count) {
      log("warm-up: " + std::to_string(w.count - r.succeeded)
          + " device(s) not assigned; not measuring"
          + (!died.empty()                ? " (a process died, see above)"
             : g_interrupted.load() ? " (interrupted)"
                                    : ""));
      for (auto& e : r.error_samples)
        log("  " + e);
      for (auto& p : kd.processes())
        log("  " + p->name + " log: " + p->log_file);
      cleanup(!died.empty() || !g_interrupted.load());
      return g_interrupted.load() && died.empty() ? 1 : 2;
    }
  }

  // ---- enrollments ----
  uint64_t devices = o.devices;
  if (o.individual > 0) {
    std::string master =
      o.enrollment_key.empty() ? prov::crypto::generate_key() : o.enrollment_key;
    auto prefix = o.id_prefix;
    auto id_of = [prefix](uint64_t i) { return prefix + std::to_string(i); };
    const uint64_t per_batch = 10; // the service API's bulk limit
    uint64_t n = o.individual;
    load_options bo = lo;
    bo.mode = load_mode::bulk;
    bo.concurrency = o.enroll_concurrency;
    bo.count = (n + per_batch - 1) / per_batch;
    bo.service_auth = service_auth(s);
    bo.ignore_conflicts = !o.enrollment_key.empty(); // re-runs with a fixed key reuse them
    bo.label = "enroll";
    bo.bulk_body = [id_of, master, n](uint64_t b) {
      nlohmann::json items = nlohmann::json::array();
      for (uint64_t i = b * per_batch; i < std::min(n, (b + 1) * per_batch); ++i) {
        auto id = id_of(i);
        items.push_back({{"registrationId", id},
                         {"attestation",
                          {{"type", "symmetricKey"},
                           {"symmetricKey",
                            {{"primaryKey", *prov::crypto::derive_device_key(master, id)}}}}}});
      }
      return nlohmann::json{{"mode", "create"}, {"enrollments", items}}.dump();
    };
    // Unless they exist already: then only the registrations are measured,
    // e.g. a store copied before each run of an interleaved comparison.
    usage u;
    load_result r;
    if (o.enrolled) {
      r.succeeded = n;
      log("using " + std::to_string(n) + " existing individual enrollments (--enrolled)");
    } else {
      r = measured(bo, servers, o.kafka, n, u, show_progress, watchdog);
      out_json["enrollment_creation"] =
        report(std::cout, "create " + std::to_string(n) + " individual enrollments (bulk, "
                            + std::to_string(bo.concurrency) + " connections)",
               r, u, s.pid > 0, "enrollments", o.threads);
    }
    if (r.failed || g_interrupted.load())
      any_failure = true;
    if (!o.enrolled && !g_interrupted.load()) {
      const auto settle = wait_until_idle(servers, 60);
      char buf[160];
      if (!settle.sampled)
        std::snprintf(buf, sizeof buf, "server CPU not readable; not waiting for it to settle");
      else
        std::snprintf(buf, sizeof buf,
                      settle.idle ? "server idle %.1f s after the load (background compaction)"
                                  : "server still busy %.1f s after the load; measuring anyway",
                      settle.waited_s);
      log(buf);
      if (settle.sampled)
        out_json["enrollment_settle_seconds"] = settle.idle ? settle.waited_s : -settle.waited_s;
    }
    if (r.succeeded + r.existing < n) {
      log("not all enrollments were created; stopping");
      cleanup(true);
      if (!o.json_file.empty())
        std::ofstream(o.json_file) << out_json.dump(2) << "\n";
      return 1;
    }
    // Register devices spread evenly over the enrolled ids.
    if (devices > n)
      devices = n;
    uint64_t stride = devices ? std::max<uint64_t>(1, n / devices) : 1;
    lo.registration_id = [id_of, stride, n](uint64_t i) { return id_of((i * stride) % n); };
    lo.key_root = master;
  } else if (o.x509) {
    if (int rc = x509_fleet(o, s, devices, lo)) {
      cleanup(true);
      return rc;
    }
  } else if (!reference_only(o)) {
    std::string key = group_key; // Kafka mode: the warm-up already has it
    if (key.empty())
      if (int rc = ensure_group(o, s, key)) {
        cleanup(true);
        return rc;
      }
    lo.key_root = key;
    auto prefix = o.id_prefix;
    lo.registration_id = [prefix](uint64_t i) { return prefix + std::to_string(i); };
  }

  // ---- devices, and the nginx reference interleaved with them ----
  // On a shared machine, load from elsewhere drifts; alternating rounds of the
  // two measurements exposes both to the same conditions.
  const bool want_dev = !reference_only(o);
  const bool want_ref = o.reference || !want_dev;
  child_process nginx;
  uint16_t nginx_port = 0;
  std::string nginx_dir;
  bool ref_ok = false;
  if (want_ref) {
    ref_ok = start_nginx(o, s, nginx, nginx_port, nginx_dir) == 0;
    if (!ref_ok)
      out_json["reference"] = "skipped";
  }
  const int rounds =
    want_dev && ref_ok && o.duration_s <= 0 ? std::max(1, o.rounds) : 1;
  const uint64_t ref_total_count = o.reference_count ? o.reference_count : devices;
  // The reference does what the devices do: keep-alive GETs against
  // keep-alive devices, a new connection per GET against newconn devices.
  const auto ref_mode = o.mode == "keepalive" || o.mode == "reference-keepalive"
                          ? load_mode::reference_keepalive
                          : load_mode::reference;
  const bool ref_keep = ref_mode == load_mode::reference_keepalive;
  load_result dev_total, ref_total;
  usage dev_u, ref_u;
  std::vector<nlohmann::json> round_json;
  std::string poll = o.poll_interval_ms < 0 ? "Retry-After"
                                            : std::to_string(o.poll_interval_ms) + " ms";
  for (int k = 0; k < rounds && !g_interrupted.load(); ++k) {
    std::string tag = rounds > 1 ? " " + std::to_string(k + 1) + "/" + std::to_string(rounds) : "";
    double dr = 0, rr = 0;
    if (want_dev) {
      load_options l = lo;
      l.mode = o.mode == "newconn" ? load_mode::newconn
               : o.mode == "mqtt"  ? load_mode::mqtt
               : o.mode == "mqtt-ws" ? load_mode::mqtt_ws
                                   : load_mode::keepalive;
      if (l.mode == load_mode::mqtt)
        l.port = s.mqtt_port;
      l.concurrency = o.concurrency;
      uint64_t off = devices * static_cast<uint64_t>(k) / static_cast<uint64_t>(rounds);
      l.count = devices * static_cast<uint64_t>(k + 1) / static_cast<uint64_t>(rounds) - off;
      auto base = lo.registration_id;
      l.registration_id = [base, off](uint64_t i) { return base(i + off); };
      if (lo.client_identity)
        l.client_identity = [ci = lo.client_identity, off](uint64_t i, ssl_st* ssl) {
          return ci(i + off, ssl);
        };
      l.duration_s = o.duration_s;
      l.label = (o.direct ? std::string("direct") : o.mode) + tag;
      usage u;
      auto r = o.direct ? run_direct_phase(l, o.id_prefix + "op-", u)
                        : measured(l, servers, o.kafka, l.count, u, show_progress, watchdog);
      dr = r.wall_s > 0 ? static_cast<double>(r.succeeded) / r.wall_s : 0;
      accumulate(dev_total, r, dev_u, u, k == 0);
    }
    if (ref_ok) {
      load_options ro = lo;
      ro.mode = ref_mode;
      ro.port = nginx_port;
      ro.concurrency = o.concurrency;
      uint64_t off = ref_total_count * static_cast<uint64_t>(k) / static_cast<uint64_t>(rounds);
      ro.count = ref_total_count * static_cast<uint64_t>(k + 1) / static_cast<uint64_t>(rounds)
                 - off;
      ro.duration_s = o.duration_s;
      ro.label = "reference" + tag;
      usage u;
      auto r = measured(ro, one_process(nginx.pid(), true), false, ro.count, u,
                        show_progress);
      rr = r.wall_s > 0 ? static_cast<double>(r.succeeded) / r.wall_s : 0;
      accumulate(ref_total, r, ref_u, u, k == 0);
    }
    if (want_dev && ref_ok) {
      char line[200];
      std::snprintf(line, sizeof line,
                    "  round %d/%d: %s %.1f devices/s, nginx %.1f %s/s (%.1f%%); "
                    "load %s\n",
                    k + 1, rounds, o.mode.c_str(), dr, rr, ref_keep ? "GETs" : "connections",
                    rr > 0 ? 100.0 * dr / rr : 0.0,
                    load_average().c_str());
      std::cout << line << std::flush;
      round_json.push_back({{"device_rate", dr}, {"reference_rate", rr},
                            {"ratio", rr > 0 ? dr / rr : 0.0}});
    }
  }

  double device_rate = 0;
  if (want_dev) {
    const auto& r = dev_total;
    std::string title = o.direct
                          ? "direct: " + std::to_string(r.started)
                              + " devices published to registration.requested, at most "
                              + std::to_string(o.concurrency) + " outstanding"
                          : o.mode + ": " + std::to_string(r.started) + " devices, concurrency "
                              + std::to_string(o.concurrency)
                              + (o.rate > 0 ? ", open loop at " + fmt("%g", o.rate) + "/s" : "")
                              + ", " + std::to_string(o.threads) + " client thread(s), poll "
                              + poll;
    title = title
                        + (o.individual ? ", " + std::to_string(o.individual)
                                            + " individual enrollments"
                                        : ", enrollment group")
                        + (rounds > 1 ? ", " + std::to_string(rounds) + " rounds" : "")
                        + (o.kafka ? ", kafka: " + std::to_string(o.kafka_workers)
                                       + " worker(s), " + std::to_string(o.kafka_partitions)
                                       + " partitions"
                                   : "");
    auto j = report(std::cout, title, r, dev_u, s.pid > 0, "devices", o.threads);
    out_json["registration"] = j;
    device_rate = r.wall_s > 0 ? static_cast<double>(r.succeeded) / r.wall_s : 0;
    uint64_t expected = o.duration_s > 0 && o.devices == 0 ? r.started : devices;
    if (r.failed || r.succeeded < expected || g_interrupted.load())
      any_failure = true;
    if (r.succeeded < expected)
      log(std::to_string(expected - r.succeeded) + " device(s) not assigned");
  }
  if (ref_ok) {
    const auto& r = ref_total;
    auto j = report(std::cout,
                    std::string("reference: nginx static file over HTTPS, ")
                      + (ref_keep ? std::to_string(o.concurrency)
                                      + " kept-alive TLS connections, GETs back to back"
                                  : "new TLS connection per GET, concurrency "
                                      + std::to_string(o.concurrency))
                      + (rounds > 1 ? ", " + std::to_string(rounds) + " rounds" : ""),
                    r, ref_u, true, ref_keep ? "GETs" : "connections", o.threads);
    j["mode"] = ref_keep ? "keepalive" : "newconn";
    out_json["reference"] = j;
    if (r.failed)
      any_failure = true;
    double ref_rate = r.wall_s > 0 ? static_cast<double>(r.succeeded) / r.wall_s : 0;
    if (want_dev && ref_rate > 0) {
      double ratio = device_rate / ref_rate;
      char line[200];
      std::snprintf(line, sizeof line,
                    "\n  %s devices/s %.1f vs nginx %s/s %.1f: %.1f%%\n",
                    o.mode.c_str(), device_rate,
                    ref_keep ? "keep-alive GETs" : "TLS connections", ref_rate, 100.0 * ratio);
      std::cout << line;
      out_json["ratio_to_reference"] = ratio;
      out_json["rounds"] = round_json;
    }
    nginx.stop(10);
  }
  if (!nginx_dir.empty())
    remove_tree(nginx_dir);

  if (!died.empty()) {
    any_failure = true;
    out_json["process_died"] = died;
  }
  if (o.kafka) {
    for (auto& p : kd.processes()) {
      auto f = sample_process(p->pid);
      if (f.ok)
        out_json["server_final"][p->name] = {
          {"rss_mb", static_cast<double>(f.rss_kb) / 1024.0},
          {"peak_rss_mb", static_cast<double>(f.hwm_kb) / 1024.0},
          {"cpu_seconds_total", f.cpu_seconds}};
    }
  } else if (s.pid > 0) {
    auto final_sample = sample_process(s.pid);
    if (final_sample.ok)
      out_json["server_final"] = {{"rss_mb", static_cast<double>(final_sample.rss_kb) / 1024.0},
                                  {"peak_rss_mb",
                                   static_cast<double>(final_sample.hwm_kb) / 1024.0},
                                  {"cpu_seconds_total", final_sample.cpu_seconds}};
  }
  out_json["ok"] = !any_failure;
  if (!o.json_file.empty()) {
    std::ofstream f(o.json_file);
    f << out_json.dump(2) << "\n";
    if (!f)
      log("cannot write " + o.json_file);
  }
  if (o.kafka && any_failure && died.empty() && own_dir && !o.keep_data)
    log("the servers' logs are removed with the temp dir; --keep-data keeps them");
  cleanup(!died.empty());
  std::cout << (any_failure ? !died.empty() ? "\nRESULT: FAILED (a server process died, see above)\n"
                                            : "\nRESULT: FAILED (errors or unfinished devices)\n"
                            : "\nRESULT: ok\n");
  return any_failure ? 1 : 0;
}

} // namespace

int main(int argc, char** argv) {
  // Every exit path goes through run()'s destructors: they stop the spawned
  // processes (and, in Kafka mode, the mock cluster after them).
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    log(std::string("error: ") + e.what());
    return 2;
  }
}
