// The HTTPS server's request path after TLS: bytes as a client sends them,
// fed to Beast's parser with the server's limits in pieces (as reads return
// them), then our part: header names folded, framing ambiguity, target split
// into path and query. Pipelined requests are read one after the other, as
// on a keep-alive connection.

#include <optional>

#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>

#include "net/http_feed.hpp"
#include "net/http_framing.hpp"
#include "messages/ascii.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace http = boost::beast::http;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0)
    return 0;
  // The first byte picks the read size, so the fuzzer explores requests
  // split at every boundary (1..256 bytes per read).
  const std::size_t chunk = std::size_t(data[0]) + 1;
  auto input = prov::fuzz::text_of(data + 1, size - 1);
  boost::beast::flat_buffer in;
  std::optional<http::request_parser<http::string_body>> parser;
  auto fresh = [&] {
    parser.emplace();
    parser->eager(true);
    parser->body_limit(96 * 1024);
    parser->header_limit(16 * 1024);
  };
  fresh();
  int requests = 0;
  while (requests < 16) {
    boost::beast::error_code ec;
    auto r = prov::net::feed(*parser, in, ec);
    if (r == prov::net::feed_result::failed)
      return 0; // the server answers 400 and closes
    if (r == prov::net::feed_result::need_more) {
      if (input.empty())
        return 0;
      auto n = std::min(chunk, input.size());
      auto buf = in.prepare(n);
      std::memcpy(buf.data(), input.data(), n);
      in.commit(n);
      input.remove_prefix(n);
      continue;
    }
    auto req = parser->release();
    prov::gateway::http_request hr;
    hr.method = std::string(req.method_string());
    hr.target = std::string(req.target());
    prov::gateway::split_target(hr);
    PROV_FUZZ_CHECK(hr.path.size() <= hr.target.size());
    for (const auto& f : req) {
      auto n = f.name_string();
      std::string name(n.data(), n.size());
      for (auto& c : name)
        c = prov::ascii::lower(c);
      auto v = f.value();
      hr.headers.emplace_back(std::move(name), std::string(v.data(), v.size()));
    }
    hr.body = std::move(req.body());
    PROV_FUZZ_CHECK(hr.body.size() <= 96 * 1024);
    if (!prov::gateway::framing_ambiguity(hr.headers, req.version()).empty())
      return 0; // refused and closed
    (void)hr.header("authorization");
    if (!req.keep_alive())
      return 0;
    ++requests;
    fresh();
  }
  return 0;
}
