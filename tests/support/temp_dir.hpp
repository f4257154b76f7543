#pragma once
// A fresh directory under /tmp for one test (a real RocksDB store, say),
// removed with everything in it when the test ends. Unit tests only need
// this header; integration tests have make_temp_dir in server_process.hpp.

#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

namespace prov::test {

struct temp_dir {
  std::string path;
  explicit temp_dir(std::string prefix = "prov_test") {
    std::string tmpl = "/tmp/" + prefix + "_XXXXXX";
    char* p = mkdtemp(tmpl.data());
    REQUIRE(p != nullptr);
    path = p;
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
};

} // namespace prov::test
