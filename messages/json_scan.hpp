#pragma once
// Reading JSON text without building a tree, for the stored documents read
// on every registration (an individual enrollment: nlohmann's lexer and DOM
// were a quarter of such a registration's instructions). Strict and
// conservative: whatever it is not sure of (\u escapes, non-ASCII keys,
// invalid UTF-8, nesting deeper than 32) makes it give up, and the caller
// parses with nlohmann instead, which then gives the canonical answer or
// error. It never accepts text that nlohmann rejects.

#include <cstddef>
#include <string>
#include <string_view>

#include "messages/json_text.hpp"

namespace prov::json_scan {

class reader {
public:
  explicit reader(std::string_view text) noexcept : s_(text) {}

  /// The first character of the next value, 0 at the end of the text.
  char peek() noexcept {
    ws();
    return i_ < s_.size() ? s_[i_] : '\0';
  }

  /// Reads an object: on_member(key) is called for each member and must read
  /// or skip its value (returning false gives up). Keys are plain ASCII
  /// without escapes, or the reader gives up.
  template <class F>
  bool object(F&& on_member) {
    return container('{', '}', [&] {
      std::string_view key;
      if (!raw_key(key))
        return false;
      ws();
      if (!take(':'))
        return false;
      return on_member(key);
    });
  }

  /// Reads an array: on_element() is called for each element and must read
  /// or skip it.
  template <class F>
  bool array(F&& on_element) {
    return container('[', ']', on_element);
  }

  bool string(std::string& out) {
    ws();
    if (!take('"'))
      return false;
    out.clear();
    const char* p = s_.data();
    const std::size_t size = s_.size();
    for (;;) {
      std::size_t run = json_text::detail::plain_run_end(p, i_, size);
      out.append(p + i_, run - i_);
      i_ = run;
      if (i_ >= size)
        return false;
      auto c = static_cast<unsigned char>(p[i_]);
      if (c == '"') {
        ++i_;
        return true;
      }
      if (c == '\\') {
        if (i_ + 1 >= size)
          return false;
        char e = unescape(p[i_ + 1]);
        if (e == '\0') // \u or an invalid escape
          return false;
        out.push_back(e);
        i_ += 2;
      } else if (c >= 0x80) {
        std::size_t n = json_text::utf8_sequence(s_, i_);
        if (n == 0)
          return false;
        out.append(p + i_, n);
        i_ += n;
      } else {
        return false; // a control character: not allowed in JSON strings
      }
    }
  }

  bool boolean(bool& out) {
    ws();
    if (literal("true")) {
      out = true;
      return true;
    }
    if (literal("false")) {
      out = false;
      return true;
    }
    return false;
  }

  /// Skips any one value, checking its syntax.
  bool skip() {
    switch (peek()) {
    case '{':
      return object([this](std::string_view) { return skip(); });
    case '[':
      return array([this] { return skip(); });
    case '"':
      return string(scratch_);
    case 't':
      return literal("true");
    case 'f':
      return literal("false");
    case 'n':
      return literal("null");
    default:
      return number();
    }
  }

  /// Skips the value when it is null (which the documents' readers treat as
  /// an absent member).
  bool null() { return peek() == 'n' && literal("null"); }

  /// True when only whitespace is left.
  bool at_end() noexcept { return peek() == '\0' && i_ == s_.size(); }

private:
  static constexpr int max_depth = 32;

  void ws() noexcept {
    while (i_ < s_.size()
           && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t'))
      ++i_;
  }

  bool take(char c) noexcept {
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }

  bool literal(std::string_view word) noexcept {
    if (s_.compare(i_, word.size(), word) != 0)
      return false;
    i_ += word.size();
    return true;
  }

  static char unescape(char c) noexcept {
    switch (c) {
    case '"': return '"';
    case '\\': return '\\';
    case '/': return '/';
    case 'b': return '\b';
    case 'f': return '\f';
    case 'n': return '\n';
    case 'r': return '\r';
    case 't': return '\t';
    default: return '\0';
    }
  }

  bool raw_key(std::string_view& key) noexcept {
    ws();
    if (!take('"'))
      return false;
    std::size_t end = json_text::detail::plain_run_end(s_.data(), i_, s_.size());
    if (end >= s_.size() || s_[end] != '"')
      return false; // an escape, a control or a non-ASCII byte, or the end
    key = s_.substr(i_, end - i_);
    i_ = end + 1;
    return true;
  }

  static bool digit(char c) noexcept { return c >= '0' && c <= '9'; }

  /// JSON's number grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
  /// nlohmann also rejects a number whose value overflows a double (1e400,
  /// 400 digits): gives up unless it is surely below 10^300.
  bool number() noexcept {
    take('-');
    long magnitude = 0; // decimal digits before the point
    if (take('0')) {
      magnitude = 1;
    } else if (i_ < s_.size() && digit(s_[i_])) {
      while (i_ < s_.size() && digit(s_[i_])) {
        ++i_;
        ++magnitude;
      }
    } else {
      return false;
    }
    if (take('.')) {
      if (!(i_ < s_.size() && digit(s_[i_])))
        return false;
      while (i_ < s_.size() && digit(s_[i_]))
        ++i_;
    }
    if (take('e') || take('E')) {
      bool negative = false;
      if (!take('+'))
        negative = take('-');
      if (!(i_ < s_.size() && digit(s_[i_])))
        return false;
      long exponent = 0;
      int digits = 0;
      while (i_ < s_.size() && digit(s_[i_])) {
        exponent = exponent * 10 + (s_[i_] - '0');
        ++i_;
        if (++digits > 4)
          return false;
      }
      magnitude += negative ? -exponent : exponent;
    }
    return magnitude < 300;
  }

  template <class F>
  bool container(char open, char close, F&& each) {
    ws();
    if (!take(open) || ++depth_ > max_depth)
      return false;
    ws();
    if (!take(close)) {
      for (;;) {
        if (!each())
          return false;
        ws();
        if (take(close))
          break;
        if (!take(','))
          return false;
      }
    }
    --depth_;
    return true;
  }

  std::string_view s_;
  std::size_t i_ = 0;
  int depth_ = 0;
  std::string scratch_;
};

} // namespace prov::json_scan
