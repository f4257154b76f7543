#include <doctest/doctest.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <unistd.h>

#include "config/config.hpp"

using namespace prov;
using namespace prov::config;

namespace {

/// Loads `text` and returns the error message ("" on success).
std::string load_error(const std::string& text, const std::string& origin = "cfg.toml") {
  engine_config cfg;
  const error err = load_string(text, origin, cfg);
  if (err) CHECK(err.code == error_code::bad_request);
  return err.message;
}

// 16 and 32 zero bytes, and 8 bytes (too short), as canonical base64.
const std::string key16 = "AAAAAAAAAAAAAAAAAAAAAA==";
const std::string key32 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const std::string key8 = "AAAAAAAAAAA=";

/// A temporary file removed at scope exit.
struct temp_file {
  std::string path;
  explicit temp_file(const std::string& content) {
    char tmpl[] = "/tmp/provisiond_config_test_XXXXXX";
    const int fd = mkstemp(tmpl);
    REQUIRE(fd >= 0);
    path = tmpl;
    REQUIRE(write(fd, content.data(), content.size()) == static_cast<ssize_t>(content.size()));
    close(fd);
  }
  ~temp_file() { std::remove(path.c_str()); }
};

} // namespace

TEST_CASE("empty text gives the documented defaults") {
  engine_config cfg;
  cfg.data_dir = "junk"; // load starts from defaults, not from `out`
  const error err = load_string("# nothing here\n\n", "empty.toml", cfg);
  REQUIRE_MESSAGE(err.ok(), err.message);
  CHECK(cfg.source_file == "empty.toml");
  CHECK_FALSE(cfg.id_scope.has_value());
  CHECK(cfg.data_dir == "./data");
  CHECK(cfg.device_api.listen == "0.0.0.0:8443");
  CHECK(cfg.device_api.hostnames == std::vector<std::string>{"localhost"});
  CHECK(cfg.device_api.tls_cert.empty());
  CHECK(cfg.device_api.tls_key.empty());
  CHECK(cfg.device_api.retry_after_seconds == 1);
  CHECK(cfg.device_api.register_wait_ms == 250);
  CHECK(cfg.device_api.threads == 0);
  CHECK(cfg.device_api.max_body_bytes == 96 * 1024);
  CHECK(cfg.device_api.request_timeout_seconds == 30);
  CHECK(cfg.device_api.idle_timeout_seconds == 120);
  CHECK(cfg.device_api.max_sas_lifetime_seconds == 365 * 24 * 3600);
  CHECK(cfg.device_api.clock_skew_seconds == 300);
  CHECK(cfg.device_api.max_connections == 0);
  CHECK(cfg.device_api.max_connections_per_client == 0);
  CHECK(cfg.access_policies.empty());
  CHECK(cfg.hubs.empty());
  CHECK(cfg.metrics.listen == "127.0.0.1:9464");
  CHECK(cfg.storage.block_cache_mb == 64);
  CHECK(cfg.log.level == "info");
  CHECK(cfg.log.file.empty());
  CHECK(validate(engine_config{}).ok());
}

TEST_CASE("every key round-trips into the struct") {
  const std::string text = R"(id_scope = "0ne00ABCdef"
data_dir = "/var/lib/provisiond"

[device_api]
listen = "[::1]:9443"
hostnames = ["dps.example.com", "10.0.0.5", "::1"]
tls_cert = "/etc/provisiond/tls.crt"
tls_key = "/etc/provisiond/tls.key"
retry_after_seconds = 3
register_wait_ms = 0
threads = 8
max_body_bytes = 65536
request_timeout_seconds = 10
idle_timeout_seconds = 60
max_sas_lifetime_seconds = 3600
clock_skew_seconds = 0
max_connections = 5000
max_connections_per_client = 10

[[access_policies]]
name = "provisioningserviceowner"
primary_key = ")" + key32 + R"("
secondary_key = ")" + key16 + R"("
rights = ["ServiceConfig", "EnrollmentRead", "EnrollmentWrite",
          "RegistrationStatusRead", "RegistrationStatusWrite"]

[[access_policies]]
name = "reader.v1_x-y"
primary_key = ")" + key16 + R"("
rights = ["EnrollmentRead"]

[[hubs]]
hostname = "hub-a.azure-devices.net"
allocation_weight = 1000
apply_allocation_policy = false
region = "westeurope"

[[hubs]]
hostname = "hub-b.azure-devices.net"

[metrics]
listen = ""

[log]
level = "debug"
file = "/var/log/provisiond.log"
)";
  engine_config cfg;
  const error err = load_string(text, "full.toml", cfg);
  REQUIRE_MESSAGE(err.ok(), err.message);
  CHECK(cfg.source_file == "full.toml");
  REQUIRE(cfg.id_scope.has_value());
  CHECK(*cfg.id_scope == "0ne00ABCdef");
  CHECK(cfg.data_dir == "/var/lib/provisiond");
  const device_api_config& d = cfg.device_api;
  CHECK(d.listen == "[::1]:9443");
  CHECK(d.hostnames == std::vector<std::string>{"dps.example.com", "10.0.0.5", "::1"});
  CHECK(d.tls_cert == "/etc/provisiond/tls.crt");
  CHECK(d.tls_key == "/etc/provisiond/tls.key");
  CHECK(d.retry_after_seconds == 3);
  CHECK(d.register_wait_ms == 0);
  CHECK(d.threads == 8);
  CHECK(d.max_body_bytes == 65536);
  CHECK(d.request_timeout_seconds == 10);
  CHECK(d.idle_timeout_seconds == 60);
  CHECK(d.max_sas_lifetime_seconds == 3600);
  CHECK(d.clock_skew_seconds == 0);
  CHECK(d.max_connections == 5000);
  CHECK(d.max_connections_per_client == 10);
  REQUIRE(cfg.access_policies.size() == 2);
  CHECK(cfg.access_policies[0].name == "provisioningserviceowner");
  CHECK(cfg.access_policies[0].primary_key == key32);
  CHECK(cfg.access_policies[0].secondary_key == key16);
  CHECK(cfg.access_policies[0].rights.size() == 5);
  CHECK(cfg.access_policies[0].rights[3] == "RegistrationStatusRead");
  CHECK(cfg.access_policies[1].name == "reader.v1_x-y");
  CHECK(cfg.access_policies[1].secondary_key.empty());
  CHECK(cfg.access_policies[1].rights == std::vector<std::string>{"EnrollmentRead"});
  REQUIRE(cfg.hubs.size() == 2);
  CHECK(cfg.hubs[0].hostname == "hub-a.azure-devices.net");
  CHECK(cfg.hubs[0].allocation_weight == 1000);
  CHECK(cfg.hubs[0].apply_allocation_policy == false);
  CHECK(cfg.hubs[0].region == "westeurope");
  CHECK(cfg.hubs[1].allocation_weight == 1);
  CHECK(cfg.hubs[1].apply_allocation_policy == true);
  CHECK(cfg.hubs[1].region.empty());
  CHECK(cfg.metrics.listen.empty());
  CHECK(cfg.log.level == "debug");
  CHECK(cfg.log.file == "/var/log/provisiond.log");
  CHECK(validate(cfg).ok());
}

TEST_CASE("unknown keys name file, line and key path") {
  CHECK(load_error("data_dir = \"d\"\n\ndevise_api = 1\n", "x.toml") ==
        "x.toml:3: devise_api: unknown key");
  CHECK(load_error("[device_api]\nlisten = \"0.0.0.0:1\"\nlistne = \"x\"\n") ==
        "cfg.toml:3: device_api.listne: unknown key");
  CHECK(load_error("[[hubs]]\nhostname = \"a.example\"\n\n[[hubs]]\nhostname = \"b.example\"\n"
                   "colour = \"red\"\n") == "cfg.toml:6: hubs[1].colour: unknown key");
  CHECK(load_error("[device_api.tls]\ncert = \"x\"\n") ==
        "cfg.toml:1: device_api.tls: unknown key");
  CHECK(load_error("[log]\nlevel = \"info\"\nformat = \"json\"\n") ==
        "cfg.toml:3: log.format: unknown key");
}

TEST_CASE("wrong types are reported with the type found") {
  CHECK(load_error("[device_api]\nthreads = \"4\"\n") ==
        "cfg.toml:2: device_api.threads: expected integer, got string");
  CHECK(load_error("data_dir = 5\n") == "cfg.toml:1: data_dir: expected string, got integer");
  CHECK(load_error("[[hubs]]\nhostname = \"h.example\"\napply_allocation_policy = \"no\"\n") ==
        "cfg.toml:3: hubs[0].apply_allocation_policy: expected boolean, got string");
  CHECK(load_error("[device_api]\nhostnames = [\"a.example\", 7]\n") ==
        "cfg.toml:2: device_api.hostnames[1]: expected string, got integer");
  CHECK(load_error("device_api = 3\n") == "cfg.toml:1: device_api: expected table, got integer");
  CHECK(load_error("[hubs]\nhostname = \"h.example\"\n") ==
        "cfg.toml:1: hubs: expected array of tables ([[hubs]]), got table");
  CHECK(load_error("[device_api]\nretry_after_seconds = 1.5\n") ==
        "cfg.toml:2: device_api.retry_after_seconds: expected integer, got float");
}

TEST_CASE("bad values name file, line and key path") {
  CHECK(load_error("# c\n#\n#\n#\n#\n[device_api]\nlisten = \"8443\"\n", "provisiond.toml") ==
        "provisiond.toml:7: device_api.listen: expected HOST:PORT, got \"8443\"");
  CHECK(load_error("id_scope = \"0ne0000XYZ1\"\n") ==
        "cfg.toml:1: id_scope: expected \"0ne\" followed by 8 hex digits, got \"0ne0000XYZ1\"");
  CHECK(load_error("id_scope = \"0ne000000\"\n") ==
        "cfg.toml:1: id_scope: expected \"0ne\" followed by 8 hex digits, got \"0ne000000\"");
  CHECK(load_error("[[hubs]]\nhostname = \"a.example\"\n\n[[hubs]]\nhostname = \"b.example\"\n"
                   "\n\n\n\n\n\nallocation_weight = 0\n") ==
        "cfg.toml:12: hubs[1].allocation_weight: must be 1..1000, got 0");
  CHECK(load_error("[device_api]\nregister_wait_ms = -1\n") ==
        "cfg.toml:2: device_api.register_wait_ms: must be 0..10000, got -1");
  CHECK(load_error("[storage]\n\nblock_cache_mb = 4\n") ==
        "cfg.toml:3: storage.block_cache_mb: must be 8..65536, got 4");
  CHECK(load_error("[storage]\nblock_cache = 64\n").find("storage.block_cache") !=
        std::string::npos);
  CHECK(load_error("[device_api]\nthreads = 99999999999\n") ==
        "cfg.toml:2: device_api.threads: must be 0..64, got 99999999999");
  CHECK(load_error("[device_api]\nmax_sas_lifetime_seconds = 59\n") ==
        "cfg.toml:2: device_api.max_sas_lifetime_seconds: must be 60..2147483647, got 59");
  // Too large for the field: the same message, with the real upper bound.
  CHECK(load_error("[device_api]\nmax_sas_lifetime_seconds = 2147483648\n") ==
        "cfg.toml:2: device_api.max_sas_lifetime_seconds: must be 60..2147483647, got "
        "2147483648");
  CHECK(load_error("[device_api]\nmax_connections = -1\n") ==
        "cfg.toml:2: device_api.max_connections: must be 0..10000000, got -1");
  CHECK(load_error("[device_api]\n\nmax_connections_per_client = 10000001\n") ==
        "cfg.toml:3: device_api.max_connections_per_client: must be 0..10000000, got 10000001");
  CHECK(load_error("[device_api]\nmax_body_bytes = -1\n") ==
        "cfg.toml:2: device_api.max_body_bytes: must be 1024..1048576, got -1");
  CHECK(load_error("[device_api]\nhostnames = []\n") ==
        "cfg.toml:2: device_api.hostnames: must list at least one host name");
  CHECK(load_error("[device_api]\nhostnames = [\"ok.example\",\n  \"bad_name\"]\n") ==
        "cfg.toml:3: device_api.hostnames[1]: expected a DNS name or IP address, got "
        "\"bad_name\"");
  // Listen addresses are IP literals (they are bound as such): a bad one is
  // reported here, with its line, not at bind time as "Invalid argument".
  CHECK(load_error("[device_api]\nhostnames = [\"a.example\"]\nlisten = \"999.1.1.1:8443\"\n") ==
        "cfg.toml:3: device_api.listen: expected an IPv4 or IPv6 address as HOST in HOST:PORT, "
        "got \"999.1.1.1:8443\"");
  CHECK(load_error("[metrics]\nlisten = \"localhost:9464\"\n") ==
        "cfg.toml:2: metrics.listen: expected an IPv4 or IPv6 address as HOST in HOST:PORT, "
        "got \"localhost:9464\"");
  CHECK(load_error("[device_api]\nlisten = \"[::1:8443\"\n") ==
        "cfg.toml:2: device_api.listen: expected HOST:PORT, got \"[::1:8443\"");
  for (const char* ok : {"0.0.0.0:8443", "127.0.0.1:0", "[::]:8443", "[::1]:1", "[fe80::1%lo]:8443"}) {
    CAPTURE(ok);
    CHECK(load_error(std::string("[device_api]\nlisten = \"") + ok + "\"\n") == "");
  }
  CHECK(load_error("[metrics]\nlisten = \"localhost\"\n") ==
        "cfg.toml:2: metrics.listen: expected HOST:PORT, got \"localhost\"");
  CHECK(load_error("[log]\nlevel = \"verbose\"\n") ==
        "cfg.toml:2: log.level: must be one of trace, debug, info, warn, error, off, got "
        "\"verbose\"");
  CHECK(load_error("[[hubs]]\nhostname = \"hub a\"\n") ==
        "cfg.toml:2: hubs[0].hostname: expected a DNS name, got \"hub a\"");
}

TEST_CASE("access policy rules") {
  const auto policy = [](const std::string& body) { return "[[access_policies]]\n" + body; };
  CHECK(load_error(policy("name = \"p\"\nprimary_key = \"" + key16 +
                          "\"\nrights = [\"EnrollmentRead\", \"enrollmentwrite\"]\n")) ==
        "cfg.toml:4: access_policies[0].rights[1]: unknown right \"enrollmentwrite\" (expected "
        "ServiceConfig, EnrollmentRead, EnrollmentWrite, RegistrationStatusRead or "
        "RegistrationStatusWrite)");
  CHECK(load_error(policy("name = \"p\"\nprimary_key = \"" + key16 + "\"\nrights = []\n")) ==
        "cfg.toml:4: access_policies[0].rights: must list at least one of ServiceConfig, "
        "EnrollmentRead, EnrollmentWrite, RegistrationStatusRead, RegistrationStatusWrite");
  CHECK(load_error(policy("name = \"p\"\nprimary_key = \"" + key16 + "\"\n")) ==
        "cfg.toml:1: access_policies[0].rights: must list at least one of ServiceConfig, "
        "EnrollmentRead, EnrollmentWrite, RegistrationStatusRead, RegistrationStatusWrite");
  CHECK(load_error(policy("name = \"p\"\nprimary_key = \"" + key16 +
                          "\"\nrights = [\"ServiceConfig\", \"ServiceConfig\"]\n")) ==
        "cfg.toml:4: access_policies[0].rights[1]: \"ServiceConfig\" listed twice");
  // Bad base64: the key itself never appears in the message.
  CHECK(load_error(policy("name = \"p\"\nprimary_key = \"not*base64!\"\nrights = "
                          "[\"ServiceConfig\"]\n")) ==
        "cfg.toml:3: access_policies[0].primary_key: not valid base64");
  CHECK(load_error(policy("name = \"p\"\nprimary_key = \"" + key16 + "\"\nsecondary_key = \"" +
                          key8 + "\"\nrights = [\"ServiceConfig\"]\n")) ==
        "cfg.toml:4: access_policies[0].secondary_key: must decode to 16..64 bytes, got 8");
  // Non-canonical trailing bits ("AB==" rather than "AA==") are rejected.
  CHECK(load_error(policy("name = \"p\"\nprimary_key = \"AAAAAAAAAAAAAAAAAAAAAB==\"\nrights = "
                          "[\"ServiceConfig\"]\n")) ==
        "cfg.toml:3: access_policies[0].primary_key: not valid base64");
  CHECK(load_error(policy("primary_key = \"" + key16 + "\"\nrights = [\"ServiceConfig\"]\n")) ==
        "cfg.toml:1: access_policies[0].name: missing required key");
  CHECK(load_error(policy("name = \"has space\"\nprimary_key = \"" + key16 +
                          "\"\nrights = [\"ServiceConfig\"]\n")) ==
        "cfg.toml:2: access_policies[0].name: must be 1..64 characters of A-Z a-z 0-9 _ - ., "
        "got \"has space\"");
  const std::string ok = "primary_key = \"" + key16 + "\"\nrights = [\"ServiceConfig\"]\n";
  CHECK(load_error(policy("name = \"Owner\"\n" + ok) + "\n" + policy("name = \"owner\"\n" + ok)) ==
        "cfg.toml:7: access_policies[1].name: duplicate policy name \"owner\" (same as "
        "access_policies[0])");
}

TEST_CASE("tls_cert and tls_key go together") {
  CHECK(load_error("[device_api]\n\ntls_cert = \"/etc/c.pem\"\n") ==
        "cfg.toml:3: device_api.tls_cert: set without device_api.tls_key (set both or neither)");
  CHECK(load_error("[device_api]\ntls_key = \"/etc/k.pem\"\n") ==
        "cfg.toml:2: device_api.tls_key: set without device_api.tls_cert (set both or neither)");
}

TEST_CASE("duplicate hub names the second one's line") {
  CHECK(load_error("[[hubs]]\nhostname = \"Hub.Example.com\"\n\n[[hubs]]\nhostname = "
                   "\"other.example.com\"\n\n[[hubs]]\nregion = \"x\"\nhostname = "
                   "\"hub.example.com\"\n") ==
        "cfg.toml:9: hubs[2].hostname: duplicate hub hostname \"hub.example.com\" (same as "
        "hubs[0])");
  CHECK(load_error("[[hubs]]\nregion = \"x\"\n") ==
        "cfg.toml:1: hubs[0].hostname: missing required key");
  CHECK(load_error("hubs = [1]\n") == "cfg.toml:1: hubs[0]: expected table, got integer");
}

TEST_CASE("the earliest problem in the file is reported") {
  CHECK(load_error("[log]\nlevel = \"loud\"\n[device_api]\nlisten = \"x\"\n") ==
        "cfg.toml:2: log.level: must be one of trace, debug, info, warn, error, off, got "
        "\"loud\"");
  // Structural problems win over value problems wherever they are.
  CHECK(load_error("[log]\nlevel = \"loud\"\n[device_api]\nbogus = 1\n") ==
        "cfg.toml:4: device_api.bogus: unknown key");
}

TEST_CASE("syntax errors carry line and column") {
  const std::string msg = load_error("data_dir = \"a\"\n[device_api\nlisten = \"x\"\n", "s.toml");
  CHECK(msg.rfind("s.toml:2:12: ", 0) == 0);
  CHECK(msg.size() > std::string("s.toml:2:1: ").size());
  // Duplicate keys are a TOML syntax error too.
  const std::string dup = load_error("data_dir = \"a\"\ndata_dir = \"b\"\n", "d.toml");
  CHECK(dup.rfind("d.toml:2:12: ", 0) == 0);
  // An unterminated array: exact line and column from toml++.
  const std::string arr = load_error("a = 1\nb = [1,\n c = 3", "t.toml");
  CHECK(arr.rfind("t.toml:3:2: ", 0) == 0);
}

TEST_CASE("a failed load leaves the output untouched") {
  engine_config cfg;
  cfg.data_dir = "keep";
  CHECK(load_string("data_dir = \"new\"\nbogus = 1\n", "cfg.toml", cfg));
  CHECK(cfg.data_dir == "keep");
}

TEST_CASE("load_file reads files and reports unreadable ones") {
  temp_file f("data_dir = \"/srv/p\"\n[metrics]\nlisten = \"0.0.0.0:9000\"\n");
  engine_config cfg;
  error err = load_file(f.path, cfg);
  REQUIRE_MESSAGE(err.ok(), err.message);
  CHECK(cfg.data_dir == "/srv/p");
  CHECK(cfg.metrics.listen == "0.0.0.0:9000");
  CHECK(cfg.source_file == f.path);

  temp_file bad("\n[metrics]\nport = 1\n");
  err = load_file(bad.path, cfg);
  CHECK(err.message == bad.path + ":3: metrics.port: unknown key");

  const std::string missing = "/nonexistent/dir/provisiond.toml";
  err = load_file(missing, cfg);
  CHECK(err.code == error_code::bad_request);
  CHECK(err.message ==
        missing + ": cannot read config file: " + std::string(std::strerror(ENOENT)));

  err = load_file("/tmp", cfg);
  CHECK(err.message == "/tmp: cannot read config file: " + std::string(std::strerror(EISDIR)));
}

TEST_CASE("validate checks structs built in code") {
  engine_config cfg;
  CHECK(validate(cfg).ok());

  cfg.hubs.push_back({"a.example", 5, true, "", ""});
  cfg.hubs.push_back({"A.EXAMPLE", 5, true, "", ""});
  error err = validate(cfg);
  CHECK(err.code == error_code::bad_request);
  CHECK(err.message == "hubs[1].hostname: duplicate hub hostname \"A.EXAMPLE\" (same as hubs[0])");

  cfg.hubs.pop_back();
  cfg.hubs[0].allocation_weight = 1001;
  cfg.source_file = "p.toml";
  CHECK(validate(cfg).message == "p.toml: hubs[0].allocation_weight: must be 1..1000, got 1001");

  cfg = engine_config{};
  cfg.device_api.max_body_bytes = 10;
  CHECK(validate(cfg).message == "device_api.max_body_bytes: must be 1024..1048576, got 10");

  cfg = engine_config{};
  cfg.access_policies.push_back({"owner", key16, "", {"ServiceConfig"}});
  CHECK(validate(cfg).ok());
  cfg.access_policies[0].primary_key.clear();
  CHECK(validate(cfg).message == "access_policies[0].primary_key: must not be empty");

  cfg = engine_config{};
  cfg.id_scope = "0NE00000001";
  CHECK(validate(cfg).message ==
        "id_scope: expected \"0ne\" followed by 8 hex digits, got \"0NE00000001\"");
  cfg.id_scope = "0ne0000abCD";
  CHECK(validate(cfg).ok());

  cfg.data_dir.clear();
  CHECK(validate(cfg).message == "data_dir: must not be empty");
}

TEST_CASE("split_host_port") {
  std::string host;
  uint16_t port = 1;
  CHECK(split_host_port("host:443", host, port));
  CHECK(host == "host");
  CHECK(port == 443);
  CHECK(split_host_port("[::1]:8443", host, port));
  CHECK(host == "::1");
  CHECK(port == 8443);
  CHECK(split_host_port("0.0.0.0:0", host, port));
  CHECK(host == "0.0.0.0");
  CHECK(port == 0);
  CHECK(split_host_port("h:65535", host, port));
  CHECK(port == 65535);

  for (const char* bad : {"", "8443", ":443", "host:", "host:65536", "host:-1", "host:+1",
                          "host:44a", "::1:443", "[::1]443", "[::1]", "[]:443", "[::1:443",
                          "ho st:1", "host:123456"}) {
    CAPTURE(bad);
    CHECK_FALSE(split_host_port(bad, host, port));
  }
}

TEST_CASE("every TOML example in docs/configuration.md loads; the complete one is complete") {
  // Keeps the documentation honest. PROV_SOURCE_DIR is set by CMake, so the
  // file is always found (a test that skips itself when it is not is no test).
  std::ifstream in(std::string(PROV_SOURCE_DIR) + "/docs/configuration.md");
  REQUIRE_MESSAGE(in, "docs/configuration.md not found under " << PROV_SOURCE_DIR);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string md = ss.str();
  const std::string fence = "```toml\n";
  const std::size_t complete_at = md.find("## Complete example");
  REQUIRE(complete_at != std::string::npos);
  int blocks = 0;
  bool saw_complete = false;
  for (std::size_t begin = md.find(fence); begin != std::string::npos;
       begin = md.find(fence, begin + 1)) {
    const std::size_t end = md.find("```", begin + fence.size());
    REQUIRE(end != std::string::npos);
    ++blocks;
    engine_config cfg;
    const error err =
        load_string(md.substr(begin + fence.size(), end - begin - fence.size()), "example", cfg);
    CHECK_MESSAGE(err.ok(), "block " << blocks << ": " << err.message);
    if (begin > complete_at && !saw_complete) {
      saw_complete = true;
      CHECK(cfg.hubs.size() >= 1);
      CHECK(cfg.access_policies.size() >= 1);
      CHECK(cfg.kafka.enabled() == false); // the complete example is embedded mode
    }
  }
  CHECK(blocks >= 2);
  CHECK(saw_complete);
}

TEST_CASE("--roles: parsing and the combinations that make sense") {
  using namespace prov::config;
  roles_config r;
  REQUIRE(parse_roles("gateway, registration", r).ok());
  CHECK(r.gateway);
  CHECK(r.registration);
  CHECK_FALSE(r.attestation);
  CHECK_FALSE(r.allocation);
  CHECK_FALSE(r.configuration);
  CHECK(r.to_string() == "gateway,registration");
  REQUIRE(parse_roles("all", r).ok());
  CHECK(r.all());
  auto err = parse_roles("gateway,allocator", r);
  CHECK(err.message.find("unknown role \"allocator\"") != std::string::npos);
  CHECK(err.message.find("configuration") != std::string::npos);
  CHECK(parse_roles("", r).code == prov::error_code::bad_request);

  engine_config cfg;
  REQUIRE(parse_roles("allocation,configuration", cfg.roles).ok());
  err = validate(cfg);
  CHECK(err.message.find("needs [kafka] brokers") != std::string::npos);
  cfg.kafka.brokers = "127.0.0.1:9092";
  CHECK(validate(cfg).ok());
  REQUIRE(parse_roles("gateway,allocation", cfg.roles).ok());
  CHECK(validate(cfg).message.find("gateway and registration run together")
        != std::string::npos);
}

TEST_CASE("[mqtt]: on by default on 8883, keys, ranges, and \"\" turns it off") {
  engine_config def;
  CHECK(def.mqtt.listen == "0.0.0.0:8883");
  CHECK(def.mqtt.max_packet_bytes == 128 * 1024);
  CHECK(def.mqtt.max_inflight == 16);
  CHECK(def.mqtt.websocket);
  engine_config cfg;
  REQUIRE(load_string("[mqtt]\nlisten = \"127.0.0.1:18883\"\nmax_packet_bytes = 4096\n"
                      "max_inflight = 2\n",
                      "cfg.toml", cfg)
            .ok());
  CHECK(cfg.mqtt.listen == "127.0.0.1:18883");
  CHECK(cfg.mqtt.max_packet_bytes == 4096);
  CHECK(cfg.mqtt.max_inflight == 2);
  engine_config off;
  REQUIRE(load_string("[mqtt]\nlisten = \"\"\n", "cfg.toml", off).ok());
  CHECK(off.mqtt.listen.empty());
  CHECK(load_error("[mqtt]\nlisten = \"8883\"\n")
        == "cfg.toml:2: mqtt.listen: expected HOST:PORT, got \"8883\"");
  CHECK(load_error("[mqtt]\nmax_inflight = 0\n").find("mqtt.max_inflight") != std::string::npos);
  CHECK(load_error("[mqtt]\nmax_packet_bytes = 100\n").find("mqtt.max_packet_bytes")
        != std::string::npos);
  CHECK(load_error("[mqtt]\nlisten = \"0.0.0.0:1\"\nport = 1\n").find("mqtt.port")
        != std::string::npos);
  CHECK(load_error("[device_api]\nlisten = \"0.0.0.0:9000\"\n[mqtt]\nlisten = \"0.0.0.0:9000\"\n")
          .find("must differ from device_api.listen")
        != std::string::npos);
  CHECK(load_error("[device_api]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n")
        == "");
}

TEST_CASE("[throttling]: defaults off, values read, bad values name file, line and key") {
  using namespace prov::config;
  engine_config d;
  CHECK_FALSE(d.throttling.any());
  CHECK(d.throttling.poll_window_seconds == 10);
  CHECK(d.throttling.max_tracked_keys == 100000);
  engine_config cfg;
  REQUIRE(load_string("[throttling]\nregistrations_per_minute_per_scope = 1000\n"
                      "registrations_per_minute_per_group = 50\npolls_per_device = 5\n"
                      "poll_window_seconds = 20\nrequests_per_minute_per_address = 600\n"
                      "max_tracked_keys = 5000\n",
                      "cfg.toml", cfg)
            .ok());
  CHECK(cfg.throttling.any());
  CHECK(cfg.throttling.registrations_per_minute_per_scope == 1000);
  CHECK(cfg.throttling.registrations_per_minute_per_group == 50);
  CHECK(cfg.throttling.polls_per_device == 5);
  CHECK(cfg.throttling.poll_window_seconds == 20);
  CHECK(cfg.throttling.requests_per_minute_per_address == 600);
  CHECK(cfg.throttling.max_tracked_keys == 5000);
  CHECK(load_error("[throttling]\n\npolls_per_device = -1\n") ==
        "cfg.toml:3: throttling.polls_per_device: must be 0..10000000, got -1");
  CHECK(load_error("[throttling]\npoll_window_seconds = 0\n") ==
        "cfg.toml:2: throttling.poll_window_seconds: must be 1..3600, got 0");
  CHECK(load_error("[throttling]\nmax_tracked_keys = 0\n") ==
        "cfg.toml:2: throttling.max_tracked_keys: must be 1..10000000, got 0");
  CHECK(load_error("[throttling]\nregistrations_per_minute_per_scope = 10000001\n") ==
        "cfg.toml:2: throttling.registrations_per_minute_per_scope: must be 0..10000000, got "
        "10000001");
  CHECK(load_error("[throttling]\nregistrations_per_minute = 5\n")
          .find("throttling.registrations_per_minute") != std::string::npos);
  engine_config bad;
  bad.throttling.requests_per_minute_per_address = -5;
  CHECK(validate(bad).message.find("throttling.requests_per_minute_per_address") !=
        std::string::npos);
}

TEST_CASE("[custom_allocation]: defaults, every key, ranges") {
  engine_config d;
  REQUIRE(!load_string("", "cfg.toml", d));
  CHECK(d.custom_allocation.ca_file.empty());
  CHECK(d.custom_allocation.timeout_ms == 10000);
  CHECK(d.custom_allocation.retries == 2);
  CHECK(d.custom_allocation.retry_backoff_ms == 500);
  CHECK(d.custom_allocation.threads == 4);
  engine_config c;
  REQUIRE(!load_string("[custom_allocation]\nca_file = \"/x/ca.pem\"\ntimeout_ms = 250\n"
                       "retries = 0\nretry_backoff_ms = 0\nthreads = 16\n",
                       "cfg.toml", c));
  CHECK(c.custom_allocation.ca_file == "/x/ca.pem");
  CHECK(c.custom_allocation.timeout_ms == 250);
  CHECK(c.custom_allocation.retries == 0);
  CHECK(c.custom_allocation.retry_backoff_ms == 0);
  CHECK(c.custom_allocation.threads == 16);
  CHECK(load_error("[custom_allocation]\ntimeout_ms = 99\n") ==
        "cfg.toml:2: custom_allocation.timeout_ms: must be 100..600000, got 99");
  CHECK(load_error("[custom_allocation]\nretries = 11\n") ==
        "cfg.toml:2: custom_allocation.retries: must be 0..10, got 11");
  CHECK(load_error("[custom_allocation]\nthreads = 0\n") ==
        "cfg.toml:2: custom_allocation.threads: must be 1..256, got 0");
  CHECK(load_error("[custom_allocation]\nwebhook = \"x\"\n") ==
        "cfg.toml:2: custom_allocation.webhook: unknown key");
}

TEST_CASE("[hub_health]: max_concurrent_probes defaults to 16, is read, and is 1..256") {
  engine_config d;
  REQUIRE(!load_string("", "cfg.toml", d));
  CHECK(d.hub_health.max_concurrent_probes == 16);
  engine_config c;
  REQUIRE(!load_string("[hub_health]\nmax_concurrent_probes = 3\n", "cfg.toml", c));
  CHECK(c.hub_health.max_concurrent_probes == 3);
  CHECK(load_error("[hub_health]\nmax_concurrent_probes = 0\n") ==
        "cfg.toml:2: hub_health.max_concurrent_probes: must be 1..256, got 0");
  CHECK(load_error("[hub_health]\nmax_concurrent_probes = 257\n") ==
        "cfg.toml:2: hub_health.max_concurrent_probes: must be 1..256, got 257");
}

TEST_CASE("[[issuing_cas]]: keys, a private key file, names and validity, with file:line:key") {
  temp_file key("-----BEGIN PRIVATE KEY-----\n");
  REQUIRE(::chmod(key.path.c_str(), 0600) == 0);
  const std::string ok_entry = "[[issuing_cas]]\nname = \"fleet\"\nkey_file = \"" + key.path +
                               "\"\ncertificate_file = \"/etc/fleet.pem\"\n";
  engine_config cfg;
  REQUIRE(!load_string(ok_entry + "validity_hours = 6\n", "cfg.toml", cfg));
  REQUIRE(cfg.issuing_cas.size() == 1);
  CHECK(cfg.issuing_cas[0].name == "fleet");
  CHECK(cfg.issuing_cas[0].key_file == key.path);
  CHECK(cfg.issuing_cas[0].certificate_file == "/etc/fleet.pem");
  CHECK(cfg.issuing_cas[0].validity_hours == 6);
  REQUIRE(!load_string(ok_entry, "cfg.toml", cfg));
  CHECK(cfg.issuing_cas[0].validity_hours == 720); // 30 days by default

  CHECK(load_error(ok_entry + "validity_days = 1\n") ==
        "cfg.toml:5: issuing_cas[0].validity_days: unknown key");
  CHECK(load_error(ok_entry + "validity_hours = 0\n") ==
        "cfg.toml:5: issuing_cas[0].validity_hours: must be 1..87600, got 0");
  CHECK(load_error("[[issuing_cas]]\nname = \"x\"\nkey_file = \"" + key.path + "\"\n") ==
        "cfg.toml:1: issuing_cas[0].certificate_file: missing required key");
  CHECK(load_error("[[issuing_cas]]\nname = \"a b\"\nkey_file = \"" + key.path +
                   "\"\ncertificate_file = \"c\"\n") ==
        "cfg.toml:2: issuing_cas[0].name: must be 1..64 characters of A-Z a-z 0-9 _ - ., "
        "got \"a b\"");
  CHECK(load_error(ok_entry + "\n" + ok_entry) ==
        "cfg.toml:7: issuing_cas[1].name: duplicate issuing CA name \"fleet\" (same as "
        "issuing_cas[0])");
  // The key is only for the configuration role (certificate_issuer::load
  // checks it there): a gateway, or an operator's `connection-string`, loads
  // the same file without access to it.
  const std::string absent = "[[issuing_cas]]\nname = \"x\"\nkey_file = \"/nonexistent/ca.key\"\n"
                             "certificate_file = \"c\"\n";
  REQUIRE(!load_string(absent, "cfg.toml", cfg));
  CHECK(cfg.issuing_cas[0].key_file == "/nonexistent/ca.key");
  REQUIRE(::chmod(key.path.c_str(), 0644) == 0);
  CHECK(!load_string(ok_entry, "cfg.toml", cfg));
  CHECK(load_error("[[issuing_cas]]\nname = \"x\"\nkey_file = \"\"\ncertificate_file = \"c\"\n") ==
        "cfg.toml:3: issuing_cas[0].key_file: must not be empty");
}
