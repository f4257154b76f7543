#pragma once
// Runs the product binary's CLI the way a user does, from a test.

#include <cstdio>
#include <cstdlib>
#include <string>

namespace prov::test {

/// Runs `$PROVISIOND_BIN <args>` with stderr merged into stdout; returns the
/// output. `rc` is pclose()'s raw status (-1 when the command did not start),
/// so `rc == 0` means exit status 0.
inline std::string run_cli(const std::string& args, int& rc) {
  const char* bin = std::getenv("PROVISIOND_BIN");
  std::string out;
  rc = -1;
  if (bin == nullptr)
    return "PROVISIOND_BIN is not set";
  const std::string cmd = std::string(bin) + " " + args + " 2>&1";
  if (std::FILE* f = ::popen(cmd.c_str(), "r")) {
    char buf[4096];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0)
      out.append(buf, n);
    rc = ::pclose(f);
  }
  return out;
}

} // namespace prov::test
