#include "benchmarks/harness/answer_scan.hpp"

namespace bench {

namespace {

/// A cursor over the body; every step checks the end.
struct cursor {
  const char* p;
  const char* end;

  void ws() {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
      ++p;
  }
  bool eat(char c) {
    ws();
    if (p < end && *p == c) {
      ++p;
      return true;
    }
    return false;
  }

  /// At a '"': the string's raw text; `escaped` tells whether it holds a '\'.
  bool string(std::string_view& out, bool& escaped) {
    if (p >= end || *p != '"')
      return false;
    const char* start = ++p;
    escaped = false;
    while (p < end && *p != '"') {
      if (*p == '\\') {
        escaped = true;
        if (++p >= end)
          return false;
      } else if (static_cast<unsigned char>(*p) < 0x20) {
        return false;
      }
      ++p;
    }
    if (p >= end)
      return false;
    out = std::string_view(start, static_cast<std::size_t>(p - start));
    ++p;
    return true;
  }

  /// Skips one value of any kind. Depth-limited: a hostile answer cannot
  /// exhaust the stack.
  bool skip_value(int depth = 0) {
    ws();
    if (p >= end || depth > 64)
      return false;
    std::string_view s;
    bool esc = false;
    switch (*p) {
    case '"': return string(s, esc);
    case '{': return members([&](std::string_view) { return skip_value(depth + 1); });
    case '[':
      ++p;
      if (eat(']'))
        return true;
      for (;;) {
        if (!skip_value(depth + 1))
          return false;
        if (eat(']'))
          return true;
        if (!eat(','))
          return false;
      }
    default: {
      // A number or a literal: up to the next delimiter.
      const char* start = p;
      while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\t'
             && *p != '\n' && *p != '\r')
        ++p;
      return p > start;
    }
    }
  }

  /// Walks the members of the object at the cursor, calling on(key) with the
  /// cursor at each value; on() must consume the value and return false on
  /// a malformed one.
  template <class On>
  bool members(On on) {
    if (!eat('{'))
      return false;
    if (eat('}'))
      return true;
    for (;;) {
      ws();
      std::string_view key;
      bool esc = false;
      if (!string(key, esc) || !eat(':'))
        return false;
      ws();
      if (!on(esc ? std::string_view{} : key))
        return false;
      if (eat('}'))
        return true;
      if (!eat(','))
        return false;
    }
  }

  /// A string value without escapes into `out`, or any other value skipped
  /// (out unchanged). False on a malformed value or an escaped string.
  bool plain_string_or_skip(std::string_view& out) {
    if (p < end && *p == '"') {
      bool esc = false;
      std::string_view v;
      if (!string(v, esc) || esc)
        return false;
      out = v;
      return true;
    }
    return skip_value();
  }
};

int digits(const char* p, int n) {
  int v = 0;
  for (int i = 0; i < n; ++i) {
    if (p[i] < '0' || p[i] > '9')
      return -1;
    v = v * 10 + (p[i] - '0');
  }
  return v;
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// days_from_civil).
int64_t days_from_civil(int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  const int64_t era = (y >= 0 ? y : y - 399) / 400;
  const auto yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<int64_t>(doe) - 719468;
}

} // namespace

bool scan_answer(std::string_view body, dps_answer& out) {
  out = {};
  cursor c{body.data(), body.data() + body.size()};
  bool ok = c.members([&](std::string_view key) {
    if (key == "operationId")
      return c.plain_string_or_skip(out.operation_id);
    if (key == "status")
      return c.plain_string_or_skip(out.status);
    if (key == "registrationState" && c.p < c.end && *c.p == '{')
      return c.members([&](std::string_view k) {
        if (k == "lastUpdatedDateTimeUtc")
          return c.plain_string_or_skip(out.updated);
        return c.skip_value();
      });
    return c.skip_value();
  });
  c.ws();
  return ok && c.p == c.end;
}

int64_t parse_utc_ms(std::string_view s) {
  // YYYY-MM-DDTHH:MM:SS, then an optional fraction; a zone suffix is not read.
  if (s.size() < 19 || s[4] != '-' || s[7] != '-' || (s[10] != 'T' && s[10] != ' ')
      || s[13] != ':' || s[16] != ':')
    return -1;
  const char* p = s.data();
  int y = digits(p, 4), mo = digits(p + 5, 2), d = digits(p + 8, 2);
  int h = digits(p + 11, 2), mi = digits(p + 14, 2), sec = digits(p + 17, 2);
  if (y < 0 || mo < 1 || mo > 12 || d < 1 || d > 31 || h < 0 || h > 23 || mi < 0 || mi > 59
      || sec < 0 || sec > 60)
    return -1;
  int64_t ms = 0;
  if (s.size() > 19 && s[19] == '.') {
    // Milliseconds: the first three fraction digits, missing ones as 0.
    std::size_t i = 20;
    if (i >= s.size() || s[i] < '0' || s[i] > '9')
      return -1; // "." without a digit
    for (int n = 0; n < 3; ++n, ++i) {
      bool digit = i < s.size() && s[i] >= '0' && s[i] <= '9';
      ms = ms * 10 + (digit ? s[i] - '0' : 0);
      if (!digit)
        i = s.size(); // the fraction ended: the rest are zeros
    }
  }
  int64_t days = days_from_civil(y, static_cast<unsigned>(mo), static_cast<unsigned>(d));
  return ((days * 24 + h) * 60 + mi) * 60000 + int64_t{sec} * 1000 + ms;
}

} // namespace bench
