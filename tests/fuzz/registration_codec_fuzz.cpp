// Records read back from RocksDB and events read from Kafka (where
// registration.requested may come straight from a device-facing publisher):
// every decoder, and for what decodes, encode then decode again.

#include "messages/registration.hpp"
#include "tests/fuzz/fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto text = prov::fuzz::text_of(data, size);
  if (prov::registration_state s; !prov::decode_record(text, s)) {
    prov::registration_state again;
    PROV_FUZZ_CHECK(!prov::decode_record(prov::encode_record(s), again));
    (void)prov::to_json_text(s);
    (void)prov::operation_status_text("op", s);
  }
  if (prov::operation_record op; !prov::decode_record(text, op)) {
    prov::operation_record again;
    PROV_FUZZ_CHECK(!prov::decode_record(prov::encode_record(op), again));
  }
  if (prov::registration_event ev; !prov::decode_event(text, ev)) {
    prov::registration_event again;
    PROV_FUZZ_CHECK(!prov::decode_event(prov::encode_event(ev), again));
  }
  if (prov::registration_event ev; !prov::decode_requested_event(text, ev)) {
    // The attestation stage names an operation when the publisher did not.
    if (ev.operation_id.empty())
      ev.operation_id = "op";
    prov::registration_event again;
    PROV_FUZZ_CHECK(!prov::decode_event(prov::encode_event(ev), again));
  }
  (void)prov::redact_credentials(text);
  (void)prov::operation_created_ms(text);
  return 0;
}
