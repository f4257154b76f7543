#pragma once
// ASCII case folding for protocol text (header names, path segments,
// registration ids, hub names). std::tolower is a locale-aware library call
// per byte; these are inline and locale-free, and leave bytes >= 0x80 as
// they are, as std::tolower does in the "C" and UTF-8 locales.

#include <string>
#include <string_view>

namespace prov::ascii {

constexpr char lower(char c) noexcept {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

inline std::string to_lower(std::string_view s) {
  std::string out(s);
  for (char& c : out)
    c = lower(c);
  return out;
}

constexpr bool iequals(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size())
    return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (lower(a[i]) != lower(b[i]))
      return false;
  return true;
}

} // namespace prov::ascii
