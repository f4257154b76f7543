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

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/actor_types.hpp"
#include "actors/allocation_actor.hpp"
#include "actors/attestation/sas_token.hpp"
#include "actors/attestation/symmetric_key.hpp"
#include "actors/attestation_actor.hpp"
#include "actors/configuration_actor.hpp"
#include "actors/enrollment_actor.hpp"
#include "actors/registration_actor.hpp"
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

  allocation_deps allocation() const {
    return {ctx->catalog, ctx->store, ctx->hubs, ctx->policies, ctx->sink.get(), ctx->metrics};
  }

  registration_deps registration() const { return registration_deps_of(*ctx); }

  void enroll(const std::string& id) { enroll_in(*store, id); }

  static void enroll_in(storage::store& store, const std::string& id) {
    nlohmann::json body{{"registrationId", id},
                        {"attestation", {{"type", "symmetricKey"}}}};
    nlohmann::json doc;
    REQUIRE(!enrollment::normalize(enrollment::kind::individual, id, body, nullptr, now_ms(),
                                   doc));
    storage::write_batch b;
    b.put(storage::cf::enrollments, enrollment::key_of(id), doc.dump());
    REQUIRE(!store.write(b));
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

/// A policy that answers when the test says so (a webhook's shape): keeps
/// each `done` it is given.
class later_policy final : public allocation::policy {
public:
  mutable std::vector<allocation::done_fn> waiting;
  allocation_policy kind() const noexcept override { return allocation_policy::hashed; }
  std::chrono::milliseconds deadline() const noexcept override { return std::chrono::seconds(5); }
  void allocate(const allocation::request&, allocation::done_fn done) const override {
    waiting.push_back(std::move(done));
  }
};

/// The allocation stage built from its own dependencies only (no
/// engine_context): what allocation_deps names is all it can reach.
struct allocation_fixture {
  test::temp_dir dir{"prov_allocation_stage_test"};
  std::unique_ptr<storage::store> store;
  enrollment_catalog catalog;
  allocation::hub_set hubs;
  allocation::registry policies;
  std::shared_ptr<later_policy> policy = std::make_shared<later_policy>();
  recording_sink sink{delivery_traits{}};
  metrics::instruments metrics;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  caf::scheduler::test_coordinator* sched = nullptr;
  allocation_actor_type stage;
  int acks = 0;

  allocation_fixture() {
    REQUIRE(!storage::store::open(dir.path, storage::store_options{}, store));
    catalog.attach(store.get());
    policies.add(policy);
    hubs.assign({{"hub-a.example.net", 1, true, "", ""}, {"hub-b.example.net", 1, true, "", ""}});
    cfg.set("scheduler.policy", caf::atom("testing"));
    cfg.set("logger.verbosity", caf::atom("quiet"));
    sys = std::make_unique<caf::actor_system>(cfg);
    sched = &dynamic_cast<caf::scheduler::test_coordinator&>(sys->scheduler());
    stage = sys->spawn<allocation_actor>(
      allocation_deps{catalog, store.get(), hubs, policies, &sink, &metrics});
    stage_fixture::enroll_in(*store, "dev-3");
    caf::anon_send(stage, event_atom::value, stage_fixture::attested("dev-3"),
                   event_ack{[this] { ++acks; }});
    sched->run();
  }

  ~allocation_fixture() {
    caf::anon_send_exit(stage, caf::exit_reason::user_shutdown);
    sched->run();
    stage = allocation_actor_type{};
    sys.reset();
  }
};

/// The attestation stage built from its own dependencies only, with the
/// symmetric key mechanism, over an individual enrollment in a real store.
struct attestation_fixture {
  static constexpr const char* scope = "0ne00000E57";
  static constexpr const char* key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
  test::temp_dir dir{"prov_attestation_stage_test"};
  std::unique_ptr<storage::store> store;
  enrollment_catalog catalog;
  attestation::registry mechanisms;
  recording_sink sink{delivery_traits{}};
  metrics::instruments metrics;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  caf::scheduler::test_coordinator* sched = nullptr;
  attestation_actor_type stage;

  attestation_fixture() {
    REQUIRE(!storage::store::open(dir.path, storage::store_options{}, store));
    catalog.attach(store.get());
    mechanisms.add(std::make_unique<attestation::symmetric_key>(3600, 300));
    nlohmann::json body{{"registrationId", "dev-4"},
                        {"attestation",
                         {{"type", "symmetricKey"},
                          {"symmetricKey", {{"primaryKey", key}, {"secondaryKey", key}}}}}};
    nlohmann::json doc;
    REQUIRE(!enrollment::normalize(enrollment::kind::individual, "dev-4", body, nullptr,
                                   now_ms(), doc));
    storage::write_batch b;
    b.put(storage::cf::enrollments, enrollment::key_of("dev-4"), doc.dump());
    REQUIRE(!store->write(b));
    cfg.set("scheduler.policy", caf::atom("testing"));
    cfg.set("logger.verbosity", caf::atom("quiet"));
    sys = std::make_unique<caf::actor_system>(cfg);
    sched = &dynamic_cast<caf::scheduler::test_coordinator&>(sys->scheduler());
    attestation_deps deps{mechanisms, catalog, store.get(), &metrics, scope, "0123456789abcdef"};
    deps.sink = &sink;
    stage = sys->spawn<attestation_actor>(std::move(deps));
  }

  ~attestation_fixture() {
    caf::anon_send_exit(stage, caf::exit_reason::user_shutdown);
    sched->run();
    stage = attestation_actor_type{};
    sys.reset();
  }

  static registration_event requested(const std::string& operation_id, const char* with_key) {
    registration_event in;
    in.operation_id = operation_id;
    in.registration_id = "dev-4";
    in.id_scope = scope;
    in.accepted_ms = 1700000000000;
    in.authorization = attestation::make_sas(std::string(scope) + "/registrations/dev-4",
                                             with_key, now_ms() / 1000 + 600, "registration");
    return in;
  }
};

/// The enrollment actor built from its own dependencies only, over a real
/// store; linked hub writes go to a counter.
struct enrollment_fixture {
  test::temp_dir dir{"prov_enrollment_stage_test"};
  std::unique_ptr<storage::store> store;
  enrollment_catalog catalog;
  allocation::hub_set hubs;
  int hub_writes = 0;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  caf::scheduler::test_coordinator* sched = nullptr;
  enrollment_actor_type stage;

  enrollment_fixture() {
    REQUIRE(!storage::store::open(dir.path, storage::store_options{}, store));
    catalog.attach(store.get());
    cfg.set("scheduler.policy", caf::atom("testing"));
    cfg.set("logger.verbosity", caf::atom("quiet"));
    sys = std::make_unique<caf::actor_system>(cfg);
    sched = &dynamic_cast<caf::scheduler::test_coordinator&>(sys->scheduler());
    stage = sys->spawn<enrollment_actor>(
      enrollment_deps{store.get(), catalog, hubs, [this](const storage::write_batch&) {
                        ++hub_writes;
                        return error{};
                      }});
  }

  ~enrollment_fixture() {
    caf::anon_send_exit(stage, caf::exit_reason::user_shutdown);
    sched->run();
    stage = enrollment_actor_type{};
    sys.reset();
  }
};

/// The embedded configuration stage built from its own dependencies only,
/// over a real store. Its commits are synchronous writes (the engine's go
/// through the store's writer thread), so the test coordinator sees each
/// answer as the next message; the first `commit_failures` fail unwritten.
struct configuration_fixture {
  test::temp_dir dir{"prov_configuration_stage_test"};
  std::unique_ptr<storage::store> store;
  enrollment_catalog catalog;
  recording_sink sink{delivery_traits{}};
  metrics::instruments metrics;
  std::atomic<int64_t> relaying{0};
  int commit_failures = 0;
  int commits = 0;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  caf::scheduler::test_coordinator* sched = nullptr;
  configuration_actor_type stage;

  configuration_fixture() {
    REQUIRE(!storage::store::open(dir.path, storage::store_options{}, store));
    catalog.attach(store.get());
    cfg.set("scheduler.policy", caf::atom("testing"));
    cfg.set("logger.verbosity", caf::atom("quiet"));
    sys = std::make_unique<caf::actor_system>(cfg);
    sched = &dynamic_cast<caf::scheduler::test_coordinator&>(sys->scheduler());
    auto commit = [this](storage::write_batch b, storage::store::done_fn done) {
      ++commits;
      if (commit_failures > 0) {
        --commit_failures;
        done(error{error_code::unavailable, "injected: commit failed"});
        return;
      }
      done(store->write(b));
    };
    stage = sys->spawn<configuration_actor>(configuration_deps{
      store.get(), commit, catalog, &sink, &metrics, nullptr, nullptr, nullptr, relaying});
  }

  ~configuration_fixture() {
    caf::anon_send_exit(stage, caf::exit_reason::user_shutdown);
    sched->run();
    stage = configuration_actor_type{};
    sys.reset();
  }

  /// An accepted operation as the registration stage records it (its
  /// operation record and `pending` marker), and its allocated event.
  registration_event accepted_and_allocated(const std::string& id) {
    auto ev = stage_fixture::attested(id);
    operation_record op;
    op.operation_id = ev.operation_id;
    op.registration_id = id;
    op.status = registration_status::assigning;
    op.event = ev;
    storage::write_batch b;
    b.put(storage::cf::operations, ev.operation_id, encode_record(op));
    b.put(storage::cf::pending, ev.operation_id, "");
    REQUIRE(!store->write(b));
    ev.device_id = id;
    ev.assigned_hub = "hub-a.example.net";
    ev.allocated_ms = ev.attested_ms + 5;
    ev.status = registration_status::assigning;
    return ev;
  }

  std::size_t count(storage::cf family) {
    std::size_t n = 0;
    REQUIRE(!store->scan(family, "", 0, [&n](std::string_view, std::string_view) {
      ++n;
      return true;
    }));
    return n;
  }
};

} // namespace

TEST_CASE("enrollment actor from its own dependencies: writes an enrollment, refuses a stale "
          "etag, deletes with the right one, hands hub writes to its writer") {
  enrollment_fixture f;
  error put_err{error_code::internal, "no answer"};
  std::string doc;
  caf::anon_send(f.stage, put_atom::value, enrollment::kind::individual, std::string("dev-5"),
                 std::string(R"({"registrationId":"dev-5","attestation":{"type":"symmetricKey"}})"),
                 std::string(), doc_reply_fn{[&](error e, std::string d) {
                   put_err = std::move(e);
                   doc = std::move(d);
                 }});
  f.sched->run();
  REQUIRE(!put_err);
  const auto etag = nlohmann::json::parse(doc).value("etag", std::string{});
  REQUIRE(!etag.empty());
  std::optional<std::string> stored;
  REQUIRE(!f.store->get(storage::cf::enrollments, enrollment::key_of("dev-5"), stored));
  CHECK(stored.has_value());

  error del_err;
  caf::anon_send(f.stage, delete_atom::value, enrollment::kind::individual,
                 std::string("dev-5"), std::string("\"stale\""),
                 done_reply_fn{[&](error e) { del_err = std::move(e); }});
  f.sched->run();
  CHECK(del_err.code == error_code::precondition_failed);
  caf::anon_send(f.stage, delete_atom::value, enrollment::kind::individual,
                 std::string("dev-5"), etag,
                 done_reply_fn{[&](error e) { del_err = std::move(e); }});
  f.sched->run();
  CHECK(!del_err);
  REQUIRE(!f.store->get(storage::cf::enrollments, enrollment::key_of("dev-5"), stored));
  CHECK(!stored.has_value());

  error hub_err{error_code::internal, "no answer"};
  caf::anon_send(f.stage, hub_atom::value, std::string("put"), std::string("hub-c.example.net"),
                 std::string("{}"), doc_reply_fn{[&](error e, std::string) { hub_err = e; }});
  f.sched->run();
  CHECK(!hub_err);
  CHECK(f.hub_writes == 1);
}

TEST_CASE("attestation from its own dependencies: a published request is attested, the "
          "credential dropped, a bad one completed as failed") {
  attestation_fixture f;
  int acks = 0;
  caf::anon_send(f.stage, event_atom::value, attestation_fixture::requested("", f.key),
                 event_ack{[&acks] { ++acks; }});
  f.sched->run();
  REQUIRE(f.sink.seen.size() == 1);
  CHECK(f.sink.seen[0].next == bus::topic::registration_attested);
  CHECK(f.sink.seen[0].r == stage_sink::route::bus); // it minted the operation id
  CHECK(f.sink.seen[0].ev.operation_id.find("0123456789abcdef") != std::string::npos);
  CHECK(f.sink.seen[0].ev.attestation_type == "symmetricKey");
  CHECK(f.sink.seen[0].ev.authorization.empty());
  CHECK(acks == 1);
  // Signed with another key, with the publisher's operation id.
  const char* other_key = "b3RoZXJrZXlvdGhlcmtleW90aGVya2V5b3RoZXJrZXk=";
  caf::anon_send(f.stage, event_atom::value, attestation_fixture::requested("op-4", other_key),
                 event_ack{[&acks] { ++acks; }});
  f.sched->run();
  REQUIRE(f.sink.seen.size() == 2);
  CHECK(f.sink.seen[1].next == bus::topic::registration_completed);
  CHECK(f.sink.seen[1].r == stage_sink::route::nearest);
  CHECK(f.sink.seen[1].ev.operation_id == "op-4");
  CHECK(f.sink.seen[1].ev.status == registration_status::failed);
  CHECK(f.sink.seen[1].ev.error_code
        == static_cast<int32_t>(error_code::unauthorized_signature));
  CHECK(f.sink.seen[1].ev.authorization.empty());
  CHECK(acks == 2);
}

TEST_CASE("allocation from its own dependencies: a policy answering later goes on "
          "through the mailbox, its deadline then does nothing") {
  allocation_fixture f;
  // The policy holds the input: nothing forwarded, nothing acked.
  REQUIRE(f.policy->waiting.size() == 1);
  CHECK(f.sink.seen.empty());
  CHECK(f.acks == 0);
  (*f.policy->waiting[0])({}, "hub-b.example.net");
  CHECK(f.sink.seen.empty()); // not on the policy's thread: through the mailbox
  f.sched->run();
  REQUIRE(f.sink.seen.size() == 1);
  CHECK(f.sink.seen[0].next == bus::topic::registration_allocated);
  CHECK(f.sink.seen[0].ev.assigned_hub == "hub-b.example.net");
  CHECK(f.sink.seen[0].ev.device_id == "dev-3");
  CHECK(f.acks == 1);
  // The deadline still fires, and finds the job answered.
  CHECK(f.sched->clock().advance_time(std::chrono::seconds(5)) == 1);
  f.sched->run();
  CHECK(f.sink.seen.size() == 1);
  CHECK(f.acks == 1);
}

TEST_CASE("allocation from its own dependencies: a policy that does not answer fails the "
          "device at its deadline, and a later answer is dropped") {
  allocation_fixture f;
  REQUIRE(f.policy->waiting.size() == 1);
  CHECK(f.sched->clock().advance_time(std::chrono::seconds(4)) == 0);
  f.sched->run();
  CHECK(f.sink.seen.empty());
  CHECK(f.sched->clock().advance_time(std::chrono::seconds(1)) == 1);
  f.sched->run();
  REQUIRE(f.sink.seen.size() == 1);
  CHECK(f.sink.seen[0].next == bus::topic::registration_completed);
  CHECK(f.sink.seen[0].ev.status == registration_status::failed);
  CHECK(f.sink.seen[0].ev.error_code == static_cast<int32_t>(error_code::no_hub_available));
  CHECK(f.sink.seen[0].ev.error_message.find("did not answer within 5000 ms")
        != std::string::npos);
  CHECK(f.acks == 1);
  (*f.policy->waiting[0])({}, "hub-a.example.net"); // too late
  f.sched->run();
  CHECK(f.sink.seen.size() == 1);
  CHECK(f.acks == 1);
}

TEST_CASE("allocation through the stage sink: a failed publish runs the input again, "
          "acked once") {
  delivery_traits kafka;
  kafka.redelivers = true;
  kafka.shared_store = false;
  stage_fixture f(kafka);
  f.enroll("dev-1");
  f.sink->failures = 1;
  auto stage = f.sys->spawn<allocation_actor>(f.allocation());
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
  auto stage = f.sys->spawn<allocation_actor>(f.allocation());
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

TEST_CASE("configuration from its own dependencies: an allocated event is assigned in one "
          "commit, then completed and acked; a failed commit is tried again in 200 ms") {
  configuration_fixture f;
  f.commit_failures = 1;
  auto ev = f.accepted_and_allocated("dev-5");
  int acks = 0;
  caf::anon_send(f.stage, event_atom::value, ev, event_ack{[&acks] { ++acks; }});
  f.sched->run();
  // The commit failed: nothing written, nothing completed, nothing acked;
  // the operation stays pending and a retry waits for its timer.
  CHECK(f.commits == 1);
  CHECK(f.sink.seen.empty());
  CHECK(acks == 0);
  CHECK(f.count(storage::cf::pending) == 1);
  CHECK(f.count(storage::cf::outbox) == 0);
  CHECK(f.count(storage::cf::registrations) == 0);
  CHECK(f.sched->run() == 0);
  f.sched->clock().current_time += std::chrono::milliseconds(200);
  CHECK(f.sched->trigger_timeouts() == 1);
  f.sched->run();
  CHECK(f.commits == 2);
  // Committed: the registration record, the terminal operation, the
  // device.assigned outbox entry, and no more `pending` marker.
  std::optional<std::string> raw;
  REQUIRE(!f.store->get(storage::cf::registrations, enrollment::key_of("dev-5"), raw));
  REQUIRE(raw);
  registration_state rs;
  REQUIRE(!decode_record(*raw, rs));
  CHECK(rs.status == registration_status::assigned);
  CHECK(rs.assigned_hub == "hub-a.example.net");
  CHECK(rs.device_id == "dev-5");
  CHECK(rs.last_operation_id == ev.operation_id);
  raw.reset();
  REQUIRE(!f.store->get(storage::cf::operations, ev.operation_id, raw));
  REQUIRE(raw);
  operation_record op;
  REQUIRE(!decode_record(*raw, op));
  CHECK(op.status == registration_status::assigned);
  CHECK(f.count(storage::cf::pending) == 0);
  CHECK(f.count(storage::cf::outbox) == 1);
  // Then registration.completed for the intake (in process), with the
  // outcome, and the input's ack.
  REQUIRE(f.sink.seen.size() == 1);
  CHECK(f.sink.seen[0].next == bus::topic::registration_completed);
  CHECK(f.sink.seen[0].ev.operation_id == ev.operation_id);
  CHECK(f.sink.seen[0].ev.status == registration_status::assigned);
  REQUIRE(f.sink.seen[0].ev.outcome);
  CHECK(f.sink.seen[0].ev.outcome->assigned_hub == "hub-a.example.net");
  CHECK(acks == 1);
  // The same event again (a redelivery): acked, nothing written or
  // completed a second time.
  caf::anon_send(f.stage, event_atom::value, ev, event_ack{[&acks] { ++acks; }});
  f.sched->run();
  CHECK(acks == 2);
  CHECK(f.commits == 2);
  CHECK(f.sink.seen.size() == 1);
  CHECK(f.count(storage::cf::outbox) == 1);
  CHECK(f.sched->trigger_timeouts() == 0);
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
  auto stage = f.sys->spawn<registration_actor>(f.registration());
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

namespace {

/// Kafka mode's bus as the configuration stage sees it: durable raw
/// publishes wait for the test to answer them (as librdkafka's delivery
/// reports would, later and on another thread).
class holding_bus final : public bus::stage_bus {
public:
  struct pending {
    bus::topic t;
    raw_record rec;
    durable_fn done;
  };
  std::vector<pending> raw;
  void publish(bus::topic, registration_event) override {}
  void subscribe(bus::topic, handler) override {}
  void publish_raw_durable(bus::topic t, raw_record rec, durable_fn done) override {
    raw.push_back({t, std::move(rec), std::move(done)});
  }
};

/// dps.registrations as the configuration stage sees it: each assignment
/// waits for the test to answer.
class holding_replication final : public replication {
public:
  std::vector<std::pair<operation_record, done_fn>> assignments;
  error follow_completed(completed_fn) override { return {}; }
  error write_enrollments(const storage::write_batch&) override { return {}; }
  error catch_up_enrollments(int) override { return {}; }
  int64_t table_lag(std::string_view) const override { return 0; }
  error write_registrations(const storage::write_batch&) override { return {}; }
  void publish_assignment(const operation_record& update, done_fn done) override {
    assignments.emplace_back(update, std::move(done));
  }
  void close() override {}
};

} // namespace

TEST_CASE("Kafka configuration: nothing is recorded or completed before device.assigned is "
          "acknowledged; a failed one is published again, the same bytes") {
  // The order that makes a recorded assignment prove its event is in Kafka
  // (configuration_actor.cpp, steps 1-4), checked step by step: a delivery
  // report that fails must not let the record or registration.completed
  // out, and the ack waits for all three.
  delivery_traits kafka;
  kafka.redelivers = true;
  kafka.outcomes_recorded = true;
  kafka.shared_store = false;
  stage_fixture f(kafka);
  auto owned_bus = std::make_unique<holding_bus>();
  auto& bus = *owned_bus;
  f.ctx->bus = std::move(owned_bus);
  auto owned_repl = std::make_unique<holding_replication>();
  auto& repl = *owned_repl;
  f.ctx->repl = std::move(owned_repl);
  auto stage = f.sys->spawn<kafka_configuration_actor>(configuration_deps_of(*f.ctx));
  auto ev = stage_fixture::attested("dev-3");
  ev.device_id = "dev-3";
  ev.assigned_hub = "hub-a.example.net";
  ev.allocated_ms = ev.attested_ms + 5;
  ev.status = registration_status::assigning;
  int acks = 0;
  caf::anon_send(stage, event_atom::value, ev, event_ack{[&acks] { ++acks; }});
  f.sched->run();
  // Step 1 only: device.assigned on its way, nothing else yet.
  REQUIRE(bus.raw.size() == 1);
  CHECK(bus.raw[0].t == bus::topic::device_assigned);
  CHECK(bus.raw[0].rec.key == "dev-3");
  CHECK(repl.assignments.empty());
  CHECK(f.sink->seen.empty());
  // Its delivery fails: still no record, no completed, no ack; a retry waits
  // for its timer.
  bus.raw[0].done(error{error_code::unavailable, "injected: delivery failed"});
  f.sched->run();
  CHECK(repl.assignments.empty());
  CHECK(f.sink->seen.empty());
  CHECK(acks == 0);
  CHECK(bus.raw.size() == 1);
  CHECK(f.ctx->kafka_stats->publish_retries.load() == 1);
  f.sched->clock().current_time += std::chrono::seconds(1);
  CHECK(f.sched->trigger_timeouts() == 1);
  f.sched->run();
  // Published again, the same bytes (consumers dedupe a copy on ce_id).
  REQUIRE(bus.raw.size() == 2);
  CHECK(bus.raw[1].t == bus::topic::device_assigned);
  CHECK(bus.raw[1].rec.value == bus.raw[0].rec.value);
  CHECK(bus.raw[1].rec.headers == bus.raw[0].rec.headers);
  CHECK(repl.assignments.empty());
  // Acknowledged: step 2, the record; still no completed.
  bus.raw[1].done(error{});
  f.sched->run();
  REQUIRE(repl.assignments.size() == 1);
  CHECK(repl.assignments[0].first.operation_id == ev.operation_id);
  CHECK(repl.assignments[0].first.state.last_operation_id == ev.operation_id);
  CHECK(f.sink->seen.empty());
  CHECK(acks == 0);
  // Recorded: step 3, registration.completed through the bus, then the ack.
  repl.assignments[0].second(error{});
  f.sched->run();
  REQUIRE(f.sink->seen.size() == 1);
  CHECK(f.sink->seen[0].next == bus::topic::registration_completed);
  CHECK(f.sink->seen[0].r == stage_sink::route::bus);
  CHECK(f.sink->seen[0].ev.status == registration_status::assigned);
  CHECK(acks == 1);
  CHECK(bus.raw.size() == 2); // no third device.assigned
  CHECK(f.ctx->relaying.load() == 0);
  caf::anon_send_exit(stage, caf::exit_reason::user_shutdown);
  f.sched->run();
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
  auto stage = f.sys->spawn<configuration_actor>(configuration_deps_of(*f.ctx));
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
