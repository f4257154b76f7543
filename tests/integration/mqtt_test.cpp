// The DPS MQTT device transport against the real provisiond process, over
// real TLS, driven by a hand-written MQTT client (tests/support/mqtt_client.hpp).

#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <thread>

#include "messages/crypto.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/mqtt_client.hpp"
#include "tests/support/mqtt_device.hpp"
#include "tests/support/server_process.hpp"
#include "tests/support/test_certs.hpp"

using namespace prov;
using nlohmann::json;

namespace {

using namespace test::mqtt_device;

/// One server for most cases: register answers wait up to 5 s for the outcome.
test::server_process& srv() { return test::shared_server(); }

/// Connected and subscribed as `id` with `key`.
std::unique_ptr<test::mqtt_client> device(const test::server_process& s, const std::string& id,
                                          const std::string& key) {
  auto c = std::make_unique<test::mqtt_client>(s.mqtt_port(), ca(s));
  REQUIRE(c->connect(id, username(s, id), s.device_auth(id, key)) == 0);
  REQUIRE(c->subscribe("$dps/registrations/res/#", 1) == 1);
  return c;
}

} // namespace

TEST_SUITE("mqtt") {

TEST_CASE("individual symmetric key: CONNECT, SUBSCRIBE (QoS 2 granted 1), register, record") {
  auto& s = srv();
  REQUIRE(s.mqtt_port() != 0);
  const std::string id = "mqtt-ind-1";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  test::mqtt_client c(s.mqtt_port(), ca(s));
  REQUIRE(c.connect(id, username(s, id), s.device_auth(id, key)) == 0);
  CHECK(c.subscribe("$dps/registrations/res/#", 2) == 1);
  std::string topic;
  auto body = register_over(c, id, "9f1c-rid", &topic);
  // The register is answered with its outcome when it comes within
  // register_wait_ms (5 s), else 202 and polls (a loaded machine): $rid
  // echoed, first, and retry-after only on a 202.
  if (topic.rfind("$dps/registrations/res/202/", 0) == 0)
    CHECK(topic.rfind("$dps/registrations/res/202/?$rid=9f1c-rid&retry-after=", 0) == 0);
  else
    CHECK(topic == "$dps/registrations/res/200/?$rid=9f1c-rid");
  CHECK(c.pubacks() == 1); // our QoS 1 PUBLISH
  CHECK(body.at("status") == "assigned");
  auto hub = body.at("registrationState").at("assignedHub").get<std::string>();
  CHECK((hub == "hub-a.example.net" || hub == "hub-b.example.net"));
  CHECK(body.at("registrationState").at("deviceId") == id);
  // The same registration record the HTTPS path writes.
  auto rec = s.service("GET", "/registrations/" + id);
  REQUIRE_MESSAGE(rec.status == 200, rec.body);
  CHECK(json::parse(rec.body).at("assignedHub") == hub);
  // A poll of the finished operation over the same connection.
  auto op = body.at("operationId").get<std::string>();
  REQUIRE(c.send(mqtt::encode_publish(poll_topic + "x&operationId=" + op, "", 1, 12)));
  auto m = c.next_message();
  REQUIRE(m);
  CHECK(m->topic == "$dps/registrations/res/200/?$rid=x");
  CHECK(m->qos == 1);
  CHECK(json::parse(m->payload).at("status") == "assigned");
  // Keep-alive: a ping is answered.
  REQUIRE(c.send(mqtt::encode_pingreq()));
  auto pong = c.read();
  REQUIRE(pong);
  CHECK(pong->type == mqtt::packet_type::pingresp);
}

TEST_CASE("group symmetric key: a derived device key registers; QoS 0 subscription") {
  auto& s = srv();
  const auto gk = crypto::generate_key();
  put_group(s, "mqtt-group-1", gk);
  const std::string id = "mqtt-grp-member-1";
  test::mqtt_client c(s.mqtt_port(), ca(s));
  REQUIRE(c.connect(id, username(s, id), s.device_auth(id, *crypto::derive_device_key(gk, id)))
          == 0);
  CHECK(c.subscribe("$dps/registrations/res/#", 0) == 0);
  auto body = register_over(c, id, "1");
  CHECK(body.at("status") == "assigned");
  // The group key itself is not a device key: refused at CONNECT.
  const std::string other = "mqtt-grp-member-2";
  test::mqtt_client d(s.mqtt_port(), ca(s));
  CHECK(d.connect(other, username(s, other), s.device_auth(other, gk)) == 5);
  CHECK(d.closed_by_server());
}

TEST_CASE("202 then polls: retry-after in the topic only, the operation id from the body") {
  test::server_process s;
  test::start_with_wait(s, 0);
  const std::string id = "mqtt-poll-1";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  auto c = device(s, id, key);
  REQUIRE(c->send(mqtt::encode_publish(reg_topic + "r1", json{{"registrationId", id}}.dump(),
                                       0, 0)));
  auto m = c->next_message();
  REQUIRE(m);
  CHECK(m->topic == "$dps/registrations/res/202/?$rid=r1&retry-after=1");
  auto accepted = json::parse(m->payload);
  CHECK(accepted.at("status") == "assigning");
  CHECK_FALSE(accepted.contains("retryAfter"));
  auto body = register_over(*c, id, "r2");
  CHECK(body.at("status") == "assigned");
  // A poll of an operation that does not exist: the error body, its status
  // in the topic, the connection stays.
  REQUIRE(c->send(mqtt::encode_publish(poll_topic + "e&operationId=5.0000000000000000.nope", "",
                                       0, 0)));
  m = c->next_message();
  REQUIRE(m);
  CHECK(m->topic.rfind("$dps/registrations/res/4", 0) == 0);
  CHECK(json::parse(m->payload).contains("errorCode"));
}

TEST_CASE("CONNACK codes: protocol level, user name, client id, scope, password") {
  auto& s = srv();
  const std::string id = "mqtt-connack-1";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  auto code = [&](const std::string& client, const std::optional<std::string>& user,
                  const std::optional<std::string>& pass) {
    test::mqtt_client c(s.mqtt_port(), ca(s));
    int r = c.connect(client, user, pass);
    CHECK(c.closed_by_server()); // every refusal closes
    return r;
  };
  const auto sas = s.device_auth(id, key);
  // 4: no user name, a user name of another shape, no api-version, no password.
  CHECK(code(id, std::nullopt, std::nullopt) == 4);
  CHECK(code(id, s.id_scope() + "/devices/" + id + "/api-version=" + api, sas) == 4);
  CHECK(code(id, s.id_scope() + "/registrations/" + id + "/x=1", sas) == 4);
  CHECK(code(id, username(s, id), std::nullopt) == 4);
  // 2: the client id is not the user name's registration id.
  CHECK(code("someone-else", username(s, id), sas) == 2);
  // 5: an unknown id scope, a SAS signed with another key, an unknown device.
  CHECK(code(id, "0ne00000000/registrations/" + id + "/api-version=" + api, sas) == 5);
  CHECK(code(id, username(s, id), s.device_auth(id, crypto::generate_key())) == 5);
  CHECK(code("mqtt-nobody", username(s, "mqtt-nobody"),
             s.device_auth("mqtt-nobody", key)) == 5);
  // 1: MQTT 5 (level 5).
  {
    test::mqtt_client c(s.mqtt_port(), ca(s));
    mqtt::connect_packet p;
    p.protocol_level = 5;
    p.client_id = id;
    p.username = username(s, id);
    p.password = sas;
    REQUIRE(c.send(mqtt::encode_connect(p)));
    auto ack = c.read();
    REQUIRE(ack);
    CHECK(ack->body == std::string("\x00\x01", 2));
    CHECK(c.closed_by_server());
  }
  // Nothing of these reached a registration.
  CHECK(s.service("GET", "/registrations/" + id).status == 404);
}

TEST_CASE("protocol violations close the connection and store nothing") {
  auto& s = srv();
  const std::string id = "mqtt-bad-1";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  const std::string reg_body = json{{"registrationId", id}}.dump();
  auto after_connect = [&](const std::string& bytes) {
    auto c = device(s, id, key);
    c->send(bytes);
    bool answered = false;
    while (auto p = c->read())
      answered = answered || p->type == mqtt::packet_type::publish;
    CHECK_FALSE(c->timed_out()); // closed, not left hanging
    return answered;
  };
  SUBCASE("a remaining length of five bytes") {
    CHECK_FALSE(after_connect(std::string("\x30\xff\xff\xff\xff\x01", 6)));
  }
  SUBCASE("a register on an unknown topic") {
    CHECK_FALSE(after_connect(mqtt::encode_publish("$dps/registrations/PUT/other/?$rid=1",
                                                   reg_body, 0, 0)));
  }
  SUBCASE("a topic without $rid first") {
    CHECK_FALSE(after_connect(mqtt::encode_publish(
      "$dps/registrations/PUT/iotdps-register/?x=1&$rid=1", reg_body, 0, 0)));
  }
  SUBCASE("a $rid longer than 128 bytes (the response topic echoes it)") {
    CHECK_FALSE(after_connect(
      mqtt::encode_publish(reg_topic + std::string(129, 'r'), reg_body, 0, 0)));
    // The longest $rid a topic can carry: a 202's response topic
    // (with &retry-after=) would not fit an MQTT string.
    auto near_limit = mqtt::encode_publish(
      reg_topic + std::string(0xffff - reg_topic.size(), 'r'), reg_body, 0, 0);
    REQUIRE_FALSE(near_limit.empty());
    CHECK_FALSE(after_connect(near_limit));
  }
  SUBCASE("exactly five bytes, the fourth length byte continued") {
    CHECK_FALSE(after_connect(std::string("\x30\xff\xff\xff\xff", 5)));
  }
  SUBCASE("a QoS 2 register") {
    CHECK_FALSE(after_connect(mqtt::encode_publish(reg_topic + "1", reg_body, 2, 1)));
  }
  SUBCASE("a packet larger than mqtt.max_packet_bytes") {
    CHECK_FALSE(after_connect(
      mqtt::encode_publish(reg_topic + "1", std::string(200 * 1024, ' '), 0, 0)));
  }
  SUBCASE("a second CONNECT") {
    mqtt::connect_packet p;
    p.protocol_level = 4;
    p.client_id = id;
    CHECK_FALSE(after_connect(mqtt::encode_connect(p)));
  }
  SUBCASE("a packet before CONNECT") {
    test::mqtt_client c(s.mqtt_port(), ca(s));
    c.send(mqtt::encode_publish(reg_topic + "1", reg_body, 0, 0));
    CHECK(c.closed_by_server());
  }
  CHECK(s.service("GET", "/registrations/" + id).status == 404);
}

TEST_CASE("X.509: the TLS client certificate with no password, as DPS X.509 devices do") {
  auto& s = srv();
  const std::string id = "mqtt-x509-1";
  const auto dev = test::make_self_signed_device(id);
  json x509{{"clientCertificates", {{"primary", {{"certificate", dev.pem()}}}}}};
  auto r = s.service("PUT", "/enrollments/" + id,
                     json{{"registrationId", id},
                          {"attestation", {{"type", "x509"}, {"x509", x509}}}}
                       .dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto with_cert = [](const test::test_cert& c) {
    return [&c](SSL_CTX* ctx) {
      REQUIRE(SSL_CTX_use_certificate(ctx, c.cert.get()) == 1);
      REQUIRE(SSL_CTX_use_PrivateKey(ctx, c.key.get()) == 1);
    };
  };
  {
    test::mqtt_client c(s.mqtt_port(), ca(s), 20, with_cert(dev));
    REQUIRE(c.connect(id, username(s, id), std::nullopt) == 0);
    REQUIRE(c.subscribe("$dps/registrations/res/#", 1) == 1);
    auto body = register_over(c, id, "x1");
    CHECK(body.at("status") == "assigned");
    CHECK(body.at("registrationState").contains("x509"));
  }
  // Another certificate for the same registration id: not authorized.
  const auto other = test::make_self_signed_device(id);
  test::mqtt_client c(s.mqtt_port(), ca(s), 20, with_cert(other));
  CHECK(c.connect(id, username(s, id), std::nullopt) == 5);
}

TEST_CASE("an unknown subscription filter is refused in the SUBACK") {
  auto& s = srv();
  const std::string id = "mqtt-sub-1";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  test::mqtt_client c(s.mqtt_port(), ca(s));
  REQUIRE(c.connect(id, username(s, id), s.device_auth(id, key)) == 0);
  CHECK(c.subscribe("devices/" + id + "/messages/devicebound/#", 1) == 0x80);
  CHECK(c.subscribe("$dps/registrations/res/#", 1, 2) == 1);
}

TEST_CASE("answers to one read are written together; a long burst is all answered") {
  auto& s = srv();
  const std::string id = "mqtt-batch-1";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  auto c = device(s, id, key);
  // 100 PINGREQs in one TLS record: the 100 PINGRESPs come back in one
  // record too (one write per read batch), not one record per packet.
  std::string pings;
  for (int i = 0; i < 100; ++i)
    pings += mqtt::encode_pingreq();
  REQUIRE(c->send(pings));
  auto first = c->read_record();
  std::string expected;
  for (int i = 0; i < 100; ++i)
    expected += mqtt::encode_pingresp();
  CHECK(first.size() == expected.size());
  std::string got = first;
  // 48,000 more (96 KB, beyond the 64 KB after which a read batch yields
  // the thread): every one answered, none lost across the yields.
  std::string burst;
  for (int i = 0; i < 48000; ++i)
    burst += mqtt::encode_pingreq();
  REQUIRE(c->send(burst));
  const std::size_t want = (100 + 48000) * mqtt::encode_pingresp().size();
  while (got.size() < want) {
    auto r = c->read_record();
    if (r.empty())
      break;
    got += r;
  }
  CHECK(got.size() == want);
  CHECK(got.find_first_not_of(mqtt::encode_pingresp()) == std::string::npos);
  // Still open and answering.
  auto body = register_over(*c, id, "after-burst");
  CHECK(body.at("status") == "assigned");
}

TEST_CASE("QoS 1 without sessions: clean session 0 gets session present 0; answers carry "
          "distinct packet ids, are not redelivered after a reconnect; the device polls") {
  auto& s = srv();
  const std::string id = "mqtt-qos1-nosession";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  auto connect = [&](test::mqtt_client& c) {
    mqtt::connect_packet cp;
    cp.protocol_level = 4;
    cp.clean_session = false; // asks for a persistent session
    cp.keep_alive_s = 60;
    cp.client_id = id;
    cp.username = username(s, id);
    cp.password = s.device_auth(id, key);
    REQUIRE(c.send(mqtt::encode_connect(cp)));
    auto p = c.read();
    REQUIRE(p);
    REQUIRE(p->type == mqtt::packet_type::connack);
    // Accepted, no session present: the client knows to subscribe again.
    CHECK(p->body == std::string("\0\0", 2));
  };
  // The next server PUBLISH, not acknowledged (PUBACKs for ours skipped).
  auto next_publish = [](test::mqtt_client& c) {
    for (;;) {
      auto p = c.read();
      REQUIRE(p);
      if (p->type == mqtt::packet_type::puback)
        continue;
      REQUIRE(p->type == mqtt::packet_type::publish);
      mqtt::publish_packet pub;
      REQUIRE(mqtt::parse_publish(mqtt::frame{p->type, p->flags, p->body}, pub).empty());
      return std::make_pair(pub, std::string(pub.payload));
    }
  };
  std::string op;
  {
    test::mqtt_client c(s.mqtt_port(), ca(s));
    connect(c);
    REQUIRE(c.subscribe("$dps/registrations/res/#", 1) == 1);
    REQUIRE(c.send(mqtt::encode_publish(reg_topic + "q1", json{{"registrationId", id}}.dump(), 1,
                                        21)));
    auto [first, body1] = next_publish(c);
    CHECK(first.qos == 1);
    CHECK(first.packet_id != 0);
    op = json::parse(body1).at("operationId").get<std::string>();
    REQUIRE(c.send(mqtt::encode_publish(poll_topic + "q2&operationId=" + op, " ", 1, 22)));
    auto [second, body2] = next_publish(c);
    CHECK(second.qos == 1);
    CHECK(second.packet_id != 0);
    CHECK(second.packet_id != first.packet_id); // first still unacknowledged
    // The client goes away without acknowledging either answer.
  }
  test::mqtt_client again(s.mqtt_port(), ca(s), 2);
  connect(again);
  // Nothing is redelivered (no session state was kept) ...
  CHECK(!again.read());
  CHECK(again.timed_out());
  // ... the device subscribes again and polls its operation: the outcome.
  REQUIRE(again.subscribe("$dps/registrations/res/#", 1) == 1);
  json body;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  int polls = 0;
  do {
    std::this_thread::sleep_for(std::chrono::milliseconds(polls++ == 0 ? 0 : 100));
    REQUIRE(again.send(mqtt::encode_publish(poll_topic + "q3&operationId=" + op, " ", 0, 0)));
    auto m = again.next_message();
    REQUIRE(m);
    body = json::parse(m->payload);
  } while (body.value("status", "") == "assigning" && std::chrono::steady_clock::now() < deadline);
  CHECK(body.at("status") == "assigned");
}

TEST_CASE("keep-alive, request deadlines, in-flight limit, and per-transport metrics") {
  test::server_process s;
  auto dir = test::make_temp_dir("provisiond-it");
  s.remove_data_dir_at_exit();
  auto cfg = test::with_metrics(test::with_device_api(test::default_config(dir),
                                                      "register_wait_ms = 5000\n"
                                                      "request_timeout_seconds = 3"))
             + "[mqtt]\nlisten = \"127.0.0.1:0\"\nmax_inflight = 2\n";
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  const std::string id = "mqtt-ka-1";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  {
    // Keep-alive 1 s: closed after 1.5 s of silence (the read waits up to 20 s).
    test::mqtt_client c(s.mqtt_port(), ca(s));
    REQUIRE(c.connect(id, username(s, id), s.device_auth(id, key), 1) == 0);
    CHECK(c.closed_by_server());
  }
  {
    // TLS up, no CONNECT: closed after request_timeout_seconds.
    test::mqtt_client c(s.mqtt_port(), ca(s));
    CHECK(c.closed_by_server());
  }
  {
    // Half a PUBLISH, then silence (slowloris): closed after
    // request_timeout_seconds although the keep-alive (60 s) has not run out.
    auto c = device(s, id, key);
    auto pub = mqtt::encode_publish(reg_topic + "1", json{{"registrationId", id}}.dump(), 0, 0);
    REQUIRE(c->send(pub.substr(0, 10)));
    CHECK(c->closed_by_server());
  }
  {
    // Ten polls in one write: more than 2 unanswered at once.
    auto c = device(s, id, key);
    std::string flood;
    for (int i = 0; i < 10; ++i)
      flood += mqtt::encode_publish(poll_topic + std::to_string(i) + "&operationId=5.x.y", "", 0, 0);
    REQUIRE(c->send(flood));
    CHECK(c->closed_by_server());
  }
  {
    auto c = device(s, id, key);
    auto body = register_over(*c, id, "m1");
    CHECK(body.at("status") == "assigned");
  }
  auto m = test::scrape_until(test::metrics_addr(s), [](const auto& mm) {
    return test::sum(mm, "dps_mqtt_disconnects_total", {"reason=\"inflight\""}) >= 1;
  });
  CHECK(test::sum(m, "dps_mqtt_disconnects_total", {"reason=\"keep_alive\""}) == 1);
  CHECK(test::sum(m, "dps_mqtt_disconnects_total", {"reason=\"inflight\""}) == 1);
  CHECK(test::sum(m, "dps_mqtt_disconnects_total", {"reason=\"connect_timeout\""}) == 1);
  CHECK(test::sum(m, "dps_mqtt_disconnects_total", {"reason=\"request_timeout\""}) == 1);
  CHECK(test::sum(m, "dps_mqtt_connects_total", {"code=\"0\""}) == 4);
  CHECK(test::sum(m, "dps_mqtt_requests_total", {"operation=\"register\"", "status=\"200\""})
        == 1);
  CHECK(test::sum(m, "dps_registration_attempts_total", {"protocol=\"mqtt\"", "status=\"assigned\""})
        == 1);
}

} // TEST_SUITE
