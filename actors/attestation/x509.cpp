#include "actors/attestation/x509.hpp"

#include <algorithm>
#include <climits>

#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <nlohmann/json.hpp>

#include "actors/attestation/sas_token.hpp"
#include "actors/enrollment/x509_certificates.hpp"
#include "messages/ascii.hpp"

namespace prov::attestation {

namespace {

using enrollment::x509_ptr;

struct stack_free {
  void operator()(STACK_OF(X509)* s) const noexcept { sk_X509_pop_free(s, X509_free); }
};
using x509_stack_ptr = std::unique_ptr<STACK_OF(X509), stack_free>;

std::string subject_of(const X509* c) {
  return enrollment::name_text(X509_get_subject_name(c));
}
std::string issuer_of(const X509* c) { return enrollment::name_text(X509_get_issuer_name(c)); }

/// A group's CA as parsed when its snapshot was built; parsed now (into
/// `holder`) only for a view built without it.
X509* parsed_or(const std::shared_ptr<X509>& parsed, const std::string& der, x509_ptr& holder) {
  if (parsed)
    return parsed.get();
  if (der.empty())
    return nullptr;
  holder = enrollment::parse_der(der);
  return holder.get();
}

class x509_proof final : public proof {
public:
  /// `ders` and `chain` are the same certificates (open() derives one from
  /// the other).
  x509_proof(const std::vector<std::string>& ders, std::vector<x509_ptr> chain, int64_t now_s)
    : leaf_der_(ders.front()), chain_(std::move(chain)), now_s_(now_s) {
    sha1_ = enrollment::sha1_of(leaf_der_);
    sha256_ = enrollment::sha256_of(leaf_der_);
    // Every certificate as presented, each prefixed by its length: another
    // chain with the same leaf is another credential.
    std::string all;
    for (const auto& der : ders) {
      const auto n = static_cast<uint32_t>(der.size());
      all.append(reinterpret_cast<const char*>(&n), sizeof n).append(der);
    }
    identity_ = enrollment::sha256_of(all);
    valid_until_ = LLONG_MAX;
    for (const auto& c : chain_)
      valid_until_ = std::min(valid_until_, enrollment::epoch_of(X509_get0_notAfter(c.get())));
  }

  verdict check_individual(const enrollment::enrollment_view& v) const override {
    const auto& x = std::get<enrollment::x509_attestation>(v.attestation);
    if (x.client_certificates.empty())
      return verdict::rejected(error_code::unauthorized_signature,
                               "the individual enrollment for this registration id has no "
                               "clientCertificates to match the device's certificate against");
    for (const auto& ref : x.client_certificates) {
      const bool match = !ref.der.empty() ? ref.der == leaf_der_
                                          : (!ref.sha1.empty() && ref.sha1 == sha1_)
                                              || (!ref.sha256.empty() && ref.sha256 == sha256_);
      if (match) {
        auto out = verdict::accepted(attestation_type::x509, v.enabled);
        out.x509_json = info_json(nullptr, nullptr);
        return out;
      }
    }
    return verdict::rejected(
      error_code::unauthorized_signature,
      "the client certificate (subject '" + subject_of(chain_[0].get())
        + "', SHA-256 thumbprint " + enrollment::upper_hex(sha256_)
        + ") is neither the primary nor the secondary certificate of the individual "
          "enrollment for this registration id");
  }

  verdict check_groups(const std::vector<enrollment::enrollment_view>& groups) const override {
    // DPS precedence: the group whose signing certificate is the nearest
    // issuer wins (the first intermediate, then upwards to the root), even
    // when it is disabled. A CA named by caReferences counts as a signing
    // certificate while the store holds it verified.
    const enrollment::enrollment_view* best = nullptr;
    const std::string* best_der = nullptr; // the admitting CA, for signingCertificateInfo
    x509_ptr best_anchor;                  // the same, parsed (referenced, not decoded again)
    int best_depth = INT_MAX;
    int64_t best_anchor_until = LLONG_MAX;
    std::string failures, unverified, missing;
    auto append = [](std::string& list, const std::string& item) {
      list += list.empty() ? "" : "; ";
      list += item;
    };
    // Tries one anchor of group `g`; `label` names it in messages. With
    // `trusted` false the anchor is an unverified CA: reaching it is
    // reported, never admitted.
    // Revocation belongs to the certificate, not to the anchor a group
    // reaches it by: any stored CRL that lists a chain certificate (or claims
    // its issuer without that issuer's signature) refuses the device for
    // every group.
    if (auto why = revocation(groups); !why.empty())
      return verdict::rejected(error_code::unauthorized_signature, why);
    auto try_anchor = [&](const enrollment::enrollment_view& g, X509* anchor,
                          const std::string& der, const std::string& label, bool trusted) {
      if (anchor == nullptr || !reaches(anchor))
        return;
      std::string why;
      int depth = verify(anchor, why);
      if (depth < 0) {
        append(failures, "enrollment group '" + g.id + "' (" + label + "): " + why);
        return;
      }
      if (!trusted) {
        append(unverified, "the chain reaches " + label + " of enrollment group '" + g.id
                             + "', but that CA is not verified (prove possession of its key: "
                               "generateVerificationCode, then verify)");
        return;
      }
      // Both slots are tried: the secondary may be a nearer CA.
      if (depth < best_depth && X509_up_ref(anchor) == 1) {
        best = &g;
        best_der = &der;
        best_anchor.reset(anchor);
        best_depth = depth;
        best_anchor_until = enrollment::epoch_of(X509_get0_notAfter(anchor));
      }
    };
    for (const auto& g : groups) {
      const auto* x = std::get_if<enrollment::x509_attestation>(&g.attestation);
      if (x == nullptr)
        continue;
      for (const auto& ref : x->signing_certificates) {
        x509_ptr holder;
        if (X509* anchor = parsed_or(ref.cert, ref.der, holder))
          try_anchor(g, anchor, ref.der, "signing certificate '" + subject_of(anchor) + "'",
                     true);
      }
      using state = enrollment::ca_reference::state;
      for (const auto& ref : x->ca_references) {
        if (ref.status != state::verified && ref.status != state::unverified) {
          append(missing, "enrollment group '" + g.id + "' names CA '" + ref.name
                            + "' (caReferences), which is not in the certificate store");
          continue;
        }
        x509_ptr holder;
        if (X509* anchor = parsed_or(ref.cert, ref.der, holder))
          try_anchor(g, anchor, ref.der, "CA '" + ref.name + "' ('" + subject_of(anchor) + "')",
                     ref.status == state::verified);
      }
    }
    if (best != nullptr) {
      valid_until_ = std::min(valid_until_, best_anchor_until);
      auto out = verdict::accepted(attestation_type::x509, best->enabled, best->id);
      out.x509_json = info_json(best_anchor.get(), best_der);
      return out;
    }
    if (!unverified.empty())
      return verdict::rejected(error_code::unauthorized_signature, unverified);
    if (!failures.empty())
      return verdict::rejected(error_code::unauthorized_signature,
                               "the certificate chain does not verify: " + failures);
    const X509* last = chain_.back().get();
    return verdict::rejected(
      error_code::unauthorized_signature,
      "no individual enrollment for this registration id, and the certificate chain does not "
      "reach any enrollment group's signing certificate: the last certificate presented ('"
        + subject_of(last) + "') is issued by '" + issuer_of(last)
        + "', which no enrollment group holds (a group's root or intermediate CA must be its "
          "signing certificate or a verified CA it names by caReferences, and the device must "
          "send every intermediate below it in the TLS handshake)"
        + (missing.empty() ? std::string() : "; " + missing));
  }

  std::string_view identity() const noexcept override { return identity_; }
  int64_t valid_until() const noexcept override { return valid_until_; }

private:
  /// registrationState.x509 as DPS fills it besides enrollmentGroupId: the
  /// device's certificate, and for a group the CA that admitted it.
  std::string info_json(const X509* signer, const std::string* signer_der) const {
    nlohmann::json j = nlohmann::json::object();
    j["certificateInfo"] = enrollment::certificate_info(chain_[0].get(), leaf_der_);
    if (signer != nullptr && signer_der != nullptr)
      j["signingCertificateInfo"] = enrollment::certificate_info(signer, *signer_der);
    return j.dump();
  }

  /// Whether `anchor` may be in the chain: it is a presented certificate's
  /// issuer (by name) or one of them. A cheap filter before verify().
  bool reaches(const X509* anchor) const {
    const X509_NAME* name = X509_get_subject_name(anchor);
    for (const auto& c : chain_)
      if (X509_NAME_cmp(X509_get_issuer_name(c.get()), name) == 0
          || X509_cmp(c.get(), anchor) == 0)
        return true;
    return false;
  }

  /// Verifies the presented chain to `anchor` as the only trust anchor (an
  /// intermediate is enough: partial chains allowed), for TLS client use, at
  /// the request's time. The anchor's depth (1 = the leaf's issuer), or -1
  /// with `why`.
  int verify(X509* anchor, std::string& why, x509_stack_ptr* chain_out = nullptr) const {
    enrollment::x509_store_ptr store(X509_STORE_new());
    enrollment::x509_store_ctx_ptr ctx(X509_STORE_CTX_new());
    x509_stack_ptr untrusted(sk_X509_new_null());
    if (!store || !ctx || !untrusted || X509_STORE_add_cert(store.get(), anchor) != 1) {
      why = "out of memory";
      return -1;
    }
    for (std::size_t i = 1; i < chain_.size(); ++i)
      if (X509_up_ref(chain_[i].get()) != 1 || !sk_X509_push(untrusted.get(), chain_[i].get())) {
        why = "out of memory";
        return -1;
      }
    if (X509_STORE_CTX_init(ctx.get(), store.get(), chain_[0].get(), untrusted.get()) != 1) {
      why = "out of memory";
      return -1;
    }
    X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(ctx.get());
    X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_PARTIAL_CHAIN | X509_V_FLAG_USE_CHECK_TIME);
    X509_VERIFY_PARAM_set_time(param, static_cast<time_t>(now_s_));
    X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_CLIENT);
    if (X509_verify_cert(ctx.get()) == 1) {
      if (chain_out != nullptr)
        chain_out->reset(X509_STORE_CTX_get1_chain(ctx.get()));
      return sk_X509_num(X509_STORE_CTX_get0_chain(ctx.get())) - 1;
    }
    int depth = X509_STORE_CTX_get_error_depth(ctx.get());
    X509* at = X509_STORE_CTX_get_current_cert(ctx.get());
    why = std::string(X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get())))
          + " at depth " + std::to_string(depth)
          + (at != nullptr ? " ('" + subject_of(at) + "')" : std::string());
    return -1;
  }

  /// Whether a certificate of the presented chain is revoked by a CRL stored
  /// with any CA the groups name: "" when none is, else the refusal. A
  /// certificate's issuer is a presented certificate or a CA of the groups
  /// (store or signingCertificates) whose subject is its issuer name and
  /// whose key signed it. A CRL naming that issuer must carry the issuer's
  /// signature: one that does not is refused (fail closed), never skipped.
  std::string revocation(const std::vector<enrollment::enrollment_view>& groups) const {
    // The groups' CAs (candidate issuers) and CRLs, as parsed once when the
    // snapshot was built (ca_reference::parsed_crls); only a view built
    // without them is parsed here.
    std::vector<X509*> known;
    std::vector<x509_ptr> holders;
    std::vector<std::pair<X509_CRL*, const std::string*>> crls; // with their CA's name
    std::vector<crl_ptr> crl_holders;
    for (const auto& g : groups) {
      const auto* x = std::get_if<enrollment::x509_attestation>(&g.attestation);
      if (x == nullptr)
        continue;
      auto add_known = [&](const std::shared_ptr<X509>& parsed, const std::string& der) {
        x509_ptr holder;
        if (X509* c = parsed_or(parsed, der, holder)) {
          known.push_back(c);
          if (holder)
            holders.push_back(std::move(holder));
        }
      };
      for (const auto& ref : x->signing_certificates)
        add_known(ref.cert, ref.der);
      for (const auto& ref : x->ca_references) {
        add_known(ref.cert, ref.der);
        if (ref.parsed_crls.size() == ref.crls.size()) {
          for (const auto& crl : ref.parsed_crls)
            crls.emplace_back(crl.get(), &ref.name);
          continue;
        }
        for (const auto& der : ref.crls) {
          const auto* p = reinterpret_cast<const unsigned char*>(der.data());
          crl_ptr crl(d2i_X509_CRL(nullptr, &p, static_cast<long>(der.size())));
          if (crl) {
            crls.emplace_back(crl.get(), &ref.name);
            crl_holders.push_back(std::move(crl));
          }
        }
      }
    }
    std::string out;
    if (!crls.empty())
      out = revoked_in(known, crls);
    ERR_clear_error(); // failed parses and verifications leave the queue dirty
    return out;
  }

  using crl_ptr = std::unique_ptr<X509_CRL, enrollment::x509_free<X509_CRL, X509_CRL_free>>;

  /// The issuer of `cert` among the presented chain and `known`: same name,
  /// and its key verifies cert's signature. Null for a self-signed one.
  X509* issuer_of_cert(X509* cert, const std::vector<X509*>& known) const {
    const X509_NAME* want = X509_get_issuer_name(cert);
    if (X509_NAME_cmp(want, X509_get_subject_name(cert)) == 0)
      return nullptr;
    auto signs = [&](X509* c) {
      EVP_PKEY* key = X509_get0_pubkey(c);
      return X509_NAME_cmp(want, X509_get_subject_name(c)) == 0 && key != nullptr
             && X509_verify(cert, key) == 1;
    };
    for (const auto& c : chain_)
      if (c.get() != cert && signs(c.get()))
        return c.get();
    for (X509* c : known)
      if (signs(c))
        return c;
    return nullptr;
  }

  std::string revoked_in(const std::vector<X509*>& known,
                         const std::vector<std::pair<X509_CRL*, const std::string*>>& crls) const {
    std::string stale; // the first stale CRL a chain certificate depends on
    for (std::size_t i = 0; i < chain_.size(); ++i) {
      X509* cert = chain_[i].get();
      X509* issuer = issuer_of_cert(cert, known);
      if (issuer == nullptr)
        continue;
      for (const auto& [crl, ca_name_ptr] : crls) {
        const std::string& ca_name = *ca_name_ptr;
        if (X509_NAME_cmp(X509_CRL_get_issuer(crl), X509_get_subject_name(issuer)) != 0)
          continue;
        if (X509_CRL_verify(crl, X509_get0_pubkey(issuer)) != 1)
          return "a CRL stored with CA '" + ca_name + "' names '" + subject_of(issuer)
                 + "' (the issuer of '" + subject_of(cert)
                 + "') as its issuer but is not signed by that certificate's key: refused "
                   "until the CRL is replaced by one its issuer signed (PUT /certificates/"
                 + ca_name + "/crl)";
        X509_REVOKED* entry = nullptr;
        if (X509_CRL_get0_by_cert(crl, &entry, cert) != 1 || entry == nullptr) {
          // Not listed. Past its nextUpdate the issuer has published a newer
          // list this one may lack: fail closed (docs/device-api.md,
          // "Revocation"). A cached admission ends when the CRL goes stale.
          if (const ASN1_TIME* next = X509_CRL_get0_nextUpdate(crl); next != nullptr) {
            const int64_t next_s = enrollment::epoch_of(next);
            if (next_s < now_s_ && stale.empty())
              stale = "the CRL of '" + subject_of(issuer) + "' stored with CA '" + ca_name
                      + "' is stale: its nextUpdate (" + enrollment::utc_text(next_s)
                      + ") has passed, so '" + subject_of(cert)
                      + "' cannot be shown not to be revoked; refused until a current CRL is "
                        "uploaded (PUT /certificates/"
                      + ca_name + "/crl)";
            else
              valid_until_ = std::min(valid_until_, next_s);
          }
          continue;
        }
        std::string serial;
        if (BIGNUM* bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), nullptr)) {
          if (char* h = BN_bn2hex(bn)) {
            serial = h;
            OPENSSL_free(h);
          }
          BN_free(bn);
        }
        return std::string(i == 0 ? "the client certificate '" : "the intermediate certificate '")
               + subject_of(cert) + "' (serial " + serial + ") is revoked: the CRL of '"
               + subject_of(issuer) + "' lists it since "
               + enrollment::utc_text(
                 enrollment::epoch_of(X509_REVOKED_get0_revocationDate(entry)))
               + " (stored with CA '" + ca_name + "')";
      }
    }
    return stale;
  }

  std::string leaf_der_;
  std::vector<x509_ptr> chain_; ///< parsed, leaf first
  int64_t now_s_;
  std::string sha1_, sha256_, identity_;
  mutable int64_t valid_until_; ///< lowered to the admitting group's CA expiry
};

} // namespace

bool x509::reads(const device_credential& c) const noexcept {
  return std::holds_alternative<x509_credential>(c);
}

namespace {

/// A direct publisher's proof that it holds the leaf's key: its signature
/// over what a SAS token for this device signs, "<idScope>/registrations/
/// <registrationId>\n<expiry>", within the limits of a SAS token's expiry.
error check_possession(const X509* leaf, const x509_credential::possession_proof& p,
                       const request_facts& facts, int64_t max_lifetime_s,
                       int64_t clock_skew_s) {
  sas_token expiry_only;
  expiry_only.expiry = p.expiry;
  sas_limits limits;
  limits.now = facts.now_s;
  limits.max_lifetime = max_lifetime_s;
  limits.clock_skew = clock_skew_s;
  if (auto err = check_expiry(expiry_only, limits))
    return {err.code, "the proof of possession (x509.expiry): " + err.message};
  const std::string signed_text = std::string(facts.id_scope) + "/registrations/"
                                  + std::string(facts.registration_id) + "\n"
                                  + std::to_string(p.expiry);
  EVP_PKEY* key = X509_get0_pubkey(leaf);
  bool ok = false;
  if (key != nullptr && !p.signature.empty()) {
    // Ed25519/Ed448 sign the message itself; every other key a SHA-256 digest.
    const int id = EVP_PKEY_get_base_id(key);
    const EVP_MD* md = id == EVP_PKEY_ED25519 || id == EVP_PKEY_ED448 ? nullptr : EVP_sha256();
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(),
                                                                 &EVP_MD_CTX_free);
    ok = ctx && EVP_DigestVerifyInit(ctx.get(), nullptr, md, nullptr, key) == 1
         && EVP_DigestVerify(ctx.get(),
                             reinterpret_cast<const unsigned char*>(p.signature.data()),
                             p.signature.size(),
                             reinterpret_cast<const unsigned char*>(signed_text.data()),
                             signed_text.size())
              == 1;
    ERR_clear_error();
  }
  if (!ok)
    return {error_code::unauthorized_signature,
            "x509.signature is not a signature by the client certificate's key of \""
              + std::string(facts.id_scope) + "/registrations/"
              + std::string(facts.registration_id) + "\\n" + std::to_string(p.expiry)
              + "\" (SHA-256; Ed25519 signs the text itself)"};
  return {};
}

} // namespace

error x509::open(const device_credential& c, const request_facts& facts,
                 std::unique_ptr<proof>& out) const {
  const auto& cred = std::get<x509_credential>(c);
  std::vector<x509_ptr> chain;
  // The handshake's parsed certificates, when the transport passed them, are
  // the chain: decoding them again (and each public key, through OpenSSL
  // 3.0's decoders) was the largest part of an X.509 attestation's cost.
  // Their DER (enrollment match, thumbprints, verdict-cache identity) is
  // re-encoded from them, never taken from `chain_der`, so what is matched
  // and what is verified cannot be different certificates.
  const std::vector<std::string>* ders = &cred.chain_der;
  std::vector<std::string> encoded;
  if (!cred.parsed.empty()) {
    bool shareable = true;
    for (std::size_t i = 0; i < cred.parsed.size(); ++i) {
      X509* cert = cred.parsed[i].get();
      const int n = cert != nullptr ? i2d_X509(cert, nullptr) : -1;
      std::string der(static_cast<std::size_t>(std::max(n, 0)), '\0');
      auto* p = reinterpret_cast<unsigned char*>(der.data());
      if (n <= 0 || i2d_X509(cert, &p) != n)
        return {error_code::unauthorized_signature,
                "certificate " + std::to_string(i) + " of the presented chain could not be "
                "DER-encoded"};
      encoded.push_back(std::move(der));
      // X509_verify_cert (X509_get_pubkey_parameters) may copy DSA domain
      // parameters into a chain certificate's key that lacks them: a write
      // into an object other requests share. Such chains get private copies.
      const EVP_PKEY* key = X509_get0_pubkey(cert);
      if (key == nullptr || EVP_PKEY_get_base_id(key) == EVP_PKEY_DSA
          || EVP_PKEY_missing_parameters(key) != 0)
        shareable = false;
    }
    ders = &encoded;
    for (std::size_t i = 0; shareable && i < cred.parsed.size(); ++i) {
      if (X509_up_ref(cred.parsed[i].get()) != 1)
        return {error_code::internal,
                "could not take a reference to certificate " + std::to_string(i)
                  + " of the presented chain"};
      chain.emplace_back(cred.parsed[i].get());
    }
  }
  if (ders->empty() || ders->front().empty())
    return {error_code::unauthorized_signature,
            "no client certificate: X.509 devices present their certificate chain in the TLS "
            "handshake"};
  for (std::size_t i = chain.size(); i < ders->size(); ++i) {
    auto cert = enrollment::parse_der((*ders)[i]);
    if (!cert)
      return {error_code::unauthorized_signature,
              "certificate " + std::to_string(i) + " of the presented chain is not a DER X.509 "
              "certificate"};
    chain.push_back(std::move(cert));
  }
  const X509* leaf = chain.front().get();
  // The registration id the device claims must be its certificate's, as the
  // SAS resource must name it.
  const std::string cn = enrollment::common_name(leaf);
  if (!ascii::iequals(cn, facts.registration_id))
    return {error_code::unauthorized_signature,
            cn.empty() ? "the client certificate's subject has no common name (CN); X.509 "
                         "devices register with their certificate's CN as the registration id"
                       : "the registration id '" + std::string(facts.registration_id)
                           + "' is not the client certificate's subject common name '" + cn
                           + "'"};
  const int64_t not_before = enrollment::epoch_of(X509_get0_notBefore(leaf));
  const int64_t not_after = enrollment::epoch_of(X509_get0_notAfter(leaf));
  if (facts.now_s > not_after)
    return {error_code::unauthorized_signature,
            "the client certificate '" + cn + "' expired at " + enrollment::utc_text(not_after)};
  if (facts.now_s < not_before)
    return {error_code::unauthorized_signature,
            "the client certificate '" + cn + "' is not valid before "
              + enrollment::utc_text(not_before)};
  if (!cred.from_handshake) {
    if (!cred.possession)
      return {error_code::unauthorized_signature,
              "no proof that the device holds its certificate's private key (no TLS "
              "handshake, and no signature made with that key)"};
    if (auto err = check_possession(leaf, *cred.possession, facts, max_lifetime_s_,
                                    clock_skew_s_))
      return err;
  }
  out = std::make_unique<x509_proof>(*ders, std::move(chain), facts.now_s);
  return {};
}

} // namespace prov::attestation
