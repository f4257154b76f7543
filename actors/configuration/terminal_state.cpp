#include "actors/configuration/terminal_state.hpp"

#include "actors/enrollment/enrollment_model.hpp"

namespace prov::configuration {

void mark_disabled(registration_event& ev) {
  ev.status = registration_status::disabled;
  ev.error_code = static_cast<int32_t>(error_code::unauthorized_signature);
  ev.error_message = "the enrollment is disabled";
}

registration_state state_from_completed(const registration_event& ev) {
  registration_state s;
  s.registration_id = ev.registration_id;
  s.created_ms = ev.accepted_ms;
  s.updated_ms = ev.completed_ms ? ev.completed_ms : ev.accepted_ms;
  s.status = ev.status;
  s.attestation_type = ev.attestation_type;
  s.enrollment_group_id = ev.enrollment_group_id;
  s.x509_json = ev.x509_json;
  s.key_used = ev.key_used;
  s.last_operation_id = ev.operation_id;
  s.etag = enrollment::etag_for(ev.operation_id);
  if (ev.status == registration_status::assigned) {
    s.assigned_hub = ev.assigned_hub;
    s.device_id = ev.device_id;
    s.substatus = ev.substatus;
    s.payload_json = ev.returned_payload_json;
    s.allocation_json = ev.allocation_json;
    s.issued_chain = ev.issued_chain;
  } else {
    s.error_code = ev.error_code;
    s.error_message = ev.error_message;
  }
  return s;
}

bool failure_replaces(const std::optional<std::string>& stored) {
  registration_state prev;
  return !stored || decode_record(*stored, prev) || prev.status != registration_status::assigned;
}

} // namespace prov::configuration
