#pragma once
// The instance identity generated on first start and kept in
// <data_dir>/identity.json (mode 0600): id scope and the owner policy keys.

#include <string>

#include "messages/error.hpp"

namespace prov::app {

struct identity {
  std::string id_scope;
  std::string service_host;
  std::string policy_name = "provisioningserviceowner";
  std::string primary_key;
  std::string secondary_key;
};

/// Reads <data_dir>/identity.json.
[[nodiscard]] error load_identity(const std::string& data_dir, identity& out);

/// Loads the identity, or creates and saves a new one when absent.
[[nodiscard]] error load_or_create_identity(const std::string& data_dir,
                                            const std::string& service_host,
                                            identity& out, bool& created);

/// "HostName=...;SharedAccessKeyName=...;SharedAccessKey=..."
std::string connection_string(const identity& id);

} // namespace prov::app
