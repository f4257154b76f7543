#include "metrics/diagnostic_log.hpp"

#include "messages/json_text.hpp"
#include "messages/registration.hpp"

#include <chrono>
#include <cstdio>
#include <ctime>

#include <spdlog/async.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

namespace prov::metrics {

namespace {

/// The line's own timestamp, taken on the caller's thread so queueing delay
/// does not skew it (DPS format, 7 fractional digits).
void append_time(std::string& out) { out.append(utc_string(now_ms())); }

void field(std::string& out, std::string_view name, std::string_view value) {
  out.push_back(',');
  append_json_string(out, name);
  out.push_back(':');
  append_json_string(out, value);
}

std::string_view result_type(int status) {
  if (status >= 500)
    return "Failure";
  if (status >= 400)
    return "ClientError";
  return "Success";
}

} // namespace

void append_json_string(std::string& out, std::string_view s) {
  json_text::append_string(out, s);
}

std::string mask_ip(std::string_view ip) {
  if (ip.empty())
    return {};
  if (auto v4 = ip.find_last_of('.'); v4 != std::string_view::npos
                                      && ip.find(':') == std::string_view::npos)
    return std::string(ip.substr(0, v4)) + ".XXX";
  // IPv6 (including v4-mapped): keep the first three groups.
  std::size_t pos = 0;
  for (int groups = 0; groups < 3; ++groups) {
    auto next = ip.find(':', pos);
    if (next == std::string_view::npos)
      return "XXXX";
    pos = next + 1;
  }
  return std::string(ip.substr(0, pos)) + ":XXXX";
}

struct diagnostic_log::impl {
  std::shared_ptr<spdlog::details::thread_pool> pool;
  std::shared_ptr<spdlog::async_logger> logger;
};

prov::error diagnostic_log::open(const log_options& opts, std::unique_ptr<diagnostic_log>& out) {
  std::unique_ptr<diagnostic_log> log(new diagnostic_log());
  log->impl_ = std::make_unique<impl>();
  try {
    spdlog::sink_ptr sink;
    if (opts.file.empty())
      sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
    else
      sink = std::make_shared<spdlog::sinks::basic_file_sink_mt>(opts.file, false);
    sink->set_pattern("%v"); // lines are complete JSON documents
    // One writer thread, bounded queue; when it is full the oldest line is
    // dropped (and counted) rather than stalling request threads.
    log->impl_->pool = std::make_shared<spdlog::details::thread_pool>(65536, 1);
    log->impl_->logger = std::make_shared<spdlog::async_logger>(
      "provisiond", sink, log->impl_->pool, spdlog::async_overflow_policy::overrun_oldest);
    log->impl_->logger->set_level(spdlog::level::from_str(opts.level));
    log->impl_->logger->flush_on(spdlog::level::warn);
  } catch (const std::exception& e) {
    return {error_code::bad_request,
            "cannot open log " + (opts.file.empty() ? std::string("stderr") : opts.file)
              + ": " + e.what()};
  }
  out = std::move(log);
  return {};
}

diagnostic_log::~diagnostic_log() {
  if (impl_ && impl_->logger)
    impl_->logger->flush();
}

void diagnostic_log::operation(const operation_record& r) {
  auto level = r.status >= 500 ? spdlog::level::warn : spdlog::level::info;
  if (!impl_->logger->should_log(level))
    return;
  std::string line;
  line.reserve(512);
  line.append("{\"time\":\"");
  append_time(line);
  line.push_back('"');
  field(line, "level", level == spdlog::level::warn ? "Warning" : "Information");
  field(line, "category", r.category);
  field(line, "operationName", r.operation);
  field(line, "resultType", result_type(r.status));
  line.append(",\"resultSignature\":").append(std::to_string(r.status));
  if (!r.error_code.empty())
    field(line, "errorCode", r.error_code);
  if (!r.description.empty())
    field(line, "resultDescription", r.description);
  char dur[32];
  std::snprintf(dur, sizeof(dur), "%.3f", r.duration_ms);
  line.append(",\"durationMs\":").append(dur);
  field(line, "callerIpAddress", mask_ip(r.caller_ip));
  field(line, "correlationId", r.correlation_id);
  if (!r.api_version.empty())
    field(line, "operationVersion", r.api_version);
  line.append(",\"properties\":{\"id\":");
  append_json_string(line, r.id);
  field(line, "type", r.type);
  field(line, "protocol", r.protocol);
  line.append("}}");
  impl_->logger->log(level, line);
}

namespace {
void message(spdlog::async_logger& logger, spdlog::level::level_enum level,
             std::string_view lvl, std::string_view msg) {
  if (!logger.should_log(level))
    return;
  std::string line;
  line.append("{\"time\":\"");
  append_time(line);
  line.push_back('"');
  field(line, "level", lvl);
  field(line, "category", "Service");
  field(line, "message", msg);
  line.push_back('}');
  logger.log(level, line);
}
} // namespace

void diagnostic_log::info(std::string_view msg) {
  message(*impl_->logger, spdlog::level::info, "Information", msg);
}
void diagnostic_log::warn(std::string_view msg) {
  message(*impl_->logger, spdlog::level::warn, "Warning", msg);
}
void diagnostic_log::fail(std::string_view msg) {
  message(*impl_->logger, spdlog::level::err, "Error", msg);
}
void diagnostic_log::flush() { impl_->logger->flush(); }
uint64_t diagnostic_log::dropped() const { return impl_->pool->overrun_counter(); }

} // namespace prov::metrics
