#include "actors/allocation/allocation_policy.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "messages/ascii.hpp"
#include "messages/crypto.hpp"
#include "messages/json_text.hpp"

namespace prov::allocation {

namespace {

using ascii::to_lower;

/// u in the open interval (0, 1) from the first 53 bits of
/// SHA-256(lower(registration_id) + "\n" + lower(hostname)).
double unit_hash(const std::string& reg_lower, std::string_view hostname) {
  const crypto::sha256_digest d =
      crypto::sha256(reg_lower + "\n" + to_lower(hostname));
  uint64_t x = 0;
  for (int i = 0; i < 8; ++i) x = (x << 8) | d[static_cast<std::size_t>(i)];
  // +0.5 keeps u away from 0 and 1, so ln(u) is finite and negative.
  return (static_cast<double>(x >> 11) + 0.5) / 9007199254740992.0; // 2^53
}

} // namespace

namespace {

error hashed_impl(std::string_view registration_id, const std::vector<candidate_hub>& hubs,
                  bool explicit_list, std::string& out, std::vector<double>* scores);

} // namespace

error hashed(std::string_view registration_id,
             const std::vector<candidate_hub>& hubs, bool explicit_list,
             std::string& out) {
  return hashed_impl(registration_id, hubs, explicit_list, out, nullptr);
}

error hashed_explained(std::string_view registration_id,
                       const std::vector<candidate_hub>& hubs, bool explicit_list,
                       std::string& out, std::string& why_json) {
  // -1: the hub took no part; 0: it was the only one (nothing hashed).
  std::vector<double> scores(hubs.size(), -1.0);
  auto err = hashed_impl(registration_id, hubs, explicit_list, out, &scores);
  why_json.clear();
  if (err)
    return err;
  std::string weights, scored;
  json_text::object w(weights), sc(scored);
  bool any_score = false;
  for (std::size_t i = 0; i < hubs.size(); ++i) {
    if (scores[i] < 0)
      continue;
    w.num(hubs[i].hostname, std::clamp(hubs[i].weight, 1, 1000));
    if (scores[i] > 0) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.6g", scores[i]);
      sc.raw(hubs[i].hostname, buf);
      any_score = true;
    }
  }
  w.close();
  sc.close();
  json_text::object why(why_json);
  why.raw("weights", weights);
  if (any_score)
    why.raw("scores", scored);
  why.close();
  return {};
}

namespace {

error hashed_impl(std::string_view registration_id, const std::vector<candidate_hub>& hubs,
                  bool explicit_list, std::string& out, std::vector<double>* scores) {
  out.clear();
  auto takes_part = [explicit_list](const candidate_hub& h) {
    return !h.hostname.empty() && (explicit_list || h.apply_allocation_policy);
  };
  // One hub taking part is the answer without hashing (a SHA-256 per hub).
  const candidate_hub* only = nullptr;
  std::size_t eligible = 0;
  for (const candidate_hub& h : hubs)
    if (takes_part(h)) {
      only = &h;
      ++eligible;
    }
  if (eligible == 1) {
    out = only->hostname;
    if (scores != nullptr)
      (*scores)[static_cast<std::size_t>(only - hubs.data())] = 0;
    return {};
  }
  const std::string reg_lower = to_lower(registration_id);
  const candidate_hub* best = nullptr;
  double best_score = 0;
  std::string best_lower;
  for (const candidate_hub& h : hubs) {
    if (!takes_part(h)) continue;
    // Out-of-range weights are clamped rather than dropped: validation
    // belongs to the enrollment/hub model, allocation must stay total.
    const int w = std::clamp(h.weight, 1, 1000);
    const double score = -static_cast<double>(w) / std::log(unit_hash(reg_lower, h.hostname));
    if (scores != nullptr)
      (*scores)[static_cast<std::size_t>(&h - hubs.data())] = score;
    // Ties (in practice: the same hub listed twice, perhaps in another case)
    // are broken by name, never by position, to stay order independent.
    const std::string lower = to_lower(h.hostname);
    const bool better =
        best == nullptr || score > best_score ||
        (score == best_score &&
         (lower < best_lower || (lower == best_lower && h.hostname < best->hostname)));
    if (better) {
      best = &h;
      best_score = score;
      best_lower = lower;
    }
  }
  if (best == nullptr)
    return error{error_code::no_hub_available,
                 hubs.empty()    ? "no IoT hub is available for allocation"
                 : explicit_list ? "the enrollment names no usable IoT hub"
                                 : "no linked IoT hub takes part in allocation "
                                   "(applyAllocationPolicy is false on all)"};
  out = best->hostname;
  return {};
}

} // namespace

error static_hub(const std::vector<candidate_hub>& hubs, std::string& out) {
  out.clear();
  if (hubs.size() != 1 || hubs.front().hostname.empty())
    return error{error_code::no_hub_available,
                 "static allocation needs exactly one IoT hub, " +
                     std::to_string(hubs.size()) + " given"};
  out = hubs.front().hostname;
  return {};
}

void hashed_policy::allocate(const request& in, done_fn done) const {
  decision d;
  if (hashed_explained(in.registration_id, in.candidates, in.explicit_list, d.hub, d.why_json)) {
    (*done)({error_code::no_hub_available,
             in.linked_hubs == 0
               ? "no IoT hub is linked: add one (provisiond hubs add, or PUT "
                 "/linkedHubs/{hostname} on the service API)"
               : "no linked IoT hub is available for this enrollment"},
            {});
    return;
  }
  done->decided({}, std::move(d));
}

void static_policy::allocate(const request& in, done_fn done) const {
  std::string hub;
  if (static_hub(in.candidates, hub)) {
    (*done)({error_code::no_hub_available,
             "static allocation: the enrollment must name exactly one linked hub"},
            {});
    return;
  }
  (*done)({}, std::move(hub));
}

} // namespace prov::allocation
