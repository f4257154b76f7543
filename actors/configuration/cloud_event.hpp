#pragma once
// The device.assigned CloudEvent (CloudEvents 1.0, structured JSON): what the
// outbox stores, GET /assignments serves and dps.device.assigned carries.
// Pure functions of the assigned event and registration record, so any
// instance rebuilds the same bytes (a republish after a crash is a
// byte-identical duplicate).

#include <cstdint>
#include <string>

#include "messages/registration.hpp"

namespace prov::configuration {

/// The context attributes, in the JSON envelope and, on Kafka, repeated as
/// ce_* headers (one source for both).
struct ce_attributes {
  std::string source, id, subject, time;
};

ce_attributes attributes_of(const registration_event& ev);

/// The CloudEvent JSON. `seq` > 0 adds the `sequence` extension (the local
/// outbox position); 0 leaves it out (Kafka records: offsets order them).
std::string assignment_event(const registration_event& ev, const registration_state& rs,
                             uint64_t seq);

/// True when the assignment `ev` moves the device off the hub of its
/// previous assignment `prev` (re-provisioning to another hub).
bool moves_hub(const registration_state* prev, const registration_event& ev);

/// The device.deprovisioned CloudEvent for the hub `prev` leaves because of
/// `ev` (id: the operation id + "/deprovisioned"). `seq` as above.
std::string deprovision_event(const registration_event& ev, const registration_state& prev,
                              uint64_t seq);
/// Its context attributes (type device.deprovisioned).
ce_attributes deprovision_attributes_of(const registration_event& ev,
                                        const registration_state& prev);

} // namespace prov::configuration
