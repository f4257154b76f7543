#pragma once
// The allocation extension point. A policy picks a device's hub among the
// candidate hubs; asynchronously, so a policy may ask elsewhere (a webhook)
// and answer later. The allocation stage (allocation_actor.cpp) owns what
// every policy shares: the enrollment, the candidates, reprovisioning, the
// device id and twin. docs/extending.md shows what a new policy takes.

#include <array>
#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "actors/enrollment/enrollment_model.hpp"
#include "messages/dps_types.hpp"
#include "messages/error.hpp"

namespace prov::allocation {

struct candidate_hub {
  std::string hostname;
  int weight = 1;                 ///< allocation_weight, 1..1000
  bool apply_allocation_policy = true;
  std::string region{};           ///< "" when not configured
};

/// What a policy decides on. Valid during allocate() only: a policy that
/// answers later copies what it needs first.
struct request {
  std::string_view registration_id;
  std::shared_ptr<const enrollment::enrollment_view> enrollment;
  /// The enrollment's iotHubs among the linked hubs, else every linked hub.
  std::vector<candidate_hub> candidates;
  bool explicit_list = false;   ///< candidates are the enrollment's iotHubs
  std::size_t linked_hubs = 0;  ///< how many hubs are linked at all
  std::string_view payload_json; ///< the device's registration payload, "" when none
  std::string_view client_ip;    ///< the device's address as the gateway saw it, "" when unknown
  /// X.509 devices: {certificateInfo, signingCertificateInfo?} of the
  /// device's certificate (attestation::verdict::x509_json); "" otherwise.
  std::string_view x509_json;
  /// Re-provisioning: the hub and device id of the device's current
  /// assignment ("" on a first registration).
  std::string_view current_hub;
  std::string_view current_device_id;
};

/// A policy's answer: the hub, and what a policy may decide beyond it (the
/// custom webhook returns a twin and a payload for the device).
struct decision {
  std::string hub;
  /// Replaces the enrollment's initialTwin when set (compact JSON object).
  std::string initial_twin_json;
  /// Returned to the device in registrationState.payload (compact JSON
  /// object); "" when none.
  std::string payload_json;
  /// Why this hub, for operators (a compact JSON object; "" when the policy
  /// says nothing): the weights and scores, the webhook's answer.
  std::string why_json;
};

/// Where a policy's answer goes: the hub's host name, or why there is none.
/// Shared, so an answer that comes later keeps it alive.
class answer : public std::enable_shared_from_this<answer> {
public:
  virtual ~answer() = default;
  /// The decision, or why there is none (`d` is then ignored).
  virtual void decided(error err, decision d) = 0;
  /// A decision that is only a hub (hashed, static).
  void operator()(error err, std::string hub) {
    decision d;
    d.hub = std::move(hub);
    decided(std::move(err), std::move(d));
  }
};
using done_fn = std::shared_ptr<answer>;

/// An answer kept where it is given: for calling a synchronous policy and
/// reading its decision after the call.
struct held_answer final : answer {
  error err{error_code::internal, "the allocation policy did not answer"};
  decision d;
  void decided(error e, decision dec) override {
    err = std::move(e);
    d = std::move(dec);
  }
};

class policy {
public:
  virtual ~policy() = default;
  virtual allocation_policy kind() const noexcept = 0;
  /// True when allocate() always answers during the call: the stage then
  /// keeps nothing for a later answer (and `done` must not be kept).
  virtual bool synchronous() const noexcept { return false; }
  /// How long the stage waits for a later answer before it fails the device
  /// (no_hub_available); an answer after that is dropped.
  virtual std::chrono::milliseconds deadline() const noexcept { return std::chrono::seconds(30); }
  /// The same for one request (an enrollment may set its own limits).
  virtual std::chrono::milliseconds deadline_for(const request&) const noexcept {
    return deadline();
  }
  /// Calls `(*done)(...)` or `done->decided(...)` exactly once: during the call, or later from any
  /// thread (copying what it needs of `in` before returning).
  virtual void allocate(const request& in, done_fn done) const = 0;
};

/// The policies of an engine, one per allocation_policy; built once at start.
class registry {
public:
  /// Serves `p->kind()`, or `as` when given (one policy serving another's
  /// name).
  void add(std::shared_ptr<const policy> p);
  void add_as(allocation_policy as, std::shared_ptr<const policy> p);
  /// The policy for `k`; null when this engine has none.
  const policy* find(allocation_policy k) const noexcept {
    return policies_[static_cast<std::size_t>(k)].get();
  }

private:
  std::array<std::shared_ptr<const policy>, static_cast<std::size_t>(allocation_policy::custom) + 1>
    policies_;
};

} // namespace prov::allocation
