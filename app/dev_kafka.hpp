#pragma once
// `provisiond dev-kafka`: a throwaway Kafka cluster for development and
// tests (librdkafka's mock cluster), with provisiond's topics created.

namespace CLI {
class App;
}

/// Registers `dev-kafka` on `app`. When it runs, it stores its process exit
/// status in `exit_code` (0 after SIGINT/SIGTERM, 2 on bad options).
void add_dev_kafka_command(CLI::App& app, int& exit_code);
