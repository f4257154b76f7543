#pragma once
// Writing JSON text by hand, for the few documents built on every request
// (poll answers, assignment events, log lines) where a nlohmann::json tree
// (a std::map node per field, then a serializer pass) cost several times more
// than the rest of the request. Output is compact, UTF-8 passes through,
// control characters are escaped.

#include <cstdint>
#include <string>
#include <string_view>

namespace prov::json_text {

/// Appends `s` as a JSON string literal, quotes included.
inline void append_string(std::string& out, std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  out.push_back('"');
  std::size_t run = 0; // start of the pending run of characters needing no escape
  for (std::size_t i = 0; i < s.size(); ++i) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c != '"' && c != '\\')
      continue;
    out.append(s.data() + run, i - run);
    run = i + 1;
    switch (c) {
      case '"': out.append("\\\""); break;
      case '\\': out.append("\\\\"); break;
      case '\n': out.append("\\n"); break;
      case '\r': out.append("\\r"); break;
      case '\t': out.append("\\t"); break;
      default:
        out.append("\\u00");
        out.push_back(hex[c >> 4]);
        out.push_back(hex[c & 15]);
    }
  }
  out.append(s.data() + run, s.size() - run);
  out.push_back('"');
}

/// An object being written: `{"a":1,"b":"x"}`. Keys are trusted literals.
class object {
public:
  explicit object(std::string& out) : out_(out) { out_.push_back('{'); }
  object& str(std::string_view key, std::string_view value) {
    this->key(key);
    append_string(out_, value);
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
  /// Starts a nested value: write it, then continue with this object.
  std::string& nested(std::string_view key) {
    this->key(key);
    return out_;
  }
  void close() { out_.push_back('}'); }

private:
  void key(std::string_view k) {
    if (!first_)
      out_.push_back(',');
    first_ = false;
    out_.push_back('"');
    out_.append(k);
    out_.append("\":");
  }
  std::string& out_;
  bool first_ = true;
};

} // namespace prov::json_text
