// Service API (enrollments, groups, registration records, auth) against the
// real provisiond process.

#include <doctest/doctest.h>

#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "actors/attestation/sas_token.hpp"
#include "messages/crypto.hpp"
#include "messages/registration.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/server_process.hpp"
#include "tests/support/test_certs.hpp"

using namespace prov;
using nlohmann::json;

namespace {

test::server_process& srv() { return test::shared_server(); }
json parse(const std::string& text) { return test::parse_json(text); }

void check_error(const net::https_response& r, int status, int code) {
  CHECK_MESSAGE(r.status == status, r.body);
  auto j = parse(r.body);
  CHECK_MESSAGE(j.value("errorCode", 0) == code, r.body);
  CHECK(!j.value("trackingId", "").empty());
  CHECK(!j.value("message", "").empty());
  CHECK(!j.value("timestampUtc", "").empty());
  CHECK(r.headers.get("x-ms-error-code") == std::to_string(code));
}

json sym(const std::string& pk = {}, const std::string& sk = {}) {
  json a{{"type", "symmetricKey"}};
  json keys = json::object();
  if (!pk.empty())
    keys["primaryKey"] = pk;
  if (!sk.empty())
    keys["secondaryKey"] = sk;
  if (!keys.empty())
    a["symmetricKey"] = keys;
  return a;
}

std::string owner_key(const test::server_process& s) {
  std::ifstream in(s.data_dir() + "/identity.json");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse(ss.str()).value("primary_key", "");
}

/// Raw service request with an explicit (possibly absent) Authorization.
net::https_response raw_service(const test::server_process& s, const std::string& method,
                                const std::string& path, const std::string& auth,
                                const std::string& body = {}) {
  auto c = s.client();
  net::http_headers h;
  if (!auth.empty())
    h.add("Authorization", auth);
  if (!body.empty())
    h.add("Content-Type", "application/json");
  net::https_response r;
  auto sep = path.find('?') == std::string::npos ? "?" : "&";
  auto err = c.request(method, path + sep + "api-version=2021-10-01", h, body, r);
  REQUIRE_MESSAGE(!err, err.message);
  return r;
}

json register_group_device(const test::server_process& s, const std::string& group_key,
                           const std::string& id) {
  auto c = s.client();
  int status = 0;
  auto res = test::register_device(c, s, id, *crypto::derive_device_key(group_key, id), status);
  REQUIRE_MESSAGE(status == 200, res.dump());
  REQUIRE_MESSAGE(res.value("status", "") == "assigned", res.dump());
  return res;
}

bool decodes_to(const std::string& b64, std::size_t n) {
  auto raw = crypto::base64_decode(b64);
  return raw && raw->size() == n;
}

} // namespace

TEST_SUITE("service_api") {

TEST_CASE("individual enrollment: PUT, GET, DELETE, GET after delete -> 404201") {
  auto& s = srv();
  auto pk = crypto::generate_key(), sk = crypto::generate_key();
  json body{{"registrationId", "svc-ind-1"},
            {"deviceId", "svc-device-1"},
            {"attestation", sym(pk, sk)},
            {"initialTwin", {{"tags", {{"floor", 3}}}}}};
  auto put = s.service("PUT", "/enrollments/svc-ind-1", body.dump());
  REQUIRE_MESSAGE(put.status == 200, put.body);
  auto doc = parse(put.body);
  CHECK(doc.value("registrationId", "") == "svc-ind-1");
  CHECK(doc.value("deviceId", "") == "svc-device-1");
  CHECK(doc["attestation"].value("type", "") == "symmetricKey");
  CHECK(doc["attestation"]["symmetricKey"] == json::object());
  CHECK(!doc.value("etag", "").empty());
  CHECK(!doc.value("createdDateTimeUtc", "").empty());
  CHECK(!doc.value("lastUpdatedDateTimeUtc", "").empty());
  CHECK(put.body.find(pk) == std::string::npos);

  auto get = s.service("GET", "/enrollments/svc-ind-1");
  REQUIRE_MESSAGE(get.status == 200, get.body);
  auto g = parse(get.body);
  CHECK(g.value("registrationId", "") == "svc-ind-1");
  CHECK(g.value("etag", "") == doc.value("etag", ""));
  CHECK(g["initialTwin"]["tags"]["floor"] == 3);
  CHECK(g["attestation"]["symmetricKey"] == json::object());
  CHECK(get.body.find(pk) == std::string::npos);
  CHECK(get.body.find(sk) == std::string::npos);

  auto mech = s.service("POST", "/enrollments/svc-ind-1/attestationmechanism");
  REQUIRE_MESSAGE(mech.status == 200, mech.body);
  auto m = parse(mech.body);
  CHECK(m.value("type", "") == "symmetricKey");
  CHECK(m["symmetricKey"].value("primaryKey", "") == pk);
  CHECK(m["symmetricKey"].value("secondaryKey", "") == sk);

  auto q = s.service("POST", "/enrollments/query", R"({"query":"SELECT * FROM enrollments"})");
  REQUIRE_MESSAGE(q.status == 200, q.body);
  CHECK(q.body.find(pk) == std::string::npos);

  auto del = s.service("DELETE", "/enrollments/svc-ind-1");
  CHECK_MESSAGE(del.status == 204, del.body);
  CHECK(del.body.empty());
  check_error(s.service("GET", "/enrollments/svc-ind-1"), 404, 404201);
  check_error(s.service("DELETE", "/enrollments/svc-ind-1"), 404, 404201);
  check_error(s.service("POST", "/enrollments/svc-ind-1/attestationmechanism"), 404, 404201);
}

TEST_CASE("enrollment group: PUT, GET, DELETE, GET after delete -> 404203") {
  auto& s = srv();
  auto pk = crypto::generate_key();
  json body{{"enrollmentGroupId", "svc-grp-1"}, {"attestation", sym(pk)}};
  auto put = s.service("PUT", "/enrollmentGroups/svc-grp-1", body.dump());
  REQUIRE_MESSAGE(put.status == 200, put.body);
  auto doc = parse(put.body);
  CHECK(doc.value("enrollmentGroupId", "") == "svc-grp-1");
  CHECK(doc["attestation"]["symmetricKey"] == json::object());

  auto get = s.service("GET", "/enrollmentGroups/svc-grp-1");
  REQUIRE_MESSAGE(get.status == 200, get.body);
  CHECK(parse(get.body).value("etag", "") == doc.value("etag", ""));
  CHECK(get.body.find(pk) == std::string::npos);

  auto mech = s.service("POST", "/enrollmentGroups/svc-grp-1/attestationmechanism");
  REQUIRE_MESSAGE(mech.status == 200, mech.body);
  auto m = parse(mech.body);
  CHECK(m["symmetricKey"].value("primaryKey", "") == pk);
  // Secondary omitted on create: generated.
  CHECK(decodes_to(m["symmetricKey"].value("secondaryKey", ""), 64));

  CHECK(s.service("DELETE", "/enrollmentGroups/svc-grp-1").status == 204);
  check_error(s.service("GET", "/enrollmentGroups/svc-grp-1"), 404, 404203);
  check_error(s.service("DELETE", "/enrollmentGroups/svc-grp-1"), 404, 404203);
}

TEST_CASE("generated keys when omitted: 64 bytes, distinct, only via attestationmechanism") {
  auto& s = srv();
  auto put = s.service("PUT", "/enrollments/svc-genkeys",
                       json{{"attestation", {{"type", "symmetricKey"}}}}.dump());
  REQUIRE_MESSAGE(put.status == 200, put.body);
  CHECK(parse(put.body)["attestation"]["symmetricKey"] == json::object());
  auto m = parse(s.service("POST", "/enrollments/svc-genkeys/attestationmechanism").body);
  auto pk = m["symmetricKey"].value("primaryKey", "");
  auto sk = m["symmetricKey"].value("secondaryKey", "");
  CHECK(decodes_to(pk, 64));
  CHECK(decodes_to(sk, 64));
  CHECK(pk != sk);
  // The generated key really authenticates the device.
  auto c = s.client();
  int status = 0;
  auto res = test::register_device(c, s, "svc-genkeys", pk, status);
  CHECK(status == 200);
  CHECK(res.value("status", "") == "assigned");
  // A replace without keys keeps them.
  auto put2 = s.service("PUT", "/enrollments/svc-genkeys",
                        json{{"attestation", {{"type", "symmetricKey"}}},
                             {"provisioningStatus", "enabled"}}
                          .dump());
  REQUIRE(put2.status == 200);
  auto m2 = parse(s.service("POST", "/enrollments/svc-genkeys/attestationmechanism").body);
  CHECK(m2["symmetricKey"].value("primaryKey", "") == pk);
  CHECK(m2["symmetricKey"].value("secondaryKey", "") == sk);
}

TEST_CASE("symmetric keys left out are generated on every write path") {
  auto& s = srv();
  auto given = crypto::generate_key();
  auto keys_of = [&](const std::string& collection, const std::string& id) {
    auto r = s.service("POST", collection + "/" + id + "/attestationmechanism");
    REQUIRE_MESSAGE(r.status == 200, r.body);
    return parse(r.body)["symmetricKey"];
  };
  auto both_keys = [&](const json& sk) {
    CHECK_MESSAGE(decodes_to(sk.value("primaryKey", ""), 64), sk.dump());
    CHECK_MESSAGE(decodes_to(sk.value("secondaryKey", ""), 64), sk.dump());
    CHECK(sk.value("primaryKey", "") != sk.value("secondaryKey", ""));
  };
  const json shapes[] = {
    json{{"type", "symmetricKey"}},
    json{{"type", "symmetricKey"}, {"symmetricKey", json::object()}},
    json{{"type", "symmetrickey"}, {"symmetricKey", nullptr}},
    json{{"type", "symmetricKey"}, {"symmetricKey", {{"primaryKey", ""}, {"secondaryKey", ""}}}},
  };
  int n = 0;
  for (const auto& att : shapes) {
    CAPTURE(att.dump());
    for (std::string collection : {"/enrollments", "/enrollmentGroups"}) {
      CAPTURE(collection);
      const bool individual = collection == "/enrollments";
      const char* id_name = individual ? "registrationId" : "enrollmentGroupId";
      const char* list = individual ? "enrollments" : "enrollmentGroups";
      auto id = "svc-keygen-" + std::to_string(n++);
      // PUT create.
      REQUIRE(s.service("PUT", collection + "/" + id,
                        json{{"attestation", att}}.dump()).status == 200);
      both_keys(keys_of(collection, id));
      // PUT replace of an x509 document: nothing to keep, both generated.
      static const auto ca = test::make_ca("svc keygen CA");
      auto x509 = json{{"type", "x509"},
                       {"x509", {{individual ? "clientCertificates" : "signingCertificates",
                                  {{"primary", {{"certificate", ca.pem()}}}}}}}};
      REQUIRE(s.service("PUT", collection + "/" + id,
                        json{{"attestation", x509}}.dump()).status == 200);
      REQUIRE(s.service("PUT", collection + "/" + id,
                        json{{"attestation", att}}.dump()).status == 200);
      both_keys(keys_of(collection, id));
      // Bulk create and bulk update (new and existing ids).
      for (std::string mode : {"create", "update"}) {
        auto bid = id + "-" + mode;
        auto r = s.service("POST", collection,
                           json{{"mode", mode},
                                {list, json::array({{{id_name, bid}, {"attestation", att}},
                                                    {{id_name, id}, {"attestation", att}}})}}
                             .dump());
        REQUIRE_MESSAGE(r.status == 200, r.body);
        both_keys(keys_of(collection, bid));
        both_keys(keys_of(collection, id));
      }
    }
  }
  // Only one key given: the other is generated.
  REQUIRE(s.service("PUT", "/enrollmentGroups/svc-keygen-one",
                    json{{"attestation", sym(given)}}.dump()).status == 200);
  auto one = keys_of("/enrollmentGroups", "svc-keygen-one");
  CHECK(one.value("primaryKey", "") == given);
  CHECK(decodes_to(one.value("secondaryKey", ""), 64));
  // A group with generated keys attests its devices.
  auto gk = keys_of("/enrollmentGroups", "svc-keygen-1").value("primaryKey", "");
  register_group_device(s, gk, "svc-keygen-device");
}

TEST_CASE("If-Match: matching etag ok, stale etag 412000, * ok") {
  auto& s = srv();
  json body{{"attestation", sym()}};
  auto first = s.service("PUT", "/enrollments/svc-etag", body.dump());
  REQUIRE(first.status == 200);
  auto etag1 = parse(first.body).value("etag", "");
  REQUIRE(!etag1.empty());

  net::http_headers h;
  h.add("If-Match", etag1);
  auto second = s.service("PUT", "/enrollments/svc-etag", body.dump(), h);
  REQUIRE_MESSAGE(second.status == 200, second.body);
  auto etag2 = parse(second.body).value("etag", "");
  CHECK(etag2 != etag1);

  auto stale = s.service("PUT", "/enrollments/svc-etag", body.dump(), h); // etag1 again
  check_error(stale, 412, 412000);
  CHECK(parse(s.service("GET", "/enrollments/svc-etag").body).value("etag", "") == etag2);

  net::http_headers star;
  star.add("If-Match", "*");
  auto third = s.service("PUT", "/enrollments/svc-etag", body.dump(), star);
  CHECK_MESSAGE(third.status == 200, third.body);
  auto etag3 = parse(third.body).value("etag", "");

  check_error(s.service("DELETE", "/enrollments/svc-etag", {}, h), 412, 412000);
  CHECK(s.service("GET", "/enrollments/svc-etag").status == 200);
  net::http_headers cur;
  cur.add("If-Match", etag3);
  CHECK(s.service("DELETE", "/enrollments/svc-etag", {}, cur).status == 204);
  // If-Match on a missing document fails.
  check_error(s.service("PUT", "/enrollments/svc-etag", body.dump(), star), 412, 412000);
  CHECK(s.service("GET", "/enrollments/svc-etag").status == 404);
}

TEST_CASE("query paging: 25 enrollments, page size 10 -> 3 pages") {
  test::server_process s; // fresh: exactly these 25 enrollments
  REQUIRE_MESSAGE(!s.start(), s.log());
  std::set<std::string> created;
  for (int i = 0; i < 25; ++i) {
    char id[32];
    std::snprintf(id, sizeof id, "page-%02d", i);
    auto r = s.service("PUT", std::string("/enrollments/") + id,
                       json{{"attestation", sym()}}.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
    created.insert(id);
  }
  std::multiset<std::string> seen;
  std::vector<std::size_t> sizes;
  std::string cont;
  for (int page = 0; page < 10; ++page) {
    net::http_headers h;
    h.add("x-ms-max-item-count", "10");
    if (!cont.empty())
      h.add("x-ms-continuation", cont);
    auto r = s.service("POST", "/enrollments/query", R"({"query":"*"})", h);
    REQUIRE_MESSAGE(r.status == 200, r.body);
    CHECK(r.headers.get("x-ms-item-type") == "Enrollment");
    CHECK(r.headers.get("x-ms-max-item-count") == "10");
    auto arr = parse(r.body);
    REQUIRE(arr.is_array());
    sizes.push_back(arr.size());
    for (const auto& d : arr) {
      seen.insert(d.value("registrationId", ""));
      CHECK(d["attestation"]["symmetricKey"] == json::object());
    }
    if (!r.headers.contains("x-ms-continuation"))
      break;
    cont = r.headers.get("x-ms-continuation");
    REQUIRE(!cont.empty());
  }
  CHECK(sizes == std::vector<std::size_t>{10, 10, 5});
  CHECK(seen.size() == 25);
  CHECK(std::set<std::string>(seen.begin(), seen.end()) == created);

  // Invalid page size.
  net::http_headers bad;
  bad.add("x-ms-max-item-count", "0");
  check_error(s.service("POST", "/enrollments/query", R"({"query":"*"})", bad), 400, 400008);

  // A continuation token is one this server could have issued (the last id of
  // a page, as stored: lower case), not any resume key: anything else is a
  // 400, not a silently wrong or empty page.
  for (std::string path : {"/enrollments/query", "/enrollmentGroups/query",
                           "/registrations/some-group/query"})
    for (const std::string& token :
         std::vector<std::string>{"page 05", "page-05!", "-page-05", "page-05:", "PAGE-05",
                                  "Page-05", std::string(129, 'p'), "caf\xc3\xa9", "\xff",
                                  "page-05%00", "page/05"}) {
      CAPTURE(path);
      CAPTURE(token);
      net::http_headers h;
      h.add("x-ms-continuation", token);
      check_error(s.service("POST", path, R"({"query":"*"})", h), 400, 400008);
    }
  // Valid ids are fine, issued or not (a position in id order).
  for (const std::string& token :
       std::vector<std::string>{"page-05", "a", "zzz", "page-05-", std::string(128, 'p')}) {
    CAPTURE(token);
    net::http_headers h;
    h.add("x-ms-continuation", token);
    auto r = s.service("POST", "/enrollments/query", R"({"query":"*"})", h);
    CHECK_MESSAGE(r.status == 200, r.body);
  }
}

TEST_CASE("bulk create, create again (per-item errors), bulk delete") {
  auto& s = srv();
  json items = json::array();
  for (const char* id : {"bulk-1", "bulk-2", "bulk-3"})
    items.push_back({{"registrationId", id}, {"attestation", sym()}});
  auto r1 = s.service("POST", "/enrollments", json{{"mode", "create"}, {"enrollments", items}}.dump());
  REQUIRE_MESSAGE(r1.status == 200, r1.body);
  auto b1 = parse(r1.body);
  CHECK(b1.value("isSuccessful", false) == true);
  CHECK(b1["errors"] == json::array());
  for (const char* id : {"bulk-1", "bulk-2", "bulk-3"})
    CHECK(s.service("GET", std::string("/enrollments/") + id).status == 200);

  auto r2 = s.service("POST", "/enrollments", json{{"mode", "create"}, {"enrollments", items}}.dump());
  REQUIRE_MESSAGE(r2.status == 200, r2.body);
  auto b2 = parse(r2.body);
  CHECK(b2.value("isSuccessful", true) == false);
  REQUIRE(b2["errors"].size() == 3);
  std::set<std::string> ids;
  for (const auto& e : b2["errors"]) {
    ids.insert(e.value("registrationId", ""));
    CHECK(e.value("errorCode", 0) == 409000);
    CHECK(!e.value("errorStatus", "").empty());
  }
  CHECK(ids == std::set<std::string>{"bulk-1", "bulk-2", "bulk-3"});

  json dels = json::array();
  for (const char* id : {"bulk-1", "bulk-2", "bulk-3"})
    dels.push_back({{"registrationId", id}});
  auto r3 = s.service("POST", "/enrollments", json{{"mode", "delete"}, {"enrollments", dels}}.dump());
  REQUIRE_MESSAGE(r3.status == 200, r3.body);
  CHECK(parse(r3.body).value("isSuccessful", false) == true);
  for (const char* id : {"bulk-1", "bulk-2", "bulk-3"})
    check_error(s.service("GET", std::string("/enrollments/") + id), 404, 404201);
}

TEST_CASE("bulk: a repeated id (any case) is an error, the first occurrence is written") {
  auto& s = srv();
  auto k1 = crypto::generate_key(), k2 = crypto::generate_key(), k3 = crypto::generate_key();
  json items = json::array({{{"registrationId", "dupx"}, {"attestation", sym(k1)}},
                            {{"registrationId", "bulk-dup-other"}, {"attestation", sym()}},
                            {{"registrationId", "DUPX"}, {"attestation", sym(k2)}},
                            {{"registrationId", "dupx"}, {"attestation", sym(k3)}}});
  for (std::string mode : {"create", "update"}) {
    CAPTURE(mode);
    auto r = s.service("POST", "/enrollments", json{{"mode", mode}, {"enrollments", items}}.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
    auto b = parse(r.body);
    CHECK(b.value("isSuccessful", true) == false);
    REQUIRE_MESSAGE(b["errors"].size() == 2, r.body);
    // Reported under the spelling each item used, in item order.
    CHECK(b["errors"][0].value("registrationId", "") == "DUPX");
    CHECK(b["errors"][1].value("registrationId", "") == "dupx");
    for (const auto& e : b["errors"]) {
      CHECK(e.value("errorCode", 0) == 400000);
      CHECK(e.value("errorStatus", "").find("more than once") != std::string::npos);
    }
    // The first occurrence is the one stored, spelling and keys.
    auto m = parse(s.service("POST", "/enrollments/dupx/attestationmechanism").body);
    CHECK(m["symmetricKey"].value("primaryKey", "") == k1);
    CHECK(parse(s.service("GET", "/enrollments/DUPX").body).value("registrationId", "") == "dupx");
    CHECK(s.service("GET", "/enrollments/bulk-dup-other").status == 200);
    items[1]["registrationId"] = "bulk-dup-other-2"; // the second round creates it anew
  }
  // Deletes: the repeat is reported, the enrollment deleted once.
  json dels = json::array({{{"registrationId", "dupx"}}, {{"registrationId", "Dupx"}}});
  auto r = s.service("POST", "/enrollments", json{{"mode", "delete"}, {"enrollments", dels}}.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto b = parse(r.body);
  CHECK(b.value("isSuccessful", true) == false);
  REQUIRE(b["errors"].size() == 1);
  CHECK(b["errors"][0].value("registrationId", "") == "Dupx");
  check_error(s.service("GET", "/enrollments/dupx"), 404, 404201);
  // Groups too.
  json groups = json::array({{{"enrollmentGroupId", "bulk-dup-grp"}, {"attestation", sym(k1)}},
                             {{"enrollmentGroupId", "BULK-DUP-GRP"}, {"attestation", sym(k2)}}});
  auto g = s.service("POST", "/enrollmentGroups",
                     json{{"mode", "create"}, {"enrollmentGroups", groups}}.dump());
  REQUIRE_MESSAGE(g.status == 200, g.body);
  auto gb = parse(g.body);
  CHECK(gb.value("isSuccessful", true) == false);
  REQUIRE(gb["errors"].size() == 1);
  CHECK(gb["errors"][0].value("enrollmentGroupId", "") == "BULK-DUP-GRP");
  auto gm = parse(s.service("POST", "/enrollmentGroups/bulk-dup-grp/attestationmechanism").body);
  CHECK(gm["symmetricKey"].value("primaryKey", "") == k1);
}

TEST_CASE("registration records: GET, DELETE (404202 after), group query") {
  auto& s = srv();
  auto gk = crypto::generate_key();
  auto put = s.service("PUT", "/enrollmentGroups/svc-reg-grp",
                       json{{"attestation", sym(gk)}}.dump());
  REQUIRE_MESSAGE(put.status == 200, put.body);
  std::map<std::string, std::string> hub_of;
  for (const char* id : {"svc-reg-a", "svc-reg-b", "svc-reg-c"})
    hub_of[id] = register_group_device(s, gk, id)["registrationState"].value("assignedHub", "");
  // A device outside the group must not show up in the group query.
  auto ipk = crypto::generate_key();
  REQUIRE(s.service("PUT", "/enrollments/svc-reg-solo", json{{"attestation", sym(ipk)}}.dump())
            .status
          == 200);
  {
    auto c = s.client();
    int status = 0;
    auto res = test::register_device(c, s, "svc-reg-solo", ipk, status);
    REQUIRE(res.value("status", "") == "assigned");
  }

  auto get = s.service("GET", "/registrations/svc-reg-a");
  REQUIRE_MESSAGE(get.status == 200, get.body);
  auto st = parse(get.body);
  CHECK(st.value("registrationId", "") == "svc-reg-a");
  CHECK(st.value("status", "") == "assigned");
  CHECK(st.value("assignedHub", "") == hub_of["svc-reg-a"]);
  CHECK(st.value("deviceId", "") == "svc-reg-a");
  CHECK(st.value("substatus", "") == "initialAssignment");
  CHECK(!st.value("etag", "").empty());
  CHECK(!st.value("createdDateTimeUtc", "").empty());
  CHECK(!st.value("lastUpdatedDateTimeUtc", "").empty());

  net::http_headers h;
  h.add("x-ms-max-item-count", "100");
  auto q = s.service("POST", "/registrations/svc-reg-grp/query", R"({"query":"*"})", h);
  REQUIRE_MESSAGE(q.status == 200, q.body);
  CHECK(q.headers.get("x-ms-item-type") == "DeviceRegistration");
  CHECK(!q.headers.contains("x-ms-continuation"));
  std::set<std::string> listed;
  for (const auto& d : parse(q.body)) {
    listed.insert(d.value("registrationId", ""));
    CHECK(d.value("status", "") == "assigned");
  }
  CHECK(listed == std::set<std::string>{"svc-reg-a", "svc-reg-b", "svc-reg-c"});

  CHECK(s.service("DELETE", "/registrations/svc-reg-a").status == 204);
  check_error(s.service("GET", "/registrations/svc-reg-a"), 404, 404202);
  check_error(s.service("DELETE", "/registrations/svc-reg-a"), 404, 404202);
  check_error(s.service("GET", "/registrations/never-registered"), 404, 404202);
  auto q2 = s.service("POST", "/registrations/svc-reg-grp/query", R"({"query":"*"})", h);
  REQUIRE(q2.status == 200);
  CHECK(parse(q2.body).size() == 2);
}

TEST_CASE("registration query body is validated like the enrollment query's") {
  auto& s = srv();
  // Each bad body gets the enrollment query's answer, on both routes.
  for (std::string path : {"/enrollments/query", "/registrations/svc-query-grp/query"}) {
    CAPTURE(path);
    check_error(s.service("POST", path, R"({"query":"*)"), 400, 400001); // truncated
    check_error(s.service("POST", path, R"(["*"])"), 400, 400006);
    check_error(s.service("POST", path, R"({"query":7})"), 400, 400006);
    check_error(s.service("POST", path, R"({"filter":"*"})"), 400, 400006);
    CHECK(s.service("POST", path, R"({"query":"*"})").status == 200);
    CHECK(s.service("POST", path).status == 200); // the body stays optional
  }
}

TEST_CASE("service auth: missing, wrong key, unknown policy, expired") {
  auto& s = srv();
  const std::string path = "/enrollments/svc-auth-probe";
  check_error(raw_service(s, "GET", path, ""), 401, 401000);
  check_error(raw_service(s, "GET", path, s.service_auth({}, crypto::generate_key())), 401,
              401002);
  check_error(raw_service(s, "GET", path, s.service_auth("nosuchpolicy", owner_key(s))), 401,
              401002);
  auto expired = attestation::make_sas("localhost", owner_key(s), now_ms() / 1000 - 3600,
                                       "provisioningserviceowner");
  check_error(raw_service(s, "GET", path, expired), 401, 401002);
  check_error(raw_service(s, "GET", path, "Bearer abc"), 401, 401000);
  // The PUT is not performed without valid auth.
  check_error(raw_service(s, "PUT", path, "", json{{"attestation", sym()}}.dump()), 401, 401000);
  // And the correct owner token works (the probe does not exist).
  check_error(raw_service(s, "GET", path, s.service_auth()), 404, 404201);
}

TEST_CASE("read-only policy: GET allowed, writes 403000") {
  auto dir = test::make_temp_dir("provisiond-it-policy");
  REQUIRE(!dir.empty());
  auto owner = crypto::generate_key(), reader = crypto::generate_key();
  auto cfg = test::default_config(dir)
             + "[[access_policies]]\nname = \"owner\"\nprimary_key = \"" + owner
             + "\"\nrights = [\"ServiceConfig\", \"EnrollmentRead\", \"EnrollmentWrite\", "
               "\"RegistrationStatusRead\", \"RegistrationStatusWrite\"]\n"
               "[[access_policies]]\nname = \"reader\"\nprimary_key = \""
             + reader + "\"\nrights = [\"EnrollmentRead\"]\n";
  {
    test::server_process s;
    auto err = s.start(cfg, dir);
    REQUIRE_MESSAGE(!err, err.message);
    auto as_owner = s.service_auth("owner", owner);
    auto as_reader = s.service_auth("reader", reader);
    auto body = json{{"attestation", sym()}}.dump();
    auto created = raw_service(s, "PUT", "/enrollments/pol-dev-1", as_owner, body);
    REQUIRE_MESSAGE(created.status == 200, created.body);

    auto get = raw_service(s, "GET", "/enrollments/pol-dev-1", as_reader);
    CHECK_MESSAGE(get.status == 200, get.body);
    CHECK(parse(get.body).value("registrationId", "") == "pol-dev-1");

    check_error(raw_service(s, "PUT", "/enrollments/pol-dev-2", as_reader, body), 403, 403000);
    check_error(raw_service(s, "DELETE", "/enrollments/pol-dev-1", as_reader), 403, 403000);
    check_error(raw_service(s, "DELETE", "/registrations/pol-dev-1", as_reader), 403, 403000);
    check_error(raw_service(s, "GET", "/assignments?after=0", as_reader), 403, 403000);
    // The CA store is service configuration: reading it needs ServiceConfig too.
    static const auto ca = test::make_ca("policy test CA");
    check_error(raw_service(s, "PUT", "/certificates/pol-ca", as_reader,
                            json{{"certificate", ca.pem()}}.dump()),
                403, 403000);
    check_error(raw_service(s, "GET", "/certificates", as_reader), 403, 403000);
    auto ca_put = raw_service(s, "PUT", "/certificates/pol-ca", as_owner,
                              json{{"certificate", ca.pem()}}.dump());
    CHECK_MESSAGE(ca_put.status == 200, ca_put.body);
    check_error(raw_service(s, "GET", "/certificates/pol-ca", as_reader), 403, 403000);
    check_error(raw_service(s, "POST", "/certificates/pol-ca/generateVerificationCode",
                            as_reader),
                403, 403000);
    check_error(raw_service(s, "DELETE", "/certificates/pol-ca", as_reader), 403, 403000);
    CHECK(raw_service(s, "GET", "/certificates/pol-ca", as_owner).status == 200);
    // Nothing changed.
    check_error(raw_service(s, "GET", "/enrollments/pol-dev-2", as_owner), 404, 404201);
    CHECK(raw_service(s, "GET", "/enrollments/pol-dev-1", as_owner).status == 200);
    // The generated owner policy does not exist when policies are configured.
    check_error(raw_service(s, "GET", "/enrollments/pol-dev-1", s.service_auth()), 401, 401002);
  }
  test::remove_tree(dir);
}

TEST_CASE("paths are case-insensitive") {
  auto& s = srv();
  auto put = s.service("PUT", "/enrollmentgroups/svc-case-grp",
                       json{{"attestation", sym()}}.dump());
  REQUIRE_MESSAGE(put.status == 200, put.body);
  for (const char* p : {"/enrollmentGroups/svc-case-grp", "/enrollmentgroups/svc-case-grp",
                        "/ENROLLMENTGROUPS/svc-case-grp", "/enrollmentGroups/SVC-CASE-GRP"}) {
    CAPTURE(p);
    auto g = s.service("GET", p);
    CHECK_MESSAGE(g.status == 200, g.body);
    CHECK(parse(g.body).value("enrollmentGroupId", "") == "svc-case-grp");
  }
  CHECK(s.service("POST", "/Enrollmentgroups/svc-case-grp/AttestationMechanism").status == 200);
  CHECK(s.service("DELETE", "/EnrollmentGroups/svc-case-grp").status == 204);
  check_error(s.service("GET", "/enrollmentgroups/svc-case-grp"), 404, 404203);
}

TEST_CASE("persistence: enrollments survive stop + restart") {
  test::server_process s;
  REQUIRE_MESSAGE(!s.start(), s.log());
  auto pk = crypto::generate_key();
  REQUIRE(s.service("PUT", "/enrollments/persist-1",
                    json{{"attestation", sym(pk)}, {"deviceId", "persist-device"}}.dump())
            .status
          == 200);
  REQUIRE(s.service("PUT", "/enrollmentGroups/persist-grp", json{{"attestation", sym()}}.dump())
            .status
          == 200);
  auto etag = parse(s.service("GET", "/enrollments/persist-1").body).value("etag", "");
  auto c = s.client();
  int status = 0;
  auto res = test::register_device(c, s, "persist-1", pk, status);
  REQUIRE(res.value("status", "") == "assigned");
  auto scope = s.id_scope();

  CHECK(s.stop() == 0);
  CHECK(!s.alive());
  auto err = s.restart();
  REQUIRE_MESSAGE(!err, err.message);
  CHECK(s.id_scope() == scope);

  auto g = s.service("GET", "/enrollments/persist-1");
  REQUIRE_MESSAGE(g.status == 200, g.body);
  auto doc = parse(g.body);
  CHECK(doc.value("etag", "") == etag);
  CHECK(doc.value("deviceId", "") == "persist-device");
  CHECK(s.service("GET", "/enrollmentGroups/persist-grp").status == 200);
  auto m = parse(s.service("POST", "/enrollments/persist-1/attestationmechanism").body);
  CHECK(m["symmetricKey"].value("primaryKey", "") == pk);
  auto reg = s.service("GET", "/registrations/persist-1");
  REQUIRE_MESSAGE(reg.status == 200, reg.body);
  CHECK(parse(reg.body).value("assignedHub", "")
        == res["registrationState"].value("assignedHub", ""));
  // The device still authenticates after the restart.
  auto c2 = s.client();
  auto res2 = test::register_device(c2, s, "persist-1", pk, status);
  CHECK(status == 200);
  CHECK(res2.value("status", "") == "assigned");
}

} // TEST_SUITE
