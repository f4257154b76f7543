// The MQTT 3.1.1 codec (net/mqtt_codec) and the DPS topic and user name
// rules (net/mqtt_dps) on a device's bytes, read as the server reads them:
// packet after packet, each handed to the parser of its type. Checks: the
// bytes read at once and in 1-, 5- and 13-byte pieces give the same packets
// and the same verdict; a packet never exceeds the limit; what a parser
// accepts re-encodes (with the client encoders) to a packet that parses the
// same; a DPS request topic's $rid is echoed exactly in a response topic
// that encodes as an MQTT topic, with retry-after after it.

#include <string>
#include <utility>
#include <vector>

#include "net/mqtt_codec.hpp"
#include "net/mqtt_dps.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace {

using namespace prov;

constexpr std::size_t max_packet = 4096;

struct outcome {
  std::vector<std::pair<uint8_t, std::string>> packets; ///< first byte, body
  mqtt::frame_status last = mqtt::frame_status::need_more;
};

/// Reads every packet of `in`, `step` bytes at a time (0 = all at once).
outcome read_all(std::string_view in, std::size_t step) {
  outcome o;
  std::string buf;
  std::size_t fed = 0;
  for (;;) {
    const std::size_t n = step == 0 ? in.size() - fed : std::min(step, in.size() - fed);
    buf.append(in.data() + fed, n);
    fed += n;
    for (;;) {
      mqtt::frame f;
      std::size_t consumed = 0;
      auto st = mqtt::read_frame(buf, max_packet, f, consumed);
      o.last = st;
      if (st == mqtt::frame_status::malformed || st == mqtt::frame_status::too_large)
        return o;
      if (st == mqtt::frame_status::need_more)
        break;
      PROV_FUZZ_CHECK(consumed > f.body.size() && consumed <= buf.size());
      PROV_FUZZ_CHECK(consumed <= max_packet);
      o.packets.emplace_back(static_cast<uint8_t>((static_cast<uint8_t>(f.type) << 4) | f.flags),
                             std::string(f.body));
      buf.erase(0, consumed);
    }
    if (fed == in.size())
      return o;
  }
}

/// One packet through `read_frame` again: it must be whole and alone.
mqtt::frame reread(const std::string& wire) {
  mqtt::frame g;
  std::size_t used = 0;
  PROV_FUZZ_CHECK(mqtt::read_frame(wire, 1 << 20, g, used) == mqtt::frame_status::ok);
  PROV_FUZZ_CHECK(used == wire.size());
  return g;
}

void check_dps_topic(const std::string& topic) {
  mqtt::dps_request req;
  if (!mqtt::parse_request_topic(topic, req).empty())
    return;
  PROV_FUZZ_CHECK(req.rid.size() <= mqtt::max_rid_bytes);
  // The rid ends at the next '&' (SDKs parse retry-after after it).
  PROV_FUZZ_CHECK(req.rid.find('&') == std::string::npos);
  for (int status : {200, 202, 429})
    for (int retry : {0, 3}) {
      auto t = mqtt::response_topic(status, req.rid, retry);
      const std::string head = "$dps/registrations/res/" + std::to_string(status) + "/?$rid=";
      PROV_FUZZ_CHECK(t == head + req.rid + (retry > 0 ? "&retry-after=3" : ""));
      PROV_FUZZ_CHECK(!mqtt::encode_publish(t, "{}", 1, 1).empty());
    }
}

void parse_one(uint8_t first, const std::string& body) {
  mqtt::frame f{static_cast<mqtt::packet_type>(first >> 4), static_cast<uint8_t>(first & 0x0F),
                body};
  switch (f.type) {
  case mqtt::packet_type::connect: {
    mqtt::connect_packet c;
    auto r = mqtt::parse_connect(f, c);
    PROV_FUZZ_CHECK(!(r.malformed || r.refuse != mqtt::connack_code::accepted) || !r.why.empty());
    if (r.malformed || r.refuse != mqtt::connack_code::accepted)
      return;
    mqtt::connect_packet again;
    auto wire = mqtt::encode_connect(c);
    auto r2 = mqtt::parse_connect(reread(wire), again);
    PROV_FUZZ_CHECK(!r2.malformed && r2.refuse == mqtt::connack_code::accepted);
    PROV_FUZZ_CHECK(again.client_id == c.client_id && again.username == c.username
                    && again.password == c.password && again.keep_alive_s == c.keep_alive_s
                    && again.clean_session == c.clean_session);
    if (c.username) {
      mqtt::dps_username u;
      if (mqtt::parse_username(*c.username, u).empty())
        PROV_FUZZ_CHECK(!u.api_version.empty());
    }
    return;
  }
  case mqtt::packet_type::publish: {
    mqtt::publish_packet p;
    if (!mqtt::parse_publish(f, p).empty())
      return;
    PROV_FUZZ_CHECK(p.qos <= 1 && !p.topic.empty());
    PROV_FUZZ_CHECK(p.qos == 0 || p.packet_id != 0);
    auto wire = mqtt::encode_publish(p.topic, p.payload, p.qos, p.packet_id);
    PROV_FUZZ_CHECK(!wire.empty());
    mqtt::publish_packet again;
    PROV_FUZZ_CHECK(mqtt::parse_publish(reread(wire), again).empty());
    PROV_FUZZ_CHECK(again.topic == p.topic && again.payload == p.payload && again.qos == p.qos
                    && again.packet_id == p.packet_id);
    check_dps_topic(p.topic);
    return;
  }
  case mqtt::packet_type::subscribe: {
    mqtt::subscribe_packet s;
    if (!mqtt::parse_subscribe(f, s).empty())
      return;
    PROV_FUZZ_CHECK(!s.filters.empty() && s.packet_id != 0);
    for (const auto& [filter, qos] : s.filters)
      PROV_FUZZ_CHECK(qos <= 2 && !filter.empty());
    mqtt::subscribe_packet again;
    PROV_FUZZ_CHECK(mqtt::parse_subscribe(reread(mqtt::encode_subscribe(s)), again).empty());
    PROV_FUZZ_CHECK(again.packet_id == s.packet_id && again.filters == s.filters);
    return;
  }
  case mqtt::packet_type::unsubscribe: {
    mqtt::subscribe_packet s;
    (void)mqtt::parse_unsubscribe(f, s);
    return;
  }
  case mqtt::packet_type::puback: {
    uint16_t id = 0;
    if (mqtt::parse_puback(f, id).empty())
      PROV_FUZZ_CHECK(mqtt::encode_puback(id).substr(2) == body);
    return;
  }
  default: return;
  }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto in = prov::fuzz::text_of(data, size);
  auto whole = read_all(in, 0);
  for (std::size_t step : {1u, 5u, 13u}) {
    auto pieces = read_all(in, step);
    PROV_FUZZ_CHECK(pieces.packets == whole.packets);
    PROV_FUZZ_CHECK(pieces.last == whole.last);
  }
  for (const auto& [first, body] : whole.packets)
    parse_one(first, body);
  return 0;
}
