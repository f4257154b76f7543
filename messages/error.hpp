#pragma once
// Errors as values. Every rejection a client sees carries an Azure-shaped
// `errorCode` whose value / 1000 is the HTTP status (401002 -> 401). The enum
// below is that table: values are pinned and never renumbered.

#include <cstdint>
#include <string>
#include <string_view>

namespace prov {

enum class error_code : int32_t {
  ok = 0,
  // 400: the request itself is wrong.
  bad_request = 400000,
  malformed_json = 400001,
  invalid_registration_id = 400002,
  missing_api_version = 400003,
  custom_allocation_required = 400004, // DPS: custom policy without definition
  invalid_enrollment = 400005,
  invalid_query = 400006,
  id_mismatch = 400007,                // body id differs from path id
  invalid_header = 400008,
  custom_allocation_failed = 400207,   // DPS: "Custom allocation failed with status code: 500"
  invalid_certificate = 400009,        // not a usable CA / verification certificate
  invalid_linked_hub = 400010,         // a linked hub the service API cannot store
  invalid_csr = 400011,                // a register's csr: undecodable, bad signature, CN, key
  no_issuance_policy = 400012,         // a csr, but the enrollment names no issuing CA
  no_hub_available = 400208,           // DPS/C SDK: no IoT hub for the enrollment
  no_healthy_hub = 400210,             // candidate hubs exist, but every one failed its health probe
  // 401: authentication.
  unauthorized = 401000,               // missing or malformed credential
  unauthorized_signature = 401002,     // signature, expiry or resource check failed
  // 403: authenticated but not allowed.
  forbidden = 403000,
  // 404
  not_found = 404000,                  // unknown route
  id_scope_not_found = 404001,
  enrollment_not_found = 404201,
  registration_not_found = 404202,
  enrollment_group_not_found = 404203,
  operation_not_found = 404204,
  certificate_not_found = 404205,      // no such CA in the certificate store
  linked_hub_not_found = 404206,       // no such linked hub
  // others
  method_not_allowed = 405000,
  request_timeout = 408000,
  conflict = 409000,
  precondition_failed = 412000,
  payload_too_large = 413000,
  unsupported_media_type = 415000,
  headers_too_large = 431000,
  throttled = 429001,
  internal = 500000,
  storage_failure = 500001,
  issuing_ca_unavailable = 500002,     // the enrollment's issuing CA is not configured here
  not_implemented = 501000,            // a transfer coding other than chunked (RFC 9112 6.1)
  unavailable = 503000,
};

/// HTTP status implied by an Azure error code.
constexpr int http_status(error_code c) noexcept {
  return static_cast<int32_t>(c) / 1000;
}

/// Short machine name for logs and tests (e.g. "unauthorized_signature").
std::string_view to_string(error_code c) noexcept;

/// An error value: a code from the table plus a human message that says what
/// to fix. Never carries secrets.
struct error {
  error_code code = error_code::ok;
  std::string message;

  error() = default;
  error(error_code c, std::string msg) : code(c), message(std::move(msg)) {}

  bool ok() const noexcept { return code == error_code::ok; }
  explicit operator bool() const noexcept { return !ok(); } // true = failed
  int status() const noexcept { return http_status(code); }
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, error& x) {
  return f(x.code, x.message);
}

} // namespace prov
