#pragma once
// Shared by the fuzz harnesses (tests/fuzz/*_fuzz.cpp). Each harness defines
// LLVMFuzzerTestOneInput; it is linked either with libFuzzer (clang,
// `make fuzz`) or with replay_main.cpp (any compiler: the corpus as a
// regression test in `make test`).

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace prov::fuzz {

inline std::string_view text_of(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

/// A harness's own consistency check failed: abort, which both libFuzzer and
/// the replayer report as a crash with the input that caused it.
[[noreturn]] void violated(const char* what);

} // namespace prov::fuzz

#define PROV_FUZZ_CHECK(cond) \
  do { if (!(cond)) ::prov::fuzz::violated(#cond); } while (0)
