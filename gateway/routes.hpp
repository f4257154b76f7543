#pragma once
// The DPS device API and service API on top of the engine.

#include <memory>
#include <string>
#include <vector>

#include "actors/engine.hpp"
#include "config/config.hpp"
#include "net/http_types.hpp"
#include "metrics/diagnostic_log.hpp"
#include "metrics/instruments.hpp"

namespace prov::gateway {

struct routes_options {
  config::engine_config cfg;
  std::string id_scope;
  std::vector<config::access_policy> policies; ///< resolved (configured or generated)
  std::function<bool()> ready;                 ///< for /readyz
  metrics::instruments* metrics = nullptr;     ///< optional: HTTP metrics
  metrics::diagnostic_log* log = nullptr;      ///< optional: one line per operation
};

/// Builds the handler serving device routes (/{idScope}/registrations/...),
/// service routes (/enrollments, /enrollmentGroups, /registrations,
/// /assignments) and /healthz, /readyz.
std::unique_ptr<handler> make_routes(routes_options opts, engine& eng);

/// JSON error response with the Azure error body and x-ms-error-code.
http_response error_response(const error& e, const std::string& tracking_id = {});

} // namespace prov::gateway
