#pragma once
// A DPS device over MQTT, for the MQTT integration tests (port 8883 and
// WebSocket alike): the topics, the CONNECT user name, symmetric key
// enrollments, and a register-then-poll as the SDKs do it.

#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "net/mqtt_codec.hpp"
#include "tests/support/mqtt_client.hpp"
#include "tests/support/server_process.hpp"

namespace prov::test::mqtt_device {

inline const std::string api = "2019-03-31";
inline const std::string reg_topic = "$dps/registrations/PUT/iotdps-register/?$rid=";
inline const std::string poll_topic = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=";

/// The instance CA the server's certificate chains to.
inline std::string ca(const server_process& s) { return s.data_dir() + "/tls/ca.pem"; }

/// `{idScope}/registrations/{id}/api-version=...&ClientVersion=...`.
inline std::string username(const server_process& s, const std::string& id,
                            const std::string& client_version = "provisiond-it%2F1.0") {
  return s.id_scope() + "/registrations/" + id + "/api-version=" + api
         + "&ClientVersion=" + client_version;
}

inline void put_individual(const server_process& s, const std::string& id,
                           const std::string& key) {
  nlohmann::json body{
    {"registrationId", id},
    {"attestation", {{"type", "symmetricKey"}, {"symmetricKey", {{"primaryKey", key}}}}}};
  auto r = s.service("PUT", "/enrollments/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

inline void put_group(const server_process& s, const std::string& id, const std::string& key) {
  nlohmann::json body{
    {"enrollmentGroupId", id},
    {"attestation", {{"type", "symmetricKey"}, {"symmetricKey", {{"primaryKey", key}}}}}};
  auto r = s.service("PUT", "/enrollmentGroups/" + id, body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
}

/// Registers as an SDK does (a QoS 1 register, then polls on 202, each
/// answer's $rid checked); the final payload. `first_topic`: the register's
/// answer topic.
inline nlohmann::json register_over(mqtt_client& c, const std::string& id,
                                    const std::string& rid,
                                    std::string* first_topic = nullptr) {
  REQUIRE(c.send(
    mqtt::encode_publish(reg_topic + rid, nlohmann::json{{"registrationId", id}}.dump(), 1, 11)));
  auto m = c.next_message();
  REQUIRE(m);
  CHECK(m->topic.find("?$rid=" + rid) != std::string::npos);
  if (first_topic != nullptr)
    *first_topic = m->topic;
  auto body = nlohmann::json::parse(m->payload);
  // A loaded machine may take long to assign: a deadline, not a count.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  int polls = 0;
  while (m->topic.rfind("$dps/registrations/res/202/", 0) == 0
         && std::chrono::steady_clock::now() < deadline) {
    ++polls;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    auto op = body.at("operationId").get<std::string>();
    std::string prid = rid + "-p" + std::to_string(polls);
    REQUIRE(c.send(mqtt::encode_publish(poll_topic + prid + "&operationId=" + op, " ", 0, 0)));
    m = c.next_message();
    REQUIRE(m);
    CHECK(m->topic.find("?$rid=" + prid) != std::string::npos);
    body = nlohmann::json::parse(m->payload);
  }
  CHECK(m->topic.rfind("$dps/registrations/res/200/?$rid=", 0) == 0);
  return body;
}

} // namespace prov::test::mqtt_device
