// A TPM device's inputs (azure-dps-protocol.md §2.6), all from the network:
// the bytes as a TPM2B_PUBLIC (an EK or SRK after base64), as a stored
// challenge record (dps.enrollments carries them between gateways), and as
// a register body: `parse_json_body`, the `tpm` member (`read_tpm_member`,
// as the device API reads it), the mechanism's `open` and `check_individual`
// against an individual enrollment of the body's EK, over an in-memory
// challenge store. When that issues a challenge, the harness answers it the
// way the TPM would (a SAS signed with the issued key): the answer must be
// accepted once, a replay refused, and the result's activation blob built.

#include <map>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "actors/attestation/sas_token.hpp"
#include "actors/attestation/tpm.hpp"
#include "actors/attestation/tpm2.hpp"
#include "messages/crypto.hpp"
#include "messages/json_body.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace at = prov::attestation;
namespace en = prov::enrollment;
namespace crypto = prov::crypto;

namespace {

constexpr int64_t now_s = 1'700'000'000;
const std::string scope = "0ne00000001";
const std::string etag = "\"e1\"";

class memory_store final : public at::challenge_store {
public:
  prov::error load(std::string_view id, at::tpm_slots& out) const override {
    out = at::tpm_slots{};
    if (auto it = map.find(std::string(id)); it != map.end())
      out = it->second;
    return {};
  }
  prov::error issue(std::string_view id, std::string_view e, const at::tpm_challenge& c,
                    at::challenge_write& out) const override {
    out = e == etag ? at::challenge_write::written : at::challenge_write::enrollment_changed;
    if (out == at::challenge_write::written)
      map[std::string(id)].pending = c;
    return {};
  }
  prov::error promote(std::string_view id, std::string_view e, std::string_view key,
                      at::challenge_write& out) const override {
    out = at::challenge_write::enrollment_changed;
    if (e != etag)
      return {};
    out = at::challenge_write::challenge_changed;
    auto& s = map[std::string(id)];
    if (!s.pending || !crypto::equal_constant_time(s.pending->key, key))
      return {};
    s.answered = std::move(s.pending);
    s.answered->answered = true;
    s.pending.reset();
    out = at::challenge_write::written;
    return {};
  }
  mutable std::map<std::string, at::tpm_slots> map;
};

at::verdict run(const at::tpm& m, const prov::tpm_credential& cred, const std::string& id,
                const en::enrollment_view& v, bool registering, bool& opened) {
  at::request_facts f;
  f.id_scope = scope;
  f.registration_id = id;
  f.now_s = now_s;
  f.registering = registering;
  std::unique_ptr<at::proof> p;
  opened = !m.open(cred, f, p);
  if (!opened)
    return {};
  PROV_FUZZ_CHECK(p != nullptr);
  return p->check_individual(v);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto in = prov::fuzz::text_of(data, size);

  // 1. A TPM2B_PUBLIC, as the EK and SRK arrive after base64.
  prov::tpm2::rsa_public pub;
  if (prov::tpm2::parse_rsa_public(in, "fuzz key", pub).empty()) {
    PROV_FUZZ_CHECK(pub.modulus.size() * 8 == pub.key_bits);
    PROV_FUZZ_CHECK(pub.name().size() == 2 + 32);
    PROV_FUZZ_CHECK(!prov::tpm2::registration_id_of(in).empty());
  }

  // 2. A challenge record: what decodes encodes to the same bytes.
  at::tpm_challenge stored;
  if (at::decode_challenge(in, stored))
    PROV_FUZZ_CHECK(at::encode_challenge(stored) == in);

  // 3. A register body.
  nlohmann::json body;
  if (prov::parse_json_body(in, body) || !body.is_object())
    return 0;
  auto t = body.find("tpm");
  if (t == body.end() || t->is_null())
    return 0;
  prov::tpm_credential cred;
  if (at::read_tpm_member(*t, cred))
    return 0;
  // The device API checks the path's registration id before this (and the
  // body's must equal it): a fixed valid one.
  const std::string id = "fuzz-device";
  memory_store store;
  at::tpm mech(store, 300, 86400, 300);
  en::enrollment_view v;
  v.id = id;
  v.etag = etag;
  v.attestation = en::tpm_attestation{cred.endorsement_key, {}};
  bool opened = false;
  auto first = run(mech, cred, id, v, true, opened);
  if (!opened || first.result != at::verdict::outcome::challenge)
    return 0;

  // A challenge: stored before it is shown, its body JSON with a blob.
  auto it = store.map.find(id);
  PROV_FUZZ_CHECK(it != store.map.end() && it->second.pending);
  const at::tpm_challenge issued = *it->second.pending;
  PROV_FUZZ_CHECK(issued.key.size() == 32);
  at::tpm_challenge again;
  PROV_FUZZ_CHECK(at::decode_challenge(at::encode_challenge(issued), again));
  auto shown = nlohmann::json::parse(first.challenge, nullptr, false);
  PROV_FUZZ_CHECK(shown.is_object() && shown["authenticationKey"].is_string());
  PROV_FUZZ_CHECK(crypto::base64_decode(shown["authenticationKey"].get<std::string>()).has_value());

  // The TPM's answer: a SAS signed with the issued key, accepted once.
  cred.sas_token = at::make_sas(scope + "/registrations/" + id,
                                               crypto::base64_encode(issued.key),
                                               now_s + 3600, "registration");
  auto answer = run(mech, cred, id, v, true, opened);
  PROV_FUZZ_CHECK(opened);
  PROV_FUZZ_CHECK(answer.is_accepted());
  auto replay = run(mech, cred, id, v, true, opened);
  PROV_FUZZ_CHECK(opened && !replay.is_accepted());
  auto poll = run(mech, cred, id, v, false, opened);
  PROV_FUZZ_CHECK(opened && poll.is_accepted());
  std::string why;
  const auto ek = crypto::base64_decode(cred.endorsement_key).value_or(std::string());
  PROV_FUZZ_CHECK(!at::result_authentication_key(issued, ek, "op-1", why).empty());
  return 0;
}
