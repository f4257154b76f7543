// A JSON body of either API: the network parser (depth, duplicate members),
// then what the service API does with an enrollment or group body
// (normalize, the typed view, the public document) and what the engine does
// with a stored document's text (view_of_text, whose scanner reads plain
// documents without a tree and must agree with the parser).

#include <nlohmann/json.hpp>

#include "actors/enrollment/enrollment_model.hpp"
#include "messages/json_body.hpp"
#include "tests/fuzz/fuzz_support.hpp"

using nlohmann::json;
namespace en = prov::enrollment;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto text = prov::fuzz::text_of(data, size);
  for (auto k : {en::kind::individual, en::kind::group}) {
    en::enrollment_view stored;
    (void)en::view_of_text(k, text, stored);
  }
  json body;
  if (prov::parse_json_body(text, body))
    return 0;
  if (!body.is_object())
    return 0;
  for (auto k : {en::kind::individual, en::kind::group}) {
    const char* id_member = k == en::kind::individual ? "registrationId" : "enrollmentGroupId";
    std::string path_id = "fuzz-device";
    if (auto it = body.find(id_member); it != body.end() && it->is_string())
      path_id = it->get<std::string>();
    json doc;
    if (en::normalize(k, path_id, body, nullptr, 1'700'000'000'000, doc))
      continue;
    en::enrollment_view v;
    if (en::view_of(k, doc, v))
      continue;
    // What is stored is read back by the text reader: same answer.
    auto stored = doc.dump();
    en::enrollment_view again;
    PROV_FUZZ_CHECK(!en::view_of_text(k, stored, again));
    PROV_FUZZ_CHECK(again.id == v.id && again.enabled == v.enabled
                    && again.device_id == v.device_id && again.iot_hubs == v.iot_hubs
                    && again.attestation == v.attestation);
    (void)en::public_document(doc);
    (void)en::attestation_mechanism(doc);
    json replaced;
    (void)en::normalize(k, path_id, body, &doc, 1'700'000'000'001, replaced);
  }
  return 0;
}
