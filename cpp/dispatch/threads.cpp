// The thread count of each engine call (see convfast/threads.hpp).
#include "convfast/threads.hpp"

#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <utility>

#include "convfast/dispatch.hpp"

namespace convfast {
namespace {

// Per thread, at least this many multiply-adds (2 threads from 4 M). Measured at batch 1, float32,
// 2 shared cores, p10 of 1 thread over 2 threads: 3x3 layers of 1.8 M (32 channels 14x14, 16 at
// 28x28) forward 1.00-1.03x, grad_input 0.99-1.00x; 0.2-0.8 M (1x1, depthwise) 0.38-1.28x; 7.2 M
// (32 at 28x28, 64 at 14x14) 1.27-1.59x in all three passes.
constexpr double kDefaultMinWorkPerThread = 2.0e6;

std::atomic<int> g_num_threads{0};    // convfast.set_num_threads, 0: unset
std::atomic<int> g_icv_at_set{0};     // omp_get_max_threads() when it was set
std::atomic<double> g_min_work{kDefaultMinWorkPerThread};
std::atomic<bool> g_threads_used{false}, g_serial_after_fork{false};
thread_local int t_call_threads = 0, t_last_call_threads = 0;

int cores() {
  static const int n = std::max(1, omp_get_num_procs());
  return n;
}

// The cores as tokens. An outermost call takes up to the threads it wants from the free ones; when
// none is free it waits (its GIL released: every entry is called from a gil_scoped_release section
// of src/module.cpp) rather than oversubscribe: 4 Python threads each running a 2-thread call on 2
// cores made 5 threads, whose OpenMP barriers waited on descheduled members. Tokens given back while
// several calls wait are spread one per call: calls side by side on one thread each do more than one
// after another on all (4 Python threads, 1x64x56x56 3x3: 1.11x the serial throughput against 0.94x).
//
// Waiting calls queue in arrival order. Tokens enough for every waiting call are handed to them. A
// token given back while more calls wait than tokens are free wakes the call at the head, but a call
// arriving while it wakes may take the token first: usually the thread that gave it back, back from
// Python within microseconds, while a sleeping thread takes tens to hundreds of microseconds to run
// on this virtual machine's cores, which stood idle meanwhile. So that none starves, a head
// overtaken kMaxOvertakes times is overtaken no more: tokens given back are then handed to it
// directly, and it is woken alone with them, as are the calls behind it in their turn. 4 Python
// threads against serial calls, 2 cores: 1x32x14x14 3x3 1.20-1.32x -> 1.64-1.86x the throughput,
// 1x64x56x56 1.0 -> 0.85-0.91 ms per call (medians of 6 runs of 2000 / 100 calls).
constexpr int kMaxOvertakes = 4;

struct Waiter {
  int want = 0, threads = 0, tokens = 0;
  int overtaken = 0;  // calls that took tokens while it waited at the head
  std::condition_variable woken;
};

struct Tokens {
  std::mutex mutex;
  int free = cores();            // below 0 only while hold_threads holds more than the cores
  std::deque<Waiter*> queue;     // waiting calls, first come first served

  // Grants w its threads (free > 0, mutex held): what it wants from the free tokens, less one for
  // each of the `behind` calls still waiting after it (at least one); all it wants when every
  // token is free and none waits (an explicit setting above the cores is honoured for a call alone).
  void grant(Waiter& w, int behind) {
    w.tokens = std::min(w.want, std::max(1, free - behind));
    w.threads = free >= cores() && behind == 0 ? w.want : w.tokens;
    free -= w.tokens;
  }

  bool head_is_due() const { return !queue.empty() && queue.front()->overtaken >= kMaxOvertakes; }

  // Free tokens to the queue (mutex held). With a token for every waiter, or for a due head, they
  // are handed over, each waiter woken with its own (tokens given back while several calls wait
  // go one to each of them, whenever these wake up); else the head is woken to take them itself,
  // unless a newcomer does first.
  void serve() {
    const bool every_waiter = free >= static_cast<int>(queue.size());
    while (free > 0 && !queue.empty() && (every_waiter || head_is_due())) {
      Waiter* w = queue.front();
      queue.pop_front();
      grant(*w, static_cast<int>(queue.size()));
      w->woken.notify_one();
    }
    if (free > 0 && !queue.empty()) queue.front()->woken.notify_one();
  }

  // Returns {threads, tokens} for a call that wants `want` threads, waiting while none is free.
  std::pair<int, int> take(int want) {
    Waiter self;
    self.want = want;
    std::unique_lock<std::mutex> lock(mutex);
    if (free > 0 && !head_is_due()) {
      if (!queue.empty()) ++queue.front()->overtaken;
      grant(self, static_cast<int>(queue.size()));
      return {self.threads, self.tokens};
    }
    queue.push_back(&self);
    self.woken.wait(lock, [&] { return self.tokens > 0 || (free > 0 && queue.front() == &self); });
    if (self.tokens == 0) {  // woken at the head to take free tokens (else handed them, off the queue)
      queue.pop_front();
      grant(self, static_cast<int>(queue.size()));
      serve();  // tokens left over go on to the next waiter
    }
    return {self.threads, self.tokens};
  }

  void give(int n) {
    std::lock_guard<std::mutex> lock(mutex);
    free += n;
    serve();
  }
};

Tokens& tokens() {
  static Tokens* t = new Tokens;  // never destroyed: calls may still run at exit
  return *t;
}

// libgomp's thread pool does not survive fork: a parallel region in the child waits forever for
// the parent's threads. A child forked after convfast ran threads therefore runs serially (a pool
// cannot be rebuilt safely). The token mutex is held across fork so that the child's copy is in a
// known state; the child has every token free (the calls that held or waited for them are not in it).
void before_fork() { tokens().mutex.lock(); }
void after_fork_in_parent() { tokens().mutex.unlock(); }
void after_fork_in_child() {
  Tokens& t = tokens();
  t.free = cores();
  t.queue.clear();
  t.mutex.unlock();
  t_call_threads = 0;
  if (g_threads_used.load()) g_serial_after_fork.store(true);
}

const int g_atfork_registered = pthread_atfork(&before_fork, &after_fork_in_parent, &after_fork_in_child);

// The user's setting: convfast.set_num_threads, unless OpenMP's own (omp_set_num_threads, e.g.
// from threadpoolctl) changed after it, in which case the latest word wins, as in PyTorch.
int configured_threads() {
  const int icv = omp_get_max_threads();
  const int n = g_num_threads.load(std::memory_order_relaxed);
  return n > 0 && icv == g_icv_at_set.load(std::memory_order_relaxed) ? n : icv;
}

}  // namespace

void set_num_threads(int n) {
  g_icv_at_set.store(omp_get_max_threads());
  g_num_threads.store(n > 0 ? n : 0);
}

int get_num_threads() {
  const int t = t_call_threads;
  return t > 0 ? t : configured_threads();
}

CallThreads::CallThreads(double multiply_adds) {
  (void)g_atfork_registered;
  if (t_call_threads > 0) return;  // an enclosing entry on this thread holds the count (and tokens)
  outermost_ = true;
  if (omp_in_parallel()) {
    // Inside a user's parallel region: serial, and no tokens (the region's threads already occupy
    // the cores, and one member waiting would stall the others at the region's next barrier).
    t_call_threads = t_last_call_threads = 1;
    return;
  }
  int want = g_serial_after_fork.load(std::memory_order_relaxed) ? 1 : std::max(1, configured_threads());
  const double per_thread = g_min_work.load(std::memory_order_relaxed);
  if (multiply_adds <= 0)
    want = 1;
  else if (want > 1 && per_thread > 0 && multiply_adds < per_thread * want)
    want = static_cast<int>(std::clamp(multiply_adds / per_thread, 1.0, double(want)));
  const auto [threads, held] = tokens().take(want);
  tokens_ = held;
  t_call_threads = t_last_call_threads = threads;
  if (threads > 1) g_threads_used.store(true, std::memory_order_relaxed);
}

CallThreads::~CallThreads() {
  if (!outermost_) return;
  if (tokens_ > 0) tokens().give(tokens_);
  t_call_threads = 0;
}

void set_min_work_per_thread(double multiply_adds) { g_min_work.store(std::max(0.0, multiply_adds)); }
double min_work_per_thread() { return g_min_work.load(); }
int last_call_threads() { return t_last_call_threads; }
int threads_in_flight() {
  Tokens& t = tokens();
  std::lock_guard<std::mutex> lock(t.mutex);
  return cores() - t.free;
}
void hold_threads(int n) {
  Tokens& t = tokens();
  std::lock_guard<std::mutex> lock(t.mutex);
  t.free -= n;
  t.serve();
}
bool serial_after_fork() { return g_serial_after_fork.load(); }

}  // namespace convfast
