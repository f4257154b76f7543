// enrollment_catalog::write_if_enrollment over a real store: the etag
// compare a TPM challenge write depends on.

#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "actors/enrollment/enrollment_model.hpp"
#include "actors/enrollment_catalog.hpp"
#include "storage/store.hpp"

using namespace prov;

namespace {

struct catalog_dir {
  std::string path;
  catalog_dir() {
    char tmpl[] = "/tmp/prov_catalog_test_XXXXXX";
    char* p = mkdtemp(tmpl);
    REQUIRE(p != nullptr);
    path = p;
  }
  ~catalog_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

/// Whether write_if_enrollment ran its write for `etag`, `doc` stored (or
/// nothing, when empty) as individual enrollment "dev".
bool writes_for(storage::store& s, const std::string& doc, const std::string& etag) {
  const std::string key = enrollment::key_of("dev");
  storage::write_batch b;
  if (doc.empty())
    b.del(storage::cf::enrollments, key);
  else
    b.put(storage::cf::enrollments, key, doc);
  REQUIRE(!s.write(b));
  enrollment_catalog c;
  c.attach(&s);
  bool current = false, ran = false;
  REQUIRE(!c.write_if_enrollment(key, etag, current, [&] {
    ran = true;
    return error{};
  }));
  CHECK(current == ran);
  return ran;
}

} // namespace

TEST_CASE("write_if_enrollment: compares the etag as the register read it") {
  catalog_dir dir;
  std::unique_ptr<storage::store> s;
  storage::store_options o;
  o.sync = false;
  REQUIRE(!storage::store::open(dir.path + "/db", o, s));
  const std::string with = R"({"registrationId":"dev","etag":"e1"})";
  CHECK(writes_for(*s, with, "e1"));
  CHECK_FALSE(writes_for(*s, with, "e2"));
  CHECK_FALSE(writes_for(*s, with, ""));
  // An older writer's document without etag: view_of_text reads "" (every
  // TPM register of it was refused as "deleted or replaced" before).
  const std::string without = R"({"registrationId":"dev"})";
  CHECK(writes_for(*s, without, ""));
  CHECK_FALSE(writes_for(*s, without, "e1"));
  CHECK(writes_for(*s, R"({"registrationId":"dev","etag":null})", ""));
  CHECK_FALSE(writes_for(*s, R"({"registrationId":"dev","etag":7})", ""));
  CHECK_FALSE(writes_for(*s, "", "")); // deleted
  CHECK_FALSE(writes_for(*s, "not json", ""));
}
