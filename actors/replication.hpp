#pragma once
// Kafka mode: the state every instance shares, kept in topics and
// materialized into each instance's RocksDB by table readers.
//
//   dps.enrollments (compacted)   key "enrollment/<id>", "group/<id>" or
//                                 "certificate/<CA name>" (lower case), value
//                                 the stored JSON document, null = deleted.
//                                 Written by the service API. Also
//                                 "tpm-challenge/<id>": a TPM challenge's state
//                                 (binary), written by the gateway that issued
//                                 or consumed it.
//   dps.registrations (compacted) key lower(registration id), value a binary
//                                 operation_record (the assigned event and the
//                                 registration record). Written by the
//                                 configuration stage; null = deleted.
//   registration.completed        read by gateways into terminal operation
//                                 records, so any gateway answers any poll.
//
// Each reader stores its positions in the `meta` column family in the same
// RocksDB write as the records it applied: exactly-once application per
// instance, resume after a restart, full rebuild into an empty data dir.
// A service API write returns only after the local instance applied it
// (read-your-writes). CAF-free; the blocking calls are for detached actors.

#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "actors/enrollment/enrollment_model.hpp"
#include "messages/error.hpp"
#include "messages/registration.hpp"
#include "storage/store.hpp"

namespace prov::bus::kafka {
class kafka_bus;
}

namespace prov {

struct engine_context;

class replication {
public:
  using completed_fn = std::function<void(registration_event&&)>;
  using done_fn = std::function<void(const error&)>;

  virtual ~replication() = default;

  /// Starts the enrollment and registration readers and waits until they
  /// have applied everything already in their topics (progress on stderr).
  [[nodiscard]] static error start(engine_context& ctx, bus::kafka::kafka_bus& bus,
                                   std::unique_ptr<replication>& out);

  /// Gateways: follow registration.completed into terminal operation
  /// records; `on_applied` gets each event once it is durable locally (the
  /// registration stage settles its in-flight bookkeeping). Waits until
  /// caught up.
  [[nodiscard]] virtual error follow_completed(completed_fn on_applied) = 0;

  /// Publishes enrollment puts and deletes (cf enrollments, groups or
  /// tpm_challenges or certificates) to
  /// dps.enrollments and waits until this instance applied them.
  [[nodiscard]] virtual error write_enrollments(const storage::write_batch& batch) = 0;

  /// Waits until everything now in dps.enrollments is applied here. For a
  /// stage that misses an enrollment another instance has just written.
  [[nodiscard]] virtual error catch_up_enrollments(int timeout_ms) = 0;

  /// Records of a followed table ("enrollments", "registrations",
  /// "completed") not applied yet; 0 for a table this process does not follow.
  virtual int64_t table_lag(std::string_view table) const = 0;

  /// Publishes registration record deletes (cf registrations) as tombstones
  /// and waits until applied locally.
  [[nodiscard]] virtual error write_registrations(const storage::write_batch& batch) = 0;

  /// Configuration stage: publishes an assignment (registration record plus
  /// the assigned event) to dps.registrations. `done` (any thread) once it
  /// is durable in Kafka; every instance then applies it.
  virtual void publish_assignment(const operation_record& update, done_fn done) = 0;

  /// Stops the readers (before the store closes) and drops the completed
  /// sink. Idempotent.
  virtual void close() = 0;
};

} // namespace prov
