#pragma once
// The geoLatency allocation policy: the candidate hub with the lowest
// estimated latency to the device; ties (within tie_ms of the lowest) are
// hashed among the tied, as DPS does.
//
// Latency estimate for a device in region D and a hub h in region H, the
// gateway being in region G (docs/configuration.md, [geo_latency]):
//   D == G: the measured RTT of h's health probe (from this gateway), else
//           the table's G-H figure;
//   D != G: the table's D-H figure, else the table's D-G figure plus the
//           measured RTT of h (device to gateway, gateway to hub).
// A region to itself is 0 ms unless the table says otherwise. Hubs with no
// estimate rank after every hub with one; when no hub has one, the policy is
// hashed over all candidates and says so.
//
// The device's region: the registration payload's "region" member (a
// string) when present, else the first configured client-address range
// holding the device's address, else the gateway's own region.

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "actors/allocation/policy.hpp"
#include "messages/error.hpp"

namespace prov::allocation {

/// An address range (IPv4 or IPv6 CIDR) mapped to a region.
struct client_range {
  std::string cidr;   ///< e.g. "10.1.0.0/16", "2001:db8::/32"
  std::string region;
};

struct geo_options {
  std::string gateway_region;           ///< where this gateway runs; "" = unknown
  double tie_ms = 5;                    ///< hubs within this of the lowest are tied
  std::vector<client_range> client_ranges; ///< first match wins
  /// Region-to-region latency in ms, symmetric: {from, to} -> ms.
  std::map<std::pair<std::string, std::string>, double> latency_ms;
};

/// True when `cidr` is a valid IPv4/IPv6 CIDR ("a.b.c.d/n", "x::/n").
bool valid_cidr(std::string_view cidr);
/// True when `ip` (a literal address) lies in `cidr`; false when either
/// does not parse or the families differ.
bool in_cidr(std::string_view ip, std::string_view cidr);

/// Where the device is and how that was found.
struct device_region {
  std::string region; ///< "" when nothing says
  std::string from;   ///< "payload", "client address <cidr>", "gateway region", "unknown"
};
device_region region_of(const geo_options& o, std::string_view payload_json,
                        std::string_view client_ip);

class geo_latency_policy final : public policy {
public:
  /// `rtt_ms(hub)`: the hub's last measured probe RTT, or a negative value
  /// when none is known. Called during allocate(), any thread.
  geo_latency_policy(geo_options o, std::function<double(std::string_view)> rtt_ms);
  allocation_policy kind() const noexcept override { return allocation_policy::geo_latency; }
  bool synchronous() const noexcept override { return true; }
  void allocate(const request& in, done_fn done) const override;

private:
  /// The estimate for `h` from a device in `region`, and where it came from.
  std::optional<double> estimate(const candidate_hub& h, const std::string& region,
                                 std::string& source) const;
  std::optional<double> table(const std::string& a, const std::string& b) const;

  geo_options o_;
  std::function<double(std::string_view)> rtt_ms_;
};

} // namespace prov::allocation
