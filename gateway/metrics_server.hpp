#pragma once
// The operations listener: plain HTTP on its own thread (normally loopback),
// serving GET /metrics (Prometheus text format), /healthz (process alive) and
// /readyz (storage open, listeners up). Kept apart from the device API so a
// scrape never competes with devices for the TLS port, and so health checks
// work even when the device API is saturated.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "messages/error.hpp"

namespace prov::gateway {

struct metrics_server_options {
  std::string listen = "127.0.0.1:9464"; ///< port 0 = ephemeral
  std::function<std::string()> scrape;   ///< Prometheus text exposition
  /// Empty string = ready; otherwise the reason it is not (503 body).
  std::function<std::string()> not_ready_reason;
};

class metrics_server {
public:
  virtual ~metrics_server() = default;
  [[nodiscard]] static error start(metrics_server_options opts,
                                   std::unique_ptr<metrics_server>& out);
  virtual uint16_t port() const = 0;
  virtual std::string address() const = 0;
  /// Stops accepting and joins the thread. Idempotent.
  virtual void stop() = 0;
};

} // namespace prov::gateway
