// The Authorization header of both APIs: the SAS token parser, then the
// checks that run on a parsed token (expiry, resource, signature).

#include "actors/attestation/sas_token.hpp"
#include "tests/fuzz/fuzz_support.hpp"

namespace at = prov::attestation;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  at::sas_token tok;
  if (at::parse_sas(prov::fuzz::text_of(data, size), tok))
    return 0;
  PROV_FUZZ_CHECK(tok.expiry >= 0);
  PROV_FUZZ_CHECK(!tok.sig_bytes || tok.sig_bytes->size() == 32);
  at::sas_limits limits;
  limits.now = 1'700'000'000;
  (void)at::check_expiry(tok, limits);
  (void)at::device_resource_matches(tok, "0ne00000001", "fuzz-device");
  (void)at::service_resource_matches(tok, "localhost");
  // A 32-byte key, base64.
  (void)at::signature_matches(tok, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
  (void)at::signature_matches_raw(tok, "0123456789abcdef0123456789abcdef");
  (void)at::verify_sas(tok, "not base64 !", limits);
  return 0;
}
