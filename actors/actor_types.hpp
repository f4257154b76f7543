#pragma once
// Atoms and message types exchanged by the stage actors (CAF 0.17.6 idioms:
// atom_constant with at most 10 characters, old-style inspect). Included only
// by actor implementation files.

#include <caf/all.hpp>

#include "actors/configuration/terminal_state.hpp"
#include "actors/engine.hpp"
#include "actors/engine_context.hpp"
#include "messages/registration.hpp"

namespace prov {

// -- atoms --------------------------------------------------------------------
using accepted_atom = caf::atom_constant<caf::atom("accepted")>;
using allocated_atom = caf::atom_constant<caf::atom("allocated")>;
using bulk_atom = caf::atom_constant<caf::atom("bulk")>;
using cert_atom = caf::atom_constant<caf::atom("cert")>;
using committed_atom = caf::atom_constant<caf::atom("committed")>;
using delete_atom = caf::atom_constant<caf::atom("delete")>;
using deletereg_atom = caf::atom_constant<caf::atom("deletereg")>;
using event_atom = caf::atom_constant<caf::atom("event")>;
using expire_atom = caf::atom_constant<caf::atom("expire")>;
using put_atom = caf::atom_constant<caf::atom("put")>;
using register_atom = caf::atom_constant<caf::atom("register")>;
using recorded_atom = caf::atom_constant<caf::atom("recorded")>;
using relayed_atom = caf::atom_constant<caf::atom("relayed")>;
using handedoff_atom = caf::atom_constant<caf::atom("handedoff")>;
using resend_atom = caf::atom_constant<caf::atom("resend")>;
using waittick_atom = caf::atom_constant<caf::atom("waittick")>;
using drain_atom = caf::atom_constant<caf::atom("drain")>;
using hub_atom = caf::atom_constant<caf::atom("hub")>;

// The credential is left out: it must never reach a log.
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, register_request& x) {
  return f(x.id_scope, x.registration_id, x.api_version, x.payload_json,
           x.force_registration, x.protocol, x.client_ip, x.correlation_id);
}

namespace attestation {
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, verdict& x) {
  return f(x.result, x.err, x.type, x.enrollment_group_id, x.enabled, x.challenge, x.x509_json,
           x.key_used);
}
} // namespace attestation

/// Callback holders: replies leave the actor world through these (the gateway
/// is not an actor). Never serialized, so whitelisted as unsafe types.
struct register_reply_fn {
  engine::register_cb fn;
};
struct done_reply_fn {
  engine::done_cb fn;
};
struct doc_reply_fn {
  engine::doc_cb fn;
};
/// Travels with an event from an acked bus subscription: the stage calls it
/// once the event's effect is durable (Kafka then commits the offset). Empty
/// or a no-op on the in-process bus.
struct event_ack {
  bus::stage_bus::ack_fn fn;
  void operator()() const {
    if (fn)
      fn();
  }
};

// Every stage is a typed actor class, each in its <stage>_actor.hpp.

} // namespace prov

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(prov::register_reply_fn)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(prov::done_reply_fn)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(prov::doc_reply_fn)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(prov::event_ack)
