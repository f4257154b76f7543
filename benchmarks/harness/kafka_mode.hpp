#pragma once
// --kafka: a librdkafka mock cluster inside the harness process, and the
// provisiond processes of a distributed deployment around it (one gateway,
// W workers, or one process with every role when W = 0), each with its own
// generated config and data dir. See docs/benchmarking.md, "Kafka mode".

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "benchmarks/harness/process.hpp"

namespace prov::bus::kafka {
class mock_cluster;
}

namespace bench {

struct kafka_options {
  std::string server_bin;
  std::string root_dir;      ///< per-process dirs are created under it
  int workers = 2;           ///< 0 = one process with every role
  int partitions = 6;
  int brokers = 1;
  /// [kafka.properties] of every process, "name=value"; these replace the
  /// harness's defaults of the same name.
  std::vector<std::string> properties;
  std::string id_scope;      ///< written into every config
  std::string policy_name;   ///< the one [[access_policies]] entry of every config
  std::string policy_key;
  int register_wait_ms = -1; ///< device_api.register_wait_ms; -1 = the server's default
  bool fuse_stages = true;  ///< kafka.fuse_stages of every process
  int start_timeout_s = 60;  ///< per process, for /readyz
  const std::atomic<bool>* interrupted = nullptr;
};

/// The roles of the gateway and of a worker (`provisiond serve --roles`).
extern const char* const gateway_roles;
extern const char* const worker_roles;

/// One provisiond process of the deployment.
struct kafka_process {
  std::string name;  ///< "gateway", "worker-1", ...; "all-roles" when there are no workers
  std::string roles; ///< the --roles value; empty = not passed (every role)
  std::string dir;   ///< its data dir
  std::string config_file, log_file;
  uint16_t metrics_port = 0;
  child_process child;
  pid_t pid = 0;     ///< kept after the child exited (for messages)
  std::string command() const; ///< the command line, for messages
};

class kafka_deployment {
public:
  kafka_deployment();
  ~kafka_deployment(); ///< stop()
  kafka_deployment(const kafka_deployment&) = delete;
  kafka_deployment& operator=(const kafka_deployment&) = delete;

  /// Starts the mock cluster, creates every topic of topic_table(), writes
  /// the configs, starts all processes at once, then waits until each one's
  /// /readyz answers 200 and the gateway has written endpoints.json. Returns
  /// false with `err` naming the process and its log when one fails.
  bool start(const kafka_options& o, std::string& err);

  /// SIGTERM to every process (gateway first), waits up to `grace_s` each,
  /// SIGKILL after; then stops the mock cluster. Logs non-zero exit
  /// statuses with the log file. Idempotent. Returns false when a process
  /// exited non-zero or had to be killed.
  bool stop(int grace_s = 30);

  /// The process that serves HTTPS (the gateway, or the all-roles process).
  kafka_process& front();
  std::vector<std::unique_ptr<kafka_process>>& processes() { return procs_; }
  const std::string& bootstrap_servers() const { return bootstrap_; }
  /// The [kafka.properties] every process got (harness defaults + overrides).
  const std::map<std::string, std::string>& properties() const { return props_; }

  /// Empty when every process still runs; else "<name> (pid N) exited with
  /// status S; log: <file>" for the first one that did not.
  std::string check_alive();

private:
  std::unique_ptr<prov::bus::kafka::mock_cluster> mock_;
  std::vector<std::unique_ptr<kafka_process>> procs_;
  std::string bootstrap_;
  std::map<std::string, std::string> props_;
  bool stopped_ = false;
};

} // namespace bench
