#include "net/mqtt_codec.hpp"

namespace prov::mqtt {

namespace {

/// The fixed-header flags 3.1.1 §2.2.2 requires of each type (PUBLISH's are
/// its own: any value, checked by parse_publish).
bool flags_ok(packet_type t, uint8_t flags) {
  switch (t) {
  case packet_type::publish: return true;
  case packet_type::pubrel:
  case packet_type::subscribe:
  case packet_type::unsubscribe: return flags == 2;
  default: return flags == 0;
  }
}

/// Reads from a packet body; every read fails once past the end.
class reader {
public:
  explicit reader(std::string_view s) : s_(s) {}

  bool u8(uint8_t& v) {
    if (s_.empty())
      return false;
    v = static_cast<uint8_t>(s_[0]);
    s_.remove_prefix(1);
    return true;
  }
  bool u16(uint16_t& v) {
    if (s_.size() < 2)
      return false;
    v = static_cast<uint16_t>((static_cast<uint8_t>(s_[0]) << 8) | static_cast<uint8_t>(s_[1]));
    s_.remove_prefix(2);
    return true;
  }
  /// A length-prefixed field (binary data when `utf8` is false).
  bool str(std::string& v, bool utf8 = true) {
    uint16_t n = 0;
    if (!u16(n) || s_.size() < n)
      return false;
    v.assign(s_.data(), n);
    s_.remove_prefix(n);
    return !utf8 || valid_utf8(v);
  }
  std::string_view rest() const { return s_; }
  bool empty() const { return s_.empty(); }

private:
  std::string_view s_;
};

void put_u16(std::string& out, uint16_t v) {
  out.push_back(static_cast<char>(v >> 8));
  out.push_back(static_cast<char>(v & 0xff));
}

void put_str(std::string& out, std::string_view s) {
  put_u16(out, static_cast<uint16_t>(s.size()));
  out.append(s);
}

/// The fixed header for a body of `len` bytes, then the body.
std::string packet(uint8_t first, std::string_view body) {
  std::string out;
  out.reserve(body.size() + 5);
  out.push_back(static_cast<char>(first));
  std::size_t len = body.size();
  do {
    uint8_t b = len % 128;
    len /= 128;
    if (len > 0)
      b |= 0x80;
    out.push_back(static_cast<char>(b));
  } while (len > 0);
  out.append(body);
  return out;
}

bool has_wildcard(std::string_view s) {
  return s.find_first_of("#+") != std::string_view::npos;
}

} // namespace

bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c == 0)
      return false;
    if (c < 0x80) {
      ++i;
      continue;
    }
    int n = 0;
    uint32_t cp = 0;
    if ((c & 0xe0) == 0xc0) {
      n = 1;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + static_cast<std::size_t>(n) >= s.size())
      return false;
    for (int k = 1; k <= n; ++k) {
      auto cc = static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]);
      if ((cc & 0xc0) != 0x80)
        return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    // Overlong forms, surrogates, beyond U+10FFFF.
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000)
        || (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff)
      return false;
    i += static_cast<std::size_t>(n) + 1;
  }
  return true;
}

frame_status read_frame(std::string_view in, std::size_t max_packet, frame& out,
                        std::size_t& consumed) {
  if (in.empty())
    return frame_status::need_more;
  auto first = static_cast<uint8_t>(in[0]);
  uint8_t type = first >> 4;
  uint8_t flags = first & 0x0f;
  if (type == 0 || type == 15 || !flags_ok(static_cast<packet_type>(type), flags))
    return frame_status::malformed;
  std::size_t len = 0, mult = 1, i = 1;
  for (;;) {
    // A fifth length byte is malformed whether or not it has arrived: a
    // fourth one continued is enough to tell.
    if (i > 4)
      return frame_status::malformed;
    if (i >= in.size())
      return frame_status::need_more;
    auto b = static_cast<uint8_t>(in[i]);
    len += (b & 0x7fu) * mult;
    ++i;
    if ((b & 0x80) == 0) {
      if (b == 0 && i > 2)
        return frame_status::malformed; // not the shortest encoding
      break;
    }
    mult *= 128;
  }
  auto t = static_cast<packet_type>(type);
  if (((t == packet_type::pingreq || t == packet_type::disconnect || t == packet_type::pingresp)
       && len != 0)
      || ((t == packet_type::puback || t == packet_type::pubrec || t == packet_type::pubrel
           || t == packet_type::pubcomp || t == packet_type::unsuback)
          && len != 2))
    return frame_status::malformed;
  if (i + len > max_packet)
    return frame_status::too_large;
  if (in.size() < i + len)
    return frame_status::need_more;
  out.type = t;
  out.flags = flags;
  out.body = in.substr(i, len);
  consumed = i + len;
  return frame_status::ok;
}

connect_result parse_connect(const frame& f, connect_packet& out) {
  connect_result r;
  auto bad = [&](const char* why) {
    r.malformed = true;
    r.why = why;
    return r;
  };
  reader rd(f.body);
  std::string name;
  if (!rd.str(name))
    return bad("CONNECT: no protocol name");
  if (!rd.u8(out.protocol_level))
    return bad("CONNECT: no protocol level");
  if (name != "MQTT" && name != "MQIsdp")
    return bad("CONNECT: protocol name is not MQTT");
  if (name != "MQTT" || out.protocol_level != 4) {
    // 3.1.1 §3.1.2.2: answer 0x01 and close; only 3.1.1 is spoken.
    r.refuse = connack_code::unacceptable_protocol;
    r.why = "protocol level " + std::to_string(out.protocol_level) + " (" + name
            + "): only MQTT 3.1.1 (level 4) is supported";
    return r;
  }
  uint8_t cf = 0;
  if (!rd.u8(cf) || !rd.u16(out.keep_alive_s))
    return bad("CONNECT: truncated variable header");
  if (cf & 0x01)
    return bad("CONNECT: reserved flag set");
  const bool will = cf & 0x04, has_user = cf & 0x80, has_pass = cf & 0x40;
  const uint8_t will_qos = (cf >> 3) & 0x03;
  if (!will && (will_qos != 0 || (cf & 0x20)))
    return bad("CONNECT: will QoS or retain without a will");
  if (will_qos == 3)
    return bad("CONNECT: will QoS 3");
  if (has_pass && !has_user)
    return bad("CONNECT: password without a user name");
  out.clean_session = cf & 0x02;
  if (!rd.str(out.client_id))
    return bad("CONNECT: bad client identifier");
  if (will) {
    // Accepted and ignored: nothing can subscribe to a device's will here.
    std::string topic, message;
    if (!rd.str(topic) || !rd.str(message, false))
      return bad("CONNECT: bad will");
  }
  if (has_user) {
    std::string u;
    if (!rd.str(u))
      return bad("CONNECT: bad user name");
    out.username = std::move(u);
  }
  if (has_pass) {
    std::string p;
    if (!rd.str(p, false))
      return bad("CONNECT: bad password");
    out.password = std::move(p);
  }
  if (!rd.empty())
    return bad("CONNECT: bytes after the payload");
  return r;
}

std::string parse_publish(const frame& f, publish_packet& out) {
  out.dup = f.flags & 0x08;
  out.qos = (f.flags >> 1) & 0x03;
  out.retain = f.flags & 0x01;
  if (out.qos == 3)
    return "PUBLISH: QoS 3";
  if (out.qos == 2)
    return "PUBLISH: QoS 2 is not supported (use 0 or 1)";
  if (out.qos == 0 && out.dup)
    return "PUBLISH: DUP set on QoS 0";
  reader rd(f.body);
  if (!rd.str(out.topic))
    return "PUBLISH: bad topic name";
  if (out.topic.empty() || has_wildcard(out.topic))
    return "PUBLISH: empty topic or a wildcard in it";
  out.packet_id = 0;
  if (out.qos > 0 && (!rd.u16(out.packet_id) || out.packet_id == 0))
    return "PUBLISH: missing or zero packet identifier";
  out.payload = rd.rest();
  return {};
}

namespace {

std::string parse_filters(const frame& f, subscribe_packet& out, bool with_qos,
                          const char* what) {
  reader rd(f.body);
  if (!rd.u16(out.packet_id) || out.packet_id == 0)
    return std::string(what) + ": missing or zero packet identifier";
  out.filters.clear();
  while (!rd.empty()) {
    std::string filter;
    if (!rd.str(filter) || filter.empty())
      return std::string(what) + ": bad topic filter";
    uint8_t qos = 0;
    if (with_qos && (!rd.u8(qos) || qos > 2))
      return std::string(what) + ": bad requested QoS";
    out.filters.emplace_back(std::move(filter), qos);
  }
  if (out.filters.empty())
    return std::string(what) + ": no topic filter";
  return {};
}

} // namespace

std::string parse_subscribe(const frame& f, subscribe_packet& out) {
  return parse_filters(f, out, true, "SUBSCRIBE");
}

std::string parse_unsubscribe(const frame& f, subscribe_packet& out) {
  return parse_filters(f, out, false, "UNSUBSCRIBE");
}

std::string parse_puback(const frame& f, uint16_t& packet_id) {
  reader rd(f.body);
  if (!rd.u16(packet_id) || !rd.empty() || packet_id == 0)
    return "PUBACK: bad packet identifier";
  return {};
}

std::string encode_connack(bool session_present, connack_code code) {
  std::string body;
  body.push_back(session_present ? 1 : 0);
  body.push_back(static_cast<char>(code));
  return packet(0x20, body);
}

std::string encode_suback(uint16_t packet_id, const std::vector<uint8_t>& granted) {
  std::string body;
  put_u16(body, packet_id);
  for (auto g : granted)
    body.push_back(static_cast<char>(g));
  return packet(0x90, body);
}

std::string encode_unsuback(uint16_t packet_id) {
  std::string body;
  put_u16(body, packet_id);
  return packet(0xb0, body);
}

std::string encode_puback(uint16_t packet_id) {
  std::string body;
  put_u16(body, packet_id);
  return packet(0x40, body);
}

std::string encode_pingresp() { return packet(0xd0, {}); }

std::string encode_publish(std::string_view topic, std::string_view payload, uint8_t qos,
                           uint16_t packet_id) {
  if (topic.size() > 0xffff)
    return {}; // put_str would truncate its length: a corrupt packet
  std::string body;
  body.reserve(topic.size() + payload.size() + 4);
  put_str(body, topic);
  if (qos > 0)
    put_u16(body, packet_id);
  body.append(payload);
  return packet(static_cast<uint8_t>(0x30 | (qos << 1)), body);
}

std::string encode_connect(const connect_packet& c) {
  std::string body;
  put_str(body, "MQTT");
  body.push_back(static_cast<char>(c.protocol_level));
  uint8_t cf = 0;
  if (c.clean_session)
    cf |= 0x02;
  if (c.username)
    cf |= 0x80;
  if (c.password)
    cf |= 0x40;
  body.push_back(static_cast<char>(cf));
  put_u16(body, c.keep_alive_s);
  put_str(body, c.client_id);
  if (c.username)
    put_str(body, *c.username);
  if (c.password)
    put_str(body, *c.password);
  return packet(0x10, body);
}

std::string encode_subscribe(const subscribe_packet& s) {
  std::string body;
  put_u16(body, s.packet_id);
  for (const auto& [filter, qos] : s.filters) {
    put_str(body, filter);
    body.push_back(static_cast<char>(qos));
  }
  return packet(0x82, body);
}

std::string encode_pingreq() { return packet(0xc0, {}); }
std::string encode_disconnect() { return packet(0xe0, {}); }

} // namespace prov::mqtt
