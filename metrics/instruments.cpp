#include "metrics/instruments.hpp"

#include <array>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

namespace prov::metrics {

std::string_view to_string(stage s) noexcept {
  switch (s) {
    case stage::attestation: return "attestation";
    case stage::commit: return "commit";
    case stage::allocation: return "allocation";
    case stage::configuration: return "configuration";
  }
  return "unknown";
}

namespace {

// Latency buckets from 100 us to 10 s: the pipeline runs in well under a
// millisecond when idle and in tens of milliseconds under load.
const prometheus::Histogram::BucketBoundaries latency_buckets{
  0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
  0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,    10};

/// Label values joined with '\x1f' (a byte no label value contains) key a cache
/// of series, so a repeated observation skips prometheus-cpp's label-map lookup.
std::string join(std::initializer_list<std::string_view> parts) {
  std::string key;
  for (auto p : parts) {
    key.append(p);
    key.push_back('\x1f');
  }
  return key;
}

template <class Metric>
class series_cache {
public:
  explicit series_cache(prometheus::Family<Metric>& family) : family_(family) {}

  /// The series for `labels` (created on first use); `make` builds it.
  template <class Make>
  Metric& get(const std::string& key, Make&& make) {
    std::lock_guard<std::mutex> guard(mu_);
    auto it = cache_.find(key);
    if (it != cache_.end())
      return *it->second;
    Metric& m = make(family_);
    cache_.emplace(key, &m);
    return m;
  }

private:
  prometheus::Family<Metric>& family_;
  std::mutex mu_;
  std::unordered_map<std::string, Metric*> cache_;
};

} // namespace

struct instruments::impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();

  // Linked hub health (hub_probe, hub_health). Series are removed with the
  // hub (forget_hub), so a removed hub stops being reported.
  prometheus::Family<prometheus::Gauge>& hub_healthy =
    prometheus::BuildGauge()
      .Name("dps_hub_healthy")
      .Help("1 while a linked hub's health probes pass, 0 while it is skipped as unhealthy "
            "(only hubs with a health endpoint, once probed)")
      .Register(*registry);
  prometheus::Family<prometheus::Gauge>& hub_rtt =
    prometheus::BuildGauge()
      .Name("dps_hub_probe_rtt_seconds")
      .Help("Round trip of the last successful health probe of a linked hub (the HTTPS GET "
            "on an open connection)")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& hub_probes =
    prometheus::BuildCounter()
      .Name("dps_hub_health_probes_total")
      .Help("Health probes of linked hubs by result (success, failure)")
      .Register(*registry);
  std::mutex hubs_mu;
  struct hub_series {
    prometheus::Gauge* healthy = nullptr;
    prometheus::Gauge* rtt = nullptr;
    prometheus::Counter* ok = nullptr;
    prometheus::Counter* failed = nullptr;
  };
  std::unordered_map<std::string, hub_series> hubs;

  prometheus::Family<prometheus::Counter>& registration_attempts =
    prometheus::BuildCounter()
      .Name("dps_registration_attempts_total")
      .Help("Device registration attempts by result (assigned, failed, disabled, "
            "rejected), assigned hub and protocol (Azure DPS RegistrationAttempts)")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& device_assignments =
    prometheus::BuildCounter()
      .Name("dps_device_assignments_total")
      .Help("Devices assigned to a hub (Azure DPS DeviceAssignments)")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& attestation_attempts =
    prometheus::BuildCounter()
      .Name("dps_attestation_attempts_total")
      .Help("Device attestation attempts on register requests by result, mechanism "
            "and protocol (Azure DPS AttestationAttempts)")
      .Register(*registry);
  prometheus::Family<prometheus::Histogram>& stage_duration =
    prometheus::BuildHistogram()
      .Name("dps_stage_duration_seconds")
      .Help("Time one pipeline stage spent on one registration, queue wait excluded")
      .Register(*registry);
  prometheus::Family<prometheus::Gauge>& stage_queue =
    prometheus::BuildGauge()
      .Name("dps_stage_queue_depth")
      .Help("Events handed to a stage and not yet handled by it")
      .Register(*registry);
  prometheus::Family<prometheus::Histogram>& operation_duration =
    prometheus::BuildHistogram()
      .Name("dps_operation_duration_seconds")
      .Help("Time from an accepted register request (202) to its terminal result")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& http_requests =
    prometheus::BuildCounter()
      .Name("dps_http_requests_total")
      .Help("HTTP requests on the device and service API by route and status")
      .Register(*registry);
  prometheus::Family<prometheus::Histogram>& http_duration =
    prometheus::BuildHistogram()
      .Name("dps_http_request_duration_seconds")
      .Help("Time from a complete request to its response being handed to the "
            "connection, by route")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& mqtt_requests =
    prometheus::BuildCounter()
      .Name("dps_mqtt_requests_total")
      .Help("DPS requests over MQTT (register, poll) by operation and answered status")
      .Register(*registry);
  prometheus::Family<prometheus::Histogram>& mqtt_duration =
    prometheus::BuildHistogram()
      .Name("dps_mqtt_request_duration_seconds")
      .Help("Time from a request's PUBLISH to its answer being handed to the "
            "connection, by operation")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& mqtt_connects =
    prometheus::BuildCounter()
      .Name("dps_mqtt_connects_total")
      .Help("MQTT CONNECTs answered, by CONNACK return code (0 accepted, 1 protocol, "
            "2 identifier, 3 unavailable, 4 user name or password, 5 not authorized)")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& mqtt_disconnects =
    prometheus::BuildCounter()
      .Name("dps_mqtt_disconnects_total")
      .Help("MQTT connections closed after CONNECT or on a protocol violation, by reason")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& throttled =
    prometheus::BuildCounter()
      .Name("dps_throttled_requests_total")
      .Help("Requests refused to protect the service (429/503) by reason")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& connections_refused =
    prometheus::BuildCounter()
      .Name("dps_connections_refused_total")
      .Help("Device API connections closed at once because a connection cap was "
            "reached, by cap")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& accept_errors =
    prometheus::BuildCounter()
      .Name("dps_accept_errors_total")
      .Help("Failed accepts on the device API listener by error (EMFILE: out of "
            "file descriptors); each is followed by a 100 ms back-off")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& tpm_challenges =
    prometheus::BuildCounter()
      .Name("dps_tpm_challenges_total")
      .Help("TPM challenges by outcome: issued (401 with an activation blob), answered "
            "(consumed by a register signed with the imported key), rejected (an answer "
            "refused: replayed, expired, wrong key, no challenge)")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& stale_certificate_records =
    prometheus::BuildCounter()
      .Name("dps_kafka_stale_certificate_records_total")
      .Help("CA store records on dps.enrollments skipped because a later revision (a "
            "delete, or a write from a newer state) was already applied")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& unreadable_records =
    prometheus::BuildCounter()
      .Name("dps_unreadable_records_total")
      .Help("Stored values left out of a service API listing because they do not open "
            "(sealed value tampered, key missing) or parse, by family; counted each "
            "time one is left out of an answer")
      .Register(*registry);
  prometheus::Family<prometheus::Histogram>& commit_duration =
    prometheus::BuildHistogram()
      .Name("dps_storage_commit_duration_seconds")
      .Help("Duration of one RocksDB group commit (synced WAL write)")
      .Register(*registry);
  prometheus::Family<prometheus::Histogram>& commit_batches =
    prometheus::BuildHistogram()
      .Name("dps_storage_commit_batches")
      .Help("Caller batches merged into one RocksDB group commit")
      .Register(*registry);
  prometheus::Family<prometheus::Counter>& commit_bytes =
    prometheus::BuildCounter()
      .Name("dps_storage_written_bytes_total")
      .Help("Bytes of keys and values written to RocksDB")
      .Register(*registry);

  series_cache<prometheus::Counter> registration_attempts_c{registration_attempts};
  series_cache<prometheus::Counter> device_assignments_c{device_assignments};
  series_cache<prometheus::Counter> attestation_attempts_c{attestation_attempts};
  series_cache<prometheus::Histogram> operation_duration_c{operation_duration};
  series_cache<prometheus::Counter> http_requests_c{http_requests};
  series_cache<prometheus::Histogram> http_duration_c{http_duration};
  series_cache<prometheus::Counter> mqtt_requests_c{mqtt_requests};
  series_cache<prometheus::Histogram> mqtt_duration_c{mqtt_duration};
  series_cache<prometheus::Counter> mqtt_connects_c{mqtt_connects};
  series_cache<prometheus::Counter> mqtt_disconnects_c{mqtt_disconnects};
  series_cache<prometheus::Counter> throttled_c{throttled};
  series_cache<prometheus::Counter> connections_refused_c{connections_refused};
  series_cache<prometheus::Counter> accept_errors_c{accept_errors};
  series_cache<prometheus::Counter> tpm_challenges_c{tpm_challenges};
  series_cache<prometheus::Counter> unreadable_records_c{unreadable_records};
  prometheus::Counter* stale_certificate_records_counter = nullptr;

  std::array<prometheus::Histogram*, stage_count> stage_hist{};
  std::array<prometheus::Gauge*, stage_count> stage_gauge{};
  std::array<std::atomic<int64_t>, stage_count> stage_depth{};
  prometheus::Histogram* commit_hist = nullptr;
  prometheus::Histogram* commit_batch_hist = nullptr;
  prometheus::Counter* commit_bytes_counter = nullptr;

  struct scrape_gauge {
    prometheus::Gauge* gauge;
    std::function<double()> fn;
  };
  std::mutex gauges_mu;
  std::vector<scrape_gauge> gauges;
  std::unordered_map<std::string, prometheus::Family<prometheus::Gauge>*> gauge_families;

  impl() {
    for (int i = 0; i < stage_count; ++i) {
      auto name = std::string(to_string(static_cast<stage>(i)));
      stage_hist[i] = &stage_duration.Add({{"stage", name}}, latency_buckets);
      stage_gauge[i] = &stage_queue.Add({{"stage", name}});
      stage_depth[i] = 0;
    }
    commit_hist = &commit_duration.Add({}, latency_buckets);
    commit_batch_hist = &commit_batches.Add(
      {}, prometheus::Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256, 512,
                                                  1024, 2048, 4096});
    commit_bytes_counter = &commit_bytes.Add({});
    stale_certificate_records_counter = &stale_certificate_records.Add({});
    for (const char* outcome : {"issued", "answered", "rejected"})
      tpm_challenges_c.get(join({outcome}), [&](auto& f) -> prometheus::Counter& {
        return f.Add({{"outcome", outcome}});
      });
    // Known reasons exist at zero, so rate() and dashboards see them before
    // the first throttled request.
    for (const char* reason : {"inflight_limit", "shutting_down"})
      throttled_c.get(join({reason}), [&](auto& f) -> prometheus::Counter& {
        return f.Add({{"reason", reason}});
      });
    for (const char* reason : {"max_connections", "max_connections_per_client"})
      connections_refused_c.get(join({reason}), [&](auto& f) -> prometheus::Counter& {
        return f.Add({{"reason", reason}});
      });
    // At zero from the start, so an alert on increase() sees the first one.
    for (const char* family : {"enrollments", "groups", "certificates", "registrations"})
      unreadable_records_c.get(join({family}), [&](auto& f) -> prometheus::Counter& {
        return f.Add({{"family", family}});
      });
    for (const char* e : {"EMFILE", "ENFILE"})
      accept_errors_c.get(join({e}), [&](auto& f) -> prometheus::Counter& {
        return f.Add({{"error", e}});
      });
  }
};

instruments::instruments() : impl_(std::make_unique<impl>()) {}
instruments::~instruments() = default;

void instruments::declare_hubs(const std::vector<std::string>& hubs) {
  for (const auto& hub : hubs) {
    impl_->device_assignments_c.get(join({hub}), [&](auto& f) -> prometheus::Counter& {
      return f.Add({{"hub", hub}});
    });
    impl_->registration_attempts_c.get(
      join({"assigned", hub, "http"}), [&](auto& f) -> prometheus::Counter& {
        return f.Add({{"status", "assigned"}, {"hub", hub}, {"protocol", "http"}});
      });
  }
  impl_->attestation_attempts_c.get(
    join({"success", "symmetricKey", "http"}), [&](auto& f) -> prometheus::Counter& {
      return f.Add({{"status", "success"}, {"attestation", "symmetricKey"}, {"protocol", "http"}});
    });
}

void instruments::hub_probe(std::string_view hub, bool ok, double rtt_seconds) {
  std::lock_guard<std::mutex> guard(impl_->hubs_mu);
  auto& s = impl_->hubs[std::string(hub)];
  const std::string h(hub);
  if (s.ok == nullptr) {
    s.ok = &impl_->hub_probes.Add({{"hub", h}, {"result", "success"}});
    s.failed = &impl_->hub_probes.Add({{"hub", h}, {"result", "failure"}});
  }
  (ok ? s.ok : s.failed)->Increment();
  if (ok) {
    if (s.rtt == nullptr)
      s.rtt = &impl_->hub_rtt.Add({{"hub", h}});
    s.rtt->Set(rtt_seconds);
  }
}

void instruments::hub_health(std::string_view hub, bool healthy) {
  std::lock_guard<std::mutex> guard(impl_->hubs_mu);
  auto& s = impl_->hubs[std::string(hub)];
  if (s.healthy == nullptr)
    s.healthy = &impl_->hub_healthy.Add({{"hub", std::string(hub)}});
  s.healthy->Set(healthy ? 1 : 0);
}

void instruments::forget_hub(std::string_view hub) {
  std::lock_guard<std::mutex> guard(impl_->hubs_mu);
  auto it = impl_->hubs.find(std::string(hub));
  if (it == impl_->hubs.end())
    return;
  auto& s = it->second;
  if (s.healthy != nullptr)
    impl_->hub_healthy.Remove(s.healthy);
  if (s.rtt != nullptr)
    impl_->hub_rtt.Remove(s.rtt);
  if (s.ok != nullptr) {
    impl_->hub_probes.Remove(s.ok);
    impl_->hub_probes.Remove(s.failed);
  }
  impl_->hubs.erase(it);
}

void instruments::registration_attempt(std::string_view status, std::string_view hub,
                                       std::string_view protocol) {
  impl_->registration_attempts_c
    .get(join({status, hub, protocol}),
         [&](auto& f) -> prometheus::Counter& {
           return f.Add({{"status", std::string(status)},
                         {"hub", std::string(hub)},
                         {"protocol", std::string(protocol)}});
         })
    .Increment();
}

void instruments::device_assigned(std::string_view hub) {
  impl_->device_assignments_c
    .get(join({hub}),
         [&](auto& f) -> prometheus::Counter& { return f.Add({{"hub", std::string(hub)}}); })
    .Increment();
}

void instruments::attestation_attempt(bool success, std::string_view attestation,
                                      std::string_view protocol) {
  std::string_view status = success ? "success" : "failure";
  impl_->attestation_attempts_c
    .get(join({status, attestation, protocol}),
         [&](auto& f) -> prometheus::Counter& {
           return f.Add({{"status", std::string(status)},
                         {"attestation", std::string(attestation)},
                         {"protocol", std::string(protocol)}});
         })
    .Increment();
}

void instruments::stage_latency(stage s, double seconds) {
  impl_->stage_hist[static_cast<int>(s)]->Observe(seconds);
}

void instruments::stage_enqueued(stage s) noexcept {
  impl_->stage_depth[static_cast<int>(s)].fetch_add(1, std::memory_order_relaxed);
}

void instruments::stage_dequeued(stage s) noexcept {
  impl_->stage_depth[static_cast<int>(s)].fetch_sub(1, std::memory_order_relaxed);
}

void instruments::operation_finished(std::string_view status, double seconds) {
  impl_->operation_duration_c
    .get(join({status}),
         [&](auto& f) -> prometheus::Histogram& {
           return f.Add({{"status", std::string(status)}}, latency_buckets);
         })
    .Observe(seconds);
}

void instruments::http_request(std::string_view route, int status, double seconds) {
  auto code = std::to_string(status);
  impl_->http_requests_c
    .get(join({route, code}),
         [&](auto& f) -> prometheus::Counter& {
           return f.Add({{"route", std::string(route)}, {"status", code}});
         })
    .Increment();
  impl_->http_duration_c
    .get(join({route}),
         [&](auto& f) -> prometheus::Histogram& {
           return f.Add({{"route", std::string(route)}}, latency_buckets);
         })
    .Observe(seconds);
}

void instruments::mqtt_request(std::string_view operation, int status, double seconds,
                               std::string_view transport) {
  auto code = std::to_string(status);
  impl_->mqtt_requests_c
    .get(join({operation, code, transport}),
         [&](auto& f) -> prometheus::Counter& {
           return f.Add({{"operation", std::string(operation)},
                         {"status", code},
                         {"transport", std::string(transport)}});
         })
    .Increment();
  impl_->mqtt_duration_c
    .get(join({operation, transport}),
         [&](auto& f) -> prometheus::Histogram& {
           return f.Add({{"operation", std::string(operation)},
                         {"transport", std::string(transport)}},
                        latency_buckets);
         })
    .Observe(seconds);
}

void instruments::mqtt_connect(int code, std::string_view transport) {
  auto c = std::to_string(code);
  impl_->mqtt_connects_c
    .get(join({c, transport}),
         [&](auto& f) -> prometheus::Counter& {
           return f.Add({{"code", c}, {"transport", std::string(transport)}});
         })
    .Increment();
}

void instruments::mqtt_disconnect(std::string_view reason, std::string_view transport) {
  impl_->mqtt_disconnects_c
    .get(join({reason, transport}),
         [&](auto& f) -> prometheus::Counter& {
           return f.Add({{"reason", std::string(reason)}, {"transport", std::string(transport)}});
         })
    .Increment();
}

void instruments::throttled(std::string_view reason) {
  impl_->throttled_c
    .get(join({reason}),
         [&](auto& f) -> prometheus::Counter& {
           return f.Add({{"reason", std::string(reason)}});
         })
    .Increment();
}

void instruments::connection_refused(std::string_view reason) {
  impl_->connections_refused_c
    .get(join({reason}),
         [&](auto& f) -> prometheus::Counter& {
           return f.Add({{"reason", std::string(reason)}});
         })
    .Increment();
}

void instruments::accept_failed(std::string_view error) {
  impl_->accept_errors_c
    .get(join({error}),
         [&](auto& f) -> prometheus::Counter& {
           return f.Add({{"error", std::string(error)}});
         })
    .Increment();
}

void instruments::tpm_challenge(std::string_view outcome) {
  impl_->tpm_challenges_c
    .get(join({outcome}),
         [&](auto& f) -> prometheus::Counter& {
           return f.Add({{"outcome", std::string(outcome)}});
         })
    .Increment();
}

void instruments::unreadable_record(std::string_view family) {
  impl_->unreadable_records_c
    .get(join({family}),
         [&](auto& f) -> prometheus::Counter& {
           return f.Add({{"family", std::string(family)}});
         })
    .Increment();
}

void instruments::certificate_record_stale() {
  impl_->stale_certificate_records_counter->Increment();
}

void instruments::storage_commit(double seconds, std::size_t batches, std::size_t bytes) {
  impl_->commit_hist->Observe(seconds);
  impl_->commit_batch_hist->Observe(static_cast<double>(batches));
  impl_->commit_bytes_counter->Increment(static_cast<double>(bytes));
}

void instruments::add_gauge(const std::string& name, const std::string& help,
                            const std::string& label_name, const std::string& label_value,
                            std::function<double()> fn) {
  std::lock_guard<std::mutex> guard(impl_->gauges_mu);
  auto& fam = impl_->gauge_families[name];
  if (fam == nullptr)
    fam = &prometheus::BuildGauge().Name(name).Help(help).Register(*impl_->registry);
  prometheus::Labels labels;
  if (!label_name.empty())
    labels.emplace(label_name, label_value);
  impl_->gauges.push_back({&fam->Add(labels), std::move(fn)});
}

void instruments::clear_gauges() {
  std::lock_guard<std::mutex> guard(impl_->gauges_mu);
  for (auto& g : impl_->gauges)
    g.fn = nullptr;
}

std::string instruments::scrape() {
  {
    std::lock_guard<std::mutex> guard(impl_->gauges_mu);
    for (auto& g : impl_->gauges)
      if (g.fn)
        g.gauge->Set(g.fn());
  }
  for (int i = 0; i < stage_count; ++i)
    impl_->stage_gauge[i]->Set(
      static_cast<double>(impl_->stage_depth[i].load(std::memory_order_relaxed)));
  std::ostringstream out;
  prometheus::TextSerializer{}.Serialize(out, impl_->registry->Collect());
  return out.str();
}

} // namespace prov::metrics
