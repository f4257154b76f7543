#pragma once
// The records of a finished operation, built one way wherever an outcome is
// settled: the registration actor (embedded failures), the completed reader
// (Kafka), the attestation stage (disabled enrollments of direct publishers).

#include <optional>
#include <string>

#include "messages/registration.hpp"

namespace prov::configuration {

/// Marks `ev` terminal because its enrollment is disabled: DPS answers the
/// device with status "disabled" and 401002.
void mark_disabled(registration_event& ev);

/// The registration record shown for an operation that finished with `ev`
/// (assigned, failed or disabled). Its etag is a function of the operation
/// id, so every instance and every replay shows the same record.
registration_state state_from_completed(const registration_event& ev);

/// Whether a failed or disabled operation's record replaces the device's
/// stored one (`stored`: its encoded record, if any): not when that holds an
/// assignment, which a failed re-registration does not erase.
bool failure_replaces(const std::optional<std::string>& stored);

} // namespace prov::configuration
