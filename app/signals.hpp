#pragma once
// main() blocks SIGINT and SIGTERM in every thread; long-running commands
// (serve, dev-kafka) wait for one of them here.

#include <csignal>

namespace prov::app {

/// Blocks until SIGINT or SIGTERM arrives; returns the signal number.
inline int wait_for_stop_signal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

} // namespace prov::app
