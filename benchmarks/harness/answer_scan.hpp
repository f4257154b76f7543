#pragma once
// Reading a DPS register or operation answer without a JSON DOM. The
// harness shares the cores with the server it measures: building an
// nlohmann::json tree for every answer cost it about 35 k instructions per
// device, a quarter of its own work. Anything the scanner does not
// recognise makes it return false, and the caller falls back to the DOM
// (which also words the error message).

#include <cstdint>
#include <string_view>

namespace bench {

/// The fields the harness reads from an answer. Views into the body.
struct dps_answer {
  std::string_view operation_id; ///< top-level "operationId"
  std::string_view status;       ///< top-level "status"
  std::string_view updated;      ///< registrationState.lastUpdatedDateTimeUtc
};

/// True when `body` is one JSON object (nothing but whitespace after it)
/// whose wanted fields, where present, are strings without escapes. Fields
/// that are absent stay empty. Nested values are skipped, not validated
/// beyond their brackets and strings.
bool scan_answer(std::string_view body, dps_answer& out);

/// "2026-11-26T12:00:00.1410000Z" -> milliseconds since the epoch (UTC);
/// -1 when malformed.
int64_t parse_utc_ms(std::string_view s);

} // namespace bench
