#pragma once
// POSTs to webhooks (the custom allocation webhook) on threads of its own: a
// caller queues a call and gets its answer later through a callback, so
// nothing that calls it (an actor) ever waits on the network. Each thread
// keeps one keep-alive connection per webhook origin. Boost and OpenSSL stay
// in https_client.cpp.

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "messages/error.hpp"

namespace prov::net {

struct webhook_client_options {
  /// PEM file with the CA certificate(s) webhook servers must chain to; empty:
  /// the system trust store.
  std::string ca_file;
  int threads = 4;                            ///< concurrent calls at most
  std::chrono::milliseconds timeout{10'000};  ///< per attempt: connect + TLS, and the exchange
  int retries = 2;                            ///< more attempts after a failed one
  std::chrono::milliseconds retry_backoff{500}; ///< before each retry, doubled every time
  std::size_t max_response_bytes = 1u << 20;
};

/// One call's own limits (an enrollment's), instead of the client's.
struct webhook_call_limits {
  std::chrono::milliseconds timeout{10'000}; ///< per attempt
  int retries = 2;
};

/// The outcome of one call, after its retries.
struct webhook_result {
  error err;        ///< set when no HTTP answer came (connect, TLS, timeout, bad URL)
  int status = 0;   ///< the last answer's HTTP status; 0 when none
  std::string body;
  int attempts = 0;
};

class webhook_client {
public:
  using done_fn = std::function<void(webhook_result)>;

  explicit webhook_client(webhook_client_options opts);
  /// Stops the threads: calls still queued are answered `unavailable`; a call
  /// in progress finishes first (its timeout bounds the wait).
  ~webhook_client();
  webhook_client(const webhook_client&) = delete;
  webhook_client& operator=(const webhook_client&) = delete;

  /// Queues a POST of `body` (JSON) to `url` (https://host[:port]/path?query).
  /// `done` runs exactly once on a client thread (or here, after shutdown).
  /// A call is retried when it got no answer, or a 408, 429 or 5xx one.
  void post(std::string url, std::string body, done_fn done);
  /// The same with this call's own timeout and retries.
  void post(std::string url, std::string body, webhook_call_limits limits, done_fn done);

  const webhook_client_options& options() const noexcept { return opts_; }

private:
  struct call {
    std::string url, body;
    done_fn done;
    webhook_call_limits limits;
  };
  struct origin_pool; ///< one thread's connections, by origin
  void run();
  webhook_result perform(const call& c, origin_pool& pool);

  webhook_client_options opts_;
  std::mutex mtx_;
  std::condition_variable cv_;
  std::deque<call> queue_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

} // namespace prov::net
