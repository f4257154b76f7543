#include "bus/kafka_dead_letter.hpp"

#include <memory>

namespace prov::bus::kafka {

record dead_letter_record(const std::string& dead_letter_topic, const message& original,
                          std::string_view reason) {
  record r;
  r.topic = dead_letter_topic;
  r.key = original.key;
  r.value = original.value;
  r.headers = original.headers;
  r.headers.push_back({std::string(dlq_reason), std::string(reason)});
  r.headers.push_back({std::string(dlq_topic), original.id.topic});
  r.headers.push_back({std::string(dlq_partition), std::to_string(original.id.partition)});
  r.headers.push_back({std::string(dlq_offset), std::to_string(original.id.offset)});
  r.headers.push_back({std::string(dlq_timestamp), std::to_string(original.timestamp_ms)});
  return r;
}

namespace {

struct dead_letter_job {
  producer* p;
  std::function<void()> written;
  record rec;
  message_id id;
  log_fn log;
  int attempts_left;
};

void attempt(std::shared_ptr<dead_letter_job> job) {
  auto give_up = [](const dead_letter_job& j, const std::string& why) {
    write_log(j.log, 3,
              "dead letter for " + j.id.topic + "/" + std::to_string(j.id.partition) + "@" +
                  std::to_string(j.id.offset) + " not written (" + why +
                  "); it stays uncommitted and is redelivered later");
  };
  --job->attempts_left;
  const error err = job->p->send(job->rec, [job, give_up](const delivery& d) {
    if (d.err.ok()) {
      if (job->written) job->written();
      return;
    }
    if (job->attempts_left > 0) return attempt(job);
    give_up(*job, d.err.message);
  });
  if (err) give_up(*job, err.message);
}

} // namespace

void forward_to_dead_letter(producer& p, const std::string& dead_letter_topic,
                            const message& original, std::string_view reason,
                            std::function<void()> written, const log_fn& log, int attempts) {
  auto job = std::make_shared<dead_letter_job>(dead_letter_job{
      &p, std::move(written), dead_letter_record(dead_letter_topic, original, reason), original.id, log,
      attempts < 1 ? 1 : attempts});
  attempt(std::move(job));
}

} // namespace prov::bus::kafka
