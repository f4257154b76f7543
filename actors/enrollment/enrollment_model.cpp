#include "actors/enrollment/enrollment_model.hpp"

#include "actors/enrollment/x509_certificates.hpp"
#include "actors/attestation/tpm2.hpp"

#include "messages/ascii.hpp"
#include "messages/crypto.hpp"
#include "messages/json_scan.hpp"
#include "messages/registration.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <initializer_list>
#include <optional>
#include <random>
#include <tuple>

#include <nlohmann/json.hpp>

namespace prov::enrollment {

namespace {

using json = nlohmann::json;

constexpr std::size_t max_id_length = 128;
constexpr std::size_t min_key_bytes = 16;
constexpr std::size_t max_key_bytes = 64;
constexpr std::size_t max_hubs = 50;        // DPS: at most 50 linked hubs
constexpr std::size_t max_hostname = 255;
constexpr std::size_t max_url = 2048;
constexpr std::size_t max_api_version = 64;

// -- small string helpers -----------------------------------------------------

using ascii::iequals;

bool is_alnum(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

bool is_id_char(char c) noexcept {
  return is_alnum(c) || c == '-' || c == '.' || c == '_' || c == ':';
}

bool valid_id(std::string_view id) noexcept {
  if (id.empty() || id.size() > max_id_length)
    return false;
  if (!std::all_of(id.begin(), id.end(), is_id_char))
    return false;
  return is_alnum(id.front()) && (is_alnum(id.back()) || id.back() == '-');
}

/// Client-chosen text (member names) echoed in messages: printable ASCII only
/// and bounded, so a message is always valid UTF-8 and short.
std::string printable(std::string_view s) {
  constexpr std::size_t cap = 64;
  std::string out;
  for (std::size_t i = 0; i < s.size() && i < cap; ++i) {
    char c = s[i];
    out.push_back((c >= 0x20 && c < 0x7f) ? c : '?');
  }
  if (s.size() > cap)
    out += "...";
  return out;
}

// -- base64 and randomness ----------------------------------------------------

/// Decoded size of strict standard base64; nullopt when the text is not that.
std::optional<std::size_t> b64_decoded_size(std::string_view s) {
  auto raw = crypto::base64_decode(s);
  if (!raw)
    return std::nullopt;
  return raw->size();
}

// -- validation helpers -------------------------------------------------------

error invalid(const std::string& path, std::string_view what) {
  return {error_code::invalid_enrollment, path + ": " + std::string(what)};
}

error wrong_type(const std::string& path, std::string_view expected, const json& got) {
  return invalid(path, "must be " + std::string(expected) + " (got " +
                           std::string(got.type_name()) + ")");
}

std::string join(const std::string& prefix, std::string_view name) {
  return prefix.empty() ? std::string(name) : prefix + "." + std::string(name);
}

/// Present and not null: clients serialising optional members as null mean "absent".
const json* member(const json& obj, const char* name) {
  auto it = obj.find(name);
  return (it == obj.end() || it->is_null()) ? nullptr : &*it;
}

error only_members(const json& obj, const std::string& path,
                   std::initializer_list<std::string_view> allowed) {
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    std::string_view name = it.key();
    if (std::find(allowed.begin(), allowed.end(), name) == allowed.end())
      return invalid(join(path, printable(name)), "unknown member");
  }
  return {};
}

/// Case-insensitive lookup of `value` among canonical spellings.
const char* canonical(std::string_view value, std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (iequals(value, n))
      return n;
  return nullptr;
}

error need_object(const json& v, const std::string& path) {
  return v.is_object() ? error{} : wrong_type(path, "an object", v);
}

error need_string(const json& v, const std::string& path, bool non_empty = true) {
  if (!v.is_string())
    return wrong_type(path, "a string", v);
  if (non_empty && v.get_ref<const std::string&>().empty())
    return invalid(path, "must not be empty");
  return {};
}

bool is_https_url(std::string_view url) {
  constexpr std::string_view scheme = "https://";
  if (url.size() <= scheme.size() || url.size() > max_url ||
      !iequals(url.substr(0, scheme.size()), scheme))
    return false;
  for (char c : url)
    if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7f)
      return false;
  auto host_end = url.find_first_of("/?#", scheme.size());
  std::string_view authority = url.substr(scheme.size(), host_end - scheme.size());
  // userinfo@host would let a webhook URL smuggle credentials; hosts only.
  return !authority.empty() && authority.find('@') == std::string_view::npos &&
         authority.front() != ':';
}

// -- attestation --------------------------------------------------------------

error normalize_key(const json* sk, const char* name, const json* old_sk, json& out_sk) {
  const std::string path = std::string("attestation.symmetricKey.") + name;
  if (sk != nullptr) {
    if (const json* v = member(*sk, name)) {
      if (!v->is_string())
        return wrong_type(path, "a string", *v);
      const auto& s = v->get_ref<const std::string&>();
      if (!s.empty()) { // "" = omitted, as some clients send it
        auto n = b64_decoded_size(s);
        if (!n || *n < min_key_bytes || *n > max_key_bytes)
          return invalid(path, "must be base64 of 16..64 bytes");
        out_sk[name] = s;
        return {};
      }
    }
  }
  // On replace, an omitted key keeps the stored one: GET strips keys, so the
  // usual get-modify-put cycle must not silently rotate device credentials.
  if (old_sk != nullptr) {
    if (const json* v = member(*old_sk, name); v != nullptr && v->is_string() &&
                                               !v->get_ref<const std::string&>().empty()) {
      out_sk[name] = *v;
      return {};
    }
  }
  out_sk[name] = crypto::generate_key();
  return {};
}

error normalize_symmetric(const json& att, const json* existing_att, json& out) {
  const json* sk = member(att, "symmetricKey");
  if (sk != nullptr) {
    if (auto e = need_object(*sk, "attestation.symmetricKey"))
      return e;
    if (auto e = only_members(*sk, "attestation.symmetricKey", {"primaryKey", "secondaryKey"}))
      return e;
  }
  const json* old_sk = nullptr;
  if (existing_att != nullptr && existing_att->is_object()) {
    const json* t = member(*existing_att, "type");
    if (t != nullptr && t->is_string() && *t == "symmetricKey")
      old_sk = member(*existing_att, "symmetricKey");
    if (old_sk != nullptr && !old_sk->is_object())
      old_sk = nullptr;
  }
  json out_sk = json::object();
  if (auto e = normalize_key(sk, "primaryKey", old_sk, out_sk))
    return e;
  if (auto e = normalize_key(sk, "secondaryKey", old_sk, out_sk))
    return e;
  out["symmetricKey"] = std::move(out_sk);
  return {};
}

error normalize_tpm(const json& att, json& out) {
  const std::string path = "attestation.tpm";
  const json* tpm = member(att, "tpm");
  if (tpm == nullptr)
    return invalid(path, "required when type is tpm");
  if (auto e = need_object(*tpm, path))
    return e;
  if (auto e = only_members(*tpm, path, {"endorsementKey", "storageRootKey"}))
    return e;
  const json* ek = member(*tpm, "endorsementKey");
  if (ek == nullptr)
    return invalid(path + ".endorsementKey", "required");
  if (!ek->is_string())
    return wrong_type(path + ".endorsementKey", "a string", *ek);
  // The keys must be usable for the challenge (actors/attestation/tpm2.hpp):
  // refused here, with the reason, rather than at the device's first register.
  auto check_key = [&](const json& k, const char* name) -> error {
    auto bytes = crypto::base64_decode(k.get_ref<const std::string&>());
    if (!bytes)
      return invalid(path + "." + name, "must be base64");
    tpm2::rsa_public parsed;
    if (auto why = tpm2::parse_rsa_public(*bytes, "the key", parsed); !why.empty())
      return invalid(path + "." + name, why);
    return {};
  };
  if (auto e = check_key(*ek, "endorsementKey"))
    return e;
  if (const json* srk = member(*tpm, "storageRootKey")) {
    if (!srk->is_string())
      return wrong_type(path + ".storageRootKey", "a string", *srk);
    if (auto e = check_key(*srk, "storageRootKey"))
      return e;
  }
  out["tpm"] = *tpm;
  return {};
}

/// X509Certificates {primary, secondary}, each {certificate, info}, checked
/// and normalized into `out`: the certificate must parse (PEM or base64 DER)
/// and `info` is filled from it, as DPS does. With `by_thumbprint` (client
/// certificates), an entry may name the certificate by its info's
/// sha1Thumbprint and/or sha256Thumbprint instead. Counts the slots filled.
error check_certificates(const json& v, const std::string& path, bool by_thumbprint,
                         int& filled, json& out) {
  if (auto e = need_object(v, path))
    return e;
  if (auto e = only_members(v, path, {"primary", "secondary"}))
    return e;
  out = json::object();
  for (const char* slot : {"primary", "secondary"}) {
    const json* c = member(v, slot);
    if (c == nullptr)
      continue;
    const std::string sp = join(path, slot);
    if (auto e = need_object(*c, sp))
      return e;
    if (auto e = only_members(*c, sp, {"certificate", "info"}))
      return e;
    const json* info = member(*c, "info");
    if (info != nullptr)
      if (auto e = need_object(*info, sp + ".info"))
        return e;
    const json* pem = member(*c, "certificate");
    json entry = json::object();
    if (pem == nullptr) {
      if (!by_thumbprint)
        return invalid(sp + ".certificate", "required");
      bool any = false;
      json thumbs = json::object();
      for (const char* t : {"sha1Thumbprint", "sha256Thumbprint"}) {
        const json* tv = info != nullptr ? member(*info, t) : nullptr;
        if (tv == nullptr)
          continue;
        std::string raw;
        if (!tv->is_string() || !thumbprint_bytes(tv->get_ref<const std::string&>(), raw)
            || raw.size() != (t[3] == '1' ? 20u : 32u))
          return invalid(sp + ".info." + t,
                         t[3] == '1' ? "must be 40 hex digits (a SHA-1 thumbprint)"
                                     : "must be 64 hex digits (a SHA-256 thumbprint)");
        thumbs[t] = upper_hex(raw);
        any = true;
      }
      if (!any)
        return invalid(sp + ".certificate",
                       "required (or info.sha1Thumbprint / info.sha256Thumbprint)");
      entry["info"] = std::move(thumbs);
    } else {
      if (auto e = need_string(*pem, sp + ".certificate"))
        return e;
      std::string der;
      if (!certificate_der(pem->get_ref<const std::string&>(), der))
        return invalid(sp + ".certificate",
                       "is not an X.509 certificate (PEM, or base64 of its DER)");
      entry["certificate"] = *pem;
      entry["info"] = certificate_info(parse_der(der).get(), der);
    }
    out[slot] = std::move(entry);
    ++filled;
  }
  return {};
}

error normalize_x509(kind k, const json& att, json& out) {
  const std::string path = "attestation.x509";
  const json* x = member(att, "x509");
  if (x == nullptr)
    return invalid(path, "required when type is x509");
  if (auto e = need_object(*x, path))
    return e;
  if (auto e = only_members(*x, path, {"clientCertificates", "signingCertificates", "caReferences"}))
    return e;
  // Individual enrollments name the device's certificate, groups its CA.
  const char* wrong = k == kind::individual ? "signingCertificates" : "clientCertificates";
  if (member(*x, wrong) != nullptr)
    return invalid(join(path, wrong),
                   k == kind::individual
                     ? "is for enrollment groups; an individual enrollment names the device's "
                       "own certificate in clientCertificates"
                     : "is for individual enrollments; a group names the signing (root or "
                       "intermediate CA) certificate in signingCertificates");
  int filled = 0;
  json result = json::object();
  for (const char* name : {"clientCertificates", "signingCertificates"})
    if (const json* v = member(*x, name))
      if (auto e = check_certificates(*v, join(path, name),
                                      std::string_view(name) == "clientCertificates", filled,
                                      result[name]))
        return e;
  if (const json* ca = member(*x, "caReferences")) {
    const std::string cp = path + ".caReferences";
    if (auto e = need_object(*ca, cp))
      return e;
    if (auto e = only_members(*ca, cp, {"primary", "secondary"}))
      return e;
    for (const char* slot : {"primary", "secondary"})
      if (const json* v = member(*ca, slot)) {
        if (auto e = need_string(*v, join(cp, slot)))
          return e;
        ++filled;
      }
    result["caReferences"] = *ca;
  }
  if (filled == 0)
    return invalid(path, "needs clientCertificates, signingCertificates or caReferences "
                         "with a primary or secondary entry");
  out["x509"] = std::move(result);
  return {};
}

error normalize_attestation(kind k, const json& body, const json* existing, json& out) {
  const json* att = member(body, "attestation");
  if (att == nullptr)
    return invalid("attestation", "required");
  if (auto e = need_object(*att, "attestation"))
    return e;
  if (auto e = only_members(*att, "attestation", {"type", "tpm", "x509", "symmetricKey"}))
    return e;
  const json* type = member(*att, "type");
  if (type == nullptr)
    return invalid("attestation.type", "required");
  if (!type->is_string())
    return wrong_type("attestation.type", "a string", *type);
  const char* t = canonical(type->get_ref<const std::string&>(),
                            {"none", "tpm", "x509", "symmetricKey"});
  if (t == nullptr)
    return invalid("attestation.type", "must be one of none, tpm, x509, symmetricKey");
  const std::string_view ts = t;
  if (k == kind::group && (ts == "none" || ts == "tpm"))
    return invalid("attestation.type",
                   std::string(ts) + " is not supported for enrollment groups (x509 or symmetricKey)");
  // A mechanism other than the declared type would be stored but never used.
  for (const char* other : {"tpm", "x509", "symmetricKey"})
    if (ts != other && member(*att, other) != nullptr)
      return invalid(std::string("attestation.") + other,
                     "not allowed when type is " + std::string(ts));

  const json* existing_att = nullptr;
  if (existing != nullptr && existing->is_object())
    existing_att = member(*existing, "attestation");

  json result = json::object();
  result["type"] = t;
  error e;
  if (ts == "symmetricKey")
    e = normalize_symmetric(*att, existing_att, result);
  else if (ts == "tpm")
    e = normalize_tpm(*att, result);
  else if (ts == "x509")
    e = normalize_x509(k, *att, result);
  if (e)
    return e;
  out["attestation"] = std::move(result);
  return {};
}

// -- other members ------------------------------------------------------------

error normalize_initial_twin(const json& twin, json& out) {
  const std::string path = "initialTwin";
  if (auto e = need_object(twin, path))
    return e;
  if (auto e = only_members(twin, path, {"tags", "properties"}))
    return e;
  if (const json* tags = member(twin, "tags"))
    if (auto e = need_object(*tags, path + ".tags"))
      return e;
  if (const json* props = member(twin, "properties")) {
    if (auto e = need_object(*props, path + ".properties"))
      return e;
    if (auto e = only_members(*props, path + ".properties", {"desired"}))
      return e;
    if (const json* desired = member(*props, "desired"))
      if (auto e = need_object(*desired, path + ".properties.desired"))
        return e;
  }
  out["initialTwin"] = twin;
  return {};
}

error normalize_reprovision(const json* rp, json& out) {
  json result = {{"updateHubAssignment", true}, {"migrateDeviceData", true}};
  if (rp != nullptr) {
    if (auto e = need_object(*rp, "reprovisionPolicy"))
      return e;
    if (auto e = only_members(*rp, "reprovisionPolicy", {"updateHubAssignment", "migrateDeviceData"}))
      return e;
    for (const char* name : {"updateHubAssignment", "migrateDeviceData"})
      if (const json* v = member(*rp, name)) {
        if (!v->is_boolean())
          return wrong_type(join("reprovisionPolicy", name), "a boolean", *v);
        result[name] = *v;
      }
  }
  out["reprovisionPolicy"] = std::move(result);
  return {};
}

error normalize_capabilities(const json* caps, json& out) {
  json result = {{"iotEdge", false}};
  if (caps != nullptr) {
    if (auto e = need_object(*caps, "capabilities"))
      return e;
    if (auto e = only_members(*caps, "capabilities", {"iotEdge"}))
      return e;
    if (const json* v = member(*caps, "iotEdge")) {
      if (!v->is_boolean())
        return wrong_type("capabilities.iotEdge", "a boolean", *v);
      result["iotEdge"] = *v;
    }
  }
  out["capabilities"] = std::move(result);
  return {};
}

/// An [[issuing_cas]] name: 1..64 of A-Z a-z 0-9 _ - . (config's rule).
bool valid_ca_name(std::string_view s) {
  return !s.empty() && s.size() <= 64 && std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
           || c == '_' || c == '-' || c == '.';
  });
}

/// Both shapes of the issuance policy (issuing_ca_of_resource_id); kept as
/// sent. When both are given they must name the same CA.
error normalize_issuance(const json& body, json& out) {
  std::string from_policy, from_id;
  if (const json* p = member(body, "clientCertificateIssuancePolicy")) {
    if (auto e = need_object(*p, "clientCertificateIssuancePolicy"))
      return e;
    if (auto e = only_members(*p, "clientCertificateIssuancePolicy", {"certificateAuthorityName"}))
      return e;
    const json* n = member(*p, "certificateAuthorityName");
    if (n == nullptr || !n->is_string())
      return n == nullptr ? invalid("clientCertificateIssuancePolicy.certificateAuthorityName",
                                    "is required")
                          : wrong_type("clientCertificateIssuancePolicy.certificateAuthorityName",
                                       "a string", *n);
    from_policy = n->get<std::string>();
    if (!valid_ca_name(from_policy))
      return invalid("clientCertificateIssuancePolicy.certificateAuthorityName",
                     "must be 1..64 characters of A-Z a-z 0-9 _ - .");
    out["clientCertificateIssuancePolicy"] = {{"certificateAuthorityName", from_policy}};
  }
  if (const json* id = member(body, "certificatePolicyResourceId")) {
    if (!id->is_string())
      return wrong_type("certificatePolicyResourceId", "a string", *id);
    const auto& text = id->get_ref<const std::string&>();
    from_id = issuing_ca_of_resource_id(text);
    if (text.size() > 1024 || !valid_ca_name(from_id))
      return invalid("certificatePolicyResourceId",
                     "must name an issuing CA: \".../certificateAuthorities/<ca>/"
                     "certificatePolicies/<policy>\" or the CA's name (1..64 characters of "
                     "A-Z a-z 0-9 _ - .)");
    out["certificatePolicyResourceId"] = text;
  }
  if (!from_policy.empty() && !from_id.empty() && !iequals(from_policy, from_id))
    return invalid("certificatePolicyResourceId",
                   "names CA '" + from_id + "' but clientCertificateIssuancePolicy names '" +
                     from_policy + "'");
  return {};
}

error normalize_hubs(const json& body, json& out) {
  if (const json* hubs = member(body, "iotHubs")) {
    if (!hubs->is_array())
      return wrong_type("iotHubs", "an array of strings", *hubs);
    if (hubs->size() > max_hubs)
      return invalid("iotHubs", "at most 50 hubs");
    for (std::size_t i = 0; i < hubs->size(); ++i) {
      const std::string path = "iotHubs[" + std::to_string(i) + "]";
      if (auto e = need_string((*hubs)[i], path))
        return e;
      if ((*hubs)[i].get_ref<const std::string&>().size() > max_hostname)
        return invalid(path, "longer than 255 characters");
    }
    out["iotHubs"] = *hubs;
  }
  if (const json* legacy = member(body, "iotHubHostName")) {
    if (!legacy->is_string())
      return wrong_type("iotHubHostName", "a string", *legacy);
    out["iotHubHostName"] = *legacy;
  }
  return {};
}

error normalize_allocation(const json& body, json& out) {
  const char* policy = nullptr;
  if (const json* p = member(body, "allocationPolicy")) {
    if (!p->is_string())
      return wrong_type("allocationPolicy", "a string", *p);
    // The Azure CLI writes "geolatency"; match case-insensitively.
    policy = canonical(p->get_ref<const std::string&>(),
                       {"hashed", "geoLatency", "static", "custom"});
    if (policy == nullptr)
      return invalid("allocationPolicy", "must be one of hashed, geoLatency, static, custom");
    out["allocationPolicy"] = policy;
  }
  const bool custom = policy != nullptr && std::string_view(policy) == "custom";
  const json* def = member(body, "customAllocationDefinition");
  if (def == nullptr) {
    if (custom)
      return {error_code::custom_allocation_required,
              "customAllocationDefinition: required when allocationPolicy is custom"};
  } else {
    const std::string path = "customAllocationDefinition";
    if (auto e = need_object(*def, path))
      return e;
    if (auto e = only_members(*def, path, {"webhookUrl", "apiVersion", "timeoutMs", "retries"}))
      return e;
    // provisiond's extensions: how long each webhook attempt may take and how
    // often a failed one is retried, for this enrollment.
    for (auto [name, lo, hi] : {std::tuple{"timeoutMs", min_webhook_timeout_ms,
                                           max_webhook_timeout_ms},
                                std::tuple{"retries", 0, max_webhook_retries}}) {
      const json* n = member(*def, name);
      if (n == nullptr || n->is_null())
        continue;
      if (!n->is_number_integer())
        return wrong_type(join(path, name), "an integer", *n);
      const auto x = n->get<int64_t>();
      if (x < lo || x > hi)
        return invalid(join(path, name), "must be between " + std::to_string(lo) + " and "
                                           + std::to_string(hi));
    }
    for (const char* name : {"webhookUrl", "apiVersion"})
      if (member(*def, name) == nullptr)
        return {custom ? error_code::custom_allocation_required : error_code::invalid_enrollment,
                join(path, name) + ": required"};
    const json& url = def->at("webhookUrl");
    if (!url.is_string())
      return wrong_type(path + ".webhookUrl", "a string", url);
    if (!is_https_url(url.get_ref<const std::string&>()))
      return invalid(path + ".webhookUrl", "must be an https URL");
    const json& ver = def->at("apiVersion");
    if (auto e = need_string(ver, path + ".apiVersion"))
      return e;
    if (ver.get_ref<const std::string&>().size() > max_api_version)
      return invalid(path + ".apiVersion", "longer than 64 characters");
    out["customAllocationDefinition"] = *def;
  }
  if (policy != nullptr && std::string_view(policy) == "static") {
    const auto it = out.find("iotHubs");
    if (it == out.end() || it->size() != 1)
      return invalid("iotHubs", "allocationPolicy static needs exactly one hub");
  }
  return {};
}

error normalize_impl(kind k, std::string_view path_id, const json& body,
                     const json* existing, int64_t now_ms, json& out) {
  if (!body.is_object())
    return {error_code::invalid_enrollment, "body: must be a JSON object (got " +
                                                std::string(body.type_name()) + ")"};
  const char* id_name = k == kind::individual ? "registrationId" : "enrollmentGroupId";
  if (k == kind::individual) {
    if (auto e = only_members(body, "", {"registrationId", "deviceId", "registrationState",
                                         "optionalDeviceInformation", "attestation",
                                         "capabilities", "iotHubHostName", "initialTwin",
                                         "etag", "provisioningStatus", "reprovisionPolicy",
                                         "createdDateTimeUtc", "lastUpdatedDateTimeUtc",
                                         "allocationPolicy", "iotHubs",
                                         "customAllocationDefinition",
                                         "clientCertificateIssuancePolicy",
                                         "certificatePolicyResourceId"}))
      return e;
  } else {
    if (auto e = only_members(body, "", {"enrollmentGroupId", "attestation", "capabilities",
                                         "iotHubHostName", "initialTwin", "etag",
                                         "provisioningStatus", "reprovisionPolicy",
                                         "createdDateTimeUtc", "lastUpdatedDateTimeUtc",
                                         "allocationPolicy", "iotHubs",
                                         "customAllocationDefinition",
                                         "clientCertificateIssuancePolicy",
                                         "certificatePolicyResourceId"}))
      return e;
  }

  std::string id(path_id);
  if (const json* v = member(body, id_name)) {
    if (!v->is_string())
      return wrong_type(id_name, "a string", *v);
    const auto& body_id = v->get_ref<const std::string&>();
    if (!iequals(body_id, path_id))
      return {error_code::id_mismatch,
              std::string(id_name) + ": '" + printable(body_id) +
                  "' does not match the id in the path '" + printable(path_id) + "'"};
    id = body_id;
  }
  const bool id_ok = k == kind::individual ? valid_registration_id(id) : valid_group_id(id);
  if (!id_ok)
    return invalid(id_name, "must be 1..128 characters of A-Z a-z 0-9 - . _ :, starting "
                            "with a letter or digit and ending with a letter, digit or '-'");

  json doc = json::object();
  doc[id_name] = id;

  if (auto e = normalize_attestation(k, body, existing, doc))
    return e;

  std::string status = "enabled";
  if (const json* v = member(body, "provisioningStatus")) {
    if (!v->is_string())
      return wrong_type("provisioningStatus", "a string", *v);
    const char* s = canonical(v->get_ref<const std::string&>(), {"enabled", "disabled"});
    if (s == nullptr)
      return invalid("provisioningStatus", "must be enabled or disabled");
    status = s;
  }
  doc["provisioningStatus"] = status;

  if (auto e = normalize_hubs(body, doc))
    return e;
  if (auto e = normalize_allocation(body, doc))
    return e;
  if (auto e = normalize_reprovision(member(body, "reprovisionPolicy"), doc))
    return e;
  if (auto e = normalize_capabilities(member(body, "capabilities"), doc))
    return e;
  if (auto e = normalize_issuance(body, doc))
    return e;
  if (const json* twin = member(body, "initialTwin"))
    if (auto e = normalize_initial_twin(*twin, doc))
      return e;

  if (k == kind::individual) {
    if (const json* info = member(body, "optionalDeviceInformation")) {
      if (auto e = need_object(*info, "optionalDeviceInformation"))
        return e;
      doc["optionalDeviceInformation"] = *info;
    }
    if (const json* dev = member(body, "deviceId")) {
      if (!dev->is_string())
        return wrong_type("deviceId", "a string", *dev);
      const auto& d = dev->get_ref<const std::string&>();
      if (d.empty() || d.size() > max_id_length ||
          !std::all_of(d.begin(), d.end(), is_id_char))
        return invalid("deviceId", "must be 1..128 characters of A-Z a-z 0-9 - . _ :");
      doc["deviceId"] = d;
    }
  }

  // Server-owned members: whatever the client sent for them is ignored.
  const std::string now = utc_string(now_ms);
  std::string created = now;
  if (existing != nullptr && existing->is_object())
    if (const json* c = member(*existing, "createdDateTimeUtc"); c != nullptr && c->is_string())
      created = c->get<std::string>();
  doc["createdDateTimeUtc"] = created;
  doc["lastUpdatedDateTimeUtc"] = now;
  doc["etag"] = new_etag();

  out = std::move(doc);
  return {};
}

// -- view helpers ---------------------------------------------------------------

error stored(const std::string& path, std::string_view what) {
  return {error_code::internal, "stored enrollment: " + path + ": " + std::string(what)};
}

error view_string(const json& obj, const char* name, const std::string& path, std::string& out) {
  const json* v = member(obj, name);
  if (v == nullptr)
    return {};
  if (!v->is_string())
    return stored(path, "not a string");
  out = v->get<std::string>();
  return {};
}

error view_bool(const json& obj, const char* name, const std::string& path, bool& out) {
  const json* v = member(obj, name);
  if (v == nullptr)
    return {};
  if (!v->is_boolean())
    return stored(path, "not a boolean");
  out = v->get<bool>();
  return {};
}

/// One X509Certificates member ({primary, secondary}) into DER and
/// thumbprints; absent or null is empty. Certificates are parsed here, once
/// per view (groups are viewed once per write, not per device).
error x509_refs(const json& x, const char* name, std::vector<x509_certificate_ref>& out) {
  const json* v = member(x, name);
  if (v == nullptr)
    return {};
  const std::string path = std::string("attestation.x509.") + name;
  if (!v->is_object())
    return stored(path, "not an object");
  for (const char* slot : {"primary", "secondary"}) {
    const json* c = member(*v, slot);
    if (c == nullptr)
      continue;
    const std::string sp = join(path, slot);
    if (!c->is_object())
      return stored(sp, "not an object");
    x509_certificate_ref ref;
    std::string pem;
    if (auto e = view_string(*c, "certificate", sp + ".certificate", pem))
      return e;
    if (!pem.empty()) {
      if (!certificate_der(pem, ref.der))
        return stored(sp + ".certificate", "not an X.509 certificate");
      ref.sha1 = sha1_of(ref.der);
      ref.sha256 = sha256_of(ref.der);
    } else if (const json* info = member(*c, "info"); info != nullptr && info->is_object()) {
      std::string t1, t256;
      if (auto e = view_string(*info, "sha1Thumbprint", sp + ".info.sha1Thumbprint", t1))
        return e;
      if (auto e = view_string(*info, "sha256Thumbprint", sp + ".info.sha256Thumbprint", t256))
        return e;
      if ((!t1.empty() && (!thumbprint_bytes(t1, ref.sha1) || ref.sha1.size() != 20))
          || (!t256.empty() && (!thumbprint_bytes(t256, ref.sha256) || ref.sha256.size() != 32)))
        return stored(sp + ".info", "not a SHA-1 or SHA-256 thumbprint");
    }
    if (ref.der.empty() && ref.sha1.empty() && ref.sha256.empty())
      return stored(sp, "neither a certificate nor a thumbprint");
    out.push_back(std::move(ref));
  }
  return {};
}

error x509_view(const json& x, x509_attestation& out) {
  if (auto e = x509_refs(x, "clientCertificates", out.client_certificates))
    return e;
  if (auto e = x509_refs(x, "signingCertificates", out.signing_certificates))
    return e;
  // Groups' CAs are verified against on every attestation: parsed here,
  // once per snapshot.
  for (auto& ref : out.signing_certificates)
    if (!ref.der.empty())
      ref.cert = shared_der(ref.der);
  if (const json* ca = member(x, "caReferences"); ca != nullptr && ca->is_object())
    for (const char* slot : {"primary", "secondary"}) {
      std::string name;
      if (auto e = view_string(*ca, slot, std::string("attestation.x509.caReferences.") + slot,
                               name))
        return e;
      if (!name.empty())
        out.ca_references.push_back(ca_reference{std::move(name), {}, {}, {}, {}, {}});
    }
  return {};
}

/// The view's attestation from attestation.type; an absent type reads as
/// "none". The text reader gives up on tpm and x509 (read here only).
error attestation_of(const std::string& type, symmetric_key_attestation keys, const json* att,
                     attestation_view& out) {
  attestation_type t = attestation_type::none;
  if (!type.empty() && !from_string(type, t))
    return stored("attestation.type", "unknown type '" + type + "'");
  switch (t) {
  case attestation_type::none:
    out = std::monostate{};
    break;
  case attestation_type::symmetric_key:
    out = std::move(keys);
    break;
  case attestation_type::x509: {
    x509_attestation x;
    if (const json* o = att != nullptr ? member(*att, "x509") : nullptr;
        o != nullptr && o->is_object())
      if (auto e = x509_view(*o, x))
        return e;
    out = std::move(x);
    break;
  }
  case attestation_type::tpm: {
    tpm_attestation tpm;
    if (const json* o = att != nullptr ? member(*att, "tpm") : nullptr;
        o != nullptr && o->is_object()) {
      if (auto e = view_string(*o, "endorsementKey", "attestation.tpm.endorsementKey",
                               tpm.endorsement_key))
        return e;
      if (auto e = view_string(*o, "storageRootKey", "attestation.tpm.storageRootKey",
                               tpm.storage_root_key))
        return e;
    }
    out = std::move(tpm);
    break;
  }
  }
  return {};
}

/// allocationPolicy: absent or "" is the instance default.
error allocation_of(const std::string& policy, std::optional<allocation_policy>& out) {
  out.reset();
  if (policy.empty())
    return {};
  allocation_policy p;
  if (!from_string(policy, p))
    return stored("allocationPolicy", "unknown policy '" + policy + "'");
  out = p;
  return {};
}

error view_impl(kind k, const json& doc, enrollment_view& out) {
  if (!doc.is_object())
    return stored("document", "not an object");
  enrollment_view v;
  v.k = k;
  const char* id_name = k == kind::individual ? "registrationId" : "enrollmentGroupId";
  if (auto e = view_string(doc, id_name, id_name, v.id))
    return e;
  if (v.id.empty())
    return stored(id_name, "missing");

  const json* att = member(doc, "attestation");
  if (att == nullptr || !att->is_object())
    return stored("attestation", "missing or not an object");
  std::string type;
  if (auto e = view_string(*att, "type", "attestation.type", type))
    return e;
  // The keys are read (and checked) whatever the type, as the text reader does.
  symmetric_key_attestation keys;
  if (const json* sk = member(*att, "symmetricKey"); sk != nullptr && sk->is_object()) {
    if (auto e = view_string(*sk, "primaryKey", "attestation.symmetricKey.primaryKey", keys.primary_key))
      return e;
    if (auto e = view_string(*sk, "secondaryKey", "attestation.symmetricKey.secondaryKey", keys.secondary_key))
      return e;
  }
  if (auto e = attestation_of(type, std::move(keys), att, v.attestation))
    return e;
  if (k == kind::individual)
    if (auto e = view_string(doc, "deviceId", "deviceId", v.device_id))
      return e;

  std::string status;
  if (auto e = view_string(doc, "provisioningStatus", "provisioningStatus", status))
    return e;
  v.enabled = status != "disabled";
  std::string policy;
  if (auto e = view_string(doc, "allocationPolicy", "allocationPolicy", policy))
    return e;
  if (auto e = allocation_of(policy, v.allocation))
    return e;

  if (const json* hubs = member(doc, "iotHubs")) {
    if (!hubs->is_array())
      return stored("iotHubs", "not an array");
    for (const auto& h : *hubs) {
      if (!h.is_string())
        return stored("iotHubs", "entry not a string");
      v.iot_hubs.push_back(h.get<std::string>());
    }
  }
  if (const json* twin = member(doc, "initialTwin"))
    // Replace invalid UTF-8 instead of throwing: documents may come from storage.
    v.initial_twin_json = twin->dump(-1, ' ', false, json::error_handler_t::replace);

  if (const json* caps = member(doc, "capabilities"); caps != nullptr && caps->is_object())
    if (auto e = view_bool(*caps, "iotEdge", "capabilities.iotEdge", v.iot_edge))
      return e;
  if (const json* rp = member(doc, "reprovisionPolicy"); rp != nullptr && rp->is_object()) {
    if (auto e = view_bool(*rp, "updateHubAssignment", "reprovisionPolicy.updateHubAssignment",
                           v.update_hub_assignment))
      return e;
    if (auto e = view_bool(*rp, "migrateDeviceData", "reprovisionPolicy.migrateDeviceData",
                           v.migrate_device_data))
      return e;
  }
  if (auto e = view_string(doc, "etag", "etag", v.etag))
    return e;
  if (const json* p = member(doc, "clientCertificateIssuancePolicy");
      p != nullptr && p->is_object())
    if (auto e = view_string(*p, "certificateAuthorityName",
                             "clientCertificateIssuancePolicy.certificateAuthorityName",
                             v.issuing_ca))
      return e;
  if (v.issuing_ca.empty())
    if (const json* id = member(doc, "certificatePolicyResourceId"); id != nullptr && id->is_string())
      v.issuing_ca = issuing_ca_of_resource_id(id->get_ref<const std::string&>());
  if (v.allocation == allocation_policy::custom) {
    // The webhook gets the enrollment itself: kept only for the (few) custom
    // enrollments, keys removed as GET shows them.
    if (const json* def = member(doc, "customAllocationDefinition");
        def != nullptr && def->is_object()) {
      if (auto e = view_string(*def, "webhookUrl", "customAllocationDefinition.webhookUrl",
                               v.webhook_url))
        return e;
      if (auto e = view_string(*def, "apiVersion", "customAllocationDefinition.apiVersion",
                               v.webhook_api_version))
        return e;
      for (auto [name, out] : {std::pair{"timeoutMs", &v.webhook_timeout_ms},
                               std::pair{"retries", &v.webhook_retries}}) {
        const json* n = member(*def, name);
        if (n == nullptr || n->is_null())
          continue;
        if (!n->is_number_integer())
          return stored(std::string("customAllocationDefinition.") + name, "not an integer");
        *out = static_cast<int>(std::clamp<int64_t>(n->get<int64_t>(), 0, max_webhook_timeout_ms));
      }
    }
    v.public_json = public_document(doc).dump(-1, ' ', false, json::error_handler_t::replace);
  }
  out = std::move(v);
  return {};
}

/// Next entity-tag in an If-Match list; `pos` advances past it. Returns false
/// at the end. Tags are returned without W/ and quotes.
bool next_tag(std::string_view s, std::size_t& pos, std::string_view& tag) {
  auto skip = [&] {
    while (pos < s.size() && (s[pos] == ' ' || s[pos] == '\t' || s[pos] == ','))
      ++pos;
  };
  skip();
  if (pos >= s.size())
    return false;
  if (s.compare(pos, 2, "W/") == 0)
    pos += 2;
  if (pos < s.size() && s[pos] == '"') {
    auto close = s.find('"', pos + 1);
    if (close == std::string_view::npos) // unterminated: take the rest
      close = s.size();
    tag = s.substr(pos + 1, close - pos - 1);
    pos = close + 1;
  } else {
    auto end = s.find(',', pos);
    if (end == std::string_view::npos)
      end = s.size();
    tag = s.substr(pos, end - pos);
    while (!tag.empty() && (tag.back() == ' ' || tag.back() == '\t'))
      tag.remove_suffix(1);
    pos = end;
  }
  return true;
}

std::string_view bare_etag(std::string_view e) {
  while (!e.empty() && (e.front() == ' ' || e.front() == '\t'))
    e.remove_prefix(1);
  while (!e.empty() && (e.back() == ' ' || e.back() == '\t'))
    e.remove_suffix(1);
  if (e.substr(0, 2) == "W/")
    e.remove_prefix(2);
  if (e.size() >= 2 && e.front() == '"' && e.back() == '"')
    e = e.substr(1, e.size() - 2);
  return e;
}

} // namespace

bool operator==(const symmetric_key_attestation& a, const symmetric_key_attestation& b) {
  return a.primary_key == b.primary_key && a.secondary_key == b.secondary_key;
}
bool operator==(const x509_certificate_ref& a, const x509_certificate_ref& b) {
  return a.der == b.der && a.sha1 == b.sha1 && a.sha256 == b.sha256;
}
bool operator==(const ca_reference& a, const ca_reference& b) {
  return a.name == b.name && a.status == b.status && a.der == b.der && a.crls == b.crls;
}
bool operator==(const x509_attestation& a, const x509_attestation& b) {
  return a.client_certificates == b.client_certificates
         && a.signing_certificates == b.signing_certificates
         && a.ca_references == b.ca_references;
}
bool operator==(const tpm_attestation& a, const tpm_attestation& b) {
  return a.endorsement_key == b.endorsement_key && a.storage_root_key == b.storage_root_key;
}

std::string key_of(std::string_view id) { return ascii::to_lower(id); }

std::string issuing_ca_of_resource_id(std::string_view id) {
  while (!id.empty() && id.back() == '/')
    id.remove_suffix(1);
  if (id.find('/') == std::string_view::npos)
    return std::string(id);
  // ARM ids are case-insensitive in their type segments.
  const std::string lower = ascii::to_lower(id);
  constexpr std::string_view seg = "/certificateauthorities/";
  const auto at = lower.find(seg);
  if (at == std::string::npos)
    return {};
  const auto start = at + seg.size();
  const auto end = id.find('/', start);
  return std::string(id.substr(start, end == std::string_view::npos ? id.npos : end - start));
}

bool valid_registration_id(std::string_view id) { return valid_id(id); }

bool valid_group_id(std::string_view id) { return valid_id(id); }

error normalize(kind k, std::string_view path_id, const nlohmann::json& body,
                const nlohmann::json* existing, int64_t now_ms, nlohmann::json& out) {
  try {
    return normalize_impl(k, path_id, body, existing, now_ms, out);
  } catch (const nlohmann::json::exception& ex) {
    return {error_code::invalid_enrollment, std::string("body: ") + ex.what()};
  } catch (const std::exception& ex) {
    return {error_code::internal, std::string("normalize: ") + ex.what()};
  }
}

error view_of(kind k, const nlohmann::json& doc, enrollment_view& out) {
  try {
    return view_impl(k, doc, out);
  } catch (const std::exception& ex) {
    return {error_code::internal, std::string("view_of: ") + ex.what()};
  }
}

/// view_impl on the text itself, for plain documents (see view_of_text).
/// False: not sure, parse the document instead. Every case view_impl
/// answers with an error also gives up here, so errors have one source.
bool scan_view(kind k, std::string_view text, enrollment_view& v) {
  json_scan::reader r(text);
  // Members read, to give up on duplicates (nlohmann keeps the last one).
  enum : unsigned {
    m_id = 1, m_att = 2, m_type = 4, m_sk = 8, m_primary = 16, m_secondary = 32,
    m_device = 64, m_status = 128, m_policy = 256, m_hubs = 512, m_caps = 1024,
    m_edge = 2048, m_rp = 4096, m_update = 8192, m_migrate = 16384, m_etag = 32768,
  };
  unsigned seen = 0;
  auto once = [&seen](unsigned m) {
    if (seen & m)
      return false;
    seen |= m;
    return true;
  };
  // A member view_impl reads with member(): null is absent.
  auto str = [&](unsigned m, std::string& out) {
    return once(m) && (r.null() || r.string(out));
  };
  auto boolean = [&](unsigned m, bool& out) {
    return once(m) && (r.null() || r.boolean(out));
  };
  const std::string_view id_name = k == kind::individual ? "registrationId" : "enrollmentGroupId";
  std::string status, type, policy;
  symmetric_key_attestation keys;
  bool ok = r.object([&](std::string_view key) {
    if (key == id_name)
      return str(m_id, v.id);
    if (key == "attestation") {
      if (!once(m_att) || r.peek() != '{')
        return false; // absent (null) or not an object: view_impl's error
      return r.object([&](std::string_view ak) {
        if (ak == "type")
          return str(m_type, type);
        if (ak == "symmetricKey") {
          if (!once(m_sk))
            return false;
          if (r.peek() != '{')
            return r.skip(); // view_impl reads it only when it is an object
          return r.object([&](std::string_view sk) {
            if (sk == "primaryKey")
              return str(m_primary, keys.primary_key);
            if (sk == "secondaryKey")
              return str(m_secondary, keys.secondary_key);
            return r.skip();
          });
        }
        return r.skip();
      });
    }
    if (key == "deviceId" && k == kind::individual)
      return str(m_device, v.device_id);
    if (key == "provisioningStatus")
      return str(m_status, status);
    if (key == "allocationPolicy")
      return str(m_policy, policy);
    if (key == "iotHubs") {
      if (!once(m_hubs))
        return false;
      if (r.null())
        return true;
      return r.array([&] { return r.string(v.iot_hubs.emplace_back()); });
    }
    if (key == "initialTwin")
      return false; // re-serialised by nlohmann's dump: take the tree path
    if (key == "clientCertificateIssuancePolicy" || key == "certificatePolicyResourceId")
      return false; // rare: view_impl reads them
    if (key == "capabilities" || key == "reprovisionPolicy") {
      bool caps = key == "capabilities";
      if (!once(caps ? m_caps : m_rp))
        return false;
      if (r.peek() != '{')
        return r.skip(); // read only when an object
      return r.object([&](std::string_view ck) {
        if (caps && ck == "iotEdge")
          return boolean(m_edge, v.iot_edge);
        if (!caps && ck == "updateHubAssignment")
          return boolean(m_update, v.update_hub_assignment);
        if (!caps && ck == "migrateDeviceData")
          return boolean(m_migrate, v.migrate_device_data);
        return r.skip();
      });
    }
    if (key == "etag")
      return str(m_etag, v.etag);
    return r.skip();
  });
  if (!ok || !r.at_end() || v.id.empty() || !(seen & m_att))
    return false;
  if (type == "tpm" || type == "x509") // their members are read from the tree
    return false;
  if (policy == "custom") // the webhook needs the whole document: view_impl
    return false;
  // Unknown names: view_impl's error.
  if (attestation_of(type, std::move(keys), nullptr, v.attestation)
      || allocation_of(policy, v.allocation))
    return false;
  v.k = k;
  v.enabled = status != "disabled";
  return true;
}

error view_of_text(kind k, std::string_view text, enrollment_view& out) {
  enrollment_view v;
  if (scan_view(k, text, v)) {
    out = std::move(v);
    return {};
  }
  auto j = json::parse(text, nullptr, false);
  if (j.is_discarded())
    return {error_code::storage_failure, "stored enrollment is not valid JSON"};
  return view_of(k, j, out);
}

nlohmann::json public_document(const nlohmann::json& doc) {
  nlohmann::json copy = doc;
  if (copy.is_object()) {
    auto att = copy.find("attestation");
    if (att != copy.end() && att->is_object()) {
      auto type = att->find("type");
      const bool symmetric = type != att->end() && type->is_string() && *type == "symmetricKey";
      if (symmetric || att->contains("symmetricKey"))
        (*att)["symmetricKey"] = nlohmann::json::object();
    }
  }
  return copy;
}

nlohmann::json attestation_mechanism(const nlohmann::json& doc) {
  if (doc.is_object())
    if (auto it = doc.find("attestation"); it != doc.end() && it->is_object())
      return *it;
  return nlohmann::json::object();
}

bool etag_matches(std::string_view if_match, std::string_view stored_etag) {
  std::string_view trimmed = if_match;
  while (!trimmed.empty() && (trimmed.front() == ' ' || trimmed.front() == '\t'))
    trimmed.remove_prefix(1);
  while (!trimmed.empty() && (trimmed.back() == ' ' || trimmed.back() == '\t'))
    trimmed.remove_suffix(1);
  if (trimmed == "*")
    return true;
  const std::string_view want = bare_etag(stored_etag);
  if (want.empty())
    return false;
  std::size_t pos = 0;
  std::string_view tag;
  while (next_tag(trimmed, pos, tag))
    if (tag == want)
      return true;
  return false;
}

std::string new_etag() {
  return "\"" + crypto::uuid4() + "\"";
}

std::string etag_for(std::string_view seed) {
  auto d = crypto::sha256(seed);
  return "\"" + crypto::hex(std::string_view(reinterpret_cast<const char*>(d.data()), 16)) + "\"";
}

} // namespace prov::enrollment
