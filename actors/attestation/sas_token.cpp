#include "actors/attestation/sas_token.hpp"

#include <algorithm>
#include <limits>

#include <openssl/crypto.h>

#include "messages/ascii.hpp"
#include "messages/crypto.hpp"

namespace prov::attestation {

namespace {

constexpr std::string_view scheme = "SharedAccessSignature";
constexpr std::size_t max_header = 4096;
// Per-field bounds. A resource is at most scope + "/registrations/" + a
// 128-char id, or a host name plus path, even fully percent-encoded.
constexpr std::size_t max_sr = 1024;
constexpr std::size_t max_sig = 128; // 44 chars of base64, ~60 URL-encoded
constexpr std::size_t max_se = 19;   // digits of INT64_MAX
constexpr std::size_t max_skn = 256;

error bad(std::string msg) {
  return error{error_code::unauthorized, std::move(msg)};
}
error bad_sig(std::string msg) {
  return error{error_code::unauthorized_signature, std::move(msg)};
}

using ascii::iequals;

/// Non-negative decimal int64, digits only (no sign, no spaces).
bool parse_int64(std::string_view s, int64_t& out) noexcept {
  if (s.empty()) return false;
  int64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    const int d = c - '0';
    if (v > (std::numeric_limits<int64_t>::max() - d) / 10) return false;
    v = v * 10 + d;
  }
  out = v;
  return true;
}

/// a + b clamped to int64 range (limits come from configuration).
int64_t sat_add(int64_t a, int64_t b) noexcept {
  if (b > 0 && a > std::numeric_limits<int64_t>::max() - b)
    return std::numeric_limits<int64_t>::max();
  if (b < 0 && a < std::numeric_limits<int64_t>::min() - b)
    return std::numeric_limits<int64_t>::min();
  return a + b;
}

/// Raw 32-byte signature from the transmitted `sig`, or nullopt.
std::optional<std::string> decode_sig(std::string_view sig) {
  auto unescaped = crypto::url_decode(sig);
  if (!unescaped) return std::nullopt;
  auto raw = crypto::base64_decode(*unescaped);
  if (!raw || raw->size() != sizeof(crypto::sha256_digest)) return std::nullopt;
  return raw;
}

std::string digest_view(const crypto::sha256_digest& d) {
  return std::string(reinterpret_cast<const char*>(d.data()), d.size());
}

} // namespace

error parse_sas(std::string_view header, sas_token& out) {
  out = sas_token{};
  if (header.size() > max_header) return bad("SAS token too long");
  // The auth scheme is case-insensitive (RFC 7235); exactly one space follows.
  if (header.size() <= scheme.size() + 1 ||
      !iequals(header.substr(0, scheme.size()), scheme) ||
      header[scheme.size()] != ' ')
    return bad("Authorization is not a SharedAccessSignature token");
  std::string_view rest = header.substr(scheme.size() + 1);

  bool have_sr = false, have_sig = false, have_se = false, have_skn = false;
  sas_token tok;
  while (true) {
    const std::size_t amp = rest.find('&');
    const std::string_view field = rest.substr(0, amp);
    const std::size_t eq = field.find('=');
    if (field.empty() || eq == std::string_view::npos || eq == 0)
      return bad("malformed SAS token field");
    const std::string_view name = field.substr(0, eq);
    const std::string_view value = field.substr(eq + 1);

    // Field names are matched exactly; unknown fields are rejected so that a
    // token means one thing only.
    bool* seen = nullptr;
    std::string* dest = nullptr;
    std::size_t limit = 0;
    if (name == "sr") {
      seen = &have_sr, dest = &tok.sr, limit = max_sr;
    } else if (name == "sig") {
      seen = &have_sig, dest = &tok.sig, limit = max_sig;
    } else if (name == "se") {
      seen = &have_se, dest = &tok.se, limit = max_se;
    } else if (name == "skn") {
      seen = &have_skn, dest = &tok.skn, limit = max_skn;
    } else {
      return bad("unknown SAS token field");
    }
    if (*seen) return bad("duplicate SAS token field '" + std::string(name) + "'");
    if (value.size() > limit)
      return bad("SAS token field '" + std::string(name) + "' too long");
    *seen = true;
    dest->assign(value);

    if (amp == std::string_view::npos) break;
    rest.remove_prefix(amp + 1);
  }

  if (!have_sr || tok.sr.empty()) return bad("SAS token lacks sr");
  if (!have_sig || tok.sig.empty()) return bad("SAS token lacks sig");
  if (!have_se || tok.se.empty()) return bad("SAS token lacks se");
  if (!parse_int64(tok.se, tok.expiry))
    return bad("SAS token se is not a non-negative decimal integer");
  auto resource = crypto::url_decode(tok.sr);
  if (!resource) return bad("SAS token sr has a malformed percent-escape");
  tok.resource = std::move(*resource);
  auto sig = decode_sig(tok.sig);
  if (!sig) return bad("SAS token sig is not a base64 HMAC-SHA256");
  tok.sig_bytes.emplace();
  std::copy(sig->begin(), sig->end(), tok.sig_bytes->begin());
  out = std::move(tok);
  return {};
}

error check_expiry(const sas_token& tok, const sas_limits& limits) {
  if (tok.expiry <= sat_add(limits.now, -limits.clock_skew))
    return bad_sig("token expired");
  if (tok.expiry > sat_add(sat_add(limits.now, limits.max_lifetime), limits.clock_skew))
    return bad_sig("token lifetime exceeds the maximum of " +
                   std::to_string(limits.max_lifetime) + " seconds");
  return {};
}

bool signature_matches_raw(const sas_token& tok, std::string_view key) {
  if (key.empty()) return false;
  std::optional<std::string> decoded;
  std::string_view sig;
  if (tok.sig_bytes) {
    sig = std::string_view(reinterpret_cast<const char*>(tok.sig_bytes->data()),
                           tok.sig_bytes->size());
  } else if ((decoded = decode_sig(tok.sig))) { // a token not from parse_sas
    sig = *decoded;
  }
  std::string msg;
  msg.reserve(tok.sr.size() + 1 + tok.se.size());
  msg.append(tok.sr).append(1, '\n').append(tok.se);
  const crypto::sha256_digest d = crypto::hmac_sha256(key, msg);
  const std::string_view expected(reinterpret_cast<const char*>(d.data()), d.size());
  // Compare even a malformed sig (against a same-length dummy) so the
  // time taken does not depend on the token's shape beyond its length.
  const char dummy[sizeof(crypto::sha256_digest)] = {};
  const bool valid = !sig.empty();
  const bool eq = crypto::equal_constant_time(
    expected, valid ? sig : std::string_view(dummy, sizeof(dummy)));
  return eq && valid;
}

bool signature_matches(const sas_token& tok, std::string_view key_b64) {
  auto key = crypto::base64_decode(key_b64);
  if (!key || key->empty()) return false;
  const bool ok = signature_matches_raw(tok, *key);
  OPENSSL_cleanse(key->data(), key->size());
  return ok;
}

error verify_sas(const sas_token& tok, std::string_view key_b64,
                 const sas_limits& limits) {
  if (auto e = check_expiry(tok, limits)) return e;
  auto key = crypto::base64_decode(key_b64);
  const bool key_ok = key && !key->empty();
  if (key) OPENSSL_cleanse(key->data(), key->size());
  if (!key_ok) return bad_sig("invalid key");
  if (!signature_matches(tok, key_b64)) return bad_sig("signature mismatch");
  return {};
}

bool device_resource_matches(const sas_token& tok, std::string_view id_scope,
                             std::string_view registration_id) {
  constexpr std::string_view mid = "/registrations/";
  const std::string_view r = tok.resource;
  if (id_scope.empty() || registration_id.empty()) return false;
  if (r.size() != id_scope.size() + mid.size() + registration_id.size()) return false;
  return iequals(r.substr(0, id_scope.size()), id_scope) &&
         iequals(r.substr(id_scope.size(), mid.size()), mid) &&
         iequals(r.substr(id_scope.size() + mid.size()), registration_id);
}

error read_device_sas(std::string_view header, const sas_limits& limits,
                      std::string_view id_scope, std::string_view registration_id,
                      sas_token& out) {
  if (auto err = parse_sas(header, out))
    return err;
  if (auto err = check_expiry(out, limits))
    return {error_code::unauthorized_signature, err.message};
  if (!device_resource_matches(out, id_scope, registration_id))
    return {error_code::unauthorized_signature,
            "token resource (sr) does not name " + std::string(id_scope)
              + "/registrations/" + std::string(registration_id)};
  return {};
}

bool service_resource_matches(const sas_token& tok, std::string_view host) {
  const std::string_view r = tok.resource;
  if (host.empty() || r.size() < host.size()) return false;
  if (!iequals(r.substr(0, host.size()), host)) return false;
  // "host" or "host/..." only: "hostX" names another host.
  return r.size() == host.size() || r[host.size()] == '/';
}

std::string make_sas(std::string_view resource, std::string_view key_b64,
                     int64_t expiry, std::string_view skn, bool encode_resource) {
  auto key = crypto::base64_decode(key_b64);
  if (!key || key->empty()) return {}; // no token can be made from a bad key
  const std::string sr =
      encode_resource ? crypto::url_encode(resource) : std::string(resource);
  const std::string se = std::to_string(expiry);
  const std::string sig = crypto::base64_encode(
      digest_view(crypto::hmac_sha256(*key, sr + "\n" + se)));
  OPENSSL_cleanse(key->data(), key->size());
  std::string out = "SharedAccessSignature sr=" + sr +
                    "&sig=" + crypto::url_encode(sig) + "&se=" + se;
  if (!skn.empty()) out += "&skn=" + crypto::url_encode(skn);
  return out;
}

} // namespace prov::attestation
