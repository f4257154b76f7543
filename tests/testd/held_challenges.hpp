#pragma once
// The engine's TPM challenge store with gates a test opens and closes from
// outside the process: a call (load, issue or promote) waits while the
// file `<dir>/hold-<call>` exists, after creating `<dir>/held-<call>` so
// the test knows a request reached that point; `held-<call>` is removed
// when the call goes on, so the next arrival is a fresh one. A gate
// `<call>@<lower-case registration id>` holds that id's calls only, so a
// test can hold one device's request while another's goes on. The gates
// `issue-locked` and `promote-locked` sit inside the enrollment lock of the
// challenge write (engine_options::in_challenge_write, through gate_at()).
// A test can thus put a
// service API write (an enrollment delete) exactly between a TPM register's
// enrollment read and its challenge write, or keep a TPM poll busy while it
// checks that other requests are still served: deterministic, no sleeps.
// Registered through engine_options::wrap_challenges by the test binary
// only (tests/testd/main.cpp, PROVISIOND_TEST_TPM_HOLD_DIR).

#include <sys/stat.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include "actors/attestation/tpm.hpp"

namespace prov::test {

class held_challenges final : public attestation::challenge_store {
public:
  held_challenges(std::unique_ptr<attestation::challenge_store> inner, std::string dir)
    : inner_(std::move(inner)), dir_(std::move(dir)) {}

  error load(std::string_view registration_id, attestation::tpm_slots& out) const override {
    gate("load", registration_id);
    return inner_->load(registration_id, out);
  }
  error issue(std::string_view registration_id, std::string_view enrollment_etag,
              const attestation::tpm_challenge& c,
              attestation::challenge_write& out) const override {
    gate("issue", registration_id);
    return inner_->issue(registration_id, enrollment_etag, c, out);
  }
  error promote(std::string_view registration_id, std::string_view enrollment_etag,
                std::string_view verified_key,
                attestation::challenge_write& out) const override {
    gate("promote", registration_id);
    return inner_->promote(registration_id, enrollment_etag, verified_key, out);
  }

  /// The gate for any call name, usable without an instance. Bounded
  /// (2 min), so a test that dies holding a gate cannot hang the server.
  static void gate_at(const std::string& dir, const std::string& call) {
    const std::string hold = dir + "/hold-" + call;
    if (!exists(hold))
      return;
    const std::string held = dir + "/held-" + call;
    std::ofstream(held) << "1";
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(2);
    while (exists(hold) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::remove(held.c_str());
  }

private:
  static bool exists(const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0;
  }

  void gate(const char* call, std::string_view registration_id) const {
    gate_at(dir_, call);
    std::string id(registration_id);
    for (auto& ch : id)
      ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    gate_at(dir_, std::string(call) + "@" + id);
  }

  std::unique_ptr<attestation::challenge_store> inner_;
  std::string dir_;
};

} // namespace prov::test
