#pragma once
// Typed configuration for provisiond. Every field has a default, so an empty
// (or absent) config file runs the engine. Parsed once at startup from TOML
// (toml++), validated, then passed by value.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "messages/error.hpp"

namespace prov::config {

/// A linked hub: a downstream IoT hub devices may be assigned to.
struct hub_config {
  std::string hostname;              ///< required, host name of the hub
  int allocation_weight = 1;         ///< 1..1000
  bool apply_allocation_policy = true; ///< false: only when named by an enrollment
  std::string region;                ///< free text, e.g. "westeurope"
  /// https://host[:port]/path probed for the hub's health ([hub_health]);
  /// "" = not probed, always eligible.
  std::string health_endpoint;
};

/// [hub_health]: how linked hubs with a health endpoint are probed (an HTTPS
/// GET; a 2xx answer within timeout_ms is a success). The probes run on a
/// thread of their own in each process with the allocation role.
struct hub_health_config {
  int interval_ms = 10000;  ///< from the start of one round of probes to the next
  int timeout_ms = 2000;    ///< per probe: connect + TLS, and again for the answer
  int unhealthy_after = 2;  ///< consecutive failed probes before a hub is skipped
  int healthy_after = 1;    ///< consecutive good probes before it is used again
  /// Probes of one round in flight at once (threads); a round with more
  /// endpoints runs in waves of this many.
  int max_concurrent_probes = 16;
  /// PEM file of the CA certificate(s) health endpoints must chain to; empty:
  /// the system trust store.
  std::string ca_file;
};

/// A service API shared access policy (like DPS's provisioningserviceowner).
struct access_policy {
  std::string name;
  std::string primary_key;   ///< base64, 16..64 decoded bytes
  std::string secondary_key; ///< base64, may be empty
  std::vector<std::string> rights; ///< ServiceConfig, EnrollmentRead, EnrollmentWrite,
                                   ///< RegistrationStatusRead, RegistrationStatusWrite
};

struct device_api_config {
  std::string listen = "0.0.0.0:8443";
  std::vector<std::string> hostnames = {"localhost"}; ///< SANs; first = service HostName
  std::string tls_cert; ///< PEM file; generated into <data_dir>/tls when empty
  std::string tls_key;
  int retry_after_seconds = 1;        ///< Retry-After on 202 answers, 1..300
  /// How long a register request may wait for its outcome. Assigned (or
  /// failed) within it: answered 200 with the result, no poll needed. Else,
  /// or 0: the classic 202 "assigning" and the device polls.
  int register_wait_ms = 250;
  int threads = 0;                    ///< HTTP I/O threads; 0 = number of cores
  std::size_t max_body_bytes = 96 * 1024; ///< DPS limit: 96 KB
  int request_timeout_seconds = 30;   ///< whole-request budget (slowloris guard)
  int idle_timeout_seconds = 120;     ///< keep-alive idle close
  int max_sas_lifetime_seconds = 365 * 24 * 3600; ///< longest accepted SAS validity
  int clock_skew_seconds = 300;       ///< tolerated client clock skew
  /// How long a TPM device may take to answer its challenge (the 401 with
  /// the activation blob) with its first register.
  int tpm_challenge_seconds = 300;
  /// Threads doing TPM requests (challenge writes, reads that may wait for
  /// Kafka, RSA work); one registration id's requests run in order on one.
  int tpm_threads = 4;
  /// Open connections at most; one more is accepted and closed at once.
  /// 0 = derived at start from the descriptor limit (RLIMIT_NOFILE), so the
  /// server refuses cheaply before it runs out of descriptors.
  int max_connections = 0;
  int max_connections_per_client = 0; ///< the same per client IP address; 0 = no cap
};

/// The DPS MQTT device transport (MQTT 3.1.1 over TLS, docs/mqtt.md). It
/// shares the device API's certificate, key, client-certificate handling,
/// threads count, connection caps, request timeout and retry-after.
struct mqtt_config {
  /// On by default, on DPS's port, so MQTT devices work as they do against
  /// Azure; "" turns the listener off.
  std::string listen = "0.0.0.0:8883";
  /// Largest packet accepted, fixed header included; a larger one closes the
  /// connection before its body is read. DPS's body limit is 96 KB.
  std::size_t max_packet_bytes = 128 * 1024;
  /// Requests (register, poll) one connection may have unanswered; one
  /// more closes it (MQTT has no way to refuse a single PUBLISH).
  int max_inflight = 16;
  /// MQTT over WebSocket on the device API's port at /$iothub/websocket
  /// (the SDKs' MqttWs transports); independent of `listen`.
  bool websocket = true;
};

/// [throttling]: DPS-style quotas, each 0 = off (the default: provisiond's
/// own capacity limit, max in-flight operations, stays on regardless).
/// Checked before any crypto or storage work, except the per-group quota:
/// a device does not name its group, so that one is decided once the
/// credential has matched a group, before anything is stored. Over a quota:
/// 429 (429001) with Retry-After. Token buckets: `n` per window, refilled
/// continuously, bursts up to `n`.
struct throttling_config {
  int registrations_per_minute_per_scope = 0; ///< register calls (DPS: 200 or 1,000/min)
  int registrations_per_minute_per_group = 0; ///< accepted registers per enrollment group
  int polls_per_device = 0;                   ///< operation polls per device per window
  int poll_window_seconds = 10;               ///< DPS: 5 polls per 10 s per device
  int requests_per_minute_per_address = 0;    ///< every API request per client IP
  /// Buckets kept per quota (devices, groups, addresses): beyond it the least
  /// recently seen key is forgotten, so memory stays bounded under a flood.
  int max_tracked_keys = 100000;

  bool any() const noexcept {
    return registrations_per_minute_per_scope > 0 || registrations_per_minute_per_group > 0
           || polls_per_device > 0 || requests_per_minute_per_address > 0;
  }
};

/// The custom allocation webhook calls (allocationPolicy "custom").
struct custom_allocation_config {
  /// PEM file of the CA certificate(s) webhook servers must chain to; empty:
  /// the system trust store.
  std::string ca_file;
  int timeout_ms = 10000;      ///< per attempt (connect + TLS, then the answer)
  int retries = 2;             ///< after no answer, 408, 429 or 5xx
  int retry_backoff_ms = 500;  ///< before the first retry, doubled each time
  int threads = 4;             ///< calls in flight at most (each waits on its thread)
};

/// [geo_latency]: what the geoLatency policy knows of regions
/// (actors/allocation/geo_latency.hpp). Hubs' regions are their `region`.
struct geo_latency_config {
  std::string region;   ///< this gateway's region; the device's when nothing else says
  int tie_ms = 5;       ///< hubs within this many ms of the lowest estimate are tied
  struct client_range {
    std::string cidr;   ///< "10.1.0.0/16", "2001:db8::/32"
    std::string region;
  };
  std::vector<client_range> client_ranges; ///< [[geo_latency.client_ranges]], first match wins
  struct latency {
    std::string from, to; ///< regions (case-insensitive); symmetric
    int ms = 0;
  };
  std::vector<latency> latencies; ///< [[geo_latency.latencies]]
};

/// [[issuing_cas]]: a CA that signs the certificates devices ask for with a
/// `csr` in their register (actors/configuration/certificate_issuer.hpp,
/// docs/x509.md). Enrollments name it in their issuance policy.
struct issuing_ca_config {
  std::string name;             ///< what enrollments reference (1..64 of A-Z a-z 0-9 . _ -)
  std::string key_file;         ///< PEM private key; must not be readable by group or others
  /// PEM: the issuing CA's certificate first, then its intermediates up to
  /// the root; devices get the leaf followed by exactly these.
  std::string certificate_file;
  int validity_hours = 720;     ///< issued certificates' lifetime, 1..87600 (1 hour..10 years)
};

struct metrics_config {
  std::string listen = "127.0.0.1:9464"; ///< empty disables the exposer
};

struct storage_config {
  /// RocksDB block cache, shared by all column families. It fills only as
  /// blocks are read, so a small data set never uses it all.
  int block_cache_mb = 64;
};

/// Secrets at rest (docs/security.md): enrollment and group keys, CA entries
/// and TPM challenge state are sealed in RocksDB with AES-256-GCM under a
/// key-encryption key read from this file.
struct secrets_config {
  /// Empty = <data_dir>/secrets.key, created (0600) on the first start of a
  /// data dir that holds no sealed data yet.
  std::string key_file;
};

struct log_config {
  std::string level = "info";  ///< trace, debug, info, warn, error, off
  std::string file;            ///< empty = stderr
  /// The audit log (docs/operations.md#audit-log): JSON lines, one per
  /// service API write. Empty = <data_dir>/audit.log.
  std::string audit_file;
};

/// Distributed mode: every stage consumes and produces Kafka topics. With
/// `brokers` empty (the default) the engine runs embedded, with no Kafka.
struct kafka_config {
  std::string brokers;                ///< "host:port,host:port"; empty = embedded mode
  std::string topic_prefix = "dps."; ///< prepended to every topic name
  int partitions = 12;                ///< partitions of topics provisiond creates, 1..10000
  int replication_factor = 3;         ///< replicas of topics provisiond creates, 1..32
  std::string client_id = "provisiond";
  /// A registration this gateway handed to Kafka (acknowledged) with no
  /// outcome after this many seconds is handed off again; 0 = never. The
  /// stages are idempotent per operation, so a resend costs a duplicate.
  int resend_after_s = 10;
  /// When this process runs two consecutive stages (attestation and
  /// allocation, allocation and configuration), hand the event from one to
  /// the next in process instead of over their topic. The input offset is
  /// still committed only after the last local stage's effect is durable.
  /// On by default. A redelivered input is then allocated again, from clock
  /// readings pinned in the log (the same bytes) but against the enrollment
  /// and hubs as they are then (docs/kafka.md, fused stages).
  bool fuse_stages = true;
  /// [kafka.properties]: passed verbatim to librdkafka (security.protocol,
  /// sasl.*, ssl.*, ...). Keys provisiond sets itself are rejected.
  std::map<std::string, std::string> properties;

  bool enabled() const noexcept { return !brokers.empty(); }
};

/// Which stages this process runs (`provisiond serve --roles`). Without Kafka
/// one process runs them all; with Kafka they can be split across processes.
struct roles_config {
  bool gateway = true;       ///< HTTPS device and service API; answers polls
  bool registration = true;  ///< the intake: records accepted registrations
  bool attestation = true;   ///< registration.requested -> attested (direct publishers)
  bool allocation = true;    ///< registration.attested -> allocated
  bool configuration = true; ///< registration.allocated -> records, device.assigned

  bool all() const noexcept {
    return gateway && registration && attestation && allocation && configuration;
  }
  /// "gateway,registration,..." in that order.
  std::string to_string() const;
};

/// Parses a comma-separated role list ("gateway,registration"). Errors name
/// the unknown role and list the known ones.
[[nodiscard]] error parse_roles(std::string_view list, roles_config& out);

struct engine_config {
  std::optional<std::string> id_scope; ///< generated on first start when absent
  std::string data_dir = "./data";
  device_api_config device_api;
  mqtt_config mqtt;
  throttling_config throttling;
  std::vector<access_policy> access_policies; ///< empty = generated owner policy
  std::vector<hub_config> hubs;
  custom_allocation_config custom_allocation;
  hub_health_config hub_health;
  geo_latency_config geo_latency;
  std::vector<issuing_ca_config> issuing_cas; ///< [[issuing_cas]]
  metrics_config metrics;
  storage_config storage;
  secrets_config secrets;
  log_config log;
  kafka_config kafka;
  roles_config roles; ///< from --roles; not a config file key
  std::string source_file; ///< the file this was read from ("" = defaults)
};

/// Parses a TOML file. On any problem returns an error whose message names the
/// file, line and key, e.g. "provisiond.toml:7: device_api.listen: expected
/// HOST:PORT, got \"8443\"". Unknown keys are errors.
[[nodiscard]] error load_file(const std::string& path, engine_config& out);

/// Parses TOML text; `origin` is used as the file name in messages.
[[nodiscard]] error load_string(std::string_view toml, const std::string& origin,
                                engine_config& out);

/// Checks cross-field rules (hub names unique, weights 1..1000, listen
/// addresses parse, keys are base64 of 16..64 bytes, rights known, ...).
[[nodiscard]] error validate(const engine_config& cfg);

/// A DNS host name (labels of letters, digits and '-', at most 253 chars).
bool valid_dns_name(std::string_view s);

/// An IPv4 or IPv6 CIDR ("10.1.0.0/16", "2001:db8::/32").
bool cidr_ok(const std::string& cidr);

/// https://host[:port][/path] with a DNS name or IP literal host.
bool valid_health_endpoint(std::string_view url);

/// librdkafka properties provisiond sets itself (durability and identity);
/// `[kafka.properties]` may not override them.
bool is_reserved_kafka_property(std::string_view key) noexcept;

/// Splits "host:port" (IPv6 as "[::1]:443"). Port 0 is allowed (ephemeral).
[[nodiscard]] bool split_host_port(const std::string& s, std::string& host,
                                   uint16_t& port);

} // namespace prov::config
