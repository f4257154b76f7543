#pragma once
// A small, strict MQTT 3.1.1 codec for the server side of the DPS device
// protocol: pure functions over bytes, no I/O. Debian packages MQTT client
// libraries (libmosquitto, paho) and a broker, but no server-side packet
// parser as a library. Only what a DPS device sends is decoded (CONNECT,
// SUBSCRIBE, UNSUBSCRIBE, PUBLISH QoS 0/1, PUBACK, PINGREQ, DISCONNECT);
// anything else is malformed and the server closes the connection.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace prov::mqtt {

enum class packet_type : uint8_t {
  connect = 1, connack = 2, publish = 3, puback = 4, pubrec = 5, pubrel = 6, pubcomp = 7,
  subscribe = 8, suback = 9, unsubscribe = 10, unsuback = 11, pingreq = 12, pingresp = 13,
  disconnect = 14,
};

/// One packet's fixed header and body, pointing into the caller's buffer.
struct frame {
  packet_type type = packet_type::connect;
  uint8_t flags = 0;      ///< the fixed header's low nibble
  std::string_view body;  ///< variable header and payload
};

enum class frame_status { ok, need_more, malformed, too_large };

/// Splits the first packet off `in`. ok: `out` and `consumed` (header and
/// body) are set. need_more: `in` holds a prefix of a valid packet.
/// malformed: a reserved type, a remaining length over 4 bytes or not
/// minimally encoded, or fixed-header flags 3.1.1 forbids for the type.
/// too_large: the whole packet would exceed `max_packet` bytes (known as
/// soon as the length is, before the body arrives).
frame_status read_frame(std::string_view in, std::size_t max_packet, frame& out,
                        std::size_t& consumed);

/// CONNACK return codes (3.1.1 §3.2.2.3).
enum class connack_code : uint8_t {
  accepted = 0,
  unacceptable_protocol = 1,
  identifier_rejected = 2,
  server_unavailable = 3,
  bad_username_or_password = 4,
  not_authorized = 5,
};

struct connect_packet {
  uint8_t protocol_level = 0;
  bool clean_session = false;
  uint16_t keep_alive_s = 0;
  std::string client_id;
  std::optional<std::string> username;
  std::optional<std::string> password; ///< binary in MQTT; a SAS for DPS
};

/// Result of decoding a CONNECT: ok, a refusal the server answers with a
/// CONNACK code before closing (unacceptable_protocol), or malformed (close
/// without a CONNACK, 3.1.1 §3.1.4).
struct connect_result {
  bool malformed = false;
  connack_code refuse = connack_code::accepted;
  std::string why; ///< for the log
};

connect_result parse_connect(const frame& f, connect_packet& out);

struct publish_packet {
  uint8_t qos = 0;
  bool dup = false;
  bool retain = false;
  std::string topic;
  uint16_t packet_id = 0; ///< QoS 1 only
  std::string_view payload;
};

/// "" when fine, else why it is malformed (QoS 3, QoS 2 (refused: DPS
/// takes QoS 0 and 1), an empty or wildcard topic, bad UTF-8, packet id 0).
std::string parse_publish(const frame& f, publish_packet& out);

struct subscribe_packet {
  uint16_t packet_id = 0;
  std::vector<std::pair<std::string, uint8_t>> filters; ///< filter, requested QoS
};

/// SUBSCRIBE (qos read) or UNSUBSCRIBE (qos 0); "" when fine.
std::string parse_subscribe(const frame& f, subscribe_packet& out);
std::string parse_unsubscribe(const frame& f, subscribe_packet& out);

/// PUBACK: the packet id; "" when fine.
std::string parse_puback(const frame& f, uint16_t& packet_id);

/// Whether `s` is a well-formed MQTT UTF-8 string (§1.5.3): valid UTF-8,
/// no U+0000, no surrogates.
bool valid_utf8(std::string_view s);

// -- encoding (server to client) ----------------------------------------------

std::string encode_connack(bool session_present, connack_code code);
std::string encode_suback(uint16_t packet_id, const std::vector<uint8_t>& granted);
std::string encode_unsuback(uint16_t packet_id);
std::string encode_puback(uint16_t packet_id);
std::string encode_pingresp();
/// `packet_id` is written for qos 1 only. "" (nothing to send) for a topic
/// longer than an MQTT string can be (65535 bytes), never a corrupt packet.
std::string encode_publish(std::string_view topic, std::string_view payload, uint8_t qos,
                           uint16_t packet_id);

// -- encoding (client to server), for tests and the benchmark harness ---------

std::string encode_connect(const connect_packet& c);
std::string encode_subscribe(const subscribe_packet& s);
std::string encode_pingreq();
std::string encode_disconnect();

} // namespace prov::mqtt
