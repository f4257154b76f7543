#include "net/websocket.hpp"

#include <openssl/evp.h>

#include "messages/ascii.hpp"
#include "messages/crypto.hpp"
#include "net/mqtt_codec.hpp"

namespace prov::ws {

namespace {

using headers_t = std::vector<std::pair<std::string, std::string>>;

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t'))
    s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t'))
    s.remove_suffix(1);
  return s;
}

/// True when some `name` header's comma-separated list holds `token`
/// (case-insensitive unless `exact`; a header may be repeated).
bool has_token(const headers_t& headers, std::string_view name, std::string_view token,
               bool exact = false) {
  for (const auto& [n, v] : headers) {
    if (n != name)
      continue;
    std::string_view rest = v;
    while (!rest.empty()) {
      auto comma = rest.find(',');
      auto item = trim(rest.substr(0, comma));
      if (exact ? item == token : ascii::iequals(item, token))
        return true;
      if (comma == std::string_view::npos)
        break;
      rest.remove_prefix(comma + 1);
    }
  }
  return false;
}

const std::string* header(const headers_t& headers, std::string_view name, int& count) {
  const std::string* found = nullptr;
  count = 0;
  for (const auto& [n, v] : headers)
    if (n == name) {
      ++count;
      found = &v;
    }
  return found;
}

upgrade_verdict refuse(int status, std::string why) {
  upgrade_verdict v;
  v.status = status;
  v.why = std::move(why);
  return v;
}

bool reserved_close_code(uint16_t c) {
  // §7.4: 1004-1006 and 1015 are never sent; below 1000 and 1016-2999
  // unassigned (IANA); 3000-4999 are for libraries and applications.
  if (c < 1000 || c == 1004 || c == 1005 || c == 1006 || c == 1015)
    return true;
  if (c > 1015 && c < 3000)
    return true;
  return c >= 5000;
}

} // namespace

bool is_upgrade(unsigned http_version, std::string_view path, const headers_t& headers) {
  return http_version == 11 && has_token(headers, "upgrade", "websocket")
         && (has_token(headers, "connection", "upgrade") || path == mqtt_path);
}

upgrade_verdict check_upgrade(std::string_view method, unsigned http_version,
                              std::string_view path, const headers_t& headers) {
  if (path != mqtt_path)
    return refuse(404, "WebSocket upgrades are served at " + std::string(mqtt_path)
                         + " only (MQTT over WebSocket), not at '"
                         + std::string(path.substr(0, 128)) + "'");
  if (method != "GET")
    return refuse(405, "a WebSocket upgrade must be a GET, not " + std::string(method.substr(0, 16)));
  if (http_version < 11)
    return refuse(400, "a WebSocket upgrade needs HTTP/1.1");
  if (!has_token(headers, "connection", "upgrade"))
    return refuse(400, "a WebSocket upgrade needs 'Connection: Upgrade'");
  int n = 0;
  const std::string* version = header(headers, "sec-websocket-version", n);
  if (version == nullptr || n != 1 || trim(*version) != "13") {
    auto v = refuse(400, "only WebSocket version 13 (RFC 6455) is served; "
                         "Sec-WebSocket-Version was "
                           + (version == nullptr ? std::string("missing")
                                                 : "'" + version->substr(0, 32) + "'"));
    v.wrong_version = true;
    return v;
  }
  const std::string* key = header(headers, "sec-websocket-key", n);
  if (key == nullptr)
    return refuse(400, "a WebSocket upgrade needs a Sec-WebSocket-Key");
  auto raw = n == 1 ? crypto::base64_decode(trim(*key)) : std::nullopt;
  if (!raw || raw->size() != 16)
    return refuse(400, "Sec-WebSocket-Key must be one base64 value of 16 bytes");
  // Subprotocol names are compared exactly (RFC 6455 §4.1: case-sensitive),
  // and the 101 echoes "mqtt": a client offering only "MQTT" is refused.
  if (!has_token(headers, "sec-websocket-protocol", mqtt_subprotocol, true))
    return refuse(400, "the WebSocket subprotocol must be 'mqtt' (Sec-WebSocket-Protocol: "
                       "mqtt); offered: "
                         + [&] {
                             const std::string* p = header(headers, "sec-websocket-protocol", n);
                             return p == nullptr ? std::string("none")
                                                 : "'" + p->substr(0, 64) + "'";
                           }());
  upgrade_verdict v;
  v.accept_key = accept_key(trim(*key));
  v.subprotocol = std::string(mqtt_subprotocol);
  return v;
}

std::string accept_key(std::string_view client_key) {
  static constexpr std::string_view guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
  std::string in(client_key);
  in += guid;
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(in.data(), in.size(), md, &len, EVP_sha1(), nullptr) != 1)
    return {};
  return crypto::base64_encode(std::string_view(reinterpret_cast<const char*>(md), len));
}

std::string switching_protocols_response(const upgrade_verdict& v) {
  return "HTTP/1.1 101 Switching Protocols\r\nServer: provisiond\r\nUpgrade: websocket\r\n"
         "Connection: Upgrade\r\nSec-WebSocket-Accept: "
         + v.accept_key + "\r\nSec-WebSocket-Protocol: " + v.subprotocol + "\r\n\r\n";
}

read_status read_frame(std::string_view in, const limits& lim, reader_state& st, frame& out,
                       std::size_t& consumed, close_code& code, std::string& why) {
  auto fail = [&](close_code c, std::string w) {
    code = c;
    why = std::move(w);
    return read_status::error;
  };
  if (in.size() < 2)
    return read_status::need_more;
  const auto b0 = static_cast<uint8_t>(in[0]);
  const auto b1 = static_cast<uint8_t>(in[1]);
  const bool fin = (b0 & 0x80) != 0;
  if ((b0 & 0x70) != 0)
    return fail(close_code::protocol_error, "reserved bits set (no extension was agreed)");
  const uint8_t op = b0 & 0x0F;
  const bool control = (op & 0x08) != 0;
  switch (op) {
  case 0x0: case 0x1: case 0x2: case 0x8: case 0x9: case 0xA: break;
  default: return fail(close_code::protocol_error, "unknown opcode " + std::to_string(op));
  }
  if ((b1 & 0x80) == 0)
    return fail(close_code::protocol_error, "an unmasked client frame (RFC 6455 §5.1)");
  std::size_t pos = 2;
  uint64_t len = b1 & 0x7F;
  if (control && (!fin || len > 125))
    return fail(close_code::protocol_error, "a control frame fragmented or over 125 bytes");
  if (len == 126) {
    if (in.size() < pos + 2)
      return read_status::need_more;
    len = (uint64_t{static_cast<uint8_t>(in[2])} << 8) | static_cast<uint8_t>(in[3]);
    pos += 2;
    if (len < 126)
      return fail(close_code::protocol_error, "a frame length not minimally encoded");
  } else if (len == 127) {
    if (in.size() < pos + 8)
      return read_status::need_more;
    len = 0;
    for (int i = 0; i < 8; ++i)
      len = (len << 8) | static_cast<uint8_t>(in[pos + static_cast<std::size_t>(i)]);
    pos += 8;
    if ((len >> 63) != 0)
      return fail(close_code::protocol_error, "a 64-bit frame length with its top bit set");
    if (len <= 0xFFFF)
      return fail(close_code::protocol_error, "a frame length not minimally encoded");
  }
  if (len > lim.max_payload)
    return fail(close_code::too_big, "a frame of " + std::to_string(len)
                                       + " bytes (at most " + std::to_string(lim.max_payload)
                                       + ")");
  // Message order, known from the header: refused before the payload arrives.
  if (op == 0x0 && !st.in_message)
    return fail(close_code::protocol_error, "a continuation frame with no message started");
  if ((op == 0x1 || op == 0x2) && st.in_message)
    return fail(close_code::protocol_error, "a new data frame inside a fragmented message");
  if (op == 0x1)
    return fail(close_code::unsupported_data,
                "a text frame (MQTT over WebSocket travels in binary frames)");
  if (in.size() < pos + 4)
    return read_status::need_more;
  uint8_t mask[4];
  for (int i = 0; i < 4; ++i)
    mask[i] = static_cast<uint8_t>(in[pos + static_cast<std::size_t>(i)]);
  pos += 4;
  if (in.size() - pos < len)
    return read_status::need_more;
  const auto n = static_cast<std::size_t>(len);
  out.op = static_cast<opcode>(op);
  out.fin = fin;
  out.payload.assign(in.data() + pos, n);
  for (std::size_t i = 0; i < n; ++i)
    out.payload[i] = static_cast<char>(static_cast<uint8_t>(out.payload[i]) ^ mask[i & 3]);
  if (op == 0x8) {
    if (n == 1)
      return fail(close_code::protocol_error, "a close frame with a 1-byte body");
    if (n >= 2) {
      const uint16_t c = close_status(out.payload);
      if (reserved_close_code(c))
        return fail(close_code::protocol_error, "a close frame with code " + std::to_string(c));
      if (!mqtt::valid_utf8(std::string_view(out.payload).substr(2)))
        return fail(close_code::invalid_payload, "a close reason that is not UTF-8");
    }
  }
  if (!control)
    st.in_message = !fin;
  consumed = pos + n;
  return read_status::ok;
}

void append_frame(std::string& out, opcode op, std::string_view payload) {
  out.push_back(static_cast<char>(0x80 | static_cast<uint8_t>(op)));
  const std::size_t n = payload.size();
  if (n < 126) {
    out.push_back(static_cast<char>(n));
  } else if (n <= 0xFFFF) {
    out.push_back(static_cast<char>(126));
    out.push_back(static_cast<char>((n >> 8) & 0xFF));
    out.push_back(static_cast<char>(n & 0xFF));
  } else {
    out.push_back(static_cast<char>(127));
    for (int i = 7; i >= 0; --i)
      out.push_back(static_cast<char>((static_cast<uint64_t>(n) >> (8 * i)) & 0xFF));
  }
  out.append(payload.data(), payload.size());
}

std::string encode_frame(opcode op, std::string_view payload) {
  std::string out;
  out.reserve(payload.size() + 10);
  append_frame(out, op, payload);
  return out;
}

std::string encode_close(close_code code, std::string_view reason) {
  std::string p;
  const auto c = static_cast<uint16_t>(code);
  p.push_back(static_cast<char>(c >> 8));
  p.push_back(static_cast<char>(c & 0xFF));
  reason = reason.substr(0, 123);
  // Never cut a UTF-8 sequence in two (the client checks the reason).
  while (!reason.empty() && !mqtt::valid_utf8(reason))
    reason.remove_suffix(1);
  p.append(reason.data(), reason.size());
  return encode_frame(opcode::close, p);
}

uint16_t close_status(std::string_view payload) {
  if (payload.size() < 2)
    return 1005;
  return static_cast<uint16_t>((static_cast<uint8_t>(payload[0]) << 8)
                               | static_cast<uint8_t>(payload[1]));
}

std::string encode_client_frame(opcode op, std::string_view payload, uint32_t mask, bool fin) {
  std::string out;
  out.push_back(static_cast<char>((fin ? 0x80 : 0) | static_cast<uint8_t>(op)));
  const std::size_t n = payload.size();
  if (n < 126) {
    out.push_back(static_cast<char>(0x80 | n));
  } else if (n <= 0xFFFF) {
    out.push_back(static_cast<char>(0x80 | 126));
    out.push_back(static_cast<char>((n >> 8) & 0xFF));
    out.push_back(static_cast<char>(n & 0xFF));
  } else {
    out.push_back(static_cast<char>(0x80 | 127));
    for (int i = 7; i >= 0; --i)
      out.push_back(static_cast<char>((static_cast<uint64_t>(n) >> (8 * i)) & 0xFF));
  }
  const uint8_t m[4] = {static_cast<uint8_t>(mask >> 24), static_cast<uint8_t>(mask >> 16),
                        static_cast<uint8_t>(mask >> 8), static_cast<uint8_t>(mask)};
  out.append(reinterpret_cast<const char*>(m), 4);
  for (std::size_t i = 0; i < n; ++i)
    out.push_back(static_cast<char>(static_cast<uint8_t>(payload[i]) ^ m[i & 3]));
  return out;
}

} // namespace prov::ws
