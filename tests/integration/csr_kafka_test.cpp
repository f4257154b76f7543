// Certificate issuance over Kafka with split roles: a gateway without any
// CA key, and a worker (attestation, allocation, configuration, stages not
// fused so the csr travels on registration.allocated) holding
// [[issuing_cas]]. The issued chain verifies and works as the device's X.509
// credential through the gateway; a refused CSR fails with its message.

#include <doctest/doctest.h>

#include <sys/stat.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "messages/crypto.hpp"
#include "tests/support/it_common.hpp"
#include "tests/support/kafka_it.hpp"
#include "tests/support/server_process.hpp"
#include "tests/support/test_certs.hpp"
#include "tests/support/test_csr.hpp"
#include "tests/support/x509_client.hpp"

using namespace prov;
using nlohmann::json;
using test::test_cert;

namespace {

std::string with_scope(const std::string& cfg) { return "id_scope = \"0ne0022CC44\"\n" + cfg; }

json register_with(net::https_client& c, const test::server_process& s, const std::string& id,
                   const json& body, const std::string& key = {}) {
  net::http_headers h;
  if (!key.empty())
    h.add("Authorization", s.device_auth(id, key));
  h.add("Content-Type", "application/json");
  const std::string base = "/" + s.id_scope() + "/registrations/" + id;
  net::https_response resp;
  auto err = c.request("PUT", base + "/register?api-version=2025-07-01-preview", h, body.dump(),
                       resp);
  REQUIRE_MESSAGE(!err, err.message);
  REQUIRE_MESSAGE((resp.status == 200 || resp.status == 202), resp.body);
  json j = test::parse_json(resp.body);
  for (int i = 0; i < 600 && j.value("status", "") == "assigning"; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    net::http_headers ph;
    if (!key.empty())
      ph.add("Authorization", s.device_auth(id, key));
    err = c.request("GET", base + "/operations/" + j["operationId"].get<std::string>() +
                             "?api-version=2025-07-01-preview",
                    ph, {}, resp);
    REQUIRE_MESSAGE(!err, err.message);
    if (resp.status == 404) // the outcome has not reached this gateway's table yet
      continue;
    j = test::parse_json(resp.body);
  }
  return j;
}

} // namespace

TEST_CASE("over Kafka, split roles: the configuration worker issues; the certificate then "
          "attests") {
  test::kafka_fixture fx;
  fx.fuse_stages = false;
  test::server_process gateway;
  // The gateway's config lists the CA as the workers' does, but this host
  // has no key file: only the configuration role needs (and checks) it.
  const std::string absent_ca = "[[issuing_cas]]\nname = \"fleet\"\nkey_file = "
                                "\"/nonexistent/kafka-issuing.key\"\ncertificate_file = "
                                "\"/nonexistent/kafka-issuing.pem\"\n";
  REQUIRE_MESSAGE(!gateway.start(test::with_device_api(with_scope(fx.server_config()) + absent_ca,
                                                       "register_wait_ms = 5000"),
                                 fx.dir, {"--roles", "gateway,registration"}),
                  gateway.log());
  auto root = test::make_ca("CSR Kafka Root", nullptr, 1);
  auto issuing = test::make_ca("CSR Kafka Issuing CA", &root, 2);
  auto key_file = test::write_file(test::cert_dir(), "kafka-issuing.key", issuing.key_pem());
  REQUIRE(::chmod(key_file.c_str(), 0600) == 0);
  auto chain_file =
    test::write_file(test::cert_dir(), "kafka-issuing.pem", issuing.pem() + root.pem());
  auto worker_dir = test::make_temp_dir("provisiond-csr-worker");
  test::server_process worker;
  worker.remove_data_dir_at_exit();
  REQUIRE_MESSAGE(!worker.start(with_scope(fx.server_config(worker_dir)) +
                                  "[[issuing_cas]]\nname = \"fleet\"\nkey_file = \"" + key_file +
                                  "\"\ncertificate_file = \"" + chain_file +
                                  "\"\nvalidity_hours = 2\n",
                                worker_dir, {"--roles", "attestation,allocation,configuration"}),
                  worker.log());

  const std::string sk = crypto::generate_key();
  json group{{"enrollmentGroupId", "kafka-onboard"},
             {"attestation",
              {{"type", "symmetricKey"},
               {"symmetricKey", {{"primaryKey", sk}, {"secondaryKey", sk}}}}},
             {"certificatePolicyResourceId", "fleet"}};
  auto r = gateway.service("PUT", "/enrollmentGroups/kafka-onboard", group.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  json x509_group{{"enrollmentGroupId", "kafka-fleet"},
                  {"attestation",
                   {{"type", "x509"},
                    {"x509", {{"signingCertificates",
                               {{"primary", {{"certificate", issuing.pem()}}}}}}}}}};
  r = gateway.service("PUT", "/enrollmentGroups/kafka-fleet", x509_group.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);

  auto c = gateway.client();
  const std::string id = "kafka-csr-1";
  auto dkey = test::new_key("P-384");
  // The worker may still be joining its consumer groups: the first
  // registration waits as long as it takes (polls up to a minute).
  auto op = register_with(c, gateway, id,
                          {{"registrationId", id}, {"csr", test::make_csr(dkey.get(), id)}},
                          *crypto::derive_device_key(sk, id));
  INFO(op.dump());
  REQUIRE(op["status"] == "assigned");
  auto chain = op["registrationState"]["issuedCertificateChain"].get<std::vector<std::string>>();
  REQUIRE(chain.size() == 3);
  CHECK(test::verify_issued_chain(chain, root) == "");

  test_cert issued;
  issued.key = dkey;
  issued.cert = test::parse_der_cert(*crypto::base64_decode(chain[0]));
  auto xc = test::device_client(gateway, issued, {&issuing});
  op = register_with(xc, gateway, id, {{"registrationId", id}});
  CHECK(op["status"] == "assigned");
  CHECK(op["registrationState"]["x509"]["enrollmentGroupId"] == "kafka-fleet");

  // A refused CSR fails the registration with its own message.
  const std::string bad = "kafka-csr-bad";
  op = register_with(c, gateway, bad,
                     {{"registrationId", bad}, {"csr", test::make_csr(dkey.get(), "other")}},
                     *crypto::derive_device_key(sk, bad));
  CHECK(op["status"] == "failed");
  CHECK(op["registrationState"]["errorCode"] == 400011);
  CHECK(op["registrationState"]["errorMessage"] ==
        "csr: subject CN 'other' is not the registration id 'kafka-csr-bad'");
  CHECK_FALSE(op["registrationState"].contains("issuedCertificateChain"));
  CHECK(worker.stop() == 0);
  CHECK(gateway.stop() == 0);
}
