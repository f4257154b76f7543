#include "app/dev_kafka.hpp"
#include "app/signals.hpp"

#include <algorithm>
#include <csignal>
#include <iostream>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "config/config.hpp"
#include "bus/kafka_common.hpp"
#include "bus/kafka_mock.hpp"

namespace {

using namespace prov;
namespace kafka = prov::bus::kafka;

struct dev_kafka_args {
  int brokers = 3;
  int port_base = 0;
  bool port_base_set = false;
  std::string topic_prefix = "dps.";
  int partitions = 12;
};

int fail(const std::string& msg) {
  std::cerr << "provisiond dev-kafka: " << msg << std::endl;
  return 2;
}

int run(const dev_kafka_args& a) {
  if (a.port_base_set)
    return fail(
        "--port-base is not supported: librdkafka 2.0.2's mock cluster binds every broker to "
        "a port the kernel picks on 127.0.0.1 and advertises that port to clients, and it has "
        "no way to choose ports. Use the bootstrap servers printed at start.");

  config::kafka_config cfg;
  cfg.topic_prefix = a.topic_prefix;
  cfg.partitions = a.partitions;
  cfg.replication_factor = std::min(3, a.brokers);
  config::engine_config check;
  check.kafka = cfg;
  check.kafka.brokers = "127.0.0.1:1"; // validated below for real
  if (auto err = config::validate(check)) return fail(err.message);

  // Errors only: the mock's own client logs harmless notices otherwise.
  const kafka::log_fn log = [](int level, std::string_view msg) {
    if (level <= 3) std::cerr << "provisiond dev-kafka: " << msg << std::endl;
  };
  std::unique_ptr<kafka::mock_cluster> mc;
  if (auto err = kafka::mock_cluster::start(a.brokers, mc, log)) return fail(err.message);
  cfg.brokers = mc->bootstrap_servers();
  const auto topics = kafka::topic_table(cfg);
  if (auto err = mc->create_topics(topics)) return fail(err.message);

  std::cout << "provisiond dev-kafka: librdkafka mock cluster with " << a.brokers
            << (a.brokers == 1 ? " broker" : " brokers") << "\n"
            << "  FOR DEVELOPMENT AND TESTS ONLY: everything is kept in memory and lost on\n"
            << "  exit, nothing is really replicated, brokers listen on 127.0.0.1 only.\n"
            << "  Never use it for production data.\n\n"
            << "  bootstrap servers: " << cfg.brokers << "\n"
            << "  topics (" << cfg.partitions << " partitions, replication "
            << cfg.replication_factor << "):\n";
  for (const auto& t : topics)
    std::cout << "    " << t.name << (t.compacted ? "  (compacted)" : "") << "\n";
  std::cout << "\n  [kafka] section for provisiond.toml:\n\n"
            << "[kafka]\n"
            << "brokers = \"" << cfg.brokers << "\"\n"
            << "topic_prefix = \"" << cfg.topic_prefix << "\"\n"
            << "partitions = " << cfg.partitions << "\n"
            << "replication_factor = " << cfg.replication_factor << "\n\n"
            << "# The mock cluster's consumer groups, fetches and producers need these\n"
            << "# (docs/kafka.md gives the values for a real cluster).\n"
            << "[kafka.properties]\n";
  for (const auto& p : kafka::mock_client_properties())
    std::cout << "# " << p.why << "\n\"" << p.name << "\" = \"" << p.value << "\"\n";
  std::cout << "\nprovisiond dev-kafka: running; Ctrl-C (SIGINT) or SIGTERM stops it" << std::endl;

  int sig = app::wait_for_stop_signal();
  std::cout << "provisiond dev-kafka: stopping (signal " << sig
            << "); all topics and offsets are discarded" << std::endl;
  mc.reset();
  return 0;
}

} // namespace

void add_dev_kafka_command(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<dev_kafka_args>();
  auto* cmd = app.add_subcommand(
      "dev-kafka",
      "Start an in-memory Kafka cluster (librdkafka mock) for development and tests only, "
      "not production");
  cmd->footer(
      "The cluster speaks the real Kafka protocol on 127.0.0.1 but keeps everything in "
      "memory: nothing survives exit and nothing is durable. It creates provisiond's topics "
      "and prints the bootstrap servers and a [kafka] config section to paste.\n");
  cmd->add_option("--brokers", args->brokers, "Number of brokers (default 3)")
      ->check(CLI::Range(1, 16));
  cmd->add_option("--port-base", args->port_base,
                  "First broker port. Not supported by librdkafka 2.0.2's mock cluster "
                  "(ports are picked by the kernel); rejected with an explanation")
      ->each([args](const std::string&) { args->port_base_set = true; });
  cmd->add_option("--topic-prefix", args->topic_prefix, "Topic name prefix (default dps.)");
  cmd->add_option("--partitions", args->partitions, "Partitions per topic (default 12)")
      ->check(CLI::Range(1, 10000));
  cmd->callback([args, &exit_code] { exit_code = run(*args); });
}
