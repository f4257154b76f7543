#include "actors/enrollment_catalog.hpp"

#include <algorithm>
#include <cstdio>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/enrollment/ca_store.hpp"
#include "actors/replication.hpp"

namespace prov {

using nlohmann::json;

/// `replaced` tells whether the snapshot was replaced (unreadable groups are
/// skipped, with an error naming them). Callers hold reload_mtx_.
error enrollment_catalog::rebuild_groups(bool& replaced) {
  replaced = false;
  auto fresh = std::make_shared<std::vector<enrollment::enrollment_view>>();
  // `internal` here means "some groups or CAs skipped, the rest usable";
  // every skipped one is named.
  error failure;
  auto skipped = [&](std::string what) {
    if (failure)
      failure.message += "; " + what;
    else
      failure = {error_code::internal, std::move(what)};
  };
  auto err = store_->scan_tolerant(
    storage::cf::groups, "", 0,
    [&](std::string_view k, std::string_view v) {
      auto j = json::parse(v, nullptr, false);
      enrollment::enrollment_view view;
      if (j.is_discarded() || enrollment::view_of(enrollment::kind::group, j, view)) {
        skipped("stored enrollment group '" + std::string(k) + "' is unreadable; skipped");
        return true; // skip it, keep the others usable
      }
      fresh->push_back(std::move(view));
      return true;
    },
    [&](std::string_view k, const error& why) {
      // A sealed value that does not open (tampered, key missing): that
      // group cannot attest; the others must.
      skipped("stored enrollment group '" + std::string(k) + "' cannot be unsealed; skipped: " +
              why.message);
      return true;
    });
  if (err) // never `internal`, which here means "one group skipped"
    return {error_code::storage_failure, err.message};
  // caReferences name CAs in the certificate store: resolved here, so the
  // snapshot (rebuilt on every CA write too) carries each CA's certificate
  // and verification state, and attestation reads nothing per device.
  for (auto& g : *fresh)
    if (auto* x = std::get_if<enrollment::x509_attestation>(&g.attestation))
      for (auto& ref : x->ca_references) {
        // A one-entry scan rather than get(): it tells a value that does
        // not unseal (that CA admits nothing, in this group only) from a
        // read error (the snapshot cannot be rebuilt).
        const std::string key = enrollment::key_of(ref.name);
        std::optional<std::string> raw;
        auto e = store_->scan_tolerant(
          storage::cf::certificates, key, 1,
          [&](std::string_view k, std::string_view v) {
            if (k == key)
              raw.emplace(v);
            return false;
          },
          [&](std::string_view k, const error& why) {
            if (k == key)
              skipped("CA '" + ref.name + "' of enrollment group '" + g.id +
                      "' cannot be unsealed; it admits no device: " + why.message);
            return false;
          });
        if (e)
          return {error_code::storage_failure, e.message};
        enrollment::resolve_ca(raw ? &*raw : nullptr, ref);
      }
  groups_.set(std::move(fresh));
  replaced = true;
  return failure;
}

error enrollment_catalog::write_enrollments(const storage::write_batch& batch,
                                        enrollment::kind k) {
  if (batch.empty())
    return {};
  std::vector<std::size_t> stripes;
  if (k == enrollment::kind::individual) {
    for (const auto& op : batch.ops())
      if (op.family == storage::cf::enrollments)
        stripes.push_back(stripe_of(op.key));
    std::sort(stripes.begin(), stripes.end());
    stripes.erase(std::unique(stripes.begin(), stripes.end()), stripes.end());
  }
  std::vector<std::unique_lock<std::mutex>> held;
  held.reserve(stripes.size());
  for (auto i : stripes)
    held.emplace_back(individual_mtx_[i]);
  if (repl_) {
    if (auto err = repl_->write_enrollments(batch)) // its reader calls enrollments_changed
      return err;
    if (k == enrollment::kind::group && groups_.failed())
      return {error_code::storage_failure,
              "the write is stored, but the enrollment group snapshot could not be rebuilt, "
              "so no group attests devices until it is (retried every second)"};
    return {};
  }
  if (auto err = store_->write(batch))
    return err;
  return enrollments_changed(k);
}

error enrollment_catalog::write_if_enrollment(std::string_view key, std::string_view etag,
                                               bool& current,
                                               const std::function<error()>& write) const {
  current = false;
  std::lock_guard<std::mutex> guard{individual_mtx_[stripe_of(key)]};
  std::optional<std::string> raw;
  if (auto err = store_->get(storage::cf::enrollments, key, raw))
    return err;
  if (!raw)
    return {};
  // Compared as view_of_text reads it (the etag the register saw): a
  // document without one (an older writer's) has etag "".
  auto doc = json::parse(*raw, nullptr, false);
  if (!doc.is_object())
    return {};
  const auto it = doc.find("etag");
  const bool none = it == doc.end() || it->is_null();
  if (none ? !etag.empty() : (!it->is_string() || it->get<std::string>() != etag))
    return {};
  current = true;
  return write();
}

error enrollment_catalog::write_certificates(const storage::write_batch& batch) {
  // Groups carry their resolved CAs: rebuilding them (and bumping the
  // generation) stops cached verdicts admitting through a deleted CA.
  return write_enrollments(batch, enrollment::kind::group);
}

bool enrollment_catalog::caught_up(int timeout_ms) const {
  return repl_ != nullptr && !repl_->catch_up_enrollments(timeout_ms);
}

error enrollment_catalog::write_shared(const storage::write_batch& batch,
                                       storage::store::durability d) {
  return repl_ ? repl_->write_enrollments(batch) : store_->write(batch, d);
}

error enrollment_catalog::write_registrations(const storage::write_batch& batch) {
  auto err = repl_ ? repl_->write_registrations(batch) : store_->write(batch);
  registration_generation_.fetch_add(1); // after the write is visible (or failed)
  return err;
}

error enrollment_catalog::enrollments_changed(enrollment::kind k) {
  error err;
  if (k == enrollment::kind::group) {
    std::lock_guard<std::mutex> guard{reload_mtx_};
    bool replaced = false;
    err = rebuild_groups(replaced);
    if (!replaced) // once more: a read error may be transient
      err = rebuild_groups(replaced);
    if (!replaced) {
      // Keeping the old snapshot would let a rotated or deleted key attest.
      groups_.fail_closed();
      err = {error_code::storage_failure,
             "the write is stored, but the enrollment group snapshot could not be rebuilt, "
             "so no group attests devices until it is (retried every second): "
               + err.message};
    } else if (err) {
      // The others are current; the unreadable one cannot attest. Not this
      // writer's problem.
      std::fprintf(stderr, "provisiond: warning: %s\n", err.message.c_str());
      err = {};
    }
  }
  // After everything attest() reads is updated: a token verified against the
  // old state carries an older generation and is not reused.
  generation_.fetch_add(1);
  return err;
}

error enrollment_catalog::reload_groups() {
  std::lock_guard<std::mutex> guard{reload_mtx_};
  bool replaced = false;
  return rebuild_groups(replaced);
}

} // namespace prov
