#pragma once
// Structured diagnostic logs: one JSON line per device or service operation,
// shaped like Azure DPS's DeviceOperations / ServiceOperations resource logs
// (operationName, resultType, resultSignature, durationMs, masked caller IP,
// correlationId, properties{id,type,protocol}), plus free-form service
// messages. Never pass secrets (keys, signatures, SAS tokens) in here.
// spdlog stays in diagnostic_log.cpp; lines are batched and written by a
// background thread, so request threads never wait for the disk or a slow
// stderr pipe (and never wake a thread per line).

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "messages/error.hpp"

namespace prov::metrics {

/// A text field of an operation_record: a view, so a record costs no copies
/// on every request. It cannot be made from a temporary std::string (say
/// std::to_string(code)), which would be gone before operation() reads it;
/// keep such a string in a local that outlives the call.
struct text_ref : std::string_view {
  constexpr text_ref() noexcept = default;
  constexpr text_ref(const char* s) noexcept : std::string_view(s) {}
  constexpr text_ref(std::string_view s) noexcept : std::string_view(s) {}
  text_ref(const std::string& s) noexcept : std::string_view(s) {}
  text_ref(std::string&&) = delete;
};

/// What operation() writes. Every text field views the caller's strings:
/// fill a record where it is logged, from objects that outlive the call;
/// never return one from a function that views its own arguments.
struct operation_record {
  text_ref category;       ///< "DeviceOperations" or "ServiceOperations"
  text_ref operation;      ///< e.g. "RegistrationRequest", "Upsert"
  int status = 0;          ///< HTTP status (resultSignature)
  text_ref error_code;     ///< Azure errorCode, "" on success
  text_ref description;    ///< error message, "" on success
  double duration_ms = 0;
  text_ref id;             ///< registration / enrollment / group id
  text_ref type;           ///< "Registration", "IndividualEnrollment", ...
  text_ref protocol;       ///< "Http"
  text_ref caller_ip;      ///< unmasked; masked when written
  text_ref correlation_id; ///< the x-ms-request-id we answered with
  text_ref api_version;
};

/// One audit line (docs/operations.md#audit-log): a service API write (or
/// key read, or `provisiond keys rotate`). Owns its strings: written rarely,
/// and must not be easy to misuse. Never put secrets in here.
struct audit_record {
  std::string operation;   ///< "Upsert", "Delete", "BulkOperation", "RotateKeys", ...
  std::string type;        ///< "IndividualEnrollment", "EnrollmentGroup", "Certificate", ...
  std::string id;          ///< the record's id ("" for a bulk operation)
  std::vector<std::string> ids; ///< a bulk operation's ids (the first ones)
  std::size_t ids_total = 0;    ///< how many ids the bulk operation named
  std::string mode;        ///< a bulk operation's mode
  std::string identity;    ///< SAS policy (SharedAccessKeyName) presented, or local user
  bool authenticated = false; ///< whether that identity's signature checked out
  int status = 0;          ///< HTTP status (0: not an HTTP call)
  std::string error_code;  ///< Azure errorCode, "" on success
  std::string description; ///< error message, "" on success
  std::string caller_ip;   ///< unmasked: an audit trail names the address
  std::string correlation_id;
  std::string api_version;
  std::string protocol;    ///< "Http" or "Cli"
};

struct log_options {
  std::string level = "info"; ///< trace, debug, info, warn, error, off
  std::string file;           ///< empty = stderr
};

class diagnostic_log {
public:
  /// Opens the destination. Errors name the file and the reason.
  [[nodiscard]] static prov::error open(const log_options& opts,
                                  std::unique_ptr<diagnostic_log>& out);
  ~diagnostic_log();
  diagnostic_log(const diagnostic_log&) = delete;
  diagnostic_log& operator=(const diagnostic_log&) = delete;

  /// One operation line (level info; warn for 5xx results).
  void operation(const operation_record& r);
  /// One audit line, whatever the level; handed to the writer at once.
  void audit(const audit_record& r);
  /// A service message ("msg" plus optional reason), e.g. startup or a
  /// storage problem.
  void info(std::string_view msg);
  void warn(std::string_view msg);
  void fail(std::string_view msg); ///< error level
  /// Writes out everything queued (tests, shutdown).
  void flush();
  /// Lines dropped because 16 MiB were already waiting for the writer (it
  /// never blocks callers).
  uint64_t dropped() const;

private:
  diagnostic_log() = default;
  struct impl;
  std::unique_ptr<impl> impl_;
};

/// "203.0.113.XXX" for IPv4 (DPS style), the first three groups plus ":XXXX"
/// for IPv6; "" stays "".
std::string mask_ip(std::string_view ip);

/// Appends `s` as a JSON string literal (quotes included) to `out`.
void append_json_string(std::string& out, std::string_view s);

/// Appends `v` with three decimals, as "%.3f" would (to the nearest
/// thousandth; a tie may round the other way), without printf's
/// floating-point machinery: a duration is written on every operation's line.
void append_fixed3(std::string& out, double v);

} // namespace prov::metrics
