#pragma once
// Linked hubs managed at run time: the stored document (service API
// /linkedHubs, column family `hubs`, and in Kafka mode "hub/<name>" records
// of dps.enrollments), and the live set allocation reads, with each hub's
// health as this process's probes last saw it (hub_prober.hpp).
//
// The set is a snapshot behind a shared_ptr: a registration keeps the
// snapshot it was allocated against (a hub removed meanwhile is still a
// valid answer for it), and a change replaces the snapshot without waiting
// for readers. Thread-safe; CAF-free.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "actors/allocation/policy.hpp"
#include "messages/error.hpp"

namespace prov::allocation {

/// DPS allows at most 50 linked hubs per instance.
inline constexpr std::size_t max_linked_hubs = 50;

/// One linked hub as stored and as the service API shows it:
/// {"name", "allocationWeight", "applyAllocationPolicy", "location",
///  "healthEndpoint"} (ARM's iotHubs[] names, plus the health endpoint).
struct linked_hub {
  std::string hostname;
  int weight = 1;                 ///< 1..1000
  bool apply_allocation_policy = true;
  std::string region;             ///< ARM "location"; "" when unknown
  std::string health_endpoint;    ///< https URL; "" = not probed, always eligible

  candidate_hub candidate() const { return {hostname, weight, apply_allocation_policy, region}; }
};

/// The store / topic key of a hub: its lower-case host name.
std::string hub_key(std::string_view hostname);

/// The stored JSON of `h` (compact).
std::string to_json(const linked_hub& h);

/// Validates a service API body for the hub named `hostname` (the path):
/// a JSON object with only the fields above, `name` (when given) equal to
/// the path ignoring case, weight an integer 1..1000, applyAllocationPolicy
/// a boolean, location a string of at most 128 characters, healthEndpoint
/// an https URL or "" / null. Missing fields take their defaults. Errors:
/// malformed_json (not JSON), id_mismatch (name), invalid_linked_hub.
[[nodiscard]] error hub_from_body(std::string_view hostname, std::string_view body,
                                  linked_hub& out);

/// Parses a stored document (also what replication accepts from the topic:
/// the key must be the document's hub_key). Error storage_failure naming
/// the problem.
[[nodiscard]] error hub_from_stored(std::string_view key, std::string_view doc, linked_hub& out);

/// What this process's probes last saw of a hub.
struct hub_health {
  enum class status : uint8_t {
    unknown,   ///< no health endpoint, or not probed yet: eligible
    healthy,
    unhealthy, ///< skipped by every policy
  };
  status state = status::unknown;
  double rtt_ms = -1;         ///< last successful probe's round trip; -1 = none
  int64_t last_probe_ms = 0;  ///< Unix ms of the last probe; 0 = never
  std::string last_error;     ///< why the last probe failed; "" after a success
  int failures = 0;           ///< consecutive failed probes
  int successes = 0;          ///< consecutive good probes
};
std::string_view to_string(hub_health::status s) noexcept;

class hub_set {
public:
  using snapshot = std::shared_ptr<const std::vector<linked_hub>>;

  hub_set() : hubs_(std::make_shared<const std::vector<linked_hub>>()) {}

  /// The hubs now, in host name order.
  snapshot hubs() const;
  /// Replaces the set (tests, and reload()).
  void assign(std::vector<linked_hub> hubs);
  /// Bumped on every change of the set (not of health).
  uint64_t generation() const noexcept;

  /// Records one probe of `hostname` against `endpoint` (ignored when the
  /// hub's endpoint changed meanwhile). Returns the hub's status after it.
  hub_health::status report_probe(std::string_view hostname, std::string_view endpoint, bool ok,
                                  double rtt_ms, std::string why, int unhealthy_after,
                                  int healthy_after);
  hub_health health(std::string_view hostname) const;
  /// False only for a hub with a health endpoint whose probes say unhealthy.
  bool eligible(const linked_hub& h) const;
  bool eligible(std::string_view hostname) const;

private:
  mutable std::mutex mtx_;
  snapshot hubs_;
  uint64_t generation_ = 0;
  /// By hub_key; the endpoint it was probed at.
  std::map<std::string, std::pair<std::string, hub_health>> health_;
};

} // namespace prov::allocation
