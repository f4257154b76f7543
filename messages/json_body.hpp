#pragma once
// Parsing a JSON body that came from the network (the device and service
// APIs): nlohmann's parser plus two rules it does not enforce. Nesting is
// bounded (deep nesting is a DoS vector), and a member name may appear only
// once per object: nlohmann keeps the last, so {"a":1,"a":2} would mean one
// thing to us and possibly another to whoever signed, audited or logged it.

#include <string_view>

#include <nlohmann/json_fwd.hpp>

#include "messages/error.hpp"

namespace prov {

/// Nesting of objects and arrays allowed in a body.
inline constexpr int max_json_body_depth = 32;

/// Parses `text` into `out`. Errors are malformed_json and say which rule
/// failed: invalid JSON, nesting deeper than 32, a duplicate member name.
[[nodiscard]] error parse_json_body(std::string_view text, nlohmann::json& out);

} // namespace prov
