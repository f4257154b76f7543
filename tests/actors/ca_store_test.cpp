// The CA store's pure functions on stored documents: what replication takes
// from dps.enrollments (ca_doc_problem) and that reading a wrong-typed entry
// never throws (resolve_ca, ca_public run on the table reader thread).
#include <doctest/doctest.h>

#include <string>

#include <nlohmann/json.hpp>

#include "actors/enrollment/ca_store.hpp"
#include "messages/crypto.hpp"
#include "tests/support/test_certs.hpp"

using namespace prov;
namespace en = prov::enrollment;
using json = nlohmann::json;

namespace {

json stored_root(const std::string& name = "Root-1") {
  static const auto root = test::make_ca("Unit CA Store Root", nullptr, 11);
  json doc;
  REQUIRE(!en::ca_upload(name, json{{"certificate", root.pem()}}, nullptr, 1000, doc));
  return doc;
}

} // namespace

TEST_CASE("ca_doc_problem: what the store writes passes, every wrong-typed field is refused") {
  auto good = stored_root();
  CHECK(en::ca_doc_problem("root-1", good).empty());
  CHECK_FALSE(en::ca_doc_problem("root-2", good).empty()); // key must match the name
  CHECK_FALSE(en::ca_doc_problem("root-1", json::array()).empty());

  auto with = [&](const char* field, json v) {
    auto d = good;
    d[field] = std::move(v);
    return en::ca_doc_problem("root-1", d);
  };
  CHECK(with("isVerified", "yes").find("isVerified") != std::string::npos);
  CHECK(with("created", "x").find("created") != std::string::npos);
  CHECK(with("updated", 1.5).find("updated") != std::string::npos);
  CHECK(with("expiry", "soon").find("expiry") != std::string::npos);
  CHECK(with("notBefore", json::object()).find("notBefore") != std::string::npos);
  CHECK(with("crls", "abc").find("crls") != std::string::npos);
  CHECK(with("crls", json::array({1})).find("crls") != std::string::npos);
  CHECK(with("subject", 3).find("subject") != std::string::npos);
  CHECK(with("verificationCode", true).find("verificationCode") != std::string::npos);
  CHECK(with("certificate", "%%%").find("certificate") != std::string::npos);
  CHECK(with("certificate", crypto::base64_encode("not der")).find("certificate")
        != std::string::npos);
  CHECK(with("certificate", 7).find("certificate") != std::string::npos);
  CHECK_FALSE(with("name", 7).empty());
  {
    auto d = good;
    d["name"] = "bad/name";
    CHECK_FALSE(en::ca_doc_problem("bad/name", d).empty());
  }
  for (const char* dotted : {".", "..", ".hidden"}) {
    auto d = good;
    d["name"] = dotted;
    CHECK_FALSE(en::ca_doc_problem(dotted, d).empty());
    CHECK_FALSE(en::valid_certificate_name(dotted));
  }
  CHECK(en::valid_certificate_name("a.b_c-1"));
  // Optional fields may be absent; the types count when present.
  auto bare = json{{"name", "Root-1"}, {"certificate", good["certificate"]}};
  CHECK(en::ca_doc_problem("root-1", bare).empty());
  CHECK(with("isVerified", true).empty());
  CHECK(with("crls", json::array({"AAAA"})).empty());
}

TEST_CASE("a wrong-typed stored entry resolves as missing and lists without throwing") {
  auto doc = stored_root();
  doc["isVerified"] = "yes";
  doc["created"] = "x";
  doc["crls"] = 5;
  const std::string text = doc.dump();
  en::ca_reference ref;
  ref.status = en::ca_reference::state::verified;
  CHECK_NOTHROW(en::resolve_ca(&text, ref));
  CHECK(ref.status == en::ca_reference::state::missing);
  CHECK(ref.der.empty());
  json pub;
  CHECK_NOTHROW(pub = en::ca_public(doc));
  CHECK(pub["name"] == "Root-1");
  CHECK(pub["properties"]["isVerified"] == false);
}

TEST_CASE("CA records are ordered by revision; a delete wins a tie; markers are checked") {
  // A write computed from revision 3 carries 4; so does a delete of revision 3.
  CHECK(en::ca_supersedes(4, false, 3));
  CHECK(en::ca_supersedes(4, true, 3));
  CHECK_FALSE(en::ca_supersedes(4, false, 4)); // a write after the delete it raced: skipped
  CHECK(en::ca_supersedes(4, true, 4));        // the delete after the write it raced: applied
  CHECK_FALSE(en::ca_supersedes(3, false, 4)); // a late copy of an older document
  CHECK_FALSE(en::ca_supersedes(3, true, 4));
  // Documents from writers older than revisions replace only each other.
  CHECK(en::ca_supersedes(0, false, 0));
  CHECK_FALSE(en::ca_supersedes(0, false, 2));
  CHECK(en::ca_supersedes(1, false, 0));

  auto marker = en::ca_deleted_marker("Root-1", 5);
  CHECK(en::ca_is_deleted_marker(marker));
  CHECK(en::ca_revision(marker) == 5);
  CHECK(en::ca_doc_problem("root-1", marker).empty());
  CHECK_FALSE(en::ca_doc_problem("root-2", marker).empty());
  auto no_rev = marker;
  no_rev.erase("revision");
  CHECK_FALSE(en::ca_doc_problem("root-1", no_rev).empty());
  auto not_true = marker;
  not_true["deleted"] = false;
  CHECK_FALSE(en::ca_is_deleted_marker(not_true));
  CHECK_FALSE(en::ca_doc_problem("root-1", not_true).empty());
  auto neg = marker;
  neg["revision"] = -1;
  CHECK_FALSE(en::ca_doc_problem("root-1", neg).empty());
  CHECK(en::ca_revision(json::object()) == 0);
  CHECK(en::ca_revision(json{{"revision", "7"}}) == 0);
}
