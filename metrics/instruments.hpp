#pragma once
// Every metric provisiond exports, behind a small API so prometheus-cpp stays
// in instruments.cpp. Thread-safe: record from any thread (HTTP I/O threads,
// actors, the storage writer). Labelled series are created on first use and
// cached, so the hot path is one short lock plus an atomic add.
//
// Names follow Azure DPS's metrics (RegistrationAttempts, DeviceAssignments,
// AttestationAttempts) with Prometheus conventions, so dashboards translate;
// docs/operations.md lists them all.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace prov::metrics {

/// Pipeline stages with a latency histogram and a queue-depth gauge.
enum class stage : uint8_t {
  attestation,   ///< credential check of a register request
  commit,        ///< durable operation record before the 202
  allocation,    ///< hub choice
  configuration, ///< registration record + assignment event
};
inline constexpr int stage_count = 4;
std::string_view to_string(stage s) noexcept;

class instruments {
public:
  instruments();
  ~instruments();
  instruments(const instruments&) = delete;
  instruments& operator=(const instruments&) = delete;

  // -- Azure-equivalent counters ------------------------------------------------

  /// Creates the per-hub series at zero, so dashboards and rate() see every
  /// linked hub from the start, not only after its first assignment.
  void declare_hubs(const std::vector<std::string>& hubs);

  /// One health probe of a linked hub: dps_hub_health_probes_total{hub,result}
  /// and, when it succeeded, dps_hub_probe_rtt_seconds{hub}.
  void hub_probe(std::string_view hub, bool ok, double rtt_seconds);
  /// dps_hub_healthy{hub}: 1 healthy, 0 unhealthy (skipped by allocation).
  void hub_health(std::string_view hub, bool healthy);
  /// Drops a removed hub's health series.
  void forget_hub(std::string_view hub);

  /// dps_registration_attempts_total{status,hub,protocol}. status: assigned,
  /// failed, disabled (terminal operation results) or rejected (refused before
  /// an operation existed: bad credential, unknown enrollment, bad request).
  void registration_attempt(std::string_view status, std::string_view hub,
                            std::string_view protocol);
  /// dps_device_assignments_total{hub}.
  void device_assigned(std::string_view hub);
  /// dps_attestation_attempts_total{status=success|failure,attestation,protocol}.
  void attestation_attempt(bool success, std::string_view attestation,
                           std::string_view protocol);

  // -- pipeline --------------------------------------------------------------------

  /// dps_stage_duration_seconds{stage}.
  void stage_latency(stage s, double seconds);
  /// dps_stage_queue_depth{stage}: events handed to a stage and not yet handled.
  void stage_enqueued(stage s) noexcept;
  void stage_dequeued(stage s) noexcept;
  /// Time from the 202 (operation accepted) to the terminal result:
  /// dps_operation_duration_seconds{status}.
  void operation_finished(std::string_view status, double seconds);

  // -- HTTP ------------------------------------------------------------------------

  /// dps_http_requests_total{route,status} and dps_http_request_duration_seconds{route}.
  void http_request(std::string_view route, int status, double seconds);
  // -- MQTT ------------------------------------------------------------------------

  // Every MQTT series has `transport`: "mqtt" (MQTT over TLS, port 8883) or
  // "mqtt_ws" (MQTT over WebSocket on the HTTPS port).

  /// dps_mqtt_requests_total{operation,status,transport} and
  /// dps_mqtt_request_duration_seconds{operation,transport}; operation:
  /// register, poll.
  void mqtt_request(std::string_view operation, int status, double seconds,
                    std::string_view transport = "mqtt");
  /// dps_mqtt_connects_total{code,transport}: CONNACK return codes sent (0 = accepted).
  void mqtt_connect(int code, std::string_view transport = "mqtt");
  /// dps_mqtt_disconnects_total{reason,transport}: connections the server
  /// closed (or saw close), by reason: client, keep_alive, malformed,
  /// too_large, unknown_topic, inflight, request_timeout, connect_timeout,
  /// not_reading, throttled.
  void mqtt_disconnect(std::string_view reason, std::string_view transport = "mqtt");

  /// dps_throttled_requests_total{reason}.
  void throttled(std::string_view reason);
  /// dps_connections_refused_total{reason}: connections accepted and closed
  /// at once because a connection cap was reached (max_connections,
  /// max_connections_per_client).
  void connection_refused(std::string_view reason);
  /// dps_accept_errors_total{error}: failed accept() calls on the device API
  /// listener (EMFILE, ENFILE, ENOBUFS, ENOMEM, other). Each is followed by a
  /// back-off, so a descriptor shortage adds about 10 per second.
  void accept_failed(std::string_view error);

  // -- attestation state ----------------------------------------------------------------

  /// dps_tpm_challenges_total{outcome}: TPM challenges issued (a 401 with an
  /// activation blob), answered (a register signed with the imported key that
  /// consumed its challenge), rejected (an answer refused: replayed, expired,
  /// wrong key or EK, no challenge).
  void tpm_challenge(std::string_view outcome);
  /// dps_kafka_stale_certificate_records_total: CA store records on
  /// dps.enrollments skipped because a later revision (a delete, or a write
  /// from a newer state) had already been applied.
  void certificate_record_stale();

  /// dps_unreadable_records_total{family}: stored values (enrollments,
  /// groups, certificates) left out of a service API listing because they do
  /// not open (sealed value tampered, key missing) or parse. Counted each time
  /// one is left out of an answer, so a listing polled every minute adds one
  /// a minute: rate() > 0 means damage is still being met.
  void unreadable_record(std::string_view family);

  // -- storage -------------------------------------------------------------------------

  /// One group commit: dps_storage_commit_duration_seconds,
  /// dps_storage_commit_batches (caller batches merged), dps_storage_commit_bytes.
  void storage_commit(double seconds, std::size_t batches, std::size_t bytes);

  // -- gauges read at scrape time ----------------------------------------------------

  /// A gauge whose value `fn` computes at each scrape (in-flight operations,
  /// RocksDB properties). `label_name` empty = no label. `fn` must be cheap,
  /// thread-safe, and stay valid until clear_gauges() or destruction.
  void add_gauge(const std::string& name, const std::string& help,
                 const std::string& label_name, const std::string& label_value,
                 std::function<double()> fn);
  /// Drops every scrape-time gauge (before the objects they read go away).
  void clear_gauges();

  /// The Prometheus text exposition format of everything above.
  std::string scrape();

private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

} // namespace prov::metrics
