// The engine in-process (no HTTP): store ownership, the group snapshot after a
// failed reload, registration query paging. The store is a real RocksDB
// store behind a wrapper that can fail scans of one family, as a damaged
// disk would: the fault goes through storage::store's interface, the
// product has no hook for it.

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "actors/allocation/policy.hpp"
#include "actors/attestation/sas_token.hpp"
#include "actors/attestation/tpm.hpp"
#include "actors/engine.hpp"
#include "messages/crypto.hpp"
#include "messages/registration.hpp"
#include "storage/store.hpp"
#include "tests/support/forwarding_store.hpp"
#include "tests/support/temp_dir.hpp"

using namespace prov;

namespace {

constexpr const char* scope = "0ne00000E57";

struct temp_dir : test::temp_dir {
  temp_dir() : test::temp_dir("prov_engine_test") {}
};

/// A real store; scans of `failing` fail while `fail` is set.
class faulty_store final : public test::forwarding_store {
public:
  using forwarding_store::forwarding_store;

  std::atomic<bool> fail{false};
  storage::cf failing = storage::cf::groups;
  mutable std::atomic<std::size_t> visited{0}; ///< entries handed to scan visitors

  error scan(storage::cf f, std::string_view start, std::size_t limit,
             const visit_fn& fn) const override {
    if (fail.load() && f == failing)
      return {error_code::storage_failure, "injected: the family cannot be read"};
    return inner_->scan(f, start, limit, [&](std::string_view k, std::string_view v) {
      ++visited;
      return fn(k, v);
    });
  }
  using storage::store::write;
  error write(const storage::write_batch& b, durability d) override {
    for (const auto& op : b.ops())
      if (op.family == storage::cf::tpm_challenges) {
        std::lock_guard<std::mutex> g{tpm_mu};
        tpm_writes.push_back({d, std::this_thread::get_id()});
        break;
      }
    return inner_->write(b, d);
  }
  /// Every synchronous write of TPM challenges: how durable, on which thread.
  struct tpm_write {
    durability d;
    std::thread::id thread;
  };
  mutable std::mutex tpm_mu;
  std::vector<tpm_write> tpm_writes;
};

std::unique_ptr<faulty_store> open_store(const temp_dir& dir) {
  std::unique_ptr<storage::store> s;
  storage::store_options o;
  o.sync = false; // durability is not under test
  auto err = storage::store::open(dir.path + "/db", o, s);
  REQUIRE_MESSAGE(!err, err.message);
  return std::make_unique<faulty_store>(std::move(s));
}

engine_options options(storage::store* s) {
  engine_options o;
  o.id_scope = scope;
  o.store = s;
  return o;
}

/// A commit through the store's writer: ok while the store is open.
error commit_probe(storage::store& s) {
  storage::write_batch b;
  b.put(storage::cf::meta, "probe", "1");
  std::promise<error> done;
  auto f = done.get_future();
  s.commit(std::move(b), [&done](const error& e) { done.set_value(e); });
  REQUIRE(f.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  return f.get();
}

error put(engine& eng, enrollment::kind k, const std::string& id, const std::string& body) {
  std::promise<error> done;
  auto f = done.get_future();
  eng.put_enrollment(k, id, body, "", [&done](error e, std::string) { done.set_value(e); });
  REQUIRE(f.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  return f.get();
}

std::string group_body(const std::string& key) {
  return R"({"attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":")" + key
         + R"(","secondaryKey":")" + key + R"("}}})";
}

/// Whether a device of a group with `group_key` attests.
bool attests(engine& eng, const std::string& group_key, const std::string& device) {
  register_request req;
  req.id_scope = scope;
  req.registration_id = device;
  req.credential = credential_of_authorization(
    attestation::make_sas(std::string(scope) + "/registrations/" + device,
                          *crypto::derive_device_key(group_key, device),
                          now_ms() / 1000 + 3600, "registration"));
  return !eng.authenticate_device(req);
}

} // namespace

TEST_SUITE("engine") {

TEST_CASE("engine: the caller's store stays open after shutdown and after a failed start") {
  temp_dir dir;
  auto store = open_store(dir);
  {
    std::unique_ptr<engine> eng;
    auto err = engine::start(options(store.get()), eng);
    REQUIRE_MESSAGE(!err, err.message);
    eng->shutdown();
    eng.reset();
  }
  auto after_shutdown = commit_probe(*store);
  CHECK_MESSAGE(!after_shutdown, after_shutdown.message);

  store->fail = true; // the group snapshot cannot be built: start fails
  std::unique_ptr<engine> eng;
  auto err = engine::start(options(store.get()), eng);
  CHECK(err);
  CHECK(eng == nullptr);
  store->fail = false;
  auto after_failed_start = commit_probe(*store);
  CHECK_MESSAGE(!after_failed_start, after_failed_start.message);
  store->close(); // the owner closes it
  CHECK(commit_probe(*store));
}

TEST_CASE("engine: a failed group reload fails closed and is reported to the writer") {
  temp_dir dir;
  auto store = open_store(dir);
  std::unique_ptr<engine> eng;
  auto err = engine::start(options(store.get()), eng);
  REQUIRE_MESSAGE(!err, err.message);
  const auto k = enrollment::kind::group;
  auto old_key = crypto::generate_key(), new_key = crypto::generate_key();
  REQUIRE(!put(*eng, k, "rotating", group_body(old_key)));
  REQUIRE(!put(*eng, k, "other", group_body(crypto::generate_key())));
  CHECK(attests(*eng, old_key, "dev-1"));

  // The rotation is stored, but the snapshot cannot be rebuilt.
  store->fail = true;
  auto rotated = put(*eng, k, "rotating", group_body(new_key));
  CHECK_MESSAGE(rotated, "a failed reload must be reported to the writer");
  CHECK(rotated.code == error_code::storage_failure);
  // The old key no longer attests (nor anything else of a group) ...
  CHECK_FALSE(attests(*eng, old_key, "dev-1"));
  CHECK_FALSE(attests(*eng, old_key, "dev-2"));
  CHECK_FALSE(attests(*eng, new_key, "dev-3"));

  // ... until the groups can be read again: then the stored state counts.
  store->fail = false;
  bool healed = false;
  for (int i = 0; i < 50 && !healed; ++i) {
    healed = attests(*eng, new_key, "dev-4");
    if (!healed)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(healed);
  CHECK_FALSE(attests(*eng, old_key, "dev-5"));

  // A delete whose reload fails does not leave the group usable either.
  auto doomed_key = crypto::generate_key();
  REQUIRE(!put(*eng, k, "doomed", group_body(doomed_key)));
  REQUIRE(attests(*eng, doomed_key, "dev-6"));
  store->fail = true;
  std::promise<error> done;
  auto f = done.get_future();
  eng->delete_enrollment(k, "doomed", "", [&done](error e) { done.set_value(e); });
  REQUIRE(f.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  CHECK(f.get());
  CHECK_FALSE(attests(*eng, doomed_key, "dev-7"));
  store->fail = false;
  std::this_thread::sleep_for(std::chrono::milliseconds(1100)); // a retry is due
  CHECK_FALSE(attests(*eng, doomed_key, "dev-8"));
  CHECK(attests(*eng, new_key, "dev-9"));
  eng->shutdown();
}

TEST_CASE("engine: registration query names each undecodable record once per walk through the pages") {
  temp_dir dir;
  auto store = open_store(dir);
  storage::write_batch b;
  for (int i = 0; i < 10; ++i) {
    char id[32];
    std::snprintf(id, sizeof id, "dev-%02d", i);
    registration_state rs;
    rs.registration_id = id;
    rs.status = registration_status::assigned;
    rs.enrollment_group_id = "grp-a";
    b.put(storage::cf::registrations, enrollment::key_of(id), encode_record(rs));
  }
  // One inside the first page, one after the last full page.
  b.put(storage::cf::registrations, "dev-02z", "not a record {");
  b.put(storage::cf::registrations, "dev-99", std::string(3, '\0'));
  REQUIRE(!store->write(b));
  std::unique_ptr<engine> eng;
  auto err = engine::start(options(store.get()), eng);
  REQUIRE_MESSAGE(!err, err.message);

  auto keys = [](const std::vector<std::string>& u) {
    std::vector<std::string> out;
    for (const auto& x : u)
      out.push_back(x.substr(0, x.find(": ")));
    return out;
  };
  using v = std::vector<std::string>;
  std::vector<registration_state> items;
  std::string next;
  std::vector<std::string> unreadable;
  REQUIRE(!eng->query_registrations("grp-a", "", 5, items, next, unreadable));
  CHECK(items.size() == 5);
  CHECK(keys(unreadable) == v{"dev-02z"});
  REQUIRE(!next.empty());
  const std::string cont = next;
  REQUIRE(!eng->query_registrations("grp-a", cont, 5, items, next, unreadable));
  CHECK(items.size() == 5);
  CHECK(next.empty());
  // Met after the page was full, with no page after it: reported here.
  CHECK(keys(unreadable) == v{"dev-99"});
  // Another group's query has no item, but meets both.
  REQUIRE(!eng->query_registrations("grp-b", "", 5, items, next, unreadable));
  CHECK(items.empty());
  CHECK(keys(unreadable) == v{"dev-02z", "dev-99"});
  CHECK(unreadable[0].size() > std::string("dev-02z: ").size()); // says why
  eng->shutdown();
}

TEST_CASE("engine: registration query pages from the continuation, same results") {
  temp_dir dir;
  auto store = open_store(dir);
  // 40 records, every other one of the queried group, ids interleaved.
  storage::write_batch b;
  std::vector<std::string> expected;
  for (int i = 0; i < 40; ++i) {
    char id[32];
    std::snprintf(id, sizeof id, "Dev-%02d", i);
    registration_state rs;
    rs.registration_id = id;
    rs.status = registration_status::assigned;
    rs.enrollment_group_id = i % 2 == 0 ? "Grp-A" : "grp-b";
    b.put(storage::cf::registrations, enrollment::key_of(id), encode_record(rs));
    if (i % 2 == 0)
      expected.push_back(id);
  }
  REQUIRE(!store->write(b));
  std::unique_ptr<engine> eng;
  auto err = engine::start(options(store.get()), eng);
  REQUIRE_MESSAGE(!err, err.message);

  std::vector<std::string> seen;
  std::vector<std::size_t> sizes, visits;
  std::string cont;
  for (int page = 0; page < 10; ++page) {
    std::vector<registration_state> items;
    std::string next;
    store->visited = 0;
    std::vector<std::string> unreadable;
    auto qerr = eng->query_registrations("grp-a", cont, 6, items, next, unreadable);
    CHECK(unreadable.empty());
    REQUIRE_MESSAGE(!qerr, qerr.message);
    visits.push_back(store->visited.load());
    sizes.push_back(items.size());
    for (const auto& rs : items)
      seen.push_back(rs.registration_id);
    if (next.empty())
      break;
    cont = next;
  }
  CHECK(seen == expected); // id order, each once
  CHECK(sizes == std::vector<std::size_t>{6, 6, 6, 2});
  // Each page reads from its continuation on (not from the first record):
  // its own records, the other group's between them, and the record that
  // shows there is more.
  for (std::size_t i = 0; i + 1 < visits.size(); ++i)
    CHECK(visits[i] <= 14);
  CHECK(visits.back() <= 5);
  eng->shutdown();
}

TEST_CASE("engine: a policy that answers later, from another thread, assigns the device") {
  // The shape of the custom allocation webhook: the answer comes after
  // allocate() returned, on a thread of the policy's own. What it does
  // depends on the device: answer a linked hub, answer an unlinked one,
  // never answer (the stage's deadline fails it), or throw.
  struct later final : allocation::policy {
    mutable std::mutex mu;
    mutable std::vector<std::thread> threads;
    mutable std::atomic<int> calls{0};
    allocation_policy kind() const noexcept override { return allocation_policy::custom; }
    std::chrono::milliseconds deadline() const noexcept override {
      return std::chrono::milliseconds(300);
    }
    void allocate(const allocation::request& in, allocation::done_fn done) const override {
      ++calls;
      const std::string id(in.registration_id);
      if (id == "throws")
        throw std::runtime_error("the webhook client broke");
      if (id == "silent")
        return; // drops `done`
      std::string hub = id == "unlinked" ? "elsewhere.example.net" : in.candidates.back().hostname;
      std::lock_guard<std::mutex> g{mu};
      threads.emplace_back([done, hub] {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        (*done)({}, hub);
      });
    }
    void join() const {
      std::lock_guard<std::mutex> g{mu};
      for (auto& t : threads)
        t.join();
      threads.clear();
    }
  };
  temp_dir dir;
  auto store = open_store(dir);
  auto policy = std::make_shared<later>();
  auto opts = options(store.get());
  opts.cfg.hubs = {{"hub-a.example.net", 1, true, ""}, {"hub-b.example.net", 1, true, ""}};
  opts.policies.push_back(policy);
  std::unique_ptr<engine> eng;
  REQUIRE(!engine::start(std::move(opts), eng));
  auto outcome = [&](const std::string& id) {
    const std::string key = crypto::generate_key();
    REQUIRE(!put(*eng, enrollment::kind::individual, id,
                 R"({"allocationPolicy":"custom","customAllocationDefinition":)"
                 R"({"webhookUrl":"https://hooks.example.net/alloc","apiVersion":"2021-10-01"},)"
                 R"("attestation":{"type":"symmetricKey","symmetricKey":{"primaryKey":")"
                   + key + R"(","secondaryKey":")" + key + R"("}}})"));
    register_request req;
    req.id_scope = scope;
    req.registration_id = id;
    req.credential = credential_of_authorization(attestation::make_sas(
      std::string(scope) + "/registrations/" + id, key, now_ms() / 1000 + 3600, "registration"));
    std::promise<register_reply> replied;
    eng->register_device(req, [&replied](register_reply r) { replied.set_value(std::move(r)); });
    auto f = replied.get_future();
    REQUIRE(f.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
    auto reply = f.get();
    REQUIRE_MESSAGE(!reply.err, reply.err.message);
    registration_state st;
    for (int i = 0; i < 200; ++i) {
      REQUIRE(!eng->operation(id, reply.operation_id, st));
      if (is_terminal(st.status))
        break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return st;
  };
  auto ok = outcome("late-dev");
  CHECK(ok.status == registration_status::assigned);
  CHECK(ok.assigned_hub == "hub-b.example.net");
  // DPS assigns only linked hubs.
  auto unlinked = outcome("unlinked");
  CHECK(unlinked.status == registration_status::failed);
  CHECK(unlinked.error_code == static_cast<int32_t>(error_code::no_hub_available));
  CHECK(unlinked.error_message.find("elsewhere.example.net") != std::string::npos);
  // No answer: failed at the policy's deadline, not stuck.
  auto silent = outcome("silent");
  CHECK(silent.status == registration_status::failed);
  CHECK(silent.error_message.find("did not answer within 300 ms") != std::string::npos);
  // A throwing policy fails the device, and the stage goes on.
  auto threw = outcome("throws");
  CHECK(threw.status == registration_status::failed);
  CHECK(threw.error_message.find("the webhook client broke") != std::string::npos);
  CHECK(outcome("late-dev-2").status == registration_status::assigned);
  CHECK(policy->calls.load() == 5);
  policy->join();
  eng->shutdown();
}

} // TEST_SUITE

namespace {

// swtpm-made (tests/actors/tpm2_test.cpp).
const std::string tpm_ek_b64 =
  "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAxmrFUdoY1MPm0Rpo"
  "gThkG6Geb31LV3sxI0bjsO3+nwsjfyRhcz55/JkJYdTg0wW5/X/00itnngirrF3G9IpUsjm0goeY5awie0Dmvb4xD5ajTzGc"
  "nTrQqbbHqG1DucxbBdPVZYu1fZKVDLIoDpPxbwFnFpdmId4zkHz55Ko78OLDfq3RzNDLBwsvo1wEhTHdOhbTknLVPrw1ghAe"
  "efgQoVKhznEzCjb8MpsqXkx4p9cbZlfb9+3RoRrkyfvQaORvYqBk1JbkmE2GulFUH6Fs5FPfqqZu4BTjDIxSYndinkM+LKgT"
  "WsM0GvUilF2zn/FoWypQ+UmW/z0dRuEEJsQzIQ==";
const std::string tpm_srk_b64 =
  "ARoAAQALAAMAcgAAAAYAgABDABAIAAAAAAABAKQjHxCYhlmqe1ls9pMO/i/PLRKXwRRa+nirOm5Yb9ccnLyzLjcdTC/sebI+"
  "SMCqYmBAAgQlbZIzHhI3o3chdbmX5Fs5BgPQwD2jfOAWstGsTLS85E830vBjQh/YwF5mFunfuLlPldt5di0JD7DBde63n2Ko"
  "qkHsV1RpOSKWl9AvfYHG3tCuXGpezy/WYvP2LHbguaASbx7vtCI7HG5ZAloo6y/n7YXCHLaxNVHCQp6CwuoyXodygihQVRIE"
  "doYRy5fb/mABBYhKodvZsmjKCp0pYJQLadYHgfZgOtY16DW4+Zhb9GiCaAC/awtGhFG/O/A6HmH9sifnmZAguL/yrFU=";

} // namespace

TEST_CASE("engine: TPM registers run off the caller's thread; challenges are not fsync'd") {
  temp_dir dir;
  auto store = open_store(dir);
  auto opts = options(store.get());
  opts.cfg.hubs = {{"hub-a.example.net", 1, true, ""}};
  std::unique_ptr<engine> eng;
  REQUIRE(!engine::start(std::move(opts), eng));
  const std::string id = "tpm-engine";
  REQUIRE(!put(*eng, enrollment::kind::individual, id,
               R"({"attestation":{"type":"tpm","tpm":{"endorsementKey":")" + tpm_ek_b64
                 + R"("}}})"));
  const auto caller = std::this_thread::get_id();
  struct answered {
    register_reply reply;
    std::thread::id thread;
  };
  auto call = [&](device_credential cred) {
    register_request req;
    req.id_scope = scope;
    req.registration_id = id;
    req.credential = std::move(cred);
    std::promise<answered> replied;
    eng->register_device(req, [&replied](register_reply r) {
      replied.set_value({std::move(r), std::this_thread::get_id()});
    });
    auto f = replied.get_future();
    REQUIRE(f.wait_for(std::chrono::seconds(20)) == std::future_status::ready);
    return f.get();
  };
  // 1. The challenge: issued on the TPM worker, not on the caller's (a
  //    gateway I/O thread's) thread, and its write is not synced.
  auto c = call(tpm_credential{tpm_ek_b64, tpm_srk_b64, ""});
  CHECK(c.reply.err.code == error_code::unauthorized);
  CHECK_FALSE(c.reply.challenge.empty());
  CHECK(c.thread != caller);
  {
    std::lock_guard<std::mutex> g{store->tpm_mu};
    REQUIRE(store->tpm_writes.size() == 1);
    CHECK(store->tpm_writes[0].d == storage::store::durability::replayable);
    CHECK(store->tpm_writes[0].thread != caller);
  }
  // The key, as the TPM would import it (read from the pending slot).
  std::optional<std::string> raw;
  REQUIRE(!store->get(storage::cf::tpm_challenges, id + "/pending", raw));
  REQUIRE(raw);
  attestation::tpm_challenge ch;
  REQUIRE(attestation::decode_challenge(*raw, ch));
  const auto sas = attestation::make_sas(std::string(scope) + "/registrations/" + id,
                                         crypto::base64_encode(ch.key),
                                         now_ms() / 1000 + 3600, "registration");
  // 2. The answer with only the SAS (no tpm body): found to be TPM after the
  //    enrollment read, handed to the worker too; accepted.
  auto a = call(credential_of_authorization(sas));
  CHECK_MESSAGE(!a.reply.err, a.reply.err.message);
  CHECK(a.thread != caller);
  {
    std::lock_guard<std::mutex> g{store->tpm_mu};
    REQUIRE(store->tpm_writes.size() == 2);
    CHECK(store->tpm_writes[1].d == storage::store::durability::replayable);
    CHECK(store->tpm_writes[1].thread != caller);
  }
  // Its polls authenticate with it (synchronously: a point read).
  register_request poll;
  poll.id_scope = scope;
  poll.registration_id = id;
  poll.credential = credential_of_authorization(sas);
  auto err = eng->authenticate_device(poll);
  CHECK_MESSAGE(!err, err.message);
  // The result's key, made on the worker too (the gateway asks from the
  // registration stage's thread).
  std::promise<std::pair<error, std::thread::id>> keyed;
  std::string key;
  eng->tpm_authentication_key(id, a.reply.operation_id, [&](error e, std::string k) {
    key = std::move(k);
    keyed.set_value({std::move(e), std::this_thread::get_id()});
  });
  auto kf = keyed.get_future();
  REQUIRE(kf.wait_for(std::chrono::seconds(20)) == std::future_status::ready);
  auto [kerr, kthread] = kf.get();
  CHECK_MESSAGE(!kerr, kerr.message);
  CHECK(kthread != caller);
  CHECK(crypto::base64_decode(key).value_or("").size() > 500); // an activation blob
  // 3. Someone else asks for a challenge with the (public) EK: the answered
  //    one stays, so polls and the result's key keep working.
  auto again = call(tpm_credential{tpm_ek_b64, tpm_srk_b64, ""});
  CHECK(again.reply.err.code == error_code::unauthorized);
  err = eng->authenticate_device(poll);
  CHECK_MESSAGE(!err, err.message);
  std::string key2;
  err = eng->tpm_authentication_key(id, a.reply.operation_id, key2);
  CHECK_MESSAGE(!err, err.message);
  CHECK_FALSE(key2.empty());
  eng->shutdown();
}
