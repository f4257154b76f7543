#include "net/webhook_client.hpp"

#include <map>
#include <memory>

#include "net/https_client.hpp"
#include "messages/ascii.hpp"

namespace prov::net {

namespace {

struct url_parts {
  std::string host;
  uint16_t port = 443;
  std::string target; ///< path and query, "/" at least
};

error parse_url(std::string_view url, url_parts& out) {
  constexpr std::string_view scheme = "https://";
  if (url.size() <= scheme.size() || !ascii::iequals(url.substr(0, scheme.size()), scheme))
    return {error_code::bad_request, "the webhook URL is not an https URL"};
  url.remove_prefix(scheme.size());
  const auto end = url.find_first_of("/?#");
  if (auto err = split_host_port(url.substr(0, end), 443, out.host, out.port))
    return err;
  std::string_view rest = end == std::string_view::npos ? std::string_view{} : url.substr(end);
  rest = rest.substr(0, rest.find('#')); // never sent
  out.target = rest.empty() || rest.front() != '/' ? "/" + std::string(rest) : std::string(rest);
  return {};
}

bool retried_status(int status) {
  return status == 408 || status == 429 || status >= 500;
}

} // namespace

struct webhook_client::origin_pool {
  std::map<std::string, std::unique_ptr<https_client>> clients;
};

webhook_client::webhook_client(webhook_client_options opts) : opts_(std::move(opts)) {
  const int n = opts_.threads < 1 ? 1 : opts_.threads;
  threads_.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i)
    threads_.emplace_back([this] { run(); });
}

webhook_client::~webhook_client() {
  std::deque<call> left;
  {
    std::lock_guard<std::mutex> lk(mtx_);
    stopping_ = true;
    left.swap(queue_);
  }
  cv_.notify_all();
  for (auto& t : threads_)
    t.join();
  for (auto& c : left) {
    webhook_result r;
    r.err = {error_code::unavailable, "provisiond is stopping"};
    c.done(std::move(r));
  }
}

void webhook_client::post(std::string url, std::string body, done_fn done) {
  post(std::move(url), std::move(body), webhook_call_limits{opts_.timeout, opts_.retries},
       std::move(done));
}

void webhook_client::post(std::string url, std::string body, webhook_call_limits limits,
                          done_fn done) {
  {
    std::lock_guard<std::mutex> lk(mtx_);
    if (!stopping_) {
      queue_.push_back({std::move(url), std::move(body), std::move(done), limits});
      cv_.notify_one();
      return;
    }
  }
  webhook_result r;
  r.err = {error_code::unavailable, "provisiond is stopping"};
  done(std::move(r));
}

void webhook_client::run() {
  origin_pool pool;
  for (;;) {
    call c;
    {
      std::unique_lock<std::mutex> lk(mtx_);
      cv_.wait(lk, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty())
        return; // stopping
      c = std::move(queue_.front());
      queue_.pop_front();
    }
    webhook_result r = perform(c, pool);
    try {
      c.done(std::move(r));
    } catch (...) {
      // A callback that throws must not end the thread (and the process).
    }
  }
}

webhook_result webhook_client::perform(const call& c, origin_pool& pool) {
  webhook_result r;
  url_parts u;
  if ((r.err = parse_url(c.url, u)))
    return r;
  // A connection's timeouts are fixed when it is made: one per origin and
  // timeout (enrollments may set their own).
  const std::string origin = u.host + ":" + std::to_string(u.port) + "/"
                             + std::to_string(c.limits.timeout.count());
  auto it = pool.clients.find(origin);
  if (it == pool.clients.end()) {
    if (pool.clients.size() >= 64) // many webhooks: keep no connections to old ones
      pool.clients.clear();
    https_client_options o;
    o.host = u.host;
    o.port = u.port;
    o.ca_file = opts_.ca_file;
    o.connect_timeout = c.limits.timeout;
    o.request_timeout = c.limits.timeout;
    o.max_body_bytes = opts_.max_response_bytes;
    o.user_agent = "provisiond-allocation/0.1";
    it = pool.clients.emplace(origin, std::make_unique<https_client>(std::move(o))).first;
  }
  https_client& http = *it->second;
  http_headers headers;
  headers.add("Content-Type", "application/json; charset=utf-8");
  headers.add("Accept", "application/json");
  auto backoff = opts_.retry_backoff;
  for (int attempt = 0;; ++attempt) {
    https_response resp;
    ++r.attempts;
    r.err = http.request("POST", u.target, headers, c.body, resp);
    if (r.err) {
      r.status = 0;
      r.body.clear();
      http.close();
    } else {
      r.status = resp.status;
      r.body = std::move(resp.body);
    }
    // Not again: invalid requests (bad_request) and oversized answers.
    const bool again = r.err ? r.err.code == error_code::unavailable
                                 || r.err.code == error_code::request_timeout
                                 || r.err.code == error_code::internal
                             : retried_status(r.status);
    if (!again || attempt >= c.limits.retries)
      return r;
    std::unique_lock<std::mutex> lk(mtx_);
    if (cv_.wait_for(lk, backoff, [this] { return stopping_; }))
      return r; // stopping: the last outcome stands
    backoff *= 2;
  }
}

} // namespace prov::net
