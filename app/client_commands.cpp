#include "app/client_commands.hpp"

#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "actors/attestation/sas_token.hpp"
#include "net/https_client.hpp"
#include "messages/crypto.hpp"
#include "messages/error.hpp"

namespace {

using nlohmann::json;
using prov::error;
using prov::error_code;
using prov::net::http_headers;
using prov::net::https_client;
using prov::net::https_response;

constexpr const char* service_api_version = "2021-10-01";
constexpr const char* device_api_version = "2021-06-01";
constexpr uint16_t default_port = 8443;
constexpr int64_t sas_lifetime_s = 3600;

// ---- options shared by every client subcommand ------------------------------

struct common_options {
  std::string data_dir = "./data";
  std::string server;            ///< HOST:PORT; "" = endpoints.json / localhost:8443
  std::string ca;                ///< "" = <data_dir>/tls/ca.pem
  std::string connection_string; ///< "" = built from <data_dir>/identity.json
  bool json = false;
};

void add_common_options(CLI::App* sub, common_options& c) {
  sub->add_option("--data-dir", c.data_dir,
                  "Server data directory (endpoints.json, identity.json, tls/ca.pem)")
      ->capture_default_str();
  sub->add_option("--server", c.server,
                  "HOST:PORT of the server (default: <data-dir>/endpoints.json, else localhost:8443)");
  sub->add_option("--ca", c.ca, "CA certificate (PEM) the server must chain to (default <data-dir>/tls/ca.pem)");
  sub->add_option("--connection-string", c.connection_string,
                  "HostName=...;SharedAccessKeyName=...;SharedAccessKey=... "
                  "(default: built from <data-dir>/identity.json)");
  sub->add_flag("--json", c.json, "Print raw JSON instead of tables");
}

// ---- small helpers -------------------------------------------------------------

int fail(const error& e) {
  std::cerr << "error: " << static_cast<int32_t>(e.code) << " " << e.message << "\n";
  return 1;
}

std::string path_join(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

/// Reads a JSON file; nullopt (and `err`) when missing or malformed.
std::optional<json> read_json_file(const std::string& path, error& err) {
  std::ifstream in(path);
  if (!in) {
    err = {error_code::not_found, "cannot read " + path};
    return std::nullopt;
  }
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    err = {error_code::malformed_json, path + " is not a JSON object"};
    return std::nullopt;
  }
  return j;
}

std::string str_member(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return {};
  if (it->is_string()) return it->get<std::string>();
  return it->dump();
}

/// A path segment: RFC 3986 pchar kept (registration ids use [A-Za-z0-9-._:]),
/// everything else percent-encoded.
std::string segment(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == ':' || c == '@') {
      out += c;
    } else {
      out += prov::crypto::url_encode(std::string_view(&c, 1));
    }
  }
  return out;
}

/// "2026-11-26T12:00:00.1230000Z" -> "2026-11-26T12:00:00Z" for tables.
std::string short_time(const std::string& t) {
  auto dot = t.find('.');
  if (dot == std::string::npos || t.empty() || t.back() != 'Z') return t;
  return t.substr(0, dot) + "Z";
}

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string out;
  for (const auto& s : v) {
    if (!out.empty()) out += sep;
    out += s;
  }
  return out;
}

/// Column-aligned table: header row, then rows; two spaces between columns.
void print_table(const std::vector<std::string>& header,
                 const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> width(header.size(), 0);
  for (std::size_t i = 0; i < header.size(); ++i) width[i] = header[i].size();
  for (const auto& r : rows)
    for (std::size_t i = 0; i < r.size() && i < width.size(); ++i)
      width[i] = std::max(width[i], r[i].size());
  auto line = [&](const std::vector<std::string>& cells) {
    std::string out;
    for (std::size_t i = 0; i < cells.size(); ++i) {
      out += cells[i];
      if (i + 1 < cells.size()) out += std::string(width[i] - cells[i].size() + 2, ' ');
    }
    std::cout << out << "\n";
  };
  line(header);
  for (const auto& r : rows) line(r);
}

/// Two-column "FIELD  value" listing of one object (empty values skipped).
void print_fields(const std::vector<std::pair<std::string, std::string>>& fields) {
  std::size_t w = 0;
  for (const auto& [k, v] : fields)
    if (!v.empty()) w = std::max(w, k.size());
  for (const auto& [k, v] : fields)
    if (!v.empty()) std::cout << k << std::string(w - k.size() + 2, ' ') << v << "\n";
}

// ---- where the server is and who we are ------------------------------------------

struct connection_string_parts {
  std::string host_name, key_name, key;
};

error parse_connection_string(const std::string& cs, connection_string_parts& out) {
  std::stringstream ss(cs);
  std::string part;
  while (std::getline(ss, part, ';')) {
    if (part.empty()) continue;
    auto eq = part.find('='); // keys are base64: split at the first '=' only
    if (eq == std::string::npos)
      return {error_code::bad_request, "connection string part '" + part + "' has no '='"};
    std::string k = part.substr(0, eq), v = part.substr(eq + 1);
    if (k == "HostName") out.host_name = v;
    else if (k == "SharedAccessKeyName") out.key_name = v;
    else if (k == "SharedAccessKey") out.key = v;
  }
  if (out.host_name.empty() || out.key_name.empty() || out.key.empty())
    return {error_code::bad_request,
            "connection string needs HostName, SharedAccessKeyName and SharedAccessKey"};
  return {};
}

/// Everything a subcommand needs to reach the server.
struct target {
  prov::net::https_client_options http;
  json identity = json::object(); ///< identity.json, {} when absent
};

/// Resolves --server / endpoints.json and --ca. `endpoint_key` picks the
/// endpoints.json member ("service_api" falls back to "device_api").
/// `tls_name` is checked against the certificate when the address came from
/// endpoints.json (which may say 0.0.0.0).
error resolve_target(const common_options& c, const char* endpoint_key,
                     const std::string& tls_name, target& out) {
  error ignored;
  if (auto id = read_json_file(path_join(c.data_dir, "identity.json"), ignored)) out.identity = *id;

  std::string address = c.server;
  bool from_file = false;
  if (address.empty()) {
    if (auto ep = read_json_file(path_join(c.data_dir, "endpoints.json"), ignored)) {
      // The running server's id scope wins (a config may set id_scope).
      if (auto scope = str_member(*ep, "id_scope"); !scope.empty())
        out.identity["id_scope"] = scope;
      address = str_member(*ep, endpoint_key);
      if (address.empty()) address = str_member(*ep, "device_api");
      from_file = !address.empty();
    }
  }
  if (address.empty()) address = "localhost:" + std::to_string(default_port);
  std::string host;
  uint16_t port = 0;
  if (auto err = prov::net::split_host_port(address, default_port, host, port)) return err;
  // A wildcard listen address is dialled on loopback.
  if (host == "0.0.0.0") host = "127.0.0.1";
  if (host == "::" || host == "[::]") host = "::1";
  out.http.host = host;
  out.http.port = port;
  if (from_file && !tls_name.empty()) out.http.server_name = tls_name;
  out.http.ca_file = c.ca.empty() ? path_join(c.data_dir, "tls/ca.pem") : c.ca;
  out.http.connect_timeout = std::chrono::seconds(10);
  out.http.request_timeout = std::chrono::seconds(30);
  out.http.user_agent = "provisiond-cli/0.1";
  return {};
}

/// The body's error as "errorCode message", or the status line.
error http_error(const https_response& res) {
  json j = json::parse(res.body, nullptr, false);
  std::string msg = res.reason.empty() ? "HTTP " + std::to_string(res.status) : res.reason;
  int64_t code = static_cast<int64_t>(res.status) * 1000;
  if (j.is_object()) {
    if (j.contains("errorCode") && j["errorCode"].is_number_integer())
      code = j["errorCode"].get<int64_t>();
    std::string m = str_member(j, "message");
    if (m.empty()) m = str_member(j, "Message");
    if (!m.empty()) msg = m;
  } else if (!res.body.empty() && res.body.size() < 300) {
    msg = res.body;
  }
  return {static_cast<error_code>(code), msg};
}

// ---- service API client -----------------------------------------------------------

class service_client {
public:
  static error open(const common_options& c, std::unique_ptr<service_client>& out) {
    std::string cs = c.connection_string;
    error ignored;
    if (cs.empty()) {
      auto id = read_json_file(path_join(c.data_dir, "identity.json"), ignored);
      if (!id)
        return {error_code::unauthorized,
                "no --connection-string and no readable " +
                    path_join(c.data_dir, "identity.json")};
      std::string host = str_member(*id, "service_host");
      if (host.empty()) host = "localhost";
      std::string policy = str_member(*id, "policy_name");
      if (policy.empty()) policy = "provisioningserviceowner";
      cs = "HostName=" + host + ";SharedAccessKeyName=" + policy +
           ";SharedAccessKey=" + str_member(*id, "primary_key");
    }
    connection_string_parts parts;
    if (auto err = parse_connection_string(cs, parts)) return err;
    target t;
    if (auto err = resolve_target(c, "service_api", parts.host_name, t)) return err;
    out.reset(new service_client(std::move(parts), t.http));
    return {};
  }

  /// One call; non-2xx statuses become errors carrying the server's errorCode.
  error call(const std::string& method, const std::string& path, const std::string& body,
             https_response& res, http_headers extra = {}) {
    const int64_t se = static_cast<int64_t>(std::time(nullptr)) + sas_lifetime_s;
    // sr = url_encode(HostName); signed string = sr + "\n" + se (reference §2.3).
    std::string sas = prov::attestation::make_sas(cs_.host_name, cs_.key, se, cs_.key_name, true);
    if (sas.empty()) return {error_code::unauthorized, "SharedAccessKey is not valid base64"};
    extra.set("Authorization", sas);
    extra.set("Accept", "application/json");
    if (!body.empty()) extra.set("Content-Type", "application/json; charset=utf-8");
    std::string target = path + (path.find('?') == std::string::npos ? "?" : "&") +
                         "api-version=" + service_api_version;
    if (auto err = http_.request(method, target, extra, body, res)) return err;
    if (res.status < 200 || res.status >= 300) return http_error(res);
    return {};
  }

  error call_json(const std::string& method, const std::string& path, const std::string& body,
                  json& out, https_response* raw = nullptr, http_headers extra = {}) {
    https_response res;
    if (auto err = call(method, path, body, res, std::move(extra))) return err;
    if (raw) *raw = res;
    if (res.body.empty()) {
      out = json();
      return {};
    }
    out = json::parse(res.body, nullptr, false);
    if (out.is_discarded())
      return {error_code::malformed_json, "server sent invalid JSON for " + method + " " + path};
    return {};
  }

private:
  service_client(connection_string_parts cs, prov::net::https_client_options http)
      : cs_(std::move(cs)), http_(std::move(http)) {}
  connection_string_parts cs_;
  https_client http_;
};

// ---- enrollments and groups --------------------------------------------------------

struct enrollment_kind {
  bool group;
  const char* noun;       ///< "enrollment" / "enrollment group"
  const char* collection; ///< "/enrollments" / "/enrollmentGroups"
  const char* id_member;  ///< "registrationId" / "enrollmentGroupId"
};

constexpr enrollment_kind individual_kind{false, "enrollment", "/enrollments", "registrationId"};
constexpr enrollment_kind group_kind{true, "enrollment group", "/enrollmentGroups",
                                     "enrollmentGroupId"};

struct create_options {
  std::string id;
  std::string primary_key, secondary_key, device_id, policy, twin;
  std::string tpm_ek, tpm_srk; ///< TPM attestation: base64 TPM2B_PUBLIC
  /// certificatePolicyResourceId: an [[issuing_cas]] name or an ARM id
  /// naming it (devices may then send a csr).
  std::string issuing_ca;
  std::vector<std::string> hubs;
  bool disabled = false;
  bool iot_edge = false;
  bool show_keys = false;
  /// --policy custom: customAllocationDefinition.
  std::string webhook_url, webhook_api_version = "2021-10-01";
  int webhook_timeout_ms = 0; ///< 0: the server's [custom_allocation] default
  int webhook_retries = -1;   ///< -1: the same
};

std::string hubs_cell(const json& doc) {
  std::vector<std::string> hubs;
  if (auto it = doc.find("iotHubs"); it != doc.end() && it->is_array())
    for (const auto& h : *it)
      if (h.is_string()) hubs.push_back(h.get<std::string>());
  if (hubs.empty()) {
    std::string legacy = str_member(doc, "iotHubHostName");
    return legacy.empty() ? "(all)" : legacy;
  }
  return join(hubs, ",");
}

std::string attestation_type(const json& doc) {
  if (auto it = doc.find("attestation"); it != doc.end() && it->is_object())
    return str_member(*it, "type");
  return {};
}

std::string status_cell(const json& doc) {
  std::string s = str_member(doc, "provisioningStatus");
  return s.empty() ? "enabled" : s;
}

/// What the registration record says, for why a TPM device has no hub key.
enum class record_state { unknown, assigned, not_assigned };

void print_enrollment(const enrollment_kind& k, const json& doc, const json* mechanism,
                      record_state assigned = record_state::unknown) {
  std::vector<std::pair<std::string, std::string>> f;
  f.emplace_back(k.group ? "GROUP ID" : "REGISTRATION ID", str_member(doc, k.id_member));
  if (!k.group) f.emplace_back("DEVICE ID", str_member(doc, "deviceId"));
  f.emplace_back("STATUS", status_cell(doc));
  f.emplace_back("ATTESTATION", attestation_type(doc));
  std::string policy = str_member(doc, "allocationPolicy");
  f.emplace_back("ALLOCATION", policy.empty() ? "(default)" : policy);
  f.emplace_back("HUBS", hubs_cell(doc));
  if (auto it = doc.find("customAllocationDefinition"); it != doc.end() && it->is_object()) {
    // The URL without its query: an Azure Functions key travels there.
    std::string url = str_member(*it, "webhookUrl");
    if (auto q = url.find('?'); q != std::string::npos) url = url.substr(0, q) + "?...";
    f.emplace_back("WEBHOOK", url);
    std::string limits;
    if (it->contains("timeoutMs")) limits += "timeoutMs=" + it->at("timeoutMs").dump();
    if (it->contains("retries"))
      limits += (limits.empty() ? "" : " ") + std::string("retries=") + it->at("retries").dump();
    f.emplace_back("WEBHOOK LIMITS", limits);
  }
  {
    // Either shape of the issuance policy (docs/x509.md).
    std::string ca;
    if (auto it = doc.find("clientCertificateIssuancePolicy"); it != doc.end() && it->is_object())
      ca = str_member(*it, "certificateAuthorityName");
    if (ca.empty()) ca = str_member(doc, "certificatePolicyResourceId");
    if (!ca.empty()) f.emplace_back("ISSUING CA", ca);
  }
  if (auto it = doc.find("capabilities"); it != doc.end() && it->is_object())
    f.emplace_back("IOT EDGE", it->value("iotEdge", false) ? "true" : "false");
  if (auto it = doc.find("reprovisionPolicy"); it != doc.end() && it->is_object())
    f.emplace_back("REPROVISION",
                   std::string("updateHubAssignment=") +
                       (it->value("updateHubAssignment", true) ? "true" : "false") +
                       " migrateDeviceData=" +
                       (it->value("migrateDeviceData", true) ? "true" : "false"));
  if (auto it = doc.find("initialTwin"); it != doc.end() && !it->is_null())
    f.emplace_back("INITIAL TWIN", it->dump());
  if (auto it = doc.find("attestation"); it != doc.end() && it->is_object()) {
    // TPM keys are public: shown without --show-keys (as SHA-256, for
    // comparing with what the device sends; --json prints them whole).
    const json& tpm = it->value("tpm", json::object());
    for (auto [member, label] : {std::pair{"endorsementKey", "ENDORSEMENT KEY"},
                                 std::pair{"storageRootKey", "STORAGE ROOT KEY"}}) {
      std::string b64 = str_member(tpm, member);
      auto bytes = b64.empty() ? std::nullopt : prov::crypto::base64_decode(b64);
      if (bytes) {
        auto d = prov::crypto::sha256(*bytes);
        f.emplace_back(label, std::to_string(bytes->size()) + " bytes, SHA-256 "
                                + prov::crypto::hex(std::string_view(
                                    reinterpret_cast<const char*>(d.data()), d.size())));
      }
    }
  }
  if (mechanism && mechanism->contains("symmetricKey")) {
    const json& sk = mechanism->value("symmetricKey", json::object());
    f.emplace_back("PRIMARY KEY", str_member(sk, "primaryKey"));
    f.emplace_back("SECONDARY KEY", str_member(sk, "secondaryKey"));
  }
  if (mechanism && mechanism->contains("tpm")) {
    const json& tpm = mechanism->value("tpm", json::object());
    if (auto hk = tpm.find("iotHubKey"); hk != tpm.end() && hk->is_object()) {
      f.emplace_back("IOT HUB KEY", str_member(*hk, "primaryKey"));
      f.emplace_back("HUB KEY OPERATION", str_member(*hk, "operationId"));
    } else {
      // The server withholds the key of an assigned device too: when a
      // later register answered a new challenge and failed, the assignment's
      // challenge is gone (docs/device-api.md#the-hub-key-of-a-tpm-device).
      f.emplace_back("IOT HUB KEY",
                     assigned == record_state::assigned
                       ? "(none: a later register answered a newer TPM challenge and failed, "
                         "so this assignment's key cannot be made; the device's next "
                         "assignment has one)"
                     : assigned == record_state::not_assigned
                       ? "(none: no assigned TPM registration)"
                       : "(none: no assigned TPM registration, or a later register answered a "
                         "newer TPM challenge and failed)");
    }
  }
  if (auto it = doc.find("registrationState"); it != doc.end() && it->is_object()) {
    f.emplace_back("REGISTRATION", str_member(*it, "status"));
    f.emplace_back("ASSIGNED HUB", str_member(*it, "assignedHub"));
  }
  f.emplace_back("CREATED", short_time(str_member(doc, "createdDateTimeUtc")));
  f.emplace_back("UPDATED", short_time(str_member(doc, "lastUpdatedDateTimeUtc")));
  f.emplace_back("ETAG", str_member(doc, "etag"));
  print_fields(f);
}

/// Fetches keys for `get --show-keys` / `create --show-keys`.
error fetch_mechanism(service_client& svc, const enrollment_kind& k, const std::string& id,
                      json& mechanism) {
  return svc.call_json("POST", std::string(k.collection) + "/" + segment(id) +
                                   "/attestationmechanism",
                       "", mechanism);
}

int run_create(const common_options& c, const enrollment_kind& k, const create_options& o) {
  json body = json::object();
  body[k.id_member] = o.id;
  json sk = json::object();
  if (!o.primary_key.empty()) sk["primaryKey"] = o.primary_key;
  if (!o.secondary_key.empty()) sk["secondaryKey"] = o.secondary_key;
  if (!o.tpm_ek.empty()) {
    if (!o.primary_key.empty() || !o.secondary_key.empty())
      return fail({error_code::bad_request, "--tpm-ek and symmetric keys exclude each other"});
    json tpm = {{"endorsementKey", o.tpm_ek}};
    if (!o.tpm_srk.empty()) tpm["storageRootKey"] = o.tpm_srk;
    body["attestation"] = {{"type", "tpm"}, {"tpm", tpm}};
  } else if (!o.tpm_srk.empty()) {
    return fail({error_code::bad_request, "--tpm-srk needs --tpm-ek"});
  } else {
    // Omitted keys: the server generates 64-byte keys, as DPS does.
    body["attestation"] = {{"type", "symmetricKey"}, {"symmetricKey", sk}};
  }
  if (!o.device_id.empty()) body["deviceId"] = o.device_id;
  if (!o.hubs.empty()) body["iotHubs"] = o.hubs;
  if (!o.policy.empty()) body["allocationPolicy"] = o.policy;
  if (o.policy == "custom" && o.webhook_url.empty())
    return fail({error_code::custom_allocation_required, "--policy custom needs --webhook-url"});
  if (!o.webhook_url.empty()) {
    // The server validates the definition (https URL, limits), as for any client.
    json def = {{"webhookUrl", o.webhook_url}, {"apiVersion", o.webhook_api_version}};
    if (o.webhook_timeout_ms > 0) def["timeoutMs"] = o.webhook_timeout_ms;
    if (o.webhook_retries >= 0) def["retries"] = o.webhook_retries;
    body["customAllocationDefinition"] = std::move(def);
  } else if (o.webhook_timeout_ms > 0 || o.webhook_retries >= 0) {
    return fail({error_code::bad_request, "--webhook-timeout-ms and --webhook-retries need --webhook-url"});
  }
  body["provisioningStatus"] = o.disabled ? "disabled" : "enabled";
  if (o.iot_edge) body["capabilities"] = {{"iotEdge", true}};
  if (!o.issuing_ca.empty()) body["certificatePolicyResourceId"] = o.issuing_ca;
  if (!o.twin.empty()) {
    json twin = json::parse(o.twin, nullptr, false);
    if (twin.is_discarded() || !twin.is_object())
      return fail({error_code::malformed_json, "--twin is not a JSON object"});
    body["initialTwin"] = std::move(twin);
  }

  std::unique_ptr<service_client> svc;
  if (auto err = service_client::open(c, svc)) return fail(err);
  json doc;
  if (auto err = svc->call_json("PUT", std::string(k.collection) + "/" + segment(o.id),
                                body.dump(), doc))
    return fail(err);
  json mechanism;
  bool have_keys = false;
  if (o.show_keys) {
    if (auto err = fetch_mechanism(*svc, k, o.id, mechanism)) return fail(err);
    have_keys = true;
  }
  if (c.json) {
    if (have_keys && doc.is_object()) doc["attestation"] = mechanism;
    std::cout << doc.dump(2) << "\n";
  } else {
    print_enrollment(k, doc, have_keys ? &mechanism : nullptr);
  }
  return 0;
}

int run_get(const common_options& c, const enrollment_kind& k, const std::string& id,
            bool show_keys) {
  std::unique_ptr<service_client> svc;
  if (auto err = service_client::open(c, svc)) return fail(err);
  json doc;
  if (auto err = svc->call_json("GET", std::string(k.collection) + "/" + segment(id), "", doc))
    return fail(err);
  json mechanism;
  if (show_keys) {
    if (auto err = fetch_mechanism(*svc, k, id, mechanism)) return fail(err);
  }
  if (c.json) {
    if (show_keys && doc.is_object()) doc["attestation"] = mechanism;
    std::cout << doc.dump(2) << "\n";
  } else {
    // A TPM device without a hub key: the record tells why (best effort:
    // the policy may lack RegistrationStatusRead).
    auto assigned = record_state::unknown;
    if (show_keys && !k.group && mechanism.is_object() && mechanism.contains("tpm")
        && mechanism["tpm"].is_object() && !mechanism["tpm"].contains("iotHubKey")) {
      json rec;
      if (auto err = svc->call_json("GET", "/registrations/" + segment(id), "", rec))
        assigned = err.code == error_code::registration_not_found ? record_state::not_assigned
                                                                 : record_state::unknown;
      else
        assigned = rec.is_object() && str_member(rec, "status") == "assigned"
                     ? record_state::assigned
                     : record_state::not_assigned;
    }
    print_enrollment(k, doc, show_keys ? &mechanism : nullptr, assigned);
  }
  return 0;
}

int run_delete(const common_options& c, const std::string& collection, const std::string& noun,
               const std::string& id, const std::string& if_match) {
  std::unique_ptr<service_client> svc;
  if (auto err = service_client::open(c, svc)) return fail(err);
  https_response res;
  http_headers h;
  if (!if_match.empty()) h.set("If-Match", if_match);
  if (auto err = svc->call("DELETE", collection + "/" + segment(id), "", res, h)) return fail(err);
  if (!c.json) std::cout << "deleted " << noun << " " << id << "\n";
  return 0;
}

int run_list(const common_options& c, const enrollment_kind& k, int page_size) {
  std::unique_ptr<service_client> svc;
  if (auto err = service_client::open(c, svc)) return fail(err);
  json all = json::array();
  std::string continuation;
  // Follow x-ms-continuation until the server leaves it out (reference §4).
  for (int pages = 0; pages < 100000; ++pages) {
    http_headers h;
    if (!continuation.empty()) h.set("x-ms-continuation", continuation);
    if (page_size > 0) h.set("x-ms-max-item-count", std::to_string(page_size));
    json page;
    https_response raw;
    if (auto err = svc->call_json("POST", std::string(k.collection) + "/query",
                                  R"({"query":"*"})", page, &raw, h))
      return fail(err);
    if (page.is_array())
      for (auto& d : page) all.push_back(std::move(d));
    const std::string* next = raw.headers.find("x-ms-continuation");
    if (!next || next->empty() || *next == continuation) break;
    continuation = *next;
  }
  if (c.json) {
    std::cout << all.dump(2) << "\n";
    return 0;
  }
  std::vector<std::vector<std::string>> rows;
  for (const auto& d : all) {
    if (k.group)
      rows.push_back({str_member(d, k.id_member), status_cell(d), attestation_type(d),
                      hubs_cell(d), short_time(str_member(d, "lastUpdatedDateTimeUtc"))});
    else
      rows.push_back({str_member(d, k.id_member), str_member(d, "deviceId"), status_cell(d),
                      attestation_type(d), hubs_cell(d),
                      short_time(str_member(d, "lastUpdatedDateTimeUtc"))});
  }
  if (k.group)
    print_table({"GROUP ID", "STATUS", "ATTESTATION", "HUBS", "UPDATED"}, rows);
  else
    print_table({"REGISTRATION ID", "DEVICE ID", "STATUS", "ATTESTATION", "HUBS", "UPDATED"},
                rows);
  return 0;
}

// ---- CA certificate store ------------------------------------------------------------

error read_text_file(const std::string& path, std::string& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {error_code::not_found, "cannot read " + path};
  std::stringstream ss;
  ss << in.rdbuf();
  out = ss.str();
  return {};
}

void print_certificate(const json& doc) {
  const json props = doc.is_object() ? doc.value("properties", json::object()) : json::object();
  print_fields({{"NAME", str_member(doc, "name")},
                {"SUBJECT", str_member(props, "subject")},
                {"THUMBPRINT", str_member(props, "thumbprint")},
                {"VERIFIED", str_member(props, "isVerified")},
                {"EXPIRY", str_member(props, "expiry")},
                {"VERIFICATION CODE", str_member(props, "verificationCode")},
                {"CRLS", [&props] {
                   std::string out;
                   if (auto it = props.find("crls"); it != props.end() && it->is_array())
                     for (const auto& crl : *it)
                       out += (out.empty() ? "" : "; ") + str_member(crl, "issuer") + " ("
                              + str_member(crl, "revoked") + " revoked, next update "
                              + str_member(crl, "nextUpdate") + ")";
                   return out;
                 }()},
                {"ETAG", str_member(doc, "etag")}});
}

/// add, verification-code, verify: one call that answers a certificate.
int run_certificate_call(const common_options& c, const std::string& method,
                         const std::string& path, const std::string& cert_file,
                         const std::string& if_match, const char* hint,
                         const char* member = "certificate") {
  json body;
  if (!cert_file.empty()) {
    std::string pem;
    if (auto err = read_text_file(cert_file, pem)) return fail(err);
    body = {{member, pem}};
  }
  std::unique_ptr<service_client> svc;
  if (auto err = service_client::open(c, svc)) return fail(err);
  http_headers h;
  if (!if_match.empty()) h.set("If-Match", if_match);
  json doc;
  if (auto err = svc->call_json(method, path, body.is_null() ? "" : body.dump(), doc, nullptr, h))
    return fail(err);
  if (c.json) {
    std::cout << doc.dump(2) << "\n";
    return 0;
  }
  print_certificate(doc);
  if (hint != nullptr) std::cout << hint << "\n";
  return 0;
}

int run_certificate_get(const common_options& c, const std::string& name) {
  return run_certificate_call(c, "GET", "/certificates/" + segment(name), "", "", nullptr);
}

int run_certificate_list(const common_options& c) {
  std::unique_ptr<service_client> svc;
  if (auto err = service_client::open(c, svc)) return fail(err);
  json doc;
  if (auto err = svc->call_json("GET", "/certificates", "", doc)) return fail(err);
  if (c.json) {
    std::cout << doc.dump(2) << "\n";
    return 0;
  }
  std::vector<std::vector<std::string>> rows;
  if (doc.is_object() && doc.contains("value") && doc["value"].is_array())
    for (const auto& d : doc["value"]) {
      const json props = d.value("properties", json::object());
      rows.push_back({str_member(d, "name"), str_member(props, "subject"),
                      str_member(props, "thumbprint"),
                      props.value("isVerified", false) ? "yes" : "no",
                      str_member(props, "expiry")});
    }
  print_table({"NAME", "SUBJECT", "THUMBPRINT", "VERIFIED", "EXPIRY"}, rows);
  // Left out by the server (a stored value that does not open): said, not
  // silently missing from the table.
  if (doc.is_object() && doc.contains("unreadable") && doc["unreadable"].is_array())
    for (const auto& name : doc["unreadable"])
      std::cerr << "warning: CA " << (name.is_string() ? name.get<std::string>() : name.dump())
                << " is stored but does not open; left out (the server's log says why)\n";
  return 0;
}

// ---- linked hubs ----------------------------------------------------------------------

struct hub_options {
  std::string hostname;
  std::optional<int> weight;
  std::optional<bool> apply;
  std::optional<std::string> region;
  std::optional<std::string> health_endpoint;
};

std::string health_cell(const json& hub) {
  auto it = hub.find("health");
  if (it == hub.end() || !it->is_object()) return "-";
  std::string out = str_member(*it, "status");
  if (auto rtt = it->find("rttMs"); rtt != it->end() && rtt->is_number()) {
    char buf[32];
    std::snprintf(buf, sizeof buf, " (%.1f ms)", rtt->get<double>());
    out += buf;
  }
  return out;
}

void print_hubs(const std::vector<json>& hubs) {
  std::vector<std::vector<std::string>> rows;
  for (const auto& h : hubs)
    rows.push_back({str_member(h, "name"), str_member(h, "allocationWeight"),
                    h.value("applyAllocationPolicy", true) ? "yes" : "no",
                    str_member(h, "location").empty() ? "-" : str_member(h, "location"),
                    str_member(h, "healthEndpoint").empty() ? "-"
                                                            : str_member(h, "healthEndpoint"),
                    health_cell(h)});
  print_table({"HOSTNAME", "WEIGHT", "APPLY POLICY", "REGION", "HEALTH ENDPOINT", "HEALTH"},
              rows);
}

int run_hubs_list(const common_options& c) {
  std::unique_ptr<service_client> svc;
  if (auto err = service_client::open(c, svc)) return fail(err);
  json doc;
  if (auto err = svc->call_json("GET", "/linkedHubs", "", doc)) return fail(err);
  if (c.json) {
    std::cout << doc.dump(2) << "\n";
    return 0;
  }
  std::vector<json> hubs;
  if (doc.is_object() && doc.contains("value") && doc["value"].is_array())
    for (const auto& h : doc["value"]) hubs.push_back(h);
  print_hubs(hubs);
  return 0;
}

/// add (`update` false: every field from the options, defaults otherwise)
/// or update (the stored hub with the given options changed).
int run_hubs_put(const common_options& c, const hub_options& o, bool update) {
  std::unique_ptr<service_client> svc;
  if (auto err = service_client::open(c, svc)) return fail(err);
  const std::string path = "/linkedHubs/" + segment(o.hostname);
  json body = json::object();
  if (update) {
    if (auto err = svc->call_json("GET", path, "", body)) return fail(err);
    body.erase("health");
  }
  body["name"] = o.hostname;
  if (o.weight) body["allocationWeight"] = *o.weight;
  if (o.apply) body["applyAllocationPolicy"] = *o.apply;
  if (o.region) body["location"] = *o.region;
  if (o.health_endpoint) body["healthEndpoint"] = *o.health_endpoint;
  json doc;
  if (auto err = svc->call_json("PUT", path, body.dump(), doc)) return fail(err);
  if (c.json) {
    std::cout << doc.dump(2) << "\n";
    return 0;
  }
  print_hubs({doc});
  return 0;
}

// ---- registrations ---------------------------------------------------------------

std::string group_of(const json& rs) {
  for (const char* att : {"symmetricKey", "x509"})
    if (auto it = rs.find(att); it != rs.end() && it->is_object()) {
      std::string g = str_member(*it, "enrollmentGroupId");
      if (!g.empty()) return g;
    }
  return {};
}

/// The key the device signed with last ("primary" / "secondary"), for key rolls.
std::string key_used_of(const json& rs) {
  if (auto it = rs.find("symmetricKey"); it != rs.end() && it->is_object())
    return str_member(*it, "keyUsed");
  return {};
}

void print_registration_state(const json& rs, const std::string& operation_id = {}) {
  std::string code = str_member(rs, "errorCode");
  // Why the device is on its hub (the service API's `allocation`).
  std::string policy, why, reprovision;
  if (auto a = rs.find("allocation"); a != rs.end() && a->is_object()) {
    policy = a->value("policy", "");
    if (a->contains("servedBy"))
      policy += " (served by " + a->value("servedBy", "") + ")";
    if (a->contains("chosen"))
      policy += ", chose " + a->value("chosen", "") + " among " + a->value("candidates", "");
    if (auto w = a->find("why"); w != a->end())
      why = w->dump();
    reprovision = a->value("reprovision", "");
  }
  print_fields({{"REGISTRATION ID", str_member(rs, "registrationId")},
                {"STATUS", str_member(rs, "status")},
                {"ASSIGNED HUB", str_member(rs, "assignedHub")},
                {"DEVICE ID", str_member(rs, "deviceId")},
                {"SUBSTATUS", str_member(rs, "substatus")},
                {"ENROLLMENT GROUP", group_of(rs)},
                {"KEY USED", key_used_of(rs)},
                {"ERROR CODE", code == "0" ? "" : code},
                {"ERROR MESSAGE", str_member(rs, "errorMessage")},
                {"OPERATION ID", operation_id},
                {"CREATED", short_time(str_member(rs, "createdDateTimeUtc"))},
                {"UPDATED", short_time(str_member(rs, "lastUpdatedDateTimeUtc"))},
                {"ETAG", str_member(rs, "etag")},
                {"ALLOCATION", policy},
                {"WHY", why},
                {"REPROVISION", reprovision},
                {"PAYLOAD", rs.contains("payload") ? rs["payload"].dump() : ""}});
}

int run_registration_get(const common_options& c, const std::string& id) {
  std::unique_ptr<service_client> svc;
  if (auto err = service_client::open(c, svc)) return fail(err);
  json doc;
  if (auto err = svc->call_json("GET", "/registrations/" + segment(id), "", doc)) return fail(err);
  if (c.json)
    std::cout << doc.dump(2) << "\n";
  else
    print_registration_state(doc);
  return 0;
}

// ---- assignments ------------------------------------------------------------------

struct assignments_options {
  bool follow = false;
  std::string hub;
  uint64_t after = 0;
  int limit = 100;
};

int run_assignments(const common_options& c, const assignments_options& o) {
  std::unique_ptr<service_client> svc;
  if (auto err = service_client::open(c, svc)) return fail(err);
  uint64_t after = o.after;
  json collected = json::array();
  std::vector<std::vector<std::string>> rows;
  const std::vector<std::string> header{"SEQ", "TIME", "REGISTRATION", "DEVICE", "HUB", "SUBSTATUS", "OPERATION ID"};
  // --follow prints as it goes, so columns get fixed minimum widths.
  const std::vector<std::size_t> follow_width{6, 20, 24, 24, 32, 18, 0};
  auto print_follow_row = [&](const std::vector<std::string>& cells) {
    std::string out;
    for (std::size_t i = 0; i < cells.size(); ++i) {
      out += cells[i];
      if (i + 1 < cells.size())
        out += std::string(cells[i].size() < follow_width[i] ? follow_width[i] - cells[i].size() + 2 : 2, ' ');
    }
    std::cout << out << std::endl; // flush: someone is watching
  };
  if (o.follow && !c.json) print_follow_row(header);

  for (;;) {
    json page;
    std::string path = "/assignments?after=" + std::to_string(after) +
                       "&limit=" + std::to_string(o.limit);
    if (auto err = svc->call_json("GET", path, "", page)) return fail(err);
    if (!page.is_object())
      return fail({error_code::malformed_json, "assignments: expected {\"events\":[...],\"next\":N}"});
    const json events = page.value("events", json::array());
    uint64_t next = after;
    if (auto it = page.find("next"); it != page.end() && it->is_number_unsigned())
      next = it->get<uint64_t>();
    for (const auto& ev : events) {
      const json data = ev.value("data", json::object());
      if (!o.hub.empty() && str_member(data, "assignedHub") != o.hub) continue;
      if (c.json) {
        if (o.follow)
          std::cout << ev.dump() << std::endl; // NDJSON stream
        else
          collected.push_back(ev);
        continue;
      }
      std::vector<std::string> row{str_member(ev, "sequence"), short_time(str_member(ev, "time")),
                                   str_member(data, "registrationId"), str_member(data, "deviceId"),
                                   str_member(data, "assignedHub"), str_member(data, "substatus"),
                                   str_member(data, "operationId")};
      if (o.follow)
        print_follow_row(row);
      else
        rows.push_back(std::move(row));
    }
    const bool advanced = next > after;
    after = next;
    const bool full_page = events.size() >= static_cast<std::size_t>(o.limit);
    if (!o.follow) {
      if (!full_page || !advanced) break;
      continue;
    }
    if (!full_page || !advanced) std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  if (c.json)
    std::cout << collected.dump(2) << "\n";
  else
    print_table(header, rows);
  return 0;
}

// ---- register (device side) ---------------------------------------------------------

struct register_options {
  std::string registration_id, key, group_key, id_scope, payload;
  std::string cert, cert_key; ///< X.509: PEM chain (leaf first) and its key
  int timeout_s = 60;
};

int run_register(const common_options& c, const register_options& o) {
  const bool x509 = !o.cert.empty();
  if ((o.key.empty() ? 0 : 1) + (o.group_key.empty() ? 0 : 1) + (x509 ? 1 : 0) != 1)
    return fail({error_code::bad_request, "give exactly one of --key, --group-key or --cert"});
  std::optional<json> payload;
  if (!o.payload.empty()) {
    json p = json::parse(o.payload, nullptr, false);
    if (p.is_discarded()) return fail({error_code::malformed_json, "--payload is not valid JSON"});
    payload = std::move(p);
  }
  std::string key = o.key;
  if (!o.group_key.empty()) {
    // Group enrollment: the device key is HMAC(groupKey, registrationId).
    auto derived = prov::crypto::derive_device_key(o.group_key, o.registration_id);
    if (!derived) return fail({error_code::bad_request, "--group-key is not valid base64"});
    key = *derived;
  }

  target t;
  error ignored;
  auto identity = read_json_file(path_join(c.data_dir, "identity.json"), ignored);
  std::string tls_name = identity ? str_member(*identity, "service_host") : "";
  if (auto err = resolve_target(c, "device_api", tls_name, t)) return fail(err);
  std::string scope = o.id_scope.empty() ? str_member(t.identity, "id_scope") : o.id_scope;
  if (scope.empty())
    return fail({error_code::id_scope_not_found,
                 "no --id-scope and none in " + path_join(c.data_dir, "identity.json")});

  http_headers h;
  if (x509) {
    // X.509: the chain is presented in the TLS handshake; no Authorization.
    t.http.client_cert_file = o.cert;
    t.http.client_key_file = o.cert_key;
  } else {
    const std::string resource = scope + "/registrations/" + o.registration_id;
    const int64_t se = static_cast<int64_t>(std::time(nullptr)) + sas_lifetime_s;
    const std::string sas = prov::attestation::make_sas(resource, key, se, "registration", true);
    if (sas.empty()) return fail({error_code::bad_request, "--key is not valid base64"});
    h.set("Authorization", sas);
  }
  h.set("Accept", "application/json");
  h.set("Content-Type", "application/json; charset=utf-8");
  json body{{"registrationId", o.registration_id}};
  if (payload) body["payload"] = *payload;
  const std::string base = "/" + segment(scope) + "/registrations/" + segment(o.registration_id);
  const std::string query = std::string("?api-version=") + device_api_version;

  https_client http(t.http);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(o.timeout_s);
  auto wait_retry_after = [&](const https_response& res) {
    long secs = 2; // no Retry-After: the Node SDK's default polling interval
    if (const std::string* ra = res.headers.find("Retry-After")) {
      char* end = nullptr;
      long v = std::strtol(ra->c_str(), &end, 10);
      if (end != ra->c_str()) secs = std::clamp(v, 1L, 60L);
    }
    auto until = std::min(deadline, std::chrono::steady_clock::now() + std::chrono::seconds(secs));
    std::this_thread::sleep_until(until);
  };

  https_response res;
  json status;
  std::string operation_id;
  bool registered = false; // PUT accepted; now polling
  for (;;) {
    if (std::chrono::steady_clock::now() >= deadline)
      return fail({error_code::request_timeout,
                   "registration still assigning after " + std::to_string(o.timeout_s) + " s"});
    error err = registered
                    ? http.request("GET", base + "/operations/" + segment(operation_id) + query,
                                   h, "", res)
                    : http.request("PUT", base + "/register" + query, h, body.dump(), res);
    if (err) return fail(err);
    // Throttling and transient server errors: honour Retry-After and retry.
    if (res.status == 429 || res.status == 503) {
      wait_retry_after(res);
      continue;
    }
    if (res.status < 200 || res.status >= 300) return fail(http_error(res));
    status = json::parse(res.body, nullptr, false);
    if (!status.is_object())
      return fail({error_code::malformed_json, "server sent a non-JSON registration status"});
    std::string s = str_member(status, "status");
    if (!registered) operation_id = str_member(status, "operationId");
    if (s != "assigning" || operation_id.empty()) break;
    registered = true;
    wait_retry_after(res);
  }

  const json rs = status.value("registrationState", json::object());
  if (c.json)
    std::cout << status.dump(2) << "\n";
  else
    print_registration_state(rs.empty() ? json{{"registrationId", o.registration_id},
                                              {"status", str_member(status, "status")}}
                                        : rs,
                             operation_id);
  std::string final_status = str_member(status, "status");
  if (final_status == "assigned") return 0;
  std::string code = str_member(rs, "errorCode");
  std::string msg = str_member(rs, "errorMessage");
  if (final_status.empty()) final_status = "(none)";
  if (code.empty() || code == "0")
    std::cerr << "error: registration ended with status '" << final_status << "'"
              << (msg.empty() ? "" : ": " + msg) << "\n";
  else
    std::cerr << "error: " << code << " " << (msg.empty() ? "registration " + final_status : msg)
              << "\n";
  return 1;
}

// ---- wiring -------------------------------------------------------------------------

/// Runs `fn` as the subcommand's action; no exception leaves the callback.
template <class Fn>
void on_run(CLI::App* sub, int& exit_code, Fn fn) {
  sub->callback([&exit_code, fn]() {
    // main() blocks SIGINT/SIGTERM for `serve`'s sigwait; client commands are
    // single-threaded and must stay interruptible (assignments --follow).
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_UNBLOCK, &stop_signals, nullptr);
    try {
      exit_code = fn();
    } catch (const std::exception& e) {
      std::cerr << "error: " << static_cast<int32_t>(error_code::internal) << " " << e.what() << "\n";
      exit_code = 1;
    }
  });
}

void add_create_options(CLI::App* sub, create_options& o, bool group) {
  sub->add_option(group ? "group-id" : "registration-id", o.id,
                  group ? "Enrollment group id" : "Registration id of the device")
      ->required();
  sub->add_option("--primary-key", o.primary_key, "Base64 symmetric key (default: generated)");
  sub->add_option("--secondary-key", o.secondary_key, "Base64 symmetric key (default: generated)");
  if (!group) sub->add_option("--device-id", o.device_id, "IoT Hub device id (default: registration id)");
  if (!group) {
    sub->add_option("--tpm-ek", o.tpm_ek,
                    "TPM attestation: the endorsement key, base64 TPM2B_PUBLIC (RSA 2048), "
                    "e.g. base64 of tpm2_createek -u's file");
    sub->add_option("--tpm-srk", o.tpm_srk,
                    "TPM attestation: the storage root key, base64 TPM2B_PUBLIC (optional)");
  }
  sub->add_option("--hub", o.hubs, "Linked hub this enrollment may use (repeatable; default: all)");
  sub->add_option("--policy", o.policy, "Allocation policy (default: the server's)")
      ->check(CLI::IsMember({"hashed", "static", "geoLatency", "custom"}));
  sub->add_option("--webhook-url", o.webhook_url,
                  "--policy custom: the allocation webhook (https; an Azure Functions key may "
                  "travel in its query, ?code=...)");
  sub->add_option("--webhook-api-version", o.webhook_api_version,
                  "--policy custom: customAllocationDefinition.apiVersion")
      ->capture_default_str();
  sub->add_option("--webhook-timeout-ms", o.webhook_timeout_ms,
                  "--policy custom: per attempt, 100..600000 (default: the server's "
                  "custom_allocation.timeout_ms)");
  sub->add_option("--webhook-retries", o.webhook_retries,
                  "--policy custom: retries of a failed attempt, 0..10 (default: the server's "
                  "custom_allocation.retries)");
  sub->add_flag("--disabled", o.disabled, "Create the enrollment disabled");
  sub->add_flag("--iot-edge", o.iot_edge, "Mark devices as IoT Edge devices");
  sub->add_option("--issuing-ca", o.issuing_ca,
                  "Issue certificates from devices' CSRs with this CA ([[issuing_cas]] name, "
                  "or an ARM id .../certificateAuthorities/<ca>/certificatePolicies/<p>)");
  sub->add_option("--twin", o.twin, "Initial twin as JSON, e.g. '{\"tags\":{\"site\":\"a\"}}'");
  sub->add_flag("--show-keys", o.show_keys, "Also print the symmetric keys");
}

void add_enrollment_family(CLI::App& app, int& exit_code, const enrollment_kind& k,
                           const char* name, const char* description) {
  CLI::App* family = app.add_subcommand(name, description);
  family->require_subcommand(1);

  auto common = std::make_shared<common_options>();
  auto create = std::make_shared<create_options>();
  auto id = std::make_shared<std::string>();
  auto show_keys = std::make_shared<bool>(false);
  auto if_match = std::make_shared<std::string>();
  auto page_size = std::make_shared<int>(0);
  const char* id_name = k.group ? "group-id" : "registration-id";

  CLI::App* c = family->add_subcommand("create", std::string("Create or replace an ") + k.noun);
  add_create_options(c, *create, k.group);
  add_common_options(c, *common);
  on_run(c, exit_code, [common, create, k] { return run_create(*common, k, *create); });

  CLI::App* g = family->add_subcommand("get", std::string("Show an ") + k.noun);
  g->add_option(id_name, *id, "Id")->required();
  g->add_flag("--show-keys", *show_keys,
              "Also print the symmetric keys (TPM: the assigned device's IoT Hub key)");
  add_common_options(g, *common);
  on_run(g, exit_code, [common, id, show_keys, k] { return run_get(*common, k, *id, *show_keys); });

  CLI::App* l = family->add_subcommand("list", std::string("List ") + k.noun + "s");
  l->add_option("--page-size", *page_size, "Items per request (x-ms-max-item-count)");
  add_common_options(l, *common);
  on_run(l, exit_code, [common, page_size, k] { return run_list(*common, k, *page_size); });

  CLI::App* d = family->add_subcommand("delete", std::string("Delete an ") + k.noun);
  d->add_option(id_name, *id, "Id")->required();
  d->add_option("--if-match", *if_match, "Only delete if the etag still matches");
  add_common_options(d, *common);
  on_run(d, exit_code, [common, id, if_match, k] {
    return run_delete(*common, k.collection, k.noun, *id, *if_match);
  });
}

} // namespace

void add_client_commands(CLI::App& app, int& exit_code) {
  add_enrollment_family(app, exit_code, individual_kind, "enrollment",
                        "Manage individual enrollments (service API)");
  add_enrollment_family(app, exit_code, group_kind, "group",
                        "Manage enrollment groups (service API)");

  {
    CLI::App* cert = app.add_subcommand(
      "certificate", "Manage the CA certificate store (proof of possession; service API)");
    cert->require_subcommand(1);
    auto common = std::make_shared<common_options>();
    auto name = std::make_shared<std::string>();
    auto file = std::make_shared<std::string>();
    auto if_match = std::make_shared<std::string>();
    auto base = [name] { return "/certificates/" + segment(*name); };

    CLI::App* a = cert->add_subcommand("add", "Upload (or replace) a root or intermediate CA");
    a->add_option("name", *name, "Name of the CA in the store")->required();
    a->add_option("--file", *file, "PEM file with the CA certificate")->required();
    a->add_option("--if-match", *if_match, "Only replace if the etag still matches");
    add_common_options(a, *common);
    on_run(a, exit_code, [common, base, file, if_match] {
      return run_certificate_call(*common, "PUT", base(), *file, *if_match,
                                  "next: provisiond certificate verification-code <name>");
    });

    CLI::App* v = cert->add_subcommand(
      "verification-code", "Get a verification code for proof of possession of a CA's key");
    v->add_option("name", *name, "Name of the CA in the store")->required();
    v->add_option("--if-match", *if_match, "Only if the etag still matches");
    add_common_options(v, *common);
    on_run(v, exit_code, [common, base, if_match] {
      return run_certificate_call(
        *common, "POST", base() + "/generateVerificationCode", "", *if_match,
        "next: sign a certificate whose subject CN is the code with the CA's key, then "
        "provisiond certificate verify <name> --file <that certificate>");
    });

    CLI::App* ve = cert->add_subcommand(
      "verify", "Prove possession: a certificate signed by the CA whose CN is the code");
    ve->add_option("name", *name, "Name of the CA in the store")->required();
    ve->add_option("--file", *file, "PEM file with the verification certificate")->required();
    ve->add_option("--if-match", *if_match, "Only if the etag still matches");
    add_common_options(ve, *common);
    on_run(ve, exit_code, [common, base, file, if_match] {
      return run_certificate_call(*common, "POST", base() + "/verify", *file, *if_match,
                                  nullptr);
    });

    CLI::App* r = cert->add_subcommand(
      "crl", "Upload a CRL (of the CA or an intermediate below it); replaces that issuer's");
    r->add_option("name", *name, "Name of the CA in the store")->required();
    r->add_option("--file", *file, "PEM (X509 CRL) or base64 DER file")->required();
    r->add_option("--if-match", *if_match, "Only if the etag still matches");
    add_common_options(r, *common);
    on_run(r, exit_code, [common, base, file, if_match] {
      return run_certificate_call(*common, "PUT", base() + "/crl", *file, *if_match, nullptr,
                                  "crl");
    });

    CLI::App* g = cert->add_subcommand("get", "Show a CA of the store");
    g->add_option("name", *name, "Name of the CA in the store")->required();
    add_common_options(g, *common);
    on_run(g, exit_code, [common, name] { return run_certificate_get(*common, *name); });

    CLI::App* l = cert->add_subcommand("list", "List the CAs of the store");
    add_common_options(l, *common);
    on_run(l, exit_code, [common] { return run_certificate_list(*common); });

    CLI::App* d = cert->add_subcommand("delete", "Delete a CA from the store");
    d->add_option("name", *name, "Name of the CA in the store")->required();
    d->add_option("--if-match", *if_match, "Only delete if the etag still matches");
    add_common_options(d, *common);
    on_run(d, exit_code, [common, name, if_match] {
      return run_delete(*common, "/certificates", "certificate", *name, *if_match);
    });
  }

  {
    CLI::App* hubs = app.add_subcommand(
      "hubs", "Manage the linked IoT hubs at run time (service API /linkedHubs)");
    hubs->require_subcommand(1);
    auto common = std::make_shared<common_options>();
    auto o = std::make_shared<hub_options>();
    auto weight = std::make_shared<int>(1);
    auto apply = std::make_shared<std::string>();
    auto region = std::make_shared<std::string>();
    auto health = std::make_shared<std::string>();

    CLI::App* l = hubs->add_subcommand("list", "List the linked hubs and their health");
    add_common_options(l, *common);
    on_run(l, exit_code, [common] { return run_hubs_list(*common); });

    // add and update share the options; update changes only those given.
    auto add_hub_options = [&](CLI::App* sub) {
      sub->add_option("hostname", o->hostname, "Host name of the IoT hub")->required();
      sub->add_option("--weight", *weight, "allocation_weight, 1..1000 (default 1)")
          ->check(CLI::Range(1, 1000));
      sub->add_option("--apply-allocation-policy", *apply,
                      "true: takes part in hashed/geoLatency allocation (default); false: only "
                      "when an enrollment names it")
          ->check(CLI::IsMember({"true", "false"}));
      sub->add_option("--region", *region, "Region of the hub, e.g. westeurope");
      sub->add_option("--health-endpoint", *health,
                      "https://host[:port]/path probed for the hub's health (\"\" = none)");
    };
    auto collect = [o, weight, apply, region, health](CLI::App* sub) {
      hub_options out;
      out.hostname = o->hostname;
      if (sub->count("--weight")) out.weight = *weight;
      if (sub->count("--apply-allocation-policy")) out.apply = *apply == "true";
      if (sub->count("--region")) out.region = *region;
      if (sub->count("--health-endpoint")) out.health_endpoint = *health;
      return out;
    };

    CLI::App* a = hubs->add_subcommand("add", "Link a hub (or replace a linked one)");
    add_hub_options(a);
    add_common_options(a, *common);
    on_run(a, exit_code, [common, collect, a] { return run_hubs_put(*common, collect(a), false); });

    CLI::App* u = hubs->add_subcommand("update", "Change some settings of a linked hub");
    add_hub_options(u);
    add_common_options(u, *common);
    on_run(u, exit_code, [common, collect, u] { return run_hubs_put(*common, collect(u), true); });

    CLI::App* r = hubs->add_subcommand(
      "remove", "Unlink a hub (devices already on it keep their registrations)");
    r->add_option("hostname", o->hostname, "Host name of the IoT hub")->required();
    add_common_options(r, *common);
    on_run(r, exit_code, [common, o] {
      return run_delete(*common, "/linkedHubs", "linked hub", o->hostname, "");
    });
  }

  {
    CLI::App* reg = app.add_subcommand("registration", "Inspect or delete device registration records");
    reg->require_subcommand(1);
    auto common = std::make_shared<common_options>();
    auto id = std::make_shared<std::string>();
    auto if_match = std::make_shared<std::string>();
    CLI::App* g = reg->add_subcommand("get", "Show a registration record");
    g->add_option("registration-id", *id, "Registration id")->required();
    add_common_options(g, *common);
    on_run(g, exit_code, [common, id] { return run_registration_get(*common, *id); });
    CLI::App* d = reg->add_subcommand("delete", "Delete a registration record");
    d->add_option("registration-id", *id, "Registration id")->required();
    d->add_option("--if-match", *if_match, "Only delete if the etag still matches");
    add_common_options(d, *common);
    on_run(d, exit_code, [common, id, if_match] {
      return run_delete(*common, "/registrations", "registration", *id, *if_match);
    });
  }

  {
    auto common = std::make_shared<common_options>();
    auto o = std::make_shared<assignments_options>();
    CLI::App* a = app.add_subcommand("assignments", "Show device assignment events (CloudEvents)");
    a->add_flag("--follow,-f", o->follow, "Keep polling (every 500 ms) for new events");
    a->add_option("--hub", o->hub, "Only events for this assigned hub host name");
    a->add_option("--after", o->after, "Start after this sequence number")->capture_default_str();
    a->add_option("--limit", o->limit, "Events per request")->check(CLI::Range(1, 1000))
        ->capture_default_str();
    add_common_options(a, *common);
    on_run(a, exit_code, [common, o] { return run_assignments(*common, *o); });
  }

  {
    auto common = std::make_shared<common_options>();
    auto o = std::make_shared<register_options>();
    CLI::App* r =
      app.add_subcommand("register", "Register as a device (symmetric key or X.509, HTTPS)");
    r->add_option("--registration-id", o->registration_id, "Registration id")->required();
    auto* key = r->add_option("--key", o->key, "Device symmetric key (base64)");
    auto* gkey = r->add_option("--group-key", o->group_key,
                               "Enrollment group key (base64); the device key is derived from it");
    key->excludes(gkey);
    auto* cert = r->add_option("--cert", o->cert,
                               "X.509: PEM file with the device certificate (CN = registration "
                               "id), then its intermediates");
    r->add_option("--cert-key", o->cert_key,
                  "X.509: PEM file with the certificate's private key (default: --cert)");
    cert->excludes(key)->excludes(gkey);
    r->add_option("--id-scope", o->id_scope, "ID scope (default: <data-dir>/identity.json)");
    r->add_option("--payload", o->payload, "JSON payload for custom allocation");
    r->add_option("--timeout", o->timeout_s, "Seconds to wait for the assignment")
        ->check(CLI::Range(1, 3600))
        ->capture_default_str();
    add_common_options(r, *common);
    on_run(r, exit_code, [common, o] { return run_register(*common, *o); });
  }
}
