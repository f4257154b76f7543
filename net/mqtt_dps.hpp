#pragma once
// The DPS conventions on top of MQTT (protocol notes §3): the CONNECT user
// name, the request topics a device publishes to, the response topic it
// subscribes to. Pure functions, no I/O.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace prov::mqtt {

/// `{idScope}/registrations/{registrationId}/api-version={V}[&ClientVersion=...]`.
struct dps_username {
  std::string id_scope;
  std::string registration_id;
  std::string api_version;
  std::string client_version; ///< decoded; "" when absent
};

/// "" when `u` has the DPS shape (api-version present and non-empty), else why not.
std::string parse_username(std::string_view u, dps_username& out);

/// The one subscription DPS serves.
inline constexpr std::string_view response_filter = "$dps/registrations/res/#";

struct dps_request {
  enum class kind : uint8_t { register_device, poll };
  kind what = kind::register_device;
  std::string rid;                          ///< raw, echoed exactly
  std::optional<std::string> operation_id;  ///< poll: decoded; nullopt if undecodable
  bool force_registration = false;          ///< register: &forceRegistration=true
};

/// SDKs send a counter or a UUID; the cap keeps the echoed response topic
/// well inside MQTT's 65535-byte string limit.
inline constexpr std::size_t max_rid_bytes = 128;

/// "" when `topic` is a register or an operation status topic, else why not.
/// The query must start with `$rid=` (SDKs match responses on it), of at
/// most max_rid_bytes; a poll must name its operationId.
std::string parse_request_topic(std::string_view topic, dps_request& out);

/// `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`: `$rid`
/// first and no other `$` (Python splits the topic on `$`), retry-after only
/// when > 0 and only here, never in the payload.
std::string response_topic(int status, std::string_view rid, int retry_after_s);

} // namespace prov::mqtt
