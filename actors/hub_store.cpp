#include "actors/hub_store.hpp"

#include <charconv>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <optional>
#include <thread>

#include <nlohmann/json.hpp>

#include "actors/engine_context.hpp"
#include "messages/ascii.hpp"
#include "messages/crypto.hpp"
#include "messages/registration.hpp"

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

bool hub_seed_claim_takes_over(std::string_view held, std::string_view next) {
  if (held.empty())
    return true;
  // "<unix ms> <id> <round>"
  auto parse = [](std::string_view claim, int64_t& ms, std::string_view& round) {
    const auto sp1 = claim.find(' ');
    const auto sp2 = sp1 == std::string_view::npos ? sp1 : claim.find(' ', sp1 + 1);
    if (sp2 == std::string_view::npos)
      return false;
    round = claim.substr(sp2 + 1);
    const auto digits = claim.substr(0, sp1);
    const auto r = std::from_chars(digits.data(), digits.data() + digits.size(), ms);
    return r.ec == std::errc() && r.ptr == digits.data() + digits.size() && !digits.empty();
  };
  int64_t held_ms = 0, next_ms = 0;
  std::string_view held_round, next_round;
  if (!parse(held, held_ms, held_round))
    return true;
  if (!parse(next, next_ms, next_round))
    return false;
  return held_round != next_round || next_ms - held_ms > hubs_seed_claim_ttl_ms;
}

namespace {

/// A later start: the stored set is used. Says so when [[hubs]] no longer
/// matches it, instead of silently ignoring an edited config.
error keep_stored(engine_context& ctx, const std::vector<allocation::linked_hub>& seed,
                  bool placeholder) {
  if (auto err = reload_hubs(ctx))
    return err;
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

/// Whether this start seeds: no marker yet, or only the placeholder and now
/// real [[hubs]].
error should_seed(engine_context& ctx, bool placeholder, std::optional<std::string>& marker,
                  bool& seed) {
  if (auto err = ctx.store->get(storage::cf::meta, hubs_seeded_key, marker))
    return err;
  seed = !marker || (*marker == "placeholder" && !placeholder);
  return {};
}

/// Kafka: publishes a claim for the round `marker` names and reports
/// whether it is the one held (the round's first in topic order).
error claim_seed(engine_context& ctx, const std::optional<std::string>& marker, bool& won) {
  const int64_t now = now_ms();
  const std::string mine =
    std::to_string(now) + " " + crypto::uuid7(now) + " " + (marker ? *marker : "-");
  storage::write_batch b;
  b.put(storage::cf::meta, hubs_seed_claim_key, mine);
  if (auto err = ctx.repl->write_enrollments(b)) // returns once applied here
    return err;
  std::optional<std::string> held;
  if (auto err = ctx.store->get(storage::cf::meta, hubs_seed_claim_key, held))
    return err;
  won = held && *held == mine;
  return {};
}

/// Kafka, another process's claim holds: waits until the seed marker
/// differs from `marker` (that process seeded) or, failing that, until its
/// claim is stale (it died first) and a margin.
void wait_for_seed(engine_context& ctx, const std::optional<std::string>& marker) {
  std::fprintf(stderr, "provisiond: another process is seeding the linked hubs from its "
                       "[[hubs]]; waiting for it\n");
  const auto deadline = std::chrono::steady_clock::now()
                        + std::chrono::milliseconds(hubs_seed_claim_ttl_ms + 5000);
  while (std::chrono::steady_clock::now() < deadline) {
    (void)ctx.repl->catch_up_enrollments(1000);
    std::optional<std::string> now;
    if (ctx.store->get(storage::cf::meta, hubs_seeded_key, now) || now != marker)
      return;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

} // namespace

error seed_hubs(engine_context& ctx, const std::vector<allocation::linked_hub>& seed,
                bool placeholder) {
  std::optional<std::string> marker;
  bool seeding = false;
  if (auto err = should_seed(ctx, placeholder, marker, seeding))
    return err;
  // Kafka: processes of a new deployment may start at once, each with its
  // [[hubs]]. Seeding both would leave the union (or a mix) of their sets,
  // so a process claims the seed first and the first claim in
  // dps.enrollments order seeds; the others wait for its marker and decide
  // again on what it stored (one whose [[hubs]] differs gets the note).
  for (int round = 0; seeding && ctx.kafka() && round < 3; ++round) {
    bool won = false;
    if (auto err = claim_seed(ctx, marker, won))
      return err;
    if (won) {
      // A marker written before our claim may sit on another partition:
      // apply everything now in the topic, then decide again.
      if (auto err = ctx.repl->catch_up_enrollments(15000))
        return err;
      if (auto err = should_seed(ctx, placeholder, marker, seeding))
        return err;
      break;
    }
    wait_for_seed(ctx, marker);
    if (auto err = should_seed(ctx, placeholder, marker, seeding))
      return err;
  }
  if (!seeding)
    return keep_stored(ctx, seed, placeholder);
  const bool replace_placeholder = marker.has_value();
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

json public_hub(const allocation::hub_set& hubs, const allocation::linked_hub& h) {
  json j = json::parse(allocation::to_json(h));
  if (h.health_endpoint.empty())
    return j;
  const auto s = hubs.health(h.hostname);
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
