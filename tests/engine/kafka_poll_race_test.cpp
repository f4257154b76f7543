// A poll racing the registration.completed reader on a Kafka gateway
// (engine.cpp, operation()). The reader writes the operation record and
// deletes the deferred accept's `pending` entry in one batch; a poll that
// read the operation record just before that batch and the `pending` entry
// just after it found neither and answered 404 (1 device in 10,000 under
// load, once). The interleaving is forced here through storage::store's
// interface: the poll's first read of the operation record is held until
// the real reader, fed by a real Kafka record on the mock cluster, has
// applied the outcome.

#include <doctest/doctest.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <mutex>
#include <string>
#include <thread>

#include "actors/engine.hpp"
#include "bus/kafka_common.hpp"
#include "bus/kafka_mock.hpp"
#include "bus/kafka_producer.hpp"
#include "messages/registration.hpp"
#include "storage/store.hpp"
#include "tests/support/forwarding_store.hpp"

using namespace prov;
namespace kafka = prov::bus::kafka;

namespace {

struct temp_dir {
  std::string path;
  temp_dir() {
    char tmpl[] = "/tmp/prov_poll_race_XXXXXX";
    char* p = mkdtemp(tmpl);
    REQUIRE(p != nullptr);
    path = p;
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

/// A real store. While armed, the first read of operation `held` that finds
/// nothing is held until the record exists (another thread wrote it), then
/// answers "nothing", as the read would have if it had run just before.
class racing_store final : public test::forwarding_store {
public:
  using forwarding_store::forwarding_store;

  void arm(std::string op_id) {
    std::lock_guard<std::mutex> g{mu_};
    held_ = std::move(op_id);
    armed_ = true;
  }
  /// Waits until the armed read has happened (it is then being held).
  bool wait_holding(std::chrono::seconds limit) {
    std::unique_lock<std::mutex> g{mu_};
    return cv_.wait_for(g, limit, [&] { return holding_; });
  }
  /// Whether the held read saw the record appear (false: it gave up).
  bool saw_record_appear() const {
    std::lock_guard<std::mutex> g{mu_};
    return appeared_;
  }

  error get(storage::cf f, std::string_view k, std::optional<std::string>& out) const override {
    if (auto err = inner_->get(f, k, out))
      return err;
    if (f != storage::cf::operations || out)
      return {};
    {
      std::unique_lock<std::mutex> g{mu_};
      if (!armed_ || k != held_)
        return {};
      armed_ = false;
      holding_ = true;
    }
    cv_.notify_all();
    // Until the reader's batch is in (bounded: the test then fails on the
    // checks below, not by hanging).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    std::optional<std::string> now;
    while (std::chrono::steady_clock::now() < deadline) {
      if (auto err = inner_->get(f, k, now))
        return err;
      if (now)
        break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    std::lock_guard<std::mutex> g{mu_};
    appeared_ = now.has_value();
    out.reset(); // what the read found before the batch
    return {};
  }

private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::string held_;
  mutable bool armed_ = false;
  mutable bool holding_ = false;
  mutable bool appeared_ = false;
};

} // namespace

TEST_SUITE("engine") {

TEST_CASE("kafka gateway: a poll between the completed reader's writes sees the outcome, not 404") {
  std::unique_ptr<kafka::mock_cluster> mc;
  kafka::log_fn quiet = [](int level, std::string_view msg) {
    if (level <= 3)
      MESSAGE("mock: " << std::string(msg));
  };
  REQUIRE(!kafka::mock_cluster::start(1, mc, quiet));
  config::kafka_config kcfg;
  kcfg.brokers = mc->bootstrap_servers();
  kcfg.partitions = 1;
  kcfg.replication_factor = 1;
  for (const auto& p : kafka::mock_client_properties())
    kcfg.properties[std::string(p.name)] = p.value;
  REQUIRE(!mc->create_topics(kafka::topic_table(kcfg)));

  temp_dir dir;
  std::unique_ptr<storage::store> inner;
  storage::store_options so;
  so.sync = false; // durability is not under test
  REQUIRE(!storage::store::open(dir.path + "/db", so, inner));
  racing_store store(std::move(inner));

  engine_options o;
  o.id_scope = "0ne00000E57";
  o.store = &store;
  o.cfg.kafka = kcfg;
  // A gateway alone: it follows registration.completed; no stage consumes.
  o.cfg.roles.attestation = o.cfg.roles.allocation = o.cfg.roles.configuration = false;
  std::unique_ptr<engine> eng;
  {
    auto err = engine::start(o, eng);
    REQUIRE_MESSAGE(!err, err.message);
  }

  // A deferred accept answered 202: only its `pending` entry holds it
  // (registration_actor.cpp). Not an id of this instance, nor one with a
  // creation time (accepted_elsewhere would answer "assigning").
  const std::string reg_id = "race-device-1";
  const std::string op_id = "race-op-1";
  operation_record accepted;
  accepted.operation_id = op_id;
  accepted.registration_id = reg_id;
  accepted.status = registration_status::assigning;
  accepted.event.operation_id = op_id;
  accepted.event.registration_id = reg_id;
  {
    storage::write_batch b;
    b.put(storage::cf::pending, op_id, encode_record(accepted));
    REQUIRE(!store.write(b));
  }
  registration_state before;
  REQUIRE(!eng->operation(reg_id, op_id, before));
  CHECK(before.status == registration_status::assigning);

  // The poll: its first read of the operation record misses and is held.
  store.arm(op_id);
  auto poll = std::async(std::launch::async, [&] {
    registration_state out;
    error err = eng->operation(reg_id, op_id, out);
    return std::make_pair(err, out);
  });
  REQUIRE(store.wait_holding(std::chrono::seconds(30)));

  // Meanwhile the outcome arrives over Kafka; the reader records it and
  // deletes the `pending` entry in one batch.
  registration_event done;
  done.operation_id = op_id;
  done.registration_id = reg_id;
  done.id_scope = o.id_scope;
  done.status = registration_status::assigned;
  done.assigned_hub = "hub-a.azure-devices.net";
  done.device_id = reg_id;
  done.accepted_ms = done.completed_ms = now_ms();
  std::unique_ptr<kafka::producer> prod;
  config::kafka_config pcfg = kcfg;
  pcfg.properties.clear(); // the mock's consumer settings
  REQUIRE(!kafka::producer::create(pcfg, {}, prod));
  std::promise<error> acked;
  kafka::record r;
  r.topic = kafka::topic_for(kcfg, bus::topic::registration_completed);
  r.key = reg_id;
  r.value = encode_event(done);
  REQUIRE(!prod->send(std::move(r), [&acked](const kafka::delivery& d) { acked.set_value(d.err); }));
  auto acked_f = acked.get_future();
  REQUIRE(acked_f.wait_for(std::chrono::seconds(30)) == std::future_status::ready);
  REQUIRE(!acked_f.get());

  REQUIRE(poll.wait_for(std::chrono::seconds(90)) == std::future_status::ready);
  auto [err, out] = poll.get();
  CHECK(store.saw_record_appear()); // the interleaving happened as described
  std::optional<std::string> entry;
  REQUIRE(!store.get(storage::cf::pending, op_id, entry));
  CHECK_FALSE(entry.has_value());
  CHECK_MESSAGE(!err, err.message); // was: operation_not_found (404)
  CHECK(out.status == registration_status::assigned);
  CHECK(out.assigned_hub == "hub-a.azure-devices.net");

  prod->close();
  eng.reset();
  store.close();
}

} // TEST_SUITE
