// The TPM mechanism (actors/attestation/tpm.*) over an in-memory challenge
// store: the challenge, its answer, and every refusal, with a clock the
// test sets. The TPM side itself is proven in tests/integration/tpm_test.cpp.

#include <doctest/doctest.h>

#include <functional>
#include <map>
#include <utility>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "actors/attestation/sas_token.hpp"
#include "actors/attestation/tpm.hpp"
#include "actors/attestation/tpm2.hpp"
#include "messages/crypto.hpp"

using namespace prov;
using namespace prov::attestation;
namespace en = prov::enrollment;

namespace {

// swtpm-made (see tpm2_test.cpp).
const std::string ek_b64 =
  "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAxmrFUdoY1MPm0Rpo"
  "gThkG6Geb31LV3sxI0bjsO3+nwsjfyRhcz55/JkJYdTg0wW5/X/00itnngirrF3G9IpUsjm0goeY5awie0Dmvb4xD5ajTzGc"
  "nTrQqbbHqG1DucxbBdPVZYu1fZKVDLIoDpPxbwFnFpdmId4zkHz55Ko78OLDfq3RzNDLBwsvo1wEhTHdOhbTknLVPrw1ghAe"
  "efgQoVKhznEzCjb8MpsqXkx4p9cbZlfb9+3RoRrkyfvQaORvYqBk1JbkmE2GulFUH6Fs5FPfqqZu4BTjDIxSYndinkM+LKgT"
  "WsM0GvUilF2zn/FoWypQ+UmW/z0dRuEEJsQzIQ==";
const std::string srk_b64 =
  "ARoAAQALAAMAcgAAAAYAgABDABAIAAAAAAABAKQjHxCYhlmqe1ls9pMO/i/PLRKXwRRa+nirOm5Yb9ccnLyzLjcdTC/sebI+"
  "SMCqYmBAAgQlbZIzHhI3o3chdbmX5Fs5BgPQwD2jfOAWstGsTLS85E830vBjQh/YwF5mFunfuLlPldt5di0JD7DBde63n2Ko"
  "qkHsV1RpOSKWl9AvfYHG3tCuXGpezy/WYvP2LHbguaASbx7vtCI7HG5ZAloo6y/n7YXCHLaxNVHCQp6CwuoyXodygihQVRIE"
  "doYRy5fb/mABBYhKodvZsmjKCp0pYJQLadYHgfZgOtY16DW4+Zhb9GiCaAC/awtGhFG/O/A6HmH9sifnmZAguL/yrFU=";
const std::string scope = "0ne00ABC123";
const std::string reg = "tpm-unit";
constexpr int64_t t0 = 1'700'000'000;
constexpr int64_t ttl = 300;

class memory_store final : public challenge_store {
public:
  error load(std::string_view id, tpm_slots& out) const override {
    out = tpm_slots{};
    auto it = map.find(std::string(id));
    if (it != map.end())
      out = it->second;
    if (after_load) // once: what a concurrent request does in between
      std::exchange(after_load, nullptr)();
    return {};
  }
  error issue(std::string_view id, std::string_view etag, const tpm_challenge& c,
              challenge_write& out) const override {
    out = challenge_write::enrollment_changed;
    if (etag != enrollment_etag)
      return {};
    map[std::string(id)].pending = c;
    out = challenge_write::written;
    return {};
  }
  error promote(std::string_view id, std::string_view etag, std::string_view verified_key,
                challenge_write& out) const override {
    out = challenge_write::enrollment_changed;
    if (etag != enrollment_etag)
      return {};
    out = challenge_write::challenge_changed;
    auto& s = map[std::string(id)];
    if (!s.pending || !crypto::equal_constant_time(s.pending->key, verified_key))
      return {};
    s.answered = std::move(s.pending);
    s.answered->answered = true;
    s.pending.reset();
    out = challenge_write::written;
    return {};
  }
  const tpm_slots& slots(const std::string& id = reg) const { return map.at(id); }
  /// The pending challenge, else the answered one.
  tpm_challenge get(const std::string& id = reg) const {
    const auto& s = map.at(id);
    REQUIRE((s.pending || s.answered));
    return s.pending ? *s.pending : *s.answered;
  }
  mutable std::map<std::string, tpm_slots> map;
  mutable std::function<void()> after_load;
  /// The etag the "stored" enrollment has now (writes compare against it).
  std::string enrollment_etag = "\"e1\"";
};

request_facts facts(int64_t now, bool registering = true) {
  request_facts f;
  f.id_scope = scope;
  f.registration_id = reg;
  f.now_s = now;
  f.registering = registering;
  return f;
}

en::enrollment_view enrolled(const std::string& ek = ek_b64) {
  en::enrollment_view v;
  v.id = reg;
  v.attestation = en::tpm_attestation{ek, {}};
  v.etag = "\"e1\"";
  return v;
}

verdict run(const tpm& m, const tpm_credential& c, int64_t now, bool registering = true,
            const en::enrollment_view& v = enrolled()) {
  std::unique_ptr<proof> p;
  auto err = m.open(c, facts(now, registering), p);
  REQUIRE_MESSAGE(err.ok(), err.message);
  return p->check_individual(v);
}

tpm_credential first() { return {ek_b64, srk_b64, ""}; }

tpm_credential answer(const std::string& key, int64_t now) {
  return {ek_b64, srk_b64,
          make_sas(scope + "/registrations/" + reg, crypto::base64_encode(key), now + 3600,
                   "registration")};
}

void check_refused(const verdict& v, const std::string& text) {
  CHECK(v.result == verdict::outcome::rejected);
  CHECK(v.err.code == error_code::unauthorized_signature);
  CHECK_MESSAGE(v.err.message.find(text) != std::string::npos, v.err.message);
}

} // namespace

TEST_CASE("tpm mechanism: challenge, answer, replay, polls") {
  memory_store store;
  tpm m(store, ttl, 3600 * 24, 300);
  CHECK(m.reads(tpm_credential{}));
  CHECK_FALSE(m.reads(sas_credential{}));

  auto c = run(m, first(), t0);
  REQUIRE(c.result == verdict::outcome::challenge);
  CHECK(c.err.status() == 401);
  auto body = nlohmann::json::parse(c.challenge);
  CHECK(body["keyName"] == "registration");
  CHECK_FALSE(body.contains("status"));
  auto blob = crypto::base64_decode(body["authenticationKey"].get<std::string>());
  REQUIRE(blob);
  const auto saved = store.get();
  CHECK(saved.key.size() == 32);
  CHECK(saved.expires_s == t0 + ttl);
  CHECK_FALSE(saved.answered);
  const auto d = crypto::sha256(*crypto::base64_decode(ek_b64));
  CHECK(saved.ek_digest == std::string(reinterpret_cast<const char*>(d.data()), 32));

  // A poll before any register answered it: refused.
  check_refused(run(m, answer(saved.key, t0), t0 + 1, false), "not been answered");
  // Answered: accepted once, then a replay.
  auto ok = run(m, answer(saved.key, t0), t0 + 10);
  CHECK(ok.is_accepted());
  CHECK(ok.type == attestation_type::tpm);
  CHECK(store.get().answered);
  CHECK_FALSE(store.slots().pending);
  check_refused(run(m, answer(saved.key, t0), t0 + 11), "already answered (a replay)");
  // Polls keep working after the challenge's expiry (the token bounds them).
  CHECK(run(m, answer(saved.key, t0), t0 + ttl + 100, false).is_accepted());
  // Wrong key.
  check_refused(run(m, answer(crypto::random_bytes(32), t0), t0 + 12, false),
                "signature mismatch");
}

TEST_CASE("tpm mechanism: expiry, another EK, no challenge, groups") {
  memory_store store;
  tpm m(store, ttl, 3600 * 24, 300);
  REQUIRE(run(m, first(), t0).result == verdict::outcome::challenge);
  const auto key = store.get().key;
  check_refused(run(m, answer(key, t0 + ttl + 1), t0 + ttl + 1), "the TPM challenge expired 1 s ago");
  CHECK(run(m, answer(key, t0 + ttl), t0 + ttl).is_accepted()); // the last second still counts

  // The enrollment names another EK (the SRK is a valid RSA storage key too).
  check_refused(run(m, first(), t0, true, enrolled(srk_b64)), "not the one enrolled");
  // The enrollment's EK changed after the challenge: its answer is refused.
  REQUIRE(run(m, first(), t0).result == verdict::outcome::challenge);
  tpm_credential sas_only{"", "", answer(store.get().key, t0).sas_token};
  check_refused(run(m, sas_only, t0 + 1, true, enrolled(srk_b64)), "another endorsement key");
  // No challenge stored.
  store.map.clear();
  check_refused(run(m, sas_only, t0 + 1, false), "no TPM challenge is outstanding");
  check_refused(run(m, sas_only, t0 + 1), "no TPM challenge is outstanding");
  // TPM is individual-only.
  std::unique_ptr<proof> p;
  REQUIRE(m.open(first(), facts(t0), p).ok());
  check_refused(p->check_groups({}), "no individual enrollment");
  // A status lookup without a SAS issues nothing.
  check_refused(run(m, first(), t0, false), "carry the SAS");
  CHECK(store.map.empty());
}

TEST_CASE("tpm mechanism: malformed keys are 400s; the stored record round-trips") {
  memory_store store;
  tpm m(store, ttl, 3600 * 24, 300);
  std::unique_ptr<proof> p;
  auto ek = *crypto::base64_decode(ek_b64);
  auto open = [&](tpm_credential c) { return m.open(c, facts(t0), p); };
  CHECK(open({"%%", srk_b64, ""}).message == "tpm.endorsementKey must be base64");
  CHECK(open({crypto::base64_encode(ek.substr(0, 40)), srk_b64, ""}).code
        == error_code::bad_request);
  CHECK(open({ek_b64, crypto::base64_encode(ek + "x"), ""}).message.find("tpm.storageRootKey")
        == 0);
  CHECK(open({"", "", ""}).message.find("tpm.endorsementKey is required") == 0);
  // Without an SRK in the request or the enrollment: a 400 saying so.
  REQUIRE(open({ek_b64, "", ""}).ok());
  auto v = p->check_individual(enrolled());
  CHECK(v.err.code == error_code::bad_request);
  CHECK(v.err.message.find("tpm.storageRootKey is required") == 0);
  CHECK(store.map.empty());

  tpm_challenge c;
  c.ek_digest = std::string(32, 'e');
  c.key = std::string(32, 'k');
  c.issued_s = t0;
  c.expires_s = t0 + 5;
  c.answered = true;
  tpm_challenge back;
  const auto bytes = encode_challenge(c);
  REQUIRE(decode_challenge(bytes, back));
  CHECK(back.ek_digest == c.ek_digest);
  CHECK(back.key == c.key);
  CHECK(back.issued_s == t0);
  CHECK(back.expires_s == t0 + 5);
  CHECK(back.answered);
  for (std::size_t n = 0; n < bytes.size(); ++n)
    CHECK_FALSE(decode_challenge(bytes.substr(0, n), back));
  CHECK_FALSE(decode_challenge(bytes + "x", back));
}

TEST_CASE("tpm mechanism: the result's hub key is one per operation, in a fresh blob") {
  memory_store store;
  tpm m(store, ttl, 3600 * 24, 300);
  REQUIRE(run(m, first(), t0).result == verdict::outcome::challenge);
  const auto c = store.get();
  CHECK(c.srk == *crypto::base64_decode(srk_b64)); // kept for the result's blob
  CHECK(hub_key(c, "op-1") == hub_key(c, "op-1"));
  CHECK(hub_key(c, "op-1") != hub_key(c, "op-2"));
  CHECK(hub_key(c, "op-1") != c.key);
  CHECK(hub_key(c, "op-1").size() == 32);
  std::string why;
  const auto ek = *crypto::base64_decode(ek_b64);
  const auto a = result_authentication_key(c, ek, "op-1", why);
  const auto b = result_authentication_key(c, ek, "op-1", why);
  REQUIRE_MESSAGE(!a.empty(), why);
  CHECK(a != b); // fresh seeds every time; tpm_test.cpp shows both import the same key
  tpm_challenge no_srk = c;
  no_srk.srk.clear();
  CHECK(result_authentication_key(no_srk, ek, "op-1", why).empty());
  CHECK(why.find("storageRootKey") != std::string::npos);
}

TEST_CASE("tpm mechanism: a register without Authorization leaves the answered challenge alone") {
  memory_store store;
  tpm m(store, ttl, 3600 * 24, 300);
  REQUIRE(run(m, first(), t0).result == verdict::outcome::challenge);
  const auto a = store.get().key;
  REQUIRE(run(m, answer(a, t0), t0 + 1).is_accepted());
  // Anyone knowing the id and the (public) EK asks for a new challenge.
  REQUIRE(run(m, first(), t0 + 2).result == verdict::outcome::challenge);
  REQUIRE(store.slots().pending);
  REQUIRE(store.slots().answered);
  const auto b = store.slots().pending->key;
  CHECK(b != a);
  CHECK(store.slots().answered->key == a);
  // The device's polls and status lookups still verify with its key...
  CHECK(run(m, answer(a, t0), t0 + 3, false).is_accepted());
  // ...its old answer is still a replay, not a mismatch...
  check_refused(run(m, answer(a, t0), t0 + 4), "already answered (a replay)");
  // ...and the new challenge's key is not good for polls until answered.
  check_refused(run(m, answer(b, t0), t0 + 5, false), "not been answered by a register yet");
  // Answering the new one replaces the answered one.
  REQUIRE(run(m, answer(b, t0 + 2), t0 + 6).is_accepted());
  CHECK(store.slots().answered->key == b);
  CHECK_FALSE(store.slots().pending);
  check_refused(run(m, answer(a, t0), t0 + 7, false), "signature mismatch");
}

TEST_CASE("tpm mechanism: an answer marks only the challenge it verified (compare-and-set)") {
  memory_store store;
  tpm m(store, ttl, 3600 * 24, 300);
  REQUIRE(run(m, first(), t0).result == verdict::outcome::challenge);
  const auto a = store.get().key;
  // Between the answer's load and its mark, another register replaces the
  // pending challenge with B.
  std::string b;
  store.after_load = [&] {
    REQUIRE(run(m, first(), t0 + 1).result == verdict::outcome::challenge);
    b = store.slots().pending->key;
  };
  check_refused(run(m, answer(a, t0), t0 + 2), "answered or replaced by a concurrent register");
  REQUIRE_FALSE(b.empty());
  // B is still pending, unanswered; nothing was marked.
  REQUIRE(store.slots().pending);
  CHECK(store.slots().pending->key == b);
  CHECK_FALSE(store.slots().pending->answered);
  CHECK_FALSE(store.slots().answered);
  // B's own answer works.
  CHECK(run(m, answer(b, t0 + 1), t0 + 3).is_accepted());
}

TEST_CASE("tpm mechanism: no challenge write once the enrollment was deleted or replaced") {
  memory_store store;
  tpm m(store, ttl, 3600 * 24, 300);
  // The enrollment was replaced (a delete and a create, or an update)
  // after this register read it: the challenge is not stored, no blob.
  store.enrollment_etag = "\"e2\"";
  auto v = run(m, first(), t0);
  check_refused(v, "deleted or replaced while this TPM register was in flight");
  CHECK(v.challenge.empty());
  CHECK(store.map.empty());
  // Issued against the current one, then replaced before the answer: the
  // answer is refused and the challenge stays pending (not answered).
  store.enrollment_etag = "\"e1\"";
  REQUIRE(run(m, first(), t0).result == verdict::outcome::challenge);
  const auto a = store.get().key;
  store.enrollment_etag = "\"e3\"";
  check_refused(run(m, answer(a, t0), t0 + 1),
                "deleted or replaced while this TPM register was in flight");
  CHECK(store.slots().pending);
  CHECK_FALSE(store.slots().answered);
}
