#pragma once
// The "custom" allocation policy: DPS's custom allocation webhook (protocol
// notes §6). The policy writes DPS's AllocationRequest, hands it to a
// `webhook_poster` and reads the AllocationResponse when it comes back, on
// the poster's thread. The HTTPS I/O is not here (this folder does none): the
// engine passes a poster backed by net::webhook_client (net/), whose
// own threads make the calls, so no stage thread ever waits on a webhook.

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "actors/allocation/policy.hpp"

namespace prov::allocation {

/// A POST to a webhook.
struct webhook_post {
  std::string url;  ///< customAllocationDefinition.webhookUrl (may hold a key in its query)
  std::string body; ///< JSON
};

/// What came of it, after the poster's retries.
struct webhook_reply {
  error err;        ///< no HTTP answer at all (connect, TLS, timeout)
  int status = 0;   ///< HTTP status of the last answer; 0 when none
  std::string body;
  int attempts = 0; ///< requests sent (1 + retries used)
};

/// Sends a POST and calls `done` exactly once, from any thread.
using webhook_poster =
  std::function<void(webhook_post, std::function<void(webhook_reply)> done)>;

/// The hubs offered to the webhook as `linkedHubs`: the candidates the
/// enrollment may use (its iotHubs; else the linked hubs that take part in
/// allocation, apply_allocation_policy = true).
std::vector<std::string> offered_hubs(const request& in);

/// DPS's AllocationRequest for `in`: `individualEnrollment` or
/// `enrollmentGroup` (the enrollment as GET shows it, keys removed),
/// `deviceRuntimeContext` {registrationId, currentIotHubHostName and
/// currentDeviceId when re-provisioning, symmetricKey | x509 | tpm, payload}
/// and `linkedHubs`.
std::string webhook_request_body(const request& in, const std::vector<std::string>& linked);

/// Reads an AllocationResponse {iotHubHostName, initialTwin?, payload?}.
/// Every failure is custom_allocation_failed (400207) with a message that
/// names the webhook's status: non-2xx ("Custom allocation failed with status
/// code: 500", DPS's text), no answer, a body that is not a JSON object, no
/// hub, a hub not among `linked`, an initialTwin or payload that is not an
/// object. `host` names the webhook in messages (never its query: it may
/// carry a function key).
[[nodiscard]] error read_webhook_reply(const webhook_reply& r,
                                       const std::vector<std::string>& linked,
                                       std::string_view host, decision& out);

/// "host[:port]" of an https URL, for messages ("" when it has none).
std::string webhook_host(std::string_view url);

/// allocationPolicy "custom".
class custom_policy final : public policy {
public:
  /// `deadline`: how long the stage waits at most; longer than the poster's
  /// own timeouts and retries together, so the poster's answer normally wins.
  custom_policy(webhook_poster post, std::chrono::milliseconds deadline)
      : post_(std::move(post)), deadline_(deadline) {}
  allocation_policy kind() const noexcept override { return allocation_policy::custom; }
  std::chrono::milliseconds deadline() const noexcept override { return deadline_; }
  void allocate(const request& in, done_fn done) const override;

private:
  webhook_poster post_;
  std::chrono::milliseconds deadline_;
};

} // namespace prov::allocation
