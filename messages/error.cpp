#include "messages/error.hpp"

namespace prov {

std::string_view to_string(error_code c) noexcept {
  switch (c) {
    case error_code::ok: return "ok";
    case error_code::bad_request: return "bad_request";
    case error_code::malformed_json: return "malformed_json";
    case error_code::invalid_registration_id: return "invalid_registration_id";
    case error_code::missing_api_version: return "missing_api_version";
    case error_code::custom_allocation_required: return "custom_allocation_required";
    case error_code::invalid_enrollment: return "invalid_enrollment";
    case error_code::invalid_query: return "invalid_query";
    case error_code::id_mismatch: return "id_mismatch";
    case error_code::invalid_header: return "invalid_header";
    case error_code::custom_allocation_failed: return "custom_allocation_failed";
    case error_code::no_hub_available: return "no_hub_available";
    case error_code::no_healthy_hub: return "no_healthy_hub";
    case error_code::invalid_linked_hub: return "invalid_linked_hub";
    case error_code::invalid_csr: return "invalid_csr";
    case error_code::no_issuance_policy: return "no_issuance_policy";
    case error_code::issuing_ca_unavailable: return "issuing_ca_unavailable";
    case error_code::linked_hub_not_found: return "linked_hub_not_found";
    case error_code::unauthorized: return "unauthorized";
    case error_code::unauthorized_signature: return "unauthorized_signature";
    case error_code::forbidden: return "forbidden";
    case error_code::not_found: return "not_found";
    case error_code::id_scope_not_found: return "id_scope_not_found";
    case error_code::enrollment_not_found: return "enrollment_not_found";
    case error_code::registration_not_found: return "registration_not_found";
    case error_code::enrollment_group_not_found: return "enrollment_group_not_found";
    case error_code::certificate_not_found: return "certificate_not_found";
    case error_code::invalid_certificate: return "invalid_certificate";
    case error_code::operation_not_found: return "operation_not_found";
    case error_code::method_not_allowed: return "method_not_allowed";
    case error_code::request_timeout: return "request_timeout";
    case error_code::conflict: return "conflict";
    case error_code::precondition_failed: return "precondition_failed";
    case error_code::payload_too_large: return "payload_too_large";
    case error_code::unsupported_media_type: return "unsupported_media_type";
    case error_code::headers_too_large: return "headers_too_large";
    case error_code::throttled: return "throttled";
    case error_code::internal: return "internal";
    case error_code::storage_failure: return "storage_failure";
    case error_code::not_implemented: return "not_implemented";
    case error_code::unavailable: return "unavailable";
  }
  return "unknown";
}

} // namespace prov
