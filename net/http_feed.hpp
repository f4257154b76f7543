#pragma once
// Feeding a Beast HTTP parser from a buffer of decrypted bytes, for code
// that reads its TLS socket itself (gateway/https_server.cpp and the
// benchmark harness). Include it only from .cpp files: it pulls in Beast.

#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/error.hpp>

namespace prov::net {

enum class feed_result {
  done,      ///< the message is complete
  need_more, ///< read more bytes, then feed again
  failed,    ///< malformed or over a limit: `ec` says which
};

/// Parses what `in` holds. The bytes the parser used are consumed; what
/// follows a complete message (a pipelined request) stays in `in`.
template <class Parser>
feed_result feed(Parser& parser, boost::beast::flat_buffer& in, boost::beast::error_code& ec) {
  ec = {};
  while (in.size() > 0) {
    auto used = parser.put(in.data(), ec);
    in.consume(used);
    if (ec == boost::beast::http::error::need_more) {
      ec = {};
      return feed_result::need_more;
    }
    if (ec)
      return feed_result::failed;
    if (parser.is_done())
      return feed_result::done;
    if (used == 0)
      return feed_result::need_more;
  }
  return feed_result::need_more;
}

} // namespace prov::net
