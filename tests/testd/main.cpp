// provisiond-test: provisiond with the seams only tests use, so the product
// binary carries none of them. Built under tests/, never installed; the
// integration tests that need a seam run it (server_process::set_pipeline_delay_ms).
//
// Environment:
//   PROVISIOND_TEST_PIPELINE_DELAY_MS=N  every hashed, geoLatency and static
//     allocation answers N ms late, so the hand-off from allocation to
//     configuration comes that much later: a test can make register waits
//     expire (device_api.register_wait_ms) at will, change state between
//     the two stages, or stop the process with work in flight.
//   PROVISIOND_TEST_STOP_PAUSE_MS=N  on SIGTERM, the device listeners wait N
//     ms once they take no new clients or MQTT requests, before they wait
//     for the answers in flight: a test can act in that window.
//   PROVISIOND_TEST_TPM_HOLD_DIR=DIR  the TPM challenge store's calls wait
//     at gates the test opens and closes with files in DIR
//     (tests/testd/held_challenges.hpp); with Kafka, the gate
//     `apply-enrollments` holds the dps.enrollments reader before a batch.

#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>

#include "actors/allocation/allocation_policy.hpp"
#include "app/provisiond.hpp"
#include "tests/testd/delayed_policy.hpp"
#include "tests/testd/held_challenges.hpp"

int main(int argc, char** argv) {
  using namespace prov;
  app::extensions ext;
  const char* d = std::getenv("PROVISIOND_TEST_PIPELINE_DELAY_MS");
  if (const int ms = d != nullptr ? std::atoi(d) : 0; ms > 0) {
    const std::chrono::milliseconds delay(ms);
    auto hashed = std::make_shared<allocation::hashed_policy>();
    ext.policies.push_back(
      std::make_shared<test::delayed_policy>(allocation_policy::hashed, hashed, delay));
    ext.policies.push_back(
      std::make_shared<test::delayed_policy>(allocation_policy::geo_latency, hashed, delay));
    ext.policies.push_back(std::make_shared<test::delayed_policy>(
      allocation_policy::static_hub, std::make_shared<allocation::static_policy>(), delay));
  }
  const char* p = std::getenv("PROVISIOND_TEST_STOP_PAUSE_MS");
  if (const int ms = p != nullptr ? std::atoi(p) : 0; ms > 0)
    ext.listeners_stopping = [ms] { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); };
  if (const char* dir = std::getenv("PROVISIOND_TEST_TPM_HOLD_DIR"); dir != nullptr && *dir) {
    ext.wrap_challenges = [d = std::string(dir)](auto inner) {
      return std::make_unique<test::held_challenges>(std::move(inner), d);
    };
    ext.in_challenge_write = [d = std::string(dir)](const char* call) {
      test::held_challenges::gate_at(d, std::string(call) + "-locked");
    };
    ext.before_enrollments_apply = [d = std::string(dir)] {
      test::held_challenges::gate_at(d, "apply-enrollments");
    };
  }
  return app::run(argc, argv, ext);
}
