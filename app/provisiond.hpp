#pragma once
// The provisiond command line as a function, so that two binaries run the
// same code: the product (main.cpp) and the test binary (tests/testd/),
// which adds what only tests need through `extensions`.

#include <functional>
#include <memory>
#include <vector>

namespace prov::allocation {
class policy;
}
namespace prov::attestation {
class challenge_store;
}

namespace prov::app {

/// What an embedding binary adds to the engine `serve` starts.
struct extensions {
  /// Registered after the built-in policies (engine_options::policies).
  std::vector<std::shared_ptr<const allocation::policy>> policies;
  /// Called while stopping, once the device listeners take no new clients
  /// and no new MQTT requests, before they wait for the answers in flight
  /// (the test binary holds the process there: tests/testd/).
  std::function<void()> listeners_stopping;
  /// engine_options::wrap_challenges (tests only).
  std::function<std::unique_ptr<attestation::challenge_store>(
    std::unique_ptr<attestation::challenge_store>)>
    wrap_challenges;
  /// engine_options::in_challenge_write (tests only).
  std::function<void(const char* call)> in_challenge_write;
  /// engine_options::before_enrollments_apply (tests only).
  std::function<void()> before_enrollments_apply;
};

/// Sets up the process (stop signals blocked in every thread, SIGPIPE
/// ignored, umask 077), parses argv and runs the subcommand; the process
/// exit status. Call it first thing in main(), before any thread starts.
int run(int argc, char** argv, const extensions& ext = {});

} // namespace prov::app
