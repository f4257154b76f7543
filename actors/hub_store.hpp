#pragma once
// Linked hubs in the store (column family `hubs`) and, in Kafka mode, in
// dps.enrollments ("hub/<lower name>" records, applied by replication):
// seeding from [[hubs]] on the first start, writes from the service API,
// and reloading the live set allocation reads (engine_context::hubs).

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "actors/allocation/linked_hubs.hpp"
#include "messages/error.hpp"
#include "storage/store.hpp"

namespace prov {

struct engine_context;

/// Meta key (and, as "deployment/hubs_seeded", dps.enrollments key) that
/// says the hub set was seeded: "config" (from [[hubs]]), "placeholder"
/// (the quickstart's hub.local, replaced by [[hubs]] once configured) or
/// "managed" (changed through the service API since).
inline constexpr const char* hubs_seeded_key = "deployment.hubs_seeded";

/// Kafka: meta key (and, as "deployment/hubs_seed_claim", dps.enrollments
/// key) of the claim a process publishes before it seeds:
/// "<unix ms> <id> <round>", the round being the seed marker it found ("-"
/// for none, "placeholder"). Claims share one record key, so one partition:
/// every process applies them in the same order and agrees which claim of a
/// round came first. That process seeds; the others wait for its marker.
inline constexpr const char* hubs_seed_claim_key = "deployment.hubs_seed_claim";

/// A claim older than this (by the claims' own clocks) no longer holds: its
/// process died before seeding, and a later claim of its round takes over.
inline constexpr int64_t hubs_seed_claim_ttl_ms = 60000;

/// Whether claim `next` is applied over the claim held (`held`, "" when
/// none): when none is held, the held one is of another round, or it is
/// stale. An unreadable held claim never blocks a new one.
bool hub_seed_claim_takes_over(std::string_view held, std::string_view next);

/// Reads the `hubs` family into ctx.hubs and declares the hubs' metric
/// series. A stored document that does not parse is skipped (logged).
[[nodiscard]] error reload_hubs(engine_context& ctx);

/// First start (no seed marker, or only the placeholder and now real
/// [[hubs]]): stores `seed` as the linked hubs. Later starts keep the stored
/// set and print a note when [[hubs]] differs from it. Then reload_hubs().
[[nodiscard]] error seed_hubs(engine_context& ctx,
                              const std::vector<allocation::linked_hub>& seed, bool placeholder);

/// A service API write: `batch` (cf hubs plus the seed marker) made durable
/// (embedded) or published and applied locally (Kafka), then reload_hubs().
[[nodiscard]] error write_hubs(engine_context& ctx, const storage::write_batch& batch);

/// What the service API shows of a hub: the stored fields and, when it has
/// a health endpoint, "health" as this process's probes saw it.
nlohmann::json public_hub(const allocation::hub_set& hubs, const allocation::linked_hub& h);

} // namespace prov
