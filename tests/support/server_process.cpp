#include "tests/support/server_process.hpp"

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string_view>
#include <thread>

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "actors/attestation/sas_token.hpp"
#include "messages/crypto.hpp"
#include "messages/registration.hpp"

namespace prov::test {

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

} // namespace

std::string make_temp_dir(const std::string& prefix) {
  std::string tmpl = "/tmp/" + prefix + "-XXXXXX";
  char* p = ::mkdtemp(tmpl.data());
  return p ? std::string(p) : std::string{};
}

void remove_tree(const std::string& path) {
  if (path.size() > 5 && path.rfind("/tmp/", 0) == 0)
    std::system(("rm -rf '" + path + "'").c_str());
}

std::string default_config(const std::string& data_dir) {
  return "data_dir = \"" + data_dir + "\"\n"
         "[device_api]\nlisten = \"127.0.0.1:0\"\nretry_after_seconds = 1\n"
         "[metrics]\nlisten = \"\"\n"
         "[[hubs]]\nhostname = \"hub-a.example.net\"\nallocation_weight = 1\n"
         "[[hubs]]\nhostname = \"hub-b.example.net\"\nallocation_weight = 1\n";
}

std::string with_device_api(std::string cfg, const std::string& line) {
  const std::string table = "[device_api]\n";
  auto at = cfg.find(table);
  if (at == std::string::npos)
    return cfg + table + line + "\n";
  return cfg.insert(at + table.size(), line + "\n");
}

server_process::~server_process() {
  if (alive())
    kill9();
  if (own_dir_)
    remove_tree(data_dir_);
}

error server_process::start(std::string config_toml, std::string data_dir,
                           std::vector<std::string> extra_args) {
  args_ = std::move(extra_args);
  if (data_dir.empty()) {
    data_dir_ = make_temp_dir("provisiond-it");
    own_dir_ = true;
  } else {
    data_dir_ = data_dir;
  }
  config_ = config_toml.empty() ? default_config(data_dir_) : config_toml;
  std::ofstream(data_dir_ + "/cfg.toml") << config_;
  return restart();
}

error server_process::restart() {
  const bool test_bin = pipeline_delay_ms_ >= 0 || stop_pause_ms_ > 0;
  const char* bin_var = test_bin ? "PROVISIOND_TEST_BIN" : "PROVISIOND_BIN";
  const char* bin = std::getenv(bin_var);
  if (bin == nullptr)
    return {error_code::internal, std::string(bin_var) + " is not set"};
  // The child's environment, made before fork (the child only execs).
  constexpr std::string_view delay_var = "PROVISIOND_TEST_PIPELINE_DELAY_MS=";
  constexpr std::string_view pause_var = "PROVISIOND_TEST_STOP_PAUSE_MS=";
  std::vector<std::string> env_text;
  for (char** e = environ; *e != nullptr; ++e)
    if (std::string_view(*e).rfind(delay_var, 0) != 0
        && std::string_view(*e).rfind(pause_var, 0) != 0)
      env_text.emplace_back(*e);
  if (pipeline_delay_ms_ > 0)
    env_text.push_back(std::string(delay_var) + std::to_string(pipeline_delay_ms_));
  if (stop_pause_ms_ > 0)
    env_text.push_back(std::string(pause_var) + std::to_string(stop_pause_ms_));
  std::vector<char*> envp;
  for (auto& e : env_text)
    envp.push_back(e.data());
  envp.push_back(nullptr);
  ::unlink((data_dir_ + "/endpoints.json").c_str());
  log_ = data_dir_ + "/server.log";
  pid_ = ::fork();
  if (pid_ == 0) {
    int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    if (nofile_ > 0) {
      rlimit rl{nofile_, nofile_};
      ::setrlimit(RLIMIT_NOFILE, &rl);
    }
    auto cfg = data_dir_ + "/cfg.toml";
    std::vector<const char*> argv = {bin, "serve", "--config", cfg.c_str()};
    // MQTT is on by default on 8883; tests run in parallel, so an ephemeral
    // port unless the test configures [mqtt] itself.
    if (config_.find("[mqtt]") == std::string::npos) {
      argv.push_back("--mqtt-listen");
      argv.push_back("127.0.0.1:0");
    }
    for (const auto& a : args_)
      argv.push_back(a.c_str());
    argv.push_back(nullptr);
    ::execve(bin, const_cast<char* const*>(argv.data()), envp.data());
    ::_exit(127);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    auto text = read_file(data_dir_ + "/endpoints.json");
    auto j = nlohmann::json::parse(text, nullptr, false);
    if (!j.is_discarded() && j.is_object()) {
      auto addr = j.value("device_api", "");
      port_ = addr.empty() ? 0 // no gateway role
                           : static_cast<uint16_t>(std::stoi(addr.substr(addr.rfind(':') + 1)));
      id_scope_ = j.value("id_scope", "");
      auto mq = j.value("mqtt", "");
      mqtt_port_ = mq.empty() ? 0 : static_cast<uint16_t>(std::stoi(mq.substr(mq.rfind(':') + 1)));
      auto ident = nlohmann::json::parse(read_file(data_dir_ + "/identity.json"));
      owner_key_ = ident.value("primary_key", "");
      return {};
    }
    if (!alive())
      return {error_code::internal, "provisiond exited during start:\n" + log()};
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return {error_code::request_timeout, "provisiond did not start within 30 s:\n" + log()};
}

bool server_process::alive() const {
  if (pid_ <= 0)
    return false;
  int status = 0;
  return ::waitpid(pid_, &status, WNOHANG) == 0;
}

int server_process::stop() {
  if (pid_ <= 0)
    return -1;
  ::kill(pid_, SIGTERM);
  return wait_exit();
}

int server_process::wait_exit() {
  if (pid_ <= 0)
    return -1;
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

void server_process::kill9() {
  if (pid_ <= 0)
    return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

std::string server_process::log() const {
  return read_file(log_);
}

net::https_client server_process::client(bool reuse) const {
  net::https_client_options o;
  o.host = "127.0.0.1";
  o.port = port_;
  o.ca_file = data_dir_ + "/tls/ca.pem";
  o.reuse_connection = reuse;
  return net::https_client(o);
}

std::string server_process::service_auth(const std::string& policy,
                                         const std::string& key) const {
  return attestation::make_sas("localhost", key.empty() ? owner_key_ : key,
                               now_ms() / 1000 + 3600,
                               policy.empty() ? "provisioningserviceowner" : policy);
}

std::string server_process::device_auth(const std::string& registration_id,
                                        const std::string& key, int64_t lifetime_s) const {
  return attestation::make_sas(id_scope_ + "/registrations/" + registration_id, key,
                               now_ms() / 1000 + lifetime_s, "registration");
}

net::https_response server_process::service(const std::string& method,
                                            const std::string& path,
                                            const std::string& body,
                                            const net::http_headers& extra) const {
  auto c = client();
  net::http_headers h = extra;
  if (!h.contains("authorization"))
    h.add("Authorization", service_auth());
  if (!body.empty() && !h.contains("content-type"))
    h.add("Content-Type", "application/json; charset=utf-8");
  auto sep = path.find('?') == std::string::npos ? "?" : "&";
  net::https_response resp;
  auto err = c.request(method, path + sep + "api-version=2021-10-01", h, body, resp);
  if (err) {
    resp.status = -1;
    resp.body = err.message;
  }
  return resp;
}

nlohmann::json register_device(net::https_client& c, const server_process& s,
                               const std::string& registration_id, const std::string& key,
                               int& status_out, int poll_ms, put_answer* put) {
  net::http_headers h;
  h.add("Authorization", s.device_auth(registration_id, key));
  h.add("Content-Type", "application/json; charset=utf-8");
  net::https_response resp;
  auto base = "/" + s.id_scope() + "/registrations/" + registration_id;
  nlohmann::json body{{"registrationId", registration_id}};
  auto t0 = std::chrono::steady_clock::now();
  if (auto err = c.request("PUT", base + "/register?api-version=2021-06-01", h, body.dump(),
                           resp)) {
    status_out = -1;
    return {{"error", err.message}};
  }
  status_out = resp.status;
  if (put) {
    put->status = resp.status;
    put->ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                .count();
  }
  auto j = nlohmann::json::parse(resp.body, nullptr, false);
  if (resp.status != 202 || j.is_discarded())
    return j;
  auto op = j.value("operationId", "");
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(poll_ms));
    net::http_headers ph;
    ph.add("Authorization", s.device_auth(registration_id, key));
    if (auto err = c.request("GET", base + "/operations/" + op + "?api-version=2021-06-01",
                             ph, {}, resp)) {
      status_out = -1;
      return {{"error", err.message}};
    }
    status_out = resp.status;
    j = nlohmann::json::parse(resp.body, nullptr, false);
    if (resp.status != 202)
      return j;
  }
  status_out = 408;
  return j;
}

} // namespace prov::test
