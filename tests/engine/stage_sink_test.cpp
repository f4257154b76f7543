// A stage actor alone, driven through the stage sink with CAF's test
// coordinator (caf::scheduler::test_coordinator: one thread, messages run
// when the test says so, timers fire when the test advances the clock), so
// its retry is checked step by step without a broker, a sleep or a race.
// The allocation stage runs over a real RocksDB store in a temp dir; only
// the sink is a fake, which fails the publishes the test tells it to. And
// the Kafka sink itself over a bus whose publishes fail.

#include <doctest/doctest.h>

#include <caf/all.hpp>
#include <caf/scheduler/test_coordinator.hpp>

#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/actor_types.hpp"
#include "actors/allocation/allocation_policy.hpp"
#include "actors/configuration/certificate_issuer.hpp"
#include "actors/engine_context.hpp"
#include "actors/stage_sink.hpp"
#include "tests/support/temp_dir.hpp"
#include "tests/support/test_csr.hpp"

using namespace prov;

namespace {

/// Records every output; fails the first `failures` publishes the way the
/// Kafka sink does (the output and the unacked input ack go to the
/// stage's retry).
class recording_sink final : public stage_sink {
public:
  explicit recording_sink(delivery_traits t) : stage_sink(t) {}

  struct output {
    bus::topic next;
    registration_event ev;
    route r;
  };
  std::vector<output> seen;
  int failures = 0;

private:
  void do_forward(const stage_output_ptr& from, bus::topic next, registration_event ev,
                  ack_fn ack, route r) override {
    seen.push_back({next, ev, r});
    if (failures > 0 && (from->retry || from->retry_by_id)) {
      --failures;
      const error why{error_code::unavailable, "injected: broker down"};
      if (from->retry)
        from->retry(std::move(ev), std::move(ack), why);
      else
        from->retry_by_id(ev.operation_id, std::move(ack), why);
      return;
    }
    if (ack)
      ack();
  }
};

/// A Kafka bus whose durable publishes all fail, reporting at once.
class failing_bus final : public bus::stage_bus {
public:
  int published = 0;
  void publish(bus::topic, registration_event) override {}
  void subscribe(bus::topic, handler) override {}
  void publish_durable(bus::topic, registration_event, durable_fn done) override {
    ++published;
    done(error{error_code::unavailable, "injected: broker down"});
  }
};

struct stage_fixture {
  test::temp_dir dir{"prov_stage_sink_test"};
  std::unique_ptr<storage::store> store;
  engine_context_ptr ctx = std::make_shared<engine_context>();
  recording_sink* sink = nullptr;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  caf::scheduler::test_coordinator* sched = nullptr;

  explicit stage_fixture(delivery_traits traits) {
    REQUIRE(!storage::store::open(dir.path, storage::store_options{}, store));
    ctx->store = store.get();
    ctx->catalog.attach(store.get());
    ctx->own_metrics = std::make_unique<metrics::instruments>();
    ctx->metrics = ctx->own_metrics.get();
    ctx->policies.add(std::make_shared<allocation::hashed_policy>());
    ctx->hubs.assign({{"hub-a.example.net", 1, true, "", ""}});
    auto s = std::make_unique<recording_sink>(traits);
    sink = s.get();
    ctx->sink = std::move(s);
    cfg.set("scheduler.policy", caf::atom("testing"));
    cfg.set("logger.verbosity", caf::atom("quiet"));
    sys = std::make_unique<caf::actor_system>(cfg);
    sched = &dynamic_cast<caf::scheduler::test_coordinator&>(sys->scheduler());
  }

  ~stage_fixture() {
    sched->run();
    sys.reset();
  }

  void enroll(const std::string& id) {
    nlohmann::json body{{"registrationId", id},
                        {"attestation", {{"type", "symmetricKey"}}}};
    nlohmann::json doc;
    REQUIRE(!enrollment::normalize(enrollment::kind::individual, id, body, nullptr, now_ms(),
                                   doc));
    storage::write_batch b;
    b.put(storage::cf::enrollments, enrollment::key_of(id), doc.dump());
    REQUIRE(!store->write(b));
  }

  static registration_event attested(const std::string& id) {
    registration_event ev;
    ev.operation_id = "op-" + id;
    ev.registration_id = id;
    ev.id_scope = "0ne00000E57";
    ev.accepted_ms = 1700000000000;
    ev.attested_ms = ev.accepted_ms;
    ev.attestation_type = "symmetricKey";
    return ev;
  }
};

} // namespace

TEST_CASE("allocation through the stage sink: a failed publish runs the input again, "
          "acked once") {
  delivery_traits kafka;
  kafka.redelivers = true;
  kafka.shared_store = false;
  stage_fixture f(kafka);
  f.enroll("dev-1");
  f.sink->failures = 1;
  auto stage = f.sys->spawn(allocation_actor, f.ctx);
  int acks = 0;
  caf::anon_send(stage, event_atom::value, stage_fixture::attested("dev-1"),
                 event_ack{[&acks] { ++acks; }});
  f.sched->run();
  // Allocated, handed to the sink, which failed it: nothing acked, and the
  // stage's retry waits for its timer.
  REQUIRE(f.sink->seen.size() == 1);
  CHECK(f.sink->seen[0].next == bus::topic::registration_allocated);
  CHECK(f.sink->seen[0].r == stage_sink::route::nearest);
  CHECK(f.sink->seen[0].ev.assigned_hub == "hub-a.example.net");
  CHECK(acks == 0);
  CHECK(f.sched->run() == 0); // nothing runs before the timer
  CHECK(f.sink->seen.size() == 1);
  // One second later (the test clock) the input is allocated again, with
  // its ack, and this time the publish goes through.
  f.sched->clock().current_time += std::chrono::seconds(1);
  CHECK(f.sched->trigger_timeouts() == 1);
  f.sched->run();
  REQUIRE(f.sink->seen.size() == 2);
  CHECK(f.sink->seen[1].next == bus::topic::registration_allocated);
  CHECK(f.sink->seen[1].ev.status == registration_status::assigning);
  CHECK(f.sink->seen[1].ev.assigned_hub == "hub-a.example.net");
  // Redelivered input, same bytes: the clock reading is pinned to the input.
  CHECK(f.sink->seen[1].ev.allocated_ms == stage_fixture::attested("dev-1").attested_ms);
  CHECK(f.sink->seen[0].ev.allocated_ms == f.sink->seen[1].ev.allocated_ms);
  CHECK(acks == 1);
  caf::anon_send_exit(stage, caf::exit_reason::user_shutdown);
}

TEST_CASE("allocation through the stage sink: a failure is forwarded as completed, "
          "in process at once") {
  stage_fixture f(delivery_traits{}); // in process: a clock reading, a shared store
  // No enrollment: allocation fails the operation.
  auto stage = f.sys->spawn(allocation_actor, f.ctx);
  int acks = 0;
  caf::anon_send(stage, event_atom::value, stage_fixture::attested("gone-1"),
                 event_ack{[&acks] { ++acks; }});
  f.sched->run();
  REQUIRE(f.sink->seen.size() == 1);
  CHECK(f.sink->seen[0].next == bus::topic::registration_completed);
  CHECK(f.sink->seen[0].ev.status == registration_status::failed);
  CHECK(f.sink->seen[0].ev.error_code == static_cast<int32_t>(error_code::enrollment_not_found));
  CHECK(acks == 1);
  CHECK(f.sched->trigger_timeouts() == 0); // no retry armed
  caf::anon_send_exit(stage, caf::exit_reason::user_shutdown);
}

TEST_CASE("registration through the stage sink: a failed hand-off is sent again in 1 s, "
          "always through the bus") {
  delivery_traits kafka;
  kafka.redelivers = true;
  kafka.resend_after = std::chrono::seconds(10); // hand-offs tracked: the ack marks them
  kafka.outcomes_recorded = true;
  kafka.shared_store = false;
  stage_fixture f(kafka);
  f.sink->failures = 1;
  auto stage = f.sys->spawn(registration_actor, f.ctx);
  // An operation resumed after a restart: handed to allocation at once.
  caf::anon_send(stage, accepted_atom::value, stage_fixture::attested("dev-2"));
  f.sched->run();
  REQUIRE(f.sink->seen.size() == 1);
  CHECK(f.sink->seen[0].next == bus::topic::registration_attested);
  CHECK(f.sink->seen[0].r == stage_sink::route::bus); // an operation starts in the log
  CHECK(f.ctx->inflight.load() == 1);
  // The retry waits for the test clock (the resend tick is armed too, but
  // finds nothing acknowledged).
  CHECK(f.sched->run() == 0);
  f.sched->clock().current_time += std::chrono::seconds(1);
  f.sched->trigger_timeouts();
  f.sched->run();
  REQUIRE(f.sink->seen.size() == 2);
  CHECK(f.sink->seen[1].ev.operation_id == f.sink->seen[0].ev.operation_id);
  CHECK(f.sink->seen[1].r == stage_sink::route::bus);
  CHECK(f.ctx->inflight.load() == 1); // the same operation, not a second one
  caf::anon_send_exit(stage, caf::exit_reason::user_shutdown);
  f.sched->run();
}

TEST_CASE("the Kafka sink on a failed publish: `retry` gets the event back, `retry_by_id` "
          "only its id, neither leaves the input unacked") {
  failing_bus bus;
  auto stats = std::make_shared<kafka_counters>();
  kafka_sink sink(bus, stats, std::chrono::seconds(0));
  registration_event ev;
  ev.operation_id = "op-1";
  ev.registration_id = "dev-1";
  ev.assigned_hub = "hub.example.net";
  bool acked = false;
  auto ack = [&acked] { acked = true; };

  auto by_event = std::make_shared<stage_output>();
  by_event->stage = "by-event";
  registration_event back;
  by_event->retry = [&back](registration_event e, stage_output::ack_fn a, const error& why) {
    CHECK(a);
    CHECK(why.code == error_code::unavailable);
    back = std::move(e);
  };
  sink.forward(by_event, bus::topic::registration_allocated, ev, ack);
  CHECK(back.operation_id == "op-1");
  CHECK(back.assigned_hub == "hub.example.net");

  auto by_id = std::make_shared<stage_output>();
  by_id->stage = "by-id";
  std::string id_back;
  by_id->retry_by_id = [&id_back](const std::string& op_id, stage_output::ack_fn a,
                                  const error& why) {
    CHECK(a);
    CHECK(why.code == error_code::unavailable);
    id_back = op_id;
  };
  sink.forward(by_id, bus::topic::registration_completed, ev, ack, stage_sink::route::bus);
  CHECK(id_back == "op-1");

  auto none = std::make_shared<stage_output>();
  none->stage = "none";
  sink.forward(none, bus::topic::registration_attested, ev, ack);

  CHECK(bus.published == 3);
  CHECK_FALSE(acked);                          // no ack ran: every input stays unacked
  CHECK(stats->publish_retries.load() == 2);   // the two stages that retry
}

TEST_CASE("configuration, embedded: a failed store commit is retried with the certificate "
          "already issued") {
  stage_fixture f(delivery_traits{});
  // An issuing CA; every issuance is logged, so a second one would show.
  auto ca = test::make_ca("Stage Issuing CA", nullptr, 9);
  auto write = [&](const std::string& name, const std::string& text) {
    const std::string path = f.dir.path + "/" + name;
    std::FILE* out = std::fopen(path.c_str(), "wb");
    REQUIRE(out != nullptr);
    std::fwrite(text.data(), 1, text.size(), out);
    std::fclose(out);
    REQUIRE(::chmod(path.c_str(), 0600) == 0);
    return path;
  };
  config::issuing_ca_config c;
  c.name = "fleet";
  c.key_file = write("ca.key", ca.key_pem());
  c.certificate_file = write("ca.pem", ca.pem());
  std::vector<std::string> issued;
  REQUIRE(!configuration::certificate_issuer::load(
    {c}, f.ctx->issuer, [&](std::string_view l) { issued.emplace_back(l); }));
  auto key = test::new_key("P-256");
  auto ev = stage_fixture::attested("dev-1");
  ev.unrecorded = true; // no `pending` record to look up
  ev.assigned_hub = "hub-a.example.net";
  ev.device_id = "dev-1";
  ev.allocated_ms = ev.accepted_ms;
  ev.csr = test::make_csr(key.get(), "dev-1");
  ev.issuing_ca = "fleet";
  auto stage = f.sys->spawn(configuration_actor, f.ctx);
  // The first commit fails (as when the store refuses a write).
  f.ctx->commits_stopped = true;
  caf::anon_send(stage, event_atom::value, ev, event_ack{});
  f.sched->run();
  CHECK(issued.size() == 1);
  CHECK(f.sink->seen.empty());
  // 200 ms later (the test clock) the stage tries again, and the commit
  // goes through this time (on the store's thread: wait for its answer).
  f.ctx->commits_stopped = false;
  f.sched->clock().current_time += std::chrono::milliseconds(200);
  CHECK(f.sched->trigger_timeouts() == 1);
  for (int i = 0; i < 3000 && f.sink->seen.empty(); ++i) {
    f.sched->run();
    if (f.sink->seen.empty())
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  REQUIRE(f.sink->seen.size() == 1);
  const auto& done = f.sink->seen[0].ev;
  CHECK(f.sink->seen[0].next == bus::topic::registration_completed);
  CHECK(done.status == registration_status::assigned);
  // The certificate issued before the failed commit, not none, not a second.
  CHECK(issued.size() == 1);
  REQUIRE_FALSE(done.issued_chain.empty());
  CHECK(test::verify_issued_chain({done.issued_chain.substr(0, done.issued_chain.find('\n'))},
                                  ca) == "");
  REQUIRE(done.outcome != nullptr);
  CHECK(done.outcome->issued_chain == done.issued_chain);
  std::optional<std::string> raw;
  REQUIRE(!f.store->get(storage::cf::registrations, enrollment::key_of("dev-1"), raw));
  REQUIRE(raw);
  registration_state rec;
  REQUIRE(!decode_record(*raw, rec));
  CHECK(rec.issued_chain == done.issued_chain);
  caf::anon_send_exit(stage, caf::exit_reason::user_shutdown);
}
