#include <doctest/doctest.h>

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include "net/tls_material.hpp"

namespace fs = std::filesystem;
using namespace prov;
using namespace prov::net;

namespace {

/// A fresh directory under the system temp dir, removed afterwards.
struct temp_dir {
  fs::path path;
  temp_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() /
           ("provisiond-tls-test-" + std::to_string(rd()) + std::to_string(rd()));
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string str() const { return path.string(); }
};

struct x509_del {
  void operator()(X509* x) const { X509_free(x); }
};
using x509_ptr = std::unique_ptr<X509, x509_del>;

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

/// All certificates of a PEM file, in order.
std::vector<x509_ptr> read_certs(const std::string& path) {
  std::vector<x509_ptr> out;
  const std::string pem = slurp(path);
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  while (X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr)) out.emplace_back(x);
  BIO_free(bio);
  return out;
}

EVP_PKEY* read_key(const std::string& path) {
  const std::string pem = slurp(path);
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  EVP_PKEY* k = PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  return k;
}

unsigned mode_of(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return st.st_mode & 0777;
}

/// X509_verify_cert of server.pem's leaf against ca.pem, with the chain from
/// server.pem as untrusted intermediates; `host`/`ip` checked when given.
bool verifies(const tls_paths& p, const char* host = nullptr, const char* ip = nullptr) {
  auto ca = read_certs(p.ca_pem);
  auto chain = read_certs(p.cert_pem);
  REQUIRE(ca.size() == 1);
  REQUIRE(chain.size() == 2);
  X509_STORE* store = X509_STORE_new();
  X509_STORE_add_cert(store, ca[0].get());
  STACK_OF(X509)* untrusted = sk_X509_new_null();
  sk_X509_push(untrusted, chain[1].get());
  X509_STORE_CTX* ctx = X509_STORE_CTX_new();
  X509_STORE_CTX_init(ctx, store, chain[0].get(), untrusted);
  X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_SERVER);
  X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(ctx);
  if (host) X509_VERIFY_PARAM_set1_host(param, host, 0);
  if (ip) X509_VERIFY_PARAM_set1_ip_asc(param, ip);
  const bool ok = X509_verify_cert(ctx) == 1;
  X509_STORE_CTX_free(ctx);
  sk_X509_free(untrusted);
  X509_STORE_free(store);
  return ok;
}

int validity_days(X509* x) {
  int days = 0, secs = 0;
  REQUIRE(ASN1_TIME_diff(&days, &secs, X509_get0_notBefore(x), X509_get0_notAfter(x)) == 1);
  return days;
}

std::string common_name(X509* x) {
  char buf[256] = {};
  X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, buf, sizeof buf);
  return buf;
}

bool is_p256(EVP_PKEY* k) {
  char group[64] = {};
  size_t len = 0;
  return EVP_PKEY_get_base_id(k) == EVP_PKEY_EC &&
         EVP_PKEY_get_group_name(k, group, sizeof group, &len) == 1 &&
         std::string(group) == "prime256v1";
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

const std::vector<std::string> sans = {"localhost", "dps.example.test", "127.0.0.1", "::1"};

} // namespace

TEST_CASE("tls material: first start creates a CA and a server certificate") {
  temp_dir dir;
  tls_paths p;
  const error e = ensure_tls_material((dir.path / "nested" / "tls").string(), sans, p);
  REQUIRE_MESSAGE(e.ok(), e.message);
  CHECK(p.ca_generated);
  CHECK(p.server_generated);
  const fs::path base = dir.path / "nested" / "tls";
  CHECK(p.ca_pem == (base / "ca.pem").string());
  CHECK(p.cert_pem == (base / "server.pem").string());
  CHECK(p.key_pem == (base / "server.key").string());

  CHECK(mode_of(p.ca_pem) == 0644);
  CHECK(mode_of((base / "ca.key").string()) == 0600);
  CHECK(mode_of(p.cert_pem) == 0644);
  CHECK(mode_of(p.key_pem) == 0600);
  // No temporary files left behind.
  CHECK(std::distance(fs::directory_iterator(base), fs::directory_iterator{}) == 4);

  auto ca = read_certs(p.ca_pem);
  auto chain = read_certs(p.cert_pem);
  REQUIRE(ca.size() == 1);
  REQUIRE(chain.size() == 2);
  CHECK(X509_cmp(ca[0].get(), chain[1].get()) == 0); // leaf + CA chain
  CHECK(common_name(ca[0].get()) == "provisiond local CA");
  CHECK(X509_check_ca(ca[0].get()) >= 1);
  CHECK(X509_check_ca(chain[0].get()) == 0);
  CHECK(validity_days(ca[0].get()) >= 3650);
  CHECK(validity_days(ca[0].get()) <= 3652);
  CHECK(validity_days(chain[0].get()) >= 729);
  CHECK(validity_days(chain[0].get()) <= 825);
  CHECK(is_p256(X509_get0_pubkey(ca[0].get())));
  CHECK(is_p256(X509_get0_pubkey(chain[0].get())));

  EVP_PKEY* server_key = read_key(p.key_pem);
  EVP_PKEY* ca_key = read_key((base / "ca.key").string());
  REQUIRE(server_key != nullptr);
  REQUIRE(ca_key != nullptr);
  CHECK(X509_check_private_key(chain[0].get(), server_key) == 1);
  CHECK(X509_check_private_key(ca[0].get(), ca_key) == 1);
  EVP_PKEY_free(server_key);
  EVP_PKEY_free(ca_key);

  CHECK(verifies(p));
  CHECK(verifies(p, "localhost"));
  CHECK(verifies(p, "DPS.example.test"));
  CHECK(verifies(p, nullptr, "127.0.0.1"));
  CHECK(verifies(p, nullptr, "::1"));
  CHECK_FALSE(verifies(p, "evil.example.test"));
  CHECK_FALSE(verifies(p, nullptr, "10.0.0.1"));

  std::vector<std::string> got;
  REQUIRE(read_certificate_sans(p.cert_pem, got).ok());
  CHECK(got.size() == 4);
  for (const auto& s : sans) CHECK_MESSAGE(contains(got, s), s);
}

TEST_CASE("tls material: later starts reuse, missing SANs re-issue the server cert") {
  temp_dir dir;
  tls_paths p;
  REQUIRE(ensure_tls_material(dir.str(), sans, p).ok());
  const std::string ca0 = slurp(p.ca_pem), cert0 = slurp(p.cert_pem), key0 = slurp(p.key_pem);
  const std::string ca_key0 = slurp((dir.path / "ca.key").string());

  SUBCASE("same or fewer SANs: nothing regenerated") {
    REQUIRE(ensure_tls_material(dir.str(), sans, p).ok());
    CHECK_FALSE(p.ca_generated);
    CHECK_FALSE(p.server_generated);
    REQUIRE(ensure_tls_material(dir.str(), {"LOCALHOST", "[::1]"}, p).ok());
    CHECK_FALSE(p.server_generated);
    CHECK(slurp(p.ca_pem) == ca0);
    CHECK(slurp(p.cert_pem) == cert0);
    CHECK(slurp(p.key_pem) == key0);
  }
  SUBCASE("a new SAN re-issues the server certificate from the same CA") {
    const std::vector<std::string> more = {"localhost", "new.example.test", "192.168.7.9"};
    REQUIRE(ensure_tls_material(dir.str(), more, p).ok());
    CHECK_FALSE(p.ca_generated);
    CHECK(p.server_generated);
    CHECK(slurp(p.ca_pem) == ca0);
    CHECK(slurp((dir.path / "ca.key").string()) == ca_key0);
    CHECK(slurp(p.cert_pem) != cert0);
    CHECK(slurp(p.key_pem) != key0);
    CHECK(mode_of(p.key_pem) == 0600);
    CHECK(verifies(p, "new.example.test"));
    CHECK(verifies(p, nullptr, "192.168.7.9"));
    std::vector<std::string> got;
    REQUIRE(read_certificate_sans(p.cert_pem, got).ok());
    for (const auto& s : more) CHECK_MESSAGE(contains(got, s), s);
    // And the next start with the same list keeps it.
    REQUIRE(ensure_tls_material(dir.str(), more, p).ok());
    CHECK_FALSE(p.server_generated);
  }
  SUBCASE("a lost or mismatched server key re-issues the server certificate") {
    fs::remove(p.key_pem);
    REQUIRE(ensure_tls_material(dir.str(), sans, p).ok());
    CHECK_FALSE(p.ca_generated);
    CHECK(p.server_generated);
    CHECK(verifies(p, "localhost"));
    fs::copy_file(dir.path / "ca.key", p.key_pem, fs::copy_options::overwrite_existing);
    REQUIRE(ensure_tls_material(dir.str(), sans, p).ok());
    CHECK(p.server_generated);
    CHECK(slurp(p.ca_pem) == ca0);
    CHECK(verifies(p, "localhost"));
  }
  SUBCASE("half a CA is an error and is never overwritten") {
    fs::remove(dir.path / "ca.key");
    const error e = ensure_tls_material(dir.str(), sans, p);
    CHECK(e.code == error_code::internal);
    CHECK(e.message.find("ca.key") != std::string::npos);
    CHECK(slurp(p.ca_pem) == ca0);
  }
  SUBCASE("a foreign ca.key is an error") {
    temp_dir other;
    tls_paths q;
    REQUIRE(ensure_tls_material(other.str(), sans, q).ok());
    fs::copy_file(other.path / "ca.key", dir.path / "ca.key", fs::copy_options::overwrite_existing);
    CHECK(ensure_tls_material(dir.str(), sans, p).code == error_code::internal);
    CHECK(slurp(p.ca_pem) == ca0);
  }
}

TEST_CASE("tls material: default SANs and SAN validation") {
  temp_dir dir;
  tls_paths p;
  REQUIRE(ensure_tls_material(dir.str(), {}, p).ok());
  std::vector<std::string> got;
  REQUIRE(read_certificate_sans(p.cert_pem, got).ok());
  CHECK(got == std::vector<std::string>{"localhost", "127.0.0.1", "::1"});
  CHECK(verifies(p, "localhost"));

  for (const char* bad : {"bad name", "", "a/b", "host:443"}) {
    CAPTURE(bad);
    CHECK(ensure_tls_material(dir.str(), {bad}, p).code == error_code::bad_request);
  }
}

TEST_CASE("load_pem_file") {
  temp_dir dir;
  tls_paths p;
  REQUIRE(ensure_tls_material(dir.str(), sans, p).ok());
  std::string pem;
  REQUIRE(load_pem_file(p.cert_pem, pem).ok());
  CHECK(pem == slurp(p.cert_pem));
  const error e = load_pem_file((dir.path / "missing.pem").string(), pem);
  CHECK(e.code == error_code::internal);
  CHECK(e.message.find("missing.pem") != std::string::npos);
  std::vector<std::string> got;
  CHECK(read_certificate_sans((dir.path / "missing.pem").string(), got).code ==
        error_code::internal);
}
