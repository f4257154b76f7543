#pragma once
// A real local HTTPS server for tests that need something provisiond calls
// out to (custom allocation webhook, hub health endpoints). Its certificate
// is for "localhost", issued by a test CA whose PEM is written to ca_file()
// so provisiond can be told to trust it.

#include <doctest/doctest.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "gateway/https_server.hpp"
#include "tests/support/server_process.hpp"
#include "tests/support/test_certs.hpp"

namespace prov::test {

/// Writes `text` to `path` (fails the test when it cannot); returns `path`.
inline std::string write_text_file(const std::string& path, const std::string& text) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  std::fwrite(text.data(), 1, text.size(), f);
  std::fclose(f);
  return path;
}

class local_https_server {
public:
  /// Starts serving `handler` on 127.0.0.1 (an ephemeral port). `ca_name`
  /// and `serial` make the test CA distinct per file; files go to a fresh
  /// temporary directory removed with the server.
  local_https_server(gateway::handler& handler, const std::string& ca_name, long serial,
                     int threads)
    : dir_(make_temp_dir("provisiond-https-it")),
      root_(make_ca(ca_name, nullptr, serial)),
      leaf_(make_localhost_server(root_, serial + 1)) {
    gateway::server_options o;
    o.listen = "127.0.0.1:0";
    o.cert_chain_file = write_text_file(dir_ + "/server.pem", leaf_.pem());
    o.key_file = write_text_file(dir_ + "/server.key", leaf_.key_pem());
    o.threads = threads;
    auto err = gateway::https_server::start(o, handler, server_);
    REQUIRE_MESSAGE(!err, err.message);
    ca_file_ = write_text_file(dir_ + "/ca.pem", root_.pem());
    base_ = "https://localhost:" + std::to_string(server_->port());
  }
  ~local_https_server() {
    stop();
    remove_tree(dir_);
  }
  local_https_server(const local_https_server&) = delete;
  local_https_server& operator=(const local_https_server&) = delete;

  void stop() {
    if (server_)
      server_->stop();
  }
  /// https://localhost:PORT
  const std::string& base() const { return base_; }
  uint16_t port() const { return server_->port(); }
  /// The test CA's PEM file, for provisiond's ca_file settings.
  const std::string& ca_file() const { return ca_file_; }

private:
  std::string dir_;
  test_cert root_;
  test_cert leaf_;
  std::unique_ptr<gateway::https_server> server_;
  std::string ca_file_;
  std::string base_;
};

} // namespace prov::test
