#include "gateway/routes.hpp"

#include <algorithm>
#include <chrono>
#include <optional>

#include <nlohmann/json.hpp>

#include "actors/attestation/sas_token.hpp"
#include "actors/enrollment/ca_store.hpp"
#include "actors/once_per_interval.hpp"
#include "gateway/device_api.hpp"
#include "messages/ascii.hpp"
#include "messages/crypto.hpp"
#include "messages/json_body.hpp"
#include "messages/json_text.hpp"

namespace prov::gateway {

using nlohmann::json;

namespace {

using ascii::iequals;

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> out;
  std::size_t i = 0;
  while (i < path.size()) {
    while (i < path.size() && path[i] == '/')
      ++i;
    auto j = path.find('/', i);
    if (j == std::string::npos)
      j = path.size();
    if (j > i)
      out.push_back(path.substr(i, j - i));
    i = j;
  }
  return out;
}

/// A device answer (or any error) as an HTTP response: Azure's error body
/// with x-ms-error-code, Retry-After when the device should come back.
http_response to_http(device_answer a) {
  http_response r;
  r.status = a.status;
  r.body = std::move(a.body);
  if (a.err) {
    r.headers.emplace_back("x-ms-error-code", std::to_string(static_cast<int32_t>(a.err.code)));
    r.err = std::move(a.err);
  }
  if (a.retry_after_s > 0)
    r.headers.emplace_back("Retry-After", std::to_string(a.retry_after_s));
  return r;
}

http_response json_response(int status, std::string body) {
  http_response r;
  r.status = status;
  r.body = std::move(body);
  return r;
}

http_response no_content() {
  http_response r;
  r.status = 204;
  return r;
}

bool is_json_content_type(const std::string& ct) {
  // "application/json", "application/json; charset=utf-8" (any case).
  auto l = ascii::to_lower(ct);
  auto semi = l.find(';');
  auto media = l.substr(0, semi);
  while (!media.empty() && media.back() == ' ')
    media.pop_back();
  if (media != "application/json")
    return false;
  if (semi == std::string::npos)
    return true;
  auto params = l.substr(semi + 1);
  auto cs = params.find("charset=");
  if (cs == std::string::npos)
    return true;
  auto v = params.substr(cs + 8);
  return v.rfind("utf-8", 0) == 0 || v.rfind("\"utf-8\"", 0) == 0;
}

/// Rejects bodies that are present but not declared as JSON (415).
error check_json_body(const http_request& req) {
  if (req.body.empty())
    return {};
  if (!is_json_content_type(req.header("content-type")))
    return {error_code::unsupported_media_type,
            "Content-Type must be application/json (charset utf-8), got '"
              + req.header("content-type") + "'"};
  return {};
}

/// A query body, when present, is {"query": "..."}; the same rule for every
/// query route (the query text itself is not interpreted).
error check_query_body(const http_request& req) {
  if (req.body.empty())
    return {};
  json q;
  if (auto err = parse_json_body(req.body, q))
    return err;
  auto it = q.is_object() ? q.find("query") : q.end();
  if (!q.is_object() || it == q.end() || !it->is_string())
    return {error_code::invalid_query, "body must be {\"query\": \"...\"}"};
  return {};
}

/// What a request is, for metrics and diagnostic logs: a bounded route label
/// (path template), and DPS-style category / operation / resource type / id.
struct request_kind {
  std::string route = "other";
  const char* category = "";  ///< "" = not logged (health checks, unknown routes)
  const char* operation = "";
  const char* type = "";
  std::string id;
};

const char* method_label(const std::string& m) {
  for (const char* known : {"GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "OPTIONS"})
    if (m == known)
      return known;
  return "OTHER";
}

std::string decoded_or_raw(const std::string& seg) {
  auto d = crypto::url_decode(seg);
  return d ? *d : seg;
}

bool is_service_root(const std::string& s) {
  return iequals(s, "enrollments") || iequals(s, "enrollmentgroups")
         || iequals(s, "registrations") || iequals(s, "assignments")
         || iequals(s, "certificates") || iequals(s, "linkedhubs");
}

/// A path's route, read once from its segments: the dispatch and the
/// metrics label / diagnostic log both go by it.
enum class route {
  none,            ///< no route: 404
  health,          ///< /healthz, /readyz
  device_register, ///< {idScope}/registrations/{id}/register
  device_poll,     ///< {idScope}/registrations/{id}/operations/{operationId}
  device_status,   ///< {idScope}/registrations/{id}
  device_other,    ///< {idScope}/registrations/{id}/... of no known shape
  service,         ///< /enrollments, /enrollmentGroups, ... (service() reads the rest)
  linkedhubs,      ///< /linkedHubs[/{name}] (service() checks, linked_hubs() answers)
};

route route_of(const std::vector<std::string>& segs) {
  if (segs.size() == 1 && (segs[0] == "healthz" || segs[0] == "readyz"))
    return route::health;
  if (segs.size() >= 3 && iequals(segs[1], "registrations") && !is_service_root(segs[0])) {
    if (segs.size() == 4 && iequals(segs[3], "register"))
      return route::device_register;
    if (segs.size() == 5 && iequals(segs[3], "operations"))
      return route::device_poll;
    if (segs.size() == 3)
      return route::device_status;
    return route::device_other;
  }
  if (!segs.empty() && iequals(segs[0], "linkedhubs"))
    return route::linkedhubs;
  if (!segs.empty() && is_service_root(segs[0]))
    return route::service;
  return route::none;
}

/// A service path (route::service, route::linkedhubs), read once: the
/// dispatch, the metrics label and the diagnostic log all go by it, so a
/// percent-encoded sub-path (`/enrollments/%71uery`) is labelled as what
/// it is served as. The root is matched raw (route_of); the segments after
/// it are percent-decoded, a segment that is not valid percent-encoding
/// kept raw for the label and the path answered 400.
struct service_path {
  std::string root;             ///< segs[0] in lower case
  std::vector<std::string> ids; ///< the segments after the root, decoded
  bool malformed = false;       ///< a segment's percent-encoding is invalid
};

service_path service_path_of(const std::vector<std::string>& segs) {
  service_path p;
  p.root = ascii::to_lower(segs[0]);
  p.ids.reserve(segs.size() - 1);
  for (std::size_t i = 1; i < segs.size(); ++i) {
    auto d = crypto::url_decode(segs[i]);
    p.malformed = p.malformed || !d;
    p.ids.push_back(d ? std::move(*d) : segs[i]);
  }
  return p;
}

request_kind classify(const http_request& req, const std::vector<std::string>& segs, route r,
                      const service_path* sp) {
  request_kind k;
  std::string m = method_label(req.method);
  switch (r) {
  case route::none:
    return k;
  case route::health:
    k.route = m + " /" + segs[0];
    return k;
  case route::device_register:
  case route::device_poll:
  case route::device_status:
  case route::device_other:
    k.category = "DeviceOperations";
    k.type = "Registration";
    k.id = decoded_or_raw(segs[2]);
    if (r == route::device_register) {
      k.route = m + " /{idScope}/registrations/{registrationId}/register";
      k.operation = "DeviceRegistration";
    } else if (r == route::device_poll) {
      k.route = m + " /{idScope}/registrations/{registrationId}/operations/{operationId}";
      k.operation = "OperationStatusLookup";
    } else if (r == route::device_status) {
      k.route = m + " /{idScope}/registrations/{registrationId}";
      k.operation = "DeviceRegistrationStatusLookup";
    } else {
      k.route = "other";
      k.operation = "Unknown";
    }
    return k;
  case route::service:
  case route::linkedhubs:
    break;
  }
  const auto& root = sp->root;
  const auto& ids = sp->ids;
  k.category = "ServiceOperations";
  k.type = root == "enrollments"        ? "IndividualEnrollment"
           : root == "enrollmentgroups" ? "EnrollmentGroup"
           : root == "registrations"    ? "DeviceRegistrationState"
           : root == "certificates"     ? "Certificate"
           : root == "linkedhubs"       ? "LinkedHub"
                                        : "Assignment";
  std::string tmpl = "/" + std::string(root == "enrollmentgroups" ? "enrollmentGroups"
                                       : root == "linkedhubs"     ? "linkedHubs"
                                                                  : root);
  if (ids.empty()) {
    k.operation = m == "GET" ? (root == "linkedhubs" ? "List" : "Query")
                  : m == "POST" ? "BulkOperation"
                                : "Unknown";
  } else if (ids.size() == 1 && iequals(ids[0], "query")
             && (root == "enrollments" || root == "enrollmentgroups")) {
    // Only these two roots serve /{root}/query; under the others "query" is
    // an id (PUT /certificates/query uploads a CA of that name), and a write
    // to it must be labelled, and audited, as one.
    tmpl += "/query";
    k.operation = "Query";
  } else {
    tmpl += "/{id}";
    k.id = ids[0];
    if (ids.size() == 2 && root == "registrations" && iequals(ids[1], "query")) {
      tmpl += "/query";
      k.operation = "Query";
    } else if (ids.size() == 2 && iequals(ids[1], "attestationmechanism")) {
      tmpl += "/attestationmechanism";
      k.operation = "GetAttestationMechanism";
    } else if (ids.size() == 2 && root == "certificates"
               && iequals(ids[1], "generateverificationcode")) {
      tmpl += "/generateVerificationCode";
      k.operation = "GenerateVerificationCode";
    } else if (ids.size() == 2 && root == "certificates" && iequals(ids[1], "verify")) {
      tmpl += "/verify";
      k.operation = "VerifyCertificate";
    } else if (ids.size() == 2 && root == "certificates" && iequals(ids[1], "crl")) {
      tmpl += "/crl";
      k.operation = "UploadCrl";
    } else if (ids.size() == 1) {
      k.operation = m == "GET"      ? "Get"
                    : m == "PUT"    ? "Upsert"
                    : m == "DELETE" ? "Delete"
                                    : "Unknown";
    } else {
      return k; // unknown shape: route "other", still logged as a service call
    }
  }
  k.route = m + " " + tmpl;
  return k;
}

/// Service operations the audit log records: every write, and the one read
/// that returns keys.
bool audited(std::string_view operation) {
  return operation == "Upsert" || operation == "Delete" || operation == "BulkOperation" ||
         operation == "GenerateVerificationCode" || operation == "VerifyCertificate" ||
         operation == "UploadCrl" || operation == "GetAttestationMechanism";
}

/// The policy whose signature authorize() verified for the request being
/// dispatched on this thread (set synchronously, before any engine call).
struct audit_state {
  std::string verified_policy;
  /// A bulk operation's mode and ids, read from the body only once the
  /// request authenticated: an unauthenticated body is not parsed for the
  /// audit line, nor can it put what it likes there.
  std::string mode;
  std::vector<std::string> ids; ///< the first max_audited_ids
  std::size_t ids_total = 0;
};

/// Ids of one bulk operation written to its audit line; idsTotal gives the
/// count. A bulk body may hold thousands: the line stays bounded.
constexpr std::size_t max_audited_ids = 100;

/// Fills `a`'s bulk fields from an authenticated bulk request's body.
void note_bulk(audit_state& a, const std::string& body) {
  auto doc = json::parse(body, nullptr, false);
  if (!doc.is_object()) return;
  if (auto mode = doc.find("mode"); mode != doc.end() && mode->is_string())
    a.mode = mode->get<std::string>().substr(0, 32);
  auto list = doc.find("enrollments");
  if (list == doc.end() || !list->is_array()) return;
  for (const auto& e : *list) {
    if (!e.is_object()) continue;
    for (const char* key : {"registrationId", "enrollmentGroupId"}) {
      auto id = e.find(key);
      if (id == e.end() || !id->is_string()) continue;
      if (a.ids.size() < max_audited_ids) a.ids.push_back(id->get<std::string>().substr(0, 256));
      ++a.ids_total;
    }
  }
}
thread_local audit_state* current_audit = nullptr;

class routes final : public handler {
public:
  routes(routes_options opts, engine& eng)
    : opts_(std::move(opts)), eng_(eng),
      own_api_(opts_.api != nullptr
                 ? nullptr
                 : std::make_unique<device_api>(eng, opts_.id_scope,
                                                opts_.cfg.device_api.retry_after_seconds,
                                                opts_.cfg.throttling, opts_.metrics)),
      api_(opts_.api != nullptr ? *opts_.api : *own_api_) {}

  void handle(http_request req, respond_fn respond) override {
    auto tracking = crypto::uuid4();
    auto segs = split_path(req.path);
    const route rt = route_of(segs);
    const bool health = rt == route::health && req.method == "GET" &&
                        (segs[0] == "healthz" || segs[0] == "readyz");
    // [throttling] requests_per_minute_per_address: decided first, so a
    // flood costs a map lookup: no SAS, no storage read, no body parsed for
    // the audit line. Health checks are not counted.
    const int wait = health ? 0 : api_.admit_address(req.client_ip);
    std::optional<service_path> sp;
    if (rt == route::service || rt == route::linkedhubs)
      sp = service_path_of(segs);
    respond_fn observed = std::move(respond);
    std::shared_ptr<audit_state> audit;
    if (opts_.metrics != nullptr || opts_.log != nullptr || opts_.audit != nullptr)
      observed = observe(req, segs, rt, sp ? &*sp : nullptr, tracking, std::move(observed),
                         wait == 0, audit);
    // authorize() notes the verified policy here while this call dispatches.
    struct scope {
      explicit scope(audit_state* a) { current_audit = a; }
      ~scope() { current_audit = nullptr; }
    } in_scope(audit.get());
    auto reply = [respond = std::move(observed), tracking](http_response r) {
      r.headers.emplace_back("x-ms-request-id", tracking);
      respond(std::move(r));
    };
    if (rt == route::health && req.method == "GET" && segs[0] == "healthz")
      return reply(json_response(200, R"({"status":"ok"})"));
    if (rt == route::health && req.method == "GET" && segs[0] == "readyz") {
      bool ok = !opts_.ready || opts_.ready();
      return reply(json_response(ok ? 200 : 503, ok ? R"({"status":"ready"})"
                                                    : R"({"status":"not ready"})"));
    }
    if (wait != 0) {
      auto r = error_response({error_code::throttled,
                               "too many requests from this client address; retry after the "
                               "Retry-After interval"},
                              tracking);
      r.headers.emplace_back("Retry-After", std::to_string(wait));
      return reply(std::move(r));
    }
    // RFC 9110 8.4: a body in a content coding (gzip, ...) is not JSON we
    // can read; 415 with Accept-Encoding saying what is (RFC 9110 12.5.3).
    if (!req.body.empty())
      for (const auto& [name, value] : req.headers)
        if (name == "content-encoding" && !iequals(value, "identity")) {
          auto r = error_response({error_code::unsupported_media_type,
                                   "Content-Encoding '" + value.substr(0, 64) +
                                     "' is not supported: send the body unencoded"},
                                  tracking);
          r.headers.emplace_back("Accept-Encoding", "identity");
          return reply(std::move(r));
        }
    if (sp)
      return service(req, *sp, rt, reply, tracking);
    if (rt != route::none && rt != route::health)
      return device(req, segs, rt, reply, tracking);
    reply(error_response({error_code::not_found, "no such route: " + req.method + " "
                                                   + req.path},
                         tracking));
  }

private:
  using reply_fn = std::function<void(http_response)>;

  /// Wraps `respond` so the answer is counted (metrics) and logged (one
  /// diagnostic line) whichever path produced it. `admitted` false (the
  /// address throttle refused it): no audit line. The request was not
  /// authenticated nor acted on, and an unauthenticated flood must not be
  /// able to fill the audit file; metrics and the diagnostic log count it.
  respond_fn observe(const http_request& req, const std::vector<std::string>& segs, route r,
                     const service_path* sp, const std::string& tracking, respond_fn respond,
                     bool admitted, std::shared_ptr<audit_state>& audit_out) {
    struct context {
      request_kind kind;
      std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
      std::string client_ip, tracking, api_version;
      std::shared_ptr<audit_state> audit; ///< set when this call is audited
      metrics::audit_record audit_rec;    ///< what is known before the answer
    };
    auto c = std::make_shared<context>();
    c->kind = classify(req, segs, r, sp);
    c->client_ip = req.client_ip;
    c->tracking = tracking;
    if (auto api = req.query.find("api-version"); api != req.query.end())
      c->api_version = api->second.substr(0, 32);
    auto* m = opts_.metrics;
    auto* log = opts_.log;
    auto* audit_log = opts_.audit;
    if (admitted && audit_log != nullptr &&
        std::string_view(c->kind.category) == "ServiceOperations" &&
        audited(c->kind.operation)) {
      c->audit = std::make_shared<audit_state>();
      audit_out = c->audit;
      auto& a = c->audit_rec;
      a.operation = c->kind.operation;
      a.type = c->kind.type;
      a.id = c->kind.id;
      // The policy named, verified or not (authenticated says which).
      attestation::sas_token tok;
      if (!attestation::parse_sas(req.header("authorization"), tok))
        a.identity = tok.skn.substr(0, 128);
    }
    return [c, m, log, audit_log, respond = std::move(respond)](http_response r) {
      auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - c->started)
                    .count();
      if (m != nullptr)
        m->http_request(c->kind.route, r.status, secs);
      if (log != nullptr && *c->kind.category != '\0') {
        metrics::operation_record rec;
        rec.category = c->kind.category;
        rec.operation = c->kind.operation;
        rec.status = r.status;
        std::string code;
        if (r.err)
          code = std::to_string(static_cast<int32_t>(r.err.code));
        rec.error_code = code;
        rec.description = r.err.message;
        rec.duration_ms = secs * 1000.0;
        rec.id = c->kind.id;
        rec.type = c->kind.type;
        rec.protocol = "Http";
        rec.caller_ip = c->client_ip;
        rec.correlation_id = c->tracking;
        rec.api_version = c->api_version;
        log->operation(rec);
      }
      if (c->audit) {
        auto& a = c->audit_rec;
        a.authenticated = !c->audit->verified_policy.empty();
        if (a.authenticated) {
          a.identity = c->audit->verified_policy;
          a.mode = std::move(c->audit->mode);
          a.ids = std::move(c->audit->ids);
          a.ids_total = c->audit->ids_total;
        }
        a.status = r.status;
        if (r.err)
          a.error_code = std::to_string(static_cast<int32_t>(r.err.code));
        a.description = r.err.message;
        a.caller_ip = c->client_ip;
        a.correlation_id = c->tracking;
        a.api_version = c->api_version;
        a.protocol = "Http";
        audit_log->audit(a);
      }
      respond(std::move(r));
    };
  }

  // -- device API -------------------------------------------------------------

  /// The HTTP adapter of the device API (device_api.hpp): the path's shape,
  /// method and percent-encoding, the query, the content type and the
  /// credential (Authorization header, TLS client certificate) in; status,
  /// body and Retry-After out.
  void device(const http_request& req, const std::vector<std::string>& segs, route r,
              const reply_fn& reply, const std::string& tracking) {
    auto fail = [&](error e) { reply(error_response(e, tracking)); };
    // Methods: register PUT, poll GET, status lookup POST.
    device_call call;
    using kind = device_call::kind;
    if (r == route::device_register)
      call.what = kind::register_device;
    else if (r == route::device_poll)
      call.what = kind::poll;
    else if (r == route::device_status)
      call.what = kind::status_lookup;
    else
      return fail({error_code::not_found, "no such device route: " + req.path});
    const char* want = call.what == kind::register_device ? "PUT"
                       : call.what == kind::poll          ? "GET"
                                                          : "POST";
    if (req.method != want)
      return fail({error_code::method_not_allowed,
                   "method " + req.method + " not allowed here; use " + want});
    auto scope = crypto::url_decode(segs[0]);
    auto reg_id = crypto::url_decode(segs[2]);
    if (!scope || !reg_id)
      return fail({error_code::bad_request, "malformed percent-encoding in the path"});
    call.id_scope = std::move(*scope);
    call.registration_id = std::move(*reg_id);
    if (call.what == kind::poll)
      call.operation_id = crypto::url_decode(segs[4]);
    if (auto api = req.query.find("api-version"); api != req.query.end())
      call.api_version = api->second;
    auto force = req.query.find("forceRegistration");
    call.force_registration = force != req.query.end() && iequals(force->second, "true");
    call.body = req.body;
    call.body_framing = check_json_body(req);
    // DPS X.509 devices send no Authorization header: their credential is
    // the TLS client certificate chain. A SAS, when sent, wins.
    if (const auto& auth = req.header("authorization");
        auth.empty() && req.client_chain_der && !req.client_chain_der->der.empty())
      call.credential = x509_credential_of(*req.client_chain_der);
    else
      call.credential = credential_of_authorization(auth);
    call.client_ip = req.client_ip;
    call.tracking_id = tracking;
    api_.handle(std::move(call), [reply](device_answer a) { reply(to_http(std::move(a))); });
  }

  // -- service API ------------------------------------------------------------

  /// Verifies the service SAS and that its policy holds `right`.
  error authorize(const http_request& req, const char* right) {
    const auto& h = req.header("authorization");
    if (h.empty())
      return {error_code::unauthorized, "missing Authorization header (service SAS token)"};
    attestation::sas_token tok;
    if (auto err = attestation::parse_sas(h, tok))
      return err;
    const config::access_policy* pol = nullptr;
    for (const auto& p : opts_.policies)
      if (p.name == tok.skn)
        pol = &p;
    if (pol == nullptr)
      return {error_code::unauthorized_signature,
              "unknown shared access policy '" + tok.skn + "'"};
    bool host_ok = false;
    for (const auto& host : opts_.cfg.device_api.hostnames)
      host_ok = host_ok || attestation::service_resource_matches(tok, host);
    if (!host_ok)
      return {error_code::unauthorized_signature,
              "token resource (sr) does not name this service's host"};
    attestation::sas_limits limits;
    limits.now = now_ms() / 1000;
    limits.max_lifetime = opts_.cfg.device_api.max_sas_lifetime_seconds;
    limits.clock_skew = opts_.cfg.device_api.clock_skew_seconds;
    if (auto err = attestation::check_expiry(tok, limits))
      return {error_code::unauthorized_signature, err.message};
    if (!attestation::signature_matches(tok, pol->primary_key)
        && (pol->secondary_key.empty()
            || !attestation::signature_matches(tok, pol->secondary_key)))
      return {error_code::unauthorized_signature,
              "signature mismatch for policy '" + pol->name + "'"};
    // Authenticated from here on (a 403 below is still this policy's call).
    if (current_audit != nullptr)
      current_audit->verified_policy = pol->name;
    if (std::find(pol->rights.begin(), pol->rights.end(), right) == pol->rights.end())
      return {error_code::forbidden,
              "policy '" + pol->name + "' lacks the " + right + " right"};
    return {};
  }

  void service(const http_request& req, const service_path& sp, route rt,
               const reply_fn& reply, const std::string& tracking) {
    auto fail = [&](error e) { reply(error_response(e, tracking)); };
    const auto& root = sp.root;
    auto api = req.query.find("api-version");
    if (root != "assignments" && (api == req.query.end() || api->second.empty()))
      return fail({error_code::missing_api_version,
                   "the api-version query parameter is required (e.g. 2021-10-01)"});
    if (!req.body.empty())
      if (auto err = check_json_body(req))
        return fail(err);
    if (sp.malformed)
      return fail({error_code::bad_request, "malformed percent-encoding in the path"});
    const auto& ids = sp.ids;
    const auto& m = req.method;
    if (root == "certificates")
      return certificates(req, ids, reply, fail, tracking);
    if (rt == route::linkedhubs)
      return linked_hubs(req, ids, reply, fail, tracking);
    if (root == "assignments") {
      if (!ids.empty())
        return fail({error_code::not_found, "no such route: " + req.path});
      if (m != "GET")
        return fail({error_code::method_not_allowed, "use GET /assignments"});
      if (auto err = authorize(req, "RegistrationStatusRead"))
        return fail(err);
      return assignments(req, reply, fail);
    }
    if (root == "registrations") {
      if (ids.size() == 1) {
        if (m == "GET") {
          if (auto err = authorize(req, "RegistrationStatusRead"))
            return fail(err);
          registration_state st;
          if (auto err = eng_.registration(ids[0], st))
            return fail(err);
          return reply(json_response(200, to_json_text(st, /*service=*/true)));
        }
        if (m == "DELETE") {
          if (auto err = authorize(req, "RegistrationStatusWrite"))
            return fail(err);
          return eng_.delete_registration(ids[0], req.header("if-match"),
                                          [reply, tracking](error e) {
                                            reply(e ? error_response(e, tracking)
                                                    : no_content());
                                          });
        }
        return fail({error_code::method_not_allowed, "use GET or DELETE"});
      }
      if (ids.size() == 2 && iequals(ids[1], "query")) {
        if (m != "POST")
          return fail({error_code::method_not_allowed, "use POST"});
        if (auto err = authorize(req, "RegistrationStatusRead"))
          return fail(err);
        if (auto err = check_query_body(req))
          return fail(err);
        std::size_t max = 0;
        std::string cont;
        if (auto err = paging(req, max, cont))
          return fail(err);
        std::vector<registration_state> page;
        std::string next;
        std::vector<std::string> unreadable;
        if (auto err = eng_.query_registrations(ids[0], cont, max, page, next, unreadable))
          return fail(err);
        // As the enrollment queries: DPS's shape, the log and
        // dps_unreadable_records_total{family="registrations"} tell.
        if (!unreadable.empty())
          report_unreadable(unreadable, "registrations", "registration record",
                            "POST /registrations/{groupId}/query");
        json arr = json::array();
        for (const auto& st : page)
          arr.push_back(to_json(st, /*service=*/true));
        return reply(page_response(std::move(arr), next, "DeviceRegistration", max));
      }
      return fail({error_code::not_found, "no such route: " + req.path});
    }
    auto k = root == "enrollments" ? enrollment::kind::individual : enrollment::kind::group;
    if (ids.empty()) {
      if (m != "POST")
        return fail({error_code::method_not_allowed, "use POST for bulk operations"});
      auto err = authorize(req, "EnrollmentWrite");
      // Authenticated (allowed, or a policy without the right): its ids go
      // to the audit line.
      if (current_audit != nullptr && !current_audit->verified_policy.empty())
        note_bulk(*current_audit, req.body);
      if (err)
        return fail(err);
      return eng_.bulk_enrollments(k, req.body, [reply, tracking](error e, std::string doc) {
        reply(e ? error_response(e, tracking) : json_response(200, std::move(doc)));
      });
    }
    if (ids.size() == 1 && iequals(ids[0], "query")) {
      if (m != "POST")
        return fail({error_code::method_not_allowed, "use POST for queries"});
      if (auto err = authorize(req, "EnrollmentRead"))
        return fail(err);
      if (auto err = check_query_body(req))
        return fail(err);
      std::size_t max = 0;
      std::string cont;
      if (auto err = paging(req, max, cont))
        return fail(err);
      std::vector<json> page;
      std::string next;
      std::vector<std::string> unreadable;
      if (auto err = eng_.query_enrollments(k, cont, max, page, next, unreadable))
        return fail(err);
      // The answer keeps DPS's shape (an array, x-ms-continuation): a
      // damaged value is left out, and the operator learns of it from the
      // log and dps_unreadable_records_total.
      if (!unreadable.empty()) {
        if (k == enrollment::kind::individual)
          report_unreadable(unreadable, "enrollments", "individual enrollment",
                            "POST /enrollments/query");
        else
          report_unreadable(unreadable, "groups", "enrollment group",
                            "POST /enrollmentGroups/query");
      }
      json arr = json::array();
      for (auto& d : page)
        arr.push_back(enrollment::public_document(d));
      return reply(page_response(std::move(arr), next,
                                 k == enrollment::kind::individual ? "Enrollment"
                                                                   : "EnrollmentGroup",
                                 max));
    }
    if (ids.size() == 2 && iequals(ids[1], "attestationmechanism")) {
      if (m != "POST")
        return fail({error_code::method_not_allowed, "use POST"});
      if (auto err = authorize(req, "EnrollmentRead"))
        return fail(err);
      json doc;
      if (auto err = eng_.get_enrollment(k, ids[0], doc))
        return fail(err);
      json mech = enrollment::attestation_mechanism(doc);
      if (k != enrollment::kind::individual || mech.value("type", "") != "tpm"
          || !mech["tpm"].is_object())
        return reply(json_response(200, mech.dump()));
      // A TPM device's IoT Hub key (a provisiond extension): where the hub
      // side reads it, as it reads a symmetric-key device's keys here, with
      // the same right and an audit line (docs/device-api.md). Made on the
      // TPM worker: the challenge read may wait for Kafka.
      return eng_.tpm_hub_key(ids[0], [reply, tracking, mech = std::move(mech),
                                       retry_s = opts_.cfg.device_api.retry_after_seconds](
                                        error e, tpm_hub_key_info hk) mutable {
        if (e) {
          auto r = error_response(e, tracking);
          // Full TPM workers, a Kafka catch-up that timed out, stopping:
          // worth asking again.
          if (e.code == error_code::throttled || e.code == error_code::unavailable)
            r.headers.emplace_back("Retry-After", std::to_string(retry_s));
          return reply(std::move(r));
        }
        if (!hk.primary_key.empty())
          mech["tpm"]["iotHubKey"] = {{"primaryKey", std::move(hk.primary_key)},
                                      {"operationId", std::move(hk.operation_id)},
                                      {"assignedHub", std::move(hk.assigned_hub)},
                                      {"deviceId", std::move(hk.device_id)}};
        reply(json_response(200, mech.dump()));
      });
    }
    if (ids.size() != 1)
      return fail({error_code::not_found, "no such route: " + req.path});
    if (m == "GET") {
      if (auto err = authorize(req, "EnrollmentRead"))
        return fail(err);
      json doc;
      if (auto err = eng_.get_enrollment(k, ids[0], doc))
        return fail(err);
      return reply(json_response(200, enrollment::public_document(doc).dump()));
    }
    if (m == "PUT") {
      if (auto err = authorize(req, "EnrollmentWrite"))
        return fail(err);
      if (req.body.empty())
        return fail({error_code::malformed_json, "PUT needs the enrollment as a JSON body"});
      json probe;
      if (auto err = parse_json_body(req.body, probe))
        return fail(err);
      return eng_.put_enrollment(k, ids[0], req.body, req.header("if-match"),
                                 [reply, tracking](error e, std::string doc) {
                                   reply(e ? error_response(e, tracking)
                                           : json_response(200, std::move(doc)));
                                 });
    }
    if (m == "DELETE") {
      if (auto err = authorize(req, "EnrollmentWrite"))
        return fail(err);
      return eng_.delete_enrollment(k, ids[0], req.header("if-match"),
                                    [reply, tracking](error e) {
                                      reply(e ? error_response(e, tracking) : no_content());
                                    });
    }
    fail({error_code::method_not_allowed, "use GET, PUT or DELETE"});
  }

  /// The CA certificate store (DPS certificates with proof of possession).
  /// Every call needs the ServiceConfig right: trusting a CA is service
  /// configuration, and reading the store shows what is trusted.
  template <class Fail>
  void certificates(const http_request& req, const std::vector<std::string>& ids,
                    const reply_fn& reply, Fail& fail, const std::string& tracking) {
    const auto& m = req.method;
    if (ids.empty()) {
      if (m != "GET")
        return fail({error_code::method_not_allowed, "use GET /certificates to list the CAs"});
      if (auto err = authorize(req, "ServiceConfig"))
        return fail(err);
      std::vector<json> docs;
      std::vector<std::string> unreadable;
      if (auto err = eng_.list_certificates(docs, unreadable))
        return fail(err);
      json arr = json::array();
      for (const auto& d : docs)
        arr.push_back(enrollment::ca_public(d));
      json out{{"value", std::move(arr)}};
      // Skipped entries are named (not silently missing); why, with paths
      // and key ids, goes to the log only.
      if (!unreadable.empty())
        out["unreadable"] = report_unreadable(unreadable, "certificates", "CA",
                                              "GET /certificates");
      return reply(json_response(200, out.dump()));
    }
    if (ids.size() > 2)
      return fail({error_code::not_found, "no such route: " + req.path});
    const std::string& name = ids[0];
    if (!enrollment::valid_certificate_name(name))
      return fail({error_code::bad_request,
                   "a certificate name is 1..128 characters of A-Z a-z 0-9 - . _"});
    std::string op;
    if (ids.size() == 2) {
      if (iequals(ids[1], "generateverificationcode"))
        op = "code";
      else if (iequals(ids[1], "verify"))
        op = "verify";
      else if (iequals(ids[1], "crl"))
        op = "crl";
      else
        return fail({error_code::not_found, "no such route: " + req.path});
      if (m != (op == "crl" ? "PUT" : "POST"))
        return fail({error_code::method_not_allowed, op == "crl" ? "use PUT" : "use POST"});
    } else if (m == "PUT") {
      op = "put";
    } else if (m == "DELETE") {
      op = "delete";
    } else if (m != "GET") {
      return fail({error_code::method_not_allowed, "use GET, PUT or DELETE"});
    }
    if (auto err = authorize(req, "ServiceConfig"))
      return fail(err);
    if (op.empty()) {
      json doc;
      if (auto err = eng_.get_certificate(name, doc))
        return fail(err);
      return reply(json_response(200, enrollment::ca_public(doc).dump()));
    }
    if ((op == "put" || op == "verify" || op == "crl") && req.body.empty())
      return fail({error_code::malformed_json,
                   op == "crl" ? "PUT needs {\"crl\": \"<PEM>\"} as a JSON body"
                   : op == "put"
                     ? "PUT needs {\"certificate\": \"<PEM>\"} as a JSON body"
                     : "verify needs {\"certificate\": \"<PEM>\"} as a JSON body"});
    eng_.write_certificate(op, name, req.body, req.header("if-match"),
                           [reply, tracking, op](error e, std::string doc) {
                             if (e)
                               return reply(error_response(e, tracking));
                             reply(op == "delete" ? no_content()
                                                  : json_response(200, std::move(doc)));
                           });
  }

  /// Linked hubs managed at run time (actors/hub_store.hpp). Like the CA
  /// store, service configuration: every call needs the ServiceConfig right.
  template <class Fail>
  void linked_hubs(const http_request& req, const std::vector<std::string>& ids,
                   const reply_fn& reply, Fail& fail, const std::string& tracking) {
    const auto& m = req.method;
    if (ids.size() > 1)
      return fail({error_code::not_found, "no such route: " + req.path});
    if (ids.empty() && m != "GET")
      return fail({error_code::method_not_allowed, "use GET /linkedHubs to list the hubs"});
    if (!ids.empty() && m != "GET" && m != "PUT" && m != "DELETE")
      return fail({error_code::method_not_allowed, "use GET, PUT or DELETE"});
    if (auto err = authorize(req, "ServiceConfig"))
      return fail(err);
    if (ids.empty()) {
      std::vector<json> docs;
      if (auto err = eng_.list_hubs(docs))
        return fail(err);
      return reply(json_response(200, json{{"value", std::move(docs)}}.dump()));
    }
    const std::string& name = ids[0];
    if (m == "GET") {
      json doc;
      if (auto err = eng_.get_hub(name, doc))
        return fail(err);
      return reply(json_response(200, doc.dump()));
    }
    if (m == "DELETE")
      return eng_.delete_hub(name, [reply, tracking](error e) {
        reply(e ? error_response(e, tracking) : no_content());
      });
    eng_.put_hub(name, req.body, [reply, tracking](error e, std::string doc) {
      reply(e ? error_response(e, tracking) : json_response(200, std::move(doc)));
    });
  }

  /// Stored values a listing left out (`unreadable`: "<key>: <why>"): each
  /// is counted in dps_unreadable_records_total{family} and logged with why
  /// at most once per value per 10 minutes (a dashboard polling the list
  /// must not repeat the same warning on every call). Returns their keys.
  json report_unreadable(const std::vector<std::string>& unreadable, std::string_view family,
                         std::string_view noun, std::string_view listing) {
    json names = json::array();
    for (const auto& u : unreadable) {
      std::string name = u.substr(0, u.find(": "));
      if (opts_.metrics != nullptr)
        opts_.metrics->unreadable_record(family);
      if (opts_.log != nullptr && unreadable_warned_.allow(std::string(family) + "/" + name))
        opts_.log->warn("stored " + std::string(noun) + " " + u + " (left out of " +
                        std::string(listing) + "; said at most every 10 minutes)");
      names.push_back(std::move(name));
    }
    return names;
  }

  error paging(const http_request& req, std::size_t& max, std::string& cont) {
    max = 100;
    const auto& h = req.header("x-ms-max-item-count");
    if (!h.empty()) {
      char* end = nullptr;
      auto v = std::strtol(h.c_str(), &end, 10);
      if (end == h.c_str() || *end != '\0' || v < 1 || v > 10000)
        return {error_code::invalid_header, "x-ms-max-item-count must be 1..10000"};
      max = static_cast<std::size_t>(v);
    }
    cont = req.header("x-ms-continuation");
    return {};
  }

  static http_response page_response(json arr, const std::string& next, const char* type,
                                     std::size_t max) {
    auto resp = json_response(200, arr.dump());
    // Node's Query loops while the header exists: omit it on the last page.
    if (!next.empty())
      resp.headers.emplace_back("x-ms-continuation", next);
    resp.headers.emplace_back("x-ms-item-type", type);
    resp.headers.emplace_back("x-ms-max-item-count", std::to_string(max));
    return resp;
  }

  template <class Fail>
  void assignments(const http_request& req, const reply_fn& reply, Fail& fail) {
    uint64_t after = 0;
    std::size_t limit = 100;
    auto num = [](const std::string& s, uint64_t& out) {
      if (s.empty() || s.size() > 19 || !std::all_of(s.begin(), s.end(), ::isdigit))
        return false;
      out = std::stoull(s);
      return true;
    };
    if (auto it = req.query.find("after"); it != req.query.end())
      if (!num(it->second, after))
        return fail({error_code::bad_request, "after must be a non-negative integer"});
    if (auto it = req.query.find("limit"); it != req.query.end()) {
      uint64_t l = 0;
      if (!num(it->second, l) || l < 1 || l > 1000)
        return fail({error_code::bad_request, "limit must be 1..1000"});
      limit = static_cast<std::size_t>(l);
    }
    std::vector<json> events;
    uint64_t next = after;
    if (auto err = eng_.read_assignments(after, limit, events, next))
      return fail(err);
    json body{{"events", std::move(events)}, {"next", next}};
    reply(json_response(200, body.dump()));
  }

  routes_options opts_;
  engine& eng_;
  std::unique_ptr<device_api> own_api_; ///< when none is shared
  /// Keyed "<family>/<key>": stored values left out of a listing, logged.
  once_per_interval unreadable_warned_{std::chrono::minutes(10)};
  device_api& api_;
};

} // namespace

http_response error_response(const error& e, const std::string& tracking_id) {
  return to_http(device_api::failure(e, tracking_id));
}

std::unique_ptr<handler> make_routes(routes_options opts, engine& eng) {
  return std::make_unique<routes>(std::move(opts), eng);
}

} // namespace prov::gateway
