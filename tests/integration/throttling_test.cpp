// [throttling] quotas against the real provisiond process over real TLS:
// 429 (429001) with Retry-After past each quota, decided before any crypto
// (a wrong signature is refused 429, not 401) or storage (nothing recorded
// for a throttled register), keys and addresses independent, quotas reset
// once Retry-After has passed, and the refusals counted in metrics.
//
// No timing assertion depends on the machine's speed: quotas are small with
// long windows, and loops run until the first 429 (with a bound) instead of
// expecting it at an exact count; the only sleep waits at least Retry-After.

#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <thread>

#include "messages/crypto.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/metrics_scrape.hpp"
#include "tests/support/mqtt_client.hpp"
#include "tests/support/raw_tls.hpp"
#include "tests/support/server_process.hpp"

using namespace prov;
using nlohmann::json;

namespace {

/// `cfg` with a [throttling] table of `lines`.
std::string with_throttling(std::string cfg, const std::string& lines) {
  return cfg + "\n[throttling]\n" + lines + "\n";
}

/// Starts `s` on a fresh temp dir with `throttling` lines and metrics.
void start(test::server_process& s, const std::string& throttling,
           const std::string& listen = {}) {
  auto dir = test::make_temp_dir("provisiond-it");
  s.remove_data_dir_at_exit();
  auto cfg = test::with_metrics(with_throttling(
    test::with_device_api(test::default_config(dir), "register_wait_ms = 5000"), throttling));
  if (!listen.empty()) {
    auto at = cfg.find("listen = \"127.0.0.1:0\"");
    REQUIRE(at != std::string::npos);
    cfg.replace(at, std::string("listen = \"127.0.0.1:0\"").size(), "listen = \"" + listen + "\"");
  }
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
}

net::https_response put_register(net::https_client& c, const test::server_process& s,
                                 const std::string& id, const std::string& auth) {
  net::http_headers h;
  h.add("Authorization", auth);
  h.add("Content-Type", "application/json; charset=utf-8");
  net::https_response resp;
  auto err = c.request("PUT", "/" + s.id_scope() + "/registrations/" + id
                                + "/register?api-version=2021-06-01",
                       h, json{{"registrationId", id}}.dump(), resp);
  REQUIRE_MESSAGE(!err, err.message);
  return resp;
}

net::https_response get_poll(net::https_client& c, const test::server_process& s,
                             const std::string& id, const std::string& auth) {
  net::http_headers h;
  h.add("Authorization", auth);
  net::https_response resp;
  auto err = c.request("GET", "/" + s.id_scope() + "/registrations/" + id
                                + "/operations/no-such-op?api-version=2021-06-01",
                       h, {}, resp);
  REQUIRE_MESSAGE(!err, err.message);
  return resp;
}

/// A 429 as DPS sends it: errorCode 429001 in the body and the header, and a
/// Retry-After of whole seconds in 1..`max_wait`. Returns Retry-After.
int check_throttled(const net::https_response& r, int max_wait) {
  CHECK_MESSAGE(r.status == 429, r.body);
  auto j = test::parse_json(r.body);
  CHECK(j.value("errorCode", 0) == 429001);
  CHECK(!j.value("trackingId", "").empty());
  CHECK(r.headers.get("x-ms-error-code") == "429001");
  const auto ra = r.headers.get("Retry-After");
  REQUIRE_MESSAGE(!ra.empty(), "no Retry-After on a 429");
  const int wait = std::stoi(ra);
  CHECK(wait >= 1);
  CHECK(wait <= max_wait);
  return wait;
}

double throttled_metric(const test::server_process& s, const std::string& reason) {
  auto m = test::scrape(test::metrics_addr(s));
  auto it = m.find("dps_throttled_requests_total{reason=\"" + reason + "\"}");
  return it == m.end() ? 0 : it->second;
}

/// A wrong signature for `id` (a key nobody enrolled).
std::string bad_auth(const test::server_process& s, const std::string& id) {
  return s.device_auth(id, crypto::generate_key());
}

/// Options for a client of `s` from ::1 (the server listens dual-stack), so
/// its requests do not spend 127.0.0.1's per-address budget.
net::https_client_options v6_options(const test::server_process& s) {
  net::https_client_options o;
  o.host = "::1";
  o.server_name = "localhost";
  o.port = s.port();
  o.ca_file = s.data_dir() + "/tls/ca.pem";
  return o;
}

/// Writes a symmetric-key enrollment for `id` through `c`.
void put_enrollment(net::https_client& c, const test::server_process& s, const std::string& id,
                    const std::string& key) {
  net::http_headers h;
  h.add("Authorization", s.service_auth());
  h.add("Content-Type", "application/json");
  json body{{"registrationId", id},
            {"attestation",
             {{"type", "symmetricKey"}, {"symmetricKey", {{"primaryKey", key}}}}}};
  net::https_response r;
  REQUIRE(!c.request("PUT", "/enrollments/" + id + "?api-version=2021-10-01", h, body.dump(), r));
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

/// Sends register PUBLISHes for `id` ($rid=<tag>0, <tag>1, ...; QoS `qos`)
/// until one is answered 429, at most 10; every earlier one must be
/// answered 20x. Returns how many were admitted; `last` is the last answer.
int publish_until_throttled(test::mqtt_client& c, const std::string& id, const std::string& tag,
                            uint8_t qos, std::optional<test::mqtt_client::message>& last) {
  const std::string topic = "$dps/registrations/PUT/iotdps-register/?$rid=";
  int admitted = 0;
  for (int i = 0; i < 10; ++i) {
    REQUIRE(c.send(mqtt::encode_publish(topic + tag + std::to_string(i),
                                        json{{"registrationId", id}}.dump(), qos,
                                        qos == 0 ? 0 : static_cast<uint16_t>(i + 1))));
    last = c.next_message();
    REQUIRE(last);
    if (last->topic.rfind("$dps/registrations/res/429/", 0) == 0)
      break;
    CHECK_MESSAGE(last->topic.rfind("$dps/registrations/res/20", 0) == 0, last->topic);
    ++admitted;
  }
  return admitted;
}

} // namespace

TEST_CASE("throttling: polls per device, before the SAS is checked; other devices unaffected; "
          "the quota resets after Retry-After") {
  test::server_process s;
  start(s, "polls_per_device = 2\npoll_window_seconds = 4");
  auto c = s.client();
  // Refill is one poll per 2 s: the first two are admitted (and fail the
  // signature check: 401), then 429 comes within a few more.
  int admitted = 0;
  net::https_response r;
  for (int i = 0; i < 20; ++i) {
    r = get_poll(c, s, "poll-a", bad_auth(s, "poll-a"));
    if (r.status == 429)
      break;
    CHECK_MESSAGE(r.status == 401, r.body);
    ++admitted;
  }
  CHECK(admitted >= 2);
  const int wait = check_throttled(r, 2);
  // Another device has its own quota.
  CHECK(get_poll(c, s, "poll-b", bad_auth(s, "poll-b")).status == 401);
  // The id is case-insensitive: "POLL-A" is the same device.
  CHECK(get_poll(c, s, "POLL-A", bad_auth(s, "POLL-A")).status == 429);
  // After Retry-After, a poll is admitted again.
  std::this_thread::sleep_for(std::chrono::seconds(wait) + std::chrono::milliseconds(100));
  CHECK(get_poll(c, s, "poll-a", bad_auth(s, "poll-a")).status == 401);
  CHECK(throttled_metric(s, "device_poll_rate") >= 2);
}

TEST_CASE("throttling: registrations per ID scope, before any crypto or storage") {
  test::server_process s;
  // One register per 30 s after a burst of 2.
  start(s, "registrations_per_minute_per_scope = 2");
  auto c = s.client();
  const auto key = crypto::generate_key();
  json body{{"registrationId", "scope-enrolled"},
            {"attestation", {{"type", "symmetricKey"},
                             {"symmetricKey", {{"primaryKey", key}, {"secondaryKey", key}}}}}};
  REQUIRE(s.service("PUT", "/enrollments/scope-enrolled", body.dump()).status == 200);
  int admitted = 0;
  net::https_response r;
  for (int i = 0; i < 10; ++i) {
    r = put_register(c, s, "scope-" + std::to_string(i),
                     bad_auth(s, "scope-" + std::to_string(i)));
    if (r.status == 429)
      break;
    CHECK_MESSAGE(r.status == 401, r.body);
    ++admitted;
  }
  CHECK(admitted >= 2);
  CHECK(admitted <= 4);
  check_throttled(r, 30);
  // A correctly signed register of an enrolled device is refused too, and
  // nothing is recorded for it.
  auto enrolled = put_register(c, s, "scope-enrolled", s.device_auth("scope-enrolled", key));
  check_throttled(enrolled, 30);
  CHECK(s.service("GET", "/registrations/scope-enrolled?api-version=2021-10-01").status == 404);
  // Polls and the service API are not registrations.
  CHECK(get_poll(c, s, "scope-enrolled", s.device_auth("scope-enrolled", key)).status == 404);
  CHECK(s.service("GET", "/enrollments/scope-enrolled?api-version=2021-10-01").status == 200);
  CHECK(throttled_metric(s, "scope_registration_rate") >= 2);
}

TEST_CASE("throttling: registrations per enrollment group; other groups unaffected; nothing "
          "stored for the refused device") {
  test::server_process s;
  start(s, "registrations_per_minute_per_group = 2");
  const auto key_a = crypto::generate_key(), key_b = crypto::generate_key();
  test::create_group(s, "throttle-group-a", key_a);
  test::create_group(s, "throttle-group-b", key_b);
  auto c = s.client();
  int admitted = 0;
  std::string refused_id;
  net::https_response r;
  for (int i = 0; i < 10; ++i) {
    const auto id = "group-a-dev-" + std::to_string(i);
    r = put_register(c, s, id, s.device_auth(id, *crypto::derive_device_key(key_a, id)));
    if (r.status == 429) {
      refused_id = id;
      break;
    }
    CHECK_MESSAGE((r.status == 200 || r.status == 202), r.body);
    ++admitted;
  }
  CHECK(admitted >= 2);
  CHECK(admitted <= 4);
  REQUIRE(!refused_id.empty());
  check_throttled(r, 30);
  CHECK(s.service("GET", "/registrations/" + refused_id + "?api-version=2021-10-01").status
        == 404);
  // Group b has its own quota.
  const std::string id_b = "group-b-dev-0";
  int status = 0;
  auto res = test::register_device(c, s, id_b, *crypto::derive_device_key(key_b, id_b), status);
  CHECK(status == 200);
  CHECK(res.value("status", "") == "assigned");
  // An individual enrollment is not in any group's quota.
  const auto key = crypto::generate_key();
  json body{{"registrationId", "group-free-dev"},
            {"attestation", {{"type", "symmetricKey"},
                             {"symmetricKey", {{"primaryKey", key}, {"secondaryKey", key}}}}}};
  REQUIRE(s.service("PUT", "/enrollments/group-free-dev", body.dump()).status == 200);
  res = test::register_device(c, s, "group-free-dev", key, status);
  CHECK(status == 200);
  CHECK(throttled_metric(s, "group_registration_rate") >= 1);
}

TEST_CASE("throttling: requests per client address, both APIs; other addresses and health "
          "checks unaffected") {
  test::server_process s;
  // Dual-stack listener: the test reaches it from 127.0.0.1 and from ::1,
  // two client addresses.
  start(s, "requests_per_minute_per_address = 3", "[::]:0");
  auto c = s.client();
  int admitted = 0;
  net::https_response r;
  for (int i = 0; i < 10; ++i) {
    r = s.service("GET", "/enrollments/nobody?api-version=2021-10-01");
    if (r.status == 429)
      break;
    CHECK_MESSAGE(r.status == 404, r.body);
    ++admitted;
  }
  CHECK(admitted >= 3);
  CHECK(admitted <= 5);
  check_throttled(r, 20);
  // The device API from the same address: refused before the SAS is read.
  check_throttled(put_register(c, s, "addr-dev", bad_auth(s, "addr-dev")), 20);
  // Health checks are not counted.
  net::https_response health;
  REQUIRE(!c.request("GET", "/healthz", {}, {}, health));
  CHECK(health.status == 200);
  // ::1 is another client.
  net::https_client v6(v6_options(s));
  CHECK(put_register(v6, s, "addr-dev", bad_auth(s, "addr-dev")).status == 401);
  CHECK(throttled_metric(s, "client_request_rate") >= 2);
}

TEST_CASE("throttling: requests per client address over MQTT: CONNECT and PUBLISH count in the "
          "same budget as HTTPS; 429001 on the response topic, connection kept") {
  test::server_process s;
  // HTTPS dual-stack: the enrollment is written from ::1, the MQTT device
  // (127.0.0.1 only) and its HTTPS requests come from 127.0.0.1.
  start(s, "requests_per_minute_per_address = 3", "[::]:0");
  REQUIRE(s.mqtt_port() != 0);
  net::https_client v6(v6_options(s));
  const std::string id = "mqtt-addr-dev";
  const auto key = crypto::generate_key();
  put_enrollment(v6, s, id, key);
  const std::string user =
    s.id_scope() + "/registrations/" + id + "/api-version=2019-03-31";
  test::mqtt_client c(s.mqtt_port(), s.data_dir() + "/tls/ca.pem");
  REQUIRE(c.connect(id, user, s.device_auth(id, key)) == 0); // one request
  REQUIRE(c.subscribe("$dps/registrations/res/#", 0) == 0);  // not counted
  std::optional<test::mqtt_client::message> m;
  const int admitted = publish_until_throttled(c, id, "r", 0, m);
  // CONNECT took one of the 3; a token may come back on a slow machine.
  CHECK(admitted >= 2);
  CHECK(admitted <= 4);
  REQUIRE(m);
  const std::string prefix =
    "$dps/registrations/res/429/?$rid=r" + std::to_string(admitted) + "&retry-after=";
  REQUIRE_MESSAGE(m->topic.rfind(prefix, 0) == 0, m->topic);
  const int wait = std::stoi(m->topic.substr(prefix.size()));
  CHECK(wait >= 1);
  CHECK(wait <= 20);
  auto body = test::parse_json(m->payload);
  CHECK(body.value("errorCode", 0) == 429001);
  CHECK(!body.value("trackingId", "").empty());
  // The connection stays open and answering.
  REQUIRE(c.send(mqtt::encode_pingreq()));
  auto pong = c.read();
  REQUIRE(pong);
  CHECK(pong->type == mqtt::packet_type::pingresp);
  // A new CONNECT from the address: CONNACK 3 (server unavailable).
  test::mqtt_client again(s.mqtt_port(), s.data_dir() + "/tls/ca.pem");
  CHECK(again.connect(id, user, s.device_auth(id, key)) == 3);
  // One budget with HTTPS: the address's HTTPS requests are refused too.
  auto c4 = s.client(false);
  check_throttled(put_register(c4, s, id, s.device_auth(id, key)), 20);
  // Another address (::1) is unaffected.
  CHECK(get_poll(v6, s, id, bad_auth(s, id)).status == 401);
  CHECK(throttled_metric(s, "client_request_rate") >= 3);
}

TEST_CASE("throttling: requests per client address over MQTT over WebSocket: the same budget; "
          "429001 on the response topic, the upgrade request itself answered 429 once spent") {
  test::server_process s;
  // HTTPS dual-stack: the enrollment is written from ::1; the device's
  // upgrade, CONNECT and PUBLISHes come from 127.0.0.1 (keyed as IPv4).
  // Four: the upgrade, the CONNECT, and two registers.
  start(s, "requests_per_minute_per_address = 4", "[::]:0");
  net::https_client v6(v6_options(s));
  const std::string id = "ws-addr-dev";
  const auto key = crypto::generate_key();
  put_enrollment(v6, s, id, key);
  const std::string user = s.id_scope() + "/registrations/" + id + "/api-version=2019-03-31";
  const std::string ca = s.data_dir() + "/tls/ca.pem";
  test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca); // one request
  REQUIRE(c.connect(id, user, s.device_auth(id, key)) == 0);         // two
  REQUIRE(c.subscribe("$dps/registrations/res/#", 1) == 1);  // not counted
  std::optional<test::mqtt_client::message> m;
  const int admitted = publish_until_throttled(c, id, "w", 1, m);
  CHECK(admitted >= 2);
  CHECK(admitted <= 4);
  REQUIRE(m);
  const std::string prefix =
    "$dps/registrations/res/429/?$rid=w" + std::to_string(admitted) + "&retry-after=";
  REQUIRE_MESSAGE(m->topic.rfind(prefix, 0) == 0, m->topic);
  CHECK(m->qos == 1);
  CHECK(test::parse_json(m->payload).value("errorCode", 0) == 429001);
  // Nothing stored for the refused register beyond the admitted ones; the
  // connection stays and answers.
  REQUIRE(c.send(mqtt::encode_pingreq()));
  auto pong = c.read();
  REQUIRE(pong);
  CHECK(pong->type == mqtt::packet_type::pingresp);
  // A new upgrade request from the address: 429 with the Azure error body
  // and Retry-After, and no 101 (the connection closes, nothing upgraded).
  {
    SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
    REQUIRE(ctx != nullptr);
    std::string raw;
    test::raw_tls_request(ctx, s.port(), test::mqtt_client::upgrade_request(), nullptr,
                          nullptr, raw);
    SSL_CTX_free(ctx);
    REQUIRE_MESSAGE(raw.rfind("HTTP/1.1 429 ", 0) == 0, raw);
    const auto head_end = raw.find("\r\n\r\n");
    REQUIRE(head_end != std::string::npos);
    const auto head = raw.substr(0, head_end + 2);
    CHECK(head.find("\r\nx-ms-error-code: 429001\r\n") != std::string::npos);
    const auto ra = head.find("\r\nRetry-After: ");
    REQUIRE_MESSAGE(ra != std::string::npos, head);
    CHECK(std::stoi(head.substr(ra + 15)) >= 1);
    CHECK(head.find("Upgrade:") == std::string::npos);
    auto body = test::parse_json(raw.substr(head_end + 4));
    CHECK(body.value("errorCode", 0) == 429001);
  }
  // Another address (::1) is unaffected.
  CHECK(get_poll(v6, s, id, bad_auth(s, id)).status == 401);
  CHECK(throttled_metric(s, "client_request_rate") >= 2);
  // The upgrades are in the HTTP request metrics: one 101, one 429.
  auto scraped = test::scrape(test::metrics_addr(s));
  CHECK(test::sum(scraped, "dps_http_requests_total",
                  {"route=\"GET /$iothub/websocket\"", "status=\"101\""})
        == 1);
  CHECK(test::sum(scraped, "dps_http_requests_total",
                  {"route=\"GET /$iothub/websocket\"", "status=\"429\""})
        == 1);
}

TEST_CASE("throttling: registrations per ID scope are one budget for HTTPS and MQTT") {
  test::server_process s;
  start(s, "registrations_per_minute_per_scope = 2");
  REQUIRE(s.mqtt_port() != 0);
  const std::string id = "scope-mqtt-dev";
  const auto key = crypto::generate_key();
  json body{{"registrationId", id},
            {"attestation", {{"type", "symmetricKey"}, {"symmetricKey", {{"primaryKey", key}}}}}};
  REQUIRE(s.service("PUT", "/enrollments/" + id, body.dump()).status == 200);
  test::mqtt_client c(s.mqtt_port(), s.data_dir() + "/tls/ca.pem");
  REQUIRE(c.connect(id, s.id_scope() + "/registrations/" + id + "/api-version=2019-03-31",
                    s.device_auth(id, key))
          == 0);
  REQUIRE(c.subscribe("$dps/registrations/res/#", 0) == 0);
  const std::string topic = "$dps/registrations/PUT/iotdps-register/?$rid=";
  // The burst of 2 spent over HTTPS (a wrong signature: refused 401 after
  // the quota, so it counts)...
  auto https = s.client();
  for (int i = 0; i < 2; ++i) {
    auto r = put_register(https, s, "scope-h" + std::to_string(i),
                          bad_auth(s, "scope-h" + std::to_string(i)));
    CHECK_MESSAGE(r.status == 401, r.body);
  }
  // ... leaves none for MQTT: refused on the response topic. (One token
  // comes back per 30 s: a stalled machine may admit one more.)
  int admitted = 0;
  bool throttled = false;
  for (int i = 0; i < 3 && !throttled; ++i) {
    const std::string rid = "s" + std::to_string(i);
    REQUIRE(c.send(mqtt::encode_publish(topic + rid, json{{"registrationId", id}}.dump(), 0, 0)));
    auto m = c.next_message();
    REQUIRE(m);
    if (m->topic.rfind("$dps/registrations/res/429/?$rid=" + rid + "&retry-after=", 0) == 0) {
      CHECK(test::parse_json(m->payload).value("errorCode", 0) == 429001);
      throttled = true;
    } else {
      CHECK_MESSAGE(m->topic.rfind("$dps/registrations/res/20", 0) == 0, m->topic);
      ++admitted;
    }
  }
  CHECK(throttled);
  CHECK(admitted <= 1);
  CHECK(throttled_metric(s, "scope_registration_rate") >= 1);
}
