#include "net/http_framing.hpp"

#include <optional>
#include <string_view>

#include "messages/ascii.hpp"
#include "messages/crypto.hpp"

namespace prov::gateway {

void split_target(http_request& out) {
  auto q = out.target.find('?');
  out.path = out.target.substr(0, q);
  if (q != std::string::npos) {
    std::string_view qs(out.target);
    qs.remove_prefix(q + 1);
    while (!qs.empty()) {
      auto amp = qs.find('&');
      auto part = qs.substr(0, amp);
      auto eq = part.find('=');
      auto k = crypto::url_decode(part.substr(0, eq));
      auto v = eq == std::string_view::npos ? std::optional<std::string>{""}
                                            : crypto::url_decode(part.substr(eq + 1));
      if (k && v && !k->empty())
        out.query.emplace(*k, *v);
      if (amp == std::string_view::npos)
        break;
      qs.remove_prefix(amp + 1);
    }
  }
}

std::string framing_ambiguity(const std::vector<std::pair<std::string, std::string>>& headers,
                              unsigned version) {
  int hosts = 0, authorizations = 0, encodings = 0;
  std::string codings; // every Transfer-Encoding value, comma-joined
  for (const auto& [name, value] : headers) {
    if (name == "host") {
      ++hosts;
    } else if (name == "authorization") {
      ++authorizations;
    } else if (name == "transfer-encoding") {
      ++encodings;
      if (!codings.empty())
        codings += ", ";
      codings += value;
    }
  }
  if (encodings > 0) {
    // RFC 9112 6.1: only "chunked" is implemented. Beast treats any other
    // coding (gzip, identity, "chunked, gzip") as a body of length 0, so
    // the body would be read as the next request on the connection.
    std::string_view c = codings;
    while (!c.empty() && (c.front() == ' ' || c.front() == '\t'))
      c.remove_prefix(1);
    while (!c.empty() && (c.back() == ' ' || c.back() == '\t'))
      c.remove_suffix(1);
    if (encodings > 1 || !ascii::iequals(c, "chunked"))
      return "Transfer-Encoding '" + codings.substr(0, 64)
             + "' is not supported: only 'chunked' is";
    // RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty
    // framing (a 1.0 proxy would read its body otherwise than Beast does).
    if (version < 11)
      return "Transfer-Encoding in an HTTP/1.0 request";
  }
  // RFC 9112 3.2: HTTP/1.1 requires exactly one Host; two is never valid.
  if (hosts > 1)
    return "more than one Host header";
  if (hosts == 0 && version >= 11)
    return "missing Host header";
  if (authorizations > 1)
    return "more than one Authorization header";
  return {};
}

} // namespace prov::gateway
