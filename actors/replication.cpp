#include "actors/replication.hpp"

#include "actors/attestation/tpm.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/configuration/cloud_event.hpp"
#include "actors/configuration/terminal_state.hpp"
#include "actors/engine_context.hpp"
#include "actors/enrollment/ca_store.hpp"
#include "actors/hub_store.hpp"
#include "bus/kafka_bus.hpp"
#include "bus/kafka_table.hpp"
#include "metrics/instruments.hpp"
#include "storage/keyring.hpp"

namespace prov {

namespace kafka = bus::kafka;

namespace {

constexpr int write_wait_ms = 15000;
constexpr int catch_up_ms = 10 * 60 * 1000;

constexpr std::string_view enrollment_prefix = "enrollment/";
constexpr std::string_view group_prefix = "group/";
constexpr std::string_view certificate_prefix = "certificate/";
/// A linked hub (actors/allocation/linked_hubs.hpp), key lower(host name).
constexpr std::string_view hub_prefix = "hub/";
/// The hub set was seeded (actors/hub_store.hpp): once per deployment.
constexpr std::string_view hubs_seeded_record_key = "deployment/hubs_seeded";
constexpr std::string_view hubs_seed_claim_record_key = "deployment/hubs_seed_claim";
/// A TPM challenge (actors/attestation/tpm.hpp): any gateway checks the answer.
constexpr std::string_view challenge_prefix = "tpm-challenge/";
/// Meta key: this data dir's outbox is not kept (a process without gateway).
constexpr std::string_view no_outbox_key = "outbox.not_kept";
/// dps.enrollments key of the deployment's id scope (devices sign it, so every
/// gateway and attestation worker of one deployment must use the same), and
/// the meta key it is materialized under.
constexpr std::string_view scope_record_key = "deployment/id_scope";
constexpr std::string_view scope_meta_key = "deployment.id_scope";
/// dps.enrollments key of a value sealed under the deployment's key, and the
/// meta key it is kept under (still sealed): a process that cannot open it
/// does not hold the key its peers seal with, and refuses to start.
constexpr std::string_view key_check_record_key = "deployment/secrets_check";
constexpr std::string_view key_check_meta_key = "deployment.secrets_check";
constexpr std::string_view key_check_plain = "provisiond dps.enrollments key check";

/// Records of dps.enrollments whose values are sealed (when this process has
/// a keyring): those of the store's sealed families, which hold enrollment
/// and group keys, TPM challenge state and CA entries (docs/security.md).
bool sealed_record_key(std::string_view key) noexcept {
  for (auto p : {enrollment_prefix, group_prefix, certificate_prefix, challenge_prefix})
    if (key.substr(0, p.size()) == p)
      return true;
  return key == key_check_record_key;
}

/// A sealed record's authenticated data: its key, under a name of its own
/// (not the topic's, which a deployment may prefix), so a value copied to
/// another record, or between the topic and RocksDB, does not open.
std::string record_aad(std::string_view key) {
  std::string a("kafka:dps.enrollments/");
  a += key;
  return a;
}

/// Why a dps.enrollments value is not a stored enrollment document for
/// `key` (empty when it is): a JSON object whose id field names the key.
std::string enrollment_doc_problem(bool group, std::string_view key, const std::string& value) {
  auto j = nlohmann::json::parse(value, nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return "the value is not a JSON object";
  const char* field = group ? "enrollmentGroupId" : "registrationId";
  auto it = j.find(field);
  if (it == j.end() || !it->is_string())
    return std::string("the document has no ") + field;
  if (enrollment::key_of(it->get<std::string>()) != key)
    return std::string("the key does not match the document's ") + field;
  return {};
}

/// The same for a CA store entry (every field typed as the store writes it:
/// a wrong-typed one would otherwise throw on the table reader thread).
std::string certificate_doc_problem(std::string_view key, const std::string& value) {
  auto j = nlohmann::json::parse(value, nullptr, false);
  if (j.is_discarded())
    return "the value is not a JSON object";
  return enrollment::ca_doc_problem(key, j);
}

std::string position_prefix(const std::string& topic) {
  return "kafka.position/" + topic + "/";
}

/// Positions a reader stored with its last applied batch.
error load_positions(const storage::store& store, const std::string& topic,
                     std::map<int32_t, int64_t>& out) {
  const auto prefix = position_prefix(topic);
  return store.scan(storage::cf::meta, prefix, 0, [&](std::string_view k, std::string_view v) {
    if (k.substr(0, prefix.size()) != prefix)
      return false;
    try {
      out[std::stoi(std::string(k.substr(prefix.size())))] = std::stoll(std::string(v));
    } catch (...) {
      // unreadable: that partition starts from the beginning (re-applying is safe)
    }
    return true;
  });
}

/// Adds the positions after `batch` to `wb` (same atomic write). Tables are
/// written `replayable` (not fsync'd): the topic has every record, and a
/// lost tail takes its positions with it, so it is applied again on start.
/// (Except outbox appends, see apply_registrations.)
void add_positions(storage::write_batch& wb, const std::string& topic,
                   const std::vector<kafka::message>& batch) {
  std::map<int32_t, int64_t> next;
  for (const auto& m : batch)
    next[m.id.partition] = std::max(next[m.id.partition], m.id.offset + 1);
  for (const auto& [p, off] : next)
    wb.put(storage::cf::meta, position_prefix(topic) + std::to_string(p), std::to_string(off));
}

void progress_line(const std::string& topic, int64_t done, int64_t total) {
  std::fprintf(stderr, "provisiond: catching up %s: %lld/%lld records\n", topic.c_str(),
               static_cast<long long>(done), static_cast<long long>(total));
}

class replication_impl final : public replication {
public:
  replication_impl(engine_context& ctx, kafka::kafka_bus& bus) : ctx_(ctx), bus_(bus) {}
  ~replication_impl() override { close(); }

  error start() {
    const auto& kcfg = ctx_.opts.cfg.kafka;
    std::optional<std::string> last;
    if (auto err = ctx_.store->last_key(storage::cf::outbox, last))
      return err;
    next_seq_ = last ? storage::parse_seq_key(*last) + 1 : 1;
    // Without the gateway role the outbox is not kept (nothing serves it).
    // Such a data dir must not later serve GET /assignments with holes.
    std::optional<std::string> no_outbox;
    if (auto err = ctx_.store->get(storage::cf::meta, no_outbox_key, no_outbox))
      return err;
    if (ctx_.opts.cfg.roles.gateway && no_outbox)
      return {error_code::bad_request,
              "this data dir was used by a process without the gateway role, so its "
              "assignment outbox is incomplete; start a gateway with an empty data_dir (it "
              "rebuilds its state from the Kafka topics)"};
    if (!ctx_.opts.cfg.roles.gateway && !no_outbox) {
      storage::write_batch wb;
      wb.put(storage::cf::meta, std::string(no_outbox_key), "1");
      if (auto err = ctx_.store->write(wb))
        return err;
    }
    enrollments_topic_ = kafka::enrollments_topic(kcfg);
    keys_ = storage::attached_keyring(*ctx_.store);
    registrations_topic_ = kafka::registrations_topic(kcfg);
    completed_topic_ = kafka::topic_for(kcfg, bus::topic::registration_completed);
    if (auto err = open_table(enrollments_topic_,
                              [this](const auto& b) { return apply_enrollments(b); },
                              enrollments_))
      return err;
    if (auto err = check_id_scope())
      return err;
    if (auto err = check_keys())
      return err;
    if (auto err = open_table(registrations_topic_,
                              [this](const auto& b) { return apply_registrations(b); },
                              registrations_))
      return err;
    return {};
  }

  error follow_completed(completed_fn on_applied) override {
    on_completed_ = std::move(on_applied);
    return open_table(completed_topic_, [this](const auto& b) { return apply_completed(b); }, completed_);
  }

  error write_enrollments(const storage::write_batch& batch) override {
    std::vector<kafka::record> recs;
    for (const auto& op : batch.ops()) {
      kafka::record r;
      r.topic = enrollments_topic_;
      if (op.family == storage::cf::meta && op.key == hubs_seeded_key)
        r.key = std::string(hubs_seeded_record_key);
      else if (op.family == storage::cf::meta && op.key == hubs_seed_claim_key)
        r.key = std::string(hubs_seed_claim_record_key);
      else
        r.key = std::string(op.family == storage::cf::groups           ? group_prefix
                            : op.family == storage::cf::tpm_challenges ? challenge_prefix
                            : op.family == storage::cf::certificates   ? certificate_prefix
                            : op.family == storage::cf::hubs           ? hub_prefix
                                                                       : enrollment_prefix)
                + op.key;
      r.value = op.value;
      r.tombstone = op.is_delete;
      if (op.family == storage::cf::certificates && op.is_delete) {
        // A marker, not a null: it carries the revision that orders it
        // against writes computed from the state it deletes.
        std::string name;
        int64_t rev = 0;
        if (auto err = certificate_state(op.key, name, rev))
          return err;
        r.value = enrollment::ca_deleted_marker(name.empty() ? op.key : name, rev + 1).dump();
        r.tombstone = false;
      }
      recs.push_back(std::move(r));
    }
    if (auto err = publish_and_wait(std::move(recs), *enrollments_))
      return err;
    return check_certificate_writes(batch);
  }

  error catch_up_enrollments(int timeout_ms) override {
    return enrollments_->wait_caught_up(timeout_ms);
  }

  int64_t table_lag(std::string_view table) const override {
    const std::unique_ptr<kafka::table_reader>* t = table == "enrollments"     ? &enrollments_
                                                    : table == "registrations" ? &registrations_
                                                    : table == "completed"     ? &completed_
                                                                               : nullptr;
    return t && *t ? (*t)->lag() : 0;
  }

  error write_registrations(const storage::write_batch& batch) override {
    std::vector<kafka::record> recs;
    for (const auto& op : batch.ops()) {
      kafka::record r;
      r.topic = registrations_topic_;
      r.key = op.key;
      r.value = op.value;
      r.tombstone = op.is_delete;
      recs.push_back(std::move(r));
    }
    return publish_and_wait(std::move(recs), *registrations_);
  }

  void publish_assignment(const operation_record& update, done_fn done) override {
    kafka::record r;
    r.topic = registrations_topic_;
    r.key = enrollment::key_of(update.registration_id);
    r.value = encode_record(update);
    auto shared = std::make_shared<done_fn>(std::move(done));
    if (auto err = bus_.send_record(std::move(r),
                                    [shared](const kafka::delivery& d) { (*shared)(d.err); }))
      (*shared)(err);
  }

  void close() override {
    for (auto* t : {&completed_, &registrations_, &enrollments_})
      if (*t)
        (*t)->close();
    // It holds a strong handle to the registration actor, which holds the
    // engine context, which holds this: drop it or shutdown waits forever.
    on_completed_ = nullptr;
  }

private:
  using apply_fn = kafka::table_reader::apply_fn;

  error open_table(const std::string& topic, apply_fn apply,
                   std::unique_ptr<kafka::table_reader>& out) {
    kafka::table_reader::options o;
    o.topic = topic;
    if (auto err = load_positions(*ctx_.store, topic, o.start))
      return err;
    o.log = [](int level, std::string_view msg) {
      if (level <= 4)
        std::fprintf(stderr, "provisiond kafka: %.*s\n", static_cast<int>(msg.size()),
                     msg.data());
    };
    if (topic == enrollments_topic_) // only its reader thread sets the flag
      o.is_permanent = [this](const error&) { return key_missing_; };
    if (auto err = kafka::table_reader::create(ctx_.opts.cfg.kafka, std::move(o),
                                               std::move(apply), out))
      return err;
    return out->wait_caught_up(catch_up_ms, [topic](int64_t done, int64_t total) {
      progress_line(topic, done, total);
    });
  }

  /// Devices sign the id scope, so processes that accept registrations
  /// (gateway, attestation) must all use the deployment's. The first gateway
  /// records its scope in dps.enrollments; later ones and attestation workers
  /// must match it. (Two new gateways starting at once with different scopes
  /// are not caught: the later record wins, the other is refused next start.)
  error check_id_scope() {
    const auto& roles = ctx_.opts.cfg.roles;
    if (!roles.gateway && !roles.attestation)
      return {};
    std::optional<std::string> recorded;
    if (auto err = ctx_.store->get(storage::cf::meta, scope_meta_key, recorded))
      return err;
    const std::string& mine = ctx_.opts.id_scope;
    if (recorded && *recorded != mine)
      return {error_code::bad_request,
              "this deployment's id scope is " + *recorded
                + " (recorded in " + enrollments_topic_ + " by its first gateway), but this "
                  "process has " + mine + ": set id_scope = \"" + *recorded
                + "\" in its configuration (every gateway and attestation worker of a "
                  "deployment shares it)"};
    if (recorded || !roles.gateway)
      return {};
    kafka::record r;
    r.topic = enrollments_topic_;
    r.key = std::string(scope_record_key);
    r.value = mine;
    std::vector<kafka::record> recs;
    recs.push_back(std::move(r));
    return publish_and_wait(std::move(recs), *enrollments_);
  }

  /// Every process sharing dps.enrollments must hold the key its records are
  /// sealed with. The first process with a keyring records a value sealed
  /// under its active key; a later one that cannot open it refuses to start
  /// (rather than stall on the first enrollment it cannot read). A process
  /// whose active key is newer (after `keys rotate`) records it again, so
  /// processes still without that key refuse from then on.
  error check_keys() {
    std::optional<std::string> recorded;
    if (auto err = ctx_.store->get(storage::cf::meta, key_check_meta_key, recorded))
      return err;
    if (recorded) {
      const auto id = storage::keyring::key_id_of(*recorded);
      if (!keys_)
        return {error_code::storage_failure,
                enrollments_topic_ + " is sealed with key id " + id
                  + ", but this process has no key-encryption keys"};
      std::string plain;
      if (!holds_key(id))
        return {error_code::storage_failure, missing_key_message(key_check_record_key, id)};
      if (auto err = keys_->open(*recorded, record_aad(key_check_record_key), plain))
        return {error_code::storage_failure,
                enrollments_topic_ + ": " + std::string(key_check_record_key) + ": " + err.message};
      if (id == keys_->active_id())
        return {};
    }
    if (!keys_)
      return {};
    kafka::record r;
    r.topic = enrollments_topic_;
    r.key = std::string(key_check_record_key);
    r.value = std::string(key_check_plain);
    std::vector<kafka::record> recs;
    recs.push_back(std::move(r));
    return publish_and_wait(std::move(recs), *enrollments_);
  }

  bool holds_key(const std::string& id) const {
    if (!keys_)
      return false;
    const auto ids = keys_->ids();
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  }

  std::string missing_key_message(std::string_view record, const std::string& id) const {
    return enrollments_topic_ + ": record '" + std::string(record) + "' is sealed under key id "
           + id + ", which "
           + (keys_ ? keys_->source() : std::string("this process (no key file loaded)"))
           + " does not hold: every process sharing " + enrollments_topic_
           + " needs the same key-encryption keys (copy the key file of a running instance, "
             "docs/security.md#kafka-mode); until it has them this process applies no further "
           + enrollments_topic_ + " records";
  }

  /// Opens a sealed dps.enrollments value. A key id this process does not
  /// hold sets key_missing_ (the table then stops here, loudly: skipping
  /// would lose the enrollment); any other failure (tampered, malformed) is
  /// the record's fault and the caller dead-letters it.
  error open_record(const kafka::message& m, std::string& out) {
    const auto id = storage::keyring::key_id_of(m.value);
    const bool well_formed =
      id.size() == 16 && id.find_first_not_of("0123456789abcdef") == std::string::npos;
    if (well_formed && !holds_key(id)) {
      key_missing_ = true;
      return {error_code::storage_failure, missing_key_message(m.key, id)};
    }
    if (!keys_)
      return {error_code::storage_failure, "a sealed value, but this process has no keys"};
    return keys_->open(m.value, record_aad(m.key), out);
  }

  /// The name and revision this instance holds for CA `key`: its entry's,
  /// or its last delete's (name "" then).
  error certificate_state(const std::string& key, std::string& name, int64_t& rev) {
    std::optional<std::string> raw, deleted;
    if (auto err = ctx_.store->get(storage::cf::certificates, key, raw))
      return err;
    if (auto err = ctx_.store->get(storage::cf::meta, enrollment::ca_deleted_meta_key(key), deleted))
      return err;
    rev = 0;
    if (raw) {
      auto j = nlohmann::json::parse(*raw, nullptr, false);
      if (j.is_object()) {
        rev = enrollment::ca_revision(j);
        if (auto n = j.find("name"); n != j.end() && n->is_string())
          name = n->get<std::string>();
      }
    }
    if (deleted)
      rev = std::max<int64_t>(rev, std::strtoll(deleted->c_str(), nullptr, 10));
    return {};
  }

  /// After a CA write came back: did it win? A write that lost to a
  /// concurrent delete or write (ca_supersedes) changed nothing anywhere,
  /// but it is the key's last record in the compacted topic, so an instance
  /// rebuilding after compaction would apply it: the winner is published
  /// again (every instance ignores it, it equals their state), and the
  /// caller learns its write did not apply.
  error check_certificate_writes(const storage::write_batch& batch) {
    std::vector<kafka::record> repair;
    std::string lost;
    for (const auto& op : batch.ops()) {
      if (op.family != storage::cf::certificates)
        continue;
      std::optional<std::string> raw;
      if (auto err = ctx_.store->get(storage::cf::certificates, op.key, raw))
        return err;
      if (op.is_delete ? !raw : (raw && *raw == op.value))
        continue;
      kafka::record r;
      r.topic = enrollments_topic_;
      r.key = std::string(certificate_prefix) + op.key;
      if (raw) {
        r.value = *raw;
      } else {
        std::string name;
        int64_t rev = 0;
        if (auto err = certificate_state(op.key, name, rev))
          return err;
        r.value = enrollment::ca_deleted_marker(op.key, rev).dump();
      }
      repair.push_back(std::move(r));
      lost += (lost.empty() ? "'" : ", '") + op.key + "'";
    }
    if (repair.empty())
      return {};
    if (auto err = publish_and_wait(std::move(repair), *enrollments_))
      std::fprintf(stderr, "provisiond: republishing CA %s after a lost write: %s\n",
                   lost.c_str(), err.message.c_str());
    return {error_code::precondition_failed,
            "CA " + lost + " was changed or deleted through another instance while this write "
            "was in flight, so this write was not applied: read the CA again and retry"};
  }

  /// Produces `recs`, then waits until `table` has applied every one of them.
  error publish_and_wait(std::vector<kafka::record> recs, kafka::table_reader& table) {
    if (recs.empty())
      return {};
    if (&table == enrollments_.get() && keys_)
      for (auto& r : recs)
        if (!r.tombstone && sealed_record_key(r.key)) {
          auto sealed = keys_->seal(r.value, record_aad(r.key));
          storage::keyring::wipe(r.value);
          r.value = std::move(sealed);
        }
    std::vector<std::future<kafka::delivery>> futs;
    for (auto& r : recs) {
      auto p = std::make_shared<std::promise<kafka::delivery>>();
      futs.push_back(p->get_future());
      if (auto err = bus_.send_record(std::move(r),
                                      [p](const kafka::delivery& d) { p->set_value(d); })) {
        kafka::delivery d;
        d.err = err;
        p->set_value(d);
      }
    }
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(write_wait_ms);
    for (auto& f : futs) {
      if (f.wait_until(deadline) != std::future_status::ready)
        return {error_code::unavailable,
                "Kafka did not acknowledge the write within 15 s; it may still apply"};
      auto d = f.get();
      if (d.err)
        return {error_code::unavailable, "writing to Kafka failed: " + d.err.message};
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now())
                    .count();
      if (auto err = table.wait_applied(d.partition, d.offset,
                                        static_cast<int>(std::max<int64_t>(left, 1))))
        return err;
    }
    return {};
  }

  /// The revision of CA `key` as of the records before the current one in
  /// this batch (`pending`) or the store.
  error stored_certificate_revision(const std::string& key,
                                    const std::unordered_map<std::string, int64_t>& pending,
                                    int64_t& rev) {
    if (auto it = pending.find(key); it != pending.end()) {
      rev = it->second;
      return {};
    }
    std::string name;
    return certificate_state(key, name, rev);
  }

  error apply_enrollments(const std::vector<kafka::message>& batch) {
    key_missing_ = false;
    if (ctx_.opts.before_enrollments_apply)
      ctx_.opts.before_enrollments_apply();
    storage::write_batch wb;
    std::unordered_map<std::string, int64_t> certificate_revisions; // applied in this batch
    bool groups = false, individuals = false, hubs = false;
    // The hub seed claim as applied so far (this batch included); read from
    // the store at the first claim record.
    std::optional<std::string> claim;
    bool claim_read = false;
    for (const auto& m : batch) {
      std::string_view key = m.key;
      storage::cf family;
      if (key == key_check_record_key) {
        if (!m.tombstone && !m.value.empty()) // kept sealed: check_keys opens it
          wb.put(storage::cf::meta, std::string(key_check_meta_key), m.value);
        continue;
      }
      // Sealed records are opened here and stored (sealed again under this
      // process's own key) as plaintext documents; a plaintext record, as
      // older versions wrote, is taken as it is (upgrade path).
      std::string opened;
      const std::string* value = &m.value;
      if (!m.tombstone && sealed_record_key(key) && storage::keyring::is_sealed(m.value)) {
        if (auto err = open_record(m, opened)) {
          if (key_missing_)
            return err;
          bus_.dead_letter(m, "dps.enrollments: " + err.message);
          continue;
        }
        value = &opened;
      }
      if (key.substr(0, hub_prefix.size()) == hub_prefix) {
        key.remove_prefix(hub_prefix.size());
        allocation::linked_hub h;
        if (m.tombstone)
          wb.del(storage::cf::hubs, std::string(key));
        else if (auto bad = allocation::hub_from_stored(key, m.value, h))
          bus_.dead_letter(m, "dps.enrollments: " + bad.message);
        else
          wb.put(storage::cf::hubs, std::string(key), m.value);
        hubs = true;
        continue;
      }
      if (key == hubs_seeded_record_key) {
        if (!m.tombstone && !m.value.empty())
          wb.put(storage::cf::meta, hubs_seeded_key, m.value);
        continue;
      }
      if (key == hubs_seed_claim_record_key) {
        // The first claim of a round in topic order holds (until stale), the
        // same in every process: claims have one key, so one partition.
        if (m.tombstone || m.value.empty())
          continue;
        if (!claim_read) {
          if (auto err = ctx_.store->get(storage::cf::meta, hubs_seed_claim_key, claim))
            return err;
          claim_read = true;
        }
        if (hub_seed_claim_takes_over(claim ? *claim : std::string(), m.value)) {
          wb.put(storage::cf::meta, hubs_seed_claim_key, m.value);
          claim = m.value;
        }
        continue;
      }
      if (key.substr(0, group_prefix.size()) == group_prefix) {
        family = storage::cf::groups;
        key.remove_prefix(group_prefix.size());
        groups = true;
      } else if (key.substr(0, enrollment_prefix.size()) == enrollment_prefix) {
        family = storage::cf::enrollments;
        key.remove_prefix(enrollment_prefix.size());
        individuals = true;
      } else if (key.substr(0, certificate_prefix.size()) == certificate_prefix) {
        family = storage::cf::certificates;
        key.remove_prefix(certificate_prefix.size());
        groups = true; // groups carry the CAs their caReferences name
      } else if (key.substr(0, challenge_prefix.size()) == challenge_prefix) {
        key.remove_prefix(challenge_prefix.size());
        attestation::tpm_challenge c;
        if (m.tombstone)
          wb.del(storage::cf::tpm_challenges, std::string(key));
        else if (!attestation::decode_challenge(*value, c))
          bus_.dead_letter(m, "dps.enrollments: not a TPM challenge record");
        else
          wb.put(storage::cf::tpm_challenges, std::string(key), *value);
        continue;
      } else if (key == scope_record_key && !m.tombstone && !m.value.empty()) {
        wb.put(storage::cf::meta, std::string(scope_meta_key), m.value);
        continue;
      } else {
        bus_.dead_letter(m, "dps.enrollments: key must start with enrollment/, group/, "
                            "certificate/, hub/ or tpm-challenge/ (or be deployment/id_scope, "
                            "deployment/hubs_seeded, deployment/hubs_seed_claim or "
                            "deployment/secrets_check)");
        continue;
      }
      if (m.tombstone) {
        wb.del(family, std::string(key));
        if (family == storage::cf::certificates) // a writer older than deletion markers
          certificate_revisions[std::string(key)] = 0;
        if (family == storage::cf::enrollments) {
          // Its TPM challenge slots go with it here too, whether or not the
          // writer published their tombstones (older writers did not).
          wb.del(storage::cf::tpm_challenges, attestation::tpm_answered_slot_key(key));
          wb.del(storage::cf::tpm_challenges, attestation::tpm_pending_slot_key(key));
        }
        continue;
      }
      // Anyone with write access to the topic can put a record here: only a
      // document the service API would have stored is applied.
      if (auto why = family == storage::cf::certificates
                       ? certificate_doc_problem(key, *value)
                       : enrollment_doc_problem(family == storage::cf::groups, key, *value);
          !why.empty()) {
        bus_.dead_letter(m, "dps.enrollments: " + why);
        continue;
      }
      if (family == storage::cf::certificates) {
        // Ordered by revision (ca_store.hpp): a record computed from a state
        // a later record replaced is skipped, by every instance alike.
        const std::string k(key);
        const auto doc = nlohmann::json::parse(*value);
        const bool is_delete = enrollment::ca_is_deleted_marker(doc);
        const int64_t rev = enrollment::ca_revision(doc);
        int64_t stored = 0;
        if (auto err = stored_certificate_revision(k, certificate_revisions, stored))
          return err;
        if (!enrollment::ca_supersedes(rev, is_delete, stored)) {
          std::fprintf(stderr,
                       "provisiond: dps.enrollments: skipped a stale %s of CA '%s' (revision "
                       "%lld; this instance has revision %lld)\n",
                       is_delete ? "delete" : "write", k.c_str(), static_cast<long long>(rev),
                       static_cast<long long>(stored));
          if (ctx_.metrics != nullptr)
            ctx_.metrics->certificate_record_stale();
          continue;
        }
        certificate_revisions[k] = rev;
        if (is_delete) {
          wb.del(storage::cf::certificates, k);
          wb.put(storage::cf::meta, enrollment::ca_deleted_meta_key(k), std::to_string(rev));
        } else {
          wb.put(storage::cf::certificates, k, *value);
          wb.del(storage::cf::meta, enrollment::ca_deleted_meta_key(k));
        }
        continue;
      }
      wb.put(family, std::string(key), *value);
    }
    add_positions(wb, enrollments_topic_, batch);
    if (auto err = ctx_.store->write(wb, storage::store::durability::replayable))
      return err;
    // The batch is applied either way; a failed group rebuild leaves the
    // snapshot failed closed (retried by the cache), and the gateway that
    // wrote it reports it (write_enrollments).
    error changed;
    if (groups)
      changed = ctx_.catalog.enrollments_changed(enrollment::kind::group);
    else if (individuals)
      changed = ctx_.catalog.enrollments_changed(enrollment::kind::individual);
    if (changed)
      std::fprintf(stderr, "provisiond: %s\n", changed.message.c_str());
    if (hubs)
      if (auto err = reload_hubs(ctx_))
        std::fprintf(stderr, "provisiond: reloading the linked hubs: %s\n", err.message.c_str());
    return {};
  }

  error apply_registrations(const std::vector<kafka::message>& batch) {
    storage::write_batch wb;
    // Last operation applied per registration within this batch (the store
    // does not see the batch's own writes yet).
    std::unordered_map<std::string, registration_state> last_state;
    auto seq = next_seq_;
    for (const auto& m : batch) {
      if (m.tombstone) {
        wb.del(storage::cf::registrations, m.key);
        last_state[m.key] = registration_state{};
        continue;
      }
      operation_record u;
      if (auto err = decode_record(m.value, u); err || u.registration_id.empty()) {
        bus_.dead_letter(m, "dps.registrations: undecodable record");
        continue;
      }
      if (m.key != enrollment::key_of(u.registration_id)) {
        bus_.dead_letter(m, "dps.registrations: the key is not the record's registration id");
        continue;
      }
      wb.put(storage::cf::registrations, m.key, encode_record(u.state));
      // The outbox feeds GET /assignments, which only gateways serve.
      if (u.status != registration_status::assigned || !ctx_.opts.cfg.roles.gateway)
        continue;
      // One outbox event per operation: a republished record (crash
      // recovery) carries the same operation and is not appended again.
      registration_state prev;
      if (auto it = last_state.find(m.key); it != last_state.end()) {
        prev = it->second;
      } else {
        std::optional<std::string> raw;
        if (auto err = ctx_.store->get(storage::cf::registrations, m.key, raw))
          return err;
        if (raw && decode_record(*raw, prev))
          prev = registration_state{};
      }
      if (prev.last_operation_id != u.state.last_operation_id) {
        // Moved off a hub: the old hub's device.deprovisioned first.
        if (configuration::moves_hub(&prev, u.event)) {
          wb.put(storage::cf::outbox, storage::seq_key(seq),
                 configuration::deprovision_event(u.event, prev, seq));
          ++seq;
        }
        wb.put(storage::cf::outbox, storage::seq_key(seq),
               configuration::assignment_event(u.event, u.state, seq));
        ++seq;
      }
      last_state[m.key] = u.state;
    }
    add_positions(wb, registrations_topic_, batch);
    // Outbox sequence numbers, once GET /assignments has handed them out,
    // must never be given to other events: a replay after a lost tail could
    // apply the partitions in another order. So a batch that appends to the
    // outbox (gateways) is fsync'd.
    const auto durability = seq != next_seq_ ? storage::store::durability::synced
                                             : storage::store::durability::replayable;
    if (auto err = ctx_.store->write(wb, durability))
      return err;
    next_seq_ = seq;
    return {};
  }

  error apply_completed(const std::vector<kafka::message>& batch) {
    storage::write_batch wb;
    std::vector<registration_event> applied;
    for (const auto& m : batch) {
      registration_event ev;
      if (auto err = decode_event(m.value, ev)) {
        bus_.dead_letter(m, "undecodable event: " + err.message);
        continue;
      }
      if (!is_terminal(ev.status))
        continue;
      std::optional<std::string> raw;
      operation_record op;
      if (auto err = ctx_.store->get(storage::cf::operations, ev.operation_id, raw))
        return err;
      if (raw && !decode_record(*raw, op) && is_terminal(op.status)) {
        applied.push_back(std::move(ev)); // already recorded (redelivery)
        continue;
      }
      op = operation_record{};
      op.operation_id = ev.operation_id;
      op.registration_id = ev.registration_id;
      op.status = ev.status;
      auto reg_key = enrollment::key_of(ev.registration_id);
      if (ev.status == registration_status::assigned) {
        // Prefer the materialized record (creation time, etag) when it is
        // this operation's, the usual case (the worker wrote it to
        // dps.registrations before this event). Only otherwise is the state
        // built from the event (an etag hash and copies of every field).
        std::optional<std::string> reg;
        const bool materialized =
          !ctx_.store->get(storage::cf::registrations, reg_key, reg) && reg
          && !decode_record(*reg, op.state) && op.state.last_operation_id == ev.operation_id;
        if (!materialized)
          op.state = configuration::state_from_completed(ev);
      } else {
        op.state = configuration::state_from_completed(ev);
        std::optional<std::string> reg;
        if (auto err = ctx_.store->get(storage::cf::registrations, reg_key, reg))
          return err;
        if (configuration::failure_replaces(reg))
          wb.put(storage::cf::registrations, reg_key, encode_record(op.state));
      }
      wb.put(storage::cf::operations, ev.operation_id, encode_record(op));
      // Most operations never had a `pending` entry (a deferred accept
      // answered with its outcome writes none), and a tombstone per device
      // is a memtable insert that also slows every later read of the family.
      // An entry this process's registration stage records after this read
      // is dropped there once the outcome arrives (drop_late_record).
      std::optional<std::string> entry;
      if (auto err = ctx_.store->get(storage::cf::pending, ev.operation_id, entry))
        return err;
      if (entry)
        wb.del(storage::cf::pending, ev.operation_id);
      applied.push_back(std::move(ev));
    }
    add_positions(wb, completed_topic_, batch);
    if (auto err = ctx_.store->write(wb, storage::store::durability::replayable))
      return err;
    if (on_completed_)
      for (auto& ev : applied)
        on_completed_(std::move(ev));
    return {};
  }

  engine_context& ctx_;
  kafka::kafka_bus& bus_;
  std::unique_ptr<kafka::table_reader> enrollments_, registrations_, completed_;
  // Set before the readers start: their threads use them at once.
  std::string enrollments_topic_, registrations_topic_, completed_topic_;
  completed_fn on_completed_;
  /// Seals and opens the sealed records of dps.enrollments: the store's
  /// keyring, so every process sharing the topic needs the same key file.
  std::shared_ptr<const storage::keyring> keys_;
  /// Set by apply_enrollments when a record names a key this process does
  /// not hold (read by the table's is_permanent, on the same thread).
  bool key_missing_ = false;
  uint64_t next_seq_ = 1; ///< outbox: only the registrations reader writes it
};

} // namespace

error replication::start(engine_context& ctx, bus::kafka::kafka_bus& bus,
                         std::unique_ptr<replication>& out) {
  auto impl = std::make_unique<replication_impl>(ctx, bus);
  if (auto err = impl->start())
    return err;
  out = std::move(impl);
  return {};
}

} // namespace prov
