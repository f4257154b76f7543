#pragma once
// Transport-neutral HTTP request/response used between the Beast server and
// the routes, so route logic compiles (and is tested) without Beast.

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "messages/credential.hpp"
#include "messages/error.hpp"

namespace prov::gateway {

struct http_request {
  std::string method;  ///< upper case, e.g. "PUT"
  std::string target;  ///< raw request target (path + query)
  std::string path;    ///< target without the query
  std::map<std::string, std::string> query;   ///< decoded query parameters
  /// Lower-case names, in arrival order. A handful per request: a flat
  /// vector is cheaper to fill and to search than a map.
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  std::string client_ip;
  /// The TLS client certificate chain, leaf first (DER and parsed); null
  /// when the client presented none. Shared by the connection's requests.
  std::shared_ptr<const client_chain> client_chain_der;

  const std::string& header(const std::string& lower_name) const {
    static const std::string empty;
    // The last one wins, as a repeated header did with a map.
    for (auto it = headers.rbegin(); it != headers.rend(); ++it)
      if (it->first == lower_name)
        return it->second;
    return empty;
  }
};

struct http_response {
  int status = 200;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;          ///< JSON text ("" for 204)
  bool close = false;        ///< close the connection after sending
  error err;                 ///< error_response(): the error in the body (for logs)
};

using respond_fn = std::function<void(http_response)>;

/// Routes a request; calls `respond` exactly once, from any thread.
class handler {
public:
  virtual ~handler() = default;
  virtual void handle(http_request req, respond_fn respond) = 0;
};

} // namespace prov::gateway
