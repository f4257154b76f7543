// provisiond.toml: the loader (toml++ plus our key checks) and the
// cross-field validation that runs before the server starts.

#include "config/config.hpp"
#include "tests/fuzz/fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  prov::config::engine_config cfg;
  if (prov::config::load_string(prov::fuzz::text_of(data, size), "fuzz.toml", cfg))
    return 0;
  (void)prov::config::validate(cfg);
  return 0;
}
