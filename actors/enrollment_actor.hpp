#pragma once
// The enrollment actor (enrollment_actor.cpp says what it does): its typed
// handle, what it depends on and its actor class. Included by engine.cpp and
// the tests; pulls in CAF.

#include <functional>
#include <string>

#include "actors/actor_types.hpp"

namespace prov {

/// What the service API's writer reads and writes, and nothing else of the
/// engine. Built in engine.cpp. Everything referred to outlives the actor
/// (the engine stops its actor system first).
struct enrollment_deps {
  storage::store* store;       ///< enrollments, CA certificates, registration records (reads)
  enrollment_catalog& catalog; ///< writes enrollments, certificates, registration deletes
  const allocation::hub_set& hubs; ///< the linked hubs now, and their health
  /// A linked hub write made durable and the live set reloaded
  /// (actors/hub_store.hpp, write_hubs).
  std::function<error(const storage::write_batch&)> write_hubs;
};

/// A wrong message to the enrollment actor is a compile error.
using enrollment_actor_type = caf::typed_actor<
  // (kind, id, body, if_match)
  caf::reacts_to<put_atom, enrollment::kind, std::string, std::string, std::string,
                 doc_reply_fn>,
  // (kind, id, if_match)
  caf::reacts_to<delete_atom, enrollment::kind, std::string, std::string, done_reply_fn>,
  // (kind, body)
  caf::reacts_to<bulk_atom, enrollment::kind, std::string, doc_reply_fn>,
  // (op "put", "code", "verify", "crl" or "delete", name, body, if_match)
  caf::reacts_to<cert_atom, std::string, std::string, std::string, std::string, doc_reply_fn>,
  // (op "put" or "delete", hostname, body)
  caf::reacts_to<hub_atom, std::string, std::string, std::string, doc_reply_fn>,
  // (registration id, if_match)
  caf::reacts_to<deletereg_atom, std::string, std::string, done_reply_fn>>;

/// The single writer of enrollments, groups, CA certificates, linked hubs
/// and registration-record deletes. A class rather than
/// `stateful_actor<enrollment_state>`: CAF 0.17.6 builds a state with no
/// arguments (or only `self`), and the dependencies are references given at
/// spawn (`spawn<enrollment_actor, caf::detached>(deps)`).
class enrollment_actor final : public enrollment_actor_type::base {
public:
  // -- construction -----------------------------------------------------------

  enrollment_actor(caf::actor_config& cfg, enrollment_deps deps);

  const char* name() const override { return "enrollment"; }

  behavior_type make_behavior() override;

  // -- message handlers -------------------------------------------------------

  void on_put(enrollment::kind k, const std::string& id, const std::string& body,
              const std::string& if_match, doc_reply_fn& reply);
  void on_delete(enrollment::kind k, const std::string& id, const std::string& if_match,
                 done_reply_fn& reply);
  void on_bulk(enrollment::kind k, const std::string& body, doc_reply_fn& reply);
  void on_cert(const std::string& op, const std::string& name, const std::string& body,
               const std::string& if_match, doc_reply_fn& reply);
  void on_hub(const std::string& op, const std::string& hostname, const std::string& body,
              doc_reply_fn& reply);
  void on_delete_registration(const std::string& id, const std::string& if_match,
                              done_reply_fn& reply);

private:
  // -- member variables -------------------------------------------------------

  const enrollment_deps deps_;
};

} // namespace prov
