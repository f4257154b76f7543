#include <doctest/doctest.h>

#include <random>
#include <string>
#include <vector>

#include "net/mqtt_codec.hpp"
#include "net/mqtt_dps.hpp"

using namespace prov::mqtt;

namespace {

std::string bytes(std::initializer_list<int> b) {
  std::string s;
  for (int c : b)
    s.push_back(static_cast<char>(c));
  return s;
}

frame_status frame_of(const std::string& in, frame& f, std::size_t max = 1 << 20) {
  std::size_t consumed = 0;
  return read_frame(in, max, f, consumed);
}

connect_packet dps_connect() {
  connect_packet c;
  c.protocol_level = 4;
  c.clean_session = true;
  c.keep_alive_s = 180;
  c.client_id = "dev-1";
  c.username = "0ne00000001/registrations/dev-1/api-version=2019-03-31&ClientVersion=a%2Fb";
  c.password = "SharedAccessSignature sr=x&sig=y&se=1&skn=registration";
  return c;
}

} // namespace

TEST_SUITE("mqtt_codec") {

TEST_CASE("a CONNECT round-trips through the encoder and the parser") {
  auto wire = encode_connect(dps_connect());
  frame f;
  std::size_t consumed = 0;
  REQUIRE(read_frame(wire, 1 << 20, f, consumed) == frame_status::ok);
  CHECK(consumed == wire.size());
  CHECK(f.type == packet_type::connect);
  connect_packet c;
  auto r = parse_connect(f, c);
  CHECK_FALSE(r.malformed);
  CHECK(r.refuse == connack_code::accepted);
  CHECK(c.client_id == "dev-1");
  CHECK(c.keep_alive_s == 180);
  CHECK(c.clean_session);
  REQUIRE(c.password);
  CHECK(*c.password == dps_connect().password.value());
}

TEST_CASE("every prefix of a packet needs more; two packets split one by one") {
  auto wire = encode_connect(dps_connect()) + encode_pingreq();
  frame f;
  std::size_t consumed = 0;
  auto first = encode_connect(dps_connect()).size();
  for (std::size_t n = 0; n < first; ++n)
    CHECK(read_frame(std::string_view(wire).substr(0, n), 1 << 20, f, consumed)
          == frame_status::need_more);
  REQUIRE(read_frame(wire, 1 << 20, f, consumed) == frame_status::ok);
  CHECK(consumed == first);
  REQUIRE(read_frame(std::string_view(wire).substr(consumed), 1 << 20, f, consumed)
          == frame_status::ok);
  CHECK(f.type == packet_type::pingreq);
}

TEST_CASE("malformed fixed headers") {
  frame f;
  CHECK(frame_of(bytes({0x00, 0x00}), f) == frame_status::malformed); // reserved type 0
  CHECK(frame_of(bytes({0xf0, 0x00}), f) == frame_status::malformed); // reserved type 15
  CHECK(frame_of(bytes({0x11, 0x00}), f) == frame_status::malformed); // CONNECT flags
  CHECK(frame_of(bytes({0x80, 0x00}), f) == frame_status::malformed); // SUBSCRIBE flags != 2
  CHECK(frame_of(bytes({0xc1, 0x00}), f) == frame_status::malformed); // PINGREQ flags
  CHECK(frame_of(bytes({0xc0, 0x01, 0x00}), f) == frame_status::malformed); // PINGREQ body
  CHECK(frame_of(bytes({0xe0, 0x01, 0x00}), f) == frame_status::malformed); // DISCONNECT body
  CHECK(frame_of(bytes({0x40, 0x03, 0, 1, 0}), f) == frame_status::malformed); // PUBACK len 3
  // Remaining length: a fifth byte, and a non-minimal encoding.
  CHECK(frame_of(bytes({0x30, 0xff, 0xff, 0xff, 0xff, 0x01}), f) == frame_status::malformed);
  CHECK(frame_of(bytes({0x30, 0x80, 0x00}), f) == frame_status::malformed);
  // Exactly five bytes, the fourth length byte continued: malformed already,
  // not waiting for a fifth length byte that can never be valid.
  CHECK(frame_of(bytes({0x30, 0xff, 0xff, 0xff, 0xff}), f) == frame_status::malformed);
  // Four bytes are allowed (268,435,455 at most): too large for us, known early.
  CHECK(frame_of(bytes({0x30, 0xff, 0xff, 0xff, 0x7f}), f) == frame_status::too_large);
}

TEST_CASE("the size cap counts the whole packet and is known before the body") {
  auto p = encode_publish("t", std::string(200, 'x'), 0, 0);
  frame f;
  CHECK(frame_of(p, f, p.size()) == frame_status::ok);
  CHECK(frame_of(p, f, p.size() - 1) == frame_status::too_large);
  CHECK(frame_of(p.substr(0, 3), f, p.size() - 1) == frame_status::too_large);
}

TEST_CASE("CONNECT refusals and malformed CONNECTs") {
  auto parse = [](const connect_packet& c, connect_packet& out) {
    auto wire = encode_connect(c);
    frame f;
    REQUIRE(frame_of(wire, f) == frame_status::ok);
    return parse_connect(f, out);
  };
  connect_packet out;
  auto c = dps_connect();
  c.protocol_level = 5; // MQTT 5
  auto r = parse(c, out);
  CHECK_FALSE(r.malformed);
  CHECK(r.refuse == connack_code::unacceptable_protocol);

  // Password flag without user name flag.
  std::string wire = encode_connect(dps_connect());
  frame f;
  REQUIRE(frame_of(wire, f) == frame_status::ok);
  std::string body(f.body);
  body[7] = static_cast<char>(static_cast<uint8_t>(body[7]) & ~0x80); // clear user name flag
  frame g{packet_type::connect, 0, body};
  CHECK(parse_connect(g, out).malformed);
  body = std::string(f.body);
  body[7] = static_cast<char>(static_cast<uint8_t>(body[7]) | 0x01); // reserved flag
  g.body = body;
  CHECK(parse_connect(g, out).malformed);
  body = std::string(f.body) + "x"; // trailing byte
  g.body = body;
  CHECK(parse_connect(g, out).malformed);
  body = std::string(f.body).substr(0, 12); // truncated in the client id
  g.body = body;
  CHECK(parse_connect(g, out).malformed);
  std::string other = bytes({0, 4}) + "MQTX" + bytes({4, 2, 0, 60, 0, 0});
  g.body = other;
  CHECK(parse_connect(g, out).malformed);
}

TEST_CASE("PUBLISH: QoS 1 with a packet id, QoS 2 and 3 refused, wildcards refused") {
  auto wire = encode_publish("$dps/registrations/PUT/iotdps-register/?$rid=1", "{}", 1, 7);
  frame f;
  REQUIRE(frame_of(wire, f) == frame_status::ok);
  publish_packet p;
  CHECK(parse_publish(f, p).empty());
  CHECK(p.qos == 1);
  CHECK(p.packet_id == 7);
  CHECK(p.payload == "{}");
  frame q = f;
  q.flags = 0x04; // QoS 2
  CHECK_FALSE(parse_publish(q, p).empty());
  q.flags = 0x06; // QoS 3
  CHECK_FALSE(parse_publish(q, p).empty());
  auto zero = encode_publish("a/b", "", 1, 0);
  REQUIRE(frame_of(zero, f) == frame_status::ok);
  CHECK_FALSE(parse_publish(f, p).empty()); // packet id 0
  auto wild = encode_publish("a/#", "", 0, 0);
  REQUIRE(frame_of(wild, f) == frame_status::ok);
  CHECK_FALSE(parse_publish(f, p).empty());
  auto bad_utf8 = encode_publish(bytes({'a', 0xc0, 0xaf}), "", 0, 0);
  REQUIRE(frame_of(bad_utf8, f) == frame_status::ok);
  CHECK_FALSE(parse_publish(f, p).empty());
  // A topic length past the end of the packet.
  std::string cut = bytes({0x30, 0x03, 0x00, 0x09, 'a'});
  REQUIRE(frame_of(cut, f) == frame_status::ok);
  CHECK_FALSE(parse_publish(f, p).empty());
}

TEST_CASE("SUBSCRIBE and UNSUBSCRIBE") {
  subscribe_packet s;
  s.packet_id = 3;
  s.filters = {{std::string(response_filter), 2}};
  auto wire = encode_subscribe(s);
  frame f;
  REQUIRE(frame_of(wire, f) == frame_status::ok);
  subscribe_packet out;
  REQUIRE(parse_subscribe(f, out).empty());
  REQUIRE(out.filters.size() == 1);
  CHECK(out.filters[0].second == 2);
  std::string body(f.body);
  body.back() = 3; // requested QoS 3
  frame g{packet_type::subscribe, 2, body};
  CHECK_FALSE(parse_subscribe(g, out).empty());
  g.body = std::string_view(f.body).substr(0, 2); // no filter
  CHECK_FALSE(parse_subscribe(g, out).empty());
  std::string zero = bytes({0, 0}) + std::string(f.body).substr(2);
  g.body = zero;
  CHECK_FALSE(parse_subscribe(g, out).empty());
  std::string unsub = bytes({0, 5, 0, 1, 'x'});
  g = {packet_type::unsubscribe, 2, unsub};
  REQUIRE(parse_unsubscribe(g, out).empty());
  CHECK(out.packet_id == 5);
}

TEST_CASE("UTF-8 rules of MQTT strings") {
  CHECK(valid_utf8("plain"));
  CHECK(valid_utf8("\xc3\xa9t\xc3\xa9"));
  CHECK(valid_utf8("\xf0\x9f\x98\x80"));
  CHECK_FALSE(valid_utf8(std::string("a\0b", 3)));
  CHECK_FALSE(valid_utf8("\xed\xa0\x80"));     // a surrogate
  CHECK_FALSE(valid_utf8("\xc0\xaf"));         // overlong
  CHECK_FALSE(valid_utf8("\xe2\x82"));         // truncated
  CHECK_FALSE(valid_utf8("\xff"));
}

TEST_CASE("encoders write the lengths 3.1.1 expects") {
  CHECK(encode_connack(false, connack_code::not_authorized) == bytes({0x20, 2, 0, 5}));
  CHECK(encode_suback(9, {1, 0x80}) == bytes({0x90, 4, 0, 9, 1, 0x80}));
  CHECK(encode_puback(258) == bytes({0x40, 2, 1, 2}));
  CHECK(encode_pingresp() == bytes({0xd0, 0}));
  auto big = encode_publish("t", std::string(300, 'x'), 1, 1);
  CHECK(static_cast<uint8_t>(big[0]) == 0x32);
  // 2 + 1 + 2 + 300 = 305 = 0xb1 0x02
  CHECK(static_cast<uint8_t>(big[1]) == 0xb1);
  CHECK(static_cast<uint8_t>(big[2]) == 0x02);
}

TEST_CASE("DPS user name") {
  dps_username u;
  CHECK(parse_username("0ne00000001/registrations/dev-1/api-version=2019-03-31"
                       "&ClientVersion=azure-iot-provisioning-device%2F1.9.1",
                       u)
          .empty());
  CHECK(u.id_scope == "0ne00000001");
  CHECK(u.registration_id == "dev-1");
  CHECK(u.api_version == "2019-03-31");
  CHECK(u.client_version == "azure-iot-provisioning-device/1.9.1");
  dps_username v;
  CHECK_FALSE(parse_username("0ne00000001/registrations/dev-1", v).empty());
  CHECK_FALSE(parse_username("0ne00000001/registrations/dev-1/api-version=", v).empty());
  CHECK_FALSE(parse_username("0ne00000001/devices/dev-1/api-version=1", v).empty());
  CHECK_FALSE(parse_username("/registrations/dev-1/api-version=1", v).empty());
  CHECK_FALSE(parse_username("0ne00000001/registrations//api-version=1", v).empty());
  CHECK_FALSE(parse_username("s/registrations/d/api-version=%zz", v).empty());
}

TEST_CASE("DPS request topics") {
  dps_request r;
  CHECK(parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid=ab-1", r).empty());
  CHECK(r.what == dps_request::kind::register_device);
  CHECK(r.rid == "ab-1");
  dps_request p;
  CHECK(parse_request_topic(
          "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=7&operationId=5.a.b", p)
          .empty());
  CHECK(p.what == dps_request::kind::poll);
  CHECK(p.rid == "7");
  REQUIRE(p.operation_id);
  CHECK(*p.operation_id == "5.a.b");
  dps_request e;
  CHECK(parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid=", e).empty());
  CHECK(e.rid.empty());
  dps_request x;
  CHECK_FALSE(parse_request_topic("$dps/registrations/PUT/iotdps-register/?a=1&$rid=1", x)
                .empty()); // $rid not first
  CHECK_FALSE(parse_request_topic("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1",
                                  x)
                .empty()); // no operation id
  CHECK_FALSE(parse_request_topic("$dps/registrations/DELETE/x/?$rid=1", x).empty());
  CHECK_FALSE(parse_request_topic("devices/dev-1/messages/events/", x).empty());
  // $rid is capped: echoed in the response topic, which must stay a valid
  // MQTT string.
  dps_request r128, r129;
  CHECK(parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid="
                              + std::string(max_rid_bytes, 'r'),
                            r128)
          .empty());
  CHECK(r128.rid.size() == max_rid_bytes);
  CHECK_FALSE(parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid="
                                    + std::string(max_rid_bytes + 1, 'r'),
                                  r129)
                .empty());
  CHECK_FALSE(parse_request_topic("$dps/registrations/GET/iotdps-get-operationstatus/?$rid="
                                    + std::string(70000, 'r') + "&operationId=5.a.b",
                                  r129)
                .empty());
}

TEST_CASE("encode_publish refuses a topic longer than an MQTT string, never truncates") {
  CHECK(encode_publish(std::string(0x10000, 't'), "{}", 0, 0).empty());
  CHECK(encode_publish(std::string(0x10000 + 5, 't'), "", 1, 1).empty());
  auto max = encode_publish(std::string(0xffff, 't'), "{}", 0, 0);
  REQUIRE_FALSE(max.empty());
  frame f;
  REQUIRE(frame_of(max, f, max.size()) == frame_status::ok);
  publish_packet p;
  REQUIRE(parse_publish(f, p).empty());
  CHECK(p.topic.size() == 0xffff);
  CHECK(p.payload == "{}");
}

TEST_CASE("DPS response topic: $rid first, echoed, retry-after only when set") {
  CHECK(response_topic(202, "u-1", 3) == "$dps/registrations/res/202/?$rid=u-1&retry-after=3");
  CHECK(response_topic(200, "", 0) == "$dps/registrations/res/200/?$rid=");
  CHECK(response_topic(401, "1", 0) == "$dps/registrations/res/401/?$rid=1");
}

TEST_CASE("mutated packets never read past the input, and parse or are refused") {
  // A fixed-seed mutation run over valid packets of every kind the server
  // reads: each result must be one of the documented outcomes, and every
  // view must stay inside the input (ASan builds check the reads).
  subscribe_packet sub;
  sub.packet_id = 1;
  sub.filters = {{std::string(response_filter), 1}};
  const std::vector<std::string> seeds = {
    encode_connect(dps_connect()),
    encode_subscribe(sub),
    encode_publish("$dps/registrations/PUT/iotdps-register/?$rid=1", "{\"registrationId\":\"d\"}", 1, 5),
    encode_publish("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=5.a.b", " ", 0, 0),
    encode_puback(3), encode_pingreq(), encode_disconnect(), bytes({0xa2, 5, 0, 1, 0, 1, 'x'}),
  };
  std::mt19937 rng(20261207);
  int ok = 0, refused = 0;
  for (int round = 0; round < 20000; ++round) {
    std::string p = seeds[rng() % seeds.size()];
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      switch (rng() % 4) {
      case 0: p[rng() % p.size()] = static_cast<char>(rng()); break;           // flip a byte
      case 1: p.resize(rng() % (p.size() + 1)); break;                           // truncate
      case 2: p.insert(rng() % (p.size() + 1), 1, static_cast<char>(rng())); break; // insert
      default: p += static_cast<char>(rng()); break;                            // append
      }
      if (p.empty())
        p = seeds[0];
    }
    frame f;
    std::size_t consumed = 0;
    auto st = read_frame(p, 4096, f, consumed);
    if (st != frame_status::ok) {
      ++refused;
      continue;
    }
    REQUIRE(consumed <= p.size());
    REQUIRE(f.body.data() >= p.data());
    REQUIRE(f.body.data() + f.body.size() <= p.data() + p.size());
    std::string why;
    switch (f.type) {
    case packet_type::connect: {
      connect_packet c;
      auto r = parse_connect(f, c);
      if (r.malformed || r.refuse != connack_code::accepted)
        why = "refused";
      break;
    }
    case packet_type::publish: {
      publish_packet pub;
      why = parse_publish(f, pub);
      if (why.empty()) {
        REQUIRE(pub.payload.data() >= f.body.data());
        REQUIRE(pub.payload.data() + pub.payload.size() <= f.body.data() + f.body.size());
        dps_request req;
        (void)parse_request_topic(pub.topic, req);
      }
      break;
    }
    case packet_type::subscribe: {
      subscribe_packet sp;
      why = parse_subscribe(f, sp);
      break;
    }
    case packet_type::unsubscribe: {
      subscribe_packet sp;
      why = parse_unsubscribe(f, sp);
      break;
    }
    case packet_type::puback: {
      uint16_t id = 0;
      why = parse_puback(f, id);
      break;
    }
    default: break;
    }
    (why.empty() ? ok : refused) += 1;
  }
  // Both outcomes occur (the run is not vacuous either way).
  CHECK(ok > 1000);
  CHECK(refused > 1000);
}

} // TEST_SUITE
