#pragma once
// The server side of RFC 6455 WebSocket, as much as MQTT over WebSocket
// needs (the Azure SDKs' `MqttWs` transports at /$iothub/websocket): the
// upgrade request's checks and the accept key, and frames as pure functions
// over bytes, no I/O (like mqtt_codec). Hand-written rather than Beast's
// websocket::stream: that is an Asio stream owning the reads and writes,
// while the device listeners let OpenSSL drive the socket and only take
// readiness from Asio (docs/performance.md, session 11); the framing is
// small and, as pure functions, unit-tested and fuzzed. No extensions
// (permessage-deflate offers are declined by not answering them).

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace prov::ws {

/// Where the Azure SDKs dial MQTT over WebSocket, and its subprotocol.
inline constexpr std::string_view mqtt_path = "/$iothub/websocket";
inline constexpr std::string_view mqtt_subprotocol = "mqtt";

/// True when the request asks to switch protocols to WebSocket: HTTP/1.1,
/// an `Upgrade` header naming `websocket`, and `Connection: upgrade` or the
/// MQTT path (check_upgrade() then says what is wrong). Any other request
/// with a stray `Upgrade` header is an ordinary request for the routes.
/// `http_version` as Beast has it (11 = 1.1); headers are (lower-case name, value).
bool is_upgrade(unsigned http_version, std::string_view path,
                const std::vector<std::pair<std::string, std::string>>& headers);

/// The upgrade request's verdict: accepted (`accept_key`, `subprotocol`), or
/// refused with the HTTP status and why (for the error body).
struct upgrade_verdict {
  int status = 101;          ///< 101, or 400 / 404 / 405 on refusal
  std::string why;           ///< set on refusal
  std::string accept_key;    ///< Sec-WebSocket-Accept
  std::string subprotocol;   ///< the one chosen ("mqtt")
  bool wrong_version = false; ///< answer with Sec-WebSocket-Version: 13
};

/// Checks an upgrade request (RFC 6455 §4.2.1) for MQTT at mqtt_path:
/// GET, HTTP/1.1, `Connection: upgrade`, `Upgrade: websocket`,
/// `Sec-WebSocket-Version: 13`, a `Sec-WebSocket-Key` of 16 base64 bytes,
/// and `mqtt` among the offered subprotocols. `path` excludes the query.
upgrade_verdict check_upgrade(std::string_view method, unsigned http_version,
                              std::string_view path,
                              const std::vector<std::pair<std::string, std::string>>& headers);

/// base64(SHA-1(key + the RFC's GUID)).
std::string accept_key(std::string_view client_key);

/// The 101 response for an accepted verdict (head only).
std::string switching_protocols_response(const upgrade_verdict& v);

enum class opcode : uint8_t {
  continuation = 0x0, text = 0x1, binary = 0x2, close = 0x8, ping = 0x9, pong = 0xA,
};

/// Close status codes (RFC 6455 §7.4.1) the server sends.
enum class close_code : uint16_t {
  normal = 1000,
  going_away = 1001,
  protocol_error = 1002,
  unsupported_data = 1003,
  invalid_payload = 1007,
  policy_violation = 1008,
  too_big = 1009,
};

/// One client frame, unmasked.
struct frame {
  opcode op = opcode::binary;
  bool fin = true;
  std::string payload;
};

enum class read_status { ok, need_more, error };

/// What a client's frames may be: at most `max_payload` bytes each (checked
/// from the header, before the payload arrives).
struct limits {
  std::size_t max_payload = 128 * 1024;
};

/// The reader's state between frames: whether a fragmented data message is
/// under way (continuations must follow it, a new data frame must not).
struct reader_state {
  bool in_message = false;
};

/// Splits the first frame off `in` and unmasks it. ok: `out` and `consumed`
/// are set. need_more: `in` is a valid prefix. error: `code` and `why` say
/// what the client did: reserved bits set (no extension was agreed), an
/// unknown opcode, an unmasked frame (clients must mask), a control frame
/// fragmented or over 125 bytes, a 64-bit length with its top bit set or a
/// length not minimally encoded, a payload over `lim.max_payload` (too_big),
/// a continuation with no message started or a data frame inside one, a
/// text frame (MQTT travels in binary frames only: unsupported_data), a
/// close frame with a 1-byte body, a reserved close code or a reason that is
/// not UTF-8.
read_status read_frame(std::string_view in, const limits& lim, reader_state& st, frame& out,
                       std::size_t& consumed, close_code& code, std::string& why);

/// A server frame (unmasked, as servers send), final.
std::string encode_frame(opcode op, std::string_view payload);
/// Appends a final server frame to `out` (the binary frames carrying MQTT).
void append_frame(std::string& out, opcode op, std::string_view payload);
/// A close frame with a status code and a reason (cut to fit 125 bytes).
std::string encode_close(close_code code, std::string_view reason);

/// The status code of a close frame's payload; 1005 (none given) when empty.
uint16_t close_status(std::string_view payload);

/// A client frame, masked with `mask` (tests and fuzzing; clients mask).
std::string encode_client_frame(opcode op, std::string_view payload, uint32_t mask,
                                bool fin = true);

} // namespace prov::ws
