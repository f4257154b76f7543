#include <doctest/doctest.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/allocation/geo_latency.hpp"
#include "actors/allocation/linked_hubs.hpp"

using namespace prov;
using namespace prov::allocation;
using nlohmann::json;

namespace {

struct capture final : answer {
  error err;
  decision d;
  void decided(error e, decision dec) override {
    err = std::move(e);
    d = std::move(dec);
  }
};

/// Runs `p` for `id`; the decision (REQUIREs success).
decision run(const geo_latency_policy& p, const std::string& id,
             const std::vector<candidate_hub>& hubs, const std::string& payload = {},
             const std::string& ip = {}) {
  request in;
  in.registration_id = id;
  in.candidates = hubs;
  in.linked_hubs = hubs.size();
  in.payload_json = payload;
  in.client_ip = ip;
  auto c = std::make_shared<capture>();
  p.allocate(in, c);
  REQUIRE_MESSAGE(c->err.ok(), c->err.message);
  return c->d;
}

geo_options options() {
  geo_options o;
  o.gateway_region = "westeurope";
  o.tie_ms = 5;
  o.client_ranges = {{"10.1.0.0/16", "eastus"}, {"2001:db8::/32", "japaneast"}};
  o.latency_ms[{"eastus", "westeurope"}] = 90;
  o.latency_ms[{"japaneast", "westeurope"}] = 250;
  o.latency_ms[{"eastus", "japaneast"}] = 160;
  return o;
}

const std::vector<candidate_hub> hubs = {{"eu-1.example.net", 1, true, "westeurope"},
                                         {"eu-2.example.net", 1, true, "westeurope"},
                                         {"us-1.example.net", 1, true, "eastus"},
                                         {"jp-1.example.net", 1, true, "japaneast"}};

} // namespace

TEST_SUITE("geo_latency") {

TEST_CASE("CIDR ranges match IPv4 and IPv6 addresses by prefix") {
  CHECK(in_cidr("10.1.2.3", "10.1.0.0/16"));
  CHECK_FALSE(in_cidr("10.2.0.1", "10.1.0.0/16"));
  CHECK(in_cidr("2001:db8::1", "2001:db8::/32"));
  CHECK_FALSE(in_cidr("2001:db9::1", "2001:db8::/32"));
  CHECK_FALSE(in_cidr("10.1.2.3", "2001:db8::/32"));
  CHECK(in_cidr("192.168.1.1", "0.0.0.0/0"));
  CHECK(valid_cidr("10.0.0.0/8"));
  CHECK_FALSE(valid_cidr("10.0.0.0/33"));
  CHECK_FALSE(valid_cidr("10.0.0.0"));
  CHECK_FALSE(valid_cidr("host/8"));
}

TEST_CASE("the device's region: payload hint, else client-address range, else the gateway's") {
  auto o = options();
  auto r = region_of(o, R"({"region":"japaneast"})", "10.1.0.9");
  CHECK(r.region == "japaneast");
  CHECK(r.from == "payload");
  r = region_of(o, R"({"model":"x"})", "10.1.0.9");
  CHECK(r.region == "eastus");
  CHECK(r.from == "client address 10.1.0.0/16");
  r = region_of(o, "", "::ffff:10.1.4.4");
  CHECK(r.region == "eastus");
  r = region_of(o, "", "2001:db8::7");
  CHECK(r.region == "japaneast");
  r = region_of(o, "", "192.0.2.1");
  CHECK(r.region == "westeurope");
  CHECK(r.from == "gateway region");
  o.gateway_region.clear();
  CHECK(region_of(o, "", "192.0.2.1").from == "unknown");
}

TEST_CASE("probe RTTs decide for devices at the gateway; the table for devices elsewhere") {
  std::map<std::string, double> rtt{{"eu-1.example.net", 40}, {"eu-2.example.net", 3}};
  geo_latency_policy p(options(), [&](std::string_view h) {
    auto it = rtt.find(std::string(h));
    return it == rtt.end() ? -1.0 : it->second;
  });
  // At the gateway: the probes (eu-2 3 ms beats eu-1 40 ms, us-1 90, jp-1 250).
  auto d = run(p, "dev-1", hubs);
  CHECK(d.hub == "eu-2.example.net");
  auto why = json::parse(d.why_json);
  CHECK(why["regionFrom"] == "gateway region");
  CHECK(why["latencyMs"]["eu-2.example.net"] == 3.0);
  CHECK(why["latencyMs"]["us-1.example.net"] == 90.0);
  CHECK(why["latencyFrom"]["eu-1.example.net"] == "probe");
  CHECK(why["tied"] == json::array({"eu-2.example.net"}));
  // The probes change: the other one wins.
  rtt["eu-2.example.net"] = 80;
  CHECK(run(p, "dev-1", hubs).hub == "eu-1.example.net");
  // A device in eastus (client range): its own region's hub, from the table.
  d = run(p, "dev-2", hubs, "", "10.1.7.7");
  CHECK(d.hub == "us-1.example.net");
  why = json::parse(d.why_json);
  CHECK(why["deviceRegion"] == "eastus");
  CHECK(why["latencyMs"]["us-1.example.net"] == 0.0);
  CHECK(why["latencyMs"]["jp-1.example.net"] == 160.0);
  // A payload hint wins over the address.
  CHECK(run(p, "dev-3", hubs, R"({"region":"japaneast"})", "10.1.7.7").hub == "jp-1.example.net");
}

TEST_CASE("ties are hashed among the tied; no latency at all is hashed over every hub") {
  geo_latency_policy p(options(), [](std::string_view h) {
    return h == "eu-1.example.net" ? 10.0 : h == "eu-2.example.net" ? 12.0 : -1.0;
  });
  std::map<std::string, int> seen;
  for (int i = 0; i < 200; ++i) {
    auto d = run(p, "tie-" + std::to_string(i), hubs);
    ++seen[d.hub];
    auto why = json::parse(d.why_json);
    CHECK(why["tied"].size() == 2);
  }
  CHECK(seen.size() == 2);
  CHECK(seen["eu-1.example.net"] > 50);
  CHECK(seen["eu-2.example.net"] > 50);

  geo_options none = options();
  none.latency_ms.clear();
  none.gateway_region.clear();
  geo_latency_policy blind(none, [](std::string_view) { return -1.0; });
  auto d = run(blind, "dev-9", hubs);
  auto why = json::parse(d.why_json);
  CHECK(why["servedBy"] == "hashed (no hub latency is known)");
  CHECK(why["tied"].size() == 4);
}

TEST_CASE("hubs with applyAllocationPolicy false take no part unless named by the enrollment") {
  geo_latency_policy p(options(), [](std::string_view h) {
    return h == "eu-1.example.net" ? 1.0 : 50.0;
  });
  auto list = hubs;
  list[0].apply_allocation_policy = false;
  CHECK(run(p, "dev-x", list).hub != "eu-1.example.net");
}

}
