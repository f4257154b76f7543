#pragma once
// Writing JSON text by hand, for the few documents built on every request
// (poll answers, assignment events, log lines) where a nlohmann::json tree
// (a std::map node per field, then a serializer pass) cost several times more
// than the rest of the request. Output is compact, UTF-8 passes through,
// control characters are escaped, invalid UTF-8 is replaced.

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace prov::json_text {

/// Length of the valid UTF-8 sequence starting at s[i] (2..4), or 0 when the
/// bytes there are not one (overlong forms, surrogates, > U+10FFFF included).
inline std::size_t utf8_sequence(std::string_view s, std::size_t i) {
  auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
  auto cont = [&](std::size_t k) { return i + k < s.size() && (b(k) & 0xC0) == 0x80; };
  unsigned char c = b(0);
  if (c >= 0xC2 && c <= 0xDF)
    return cont(1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (!cont(1) || !cont(2))
      return 0;
    if ((c == 0xE0 && b(1) < 0xA0) || (c == 0xED && b(1) > 0x9F))
      return 0; // overlong, or a UTF-16 surrogate
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (!cont(1) || !cont(2) || !cont(3))
      return 0;
    if ((c == 0xF0 && b(1) < 0x90) || (c == 0xF4 && b(1) > 0x8F))
      return 0; // overlong, or above U+10FFFF
    return 4;
  }
  return 0;
}

namespace detail {

/// Bytes written verbatim: printable ASCII except '"' and '\\'. A table
/// lookup per byte instead of four comparisons (a CloudEvent, a poll answer
/// and a log line per device go through here).
struct plain_ascii_table {
  bool v[256] = {};
  constexpr plain_ascii_table() {
    for (int c = 0x20; c < 0x80; ++c)
      v[c] = c != '"' && c != '\\';
  }
};
inline constexpr plain_ascii_table plain_ascii{};

/// The end of the run of plain bytes starting at i. Most text (ids, hub
/// names, timestamps) is all plain: with SSE2 (every x86-64) 16 bytes are
/// checked per step, the table finishes the tail.
inline std::size_t plain_run_end(const char* p, std::size_t i, std::size_t size) {
#if defined(__SSE2__)
  const __m128i quote = _mm_set1_epi8('"');
  const __m128i backslash = _mm_set1_epi8('\\');
  const __m128i space = _mm_set1_epi8(0x20);
  for (; i + 16 <= size; i += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i));
    // Signed compare: bytes >= 0x80 are negative, so "< 0x20" catches them
    // along with the control characters.
    const __m128i stop = _mm_or_si128(_mm_cmplt_epi8(v, space),
                                      _mm_or_si128(_mm_cmpeq_epi8(v, quote),
                                                   _mm_cmpeq_epi8(v, backslash)));
    if (const int mask = _mm_movemask_epi8(stop))
      return i + static_cast<std::size_t>(__builtin_ctz(static_cast<unsigned>(mask)));
  }
#endif
  while (i < size && plain_ascii.v[static_cast<unsigned char>(p[i])])
    ++i;
  return i;
}

/// The one escaping loop behind append_string and append_string_as_dump.
/// `as_dump`: nlohmann dump()'s rules (\b and \f short escapes; invalid
/// UTF-8 is an error, returned as false). Otherwise invalid UTF-8 becomes
/// U+FFFD and \b \f are written as \u00xx.
template <bool as_dump>
bool append_escaped(std::string& out, std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  out.push_back('"');
  std::size_t run = 0; // start of the pending run of bytes copied verbatim
  std::size_t i = 0;
  const std::size_t size = s.size();
  while (i < size) {
    i = plain_run_end(s.data(), i, size);
    if (i == size)
      break;
    auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      if (auto n = utf8_sequence(s, i)) {
        i += n;
        continue;
      }
      if (as_dump)
        return false;
      out.append(s.data() + run, i - run);
      out.append("\\ufffd");
      run = ++i;
      continue;
    }
    out.append(s.data() + run, i - run);
    run = ++i;
    switch (c) {
      case '"': out.append("\\\""); break;
      case '\\': out.append("\\\\"); break;
      case '\n': out.append("\\n"); break;
      case '\r': out.append("\\r"); break;
      case '\t': out.append("\\t"); break;
      default:
        if (as_dump && c == '\b') {
          out.append("\\b");
        } else if (as_dump && c == '\f') {
          out.append("\\f");
        } else {
          out.append("\\u00");
          out.push_back(hex[c >> 4]);
          out.push_back(hex[c & 15]);
        }
    }
  }
  out.append(s.data() + run, s.size() - run);
  out.push_back('"');
  return true;
}

} // namespace detail

/// Appends `s` as a JSON string literal, quotes included. Control characters
/// are escaped; bytes that are not valid UTF-8 become U+FFFD, so the output
/// is always valid JSON (RFC 8259) whatever a client put in a path.
inline void append_string(std::string& out, std::string_view s) {
  detail::append_escaped<false>(out, s);
}

/// Appends `s` as a JSON string literal byte for byte as nlohmann's dump()
/// (default settings) writes it, for text that must equal a DOM's dump: the
/// short escapes \b \t \n \f \r \" \\, other control characters as \u00xx,
/// everything else (UTF-8, DEL, '/') verbatim. Returns false when `s` is not
/// valid UTF-8 (where dump() throws); `out` then holds a partial literal.
[[nodiscard]] inline bool append_string_as_dump(std::string& out, std::string_view s) {
  return detail::append_escaped<true>(out, s);
}

/// Appends `"key":`, preceded by a comma when `comma`. The key is a trusted
/// literal (not escaped).
inline void append_key(std::string& out, bool comma, std::string_view key) {
  if (comma)
    out.push_back(',');
  out.push_back('"');
  out.append(key);
  out.append("\":");
}

/// Appends `"key":"value"`, preceded by a comma when `comma`. The key is a
/// trusted literal (not escaped); the value is escaped as by append_string.
/// When nothing needs escaping (ids, hub names, timestamps) it is one append:
/// per member of a small document, short appends cost more than the bytes.
inline void append_member(std::string& out, bool comma, std::string_view key,
                          std::string_view value) {
  char buf[160];
  if (key.size() + value.size() + 6 <= sizeof buf
      && detail::plain_run_end(value.data(), 0, value.size()) == value.size()) {
    char* p = buf;
    if (comma)
      *p++ = ',';
    *p++ = '"';
    if (!key.empty()) // (memcpy from a null data() is undefined even for 0 bytes)
      std::memcpy(p, key.data(), key.size());
    p += key.size();
    *p++ = '"';
    *p++ = ':';
    *p++ = '"';
    if (!value.empty())
      std::memcpy(p, value.data(), value.size());
    p += value.size();
    *p++ = '"';
    out.append(buf, static_cast<std::size_t>(p - buf));
    return;
  }
  append_key(out, comma, key);
  append_string(out, value);
}

/// An object being written: `{"a":1,"b":"x"}`. Keys are trusted literals.
class object {
public:
  explicit object(std::string& out) : out_(out) { out_.push_back('{'); }
  object& str(std::string_view key, std::string_view value) {
    append_member(out_, !first_, key, value);
    first_ = false;
    return *this;
  }
  object& num(std::string_view key, int64_t value) {
    this->key(key);
    out_.append(std::to_string(value));
    return *this;
  }
  object& boolean(std::string_view key, bool value) {
    this->key(key);
    out_.append(value ? "true" : "false");
    return *this;
  }
  /// `value` must already be valid JSON text.
  object& raw(std::string_view key, std::string_view value) {
    this->key(key);
    out_.append(value);
    return *this;
  }
  /// `members` must already be valid JSON object members (`"a":1,"b":2`,
  /// without braces): another object's contents spliced into this one.
  object& raw_members(std::string_view members) {
    if (!first_)
      out_.push_back(',');
    out_.append(members);
    first_ = false;
    return *this;
  }
  /// Starts a nested value: write it, then continue with this object.
  std::string& nested(std::string_view key) {
    this->key(key);
    return out_;
  }
  void close() { out_.push_back('}'); }

private:
  void key(std::string_view k) {
    append_key(out_, !first_, k);
    first_ = false;
  }
  std::string& out_;
  bool first_ = true;
};

} // namespace prov::json_text
