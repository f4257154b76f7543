// Enrollment actor: the single writer of enrollments, enrollment groups and
// registration-record deletes, so etag checks and writes cannot interleave.
// Reads do not come here: the engine reads the store directly.
//
// Accepts: (put_atom, kind, id, body, if_match, doc_reply_fn)
//          (delete_atom, kind, id, if_match, done_reply_fn)
//          (bulk_atom, kind, body, doc_reply_fn)
//          (deletereg_atom, id, if_match, done_reply_fn)
//          (cert_atom, op, name, body, if_match, doc_reply_fn): the CA
//          certificate store (op "put", "code", "verify", "crl" or "delete")
//          (hub_atom, op, hostname, body, doc_reply_fn): a linked hub (op "put"
//          or "delete"; actors/hub_store.hpp)
// Blocking: synchronous synced RocksDB writes, or (Kafka) waiting until the
// write came back through dps.enrollments; spawned detached. One write at a
// time per instance, so etag checks see the previous write.

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <set>

#include <nlohmann/json.hpp>

#include "actors/enrollment_actor.hpp"
#include "actors/attestation/tpm.hpp"
#include "actors/enrollment/ca_store.hpp"
#include "actors/hub_store.hpp"
#include "messages/ascii.hpp"
#include "messages/json_body.hpp"

namespace prov {

using nlohmann::json;

namespace {

storage::cf family_of(enrollment::kind k) {
  return k == enrollment::kind::individual ? storage::cf::enrollments : storage::cf::groups;
}

error_code not_found_code(enrollment::kind k) {
  return k == enrollment::kind::individual ? error_code::enrollment_not_found
                                           : error_code::enrollment_group_not_found;
}

std::string what(enrollment::kind k, const std::string& id) {
  return (k == enrollment::kind::individual ? "individual enrollment '"
                                            : "enrollment group '")
         + id + "'";
}

error load(const enrollment_deps& ctx, enrollment::kind k, const std::string& id,
           std::optional<json>& out) {
  std::optional<std::string> raw;
  if (auto err = ctx.store->get(family_of(k), enrollment::key_of(id), raw))
    return err;
  out.reset();
  if (raw) {
    auto j = json::parse(*raw, nullptr, false);
    if (j.is_discarded())
      return {error_code::storage_failure, "stored " + what(k, id) + " is not valid JSON"};
    out = std::move(j);
  }
  return {};
}

/// An enrollment's delete; an individual one takes its TPM challenge slots
/// with it (with Kafka as tpm-challenge/ tombstones, so compaction drops
/// them too): a re-created enrollment starts with no challenge, answered or
/// pending, from before.
void delete_enrollment(storage::write_batch& batch, enrollment::kind k, const std::string& id) {
  const auto key = enrollment::key_of(id);
  batch.del(family_of(k), key);
  if (k == enrollment::kind::individual) {
    batch.del(storage::cf::tpm_challenges, attestation::tpm_answered_slot_key(key));
    batch.del(storage::cf::tpm_challenges, attestation::tpm_pending_slot_key(key));
  }
}

error load_ca(const enrollment_deps& ctx, const std::string& name, std::optional<json>& out) {
  std::optional<std::string> raw;
  if (auto err = ctx.store->get(storage::cf::certificates, enrollment::key_of(name), raw))
    return err;
  out.reset();
  if (raw) {
    auto j = json::parse(*raw, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return {error_code::storage_failure, "stored CA '" + name + "' is not valid JSON"};
    out = std::move(j);
  }
  return {};
}

/// A group may name only CAs that are in the store and verified (DPS).
error check_ca_references(const enrollment_deps& ctx, const json& doc) {
  const json* refs = nullptr;
  if (auto a = doc.find("attestation"); a != doc.end() && a->is_object())
    if (auto x = a->find("x509"); x != a->end() && x->is_object())
      if (auto c = x->find("caReferences"); c != x->end() && c->is_object())
        refs = &*c;
  if (refs == nullptr)
    return {};
  for (const char* slot : {"primary", "secondary"}) {
    auto it = refs->find(slot);
    if (it == refs->end() || !it->is_string())
      continue;
    const auto name = it->get<std::string>();
    const std::string path = std::string("attestation.x509.caReferences.") + slot;
    std::optional<json> ca;
    if (auto err = load_ca(ctx, name, ca))
      return err;
    if (!ca)
      return {error_code::certificate_not_found,
              path + ": CA '" + name + "' is not in the certificate store (upload it with PUT "
                "/certificates/" + name + ", then prove possession of its key)"};
    if (!ca->value("isVerified", false))
      return {error_code::invalid_enrollment,
              path + ": CA '" + name + "' is not verified: prove possession of its key first "
                "(POST /certificates/" + name + "/generateVerificationCode, then /verify)"};
  }
  return {};
}

/// Validates one create/replace and adds it to `batch`; `doc` gets the stored
/// document. `mode`: "" (plain PUT), "create", "update", "updateifmatchetag".
error prepare_put(const enrollment_deps& ctx, enrollment::kind k, const std::string& id,
                  const json& body, const std::string& if_match, const std::string& mode,
                  storage::write_batch& batch, json& doc) {
  if (!body.is_object())
    return {error_code::malformed_json, "the body must be a JSON object"};
  std::optional<json> existing;
  if (auto err = load(ctx, k, id, existing))
    return err;
  if (mode == "create" && existing)
    return {error_code::conflict, what(k, id) + " already exists"};
  std::string match = if_match;
  if (mode == "updateifmatchetag") {
    if (auto it = body.find("etag"); it != body.end() && it->is_string())
      match = it->get<std::string>();
    else
      return {error_code::precondition_failed,
              "updateIfMatchETag needs an etag on every item"};
  }
  if (!match.empty()) {
    if (!existing)
      return {error_code::precondition_failed,
              "If-Match given but " + what(k, id) + " does not exist"};
    auto stored = existing->value("etag", std::string{});
    if (!enrollment::etag_matches(match, stored))
      return {error_code::precondition_failed,
              "etag mismatch: " + what(k, id) + " was changed since it was read"};
  }
  if (auto err = enrollment::normalize(k, id, body, existing ? &*existing : nullptr,
                                       now_ms(), doc))
    return err;
  if (k == enrollment::kind::group)
    if (auto err = check_ca_references(ctx, doc))
      return err;
  batch.put(family_of(k), enrollment::key_of(id), doc.dump());
  return {};
}

} // namespace

// -- enrollment_actor -----------------------------------------------------------

enrollment_actor::enrollment_actor(caf::actor_config& cfg, enrollment_deps deps)
  : enrollment_actor_type::base(cfg), deps_(std::move(deps)) {}

enrollment_actor::behavior_type enrollment_actor::make_behavior() {
  return {
    [this](put_atom, enrollment::kind k, const std::string& id, const std::string& body,
           const std::string& if_match, doc_reply_fn& reply) {
      on_put(k, id, body, if_match, reply);
    },
    [this](delete_atom, enrollment::kind k, const std::string& id, const std::string& if_match,
           done_reply_fn& reply) { on_delete(k, id, if_match, reply); },
    [this](bulk_atom, enrollment::kind k, const std::string& body, doc_reply_fn& reply) {
      on_bulk(k, body, reply);
    },
    [this](cert_atom, const std::string& op, const std::string& name, const std::string& body,
           const std::string& if_match, doc_reply_fn& reply) {
      on_cert(op, name, body, if_match, reply);
    },
    [this](hub_atom, const std::string& op, const std::string& hostname,
           const std::string& body, doc_reply_fn& reply) { on_hub(op, hostname, body, reply); },
    [this](deletereg_atom, const std::string& id, const std::string& if_match,
           done_reply_fn& reply) { on_delete_registration(id, if_match, reply); },
  };
}

// -- message handlers -------------------------------------------------------------

void enrollment_actor::on_put(enrollment::kind k, const std::string& id,
                              const std::string& body, const std::string& if_match,
                              doc_reply_fn& reply) {
  json j;
  if (auto err = parse_json_body(body, j)) {
    reply.fn(std::move(err), {});
    return;
  }
  storage::write_batch batch;
  json doc;
  if (auto err = prepare_put(deps_, k, id, j, if_match, "", batch, doc)) {
    reply.fn(std::move(err), {});
    return;
  }
  if (auto err = deps_.catalog.write_enrollments(batch, k)) {
    reply.fn(std::move(err), {});
    return;
  }
  reply.fn({}, enrollment::public_document(doc).dump());
}

void enrollment_actor::on_delete(enrollment::kind k, const std::string& id,
                                 const std::string& if_match, done_reply_fn& reply) {
  std::optional<json> existing;
  if (auto err = load(deps_, k, id, existing)) {
    reply.fn(std::move(err));
    return;
  }
  if (!existing) {
    reply.fn({not_found_code(k), what(k, id) + " does not exist"});
    return;
  }
  if (!if_match.empty()
      && !enrollment::etag_matches(if_match, existing->value("etag", std::string{}))) {
    reply.fn({error_code::precondition_failed,
              "etag mismatch: " + what(k, id) + " was changed since it was read"});
    return;
  }
  storage::write_batch batch;
  delete_enrollment(batch, k, id);
  if (auto err = deps_.catalog.write_enrollments(batch, k)) {
    reply.fn(std::move(err));
    return;
  }
  reply.fn({});
}

void enrollment_actor::on_bulk(enrollment::kind k, const std::string& body,
                               doc_reply_fn& reply) {
  json j;
  if (auto err = parse_json_body(body, j)) {
    reply.fn(std::move(err), {});
    return;
  }
  if (!j.is_object()) {
    reply.fn({error_code::malformed_json, "the body is not a JSON object"}, {});
    return;
  }
  const char* list_name = k == enrollment::kind::individual ? "enrollments"
                                                            : "enrollmentGroups";
  const char* id_name = k == enrollment::kind::individual ? "registrationId"
                                                          : "enrollmentGroupId";
  auto items = j.find(list_name);
  auto mode_it = j.find("mode");
  if (items == j.end() || !items->is_array() || mode_it == j.end()
      || !mode_it->is_string()) {
    reply.fn({error_code::bad_request, std::string("bulk body needs '") + list_name
                                         + "' (array) and 'mode' (string)"},
             {});
    return;
  }
  auto mode = ascii::to_lower(mode_it->get<std::string>());
  if (mode != "create" && mode != "update" && mode != "updateifmatchetag"
      && mode != "delete") {
    reply.fn({error_code::bad_request,
              "mode must be create, update, updateIfMatchETag or delete"},
             {});
    return;
  }
  if (items->empty() || items->size() > 10) {
    reply.fn({error_code::bad_request, "a bulk operation takes 1 to 10 items"}, {});
    return;
  }
  storage::write_batch batch;
  json errors = json::array();
  // Ids already seen in this request (storage keys: ids are
  // case-insensitive). As DPS does, an id's first item is processed and
  // every later one is an error; otherwise the batch would hold several
  // writes of one key and the last would silently win.
  std::set<std::string> seen;
  for (const auto& item : *items) {
    std::string id;
    if (item.is_object())
      if (auto it = item.find(id_name); it != item.end() && it->is_string())
        id = it->get<std::string>();
    error err;
    if (id.empty()) {
      err = {error_code::invalid_enrollment, std::string("item without ") + id_name};
    } else if (!seen.insert(enrollment::key_of(id)).second) {
      err = {error_code::bad_request,
             what(k, id) + " appears more than once in this request; only its first "
                           "item is processed"};
    } else if (mode == "delete") {
      std::optional<json> existing;
      err = load(deps_, k, id, existing);
      if (!err && !existing)
        err = {not_found_code(k), what(k, id) + " does not exist"};
      if (!err)
        delete_enrollment(batch, k, id);
    } else {
      json doc;
      err = prepare_put(deps_, k, id, item, "", mode, batch, doc);
    }
    if (err)
      errors.push_back({{id_name, id},
                        {"errorCode", static_cast<int32_t>(err.code)},
                        {"errorStatus", err.message}});
  }
  if (auto err = deps_.catalog.write_enrollments(batch, k)) {
    reply.fn(std::move(err), {});
    return;
  }
  json result{{"isSuccessful", errors.empty()}, {"errors", errors}};
  reply.fn({}, result.dump());
}

void enrollment_actor::on_cert(const std::string& op, const std::string& name,
                               const std::string& body, const std::string& if_match,
                               doc_reply_fn& reply) {
  auto fail = [&](error e) { reply.fn(std::move(e), {}); };
  std::optional<json> existing;
  if (auto err = load_ca(deps_, name, existing))
    return fail(std::move(err));
  if (op != "put" && !existing)
    return fail({error_code::certificate_not_found,
                 "CA '" + name + "' is not in the certificate store"});
  if (!if_match.empty()
      && (!existing
          || !enrollment::etag_matches(if_match, existing->value("etag", std::string{}))))
    return fail({error_code::precondition_failed,
                 existing ? "etag mismatch: CA '" + name + "' was changed since it was read"
                          : "If-Match given but CA '" + name + "' does not exist"});
  storage::write_batch batch;
  const auto key = enrollment::key_of(name);
  // Read before the operations below move the entry into `doc`.
  int64_t base = existing ? enrollment::ca_revision(*existing) : 0;
  json doc;
  if (op == "delete") {
    batch.del(storage::cf::certificates, key);
  } else {
    json j;
    if (op != "code") {
      if (auto err = parse_json_body(body, j))
        return fail(std::move(err));
    }
    if (op == "put") {
      if (auto err = enrollment::ca_upload(name, j, existing ? &*existing : nullptr,
                                           now_ms(), doc))
        return fail(std::move(err));
      // One CA, one name: otherwise deleting one name would leave the
      // CA trusted under the other, and groups could not tell them apart.
      std::string other;
      const auto thumb = doc.value("thumbprint", std::string());
      // A stored CA that does not open cannot be compared: skipped (it
      // must not make every upload a 500; GET /certificates names it).
      auto err = deps_.store->scan_tolerant(
        storage::cf::certificates, "", 0,
        [&](std::string_view k, std::string_view v) {
          if (k == key)
            return true;
          auto e = json::parse(v, nullptr, false);
          if (!e.is_discarded() && e.is_object()
              && e.value("thumbprint", std::string()) == thumb) {
            other = e.value("name", std::string(k));
            return false;
          }
          return true;
        },
        [](std::string_view, const error&) { return true; });
      if (err)
        return fail(std::move(err));
      if (!other.empty())
        return fail({error_code::conflict,
                     "this CA certificate (SHA-1 thumbprint " + thumb
                       + ") is already in the certificate store as '" + other
                       + "'; a CA is stored once"});
    } else if (op == "code") {
      doc = std::move(*existing);
      enrollment::ca_new_verification_code(doc, now_ms());
    } else if (op == "crl") {
      doc = std::move(*existing);
      if (auto err = enrollment::ca_put_crl(doc, j, now_ms()))
        return fail(std::move(err));
    } else if (op == "verify") {
      doc = std::move(*existing);
      if (auto err = enrollment::ca_verify(doc, j, now_ms()))
        return fail(std::move(err));
    } else {
      return fail({error_code::internal, "unknown certificate operation " + op});
    }
    // One more than any revision this instance has seen for the name,
    // its last delete's included (see ca_store.hpp: Kafka ordering).
    std::optional<std::string> deleted;
    if (auto err = deps_.store->get(storage::cf::meta, enrollment::ca_deleted_meta_key(key),
                                   deleted))
      return fail(std::move(err));
    if (deleted)
      base = std::max<int64_t>(base, std::strtoll(deleted->c_str(), nullptr, 10));
    doc["revision"] = base + 1;
    batch.put(storage::cf::certificates, key, doc.dump());
  }
  if (auto err = deps_.catalog.write_certificates(batch))
    return fail(std::move(err));
  if (op == "delete")
    return reply.fn({}, {});
  reply.fn({}, (op == "code" ? enrollment::ca_verification_public(doc)
                             : enrollment::ca_public(doc))
                 .dump());
}

void enrollment_actor::on_hub(const std::string& op, const std::string& hostname,
                              const std::string& body, doc_reply_fn& reply) {
  auto fail = [&](error e) { reply.fn(std::move(e), {}); };
  const auto key = allocation::hub_key(hostname);
  auto set = deps_.hubs.hubs();
  const bool exists = std::any_of(set->begin(), set->end(), [&](const auto& h) {
    return allocation::hub_key(h.hostname) == key;
  });
  storage::write_batch batch;
  allocation::linked_hub h;
  if (op == "delete") {
    if (!exists)
      return fail({error_code::linked_hub_not_found,
                   "'" + hostname + "' is not a linked IoT hub"});
    batch.del(storage::cf::hubs, key);
  } else {
    if (auto err = allocation::hub_from_body(hostname, body, h))
      return fail(std::move(err));
    if (!exists && set->size() >= allocation::max_linked_hubs)
      return fail({error_code::invalid_linked_hub,
                   "at most " + std::to_string(allocation::max_linked_hubs)
                     + " IoT hubs can be linked (DPS's limit); remove one first"});
    batch.put(storage::cf::hubs, key, allocation::to_json(h));
  }
  // From now on the set is the operator's: a later start keeps it.
  batch.put(storage::cf::meta, hubs_seeded_key, "managed");
  if (auto err = deps_.write_hubs(batch))
    return fail(std::move(err));
  if (op == "delete")
    return reply.fn({}, {});
  reply.fn({}, public_hub(deps_.hubs, h).dump());
}

void enrollment_actor::on_delete_registration(const std::string& id,
                                              const std::string& if_match,
                                              done_reply_fn& reply) {
  auto key = enrollment::key_of(id);
  std::optional<std::string> raw;
  if (auto err = deps_.store->get(storage::cf::registrations, key, raw)) {
    reply.fn(std::move(err));
    return;
  }
  if (!raw) {
    reply.fn({error_code::registration_not_found,
              "no registration record for '" + id + "'"});
    return;
  }
  registration_state rs;
  if (auto err = decode_record(*raw, rs)) {
    reply.fn(std::move(err));
    return;
  }
  if (!if_match.empty() && !enrollment::etag_matches(if_match, rs.etag)) {
    reply.fn({error_code::precondition_failed,
              "etag mismatch: the registration record changed since it was read"});
    return;
  }
  storage::write_batch batch;
  batch.del(storage::cf::registrations, key);
  reply.fn(deps_.catalog.write_registrations(batch));
}

} // namespace prov
