// MQTT over WebSocket on the HTTPS port (/$iothub/websocket, subprotocol
// mqtt) against the real provisiond process over real TLS: a device
// registers through the same MQTT session code as port 8883; bad upgrades
// and bad frames each get a clear error, and the server stays healthy.

#include <doctest/doctest.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "messages/crypto.hpp"
#include "net/websocket.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/metrics_scrape.hpp"
#include "tests/support/mqtt_client.hpp"
#include "tests/support/mqtt_device.hpp"
#include "tests/support/raw_tls.hpp"
#include "tests/support/server_process.hpp"

using namespace prov;
using nlohmann::json;

namespace {

using namespace test::mqtt_device;

test::server_process& srv() { return test::shared_server(); }

/// The raw answer to one upgrade request on a fresh TLS connection (the
/// server closes after an error, so this reads to the end).
std::string upgrade_answer(const test::server_process& s, const std::string& request) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  REQUIRE(ctx != nullptr);
  std::string response;
  test::raw_tls_request(ctx, s.port(), request, nullptr, nullptr, response);
  SSL_CTX_free(ctx);
  return response;
}

json error_body_of(const std::string& response) {
  auto at = response.find("\r\n\r\n");
  REQUIRE(at != std::string::npos);
  return test::parse_json(response.substr(at + 4));
}

/// A CONNECT as the SDKs send it, for `id` with `key`.
std::string connect_packet(const test::server_process& s, const std::string& id,
                           const std::string& key) {
  mqtt::connect_packet cp;
  cp.protocol_level = 4;
  cp.clean_session = true;
  cp.keep_alive_s = 60;
  cp.client_id = id;
  cp.username = username(s, id);
  cp.password = s.device_auth(id, key);
  return mqtt::encode_connect(cp);
}

/// Whether a TLS handshake with 127.0.0.1:`port` completes (a connection
/// refused at a cap is closed before it).
bool tls_admitted(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{20, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  bool ok = false;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
    SSL* ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    ok = SSL_connect(ssl) == 1;
    SSL_free(ssl);
    SSL_CTX_free(ctx);
  }
  ::close(fd);
  return ok;
}

/// Whether 127.0.0.1:`port` refuses TCP connections (its listener closed).
bool refuses(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool refused = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0
                       && errno == ECONNREFUSED;
  ::close(fd);
  return refused;
}

/// Healthy: a plain HTTPS request answers, and a device still registers
/// over WebSocket.
void check_healthy(const test::server_process& s) {
  REQUIRE(s.alive());
  auto c = s.client(false);
  net::https_response r;
  REQUIRE(!c.request("GET", "/healthz", r));
  CHECK(r.status == 200);
  const std::string id = "ws-health-" + crypto::hex(crypto::random_bytes(4));
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  test::mqtt_client ws(test::mqtt_client::websocket, s.port(), ca(s));
  REQUIRE(ws.connect(id, username(s, id), s.device_auth(id, key)) == 0);
  REQUIRE(ws.subscribe("$dps/registrations/res/#", 0) == 0);
  CHECK(register_over(ws, id, "h1").at("status") == "assigned");
}

/// The largest send buffer the kernel gives a TCP socket (net.ipv4.tcp_wmem's
/// maximum; 0 when unreadable): how much a flood must exceed before the
/// server's own queue grows.
long tcp_wmem_max() {
  long lo = 0, def = 0, max = 0;
  std::ifstream in("/proc/sys/net/ipv4/tcp_wmem");
  in >> lo >> def >> max;
  return max;
}

/// 64 masked client pings of 125 bytes (each answered by a 127-byte pong),
/// to write at once.
std::string ping_batch() {
  std::string batch;
  for (int i = 0; i < 64; ++i)
    batch += ws::encode_client_frame(ws::opcode::ping, std::string(125, 'p'), 0x0badf00du + i);
  return batch;
}

} // namespace

TEST_SUITE("mqtt_ws") {

TEST_CASE("a device registers over MQTT over WebSocket on the HTTPS port") {
  auto& s = srv();
  const std::string id = "mqtt-ws-ind-1";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s));
  REQUIRE(c.connect(id, username(s, id), s.device_auth(id, key)) == 0);
  CHECK(c.subscribe("$dps/registrations/res/#", 1) == 1);
  auto body = register_over(c, id, "ws-rid-1");
  CHECK(body.at("status") == "assigned");
  CHECK(body.at("registrationState").at("deviceId") == id);
  CHECK(c.pubacks() == 1);
  auto rec = s.service("GET", "/registrations/" + id);
  REQUIRE_MESSAGE(rec.status == 200, rec.body);
  CHECK(json::parse(rec.body).at("assignedHub")
        == body.at("registrationState").at("assignedHub"));
  // A wrong key is refused at CONNECT, as on port 8883 (CONNACK 5).
  test::mqtt_client bad(test::mqtt_client::websocket, s.port(), ca(s));
  CHECK(bad.connect(id, username(s, id), s.device_auth(id, crypto::generate_key())) == 5);
}

TEST_CASE("fragmented frames, packets split across frames, ping, and close") {
  auto& s = srv();
  const std::string id = "mqtt-ws-frag-1";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s));
  mqtt::connect_packet cp;
  cp.protocol_level = 4;
  cp.clean_session = true;
  cp.keep_alive_s = 60;
  cp.client_id = id;
  cp.username = username(s, id);
  cp.password = s.device_auth(id, key);
  const auto wire = mqtt::encode_connect(cp);
  // CONNECT as a fragmented message (3 frames) with a ping between them.
  const auto third = wire.size() / 3;
  REQUIRE(c.send_raw(ws::encode_client_frame(ws::opcode::binary, wire.substr(0, third), 1, false)));
  REQUIRE(c.send_raw(ws::encode_client_frame(ws::opcode::ping, "are you there", 2)));
  REQUIRE(c.send_raw(
    ws::encode_client_frame(ws::opcode::continuation, wire.substr(third, third), 3, false)));
  REQUIRE(c.send_raw(
    ws::encode_client_frame(ws::opcode::continuation, wire.substr(2 * third), 4, true)));
  auto connack = c.read();
  REQUIRE(connack);
  CHECK(connack->type == mqtt::packet_type::connack);
  CHECK(connack->body == std::string("\0\0", 2));
  REQUIRE(c.pongs().size() == 1);
  CHECK(c.pongs()[0] == "are you there");
  // SUBSCRIBE and PINGREQ in one frame: two packets, two answers.
  mqtt::subscribe_packet sp;
  sp.packet_id = 3;
  sp.filters = {{"$dps/registrations/res/#", 0}};
  REQUIRE(c.send(mqtt::encode_subscribe(sp) + mqtt::encode_pingreq()));
  auto suback = c.read();
  REQUIRE(suback);
  CHECK(suback->type == mqtt::packet_type::suback);
  auto pingresp = c.read();
  REQUIRE(pingresp);
  CHECK(pingresp->type == mqtt::packet_type::pingresp);
  // The client's close frame is answered with one, then the server closes.
  REQUIRE(c.send_raw(ws::encode_client_frame(ws::opcode::close, std::string("\x03\xE8", 2), 5)));
  CHECK(c.closed_by_server());
  CHECK(c.close_status() == 1000);
}

TEST_CASE("bad upgrades get a clear HTTP error and the server stays healthy") {
  using mc = test::mqtt_client;
  auto& s = srv();
  SUBCASE("wrong path: 404") {
    auto r = upgrade_answer(s, mc::upgrade_request("/mqtt"));
    CHECK(r.rfind("HTTP/1.1 404 ", 0) == 0);
    auto e = error_body_of(r);
    CHECK(e.at("errorCode") == 404000);
    CHECK(e.at("message").get<std::string>().find("/$iothub/websocket") != std::string::npos);
  }
  SUBCASE("missing Sec-WebSocket-Key: 400") {
    auto r = upgrade_answer(s, mc::upgrade_request("/$iothub/websocket", "mqtt", ""));
    CHECK(r.rfind("HTTP/1.1 400 ", 0) == 0);
    auto e = error_body_of(r);
    CHECK(e.at("errorCode") == 400000);
    CHECK(e.at("message").get<std::string>().find("Sec-WebSocket-Key") != std::string::npos);
  }
  SUBCASE("wrong subprotocol: 400 naming mqtt") {
    auto r = upgrade_answer(s, mc::upgrade_request("/$iothub/websocket", "amqpwsb10"));
    CHECK(r.rfind("HTTP/1.1 400 ", 0) == 0);
    auto msg = error_body_of(r).at("message").get<std::string>();
    CHECK(msg.find("'mqtt'") != std::string::npos);
    CHECK(msg.find("amqpwsb10") != std::string::npos);
  }
  SUBCASE("no subprotocol: 400") {
    CHECK(upgrade_answer(s, mc::upgrade_request("/$iothub/websocket", "")).rfind("HTTP/1.1 400 ", 0)
          == 0);
  }
  SUBCASE("WebSocket version 8: 400 with Sec-WebSocket-Version: 13") {
    auto r = upgrade_answer(s, mc::upgrade_request("/$iothub/websocket", "mqtt", mc::ws_key, "8"));
    CHECK(r.rfind("HTTP/1.1 400 ", 0) == 0);
    CHECK(r.find("\r\nSec-WebSocket-Version: 13\r\n") != std::string::npos);
  }
  check_healthy(s);
}

TEST_CASE("bad frames close with a WebSocket close code; nothing is stored") {
  auto& s = srv();
  const std::string id = "mqtt-ws-badframe";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  auto connected = [&] {
    auto c = std::make_unique<test::mqtt_client>(test::mqtt_client::websocket, s.port(), ca(s));
    REQUIRE(c->connect(id, username(s, id), s.device_auth(id, key)) == 0);
    return c;
  };
  const auto publish = mqtt::encode_publish(reg_topic + "x", json{{"registrationId", id}}.dump(),
                                            0, 0);
  SUBCASE("an unmasked client frame: 1002") {
    auto c = connected();
    REQUIRE(c->send_raw(ws::encode_frame(ws::opcode::binary, publish)));
    CHECK(c->closed_by_server());
    CHECK(c->close_status() == 1002);
    CHECK(c->close_reason().find("unmasked") != std::string::npos);
  }
  SUBCASE("a text frame: 1003") {
    auto c = connected();
    REQUIRE(c->send_raw(ws::encode_client_frame(ws::opcode::text, publish, 9)));
    CHECK(c->closed_by_server());
    CHECK(c->close_status() == 1003);
  }
  SUBCASE("a frame over mqtt.max_packet_bytes, from its header alone: 1009") {
    auto c = connected();
    auto big = ws::encode_client_frame(ws::opcode::binary, std::string(200 * 1024, 'x'), 9);
    REQUIRE(c->send_raw(big.substr(0, 14))); // header and mask only
    CHECK(c->closed_by_server());
    CHECK(c->close_status() == 1009);
  }
  SUBCASE("an unknown opcode: 1002") {
    auto c = connected();
    std::string f = ws::encode_client_frame(ws::opcode::binary, publish, 9);
    f[0] = static_cast<char>(0x83);
    REQUIRE(c->send_raw(f));
    CHECK(c->closed_by_server());
    CHECK(c->close_status() == 1002);
  }
  // MQTT-level violations inside valid frames end with a close frame too,
  // not a bare TCP close (which the client sees as 1006).
  SUBCASE("a malformed MQTT packet in a valid frame (a fifth length byte): 1002") {
    auto c = connected();
    REQUIRE(c->send(std::string("\x30\xFF\xFF\xFF\xFF\x01", 6)));
    CHECK(c->closed_by_server());
    CHECK(c->close_status() == 1002);
    CHECK(c->close_reason().find("malformed") != std::string::npos);
  }
  SUBCASE("a PUBLISH that does not parse (QoS 3): 1002") {
    auto c = connected();
    auto bad = publish;
    bad[0] = static_cast<char>(0x36);
    REQUIRE(c->send(bad));
    CHECK(c->closed_by_server());
    CHECK(c->close_status() == 1002);
  }
  SUBCASE("a PUBLISH to a topic DPS does not serve: 1002 saying which topics are") {
    auto c = connected();
    REQUIRE(c->send(mqtt::encode_publish("devices/x/messages/events/", "{}", 0, 0)));
    CHECK(c->closed_by_server());
    CHECK(c->close_status() == 1002);
    // The reason is cut to fit the close frame (123 bytes).
    CHECK_MESSAGE(c->close_reason().find("topic is neither $dps/registrations/PUT/") == 0,
                  c->close_reason());
  }
  SUBCASE("an MQTT packet over mqtt.max_packet_bytes, from its header in a small frame: 1009") {
    auto c = connected();
    // PUBLISH QoS 1, remaining length 200 KiB (0x80 0xC0 0x0C).
    REQUIRE(c->send(std::string("\x32\x80\xC0\x0C", 4)));
    CHECK(c->closed_by_server());
    CHECK(c->close_status() == 1009);
    CHECK(c->close_reason().find("max_packet_bytes") != std::string::npos);
  }
  SUBCASE("more than mqtt.max_inflight (16) requests unanswered, in one frame: 1008") {
    auto c = connected();
    std::string flood;
    for (int i = 0; i < 20; ++i)
      flood += mqtt::encode_publish(poll_topic + std::to_string(i) + "&operationId=5.x.y", " ",
                                    0, 0);
    REQUIRE(c->send(flood)); // one frame, one TLS record: handled in one batch
    CHECK(c->closed_by_server());
    CHECK(c->close_status() == 1008);
    CHECK(c->close_reason().find("max_inflight") != std::string::npos);
  }
  SUBCASE("a packet before CONNECT: 1002") {
    auto c = std::make_unique<test::mqtt_client>(test::mqtt_client::websocket, s.port(), ca(s));
    REQUIRE(c->send(mqtt::encode_pingreq()));
    CHECK(c->closed_by_server());
    CHECK(c->close_status() == 1002);
    CHECK(c->close_reason().find("CONNECT") != std::string::npos);
  }
  // None of the publishes was carried out.
  CHECK(s.service("GET", "/registrations/" + id).status == 404);
  check_healthy(s);
}

TEST_CASE("frames sent in the same TLS write as the upgrade request are served") {
  auto& s = srv();
  const std::string id = "mqtt-ws-early";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  // CONNECT in one frame, SUBSCRIBE and PINGREQ in the next, all behind the
  // request in one write: they reach the server with the request and are
  // handed to the MQTT session as what was read past it.
  mqtt::subscribe_packet sp;
  sp.packet_id = 2;
  sp.filters = {{"$dps/registrations/res/#", 1}};
  const std::string early =
    ws::encode_client_frame(ws::opcode::binary, connect_packet(s, id, key), 0x11111111)
    + ws::encode_client_frame(ws::opcode::binary, mqtt::encode_subscribe(sp) + mqtt::encode_pingreq(),
                              0x22222222);
  test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s), 10, early);
  auto connack = c.read();
  REQUIRE(connack);
  CHECK(connack->type == mqtt::packet_type::connack);
  CHECK(connack->body == std::string("\0\0", 2));
  auto suback = c.read();
  REQUIRE(suback);
  CHECK(suback->type == mqtt::packet_type::suback);
  auto pingresp = c.read();
  REQUIRE(pingresp);
  CHECK(pingresp->type == mqtt::packet_type::pingresp);
  CHECK(register_over(c, id, "early-1").at("status") == "assigned");
}

TEST_CASE("after upgrades: CONNECT deadline, connection slots given back, the per-client cap "
          "still holds; gauges by transport") {
  auto dir = test::make_temp_dir("provisiond-it-ws");
  test::server_process s;
  s.remove_data_dir_at_exit();
  auto cfg = test::with_metrics(test::with_device_api(
    test::default_config(dir),
    "register_wait_ms = 5000\nrequest_timeout_seconds = 3\nmax_connections_per_client = 2"));
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  const auto addr = test::metrics_addr(s);
  const std::string id = "mqtt-ws-slots";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  auto settled = [&](double ws_open) {
    return test::scrape_until(addr, [&](const auto& m) {
      return test::sum(m, "dps_connections_open") == 0
             && test::sum(m, "dps_mqtt_connections_open", {"transport=\"mqtt_ws\""}) == ws_open;
    });
  };
  settled(0);
  {
    // An upgraded connection counts as MQTT over WebSocket, not HTTPS.
    test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s));
    REQUIRE(c.connect(id, username(s, id), s.device_auth(id, key)) == 0);
    auto m = settled(1);
    CHECK(test::sum(m, "dps_connections_open") == 0);
    CHECK(test::sum(m, "dps_mqtt_connections_open", {"transport=\"mqtt_ws\""}) == 1);
    CHECK(test::sum(m, "dps_mqtt_connections_open", {"transport=\"mqtt\""}) == 0);
  }
  SUBCASE("no CONNECT after the upgrade: closed after request_timeout_seconds") {
    test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s), 30);
    CHECK(c.closed_by_server()); // within 3 s; the client would wait 30
    auto m = test::scrape_until(addr, [](const auto& mm) {
      return test::sum(mm, "dps_mqtt_disconnects_total", {"reason=\"connect_timeout\""}) >= 1;
    });
    CHECK(test::sum(m, "dps_mqtt_disconnects_total",
                    {"reason=\"connect_timeout\"", "transport=\"mqtt_ws\""})
          == 1);
  }
  SUBCASE("every way a WebSocket session ends gives its slot back") {
    for (int round = 0; round < 2; ++round) {
      { // DISCONNECT
        test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s));
        REQUIRE(c.connect(id, username(s, id), s.device_auth(id, key)) == 0);
        REQUIRE(c.send(mqtt::encode_disconnect()));
        CHECK(c.closed_by_server());
      }
      { // the client's close frame
        test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s));
        REQUIRE(c.connect(id, username(s, id), s.device_auth(id, key)) == 0);
        REQUIRE(c.send_raw(ws::encode_client_frame(ws::opcode::close, std::string("\x03\xE8", 2), 5)));
        CHECK(c.closed_by_server());
      }
      { // a refused CONNECT (wrong key)
        test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s));
        CHECK(c.connect(id, username(s, id), s.device_auth(id, crypto::generate_key())) == 5);
      }
      { // a framing error
        test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s));
        REQUIRE(c.send_raw(ws::encode_frame(ws::opcode::binary, "x")));
        CHECK(c.closed_by_server());
      }
      { // the client just goes away
        test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s));
        REQUIRE(c.connect(id, username(s, id), s.device_auth(id, key)) == 0);
      }
      auto m = settled(0);
      REQUIRE(test::sum(m, "dps_mqtt_connections_open", {"transport=\"mqtt_ws\""}) == 0);
      REQUIRE(test::sum(m, "dps_connections_open") == 0);
    }
  }
  // The cap (2 per address) holds exactly: two WebSocket sessions, and a
  // third connection is refused; one ends, and one more is admitted.
  auto first = std::make_unique<test::mqtt_client>(test::mqtt_client::websocket, s.port(), ca(s));
  REQUIRE(first->connect(id, username(s, id), s.device_auth(id, key)) == 0);
  test::mqtt_client second(test::mqtt_client::websocket, s.port(), ca(s));
  REQUIRE(second.connect(id, username(s, id), s.device_auth(id, key)) == 0);
  settled(2);
  CHECK(!tls_admitted(s.port()));
  first.reset();
  settled(1);
  CHECK(tls_admitted(s.port()));
  CHECK(s.stop() == 0);
}

TEST_CASE("stopping: an answer in flight is written; a PUBLISH once the listeners stopped "
          "gets a 1001 close, not a PUBACK") {
  auto dir = test::make_temp_dir("provisiond-it-ws");
  test::server_process s;
  s.remove_data_dir_at_exit();
  // Registers take 1.5 s (allocation delayed); the stop holds 4 s once the
  // listeners take nothing new, with the WebSocket session still open.
  s.set_pipeline_delay_ms(1500);
  s.set_stop_pause_ms(4000);
  auto cfg = test::with_device_api(test::default_config(dir), "register_wait_ms = 10000")
             + "[mqtt]\nlisten = \"\"\n";
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  const std::string id = "mqtt-ws-stop";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s), 30);
  REQUIRE(c.connect(id, username(s, id), s.device_auth(id, key)) == 0);
  REQUIRE(c.subscribe("$dps/registrations/res/#", 1) == 1);
  REQUIRE(c.send(mqtt::encode_publish(reg_topic + "before", json{{"registrationId", id}}.dump(),
                                      1, 7)));
  // Taken (the PUBACK comes once it is handed to the engine), then the stop.
  auto ack = c.read();
  REQUIRE(ack);
  REQUIRE(ack->type == mqtt::packet_type::puback);
  REQUIRE(::kill(s.pid(), SIGTERM) == 0);
  // Taken before the stop: answered. Its outcome (200/202) when the engine
  // had it before the drain began, else 503 (intake stopped): either way an
  // answer, not silence.
  auto m = c.next_message();
  REQUIRE(m);
  CHECK_MESSAGE((m->topic.rfind("$dps/registrations/res/20", 0) == 0
                 || m->topic.rfind("$dps/registrations/res/503/", 0) == 0),
                m->topic);
  CHECK(m->topic.find("?$rid=before") != std::string::npos);
  CHECK(c.pubacks() == 0); // the only one was read above
  // The HTTPS port refuses connections: the listeners take nothing new.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!refuses(s.port()) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  REQUIRE(refuses(s.port()));
  // Not taken: no PUBACK, no answer, a close frame saying why.
  REQUIRE(c.send(mqtt::encode_publish(reg_topic + "after", json{{"registrationId", id}}.dump(),
                                      1, 8)));
  auto next = c.read();
  CHECK(!next);
  CHECK(!c.timed_out());
  CHECK(c.close_status() == 1001);
  CHECK(c.close_reason() == "server stopping");
  CHECK(c.pubacks() == 0);
  CHECK_MESSAGE(s.wait_exit() == 0, s.log());
}

TEST_CASE("stopping: idle WebSocket sessions, connected or not, get a close frame 1001") {
  auto dir = test::make_temp_dir("provisiond-it-ws");
  test::server_process s;
  s.remove_data_dir_at_exit();
  // With the MQTT listener too: its threads stop first, the WebSocket
  // sessions (on the HTTPS threads) are told all the same.
  REQUIRE_MESSAGE(!s.start(test::default_config(dir), dir), s.log());
  const std::string id = "mqtt-ws-idle-stop";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  test::mqtt_client connected(test::mqtt_client::websocket, s.port(), ca(s), 30);
  REQUIRE(connected.connect(id, username(s, id), s.device_auth(id, key)) == 0);
  test::mqtt_client upgraded_only(test::mqtt_client::websocket, s.port(), ca(s), 30);
  REQUIRE(::kill(s.pid(), SIGTERM) == 0);
  for (auto* c : {&connected, &upgraded_only}) {
    CHECK(!c->read());
    CHECK(!c->timed_out());
    CHECK(c->close_status() == 1001);
    CHECK(c->close_reason() == "server stopping");
  }
  CHECK_MESSAGE(s.wait_exit() == 0, s.log());
}

TEST_CASE("before CONNECT, a client that floods pings and does not read is closed once 8 KiB of "
          "pongs are queued") {
  // The kernel's socket buffers take the first pongs (the server's send
  // buffer is at most tcp_wmem's maximum); after them, 8 KiB may queue in
  // the server before it closes the connection (not_reading). With
  // max_packet_bytes at its largest, the cap of an open session would be
  // 8 MiB + 64 KiB: a flood of wmem_max + 2 MiB of pongs is over the first
  // cap and under the second.
  const long wmem_max = tcp_wmem_max();
  const long flood = wmem_max + 2 * 1024 * 1024;
  if (wmem_max <= 0 || flood > 7 * 1024 * 1024) {
    MESSAGE("SKIPPED: net.ipv4.tcp_wmem max is " << wmem_max << ": no flood size tells the caps apart");
    return;
  }
  auto dir = test::make_temp_dir("provisiond-it-ws");
  test::server_process s;
  s.remove_data_dir_at_exit();
  auto cfg = test::with_metrics(test::default_config(dir))
             + "[mqtt]\nlisten = \"\"\nmax_packet_bytes = 2097152\n";
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  int small = 4096; // before connect: the window the server sees stays small
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(s.port());
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  timeval tv{20, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL* ssl = SSL_new(ctx);
  SSL_set_fd(ssl, fd);
  REQUIRE(SSL_connect(ssl) == 1);
  const auto req = test::mqtt_client::upgrade_request();
  REQUIRE(SSL_write(ssl, req.data(), static_cast<int>(req.size())) == static_cast<int>(req.size()));
  std::string head;
  char buf[4096];
  while (head.find("\r\n\r\n") == std::string::npos) {
    int n = SSL_read(ssl, buf, sizeof buf);
    REQUIRE(n > 0);
    head.append(buf, static_cast<std::size_t>(n));
  }
  REQUIRE(head.rfind("HTTP/1.1 101 ", 0) == 0);
  // Pings of 125 bytes (pongs of 127), 64 per write, never reading.
  const std::string batch = ping_batch();
  long pongs = 0;
  bool write_failed = false;
  while (pongs * 127 < flood) {
    if (SSL_write(ssl, batch.data(), static_cast<int>(batch.size())) != static_cast<int>(batch.size())) {
      write_failed = true; // closed by the server
      break;
    }
    pongs += 64;
  }
  MESSAGE("pings written: " << pongs << std::string(write_failed ? ", then the server closed" : ""));
  auto m = test::scrape_until(test::metrics_addr(s), [](const auto& mm) {
    return test::sum(mm, "dps_mqtt_disconnects_total", {"reason=\"not_reading\""}) >= 1;
  });
  CHECK(test::sum(m, "dps_mqtt_disconnects_total",
                  {"reason=\"not_reading\"", "transport=\"mqtt_ws\""})
        == 1);
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  ::close(fd);
  CHECK(s.stop() == 0);
}

TEST_CASE("nothing follows our close frame: an answer that comes while the close frame waits "
          "to be written is dropped") {
  // The client stops reading and floods pings until the server's writes
  // block (the kernel buffers are full), with a register in flight whose
  // allocation takes 5 s, then sends its close frame: the server's close
  // frame queues behind the pongs, and the register's answer comes after
  // it. A large max_packet_bytes keeps the queue under the not_reading cap.
  const long wmem_max = tcp_wmem_max();
  const long flood = wmem_max + 1024 * 1024;
  if (wmem_max <= 0 || flood > 7 * 1024 * 1024) {
    MESSAGE("SKIPPED: net.ipv4.tcp_wmem max is " << wmem_max);
    return;
  }
  auto dir = test::make_temp_dir("provisiond-it-ws");
  test::server_process s;
  s.remove_data_dir_at_exit();
  s.set_pipeline_delay_ms(5000);
  auto cfg = test::with_device_api(test::default_config(dir), "register_wait_ms = 10000")
             + "[mqtt]\nlisten = \"\"\nmax_packet_bytes = 2097152\n";
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  const std::string id = "mqtt-ws-close-late";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s), 30, {}, 4096);
  REQUIRE(c.connect(id, username(s, id), s.device_auth(id, key)) == 0);
  REQUIRE(c.subscribe("$dps/registrations/res/#", 0) == 0);
  const auto sent = std::chrono::steady_clock::now();
  REQUIRE(c.send(mqtt::encode_publish(reg_topic + "late", json{{"registrationId", id}}.dump(),
                                      0, 0)));
  const std::string batch = ping_batch();
  for (long pongs = 0; pongs * 127 < flood; pongs += 64)
    REQUIRE(c.send_raw(batch));
  REQUIRE(c.send_raw(ws::encode_client_frame(ws::opcode::close, std::string("\x03\xE8", 2), 5)));
  const auto queued = std::chrono::steady_clock::now() - sent;
  // The answer comes at 5 s; read only after it.
  std::this_thread::sleep_for(std::chrono::seconds(7) - queued);
  while (c.read()) {
  }
  CHECK(!c.timed_out());
  CHECK(c.close_status() == 1000);
  CHECK(c.data_after_close() == 0);
  if (queued > std::chrono::seconds(4))
    MESSAGE("the flood took " << std::chrono::duration_cast<std::chrono::milliseconds>(queued).count()
                              << " ms: the answer may have come before the close frame");
  CHECK(s.stop() == 0);
}

TEST_CASE("a large frame's buffer is given back once the frame is read: idle sessions do not "
          "each keep one") {
  // 24 sessions each send one ~2 MiB frame (a poll whose payload is ignored)
  // and stay open. Each frame passes through the session's frame buffer;
  // kept, 24 of them would hold over 48 MiB of the server's memory (measured
  // 37-38 MiB for 16). Given back, the next session's buffer reuses the
  // memory: the resident size grows by a few buffers (measured 10 MiB for
  // 16), under 1 MiB per session.
  auto dir = test::make_temp_dir("provisiond-it-ws");
  test::server_process s;
  s.remove_data_dir_at_exit();
  auto cfg = test::default_config(dir) + "[mqtt]\nlisten = \"\"\nmax_packet_bytes = 2097152\n";
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  const std::string id = "mqtt-ws-bigframe";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  auto rss_kb = [&] {
    std::ifstream in("/proc/" + std::to_string(s.pid()) + "/status");
    std::string line;
    while (std::getline(in, line))
      if (line.rfind("VmRSS:", 0) == 0)
        return std::stol(line.substr(6));
    return 0L;
  };
  const std::string big = mqtt::encode_publish(poll_topic + "big&operationId=nope",
                                               std::string(2000 * 1024, 'x'), 0, 0);
  auto session = [&] {
    auto c = std::make_unique<test::mqtt_client>(test::mqtt_client::websocket, s.port(), ca(s));
    REQUIRE(c->connect(id, username(s, id), s.device_auth(id, key)) == 0);
    REQUIRE(c->subscribe("$dps/registrations/res/#", 0) == 0);
    REQUIRE(c->send(big)); // one frame
    auto m = c->next_message(); // answered: the frame was read whole
    REQUIRE(m);
    CHECK(m->topic.find("?$rid=big") != std::string::npos);
    return c;
  };
  // Warm-up: the allocator's state after one such frame.
  auto warm = session();
  const long before = rss_kb();
  std::vector<std::unique_ptr<test::mqtt_client>> open;
  for (int i = 0; i < 24; ++i)
    open.push_back(session());
  const long grown_mb = (rss_kb() - before) / 1024;
  MESSAGE("server resident size grew by " << grown_mb << " MiB over 24 sessions");
  CHECK(grown_mb < 24);
  CHECK(s.stop() == 0);
}

TEST_CASE("metrics carry transport=\"mqtt_ws\"") {
  auto dir = test::make_temp_dir("provisiond-it-ws");
  test::server_process s;
  s.remove_data_dir_at_exit();
  // No MQTT listener: WebSocket alone still serves.
  auto cfg = test::with_metrics(test::with_device_api(test::default_config(dir),
                                                      "register_wait_ms = 5000"))
             + "[mqtt]\nlisten = \"\"\n";
  REQUIRE_MESSAGE(!s.start(cfg, dir), s.log());
  CHECK(s.mqtt_port() == 0);
  const std::string id = "mqtt-ws-metrics";
  const auto key = crypto::generate_key();
  put_individual(s, id, key);
  {
    test::mqtt_client c(test::mqtt_client::websocket, s.port(), ca(s));
    REQUIRE(c.connect(id, username(s, id), s.device_auth(id, key)) == 0);
    REQUIRE(c.subscribe("$dps/registrations/res/#", 0) == 0);
    CHECK(register_over(c, id, "m1").at("status") == "assigned");
    REQUIRE(c.send_raw(ws::encode_frame(ws::opcode::binary, "x"))); // unmasked
    CHECK(c.closed_by_server());
  }
  auto m = test::scrape_until(test::metrics_addr(s), [](const auto& mm) {
    return test::sum(mm, "dps_mqtt_disconnects_total", {"reason=\"malformed\""}) >= 1;
  });
  CHECK(test::sum(m, "dps_mqtt_connects_total", {"code=\"0\"", "transport=\"mqtt_ws\""}) == 1);
  CHECK(test::sum(m, "dps_mqtt_requests_total",
                  {"operation=\"register\"", "status=\"200\"", "transport=\"mqtt_ws\""})
        == 1);
  CHECK(test::sum(m, "dps_mqtt_disconnects_total",
                  {"reason=\"malformed\"", "transport=\"mqtt_ws\""})
        == 1);
  CHECK(test::sum(m, "dps_mqtt_connects_total", {"transport=\"mqtt\""}) == 0);
  // The upgrade request is an HTTP request of its own.
  CHECK(test::sum(m, "dps_http_requests_total",
                  {"route=\"GET /$iothub/websocket\"", "status=\"101\""})
        == 1);
  // The pipeline counts these registrations as mqtt_ws too.
  CHECK(test::sum(m, "dps_registration_attempts_total",
                  {"protocol=\"mqtt_ws\"", "status=\"assigned\""})
        == 1);
  CHECK(test::sum(m, "dps_registration_attempts_total", {"protocol=\"mqtt\""}) == 0);
  CHECK(s.stop() == 0);
}

} // TEST_SUITE
