#include "actors/enrollment/ca_store.hpp"

#include <algorithm>
#include <ctime>

#include <nlohmann/json.hpp>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "actors/enrollment/x509_certificates.hpp"
#include "messages/crypto.hpp"

namespace prov::enrollment {

using nlohmann::json;

namespace {

/// ARM spells the certificate times as RFC 1123 dates.
std::string rfc1123(int64_t epoch_s) {
  std::time_t t = static_cast<std::time_t>(epoch_s);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[40];
  std::strftime(buf, sizeof buf, "%a, %d %b %Y %H:%M:%S GMT", &tm);
  return buf;
}

/// Empties OpenSSL's thread error queue on scope exit: failed parses and
/// verifications leave entries there that a later, unrelated call (TLS on
/// the same thread) would otherwise report as its own.
struct openssl_errors_cleared {
  ~openssl_errors_cleared() { ERR_clear_error(); }
};

std::string pem_of(std::string_view der) {
  const std::string b64 = crypto::base64_encode(der);
  std::string out = "-----BEGIN CERTIFICATE-----\n";
  for (std::size_t i = 0; i < b64.size(); i += 64)
    out.append(b64, i, 64).append("\n");
  return out + "-----END CERTIFICATE-----\n";
}

/// The certificate text of a body: {certificate} or ARM's {properties: {certificate}}.
const json* body_member(const json& body, const char* name) {
  if (!body.is_object())
    return nullptr;
  if (auto it = body.find(name); it != body.end())
    return &*it;
  if (auto p = body.find("properties"); p != body.end() && p->is_object())
    if (auto it = p->find(name); it != p->end())
      return &*it;
  return nullptr;
}

/// DER of the one certificate in `text`, or why there is none.
error read_certificate(const json* text, const char* what, std::string& der) {
  if (text == nullptr || !text->is_string() || text->get<std::string>().empty())
    return {error_code::invalid_certificate,
            std::string(what) + ": the body needs 'certificate', a PEM or base64 DER X.509 "
                                "certificate (string)"};
  const auto& s = text->get_ref<const std::string&>();
  if (s.find("PRIVATE KEY") != std::string::npos)
    return {error_code::invalid_certificate,
            std::string(what) + ": the text holds a private key; send only the certificate "
                                "(never upload a private key)"};
  const std::string_view begin = "-----BEGIN CERTIFICATE-----";
  auto first = s.find(begin);
  if (first != std::string::npos && s.find(begin, first + 1) != std::string::npos)
    return {error_code::invalid_certificate,
            std::string(what) + ": the text holds more than one certificate; send exactly one"};
  if (!certificate_der(s, der))
    return {error_code::invalid_certificate,
            std::string(what) + ": not a PEM or base64 DER X.509 certificate (unreadable "
                                "PEM block, base64 or DER)"};
  return {};
}

using crl_ptr = std::unique_ptr<X509_CRL, x509_free<X509_CRL, X509_CRL_free>>;

crl_ptr parse_crl_der(std::string_view der) {
  return parse_exact_der<X509_CRL, d2i_X509_CRL, X509_CRL_free>(der);
}

/// DER of a CRL given as PEM (one X509 CRL block) or base64 DER.
bool crl_der(std::string_view text, std::string& der) {
  openssl_errors_cleared cleared;
  constexpr std::string_view begin = "-----BEGIN X509 CRL-----";
  constexpr std::string_view end = "-----END X509 CRL-----";
  if (text.find("-----BEGIN") != std::string_view::npos) {
    auto b = text.find(begin);
    auto e = text.find(end);
    if (b == std::string_view::npos || e == std::string_view::npos || e < b
        || text.find(begin, b + 1) != std::string_view::npos)
      return false;
    text = text.substr(b + begin.size(), e - b - begin.size());
  }
  std::string b64;
  for (char c : text)
    if (c != '\r' && c != '\n' && c != ' ' && c != '\t')
      b64.push_back(c);
  auto raw = crypto::base64_decode(b64);
  if (!raw || !parse_crl_der(*raw))
    return false;
  der = std::move(*raw);
  return true;
}

std::string upper_hex_random(std::size_t bytes) {
  return upper_hex(crypto::random_bytes(bytes));
}

} // namespace

static json ca_public_unchecked(const json& doc);
static void resolve_ca_unchecked(const std::string* stored_doc, ca_reference& ref);

bool valid_certificate_name(std::string_view name) {
  // A leading dot: no hidden-file lookalikes, and never "." or ".." (path segments).
  if (name.empty() || name.size() > 128 || name.front() == '.')
    return false;
  for (char c : name)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
          || c == '-' || c == '.' || c == '_'))
      return false;
  return true;
}

error ca_upload(const std::string& name, const json& body, const json* existing,
                int64_t now_ms, json& out) {
  if (!body.is_object())
    return {error_code::malformed_json, "the body must be a JSON object"};
  if (const json* v = body_member(body, "isVerified"); v != nullptr && !v->is_null()) {
    if (!v->is_boolean())
      return {error_code::bad_request, "isVerified must be a boolean"};
    if (v->get<bool>())
      return {error_code::bad_request,
              "isVerified true is refused: a CA is verified only by proof of possession "
              "(POST /certificates/" + name + "/generateVerificationCode, then /verify with a "
              "certificate signed by the CA whose subject CN is the code)"};
  }
  std::string der;
  if (auto err = read_certificate(body_member(body, "certificate"), "CA certificate", der))
    return err;
  auto cert = parse_der(der);
  if (X509_check_ca(cert.get()) < 1)
    return {error_code::invalid_certificate,
            "the certificate '" + name_text(X509_get_subject_name(cert.get()))
              + "' is not a CA certificate (it needs basicConstraints CA:TRUE, and keyCertSign "
                "when it has a keyUsage); upload the root or intermediate CA that signs the "
                "devices' certificates"};
  const int64_t not_after = epoch_of(X509_get0_notAfter(cert.get()));
  if (not_after * 1000 < now_ms)
    return {error_code::invalid_certificate,
            "the CA certificate '" + name_text(X509_get_subject_name(cert.get()))
              + "' expired at " + utc_text(not_after)};
  const std::string b64 = crypto::base64_encode(der);
  const bool same = existing != nullptr && existing->value("certificate", std::string()) == b64;
  out = json::object();
  out["name"] = name;
  out["certificate"] = b64;
  out["subject"] = name_text(X509_get_subject_name(cert.get()));
  out["thumbprint"] = upper_hex(sha1_of(der));
  out["sha256Thumbprint"] = upper_hex(sha256_of(der));
  out["notBefore"] = epoch_of(X509_get0_notBefore(cert.get()));
  out["expiry"] = not_after;
  // Re-uploading the same certificate keeps its proof; another one needs its own.
  out["isVerified"] = same && existing->value("isVerified", false);
  out["verificationCode"] = same ? existing->value("verificationCode", std::string()) : "";
  // CRLs belong to the CA they were uploaded with.
  out["crls"] = same ? existing->value("crls", json::array()) : json::array();
  out["created"] = existing != nullptr ? existing->value("created", now_ms) : now_ms;
  out["updated"] = now_ms;
  out["etag"] = new_etag();
  return {};
}

void ca_new_verification_code(json& doc, int64_t now_ms) {
  doc["verificationCode"] = upper_hex_random(24);
  doc["updated"] = now_ms;
  doc["etag"] = new_etag();
}

error ca_verify(json& doc, const json& body, int64_t now_ms) {
  openssl_errors_cleared cleared;
  const std::string name = doc.value("name", std::string());
  const std::string code = doc.value("verificationCode", std::string());
  if (code.empty())
    return {error_code::invalid_certificate,
            "CA '" + name + "' has no outstanding verification code: POST /certificates/" + name
              + "/generateVerificationCode first"};
  std::string der;
  if (auto err = read_certificate(body_member(body, "certificate"), "verification certificate",
                                  der))
    return err;
  auto proof = parse_der(der);
  auto raw = crypto::base64_decode(doc.value("certificate", std::string()));
  auto ca = raw ? parse_der(*raw) : x509_ptr();
  if (!ca)
    return {error_code::storage_failure, "stored CA '" + name + "' is unreadable"};
  const std::string cn = common_name(proof.get());
  if (cn != code)
    return {error_code::invalid_certificate,
            "the verification certificate's subject CN is '" + cn
              + "', not CA '" + name + "''s verification code '" + code
              + "' (codes are single-use: the latest generateVerificationCode answer counts)"};
  EVP_PKEY* ca_key = X509_get0_pubkey(ca.get());
  if (X509_NAME_cmp(X509_get_issuer_name(proof.get()), X509_get_subject_name(ca.get())) != 0
      || ca_key == nullptr || X509_verify(proof.get(), ca_key) != 1)
    return {error_code::invalid_certificate,
            "the verification certificate (issuer '"
              + name_text(X509_get_issuer_name(proof.get()))
              + "') is not signed by CA '" + name + "' ('"
              + name_text(X509_get_subject_name(ca.get()))
              + "'): sign it with that CA's private key to prove you hold it"};
  const int64_t now_s = now_ms / 1000;
  const int64_t nb = epoch_of(X509_get0_notBefore(proof.get()));
  const int64_t na = epoch_of(X509_get0_notAfter(proof.get()));
  if (now_s < nb || now_s > na)
    return {error_code::invalid_certificate,
            "the verification certificate is valid only from " + utc_text(nb) + " to "
              + utc_text(na)};
  doc["isVerified"] = true;
  doc["verificationCode"] = "";
  doc["updated"] = now_ms;
  doc["etag"] = new_etag();
  return {};
}

error ca_put_crl(json& doc, const json& body, int64_t now_ms) {
  openssl_errors_cleared cleared;
  const std::string name = doc.value("name", std::string());
  const json* text = body_member(body, "crl");
  if (text == nullptr || !text->is_string() || text->get<std::string>().empty())
    return {error_code::invalid_certificate,
            "the body needs 'crl', a PEM (X509 CRL) or base64 DER certificate revocation list"};
  std::string der;
  if (!crl_der(text->get<std::string>(), der))
    return {error_code::invalid_certificate,
            "'crl' is not one PEM X509 CRL block or base64 DER CRL"};
  auto crl = parse_crl_der(der);
  auto raw = crypto::base64_decode(doc.value("certificate", std::string()));
  auto ca = raw ? parse_der(*raw) : x509_ptr();
  if (!ca)
    return {error_code::storage_failure, "stored CA '" + name + "' is unreadable"};
  const X509_NAME* issuer = X509_CRL_get_issuer(crl.get());
  // The CA's own CRL is checked now; an intermediate's when a chain presents
  // that intermediate (its key is not known here).
  if (X509_NAME_cmp(issuer, X509_get_subject_name(ca.get())) == 0
      && X509_CRL_verify(crl.get(), X509_get0_pubkey(ca.get())) != 1)
    return {error_code::invalid_certificate,
            "the CRL names CA '" + name + "' ('" + name_text(issuer)
              + "') as its issuer but is not signed by that CA's key"};
  // Already past its nextUpdate: attestation would refuse every device it
  // covers (x509.cpp), so say so now.
  if (const ASN1_TIME* next = X509_CRL_get0_nextUpdate(crl.get());
      next != nullptr && epoch_of(next) < now_ms / 1000)
    return {error_code::invalid_certificate,
            "the CRL of '" + name_text(issuer) + "' is stale: its nextUpdate ("
              + utc_text(epoch_of(next)) + ") has passed; upload its issuer's current CRL"};
  json kept = json::array();
  for (const auto& c : doc.value("crls", json::array())) {
    auto other = c.is_string() ? crypto::base64_decode(c.get<std::string>())
                               : std::optional<std::string>();
    auto parsed = other ? parse_crl_der(*other) : crl_ptr();
    if (!parsed)
      continue;
    if (X509_NAME_cmp(X509_CRL_get_issuer(parsed.get()), issuer) != 0) {
      kept.push_back(c);
      continue;
    }
    // Only a newer CRL replaces the stored one of its issuer: an old CRL
    // (from before a revocation) must not be replayed over a current one.
    const int64_t stored_at = epoch_of(X509_CRL_get0_lastUpdate(parsed.get()));
    const int64_t new_at = epoch_of(X509_CRL_get0_lastUpdate(crl.get()));
    if (new_at <= stored_at)
      return {error_code::invalid_certificate,
              "CA '" + name + "' already holds a CRL of '" + name_text(issuer)
                + "' issued " + utc_text(stored_at) + "; this one (issued " + utc_text(new_at)
                + ") is not newer, so it does not replace it"};
  }
  if (kept.size() >= 16)
    return {error_code::invalid_certificate,
            "CA '" + name + "' already holds 16 CRLs (one per issuer)"};
  kept.push_back(crypto::base64_encode(der));
  doc["crls"] = std::move(kept);
  doc["updated"] = now_ms;
  doc["etag"] = new_etag();
  return {};
}

json ca_public(const json& doc) {
  // A stored entry is checked by ca_doc_problem on the way in; one written
  // before that (or by hand) must not throw out of a list: show its name only.
  try {
    return ca_public_unchecked(doc);
  } catch (const json::exception&) {
    const std::string name = doc.is_object() && doc.contains("name") && doc["name"].is_string()
                               ? doc["name"].get<std::string>()
                               : std::string();
    return json{{"name", name},
                {"id", "/certificates/" + name},
                {"type", "Microsoft.Devices/ProvisioningServices/Certificates"},
                {"properties", {{"subject", ""}, {"isVerified", false}}}};
  }
}

static json ca_public_unchecked(const json& doc) {
  const std::string name = doc.value("name", std::string());
  auto raw = crypto::base64_decode(doc.value("certificate", std::string()));
  json props{{"subject", doc.value("subject", std::string())},
             {"expiry", rfc1123(doc.value("expiry", int64_t{0}))},
             {"thumbprint", doc.value("thumbprint", std::string())},
             {"sha256Thumbprint", doc.value("sha256Thumbprint", std::string())},
             {"isVerified", doc.value("isVerified", false)},
             {"certificate", raw ? pem_of(*raw) : std::string()},
             {"created", rfc1123(doc.value("created", int64_t{0}) / 1000)},
             {"updated", rfc1123(doc.value("updated", int64_t{0}) / 1000)}};
  json crls = json::array();
  for (const auto& c : doc.value("crls", json::array())) {
    auto der = c.is_string() ? crypto::base64_decode(c.get<std::string>())
                             : std::optional<std::string>();
    auto crl = der ? parse_crl_der(*der) : crl_ptr();
    if (!crl)
      continue;
    const ASN1_TIME* next = X509_CRL_get0_nextUpdate(crl.get());
    crls.push_back({{"issuer", name_text(X509_CRL_get_issuer(crl.get()))},
                    {"lastUpdate", utc_text(epoch_of(X509_CRL_get0_lastUpdate(crl.get())))},
                    {"nextUpdate", next != nullptr ? utc_text(epoch_of(next)) : std::string()},
                    {"revoked", sk_X509_REVOKED_num(X509_CRL_get_REVOKED(crl.get()))}});
  }
  if (!crls.empty())
    props["crls"] = std::move(crls);
  return json{{"name", name},
              {"etag", doc.value("etag", std::string())},
              {"id", "/certificates/" + name},
              {"type", "Microsoft.Devices/ProvisioningServices/Certificates"},
              {"properties", std::move(props)}};
}

json ca_verification_public(const json& doc) {
  json j = ca_public(doc);
  j["properties"]["verificationCode"] = doc.value("verificationCode", std::string());
  return j;
}

void resolve_ca(const std::string* stored_doc, ca_reference& ref) {
  try {
    resolve_ca_unchecked(stored_doc, ref);
  } catch (const json::exception&) {
    // Wrong-typed fields: missing, like an unreadable entry.
    ref.der.clear();
    ref.crls.clear();
    ref.cert.reset();
    ref.parsed_crls.clear();
    ref.status = ca_reference::state::missing;
  }
}

void resolve_parsed(ca_reference& ref) {
  ref.cert = ref.der.empty() ? nullptr : shared_der(ref.der);
  ref.parsed_crls.clear();
  for (const auto& der : ref.crls)
    if (auto crl = shared_crl_der(der))
      ref.parsed_crls.push_back(std::move(crl));
}

static void resolve_ca_unchecked(const std::string* stored_doc, ca_reference& ref) {
  ref.der.clear();
  ref.crls.clear();
  ref.cert.reset();
  ref.parsed_crls.clear();
  ref.status = ca_reference::state::missing;
  if (stored_doc == nullptr)
    return;
  auto j = json::parse(*stored_doc, nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return; // unreadable counts as missing: it admits nothing
  auto raw = crypto::base64_decode(j.value("certificate", std::string()));
  if (!raw)
    return;
  ref.der = std::move(*raw);
  ref.crls.clear();
  for (const auto& c : j.value("crls", json::array()))
    if (auto der = c.is_string() ? crypto::base64_decode(c.get<std::string>())
                                 : std::optional<std::string>())
      ref.crls.push_back(std::move(*der));
  ref.status = j.value("isVerified", false) ? ca_reference::state::verified
                                            : ca_reference::state::unverified;
  resolve_parsed(ref);
}

int64_t ca_revision(const json& doc) noexcept {
  auto it = doc.find("revision");
  if (it == doc.end() || !it->is_number_integer())
    return 0;
  return std::max<int64_t>(0, it->get<int64_t>());
}

json ca_deleted_marker(const std::string& name, int64_t revision) {
  return json{{"name", name}, {"deleted", true}, {"revision", revision}};
}

bool ca_is_deleted_marker(const json& doc) noexcept {
  auto it = doc.find("deleted");
  return it != doc.end() && it->is_boolean() && it->get<bool>();
}

std::string ca_deleted_meta_key(std::string_view key) {
  return "certificate.deleted/" + std::string(key);
}

bool ca_supersedes(int64_t incoming, bool is_delete, int64_t stored) noexcept {
  if (is_delete)
    return incoming >= stored;
  return incoming > stored || (incoming == 0 && stored == 0);
}

std::string ca_doc_problem(std::string_view key, const json& doc) {
  if (!doc.is_object())
    return "the value is not a JSON object";
  auto it = doc.find("name");
  if (it == doc.end() || !it->is_string() || !valid_certificate_name(it->get<std::string>())
      || key_of(it->get<std::string>()) != key)
    return "the CA document's name is not a valid certificate name matching the key";
  if (auto r = doc.find("revision"); r != doc.end() && !(r->is_number_integer() && *r >= 0))
    return "the CA document's revision is not a non-negative integer";
  if (auto d = doc.find("deleted"); d != doc.end()) {
    if (!d->is_boolean() || !d->get<bool>())
      return "the CA deletion marker's deleted is not true";
    if (ca_revision(doc) < 1)
      return "the CA deletion marker has no revision";
    return {};
  }
  auto c = doc.find("certificate");
  if (c == doc.end() || !c->is_string())
    return "the CA document has no certificate";
  auto der = crypto::base64_decode(c->get<std::string>());
  if (!der || !parse_der(*der))
    return "the CA document's certificate is not base64 DER of one X.509 certificate";
  auto has_wrong = [&](const char* field, bool (json::*is)() const noexcept) {
    auto f = doc.find(field);
    return f != doc.end() && !((*f).*is)();
  };
  if (has_wrong("isVerified", &json::is_boolean))
    return "the CA document's isVerified is not a boolean";
  for (const char* f : {"expiry", "notBefore", "created", "updated"})
    if (has_wrong(f, &json::is_number_integer))
      return std::string("the CA document's ") + f + " is not an integer";
  for (const char* f : {"subject", "thumbprint", "sha256Thumbprint", "verificationCode", "etag"})
    if (has_wrong(f, &json::is_string))
      return std::string("the CA document's ") + f + " is not a string";
  if (auto crls = doc.find("crls"); crls != doc.end()) {
    if (!crls->is_array())
      return "the CA document's crls is not an array";
    for (const auto& crl : *crls)
      if (!crl.is_string())
        return "the CA document's crls holds a value that is not a string";
  }
  return {};
}

} // namespace prov::enrollment
