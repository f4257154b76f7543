#include "net/https_client.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/beast/ssl/ssl_stream.hpp>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "messages/ascii.hpp"

namespace prov::net {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;

namespace {

using ascii::iequals;

// RFC 7230 tchar: what a method token and a field name may contain.
bool is_token(std::string_view s) noexcept {
  if (s.empty()) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    auto u = static_cast<unsigned char>(c);
    return std::isalnum(u) || std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
  });
}

// Field values and targets must not smuggle extra lines into the request.
bool has_ctl(std::string_view s) noexcept {
  return std::any_of(s.begin(), s.end(), [](char c) {
    auto u = static_cast<unsigned char>(c);
    return (u < 0x20 && c != '\t') || u == 0x7f;
  });
}

bool is_ip_literal(const std::string& host) {
  boost::system::error_code ec;
  asio::ip::make_address(host, ec);
  return !ec;
}

// Beast 1.74 speaks boost::string_view.
beast::string_view bsv(std::string_view s) noexcept { return {s.data(), s.size()}; }

// Shutdown waits for the peer's close_notify; never let that stall a caller.
constexpr std::chrono::milliseconds shutdown_timeout{250};

} // namespace

// ---- http_headers --------------------------------------------------------

const std::string* http_headers::find(std::string_view name) const noexcept {
  for (const auto& [k, v] : fields)
    if (iequals(k, name)) return &v;
  return nullptr;
}

std::string http_headers::get(std::string_view name, std::string_view fallback) const {
  const std::string* v = find(name);
  return v ? *v : std::string(fallback);
}

void http_headers::set(std::string_view name, std::string value) {
  fields.erase(std::remove_if(fields.begin(), fields.end(),
                              [&](const auto& f) { return iequals(f.first, name); }),
               fields.end());
  fields.emplace_back(std::string(name), std::move(value));
}

// ---- split_host_port -----------------------------------------------------

error split_host_port(std::string_view text, uint16_t default_port, std::string& host,
                      uint16_t& port) {
  std::string_view h = text;
  std::string_view p;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string_view::npos)
      return {error_code::bad_request, "unterminated '[' in address '" + std::string(text) + "'"};
    h = text.substr(1, close - 1);
    std::string_view rest = text.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':')
        return {error_code::bad_request, "unexpected text after ']' in '" + std::string(text) + "'"};
      p = rest.substr(1);
      if (p.empty()) return {error_code::bad_request, "missing port in '" + std::string(text) + "'"};
    }
  } else {
    auto colon = text.rfind(':');
    // More than one colon without brackets: a bare IPv6 literal.
    if (colon != std::string_view::npos && text.find(':') == colon) {
      h = text.substr(0, colon);
      p = text.substr(colon + 1);
      if (p.empty()) return {error_code::bad_request, "missing port in '" + std::string(text) + "'"};
    }
  }
  if (h.empty()) return {error_code::bad_request, "missing host in '" + std::string(text) + "'"};
  uint32_t value = default_port;
  if (!p.empty()) {
    value = 0;
    for (char c : p) {
      if (c < '0' || c > '9' || value > 65535)
        return {error_code::bad_request, "invalid port in '" + std::string(text) + "'"};
      value = value * 10 + static_cast<uint32_t>(c - '0');
    }
    if (value == 0 || value > 65535)
      return {error_code::bad_request, "port out of range in '" + std::string(text) + "'"};
  }
  host.assign(h);
  port = static_cast<uint16_t>(value);
  return {};
}

// ---- https_client --------------------------------------------------------

struct https_client::impl {
  https_client_options opts;
  asio::io_context ioc{1};
  ssl::context ctx{ssl::context::tls_client};
  error ctx_error;          // sticky: bad CA / client cert files
  std::optional<beast::ssl_stream<beast::tcp_stream>> stream;
  beast::flat_buffer buffer;
  bool open = false;
  uint64_t opened = 0;
  std::string verify_name; // server_name or host
  bool verify_name_is_ip = false;
  std::string host_header;

  explicit impl(https_client_options o) : opts(std::move(o)) {
    verify_name = opts.server_name.empty() ? opts.host : opts.server_name;
    verify_name_is_ip = is_ip_literal(verify_name);
    bool host_is_v6 = opts.host.find(':') != std::string::npos;
    host_header = host_is_v6 ? "[" + opts.host + "]" : opts.host;
    if (opts.port != 443) host_header += ":" + std::to_string(opts.port);
    ctx_error = setup_context();
  }

  error setup_context() {
    SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_2_VERSION);
    boost::system::error_code ec;
    if (opts.insecure_skip_verify) {
      ctx.set_verify_mode(ssl::verify_none);
    } else {
      ctx.set_verify_mode(ssl::verify_peer);
      if (!opts.ca_pem.empty()) {
        ctx.add_certificate_authority(asio::buffer(opts.ca_pem), ec);
        if (ec) return {error_code::bad_request, "invalid CA PEM: " + ec.message()};
      } else if (!opts.ca_file.empty()) {
        // OpenSSL's own message for a missing file is just "asio.ssl error".
        if (std::FILE* f = std::fopen(opts.ca_file.c_str(), "rb")) {
          std::fclose(f);
        } else {
          return {error_code::bad_request,
                  "cannot read CA file '" + opts.ca_file + "': " + std::strerror(errno)};
        }
        ctx.load_verify_file(opts.ca_file, ec);
        if (ec)
          return {error_code::bad_request,
                  "cannot load CA file '" + opts.ca_file + "': " + ec.message()};
      } else {
        ctx.set_default_verify_paths(ec);
        if (ec) return {error_code::bad_request, "no default trust store: " + ec.message()};
      }
    }
    if (!opts.client_cert_file.empty()) {
      ctx.use_certificate_chain_file(opts.client_cert_file, ec);
      if (ec)
        return {error_code::bad_request,
                "cannot load client certificate '" + opts.client_cert_file + "': " + ec.message()};
      const std::string& key = opts.client_key_file.empty() ? opts.client_cert_file
                                                            : opts.client_key_file;
      ctx.use_private_key_file(key, ssl::context::pem, ec);
      if (ec)
        return {error_code::bad_request,
                "cannot load client key '" + key + "': " + ec.message()};
    }
    return {};
  }

  // Runs the queued handlers to completion (every op has its own deadline).
  void run() {
    ioc.restart();
    ioc.run();
  }

  error failure(std::string_view what, const boost::system::error_code& ec) {
    if (ec == beast::error::timeout)
      return {error_code::request_timeout, std::string(what) + " timed out"};
    std::string msg = std::string(what) + " failed: " + ec.message();
    if (stream && ec.category() == asio::error::get_ssl_category()) {
      long vr = SSL_get_verify_result(stream->native_handle());
      if (vr != X509_V_OK)
        msg += std::string(" (") + X509_verify_cert_error_string(vr) + ")";
    }
    return {error_code::unavailable, std::move(msg)};
  }

  error do_connect() {
    if (ctx_error) return ctx_error;
    drop();
    const auto deadline = opts.connect_timeout;
    std::string where = host_header;

    // Resolve (IP literals skip the resolver).
    std::vector<tcp::endpoint> endpoints;
    boost::system::error_code ec;
    if (is_ip_literal(opts.host)) {
      endpoints.emplace_back(asio::ip::make_address(opts.host), opts.port);
    } else {
      tcp::resolver resolver(ioc);
      bool done = false;
      resolver.async_resolve(opts.host, std::to_string(opts.port),
                             [&](const boost::system::error_code& e,
                                 tcp::resolver::results_type r) {
                               done = true;
                               ec = e;
                               for (const auto& entry : r) endpoints.push_back(entry.endpoint());
                             });
      ioc.restart();
      ioc.run_for(deadline);
      if (!done) {
        resolver.cancel();
        run();
        return {error_code::request_timeout, "resolving " + opts.host + " timed out"};
      }
      if (ec) return {error_code::unavailable, "cannot resolve " + opts.host + ": " + ec.message()};
    }

    stream.emplace(ioc, ctx);
    beast::tcp_stream& tcp = beast::get_lowest_layer(*stream);
    tcp.expires_after(deadline);
    tcp.async_connect(endpoints, [&](const boost::system::error_code& e,
                                     const tcp::endpoint&) { ec = e; });
    run();
    if (ec) {
      error err = failure("connect to " + where, ec);
      drop();
      return err;
    }
    tcp.socket().set_option(tcp::no_delay(true), ec); // small requests: no Nagle delay

    SSL* ssl_handle = stream->native_handle();
    if (!opts.insecure_skip_verify) {
      if (verify_name_is_ip) {
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl_handle), verify_name.c_str());
      } else {
        SSL_set1_host(ssl_handle, verify_name.c_str());
      }
    }
    // SNI carries DNS names only (RFC 6066 §3).
    if (!verify_name_is_ip) SSL_set_tlsext_host_name(ssl_handle, verify_name.c_str());

    stream->async_handshake(ssl::stream_base::client,
                            [&](const boost::system::error_code& e) { ec = e; });
    run();
    if (ec) {
      error err = failure("TLS handshake with " + where, ec);
      drop();
      return err;
    }
    tcp.expires_never();
    open = true;
    ++opened;
    return {};
  }

  // Forgets the connection without a TLS goodbye.
  void drop() noexcept {
    if (stream) {
      boost::system::error_code ignored;
      beast::get_lowest_layer(*stream).socket().close(ignored);
      run(); // let cancelled handlers (if any) finish
      stream.reset();
    }
    buffer.clear();
    open = false;
  }

  void shutdown() noexcept {
    if (stream && open) {
      beast::get_lowest_layer(*stream).expires_after(shutdown_timeout);
      stream->async_shutdown([](const boost::system::error_code&) {});
      run();
    }
    drop();
  }

  // One request/response on the open connection. `got_response_bytes` tells
  // the caller whether a retry could duplicate a request the server saw.
  error exchange(const http::request<http::string_body>& req, https_response& out,
                 bool& got_response_bytes) {
    got_response_bytes = false;
    beast::tcp_stream& tcp = beast::get_lowest_layer(*stream);
    tcp.expires_after(opts.request_timeout); // one deadline for write + read
    boost::system::error_code ec;
    http::async_write(*stream, req,
                      [&](const boost::system::error_code& e, std::size_t) { ec = e; });
    run();
    if (ec) return failure("sending request", ec);

    http::response_parser<http::string_body> parser;
    parser.body_limit(opts.max_body_bytes);
    parser.header_limit(64 * 1024);
    if (req.method() == http::verb::head) parser.skip(true);
    // Header first, then body: Beast 1.74's one-shot async_read skipped the
    // Content-Length vs body_limit check in our tests.
    http::async_read_header(*stream, buffer, parser,
                            [&](const boost::system::error_code& e, std::size_t) { ec = e; });
    run();
    if (!ec && !parser.is_done()) {
      http::async_read(*stream, buffer, parser,
                       [&](const boost::system::error_code& e, std::size_t) { ec = e; });
      run();
    }
    got_response_bytes = parser.got_some() || buffer.size() > 0;
    if (ec == http::error::body_limit)
      return {error_code::payload_too_large,
              "response body exceeds " + std::to_string(opts.max_body_bytes) + " bytes"};
    if (ec) return failure("reading response", ec);
    tcp.expires_never();

    auto msg = parser.release();
    out.status = static_cast<int>(msg.result_int());
    out.reason = std::string(msg.reason());
    out.headers.fields.clear();
    for (const auto& f : msg)
      out.headers.add(std::string(f.name_string()), std::string(f.value()));
    out.body = std::move(msg.body());
    if (!msg.keep_alive() || msg.need_eof() || !opts.reuse_connection) shutdown();
    return {};
  }
};

https_client::https_client(https_client_options opts)
    : impl_(std::make_unique<impl>(std::move(opts))) {}
https_client::~https_client() {
  if (impl_) impl_->shutdown();
}
https_client::https_client(https_client&&) noexcept = default;
https_client& https_client::operator=(https_client&& other) noexcept {
  if (this != &other) {
    if (impl_) impl_->shutdown();
    impl_ = std::move(other.impl_);
  }
  return *this;
}

const https_client_options& https_client::options() const noexcept { return impl_->opts; }
bool https_client::connected() const noexcept { return impl_->open; }
uint64_t https_client::connections_opened() const noexcept { return impl_->opened; }

error https_client::connect() {
  if (impl_->open) return {};
  return impl_->do_connect();
}

void https_client::close() noexcept { impl_->shutdown(); }

error https_client::request(std::string_view method, std::string_view target,
                            const http_headers& headers, std::string_view body,
                            https_response& out) {
  out = https_response{};
  if (!is_token(method))
    return {error_code::bad_request, "invalid HTTP method '" + std::string(method) + "'"};
  if (target.empty() || target.front() != '/' || has_ctl(target) ||
      target.find(' ') != std::string_view::npos)
    return {error_code::bad_request, "invalid request target '" + std::string(target) + "'"};
  for (const auto& [k, v] : headers.fields) {
    if (!is_token(k)) return {error_code::bad_request, "invalid header name '" + k + "'"};
    if (has_ctl(v)) return {error_code::bad_request, "invalid value for header '" + k + "'"};
  }

  try {
    http::request<http::string_body> req;
    http::verb verb = http::string_to_verb(bsv(method));
    if (verb == http::verb::unknown) {
      req.method_string(bsv(method));
    } else {
      req.method(verb);
    }
    req.target(bsv(target));
    req.version(11);
    for (const auto& [k, v] : headers.fields) req.insert(k, v);
    if (!headers.contains("Host")) req.set(http::field::host, impl_->host_header);
    if (!headers.contains("User-Agent") && !impl_->opts.user_agent.empty())
      req.set(http::field::user_agent, impl_->opts.user_agent);
    if (!impl_->opts.reuse_connection) req.set(http::field::connection, "close");
    req.body() = std::string(body);
    // Content-Length always for bodies (and for PUT/POST without one, as
    // servers may require it); GET/HEAD/DELETE without body send none.
    if (!headers.contains("Content-Length") && !headers.contains("Transfer-Encoding")) {
      if (!body.empty() || verb == http::verb::put || verb == http::verb::post ||
          verb == http::verb::patch)
        req.content_length(body.size());
    }

    for (int attempt = 0;; ++attempt) {
      bool reused = impl_->open;
      if (!reused) {
        if (error err = impl_->do_connect()) return err;
      }
      bool got_bytes = false;
      error err = impl_->exchange(req, out, got_bytes);
      if (!err) return {};
      impl_->drop();
      // An idle keep-alive connection the server already closed fails before
      // any response byte: safe to replay once on a fresh connection.
      bool stale = reused && !got_bytes && err.code != error_code::request_timeout &&
                   err.code != error_code::payload_too_large;
      if (!stale || attempt > 0) return err;
    }
  } catch (const std::exception& e) {
    // Beast throws only on allocation failure or invalid field text.
    impl_->drop();
    return {error_code::internal, std::string("https client: ") + e.what()};
  }
}

} // namespace prov::net
