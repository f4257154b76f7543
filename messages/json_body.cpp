#include "messages/json_body.hpp"

#include <cstddef>

#include <nlohmann/json.hpp>

namespace prov {

using nlohmann::json;

error parse_json_body(std::string_view text, json& out) {
  // Duplicates without a set of names: nlohmann merges a repeated member into
  // one, so an object that ends with fewer members than the keys read in it
  // had a duplicate. One counter per open container.
  std::size_t keys[max_json_body_depth + 1];
  int depth = 0;
  bool too_deep = false;
  bool duplicate = false;
  auto cb = [&](int, json::parse_event_t ev, json& parsed) {
    if (too_deep || duplicate) // the result is discarded anyway
      return false;
    switch (ev) {
    case json::parse_event_t::object_start:
    case json::parse_event_t::array_start:
      if (++depth > max_json_body_depth) {
        too_deep = true;
        return false;
      }
      keys[depth] = 0;
      break;
    case json::parse_event_t::key:
      ++keys[depth];
      break;
    case json::parse_event_t::object_end:
      if (parsed.size() != keys[depth]) {
        duplicate = true;
        return false;
      }
      --depth;
      break;
    case json::parse_event_t::array_end:
      --depth;
      break;
    default:
      break;
    }
    return true;
  };
  out = json::parse(text.begin(), text.end(), cb, false);
  if (too_deep)
    return {error_code::malformed_json,
            "JSON nesting deeper than " + std::to_string(max_json_body_depth) + " levels"};
  if (duplicate)
    return {error_code::malformed_json, "a JSON object has a duplicate member name"};
  if (out.is_discarded())
    return {error_code::malformed_json, "the body is not valid JSON"};
  return {};
}

} // namespace prov
