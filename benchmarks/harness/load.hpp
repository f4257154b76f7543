#pragma once
// The load generator: C asynchronous HTTPS connections (OpenSSL on the socket,
// Asio for readiness and timers, Beast's HTTP parser) on `threads` io_contexts, each connection running one device (or
// one reference GET, or one bulk batch) at a time, as an SDK would.

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

struct ssl_st;

namespace bench {

enum class load_mode {
  keepalive, ///< C persistent connections, devices back to back on each
  newconn,   ///< a fresh TCP + full TLS handshake per device
  reference, ///< a fresh TCP + full TLS handshake + one GET (static server)
  reference_keepalive, ///< C persistent connections, GETs back to back (static server)
  bulk,      ///< persistent connections posting bulk enrollment batches
  /// DPS over MQTT: a fresh TCP + TLS connection per device (CONNECT names
  /// the device, so a connection serves one device), CONNECT + SUBSCRIBE +
  /// register PUBLISH in one write, polls on 202; `port` is the MQTT listener.
  mqtt,
  /// The same over WebSocket on the HTTPS port (`port`): the upgrade request
  /// at /$iothub/websocket and the first frame in one write, as an SDK's
  /// MqttWs transport on a new connection.
  mqtt_ws,
};
const char* to_string(load_mode m);
/// Modes that open C connections first and reuse them.
bool persistent(load_mode m);

struct load_options {
  load_mode mode = load_mode::keepalive;
  std::string host = "127.0.0.1"; ///< IP literal or DNS name to dial
  uint16_t port = 0;
  std::string tls_name;  ///< checked against the certificate; empty = host
  std::string ca_file;   ///< trusted CA (PEM)
  bool insecure = false; ///< skip certificate verification

  int concurrency = 100;
  int threads = 1;
  uint64_t count = 0;      ///< devices / connections / bulk batches; 0 = until duration
  double duration_s = 0;   ///< stop starting new work after this many seconds (0 = none)
  /// Devices: 0 = closed loop (each connection starts its next device as soon
  /// as the last one is assigned). > 0 = open loop: device i is due at
  /// start + i / rate seconds and starts then, or as soon as a connection is
  /// free if all are busy.
  double rate = 0;
  int poll_interval_ms = -1; ///< -1: honour Retry-After
  int request_timeout_s = 30;
  int device_timeout_s = 120; ///< give up on a device not terminal after this long

  // Devices.
  std::string id_scope;
  std::string api_version = "2021-06-01";
  std::string key_root; ///< device key = derive_device_key(key_root, registration id)
  std::function<std::string(uint64_t)> registration_id;
  /// X.509 devices (set: no SAS): puts device i's client certificate and key
  /// on the connection before its handshake; false = cannot.
  std::function<bool(uint64_t, ssl_st*)> client_identity;

  // Reference.
  std::string reference_path = "/index.html";

  // Bulk enrollment creation: POST /enrollments with bulk_body(batch index).
  std::string service_auth;
  std::string service_api_version = "2021-10-01";
  std::function<std::string(uint64_t)> bulk_body;
  uint64_t bulk_items = 0;     ///< total items (for the progress line)
  bool ignore_conflicts = false; ///< 409000 items count as "existing", not errors

  /// Called on the calling thread when the measured phase starts (after the
  /// keep-alive connections are open), so resource samples can start there.
  std::function<void()> on_go;
  std::string label;     ///< progress line prefix
  bool progress = true;
  const std::atomic<bool>* interrupted = nullptr; ///< set by SIGINT: stop starting work
};

/// Everything measured by one run. Latencies in milliseconds.
struct load_result {
  double wall_s = 0;       ///< from the first device start to the last completion
  double connect_phase_s = 0; ///< keepalive/bulk: opening the C connections first
  uint64_t started = 0;    ///< devices (connections, batches) started
  uint64_t succeeded = 0;  ///< assigned (reference: 200 received; bulk: items created)
  uint64_t failed = 0;
  uint64_t existing = 0;   ///< bulk: items that already existed (ignore_conflicts)
  uint64_t requests = 0, puts = 0, polls = 0;
  uint64_t connections = 0; ///< TLS connections established
  uint64_t reconnects = 0;  ///< keepalive: connections re-opened after a close
  std::map<std::string, uint64_t> errors; ///< errorCode (or "connection", ...) -> count
  std::vector<std::string> error_samples; ///< first few error messages
  std::vector<double> server_tta;  ///< server lastUpdatedDateTimeUtc - PUT send time
  std::vector<double> client_tta;  ///< client saw assigned - PUT send time
  /// Open loop (rate > 0): client saw assigned - the device's due time, so
  /// a wait for a free connection counts (no coordinated omission).
  std::vector<double> scheduled_tta;
  std::vector<double> put_latency; ///< PUT sent -> 202 received
  std::vector<double> poll_latency;
  std::vector<double> handshake;   ///< TCP connect + TLS handshake
  std::vector<double> request_latency; ///< reference GET / bulk POST
  double harness_cpu_s = 0;

  // --direct (direct.hpp): Kafka records instead of HTTP requests.
  bool direct = false;
  uint64_t produced = 0;          ///< registration.requested records acknowledged
  uint64_t completed_records = 0; ///< registration.completed records of this run
  uint64_t duplicate_completed = 0;
  uint64_t assigned_events = 0;   ///< device.assigned records of this run
  uint64_t duplicate_assigned = 0;
  std::vector<double> produce_ack; ///< produce call -> acknowledged (acks=all)
};

/// The device's SAS token, as an SDK computes it: the device key derived
/// from `key_root` (group key or individual master key), valid for an hour.
std::string device_sas(const std::string& id_scope, const std::string& key_root,
                       const std::string& registration_id);

/// Progress callback: seconds since the start, units succeeded, units failed.
using tick_fn = std::function<void(double, uint64_t, uint64_t)>;

/// Runs the load to completion (or until interrupted). `tick` runs on the
/// calling thread about every 250 ms.
load_result run_load(const load_options& opts, const tick_fn& tick = {});

} // namespace bench
