#pragma once
// INTERNAL to bus/*.cpp: RAII holders for librdkafka's C handles and
// the one place configuration is turned into an rd_kafka_conf_t. Never
// include this from a header outside bus/kafka_*.cpp.

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <librdkafka/rdkafka.h>

#include "config/config.hpp"
#include "messages/error.hpp"
#include "bus/kafka_common.hpp"

namespace prov::bus::kafka::internal {

struct conf_deleter {
  void operator()(rd_kafka_conf_t* p) const noexcept { rd_kafka_conf_destroy(p); }
};
/// rd_kafka_new() takes ownership of the conf on success only: release() then.
using conf_ptr = std::unique_ptr<rd_kafka_conf_t, conf_deleter>;

struct handle_deleter {
  void operator()(rd_kafka_t* p) const noexcept { rd_kafka_destroy(p); }
};
using handle_ptr = std::unique_ptr<rd_kafka_t, handle_deleter>;

struct partition_list_deleter {
  void operator()(rd_kafka_topic_partition_list_t* p) const noexcept {
    rd_kafka_topic_partition_list_destroy(p);
  }
};
using partition_list_ptr =
    std::unique_ptr<rd_kafka_topic_partition_list_t, partition_list_deleter>;

struct headers_deleter {
  void operator()(rd_kafka_headers_t* p) const noexcept { rd_kafka_headers_destroy(p); }
};
/// rd_kafka_producev() takes ownership of the headers on success only.
using headers_ptr = std::unique_ptr<rd_kafka_headers_t, headers_deleter>;

struct message_deleter {
  void operator()(rd_kafka_message_t* p) const noexcept { rd_kafka_message_destroy(p); }
};
using message_ptr = std::unique_ptr<rd_kafka_message_t, message_deleter>;

using property_list = std::vector<std::pair<std::string, std::string>>;

/// A conf with, in this order: bootstrap.servers and client.id from `cfg`,
/// `defaults` (provisiond's choices a user may override), cfg.properties, then
/// `enforced` (what our guarantees depend on; config validation already keeps
/// these out of cfg.properties). A property librdkafka rejects is reported as
/// "kafka.properties.<name>: <librdkafka's message>".
[[nodiscard]] error make_conf(const config::kafka_config& cfg, const property_list& defaults,
                              const property_list& enforced, conf_ptr& out);

/// `own` (a client's make_conf defaults) plus provisiond's defaults for every
/// long-lived client: producer, group consumers, table readers. Like all
/// defaults, [kafka.properties] overrides them.
property_list client_defaults(property_list own);

/// What every handle's opaque (rd_kafka_conf_set_opaque) points to: the
/// wrapper's state derives from it, so the log callback, which gets only the
/// handle, can find the sink.
struct opaque_base {
  log_fn log;
};

/// Sets `self` as the conf's opaque and, when self->log is set, routes
/// librdkafka's own log lines to it (else librdkafka prints to stderr).
void set_opaque(rd_kafka_conf_t* conf, opaque_base* self);

/// Our error value for a librdkafka error: unavailable (503) for broker-side
/// and transport problems, with librdkafka's text kept as context.
error kafka_error(rd_kafka_resp_err_t err, std::string_view what);

/// Copies the headers of a consumed or delivered message.
std::vector<header> read_headers(const rd_kafka_message_t* m);

/// New librdkafka header list from ours; nullptr when `hs` is empty.
headers_ptr make_headers(const std::vector<header>& hs);

} // namespace prov::bus::kafka::internal
