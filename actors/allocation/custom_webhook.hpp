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
  std::chrono::milliseconds timeout{10'000}; ///< per attempt
  int retries = 2;  ///< more attempts after a failed one
};

/// How long webhook attempts may take and how often they are retried: the
/// [custom_allocation] defaults, or an enrollment's own
/// (customAllocationDefinition.timeoutMs, .retries).
struct webhook_limits {
  std::chrono::milliseconds timeout{10'000};
  int retries = 2;
  std::chrono::milliseconds retry_backoff{500}; ///< before each retry, doubled every time
};

/// How long the stage waits for the poster at most: every attempt (connect,
/// then the exchange, each up to `timeout`) and backoff, plus 5 s, so the
/// poster's answer, which names the webhook's status, is normally the one.
std::chrono::milliseconds webhook_budget(const webhook_limits& l);

/// `defaults` with the enrollment's own timeout and retries, when it sets them.
webhook_limits limits_for(const enrollment::enrollment_view& v, const webhook_limits& defaults);

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
  /// `defaults`: the [custom_allocation] limits, for enrollments that set none.
  custom_policy(webhook_poster post, webhook_limits defaults)
      : post_(std::move(post)), defaults_(defaults) {}
  allocation_policy kind() const noexcept override { return allocation_policy::custom; }
  std::chrono::milliseconds deadline() const noexcept override {
    return webhook_budget(defaults_);
  }
  std::chrono::milliseconds deadline_for(const request& in) const noexcept override;
  void allocate(const request& in, done_fn done) const override;

private:
  webhook_poster post_;
  webhook_limits defaults_;
};

} // namespace prov::allocation
