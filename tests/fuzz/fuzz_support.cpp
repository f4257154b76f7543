#include "tests/fuzz/fuzz_support.hpp"

#include <cstdio>
#include <cstdlib>

namespace prov::fuzz {

void violated(const char* what) {
  std::fprintf(stderr, "fuzz harness check failed: %s\n", what);
  std::abort();
}

} // namespace prov::fuzz
