#pragma once
// The DPS device API, transport-neutral: what a register, a poll and a
// registration status lookup check, what they ask the engine, and what the
// device gets back. A device transport decodes its framing into a
// device_call and encodes the device_answer: the HTTP routes (routes.cpp)
// today; MQTT is the next (docs/extending.md).

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "actors/engine.hpp"
#include "actors/throttling/rate_limiter.hpp"
#include "config/config.hpp"
#include "messages/credential.hpp"
#include "messages/error.hpp"

namespace prov::gateway {

/// One device API call, as the transport decoded it.
struct device_call {
  enum class kind : uint8_t { register_device, poll, status_lookup };
  kind what = kind::register_device;
  std::string id_scope;        ///< as the device named it, decoded
  std::string registration_id; ///< decoded
  /// poll: the operation id, decoded; nullopt when it could not be decoded.
  std::optional<std::string> operation_id;
  std::string api_version;     ///< "" when missing
  std::string body;            ///< JSON text; "" when none
  /// The transport's objection to the body's framing (HTTP: its content
  /// type), answered where the body is read, after the path's checks.
  error body_framing;
  device_credential credential;
  bool force_registration = false;
  std::string protocol = "http";
  std::string client_ip;
  std::string tracking_id; ///< in error bodies and logs
};

/// What the device gets back.
struct device_answer {
  int status = 200;      ///< DPS's status (HTTP's, and MQTT's response topic)
  std::string body;      ///< JSON; for an error, its error body
  int retry_after_s = 0; ///< > 0: poll or retry after this long
  error err;             ///< set for an error answer
};
using answer_fn = std::function<void(device_answer)>;

class device_api {
public:
  /// `id_scope`: the instance's; `retry_after_s`: what 202s and
  /// throttled answers tell devices (device_api.retry_after_seconds);
  /// `quotas`: [throttling], of which the per-scope registration and the
  /// per-device poll quotas are checked in handle(), and the per-address
  /// one in admit_address(); `metrics` counts what they refuse (may be
  /// null). One instance serves every device transport (app/provisiond.cpp hands
  /// it to the HTTPS routes and the MQTT server), so each quota is one
  /// budget whichever protocol a device speaks.
  device_api(engine& eng, std::string id_scope, int retry_after_s,
             const config::throttling_config& quotas = {},
             metrics::instruments* metrics = nullptr);

  /// Checks `call`, asks the engine, answers exactly once: on this thread,
  /// or on an engine thread for a register and for a TPM device's poll or
  /// status lookup (engine::authenticate_device).
  void handle(device_call call, const answer_fn& answer);

  /// [throttling] requests_per_minute_per_address, for any request of
  /// either API from `client_ip` (an HTTP request; an MQTT CONNECT or
  /// PUBLISH): 0 when admitted, else the seconds until it would be (the
  /// Retry-After), counted as reason "client_request_rate". A map lookup:
  /// transports ask before any other check.
  int admit_address(const std::string& client_ip);

  /// An error answer with the Azure error body.
  static device_answer failure(const error& e, const std::string& tracking_id);
  /// The same for a device: a 500's message (storage and secrets errors name
  /// the data dir, key file, key ids) is replaced by a generic one with the
  /// tracking id; `err` keeps the full error for the operation log.
  static device_answer device_failure(const error& e, const std::string& tracking_id);

private:
  void register_device(register_request rr, const device_call& call,
                       const answer_fn& answer);

  /// The quotas' verdict for `call`, before any crypto or storage work:
  /// false when it was answered 429.
  bool admitted(const device_call& call, const answer_fn& answer);

  engine& eng_;
  std::string id_scope_;
  int retry_after_s_;
  metrics::instruments* metrics_;
  throttling::rate_limiter scope_registrations_; ///< one bucket: this instance's scope
  throttling::rate_limiter device_polls_;        ///< by registration id (lower case)
  throttling::rate_limiter address_requests_;    ///< by client IP
};

} // namespace prov::gateway
