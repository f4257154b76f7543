// Linked into every executable of the ThreadSanitizer build only
// (tests/tsan/README.md). Debian's libcaf_core is not built with
// -fsanitize=thread, so TSan cannot see the atomics with which CAF hands a
// message (and the strings, callbacks and shared_ptrs in it) from the
// sender's thread to the thread that runs the receiving actor: every
// message handoff would look like a data race. Instead of suppressing every
// report with a CAF frame (which hid races in our handlers too), these
// definitions interpose CAF's exported functions at the points where CAF
// itself synchronises and tell TSan about that happens-before edge; each then
// calls the library's own function (dlsym RTLD_NEXT). The executable's
// definition wins over the library's for every call, the library's own
// vtables included (symbolic relocations, checked for 0.17.6 with
// `readelf -rW libcaf_core.so | grep <symbol>`).
//
// The edges, all keyed by an address TSan never sees accessed otherwise:
// - spawn: launch releases on the actor, its first resume acquires;
// - mailbox: enqueue releases on the receiver; consuming each message
//   (scheduled and blocking actors' mailbox visitors, dequeue) acquires it;
// - an actor moving between worker threads: resume releases on the actor
//   when it returns, the next resume acquires;
// - reference counts (messages, actors): each decrement releases and
//   acquires on the object, so the thread that destroys it is ordered after
//   every earlier owner's use.
// A race between two threads that do not communicate through CAF (the
// deliberate races in race_test.cpp) stays visible.

#include <caf/actor_control_block.hpp>
#include <caf/blocking_actor.hpp>
#include <caf/ref_counted.hpp>
#include <caf/scheduled_actor.hpp>

#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

// PROV_TSAN_CAF_HOOKS=0 keeps only the forwarding (tsan_handoff_without_hooks
// shows that the handoff test then reports races, i.e. the hooks matter).
const bool hooks_on = [] {
  const char* v = std::getenv("PROV_TSAN_CAF_HOOKS");
  return v == nullptr || std::strcmp(v, "0") != 0;
}();

template <class Fn>
Fn next_definition(const char* mangled) {
  void* p = dlsym(RTLD_NEXT, mangled);
  if (p == nullptr) {
    std::fprintf(stderr, "tsan caf hooks: %s not found in libcaf_core\n", mangled);
    std::abort();
  }
  Fn fn;
  static_assert(sizeof fn == sizeof p);
  std::memcpy(&fn, &p, sizeof p);
  return fn;
}

void release(const void* x) {
  if (hooks_on)
    __tsan_release(const_cast<void*>(x));
}

void acquire(const void* x) {
  if (hooks_on)
    __tsan_acquire(const_cast<void*>(x));
}

} // namespace

namespace caf {

void scheduled_actor::enqueue(mailbox_element_ptr ptr, execution_unit* eu) {
  using fn_t = void (*)(scheduled_actor*, mailbox_element_ptr, execution_unit*);
  static const auto real = next_definition<fn_t>(
    "_ZN3caf15scheduled_actor7enqueueESt10unique_ptrINS_15mailbox_elementENS_6detail8disposerEEPNS_14execution_unitE");
  release(this);
  real(this, std::move(ptr), eu);
}

resumable::resume_result scheduled_actor::resume(execution_unit* eu, size_t max_throughput) {
  using fn_t = resumable::resume_result (*)(scheduled_actor*, execution_unit*, size_t);
  static const auto real =
    next_definition<fn_t>("_ZN3caf15scheduled_actor6resumeEPNS_14execution_unitEm");
  acquire(this);
  auto result = real(this, eu, max_throughput);
  // The worker still holds its reference here, whatever the result.
  release(this);
  return result;
}
// Workers call resume through the `resumable` base, i.e. through the thunk
// _ZThn160_...resume, which in the library jumps straight to the library's
// resume (no PLT). Defining resume here makes GCC emit that thunk here too,
// and the executable's thunk is the one the vtables use.

// Spawning: the spawner's writes (the actor's arguments, its initial
// state) before the first resume, which may run on a worker.
void scheduled_actor::launch(execution_unit* eu, bool lazy, bool hide) {
  using fn_t = void (*)(scheduled_actor*, execution_unit*, bool, bool);
  static const auto real =
    next_definition<fn_t>("_ZN3caf15scheduled_actor6launchEPNS_14execution_unitEbb");
  release(this);
  real(this, eu, lazy, hide);
}

// Each message: one resume consumes every message it finds, also those
// enqueued after it started (called through the PLT from the library's
// queue code).
intrusive::task_result scheduled_actor::mailbox_visitor::operator()(mailbox_element& x) {
  using fn_t = intrusive::task_result (*)(mailbox_visitor*, mailbox_element&);
  static const auto real = next_definition<fn_t>(
    "_ZN3caf15scheduled_actor15mailbox_visitorclERNS_15mailbox_elementE");
  acquire(self);
  return real(this, x);
}

intrusive::task_result blocking_actor::mailbox_visitor::operator()(mailbox_element& x) {
  using fn_t = intrusive::task_result (*)(mailbox_visitor*, mailbox_element&);
  static const auto real = next_definition<fn_t>(
    "_ZN3caf14blocking_actor15mailbox_visitorclERNS_15mailbox_elementE");
  acquire(self);
  return real(this, x);
}

void blocking_actor::enqueue(mailbox_element_ptr ptr, execution_unit* eu) {
  using fn_t = void (*)(blocking_actor*, mailbox_element_ptr, execution_unit*);
  static const auto real = next_definition<fn_t>(
    "_ZN3caf14blocking_actor7enqueueESt10unique_ptrINS_15mailbox_elementENS_6detail8disposerEEPNS_14execution_unitE");
  release(this);
  real(this, std::move(ptr), eu);
}

mailbox_element_ptr blocking_actor::dequeue() {
  using fn_t = mailbox_element_ptr (*)(blocking_actor*);
  static const auto real = next_definition<fn_t>("_ZN3caf14blocking_actor7dequeueEv");
  auto result = real(this);
  acquire(this);
  return result;
}

void ref_counted::deref() const noexcept {
  using fn_t = void (*)(const ref_counted*);
  static const auto real = next_definition<fn_t>("_ZNK3caf11ref_counted5derefEv");
  release(this);
  acquire(this);
  real(this);
}

void intrusive_ptr_release(actor_control_block* x) {
  using fn_t = void (*)(actor_control_block*);
  static const auto real =
    next_definition<fn_t>("_ZN3caf21intrusive_ptr_releaseEPNS_19actor_control_blockE");
  release(x);
  acquire(x);
  real(x);
}

} // namespace caf
