#pragma once
// Runs the real provisiond binary (PROVISIOND_BIN; or the test binary,
// PROVISIOND_TEST_BIN, for a test that needs its seams) as a child process
// on an ephemeral port with a temp data dir, and talks to it over real TLS.

#include <sys/types.h>

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "net/https_client.hpp"
#include "messages/error.hpp"

namespace prov::test {

/// Two linked hubs, ephemeral port, no metrics listener.
std::string default_config(const std::string& data_dir);
/// `cfg` with `line` (e.g. "register_wait_ms = 0") added to its [device_api] table.
std::string with_device_api(std::string cfg, const std::string& line);

class server_process {
public:
  server_process() = default;
  ~server_process(); // SIGKILLs a still-running server, removes the temp dir
  server_process(const server_process&) = delete;
  server_process& operator=(const server_process&) = delete;

  /// Starts `provisiond serve --config <dir>/cfg.toml [extra_args]` and waits (30 s) until
  /// it listens. `config_toml` empty = default_config(dir). `data_dir` empty =
  /// a fresh temp dir (kept across restart()).
  [[nodiscard]] error start(std::string config_toml = {}, std::string data_dir = {},
                            std::vector<std::string> extra_args = {});
  /// Starts later servers with RLIMIT_NOFILE (soft and hard) set to `n`, so
  /// the server cannot raise it (0 = inherit the test's limit).
  void set_descriptor_limit(unsigned long n) { nofile_ = n; }
  /// Later starts run the test binary (PROVISIOND_TEST_BIN, tests/testd/)
  /// with every allocation answering `ms` late, so the hand-off from
  /// allocation to configuration comes that much later; 0 = the test
  /// binary without the delay.
  void set_pipeline_delay_ms(int ms) { pipeline_delay_ms_ = ms; }
  /// Later starts run the test binary, which on SIGTERM holds `ms` once its
  /// device listeners take no new clients or MQTT requests, before they
  /// wait for the answers in flight (app::extensions::listeners_stopping).
  void set_stop_pause_ms(int ms) { stop_pause_ms_ = ms; }
  /// The destructor removes the data dir even when start() was given one.
  void remove_data_dir_at_exit() { own_dir_ = true; }
  /// SIGTERM and wait for exit; returns the exit status.
  int stop();
  /// Waits for the process to exit (after a SIGTERM the test sent itself:
  /// a second one ends it at once); returns the exit status.
  int wait_exit();
  /// SIGKILL and reap.
  void kill9();
  /// Starts again on the same data dir and config (new port).
  [[nodiscard]] error restart();
  bool alive() const;

  pid_t pid() const { return pid_; }
  const std::string& data_dir() const { return data_dir_; }
  const std::string& id_scope() const { return id_scope_; }
  uint16_t port() const { return port_; } ///< 0 without the gateway role
  uint16_t mqtt_port() const { return mqtt_port_; } ///< 0 when MQTT is off
  const std::string& log_file() const { return log_; }
  std::string log() const;

  /// A client trusting the instance CA.
  net::https_client client(bool reuse = true) const;

  /// Service SAS for the owner policy (or `key`/`policy` when given).
  std::string service_auth(const std::string& policy = {}, const std::string& key = {}) const;
  /// Device SAS for a registration id signed with a device key.
  std::string device_auth(const std::string& registration_id, const std::string& key,
                          int64_t lifetime_s = 3600) const;

  /// Service API call with owner authorization; body/response JSON.
  net::https_response service(const std::string& method, const std::string& path,
                              const std::string& body = {},
                              const net::http_headers& extra = {}) const;

private:
  std::string data_dir_;
  std::string config_;
  std::vector<std::string> args_; ///< after `serve --config F` (e.g. --roles)
  std::string log_;
  std::string id_scope_;
  std::string owner_key_;
  uint16_t port_ = 0;
  uint16_t mqtt_port_ = 0;
  pid_t pid_ = -1;
  bool own_dir_ = false;
  unsigned long nofile_ = 0;
  int pipeline_delay_ms_ = -1; ///< < 0: the product binary (PROVISIOND_BIN)
  int stop_pause_ms_ = 0;
};

/// What the register request itself got (register_device polls after it).
struct put_answer {
  int status = 0;
  double ms = 0; ///< wall time of the PUT
};

/// Registers like an SDK device: PUT then poll until terminal (or timeout).
/// Returns the final operation JSON; `status_out` is the final HTTP status.
nlohmann::json register_device(net::https_client& c, const server_process& s,
                               const std::string& registration_id, const std::string& key,
                               int& status_out, int poll_ms = 20, put_answer* put = nullptr);

std::string make_temp_dir(const std::string& prefix);
void remove_tree(const std::string& path);

} // namespace prov::test
