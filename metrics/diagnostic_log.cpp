#include "metrics/diagnostic_log.hpp"

#include "messages/json_text.hpp"
#include "messages/registration.hpp"

#include <atomic>
#include <cmath>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

namespace prov::metrics {

namespace {

/// The line's own timestamp, taken on the caller's thread so queueing delay
/// does not skew it (DPS format, 7 fractional digits).
void append_time(std::string& out) { out.append(utc_chars(now_ms()).view()); }

/// Member names are literals here, so they need no escaping.
void field(std::string& out, std::string_view name, std::string_view value) {
  json_text::append_member(out, true, name, value);
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

// Lines are appended to a shared buffer; one writer thread hands the buffer
// to a synchronous spdlog logger every 100 ms (or when 256 KiB are pending,
// or at once for warnings). spdlog's own async logger wakes its thread for
// every line (a futex wake-up and a context switch each), which cost 10-20%
// of the server's CPU per device at full load (docs/performance.md).
struct diagnostic_log::impl {
  static constexpr std::size_t wake_bytes = 256 * 1024;
  static constexpr std::size_t max_pending_bytes = 16u << 20; // then drop, never block

  std::shared_ptr<spdlog::logger> logger; // synchronous; used by the writer only
  spdlog::level::level_enum level = spdlog::level::info;

  std::mutex mu;
  std::condition_variable cv;      // wakes the writer
  std::condition_variable drained; // wakes flush()
  std::string pending;             // complete lines, '\n'-separated
  uint64_t enqueued = 0, written = 0;
  bool urgent = false, stopping = false;
  std::atomic<uint64_t> dropped{0};
  std::thread writer;

  bool should_log(spdlog::level::level_enum l) const { return l >= level; }

  void enqueue(std::string_view line, bool flush_now) {
    std::unique_lock<std::mutex> lk(mu);
    if (pending.size() + line.size() + 1 > max_pending_bytes) {
      dropped.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    pending.append(line);
    pending.push_back('\n');
    ++enqueued;
    if (flush_now || pending.size() >= wake_bytes) {
      urgent = true;
      lk.unlock();
      cv.notify_one();
    }
  }

  void run() {
    std::string batch;
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      cv.wait_for(lk, std::chrono::milliseconds(100), [&] { return urgent || stopping; });
      urgent = false;
      batch.swap(pending);
      auto upto = enqueued;
      bool stop = stopping;
      lk.unlock();
      if (!batch.empty()) {
        batch.pop_back(); // the sink ends the record with its own newline
        try {
          // Levels were checked at enqueue; the logger passes everything.
          logger->log(spdlog::level::info, spdlog::string_view_t(batch.data(), batch.size()));
          logger->flush();
        } catch (...) {
          // A full disk must not take the service down; lines are lost.
        }
        batch.clear();
      }
      lk.lock();
      written = upto;
      drained.notify_all();
      if (stop && pending.empty())
        return;
    }
  }
};

prov::error diagnostic_log::open(const log_options& opts, std::unique_ptr<diagnostic_log>& out) {
  std::unique_ptr<diagnostic_log> log(new diagnostic_log());
  log->impl_ = std::make_unique<impl>();
  auto& im = *log->impl_;
  try {
    spdlog::sink_ptr sink;
    if (opts.file.empty()) {
      sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
    } else {
      // The file names callers, policies and client addresses: created 0600
      // here rather than by spdlog's fopen(), whose mode is whatever the
      // umask leaves. An existing file that group or others may read (an
      // older version's, or made by hand) is tightened to 0600 when it is
      // ours; another user's file is not ours to change: a warning names it.
      int fd = ::open(opts.file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
      if (fd < 0)
        return {error_code::bad_request,
                "cannot open log " + opts.file + ": " + std::strerror(errno)};
      struct stat st {};
      if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 077) != 0) {
        char mode[8];
        std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
        if (st.st_uid == ::geteuid() && ::fchmod(fd, 0600) == 0) {
          std::fprintf(stderr, "provisiond: log file '%s' was mode %s: changed to 0600\n",
                       opts.file.c_str(), mode);
        } else {
          const std::string why = st.st_uid == ::geteuid()
                                    ? std::string("chmod failed: ") + std::strerror(errno)
                                    : "owned by uid " + std::to_string(st.st_uid) +
                                        ", not this process's user";
          std::fprintf(stderr,
                       "provisiond: WARNING: log file '%s' is mode %s, so other users can read "
                       "it (%s): chmod 600 it\n",
                       opts.file.c_str(), mode, why.c_str());
        }
      }
      ::close(fd);
      sink = std::make_shared<spdlog::sinks::basic_file_sink_mt>(opts.file, false);
    }
    sink->set_pattern("%v"); // lines are complete JSON documents
    im.logger = std::make_shared<spdlog::logger>("provisiond", sink);
    im.logger->set_level(spdlog::level::trace);
    im.level = spdlog::level::from_str(opts.level);
  } catch (const std::exception& e) {
    return {error_code::bad_request,
            "cannot open log " + (opts.file.empty() ? std::string("stderr") : opts.file)
              + ": " + e.what()};
  }
  im.writer = std::thread([&im] {
    pthread_setname_np(pthread_self(), "prov-log");
    im.run();
  });
  out = std::move(log);
  return {};
}

diagnostic_log::~diagnostic_log() {
  if (!impl_)
    return;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_one();
  if (impl_->writer.joinable())
    impl_->writer.join();
}

void append_fixed3(std::string& out, double v) {
  // Integer thousandths while they fit comfortably in 64 bits; NaN, inf and
  // huge values go to snprintf.
  if (!(v > -1e15 && v < 1e15)) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.3f", v);
    out.append(buf);
    return;
  }
  auto t = std::llround(v * 1000.0);
  if (t < 0) {
    out.push_back('-');
    t = -t;
  } else if (std::signbit(v)) {
    out.push_back('-'); // "-0.000", as printf writes a small negative or -0
  }
  out.append(std::to_string(t / 1000));
  const auto frac = static_cast<int>(t % 1000);
  const char digits[4] = {'.', static_cast<char>('0' + frac / 100),
                          static_cast<char>('0' + frac / 10 % 10),
                          static_cast<char>('0' + frac % 10)};
  out.append(digits, 4);
}

void diagnostic_log::operation(const operation_record& r) {
  auto level = r.status >= 500 ? spdlog::level::warn : spdlog::level::info;
  if (!impl_->should_log(level))
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
  line.append(",\"durationMs\":");
  append_fixed3(line, r.duration_ms);
  field(line, "callerIpAddress", mask_ip(r.caller_ip));
  field(line, "correlationId", r.correlation_id);
  if (!r.api_version.empty())
    field(line, "operationVersion", r.api_version);
  line.append(",\"properties\":{\"id\":");
  append_json_string(line, r.id);
  field(line, "type", r.type);
  field(line, "protocol", r.protocol);
  line.append("}}");
  impl_->enqueue(line, level >= spdlog::level::warn);
}

void diagnostic_log::audit(const audit_record& r) {
  std::string line;
  line.reserve(512);
  line.append("{\"time\":\"");
  append_time(line);
  line.push_back('"');
  field(line, "level", "Information");
  field(line, "category", "Audit");
  field(line, "operationName", r.operation);
  if (r.status != 0) {
    field(line, "resultType", result_type(r.status));
    line.append(",\"resultSignature\":").append(std::to_string(r.status));
  } else {
    field(line, "resultType", r.error_code.empty() ? "Success" : "Failure");
  }
  if (!r.error_code.empty())
    field(line, "errorCode", r.error_code);
  if (!r.description.empty())
    field(line, "resultDescription", r.description);
  field(line, "identity", r.identity);
  line.append(",\"authenticated\":").append(r.authenticated ? "true" : "false");
  field(line, "callerIpAddress", r.caller_ip);
  if (!r.correlation_id.empty())
    field(line, "correlationId", r.correlation_id);
  if (!r.api_version.empty())
    field(line, "operationVersion", r.api_version);
  line.append(",\"properties\":{\"id\":");
  append_json_string(line, r.id);
  field(line, "type", r.type);
  field(line, "protocol", r.protocol);
  if (!r.mode.empty())
    field(line, "mode", r.mode);
  if (!r.ids.empty()) {
    line.append(",\"ids\":[");
    for (std::size_t i = 0; i < r.ids.size(); ++i) {
      if (i) line.push_back(',');
      append_json_string(line, r.ids[i]);
    }
    line.push_back(']');
  }
  if (r.ids_total > 0)
    line.append(",\"idsTotal\":").append(std::to_string(r.ids_total));
  line.append("}}");
  impl_->enqueue(line, /*flush_now=*/true);
}

namespace {
std::string message_line(std::string_view lvl, std::string_view msg) {
  std::string line;
  line.append("{\"time\":\"");
  append_time(line);
  line.push_back('"');
  field(line, "level", lvl);
  field(line, "category", "Service");
  field(line, "message", msg);
  line.push_back('}');
  return line;
}
} // namespace

void diagnostic_log::info(std::string_view msg) {
  if (impl_->should_log(spdlog::level::info))
    impl_->enqueue(message_line("Information", msg), false);
}
void diagnostic_log::warn(std::string_view msg) {
  if (impl_->should_log(spdlog::level::warn))
    impl_->enqueue(message_line("Warning", msg), true);
}
void diagnostic_log::fail(std::string_view msg) {
  if (impl_->should_log(spdlog::level::err))
    impl_->enqueue(message_line("Error", msg), true);
}

void diagnostic_log::flush() {
  std::unique_lock<std::mutex> lk(impl_->mu);
  auto target = impl_->enqueued;
  impl_->urgent = true;
  impl_->cv.notify_one();
  impl_->drained.wait(lk, [&] { return impl_->written >= target || impl_->stopping; });
}

uint64_t diagnostic_log::dropped() const {
  return impl_->dropped.load(std::memory_order_relaxed);
}

} // namespace prov::metrics
