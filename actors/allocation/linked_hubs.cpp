#include "actors/allocation/linked_hubs.hpp"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "config/config.hpp"
#include "messages/ascii.hpp"
#include "messages/json_body.hpp"
#include "messages/registration.hpp"

namespace prov::allocation {

using nlohmann::json;

namespace {

constexpr std::size_t max_location = 128;

error invalid(std::string msg) {
  return {error_code::invalid_linked_hub, std::move(msg)};
}

/// The fields of a hub document onto `out`; `strict`: unknown fields are
/// errors (the service API); the stored form is checked the same way.
error fields_of(const json& j, linked_hub& out) {
  if (!j.is_object())
    return invalid("a linked hub is a JSON object");
  for (const auto& [k, v] : j.items()) {
    if (k == "name") {
      if (!v.is_string())
        return invalid("name must be a string (the hub's host name)");
    } else if (k == "allocationWeight") {
      if (v.is_null())
        continue;
      if (!v.is_number_integer())
        return invalid("allocationWeight must be an integer 1..1000, got " + v.dump());
      auto w = v.get<int64_t>();
      if (w < 1 || w > 1000)
        return invalid("allocationWeight must be 1..1000, got " + std::to_string(w));
      out.weight = static_cast<int>(w);
    } else if (k == "applyAllocationPolicy") {
      if (v.is_null())
        continue;
      if (!v.is_boolean())
        return invalid("applyAllocationPolicy must be true or false, got " + v.dump());
      out.apply_allocation_policy = v.get<bool>();
    } else if (k == "location") {
      if (v.is_null())
        continue;
      if (!v.is_string() || v.get_ref<const std::string&>().size() > max_location)
        return invalid("location must be a string of at most 128 characters (a region name)");
      out.region = v.get<std::string>();
    } else if (k == "healthEndpoint") {
      if (v.is_null())
        continue;
      if (!v.is_string())
        return invalid("healthEndpoint must be an https URL string, got " + v.dump());
      const auto& url = v.get_ref<const std::string&>();
      if (!url.empty() && !config::valid_health_endpoint(url))
        return invalid("healthEndpoint must be https://host[:port]/path, got '" + url + "'");
      out.health_endpoint = url;
    } else if (k == "health") {
      // What GET shows of this process's probes: read-only, ignored on
      // input so a document fetched with GET can be PUT back.
    } else {
      return invalid("unknown field '" + k
                     + "' (expected name, allocationWeight, applyAllocationPolicy, location, "
                       "healthEndpoint)");
    }
  }
  return {};
}

} // namespace

std::string hub_key(std::string_view hostname) {
  return ascii::to_lower(hostname);
}

std::string to_json(const linked_hub& h) {
  json j{{"name", h.hostname},
         {"allocationWeight", h.weight},
         {"applyAllocationPolicy", h.apply_allocation_policy},
         {"location", h.region}};
  if (!h.health_endpoint.empty())
    j["healthEndpoint"] = h.health_endpoint;
  return j.dump();
}

error hub_from_body(std::string_view hostname, std::string_view body, linked_hub& out) {
  out = linked_hub{};
  if (!config::valid_dns_name(hostname))
    return invalid("'" + std::string(hostname)
                   + "' is not a host name (labels of letters, digits and '-', at most 253 "
                     "characters)");
  json j = json::object();
  if (!body.empty())
    if (auto err = parse_json_body(body, j))
      return err;
  if (!j.is_object())
    return invalid("a linked hub is a JSON object");
  if (auto it = j.find("name"); it != j.end() && it->is_string()
                                && !ascii::iequals(it->get_ref<const std::string&>(), hostname))
    return {error_code::id_mismatch, "the body's name '" + it->get<std::string>()
                                       + "' differs from the path's '" + std::string(hostname)
                                       + "'"};
  if (auto err = fields_of(j, out))
    return err;
  out.hostname = std::string(hostname);
  return {};
}

error hub_from_stored(std::string_view key, std::string_view doc, linked_hub& out) {
  out = linked_hub{};
  auto j = json::parse(doc, nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return {error_code::storage_failure, "linked hub '" + std::string(key) + "' is not a JSON object"};
  auto it = j.find("name");
  if (it == j.end() || !it->is_string() || hub_key(it->get_ref<const std::string&>()) != key
      || !config::valid_dns_name(it->get_ref<const std::string&>()))
    return {error_code::storage_failure,
            "linked hub '" + std::string(key) + "': the name does not match the key"};
  if (auto err = fields_of(j, out))
    return {error_code::storage_failure, "linked hub '" + std::string(key) + "': " + err.message};
  out.hostname = it->get<std::string>();
  return {};
}

std::string_view to_string(hub_health::status s) noexcept {
  switch (s) {
    case hub_health::status::unknown: return "unknown";
    case hub_health::status::healthy: return "healthy";
    case hub_health::status::unhealthy: return "unhealthy";
  }
  return "unknown";
}

hub_set::snapshot hub_set::hubs() const {
  std::lock_guard<std::mutex> guard{mtx_};
  return hubs_;
}

void hub_set::assign(std::vector<linked_hub> hubs) {
  std::sort(hubs.begin(), hubs.end(), [](const linked_hub& a, const linked_hub& b) {
    return hub_key(a.hostname) < hub_key(b.hostname);
  });
  auto next = std::make_shared<const std::vector<linked_hub>>(std::move(hubs));
  std::lock_guard<std::mutex> guard{mtx_};
  // Health is kept for hubs still probed at the same endpoint; a removed
  // hub, or a new endpoint, starts over.
  for (auto it = health_.begin(); it != health_.end();) {
    auto same = std::find_if(next->begin(), next->end(), [&](const linked_hub& h) {
      return hub_key(h.hostname) == it->first && h.health_endpoint == it->second.first;
    });
    it = same == next->end() ? health_.erase(it) : std::next(it);
  }
  hubs_ = std::move(next);
  ++generation_;
}

uint64_t hub_set::generation() const noexcept {
  std::lock_guard<std::mutex> guard{mtx_};
  return generation_;
}

hub_health::status hub_set::report_probe(std::string_view hostname, std::string_view endpoint,
                                         bool ok, double rtt_ms, std::string why,
                                         int unhealthy_after, int healthy_after) {
  const auto key = hub_key(hostname);
  std::lock_guard<std::mutex> guard{mtx_};
  auto linked = std::find_if(hubs_->begin(), hubs_->end(), [&](const linked_hub& h) {
    return hub_key(h.hostname) == key && h.health_endpoint == endpoint;
  });
  if (linked == hubs_->end())
    return hub_health::status::unknown; // removed or re-pointed while probing
  auto& [url, h] = health_[key];
  url = std::string(endpoint);
  h.last_probe_ms = now_ms();
  if (ok) {
    h.rtt_ms = rtt_ms;
    h.last_error.clear();
    h.failures = 0;
    ++h.successes;
    // A hub never seen unhealthy is healthy at its first good probe.
    if (h.state != hub_health::status::unhealthy || h.successes >= healthy_after)
      h.state = hub_health::status::healthy;
  } else {
    h.last_error = std::move(why);
    h.successes = 0;
    ++h.failures;
    if (h.failures >= unhealthy_after)
      h.state = hub_health::status::unhealthy;
  }
  return h.state;
}

hub_health hub_set::health(std::string_view hostname) const {
  std::lock_guard<std::mutex> guard{mtx_};
  auto it = health_.find(hub_key(hostname));
  return it == health_.end() ? hub_health{} : it->second.second;
}

bool hub_set::eligible(const linked_hub& h) const {
  if (h.health_endpoint.empty())
    return true;
  return health(h.hostname).state != hub_health::status::unhealthy;
}

bool hub_set::eligible(std::string_view hostname) const {
  auto set = hubs();
  for (const auto& h : *set)
    if (ascii::iequals(h.hostname, hostname))
      return eligible(h);
  return true;
}

} // namespace prov::allocation
