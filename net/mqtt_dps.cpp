#include "net/mqtt_dps.hpp"

#include "messages/crypto.hpp"

namespace prov::mqtt {

namespace {

/// Calls `fn(key, raw value)` for each `k=v` of `q` split on '&'; a part
/// without '=' has an empty value.
template <class Fn>
void each_param(std::string_view q, Fn&& fn) {
  while (!q.empty()) {
    auto amp = q.find('&');
    auto part = q.substr(0, amp);
    auto eq = part.find('=');
    fn(part.substr(0, eq), eq == std::string_view::npos ? std::string_view{} : part.substr(eq + 1));
    if (amp == std::string_view::npos)
      break;
    q.remove_prefix(amp + 1);
  }
}

} // namespace

std::string parse_username(std::string_view u, dps_username& out) {
  constexpr std::string_view mid = "/registrations/";
  auto slash = u.find('/');
  if (slash == std::string_view::npos || slash == 0 || u.compare(slash, mid.size(), mid) != 0)
    return "user name is not {idScope}/registrations/{registrationId}/api-version=...";
  out.id_scope = std::string(u.substr(0, slash));
  auto rest = u.substr(slash + mid.size());
  auto end = rest.find('/');
  if (end == std::string_view::npos || end == 0)
    return "user name has no registration id followed by /api-version=...";
  out.registration_id = std::string(rest.substr(0, end));
  bool bad_encoding = false;
  each_param(rest.substr(end + 1), [&](std::string_view k, std::string_view v) {
    auto dv = crypto::url_decode(v);
    if (!dv) {
      bad_encoding = true;
      return;
    }
    if (k == "api-version")
      out.api_version = std::move(*dv);
    else if (k == "ClientVersion")
      out.client_version = std::move(*dv);
  });
  if (bad_encoding)
    return "user name has malformed percent-encoding";
  if (out.api_version.empty())
    return "user name has no api-version (e.g. .../api-version=2021-06-01)";
  return {};
}

std::string parse_request_topic(std::string_view topic, dps_request& out) {
  constexpr std::string_view reg = "$dps/registrations/PUT/iotdps-register/?";
  constexpr std::string_view poll = "$dps/registrations/GET/iotdps-get-operationstatus/?";
  std::string_view q;
  if (topic.substr(0, reg.size()) == reg) {
    out.what = dps_request::kind::register_device;
    q = topic.substr(reg.size());
  } else if (topic.substr(0, poll.size()) == poll) {
    out.what = dps_request::kind::poll;
    q = topic.substr(poll.size());
  } else {
    return "topic is neither $dps/registrations/PUT/iotdps-register/?$rid=... nor "
           "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=...&operationId=...";
  }
  if (q.substr(0, 5) != "$rid=")
    return "the topic's properties must start with $rid=";
  bool rid_seen = false, op_seen = false;
  each_param(q, [&](std::string_view k, std::string_view v) {
    if (k == "$rid" && !rid_seen) {
      rid_seen = true;
      out.rid = std::string(v);
    } else if (k == "operationId") {
      out.operation_id = crypto::url_decode(v); // nullopt: answered 400 by the device API
      op_seen = true;
    } else if (k == "forceRegistration") {
      out.force_registration = v == "true" || v == "True";
    }
  });
  if (out.rid.size() > max_rid_bytes)
    return "the topic's $rid is longer than " + std::to_string(max_rid_bytes) + " bytes";
  if (out.what == dps_request::kind::poll && !op_seen)
    return "an operation status topic needs &operationId=...";
  return {};
}

std::string response_topic(int status, std::string_view rid, int retry_after_s) {
  std::string t = "$dps/registrations/res/";
  t += std::to_string(status);
  t += "/?$rid=";
  t.append(rid);
  if (retry_after_s > 0) {
    t += "&retry-after=";
    t += std::to_string(retry_after_s);
  }
  return t;
}

} // namespace prov::mqtt
