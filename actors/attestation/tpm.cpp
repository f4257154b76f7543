#include "actors/attestation/tpm.hpp"

#include <openssl/crypto.h>

#include <nlohmann/json.hpp>

#include "actors/attestation/sas_token.hpp"
#include "actors/attestation/tpm2.hpp"
#include "messages/crypto.hpp"
#include "messages/json_text.hpp"

namespace prov::attestation {

namespace {

constexpr uint8_t challenge_format = 1;

void put_i64(std::string& out, int64_t v) {
  tpm2::put_u32(out, static_cast<uint32_t>(static_cast<uint64_t>(v) >> 32));
  tpm2::put_u32(out, static_cast<uint32_t>(static_cast<uint64_t>(v) & 0xffffffffu));
}

int64_t get_i64(std::string_view b) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i)
    v = (v << 8) | static_cast<uint8_t>(b[static_cast<std::size_t>(i)]);
  return static_cast<int64_t>(v);
}

std::string digest_of(std::string_view bytes) {
  const auto d = crypto::sha256(bytes);
  return std::string(reinterpret_cast<const char*>(d.data()), d.size());
}

/// A challenge write that lost to an enrollment delete or replacement.
constexpr const char* enrollment_moved =
  "the individual enrollment for this registration id was deleted or replaced while this "
  "TPM register was in flight: register without Authorization again";

verdict refused(std::string message) {
  return verdict::rejected(error_code::unauthorized_signature, std::move(message));
}

class tpm_proof final : public proof {
public:
  tpm_proof(const challenge_store& store, const request_facts& facts, int64_t ttl_s)
    : store_(store), registration_id_(facts.registration_id), now_s_(facts.now_s),
      registering_(facts.registering), ttl_s_(ttl_s) {}

  std::string ek;        ///< the EK's TPM2B bytes the device sent; "" when none
  std::string srk;       ///< the SRK's TPM2B bytes the device sent; "" when none
  std::optional<sas_token> sas; ///< the answer to a challenge

  verdict check_individual(const enrollment::enrollment_view& v) const override {
    const auto& att = std::get<enrollment::tpm_attestation>(v.attestation);
    auto enrolled = crypto::base64_decode(att.endorsement_key);
    if (!enrolled)
      return verdict::rejected(error_code::storage_failure,
                               "the stored enrollment's endorsement key is not base64");
    if (!ek.empty() && !crypto::equal_constant_time(ek, *enrolled))
      return refused("the endorsement key is not the one enrolled for this registration id");
    if (!sas && !registering_)
      return refused("a TPM device's polls and status lookups carry the SAS signed with its "
                     "challenge's key");
    if (!sas)
      return issue(v, *enrolled, att.storage_root_key);
    return answer(v, digest_of(*enrolled));
  }

  verdict check_groups(const std::vector<enrollment::enrollment_view>&) const override {
    return refused("no individual enrollment for this registration id: TPM attestation "
                   "needs one (enrollment groups cannot use TPM)");
  }

  // Never cached: a register consumes the challenge, so the next one must
  // reach check_individual.
  std::string_view identity() const noexcept override { return {}; }
  int64_t valid_until() const noexcept override { return 0; }

private:
  verdict issue(const enrollment::enrollment_view& v, const std::string& ek_bytes,
                const std::string& enrolled_srk_b64) const {
    std::string srk_bytes = srk;
    if (srk_bytes.empty() && !enrolled_srk_b64.empty())
      srk_bytes = crypto::base64_decode(enrolled_srk_b64).value_or(std::string());
    if (srk_bytes.empty())
      return verdict::rejected(error_code::bad_request,
                               "tpm.storageRootKey is required: the challenge's key is "
                               "imported under the TPM's storage root key");
    tpm2::rsa_public ek_pub, srk_pub;
    if (auto why = tpm2::parse_rsa_public(ek_bytes, "the enrolled endorsementKey", ek_pub);
        !why.empty())
      return verdict::rejected(error_code::storage_failure, why);
    if (auto why = tpm2::parse_rsa_public(srk_bytes, "tpm.storageRootKey", srk_pub); !why.empty())
      return verdict::rejected(error_code::bad_request, why);
    tpm_challenge c;
    c.ek_digest = digest_of(ek_bytes);
    c.key = crypto::random_bytes(32);
    c.srk = srk_bytes;
    c.issued_s = now_s_;
    c.expires_s = now_s_ + ttl_s_;
    std::string why;
    const std::string blob = tpm2::activation_blob(ek_pub, srk_pub, c.key, why);
    if (blob.empty())
      return verdict::rejected(error_code::bad_request, why);
    // Saved before the device can see it: an answer always finds its state.
    challenge_write w = challenge_write::written;
    auto err = store_.issue(registration_id_, v.etag, c, w);
    OPENSSL_cleanse(c.key.data(), c.key.size());
    if (err)
      return verdict::rejected(error_code::storage_failure, std::move(err.message));
    if (w != challenge_write::written)
      return refused(enrollment_moved);
    verdict r;
    r.result = verdict::outcome::challenge;
    r.type = attestation_type::tpm;
    r.enabled = v.enabled;
    r.err = error{error_code::unauthorized,
                  "TPM challenge: activate the credential, import the key, and register "
                  "again with a SAS signed by it"};
    // The 401's body (no `status` member: the C SDK reads that as "challenge").
    std::string body = "{\"authenticationKey\":";
    json_text::append_string(body, crypto::base64_encode(blob));
    body += ",\"keyName\":\"registration\",\"message\":";
    json_text::append_string(body, r.err.message);
    body += "}";
    r.challenge = std::move(body);
    return r;
  }

  verdict answer(const enrollment::enrollment_view& v, const std::string& ek_digest) const {
    tpm_slots s;
    if (auto err = store_.load(registration_id_, s))
      return verdict::rejected(error_code::storage_failure, std::move(err.message));
    verdict r = answer(v, ek_digest, s);
    s.cleanse();
    return r;
  }

  verdict answer(const enrollment::enrollment_view& v, const std::string& ek_digest,
                 const tpm_slots& s) const {
    if (s.empty())
      return refused("no TPM challenge is outstanding for this registration id: register "
                     "without Authorization first");
    // A register answers the pending challenge; polls and status lookups
    // follow the answered one. The other slot only words the refusal.
    const auto& mine = registering_ ? s.pending : s.answered;
    const auto& other = registering_ ? s.answered : s.pending;
    bool other_ek = false;
    auto signed_with = [&](const std::optional<tpm_challenge>& c) {
      if (!c)
        return false;
      if (!crypto::equal_constant_time(c->ek_digest, ek_digest)) {
        other_ek = true;
        return false;
      }
      return signature_matches_raw(*sas, c->key);
    };
    if (!signed_with(mine)) {
      if (signed_with(other))
        return refused(registering_
                         ? "the TPM challenge was already answered (a replay): register "
                           "without Authorization for a new one"
                         : "the TPM challenge has not been answered by a register yet");
      if (other_ek)
        return refused("the TPM challenge was made for another endorsement key: register "
                       "without Authorization for a new one");
      return refused("signature mismatch: the token is not signed with the key of this "
                     "registration id's TPM challenge");
    }
    if (registering_) {
      // Polls and status lookups of the registration it started may follow
      // after the challenge's expiry (the token's own expiry bounds them).
      if (now_s_ > mine->expires_s)
        return refused("the TPM challenge expired " + std::to_string(now_s_ - mine->expires_s)
                       + " s ago: register without Authorization for a new one");
      // Compare-and-set: only the challenge whose key was just verified is
      // marked answered. Another register may have replaced it (a new
      // challenge) or answered it since it was loaded.
      challenge_write w = challenge_write::written;
      if (auto err = store_.promote(registration_id_, v.etag, mine->key, w))
        return verdict::rejected(error_code::storage_failure, std::move(err.message));
      if (w == challenge_write::enrollment_changed)
        return refused(enrollment_moved);
      if (w != challenge_write::written)
        return refused("the TPM challenge was answered or replaced by a concurrent register: "
                       "register without Authorization for a new one");
    }
    return verdict::accepted(attestation_type::tpm, v.enabled);
  }

  const challenge_store& store_;
  std::string registration_id_;
  int64_t now_s_;
  bool registering_;
  int64_t ttl_s_;
};

} // namespace

error read_tpm_member(const nlohmann::json& tpm, tpm_credential& out) {
  if (!tpm.is_object())
    return {error_code::bad_request, "tpm must be a JSON object"};
  for (auto [name, field] : {std::pair{"endorsementKey", &out.endorsement_key},
                             std::pair{"storageRootKey", &out.storage_root_key}}) {
    auto k = tpm.find(name);
    if (k == tpm.end() || k->is_null())
      continue;
    if (!k->is_string())
      return {error_code::bad_request, std::string("tpm.") + name + " must be a string"};
    *field = k->get<std::string>();
  }
  return {};
}

std::string encode_challenge(const tpm_challenge& c) {
  std::string out;
  out.push_back(static_cast<char>(challenge_format));
  out.push_back(c.answered ? 1 : 0);
  put_i64(out, c.issued_s);
  put_i64(out, c.expires_s);
  tpm2::put_2b(out, c.ek_digest);
  tpm2::put_2b(out, c.key);
  tpm2::put_2b(out, c.srk);
  return out;
}

void tpm_slots::cleanse() noexcept {
  for (auto* c : {&pending, &answered})
    if (*c)
      OPENSSL_cleanse((*c)->key.data(), (*c)->key.size());
}

verdict tpm_refused_on_kafka(std::string_view registration_id) {
  return verdict::rejected(
    error_code::unauthorized_signature,
    "registration '" + std::string(registration_id)
      + "' attests with TPM: TPM devices register over HTTPS, not by publishing "
        "registration.requested (there is no TPM challenge over Kafka)");
}

std::string hub_key(const tpm_challenge& c, std::string_view operation_id) {
  std::string msg = "provisiond iothub key\n";
  msg.append(operation_id);
  const auto k = crypto::hmac_sha256(c.key, msg);
  return std::string(reinterpret_cast<const char*>(k.data()), k.size());
}

std::string result_authentication_key(const tpm_challenge& c, std::string_view ek_tpm2b,
                                      std::string_view operation_id, std::string& why) {
  tpm2::rsa_public ek, srk;
  why = tpm2::parse_rsa_public(ek_tpm2b, "the enrolled endorsementKey", ek);
  if (why.empty())
    why = tpm2::parse_rsa_public(c.srk, "the challenge's storageRootKey", srk);
  if (!why.empty())
    return {};
  std::string key = hub_key(c, operation_id);
  const std::string blob = tpm2::activation_blob(ek, srk, key, why);
  OPENSSL_cleanse(key.data(), key.size());
  return blob.empty() ? std::string() : crypto::base64_encode(blob);
}

bool decode_challenge(std::string_view b, tpm_challenge& out) {
  out = tpm_challenge{};
  if (b.size() < 2 + 16 + 2 + 32 + 2 + 32 + 2 || static_cast<uint8_t>(b[0]) != challenge_format)
    return false;
  // One encoding per state (the record comes over dps.enrollments, which
  // other writers can reach): a flag byte other than 0 or 1 is not ours.
  if (b[1] != 0 && b[1] != 1)
    return false;
  out.answered = b[1] != 0;
  out.issued_s = get_i64(b.substr(2));
  out.expires_s = get_i64(b.substr(10));
  std::size_t at = 18;
  for (auto* field : {&out.ek_digest, &out.key, &out.srk}) {
    if (b.size() - at < 2)
      return false;
    const std::size_t n = (static_cast<uint8_t>(b[at]) << 8) | static_cast<uint8_t>(b[at + 1]);
    at += 2;
    if (b.size() - at < n || (field != &out.srk && n != 32))
      return false;
    field->assign(b.substr(at, n));
    at += n;
  }
  return at == b.size();
}

bool tpm::reads(const device_credential& c) const noexcept {
  return std::holds_alternative<tpm_credential>(c);
}

error tpm::open(const device_credential& c, const request_facts& facts,
                std::unique_ptr<proof>& out) const {
  const auto& cred = std::get<tpm_credential>(c);
  auto p = std::make_unique<tpm_proof>(store_, facts, ttl_s_);
  auto read_key = [](const std::string& b64, const char* name, std::string& bytes) -> error {
    if (b64.empty())
      return {};
    auto decoded = crypto::base64_decode(b64);
    if (!decoded)
      return {error_code::bad_request, std::string(name) + " must be base64"};
    tpm2::rsa_public parsed;
    if (auto why = tpm2::parse_rsa_public(*decoded, name, parsed); !why.empty())
      return {error_code::bad_request, why};
    bytes = std::move(*decoded);
    return {};
  };
  if (auto err = read_key(cred.endorsement_key, "tpm.endorsementKey", p->ek))
    return err;
  if (auto err = read_key(cred.storage_root_key, "tpm.storageRootKey", p->srk))
    return err;
  if (!cred.sas_token.empty()) {
    sas_limits limits;
    limits.now = facts.now_s;
    limits.max_lifetime = max_lifetime_s_;
    limits.clock_skew = clock_skew_s_;
    sas_token tok;
    if (auto err = read_device_sas(cred.sas_token, limits, facts.id_scope,
                                   facts.registration_id, tok))
      return err;
    p->sas = std::move(tok);
  } else if (p->ek.empty()) {
    return {error_code::bad_request,
            "tpm.endorsementKey is required to ask for a TPM challenge"};
  }
  out = std::move(p);
  return {};
}

} // namespace prov::attestation
