// MQTT over WebSocket's framing (net/websocket): a client's bytes read as
// the server reads them, frame after frame, with the reader's state kept
// between frames. Checks: a frame read at once and the same bytes read in
// pieces give the same frames and the same verdict; every frame read obeys
// the rules (payload within the limit, control frames final and short);
// a frame re-encoded by the client encoder reads back the same. The same
// bytes also go through the upgrade request's checks, as header lines.

#include <string>
#include <utility>
#include <vector>

#include "net/websocket.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace {

using namespace prov;

struct outcome {
  std::vector<std::pair<uint8_t, std::string>> frames;
  ws::read_status last = ws::read_status::need_more;
  ws::close_code code = ws::close_code::normal;
};

/// Reads every frame of `in`, given `step` bytes at a time (0 = all at once).
outcome read_all(std::string_view in, std::size_t step) {
  outcome o;
  ws::limits lim;
  lim.max_payload = 4096;
  ws::reader_state st;
  std::string buf;
  std::size_t fed = 0;
  for (;;) {
    const std::size_t n = step == 0 ? in.size() - fed : std::min(step, in.size() - fed);
    buf.append(in.data() + fed, n);
    fed += n;
    for (;;) {
      ws::frame f;
      std::size_t consumed = 0;
      std::string why;
      auto r = ws::read_frame(buf, lim, st, f, consumed, o.code, why);
      o.last = r;
      if (r == ws::read_status::error) {
        PROV_FUZZ_CHECK(!why.empty());
        return o;
      }
      if (r == ws::read_status::need_more)
        break;
      PROV_FUZZ_CHECK(consumed > 0 && consumed <= buf.size());
      PROV_FUZZ_CHECK(f.payload.size() <= lim.max_payload);
      const bool control = (static_cast<uint8_t>(f.op) & 0x08) != 0;
      PROV_FUZZ_CHECK(!control || (f.fin && f.payload.size() <= 125));
      PROV_FUZZ_CHECK(f.op != ws::opcode::text);
      // The client encoder's frame reads back the same (fresh state for a
      // continuation: it needs a message under way).
      ws::reader_state again_st;
      again_st.in_message = f.op == ws::opcode::continuation;
      auto wire = ws::encode_client_frame(f.op, f.payload, 0x5A17C3E1u, f.fin);
      ws::frame g;
      std::size_t used = 0;
      ws::close_code c2{};
      std::string why2;
      PROV_FUZZ_CHECK(ws::read_frame(wire, lim, again_st, g, used, c2, why2)
                      == ws::read_status::ok);
      PROV_FUZZ_CHECK(used == wire.size() && g.payload == f.payload && g.op == f.op
                      && g.fin == f.fin);
      o.frames.emplace_back(static_cast<uint8_t>(f.op), std::move(f.payload));
      buf.erase(0, consumed);
    }
    if (fed == in.size())
      return o;
  }
}

void upgrade_of(std::string_view in) {
  std::vector<std::pair<std::string, std::string>> headers;
  std::size_t pos = 0;
  while (pos < in.size() && headers.size() < 32) {
    auto nl = in.find('\n', pos);
    auto line = in.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos);
    pos = nl == std::string_view::npos ? in.size() : nl + 1;
    auto colon = line.find(':');
    if (colon == std::string_view::npos)
      continue;
    headers.emplace_back(std::string(line.substr(0, colon)), std::string(line.substr(colon + 1)));
  }
  (void)ws::is_upgrade(11, "/", headers);
  auto v = ws::check_upgrade("GET", 11, ws::mqtt_path, headers);
  if (v.status == 101) {
    PROV_FUZZ_CHECK(v.accept_key.size() == 28);
    PROV_FUZZ_CHECK(v.subprotocol == "mqtt");
    auto resp = ws::switching_protocols_response(v);
    PROV_FUZZ_CHECK(resp.find("\r\n\r\n") == resp.size() - 4);
  } else {
    PROV_FUZZ_CHECK(!v.why.empty());
  }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto in = prov::fuzz::text_of(data, size);
  auto whole = read_all(in, 0);
  for (std::size_t step : {1u, 3u, 7u}) {
    auto pieces = read_all(in, step);
    PROV_FUZZ_CHECK(pieces.frames == whole.frames);
    PROV_FUZZ_CHECK(pieces.last == whole.last);
    PROV_FUZZ_CHECK(whole.last != ws::read_status::error || pieces.code == whole.code);
  }
  upgrade_of(in);
  return 0;
}
