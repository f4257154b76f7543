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
                              unsigned version, bool* unknown_coding) {
  if (unknown_coding != nullptr)
    *unknown_coding = false;
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
    // RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty
    // framing (a 1.0 proxy would read its body otherwise than Beast does).
    if (version < 11)
      return "Transfer-Encoding in an HTTP/1.0 request";
    // The codings as one list (several header lines combine, RFC 9110 5.3);
    // empty list elements are allowed and ignored.
    std::vector<std::string_view> list;
    std::string_view rest = codings;
    while (true) {
      auto comma = rest.find(',');
      auto item = rest.substr(0, comma);
      while (!item.empty() && (item.front() == ' ' || item.front() == '\t'))
        item.remove_prefix(1);
      while (!item.empty() && (item.back() == ' ' || item.back() == '\t'))
        item.remove_suffix(1);
      if (!item.empty())
        list.push_back(item);
      if (comma == std::string_view::npos)
        break;
      rest.remove_prefix(comma + 1);
    }
    const std::string shown = "Transfer-Encoding '" + codings.substr(0, 64) + "'";
    // RFC 9112 6.3: chunked not last means the body's length cannot be
    // known: 400 and close. Beast treats such a body as 0 bytes long, so it
    // would be read as the next request on the connection (smuggling).
    if (list.empty() || !ascii::iequals(list.back(), "chunked"))
      return shown + ": 'chunked' is not the final coding, the body's length is unknown";
    std::size_t chunked = 0;
    for (auto c : list)
      chunked += ascii::iequals(c, "chunked") ? 1 : 0;
    // RFC 9112 6.1: a sender must not apply chunked more than once.
    if (chunked > 1)
      return shown + ": 'chunked' applied more than once";
    // Chunked last, preceded by codings this server does not implement
    // (gzip, deflate, ...): RFC 9112 6.1 answers 501; still closed, the
    // body was not understood.
    if (list.size() > 1) {
      if (unknown_coding != nullptr)
        *unknown_coding = true;
      return shown + " is not implemented: only 'chunked' is";
    }
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
