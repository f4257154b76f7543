#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "net/websocket.hpp"

using namespace prov::ws;

namespace {

using headers_t = std::vector<std::pair<std::string, std::string>>;

headers_t good_headers() {
  return {{"host", "dps.example.net"},
          {"upgrade", "websocket"},
          {"connection", "Upgrade"},
          {"sec-websocket-version", "13"},
          {"sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="},
          {"sec-websocket-protocol", "mqtt"},
          {"sec-websocket-extensions", "permessage-deflate; client_max_window_bits"}};
}

headers_t without(headers_t h, const std::string& name) {
  headers_t out;
  for (auto& kv : h)
    if (kv.first != name)
      out.push_back(kv);
  return out;
}

headers_t with(headers_t h, const std::string& name, const std::string& value) {
  h = without(std::move(h), name);
  h.emplace_back(name, value);
  return h;
}

struct read_result {
  read_status st;
  frame f;
  std::size_t consumed = 0;
  close_code code = close_code::normal;
  std::string why;
};

read_result read(const std::string& in, reader_state& st, std::size_t max = 1024) {
  read_result r;
  limits lim;
  lim.max_payload = max;
  r.st = read_frame(in, lim, st, r.f, r.consumed, r.code, r.why);
  return r;
}

read_result read(const std::string& in, std::size_t max = 1024) {
  reader_state st;
  return read(in, st, max);
}

std::string raw(std::initializer_list<int> b) {
  std::string s;
  for (int c : b)
    s.push_back(static_cast<char>(c));
  return s;
}

} // namespace

TEST_SUITE("websocket") {

TEST_CASE("the accept key of RFC 6455's example") {
  CHECK(accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

TEST_CASE("an SDK's upgrade request is accepted with subprotocol mqtt, no extension") {
  auto v = check_upgrade("GET", 11, "/$iothub/websocket", good_headers());
  REQUIRE(v.status == 101);
  CHECK(v.accept_key == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
  CHECK(v.subprotocol == "mqtt");
  auto resp = switching_protocols_response(v);
  CHECK(resp.rfind("HTTP/1.1 101 Switching Protocols\r\n", 0) == 0);
  CHECK(resp.find("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n") != std::string::npos);
  CHECK(resp.find("Sec-WebSocket-Protocol: mqtt\r\n") != std::string::npos);
  CHECK(resp.find("Extensions") == std::string::npos);
  // Lists and case: "keep-alive, Upgrade", "WebSocket", "mqttv3.1, mqtt".
  auto h = with(with(with(good_headers(), "connection", "keep-alive, Upgrade"), "upgrade",
                     "WebSocket"),
                "sec-websocket-protocol", "mqttv3.1, mqtt");
  CHECK(is_upgrade(11, "/$iothub/websocket", h));
  CHECK(check_upgrade("GET", 11, "/$iothub/websocket", h).status == 101);
}

TEST_CASE("bad upgrades are refused with a status and a reason") {
  CHECK(check_upgrade("GET", 11, "/other", good_headers()).status == 404);
  CHECK(check_upgrade("POST", 11, "/$iothub/websocket", good_headers()).status == 405);
  CHECK(check_upgrade("GET", 10, "/$iothub/websocket", good_headers()).status == 400);
  auto no_conn = check_upgrade("GET", 11, "/$iothub/websocket",
                               with(good_headers(), "connection", "keep-alive"));
  CHECK(no_conn.status == 400);
  CHECK(no_conn.why.find("Connection") != std::string::npos);
  auto no_key =
    check_upgrade("GET", 11, "/$iothub/websocket", without(good_headers(), "sec-websocket-key"));
  CHECK(no_key.status == 400);
  CHECK(no_key.why.find("Sec-WebSocket-Key") != std::string::npos);
  auto short_key = check_upgrade("GET", 11, "/$iothub/websocket",
                                 with(good_headers(), "sec-websocket-key", "c2hvcnQ="));
  CHECK(short_key.status == 400);
  auto two_keys = good_headers();
  two_keys.emplace_back("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
  CHECK(check_upgrade("GET", 11, "/$iothub/websocket", two_keys).status == 400);
  auto v8 = check_upgrade("GET", 11, "/$iothub/websocket",
                          with(good_headers(), "sec-websocket-version", "8"));
  CHECK(v8.status == 400);
  CHECK(v8.wrong_version);
  auto proto = check_upgrade("GET", 11, "/$iothub/websocket",
                             with(good_headers(), "sec-websocket-protocol", "amqp"));
  CHECK(proto.status == 400);
  CHECK(proto.why.find("'mqtt'") != std::string::npos);
  CHECK(proto.why.find("amqp") != std::string::npos);
  // Subprotocol tokens are case-sensitive (RFC 6455 §4.1): "MQTT" is not "mqtt".
  CHECK(check_upgrade("GET", 11, "/$iothub/websocket",
                      with(good_headers(), "sec-websocket-protocol", "MQTT"))
          .status
        == 400);
  CHECK(check_upgrade("GET", 11, "/$iothub/websocket",
                      without(good_headers(), "sec-websocket-protocol"))
          .status
        == 400);
  CHECK_FALSE(is_upgrade(11, "/$iothub/websocket", without(good_headers(), "upgrade")));
}

TEST_CASE("only an HTTP/1.1 upgrade with Connection: upgrade or at the MQTT path is one") {
  // A stray Upgrade header on an ordinary request goes to the routes.
  auto stray = without(good_headers(), "connection");
  CHECK_FALSE(is_upgrade(11, "/scope/registrations/d/register", stray));
  CHECK_FALSE(is_upgrade(10, "/$iothub/websocket", good_headers()));
  // At the MQTT path it is one (check_upgrade() then says Connection is missing).
  CHECK(is_upgrade(11, "/$iothub/websocket", stray));
  CHECK(is_upgrade(11, "/other", good_headers()));
}

TEST_CASE("masking: a masked client frame is unmasked, at every length encoding") {
  for (std::size_t n : {0u, 1u, 5u, 125u, 126u, 127u, 1000u, 65535u, 65536u, 70000u}) {
    std::string payload(n, '\0');
    for (std::size_t i = 0; i < n; ++i)
      payload[i] = static_cast<char>(i * 7 + 3);
    auto wire = encode_client_frame(opcode::binary, payload, 0xA1B2C3D4);
    auto r = read(wire, 1 << 20);
    REQUIRE(r.st == read_status::ok);
    CHECK(r.consumed == wire.size());
    CHECK(r.f.op == opcode::binary);
    CHECK(r.f.fin);
    CHECK(r.f.payload == payload);
    // Every strict prefix needs more.
    if (n < 200)
      for (std::size_t k = 0; k < wire.size(); ++k)
        CHECK(read(wire.substr(0, k), 1 << 20).st == read_status::need_more);
  }
  // The RFC's example: "Hello" masked with 37 fa 21 3d.
  auto r = read(raw({0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58}));
  CHECK(r.st == read_status::error); // a text frame: MQTT is binary only
  CHECK(r.code == close_code::unsupported_data);
  auto bin = read(raw({0x82, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58}));
  REQUIRE(bin.st == read_status::ok);
  CHECK(bin.f.payload == "Hello");
}

TEST_CASE("an unmasked client frame is a protocol error") {
  auto r = read(raw({0x82, 0x02, 'h', 'i'}));
  CHECK(r.st == read_status::error);
  CHECK(r.code == close_code::protocol_error);
  CHECK(r.why.find("unmasked") != std::string::npos);
}

TEST_CASE("fragmentation: continuations follow a message; pings may come between") {
  reader_state st;
  auto a = encode_client_frame(opcode::binary, "ab", 1, false);
  auto ping = encode_client_frame(opcode::ping, "p", 2);
  auto b = encode_client_frame(opcode::continuation, "cd", 3, false);
  auto c = encode_client_frame(opcode::continuation, "e", 4, true);
  auto r1 = read(a, st);
  REQUIRE(r1.st == read_status::ok);
  CHECK_FALSE(r1.f.fin);
  CHECK(st.in_message);
  auto rp = read(ping, st);
  REQUIRE(rp.st == read_status::ok);
  CHECK(rp.f.op == opcode::ping);
  CHECK(st.in_message); // control frames do not end the message
  REQUIRE(read(b, st).st == read_status::ok);
  auto r3 = read(c, st);
  REQUIRE(r3.st == read_status::ok);
  CHECK(r3.f.fin);
  CHECK(r3.f.payload == "e");
  CHECK_FALSE(st.in_message);
  // A continuation with nothing started; a new message inside one.
  reader_state fresh;
  CHECK(read(encode_client_frame(opcode::continuation, "x", 5), fresh).st == read_status::error);
  reader_state mid;
  REQUIRE(read(a, mid).st == read_status::ok);
  auto nested = read(encode_client_frame(opcode::binary, "x", 6), mid);
  CHECK(nested.st == read_status::error);
  CHECK(nested.code == close_code::protocol_error);
  // A fragmented control frame.
  auto frag_ping = read(encode_client_frame(opcode::ping, "x", 7, false));
  CHECK(frag_ping.st == read_status::error);
}

TEST_CASE("oversize: refused from the header, before the payload arrives") {
  auto wire = encode_client_frame(opcode::binary, std::string(2000, 'x'), 9);
  auto r = read(wire.substr(0, 8), 1024); // header and mask only
  CHECK(r.st == read_status::error);
  CHECK(r.code == close_code::too_big);
  CHECK(read(wire, 2000).st == read_status::ok);
  // A control frame over 125 bytes (length 126 in the 7 bits).
  CHECK(read(raw({0x89, 0xFE, 0x00, 0x7E})).st == read_status::error);
  // 64-bit length with the top bit set.
  auto huge = read(raw({0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1}), 1u << 30);
  CHECK(huge.st == read_status::error);
  CHECK(huge.code == close_code::protocol_error);
  // Non-minimal lengths: 5 bytes in the 16-bit form, 300 in the 64-bit form.
  CHECK(read(raw({0x82, 0xFE, 0x00, 0x05})).st == read_status::error);
  CHECK(read(raw({0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0x01, 0x2C})).st == read_status::error);
}

TEST_CASE("bad opcodes and reserved bits") {
  for (int op : {0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF}) {
    auto r = read(raw({0x80 | op, 0x80, 0, 0, 0, 0}));
    CHECK(r.st == read_status::error);
    CHECK(r.code == close_code::protocol_error);
    CHECK(r.why.find("opcode") != std::string::npos);
  }
  for (int rsv : {0x40, 0x20, 0x10}) // RSV1 (permessage-deflate was not agreed), RSV2, RSV3
    CHECK(read(raw({0x82 | rsv, 0x80, 0, 0, 0, 0})).st == read_status::error);
}

TEST_CASE("close frames: status, bad lengths, reserved codes, UTF-8 reasons") {
  auto c = read(encode_client_frame(opcode::close, raw({0x03, 0xE8}) + "bye", 11));
  REQUIRE(c.st == read_status::ok);
  CHECK(close_status(c.f.payload) == 1000);
  CHECK(read(encode_client_frame(opcode::close, "", 12)).st == read_status::ok);
  CHECK(close_status("") == 1005);
  CHECK(read(encode_client_frame(opcode::close, "x", 13)).st == read_status::error);
  CHECK(read(encode_client_frame(opcode::close, raw({0x03, 0xED}), 14)).st  // 1005
        == read_status::error);
  CHECK(read(encode_client_frame(opcode::close, raw({0x0B, 0xB8}), 15)).st  // 3000
        == read_status::ok);
  auto bad_utf8 = read(encode_client_frame(opcode::close, raw({0x03, 0xE8, 0xC3}), 16));
  CHECK(bad_utf8.st == read_status::error);
  CHECK(bad_utf8.code == close_code::invalid_payload);
}

TEST_CASE("server frames: unmasked, minimal lengths, close reason cut to fit") {
  CHECK(encode_frame(opcode::binary, "ab") == raw({0x82, 0x02, 'a', 'b'}));
  auto mid = encode_frame(opcode::binary, std::string(300, 'x'));
  CHECK(mid.substr(0, 4) == raw({0x82, 0x7E, 0x01, 0x2C}));
  CHECK(mid.size() == 304);
  auto big = encode_frame(opcode::binary, std::string(70000, 'x'));
  CHECK(big.substr(0, 10) == raw({0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x11, 0x70}));
  auto close = encode_close(close_code::too_big, std::string(200, 'r'));
  CHECK(close.size() == 2 + 125);
  CHECK(close.substr(0, 4) == raw({0x88, 0x7D, 0x03, 0xF1}));
  // A two-byte character across the cut is dropped whole.
  auto cut = encode_close(close_code::normal, std::string(122, 'r') + "\xC3\xA9");
  CHECK(cut.size() == 2 + 2 + 122);
}

} // TEST_SUITE
