#include "app/identity.hpp"

#include <fstream>
#include <sstream>

#include <cstring>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "messages/crypto.hpp"

namespace prov::app {

namespace {

std::string path_of(const std::string& data_dir) {
  return data_dir + "/identity.json";
}

} // namespace

error load_identity(const std::string& data_dir, identity& out) {
  std::ifstream in(path_of(data_dir));
  if (!in)
    return {error_code::not_found,
            path_of(data_dir) + " not found: start `provisiond serve --data-dir "
              + data_dir + "` once to create the instance"};
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = nlohmann::json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return {error_code::bad_request, path_of(data_dir) + ": not valid JSON"};
  out.id_scope = j.value("id_scope", "");
  out.service_host = j.value("service_host", "localhost");
  out.policy_name = j.value("policy_name", "provisioningserviceowner");
  out.primary_key = j.value("primary_key", "");
  out.secondary_key = j.value("secondary_key", "");
  if (out.id_scope.empty() || out.primary_key.empty())
    return {error_code::bad_request, path_of(data_dir) + ": id_scope or primary_key missing"};
  return {};
}

error load_or_create_identity(const std::string& data_dir, const std::string& service_host,
                              identity& out, bool& created) {
  created = false;
  struct stat sb {};
  if (::stat(path_of(data_dir).c_str(), &sb) == 0) {
    if (auto err = load_identity(data_dir, out))
      return err;
    out.service_host = service_host; // config decides the host name
    return {};
  }
  out.id_scope = "0ne" + crypto::hex(crypto::random_bytes(4));
  for (auto& c : out.id_scope)
    c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  out.id_scope.replace(0, 3, "0ne");
  out.service_host = service_host;
  out.primary_key = crypto::generate_key();
  out.secondary_key = crypto::generate_key();
  nlohmann::json j{{"id_scope", out.id_scope},
                   {"service_host", out.service_host},
                   {"policy_name", out.policy_name},
                   {"primary_key", out.primary_key},
                   {"secondary_key", out.secondary_key}};
  auto tmp = path_of(data_dir) + ".tmp";
  {
    // Created 0600 (it holds the owner key) and synced before the rename.
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
      return {error_code::storage_failure, "cannot write " + tmp + ": " + std::strerror(errno)};
    auto text = j.dump(2) + "\n";
    bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size())
              && ::fsync(fd) == 0;
    ::close(fd);
    if (!ok)
      return {error_code::storage_failure, "cannot write " + tmp + ": " + std::strerror(errno)};
  }
  if (std::rename(tmp.c_str(), path_of(data_dir).c_str()) != 0)
    return {error_code::storage_failure, "cannot create " + path_of(data_dir)};
  created = true;
  return {};
}

std::string connection_string(const identity& id) {
  return "HostName=" + id.service_host + ";SharedAccessKeyName=" + id.policy_name
         + ";SharedAccessKey=" + id.primary_key;
}

} // namespace prov::app
