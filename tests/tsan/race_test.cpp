// Proves that `make test-tsan` can fail on a race in our kind of code, and
// that a correct CAF handoff does not report. Built and registered only in
// the ThreadSanitizer build (tests/tsan/README.md). One case per run:
//
//   tsan_race_test thread_vs_actor   a thread and an actor write one string
//   tsan_race_test actor_vs_actor    two actors write one string
//   tsan_race_test handoff           strings, a shared state and a reply
//                                    callback passed only through messages
//
// The first two must print "ThreadSanitizer: data race" (ctest's pass
// regex); tests/tsan.supp must not hide them the way the old
// `race:libcaf_core.so` did (the actor's stack runs through CAF's resume).
// The third must print nothing: without the happens-before edges of
// caf_happens_before.cpp it reports races on the strings handed over
// (tsan_handoff_without_hooks).

#include <caf/all.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <string>

namespace {

using go_atom = caf::atom_constant<caf::atom("go")>;
using step_atom = caf::atom_constant<caf::atom("step")>;
using tick_atom = caf::atom_constant<caf::atom("tick")>;

struct shared_state {
  std::string text;
};
using state_ptr = std::shared_ptr<shared_state>;

/// Like engine::register_cb: a reply leaves the actor world through a
/// callback carried in the message.
struct reply_fn {
  std::function<void(std::string)> fn;
};

} // namespace

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(state_ptr)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(reply_fn)

namespace {

// Writes the shared string with no synchronisation with anyone but the
// sender of `go`.
caf::behavior writer(caf::event_based_actor*, state_ptr st) {
  return {[st](go_atom) {
    // Inline (instrumented) first, so the report's top frame is this
    // handler; then through libstdc++ (not instrumented; TSan sees its
    // memcpy), as real code would.
    st->text[0] = 'A';
    st->text.assign("written by an actor, long enough to live on the heap");
    return std::string("done");
  }};
}

int thread_vs_actor(caf::actor_system& sys) {
  auto st = std::make_shared<shared_state>();
  st->text = "before";
  auto a = sys.spawn(writer, st);
  caf::scoped_actor self{sys};
  auto pending = self->request(a, caf::infinite, go_atom::value);
  // The race: after the request left, before its answer arrives.
  st->text[0] = 'T';
  st->text.assign("written by the main thread, also long enough for the heap");
  pending.receive([](const std::string&) {}, [](caf::error&) {});
  return 0;
}

int actor_vs_actor(caf::actor_system& sys) {
  auto st = std::make_shared<shared_state>();
  st->text = "before";
  auto a = sys.spawn(writer, st);
  // Detached: its own thread, so the two writers never share a worker
  // (on one thread the writes would be ordered and nothing to report).
  auto b = sys.spawn<caf::detached>(writer, st);
  caf::scoped_actor self{sys};
  // Both asked before either answer is read: awaiting a's answer before
  // asking b would order b's write after a's.
  auto from_a = self->request(a, caf::infinite, go_atom::value);
  auto from_b = self->request(b, caf::infinite, go_atom::value);
  from_a.receive([](const std::string&) {}, [](caf::error&) {});
  from_b.receive([](const std::string&) {}, [](caf::error&) {});
  return 0;
}

// Relays: appends to the payload and the shared string, asks the next hop,
// then calls the reply callback. Everything it touches came in a message.
caf::behavior relay(caf::event_based_actor* self, caf::actor next) {
  return {
    [self, next](step_atom, std::string payload, state_ptr st, reply_fn reply) {
      payload += " +relay";
      st->text += " +relay";
      // Through the timer thread as well (the allocation actor's retries):
      // made on this worker, handed to CAF's clock thread, consumed on the
      // next hop's own thread.
      self->delayed_send(next, std::chrono::milliseconds(1), tick_atom::value,
                         payload + " +tick, long enough for the heap");
      self->request(next, caf::infinite, step_atom::value, std::move(payload), st)
        .then([st, reply](std::string back) {
          st->text += " +relay-again";
          reply.fn(std::move(back));
        });
    },
  };
}

caf::behavior last_hop(caf::event_based_actor*) {
  return {
    [](step_atom, std::string payload, state_ptr st) {
      st->text += " +last";
      return payload + " +last";
    },
    [](tick_atom, std::string s) { s += " +tick"; },
  };
}

int handoff(caf::actor_system& sys) {
  auto last = sys.spawn<caf::detached>(last_hop);
  auto first = sys.spawn(relay, last);
  for (int i = 0; i < 200; ++i) {
    auto st = std::make_shared<shared_state>();
    st->text = "main " + std::to_string(i);
    std::string payload = "payload from the main thread, long enough for the heap";
    std::promise<std::string> answer;
    auto done = answer.get_future();
    reply_fn reply{[&answer](std::string s) { answer.set_value(std::move(s)); }};
    caf::anon_send(first, step_atom::value, std::move(payload), st, std::move(reply));
    auto back = done.get();
    // Ordered after the relay's writes by the promise; the tick may still
    // be pending, so read only what the reply ordered.
    if (back.find("+last") == std::string::npos) {
      std::fprintf(stderr, "handoff: unexpected answer %s\n", back.c_str());
      return 1;
    }
  }
  caf::anon_send_exit(first, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(last, caf::exit_reason::user_shutdown);
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s thread_vs_actor|actor_vs_actor|handoff\n", argv[0]);
    return 2;
  }
  caf::actor_system_config cfg;
  cfg.set("logger.verbosity", caf::atom("quiet"));
  cfg.set("scheduler.max-threads", 2);
  caf::actor_system sys{cfg};
  if (std::strcmp(argv[1], "thread_vs_actor") == 0)
    return thread_vs_actor(sys);
  if (std::strcmp(argv[1], "actor_vs_actor") == 0)
    return actor_vs_actor(sys);
  if (std::strcmp(argv[1], "handoff") == 0)
    return handoff(sys);
  std::fprintf(stderr, "unknown case %s\n", argv[1]);
  return 2;
}
