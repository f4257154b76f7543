#pragma once
// A store that hands every call to a real one. Tests derive from it and
// override only the calls they interfere with (inject a failure, hold a
// read), so a new store method needs forwarding in one place.

#include <memory>
#include <string>

#include "storage/store.hpp"

namespace prov::test {

class forwarding_store : public storage::store {
public:
  explicit forwarding_store(std::unique_ptr<storage::store> inner) : inner_(std::move(inner)) {}

  error get(storage::cf f, std::string_view k, std::optional<std::string>& out) const override {
    return inner_->get(f, k, out);
  }
  error scan(storage::cf f, std::string_view start, std::size_t limit,
             const visit_fn& fn) const override {
    return inner_->scan(f, start, limit, fn);
  }
  error last_key(storage::cf f, std::optional<std::string>& out) const override {
    return inner_->last_key(f, out);
  }
  using storage::store::write;
  error write(const storage::write_batch& b, durability d) override { return inner_->write(b, d); }
  void commit(storage::write_batch b, done_fn done) override {
    inner_->commit(std::move(b), std::move(done));
  }
  void close() override { inner_->close(); }
  storage::commit_stats stats() const override { return inner_->stats(); }
  std::string recovery_note() const override { return inner_->recovery_note(); }
  std::string recovery_copy_dir() const override { return inner_->recovery_copy_dir(); }
  error attach_keyring(std::shared_ptr<const storage::keyring> k, bool reseal,
                       storage::seal_report& rep) override {
    return inner_->attach_keyring(std::move(k), reseal, rep);
  }
  error is_sealed(bool& out) const override { return inner_->is_sealed(out); }
  uint64_t int_property(std::string_view n) const override { return inner_->int_property(n); }
  uint64_t int_property(storage::cf f, std::string_view n) const override {
    return inner_->int_property(f, n);
  }

protected:
  std::unique_ptr<storage::store> inner_;
};

} // namespace prov::test
