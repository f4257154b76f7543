#include "actors/attestation/symmetric_key.hpp"

#include <openssl/crypto.h>

#include "actors/attestation/sas_token.hpp"
#include "messages/crypto.hpp"

namespace prov::attestation {

namespace {

class sas_proof final : public proof {
public:
  sas_proof(std::string_view text, sas_token tok, std::string_view registration_id)
    : text_(text), tok_(std::move(tok)), registration_id_(registration_id) {}

  verdict check_individual(const enrollment::enrollment_view& v) const override {
    const auto& keys = std::get<enrollment::symmetric_key_attestation>(v.attestation);
    if (!signature_matches(tok_, keys.primary_key)
        && (keys.secondary_key.empty() || !signature_matches(tok_, keys.secondary_key)))
      return verdict::rejected(error_code::unauthorized_signature,
                               "signature mismatch: the token is not signed with the individual "
                               "enrollment's primary or secondary key");
    return verdict::accepted(attestation_type::symmetric_key, v.enabled);
  }

  verdict check_groups(const std::vector<enrollment::enrollment_view>& groups) const override {
    // The SAS names no group: try each group's derived device key.
    for (const auto& g : groups) {
      const auto* keys = std::get_if<enrollment::symmetric_key_attestation>(&g.attestation);
      if (keys == nullptr)
        continue;
      for (const auto* key : {&keys->primary_key, &keys->secondary_key}) {
        if (key->empty())
          continue;
        auto dk = crypto::derive_device_key_raw(*key, registration_id_);
        const bool match =
          dk && signature_matches_raw(
                  tok_, std::string_view(reinterpret_cast<const char*>(dk->data()), dk->size()));
        if (dk)
          OPENSSL_cleanse(dk->data(), dk->size());
        if (match)
          return verdict::accepted(attestation_type::symmetric_key, g.enabled, g.id);
      }
    }
    return verdict::rejected(error_code::unauthorized_signature,
                             "no enrollment matches: no individual enrollment for this "
                             "registration id, and no enrollment group key derives a matching "
                             "signature");
  }

  std::string_view identity() const noexcept override { return text_; }
  int64_t valid_until() const noexcept override { return tok_.expiry; }

private:
  std::string_view text_; ///< the token as sent (the request outlives the proof)
  sas_token tok_;
  std::string_view registration_id_;
};

} // namespace

bool symmetric_key::reads(const device_credential& c) const noexcept {
  return std::holds_alternative<sas_credential>(c);
}

error symmetric_key::open(const device_credential& c, const request_facts& facts,
                          std::unique_ptr<proof>& out) const {
  const auto& text = std::get<sas_credential>(c).token;
  sas_limits limits;
  limits.now = facts.now_s;
  limits.max_lifetime = max_lifetime_s_;
  limits.clock_skew = clock_skew_s_;
  sas_token tok;
  if (auto err = read_device_sas(text, limits, facts.id_scope, facts.registration_id, tok))
    return err;
  out = std::make_unique<sas_proof>(text, std::move(tok), facts.registration_id);
  return {};
}

} // namespace prov::attestation
