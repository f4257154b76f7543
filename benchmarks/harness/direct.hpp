#pragma once
// --kafka --direct: the harness is the direct publisher of docs/events.md.
// It produces registration.requested records (key = registration id, a SAS
// token per device, an operationId of its own) and reads the outcomes from
// registration.completed (and counts device.assigned), with at most C
// devices outstanding. No HTTPS is involved.

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "messages/error.hpp"

#include "benchmarks/harness/load.hpp"

namespace bench {

struct direct_options {
  uint64_t count = 0;     ///< devices
  int concurrency = 100;  ///< devices produced and not yet completed, at most
  int device_timeout_s = 120; ///< produce -> completed, else the device failed

  std::string id_scope;
  std::string key_root; ///< device key = derive_device_key(key_root, registration id)
  std::function<std::string(uint64_t)> registration_id;
  /// operationId = prefix + device index: unique per run, and maps a
  /// completed record back to its device without a lookup table.
  std::string operation_prefix;

  const std::atomic<bool>* interrupted = nullptr;
};

/// The harness's Kafka clients: one producer, and readers (no consumer
/// group, every partition) of registration.completed and device.assigned.
/// Kept for the whole run, so the warm-up also absorbs the producer's
/// first InitProducerId (about 1 s on the mock).
class direct_publisher {
public:
  direct_publisher();
  ~direct_publisher(); ///< closes the clients
  direct_publisher(const direct_publisher&) = delete;
  direct_publisher& operator=(const direct_publisher&) = delete;

  /// `properties`: librdkafka properties for the clients (the deployment's
  /// [kafka.properties]; fetch.wait.max.ms matters on the mock broker).
  /// Returns once the readers have caught up with both topics.
  [[nodiscard]] prov::error start(const std::string& brokers,
                                  const std::map<std::string, std::string>& properties,
                                  const std::string& topic_prefix = "dps.");

  /// Runs the devices to completion (assigned, failed, or timed out).
  /// `tick` runs on the calling thread about every 250 ms. The result has
  /// `direct` set; client_tta is produce call -> completed record seen,
  /// server_tta the record's completedMs - produce call (wall clock, ms).
  load_result run(const direct_options& o, const tick_fn& tick = {});

  /// Closes the clients (before the brokers go away). Idempotent.
  void close();

  struct impl;

private:
  std::unique_ptr<impl> impl_;
};

} // namespace bench
