#include "actors/configuration/cloud_event.hpp"

#include "messages/ascii.hpp"
#include "messages/dps_types.hpp"
#include "messages/json_text.hpp"

#include <nlohmann/json.hpp>

namespace prov::configuration {

ce_attributes attributes_of(const registration_event& ev) {
  return {"/provisiond/" + ev.id_scope, ev.operation_id, ev.device_id,
          utc_string(ev.completed_ms)};
}

namespace {

/// The subject and thumbprints of an X509CertificateInfo (registrationState.x509).
void write_thumbprints(json_text::object& o, const nlohmann::json& info) {
  for (const char* k : {"subjectName", "sha1Thumbprint", "sha256Thumbprint"})
    if (auto it = info.find(k); it != info.end() && it->is_string())
      o.str(k, it->get_ref<const std::string&>());
}

/// data.x509 of device.assigned: the device certificate's thumbprints (an
/// individual enrollment's device is a "selfSigned" hub identity: the hub
/// knows it by thumbprint) and, for a group device ("certificateAuthority"
/// on the hub), the CA that admitted it. From the verdict's x509 JSON
/// (attestation::verdict::x509_json); nothing when it does not parse.
void write_x509(json_text::object& data, const std::string& x509_json, bool group) {
  auto j = nlohmann::json::parse(x509_json, nullptr, false);
  if (!j.is_object())
    return;
  auto cert = j.find("certificateInfo");
  if (cert == j.end() || !cert->is_object())
    return;
  json_text::object x(data.nested("x509"));
  x.str("authenticationType", group ? "certificateAuthority" : "selfSigned");
  write_thumbprints(x, *cert);
  if (auto ca = j.find("signingCertificateInfo"); ca != j.end() && ca->is_object()) {
    json_text::object signer(x.nested("signingCertificate"));
    write_thumbprints(signer, *ca);
    signer.close();
  }
  x.close();
}

} // namespace

/// The device.assigned CloudEvent (structured JSON). Written by hand: it is
/// built once per registration and nlohmann's tree + serializer was the
/// largest single cost of this stage (callgrind, docs/performance.md).
std::string assignment_event(const registration_event& ev, const registration_state& rs,
                             uint64_t seq) {
  auto attrs = attributes_of(ev);
  std::string out;
  // X.509: what a hub needs to create the device's identity. From the
  // event, else the record (as `allocation` below).
  const std::string& x509 = ev.x509_json.empty() ? rs.x509_json : ev.x509_json;
  // data.x509 (~300 bytes) is shorter than the certificate info it is
  // written from: room for it.
  out.reserve(640 + ev.initial_twin_json.size() + rs.allocation_json.size()
              + (ev.attestation_type == "x509" ? x509.size() : 0));
  json_text::object ce(out);
  ce.str("specversion", "1.0")
    .str("type", "device.assigned")
    .str("source", attrs.source)
    .str("id", attrs.id)
    .str("subject", attrs.subject)
    .str("time", attrs.time)
    .str("datacontenttype", "application/json");
  if (seq > 0)
    ce.str("sequence", std::to_string(seq)); // CloudEvents extension: a string
  json_text::object data(ce.nested("data"));
  data.str("registrationId", ev.registration_id)
    .str("deviceId", ev.device_id)
    .str("assignedHub", ev.assigned_hub)
    .str("operationId", ev.operation_id)
    .str("attestationType", ev.attestation_type)
    .str("substatus", ev.substatus);
  if (!ev.enrollment_group_id.empty())
    data.str("enrollmentGroupId", ev.enrollment_group_id);
  if (ev.attestation_type == "x509" && !x509.empty())
    write_x509(data, x509, !ev.enrollment_group_id.empty());
  // The enrollment stored the twin as compact, valid JSON text.
  data.raw("initialTwin", ev.initial_twin_json.empty() ? "{}" : ev.initial_twin_json);
  // Why this hub (the allocation stage's JSON object), when it said. From
  // the record: a gateway rebuilding this event from dps.registrations has
  // it there only (the binary operation record's event does not carry it).
  const std::string& why = rs.allocation_json.empty() ? ev.allocation_json : rs.allocation_json;
  if (!why.empty())
    data.raw("allocation", why);
  json_text::object caps(data.nested("capabilities"));
  caps.boolean("iotEdge", ev.iot_edge).close();
  json_text::object ts(data.nested("timestamps"));
  ts.str("accepted", utc_chars(ev.accepted_ms))
    .str("allocated", utc_chars(ev.allocated_ms))
    .str("assigned", utc_chars(ev.completed_ms))
    .str("registrationCreated", utc_chars(rs.created_ms))
    .close();
  data.close();
  ce.close();
  return out;
}

bool moves_hub(const registration_state* prev, const registration_event& ev) {
  return prev != nullptr && prev->status == registration_status::assigned
         && !prev->assigned_hub.empty() && !ev.assigned_hub.empty()
         && !ascii::iequals(prev->assigned_hub, ev.assigned_hub);
}

ce_attributes deprovision_attributes_of(const registration_event& ev,
                                        const registration_state& prev) {
  return {"/provisiond/" + ev.id_scope, ev.operation_id + "/deprovisioned",
          prev.device_id.empty() ? ev.device_id : prev.device_id, utc_string(ev.completed_ms)};
}

namespace {

/// The enrollment's migrateDeviceData when the device moved: allocation
/// writes it in the allocation explanation (records from before it did:
/// what the substatus implies).
bool migrates(const registration_event& ev) {
  auto a = nlohmann::json::parse(ev.allocation_json, nullptr, false);
  if (a.is_object())
    if (auto it = a.find("migrateDeviceData"); it != a.end() && it->is_boolean())
      return it->get<bool>();
  return ev.substatus != to_string(assignment_substatus::device_data_reset);
}

} // namespace

std::string deprovision_event(const registration_event& ev, const registration_state& prev,
                              uint64_t seq) {
  auto attrs = deprovision_attributes_of(ev, prev);
  std::string out;
  out.reserve(512);
  json_text::object ce(out);
  ce.str("specversion", "1.0")
    .str("type", "device.deprovisioned")
    .str("source", attrs.source)
    .str("id", attrs.id)
    .str("subject", attrs.subject)
    .str("time", attrs.time)
    .str("datacontenttype", "application/json");
  if (seq > 0)
    ce.str("sequence", std::to_string(seq));
  json_text::object data(ce.nested("data"));
  data.str("registrationId", ev.registration_id)
    .str("deviceId", attrs.subject)
    .str("hub", prev.assigned_hub)
    .str("reason", "reprovisioned")
    .str("operationId", ev.operation_id)
    .str("newHub", ev.assigned_hub)
    .str("newDeviceId", ev.device_id)
    // deviceDataMigrated: copy the device's twin from `hub` to `newHub`
    // before deleting it; deviceDataReset: the new hub starts from the
    // initial twin of device.assigned; reprovisionedToInitialAssignment
    // (back to an earlier hub): either, as migrateDeviceData says.
    .str("substatus", ev.substatus)
    .boolean("migrateDeviceData", migrates(ev))
    .close();
  ce.close();
  return out;
}

} // namespace prov::configuration
