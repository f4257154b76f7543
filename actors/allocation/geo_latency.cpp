#include "actors/allocation/geo_latency.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include <nlohmann/json.hpp>

#include "actors/allocation/allocation_policy.hpp"
#include "messages/ascii.hpp"
#include "messages/json_text.hpp"

namespace prov::allocation {

namespace {

/// An address as 16 bytes (IPv4 in the first 4) and its family.
struct address {
  int family = 0;
  unsigned char bytes[16] = {};
};

bool parse_ip(std::string_view text, address& out) {
  std::string s(text);
  if (::inet_pton(AF_INET, s.c_str(), out.bytes) == 1) {
    out.family = AF_INET;
    return true;
  }
  if (::inet_pton(AF_INET6, s.c_str(), out.bytes) == 1) {
    out.family = AF_INET6;
    return true;
  }
  return false;
}

bool parse_cidr(std::string_view cidr, address& net, int& bits) {
  const auto slash = cidr.find('/');
  if (slash == std::string_view::npos || !parse_ip(cidr.substr(0, slash), net))
    return false;
  const auto len = cidr.substr(slash + 1);
  if (len.empty() || len.size() > 3 || !std::all_of(len.begin(), len.end(), ::isdigit))
    return false;
  bits = std::stoi(std::string(len));
  return bits <= (net.family == AF_INET ? 32 : 128);
}

std::string fmt_ms(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

} // namespace

bool valid_cidr(std::string_view cidr) {
  address a;
  int bits = 0;
  return parse_cidr(cidr, a, bits);
}

bool in_cidr(std::string_view ip, std::string_view cidr) {
  address a, net;
  int bits = 0;
  if (!parse_ip(ip, a) || !parse_cidr(cidr, net, bits) || a.family != net.family)
    return false;
  for (int i = 0; i < bits; ++i) {
    const unsigned char mask = static_cast<unsigned char>(0x80u >> (i % 8));
    if ((a.bytes[i / 8] & mask) != (net.bytes[i / 8] & mask))
      return false;
  }
  return true;
}

device_region region_of(const geo_options& o, std::string_view payload_json,
                        std::string_view client_ip) {
  if (!payload_json.empty()) {
    auto j = nlohmann::json::parse(payload_json, nullptr, false);
    if (j.is_object())
      if (auto it = j.find("region"); it != j.end() && it->is_string() && !it->empty())
        return {it->get<std::string>(), "payload"};
  }
  // An IPv4 client seen on a dual-stack socket ("::ffff:a.b.c.d").
  std::string_view ip = client_ip;
  if (ip.rfind("::ffff:", 0) == 0 && ip.find('.') != std::string_view::npos)
    ip.remove_prefix(7);
  for (const auto& r : o.client_ranges)
    if (!ip.empty() && in_cidr(ip, r.cidr))
      return {r.region, "client address " + r.cidr};
  if (!o.gateway_region.empty())
    return {o.gateway_region, "gateway region"};
  return {"", "unknown"};
}

geo_latency_policy::geo_latency_policy(geo_options o,
                                       std::function<double(std::string_view)> rtt_ms)
  : o_(std::move(o)), rtt_ms_(std::move(rtt_ms)) {}

std::optional<double> geo_latency_policy::table(const std::string& a,
                                                const std::string& b) const {
  if (a.empty() || b.empty())
    return std::nullopt;
  const auto la = ascii::to_lower(a), lb = ascii::to_lower(b);
  if (auto it = o_.latency_ms.find({la, lb}); it != o_.latency_ms.end())
    return it->second;
  if (auto it = o_.latency_ms.find({lb, la}); it != o_.latency_ms.end())
    return it->second;
  if (la == lb)
    return 0.0;
  return std::nullopt;
}

std::optional<double> geo_latency_policy::estimate(const candidate_hub& h,
                                                   const std::string& region,
                                                   std::string& source) const {
  const double rtt = rtt_ms_ ? rtt_ms_(h.hostname) : -1;
  const bool at_gateway =
    region.empty() || ascii::to_lower(region) == ascii::to_lower(o_.gateway_region);
  if (at_gateway) {
    if (rtt >= 0) {
      source = "probe";
      return rtt;
    }
    if (auto t = table(o_.gateway_region, h.region)) {
      source = "table " + o_.gateway_region + "-" + h.region;
      return t;
    }
    return std::nullopt;
  }
  if (auto t = table(region, h.region)) {
    source = "table " + region + "-" + h.region;
    return t;
  }
  if (auto to_gateway = table(region, o_.gateway_region); to_gateway && rtt >= 0) {
    source = "table " + region + "-" + o_.gateway_region + " + probe";
    return *to_gateway + rtt;
  }
  return std::nullopt;
}

void geo_latency_policy::allocate(const request& in, done_fn done) const {
  const auto where = region_of(o_, in.payload_json, in.client_ip);
  std::vector<candidate_hub> part;
  for (const auto& h : in.candidates)
    if (!h.hostname.empty() && (in.explicit_list || h.apply_allocation_policy))
      part.push_back(h);
  std::vector<std::optional<double>> est(part.size());
  std::vector<std::string> source(part.size());
  std::optional<double> best;
  for (std::size_t i = 0; i < part.size(); ++i) {
    est[i] = estimate(part[i], where.region, source[i]);
    if (est[i] && (!best || *est[i] < *best))
      best = est[i];
  }
  std::vector<candidate_hub> tied;
  for (std::size_t i = 0; i < part.size(); ++i)
    if (!best || (est[i] && *est[i] <= *best + o_.tie_ms))
      tied.push_back(part[i]);
  decision d;
  std::string hashed_why;
  if (part.empty()
      || hashed_explained(in.registration_id, tied, /*explicit_list=*/true, d.hub, hashed_why)) {
    (*done)({error_code::no_hub_available,
             in.linked_hubs == 0
               ? "no IoT hub is linked: add one (provisiond hubs add, or PUT "
                 "/linkedHubs/{hostname} on the service API)"
               : "no linked IoT hub is available for this enrollment"},
            {});
    return;
  }
  std::string latency, sources, tied_list;
  json_text::object l(latency), s(sources);
  for (std::size_t i = 0; i < part.size(); ++i) {
    if (est[i])
      l.raw(part[i].hostname, fmt_ms(*est[i]));
    else
      l.raw(part[i].hostname, "null");
    s.str(part[i].hostname, est[i] ? source[i] : "unknown");
  }
  l.close();
  s.close();
  tied_list = "[";
  for (std::size_t i = 0; i < tied.size(); ++i)
    tied_list += (i ? ",\"" : "\"") + tied[i].hostname + "\"";
  tied_list += "]";
  json_text::object w(d.why_json);
  w.str("deviceRegion", where.region);
  w.str("regionFrom", where.from);
  w.raw("latencyMs", latency);
  w.raw("latencyFrom", sources);
  if (!best)
    w.str("servedBy", "hashed (no hub latency is known)");
  else
    w.raw("tieMs", fmt_ms(o_.tie_ms));
  w.raw("tied", tied_list);
  if (!hashed_why.empty())
    w.raw("hashed", hashed_why);
  w.close();
  done->decided({}, std::move(d));
}

} // namespace prov::allocation
