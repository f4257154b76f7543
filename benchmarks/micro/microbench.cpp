// provisiond-microbench: the per-registration building blocks in isolation
// (Google Benchmark). See docs/benchmarking.md.

#include <atomic>
#include <cstdlib>
#include <ctime>
#include <future>
#include <memory>
#include <string>

#include <benchmark/benchmark.h>

#include "actors/allocation/allocation_policy.hpp"
#include "actors/allocation/geo_latency.hpp"
#include "actors/attestation/sas_token.hpp"
#include "actors/attestation/x509.hpp"
#include "actors/enrollment/ca_store.hpp"
#include "actors/enrollment/x509_certificates.hpp"
#include "tests/support/test_certs.hpp"
#include "messages/crypto.hpp"
#include "messages/registration.hpp"
#include "storage/keyring.hpp"
#include "storage/store.hpp"
#include "bus/bus.hpp"

namespace {

using namespace prov;

const std::string k_group_key = crypto::generate_key();
const std::string k_scope = "0ne0000BEEF";

registration_event sample_event(int i) {
  registration_event ev;
  ev.operation_id = new_operation_id("0123456789abcdef");
  ev.registration_id = "sensor-" + std::to_string(i);
  ev.id_scope = k_scope;
  ev.api_version = "2021-06-01";
  ev.protocol = "http";
  ev.accepted_ms = now_ms();
  ev.attestation_type = "symmetricKey";
  ev.enrollment_group_id = "bench-group";
  ev.assigned_hub = "hub-a.example.net";
  ev.device_id = ev.registration_id;
  ev.substatus = "initialAssignment";
  ev.status = registration_status::assigned;
  return ev;
}

// -- SAS -------------------------------------------------------------------------------

void BM_derive_device_key(benchmark::State& state) {
  int i = 0;
  for (auto _ : state) {
    auto k = crypto::derive_device_key(k_group_key, "sensor-" + std::to_string(i++));
    benchmark::DoNotOptimize(k);
  }
}
BENCHMARK(BM_derive_device_key);

void BM_sas_make(benchmark::State& state) {
  auto key = *crypto::derive_device_key(k_group_key, "sensor-1");
  for (auto _ : state) {
    auto t = attestation::make_sas(k_scope + "/registrations/sensor-1", key,
                                   std::time(nullptr) + 3600, "registration");
    benchmark::DoNotOptimize(t);
  }
}
BENCHMARK(BM_sas_make);

/// What the attestation stage does per request for a group device:
/// parse the header, check expiry and resource, derive the device key from
/// the group key, verify the signature.
void BM_sas_parse_verify_group(benchmark::State& state) {
  const std::string reg = "sensor-1";
  auto key = *crypto::derive_device_key(k_group_key, reg);
  auto header = attestation::make_sas(k_scope + "/registrations/" + reg, key,
                                      std::time(nullptr) + 3600, "registration");
  attestation::sas_limits lim;
  lim.now = std::time(nullptr);
  for (auto _ : state) {
    attestation::sas_token tok;
    if (attestation::parse_sas(header, tok))
      state.SkipWithError("parse failed");
    if (!attestation::device_resource_matches(tok, k_scope, reg))
      state.SkipWithError("resource mismatch");
    auto dk = crypto::derive_device_key(k_group_key, reg);
    if (attestation::verify_sas(tok, *dk, lim))
      state.SkipWithError("verify failed");
  }
}
BENCHMARK(BM_sas_parse_verify_group);

void BM_sas_parse_only(benchmark::State& state) {
  auto key = *crypto::derive_device_key(k_group_key, "sensor-1");
  auto header = attestation::make_sas(k_scope + "/registrations/sensor-1", key,
                                      std::time(nullptr) + 3600, "registration");
  for (auto _ : state) {
    attestation::sas_token tok;
    auto err = attestation::parse_sas(header, tok);
    benchmark::DoNotOptimize(err);
    benchmark::DoNotOptimize(tok);
  }
}
BENCHMARK(BM_sas_parse_only);

// -- codecs ----------------------------------------------------------------------------

void BM_event_encode(benchmark::State& state) {
  auto ev = sample_event(1);
  std::size_t bytes = 0;
  for (auto _ : state) {
    auto s = encode_event(ev);
    bytes += s.size();
    benchmark::DoNotOptimize(s);
  }
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
}
BENCHMARK(BM_event_encode);

void decode_loop(benchmark::State& state, const std::string& text) {
  for (auto _ : state) {
    registration_event out;
    auto err = decode_event(text, out);
    benchmark::DoNotOptimize(err);
    benchmark::DoNotOptimize(out);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
}

void BM_event_decode(benchmark::State& state) {
  decode_loop(state, encode_event(sample_event(1)));
}
BENCHMARK(BM_event_decode);

/// An event decode_event's flat fast path does not take (a \u escape, a
/// nested member): what nlohmann's SAX parser costs on its own.
void BM_event_decode_unusual(benchmark::State& state) {
  auto text = encode_event(sample_event(1));
  text.insert(1, R"("x-trace":{"spans":[1,2,3]},"errorMessage":"caf\u00e9",)");
  decode_loop(state, text);
}
BENCHMARK(BM_event_decode_unusual);

void BM_operation_record_roundtrip(benchmark::State& state) {
  operation_record op;
  op.event = sample_event(1);
  op.operation_id = op.event.operation_id;
  op.registration_id = op.event.registration_id;
  op.status = registration_status::assigned;
  op.state.registration_id = op.registration_id;
  op.state.assigned_hub = "hub-a.example.net";
  op.state.status = registration_status::assigned;
  for (auto _ : state) {
    auto s = encode_record(op);
    operation_record back;
    auto err = decode_record(s, back);
    benchmark::DoNotOptimize(err);
  }
}
BENCHMARK(BM_operation_record_roundtrip);

// -- storage ---------------------------------------------------------------------------

struct temp_store {
  std::string dir;
  std::unique_ptr<storage::store> st;
  explicit temp_store(bool sync, bool sealed = false) {
    char tmpl[] = "/tmp/provisiond-microbench-XXXXXX";
    dir = ::mkdtemp(tmpl);
    storage::store_options o;
    o.sync = sync;
    if (auto err = storage::store::open(dir + "/db", o, st))
      std::abort();
    if (sealed) {
      std::shared_ptr<const storage::keyring> ring;
      storage::seal_report rep;
      if (storage::keyring::create(dir + "/secrets.key", ring) ||
          st->attach_keyring(ring, false, rep))
        std::abort();
    }
  }
  ~temp_store() {
    st->close();
    st.reset();
    if (std::system(("rm -rf '" + dir + "'").c_str()) != 0)
      std::abort();
  }
};

/// An encoded operation record (encoded once: the store benchmarks measure
/// RocksDB, not the JSON codec).
const std::string& sample_operation_value() {
  static const std::string v = [] {
    operation_record op;
    op.event = sample_event(1);
    op.operation_id = op.event.operation_id;
    op.registration_id = op.event.registration_id;
    return encode_record(op);
  }();
  return v;
}

storage::write_batch operation_batch(int i) {
  // Operation ids are "<digit>.<16 hex>.<uuid>": same prefix, random tail.
  std::string key = "5.0123456789abcdef." + std::to_string(i * 2654435761u);
  storage::write_batch b;
  b.put(storage::cf::operations, key, sample_operation_value());
  b.put(storage::cf::pending, key, "");
  return b;
}

/// The accept path: one operation record + pending marker per registration,
/// through commit() (group commit, synced WAL). range(0) = commits in flight.
void BM_store_commit_synced(benchmark::State& state) {
  temp_store ts(true);
  const int inflight = static_cast<int>(state.range(0));
  int i = 0;
  for (auto _ : state) {
    std::atomic<int> left{inflight};
    std::promise<void> all;
    for (int k = 0; k < inflight; ++k)
      ts.st->commit(operation_batch(i++), [&](const error&) {
        if (left.fetch_sub(1) == 1)
          all.set_value();
      });
    all.get_future().wait();
  }
  state.SetItemsProcessed(state.iterations() * inflight);
  auto s = ts.st->stats();
  state.counters["batches_per_commit"] =
    s.commits ? static_cast<double>(s.batches) / static_cast<double>(s.commits) : 0;
}
BENCHMARK(BM_store_commit_synced)->Arg(1)->Arg(64)->Arg(1024)->UseRealTime();

void BM_store_write_unsynced(benchmark::State& state) {
  temp_store ts(false);
  int i = 0;
  for (auto _ : state)
    if (ts.st->write(operation_batch(i++)))
      state.SkipWithError("write failed");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_store_write_unsynced)->UseRealTime();

/// range(1) = 1: the enrollments family sealed (AES-256-GCM, docs/security.md).
void BM_store_get(benchmark::State& state) {
  temp_store ts(false, state.range(1) != 0);
  const int n = static_cast<int>(state.range(0));
  for (int i = 0; i < n; ++i) {
    storage::write_batch b;
    b.put(storage::cf::enrollments, "dev-" + std::to_string(i), std::string(300, 'x'));
    if (ts.st->write(b))
      std::abort();
  }
  int i = 0;
  for (auto _ : state) {
    std::optional<std::string> out;
    if (ts.st->get(storage::cf::enrollments, "dev-" + std::to_string((i++ * 7919) % n), out))
      state.SkipWithError("get failed");
    benchmark::DoNotOptimize(out);
  }
}
BENCHMARK(BM_store_get)->Args({10'000, 0})->Args({10'000, 1})->Args({200'000, 0})->Args({200'000, 1});

/// Sealing and opening one enrollment-sized document, without RocksDB.
void BM_keyring_seal_open(benchmark::State& state) {
  char tmpl[] = "/tmp/provisiond-microbench-XXXXXX";
  std::string dir = ::mkdtemp(tmpl);
  std::shared_ptr<const storage::keyring> ring;
  if (storage::keyring::create(dir + "/secrets.key", ring))
    std::abort();
  const std::string doc(500, 'x');
  std::string out;
  for (auto _ : state) {
    auto sealed = ring->seal(doc, "enrollments/dev-1");
    if (ring->open(sealed, "enrollments/dev-1", out))
      state.SkipWithError("open failed");
    benchmark::DoNotOptimize(out);
  }
  if (std::system(("rm -rf '" + dir + "'").c_str()) != 0)
    std::abort();
}
BENCHMARK(BM_keyring_seal_open);

// -- bus -------------------------------------------------------------------------------

void BM_inprocess_bus_publish(benchmark::State& state) {
  auto bus = bus::make_inprocess_bus();
  uint64_t seen = 0;
  bus->subscribe(bus::topic::registration_attested,
                 [&](registration_event&& ev) { seen += ev.registration_id.size(); });
  auto ev = sample_event(1);
  for (auto _ : state)
    bus->publish(bus::topic::registration_attested, ev); // copies, as stages do
  benchmark::DoNotOptimize(seen);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_inprocess_bus_publish);

} // namespace

// -- X.509 -----------------------------------------------------------------------------

/// An uncached X.509 group attestation (open + check_groups): `range(0)`
/// caReferences groups, each with a verified CA whose stored CRL lists
/// `range(1)` revoked serials; the device (leaf + intermediate) belongs to
/// the last group. What the attestation stage pays per new device beyond
/// the TLS handshake. `range(2)`: 1 = the CAs and CRLs parsed once with the
/// snapshot (resolve_ca), 0 = left for every check to parse (the code before
/// that change parsed them on every uncached attestation). `range(3)`: 1 =
/// the presented chain also handed over as the TLS handshake parsed it
/// (net::peer_chain, what the server does), 0 = DER only (parsed by open()).
void BM_x509_group_check(benchmark::State& state) {
  const int groups = static_cast<int>(state.range(0));
  const int revoked = static_cast<int>(state.range(1));
  std::vector<test::test_cert> roots, keep;
  std::vector<enrollment::enrollment_view> views;
  for (int g = 0; g < groups; ++g) {
    roots.push_back(test::make_ca("Bench Root " + std::to_string(g), nullptr, 10 + g));
    std::vector<test::test_cert> listed;
    for (int i = 0; i < revoked; ++i)
      listed.push_back(test::make_device("revoked-" + std::to_string(i), roots.back(),
                                         100000 + i));
    std::unique_ptr<X509_CRL, decltype(&X509_CRL_free)> crl(nullptr, X509_CRL_free);
    std::vector<const test::test_cert*> ptrs;
    for (const auto& c : listed)
      ptrs.push_back(&c);
    // make_crl_pem takes an initializer list: build it in batches of one.
    std::string pem = test::make_crl_pem(roots.back(), {});
    if (!ptrs.empty()) {
      std::unique_ptr<BIO, decltype(&BIO_free)> in(BIO_new_mem_buf(pem.data(), -1), BIO_free);
      crl.reset(PEM_read_bio_X509_CRL(in.get(), nullptr, nullptr, nullptr));
      std::unique_ptr<ASN1_TIME, decltype(&ASN1_TIME_free)> when(
        X509_gmtime_adj(nullptr, -30), ASN1_TIME_free);
      for (const auto* r : ptrs) {
        X509_REVOKED* e = X509_REVOKED_new();
        X509_REVOKED_set_serialNumber(e, X509_get_serialNumber(r->cert.get()));
        X509_REVOKED_set_revocationDate(e, when.get());
        X509_CRL_add0_revoked(crl.get(), e);
      }
      X509_CRL_sort(crl.get());
      X509_CRL_sign(crl.get(), roots.back().key.get(), EVP_sha256());
    } else {
      std::unique_ptr<BIO, decltype(&BIO_free)> in(BIO_new_mem_buf(pem.data(), -1), BIO_free);
      crl.reset(PEM_read_bio_X509_CRL(in.get(), nullptr, nullptr, nullptr));
    }
    unsigned char* der = nullptr;
    int n = i2d_X509_CRL(crl.get(), &der);
    enrollment::ca_reference ref;
    ref.name = "bench-ca-" + std::to_string(g);
    ref.status = enrollment::ca_reference::state::verified;
    ref.der = roots.back().der();
    ref.crls.emplace_back(reinterpret_cast<const char*>(der), static_cast<std::size_t>(n));
    OPENSSL_free(der);
    if (state.range(2) != 0)
      enrollment::resolve_parsed(ref); // else parsed on every check, as before
    enrollment::x509_attestation x;
    x.ca_references.push_back(std::move(ref));
    enrollment::enrollment_view v;
    v.k = enrollment::kind::group;
    v.id = "bench-group-" + std::to_string(g);
    v.attestation = std::move(x);
    views.push_back(std::move(v));
  }
  auto inter = test::make_ca("Bench Intermediate", &roots.back(), 5);
  auto leaf = test::make_device("bench-x509-device", inter, 77);
  x509_credential cred;
  cred.from_handshake = true;
  cred.chain_der = {leaf.der(), inter.der()};
  if (state.range(3) != 0)
    cred.parsed = {leaf.cert, inter.cert};
  device_credential c = cred;
  attestation::x509 mech;
  attestation::request_facts facts;
  facts.id_scope = k_scope;
  facts.registration_id = "bench-x509-device";
  facts.now_s = std::time(nullptr);
  for (auto _ : state) {
    std::unique_ptr<attestation::proof> p;
    if (auto err = mech.open(c, facts, p))
      state.SkipWithError(err.message.c_str());
    auto v = p->check_groups(views);
    if (!v.is_accepted())
      state.SkipWithError(v.err.message.c_str());
    benchmark::DoNotOptimize(v);
  }
}
BENCHMARK(BM_x509_group_check)
  ->ArgNames({"groups", "revoked", "parsed_once", "handshake_parsed"})
  ->Args({1, 0, 0, 0})->Args({1, 0, 1, 0})->Args({1, 0, 1, 1})
  ->Args({1, 1000, 0, 0})->Args({1, 1000, 1, 0})->Args({1, 1000, 1, 1})
  ->Args({20, 100, 0, 0})->Args({20, 100, 1, 0})->Args({20, 100, 1, 1});

// One allocation decision with the three hubs and regions provisiond-bench
// --allocation-policy gives its server: hashed against geoLatency (device in
// the gateway's region, table estimates, the two European hubs tied and
// hashed), both with their `why` explanation, as the allocation stage runs
// them per device.
namespace {
prov::allocation::request bench_allocation_request(const std::string& id) {
  prov::allocation::request in;
  in.registration_id = id;
  in.enrollment = std::make_shared<prov::enrollment::enrollment_view>();
  for (const char* region : {"westeurope", "northeurope", "eastus"})
    in.candidates.push_back({std::string("bench-") + region + ".example.net", 1, true, region});
  in.linked_hubs = in.candidates.size();
  return in;
}

void run_policy(benchmark::State& state, const prov::allocation::policy& p) {
  std::vector<std::string> ids;
  for (int i = 0; i < 1024; ++i)
    ids.push_back("bench-device-" + std::to_string(i));
  auto in = bench_allocation_request(ids[0]);
  std::size_t i = 0;
  for (auto _ : state) {
    in.registration_id = ids[i++ & 1023];
    auto held = std::make_shared<prov::allocation::held_answer>();
    p.allocate(in, held);
    benchmark::DoNotOptimize(held->d.hub);
  }
}
} // namespace

static void BM_allocate_hashed(benchmark::State& state) {
  prov::allocation::hashed_policy p;
  run_policy(state, p);
}
BENCHMARK(BM_allocate_hashed);

static void BM_allocate_geo_latency(benchmark::State& state) {
  prov::allocation::geo_options o;
  o.gateway_region = "westeurope";
  o.tie_ms = 25;
  o.latency_ms[{"westeurope", "northeurope"}] = 20;
  o.latency_ms[{"westeurope", "eastus"}] = 85;
  prov::allocation::geo_latency_policy p(o, [](std::string_view) { return -1.0; });
  run_policy(state, p);
}
BENCHMARK(BM_allocate_geo_latency);

BENCHMARK_MAIN();
