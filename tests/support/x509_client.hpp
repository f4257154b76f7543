#pragma once
// An HTTPS client that presents a device certificate chain, as DPS X.509
// devices do (TLS client certificate, no Authorization header), for the
// integration tests that attest with X.509 (x509_test, ca_store_test).

#include <doctest/doctest.h>

#include <cstdio>
#include <initializer_list>
#include <string>

#include "net/https_client.hpp"
#include "tests/support/server_process.hpp"
#include "tests/support/test_certs.hpp"

namespace prov::test {

/// Writes `text` to dir/name; returns the path.
inline std::string write_file(const std::string& dir, const std::string& name,
                              const std::string& text) {
  std::string path = dir + "/" + name;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  std::fwrite(text.data(), 1, text.size(), f);
  std::fclose(f);
  return path;
}

/// Certificate and key files for the clients; removed at exit.
inline const std::string& cert_dir() {
  struct temp_dir {
    std::string path = make_temp_dir("provisiond-x509-it");
    ~temp_dir() { remove_tree(path); }
  };
  static const temp_dir dir;
  return dir.path;
}

/// A client presenting `leaf` followed by `chain` (PEM files in cert_dir()).
inline net::https_client device_client(const server_process& s, const test_cert& leaf,
                                       std::initializer_list<const test_cert*> chain = {},
                                       bool reuse = true) {
  static int n = 0;
  const std::string& dir = cert_dir();
  std::string pem = leaf.pem();
  for (const auto* c : chain)
    pem += c->pem();
  const std::string stem = "dev" + std::to_string(++n);
  net::https_client_options o;
  o.host = "127.0.0.1";
  o.port = s.port();
  o.ca_file = s.data_dir() + "/tls/ca.pem";
  o.client_cert_file = write_file(dir, stem + ".pem", pem);
  o.client_key_file = write_file(dir, stem + ".key", leaf.key_pem());
  o.reuse_connection = reuse;
  return net::https_client(o);
}

} // namespace prov::test
