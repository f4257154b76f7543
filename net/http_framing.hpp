#pragma once
// The parts of reading an HTTP request that are ours rather than Beast's:
// splitting the target into path and decoded query, and refusing requests
// whose framing a proxy could read differently. Apart from the server so the
// HTTP fuzz harness (tests/fuzz/) runs exactly this code without a socket.

#include <string>
#include <utility>
#include <vector>

#include "net/http_types.hpp"

namespace prov::gateway {

/// Fills `out.path` and `out.query` from `out.target`. Query parameters that
/// do not percent-decode, and empty names, are dropped; the first of a
/// repeated name is kept.
void split_target(http_request& out);

/// What makes a request ambiguous to read, or "" when it is fine. A proxy in
/// front may frame or attribute such a request differently than we do
/// (request smuggling), so it is refused and the connection closed.
/// `headers` are lower-case, in arrival order, duplicates kept; `version` as
/// Beast gives it (10, 11). `unknown_coding`, when given, is set when the
/// reason is a transfer coding this server does not implement before a
/// final chunked (RFC 9112 6.1: 501) rather than faulty framing (400).
std::string framing_ambiguity(const std::vector<std::pair<std::string, std::string>>& headers,
                              unsigned version, bool* unknown_coding = nullptr);

} // namespace prov::gateway
