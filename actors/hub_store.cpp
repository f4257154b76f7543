#include "actors/hub_store.hpp"

#include <cstdio>
#include <mutex>

#include <nlohmann/json.hpp>

#include "actors/engine_context.hpp"
#include "messages/ascii.hpp"

namespace prov {

using nlohmann::json;

namespace {
/// Reloads run on the writer (enrollment actor) and, with Kafka, on the
/// table reader thread: one at a time, so a reload that read the store
/// before a write cannot install its older set after the newer one.
std::mutex reload_mtx;
} // namespace

error reload_hubs(engine_context& ctx) {
  std::lock_guard<std::mutex> guard{reload_mtx};
  std::vector<allocation::linked_hub> hubs;
  auto err = ctx.store->scan(storage::cf::hubs, "", 0, [&](std::string_view k, std::string_view v) {
    allocation::linked_hub h;
    if (auto bad = allocation::hub_from_stored(k, v, h))
      std::fprintf(stderr, "provisiond: warning: skipping %s\n", bad.message.c_str());
    else
      hubs.push_back(std::move(h));
    return true;
  });
  if (err)
    return err;
  if (ctx.metrics != nullptr) {
    std::vector<std::string> names;
    for (const auto& h : hubs)
      names.push_back(h.hostname);
    ctx.metrics->declare_hubs(names);
  }
  if (ctx.metrics != nullptr) {
    auto before = ctx.hubs.hubs();
    for (const auto& old : *before) {
      bool kept = false;
      for (const auto& h : hubs)
        kept = kept || (h.hostname == old.hostname && h.health_endpoint == old.health_endpoint);
      if (!kept)
        ctx.metrics->forget_hub(old.hostname);
    }
  }
  ctx.hubs.assign(std::move(hubs));
  if (ctx.prober)
    ctx.prober->wake(); // a new hub or endpoint is probed at once
  return {};
}

error write_hubs(engine_context& ctx, const storage::write_batch& batch) {
  error err = ctx.catalog.write_shared(batch, storage::store::durability::synced);
  // Reloaded either way: a Kafka write may have applied before it timed out.
  if (auto again = reload_hubs(ctx); again && !err)
    err = std::move(again);
  return err;
}

error seed_hubs(engine_context& ctx, const std::vector<allocation::linked_hub>& seed,
                bool placeholder) {
  std::optional<std::string> marker;
  if (auto err = ctx.store->get(storage::cf::meta, hubs_seeded_key, marker))
    return err;
  const bool replace_placeholder = marker && *marker == "placeholder" && !placeholder;
  if (marker && !replace_placeholder) {
    if (auto err = reload_hubs(ctx))
      return err;
    // [[hubs]] seeds only: say so when it no longer matches, instead of
    // silently ignoring an edited config.
    auto now = ctx.hubs.hubs();
    bool same = !placeholder && now->size() == seed.size();
    for (const auto& s : seed) {
      bool found = false;
      for (const auto& h : *now)
        found = found || (allocation::hub_key(h.hostname) == allocation::hub_key(s.hostname)
                          && h.weight == s.weight
                          && h.apply_allocation_policy == s.apply_allocation_policy
                          && h.region == s.region && h.health_endpoint == s.health_endpoint);
      same = same && found;
    }
    if (!placeholder && !same)
      std::fprintf(stderr,
                   "provisiond: note: [[hubs]] differs from the %zu stored linked hub(s); "
                   "[[hubs]] only seeds the first start, the stored set is used (change it "
                   "with `provisiond hubs add|update|remove` or /linkedHubs)\n",
                   now->size());
    return {};
  }
  storage::write_batch batch;
  if (replace_placeholder) {
    auto err = ctx.store->scan(storage::cf::hubs, "", 0, [&](std::string_view k, std::string_view) {
      batch.del(storage::cf::hubs, std::string(k));
      return true;
    });
    if (err)
      return err;
  }
  for (const auto& h : seed)
    batch.put(storage::cf::hubs, allocation::hub_key(h.hostname), allocation::to_json(h));
  batch.put(storage::cf::meta, hubs_seeded_key, placeholder ? "placeholder" : "config");
  return write_hubs(ctx, batch);
}

json public_hub(const engine_context& ctx, const allocation::linked_hub& h) {
  json j = json::parse(allocation::to_json(h));
  if (h.health_endpoint.empty())
    return j;
  const auto s = ctx.hubs.health(h.hostname);
  json health{{"status", std::string(allocation::to_string(s.state))}};
  if (s.rtt_ms >= 0)
    health["rttMs"] = s.rtt_ms;
  if (s.last_probe_ms > 0)
    health["lastProbeDateTimeUtc"] = utc_string(s.last_probe_ms);
  if (!s.last_error.empty())
    health["lastError"] = s.last_error;
  health["consecutiveFailures"] = s.failures;
  j["health"] = std::move(health);
  return j;
}

} // namespace prov
