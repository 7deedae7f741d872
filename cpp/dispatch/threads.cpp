// The thread count of each engine call (see convfast/threads.hpp).
#include "convfast/threads.hpp"

#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>

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
std::atomic<int> g_in_flight{0};      // threads held by the calls running now
std::atomic<bool> g_threads_used{false}, g_serial_after_fork{false};
thread_local int t_call_threads = 0, t_last_call_threads = 0;

int cores() {
  static const int n = std::max(1, omp_get_num_procs());
  return n;
}

// The user's setting: convfast.set_num_threads, unless OpenMP's own (omp_set_num_threads, e.g.
// from threadpoolctl) changed after it, in which case the latest word wins, as in PyTorch.
int configured_threads() {
  const int icv = omp_get_max_threads();
  const int n = g_num_threads.load(std::memory_order_relaxed);
  return n > 0 && icv == g_icv_at_set.load(std::memory_order_relaxed) ? n : icv;
}

// libgomp's thread pool does not survive fork: a parallel region in the child waits forever for
// the parent's threads. A child forked after convfast ran threads therefore runs serially (a pool
// cannot be rebuilt safely); the threads other calls held in the parent are not in the child.
void after_fork_in_child() {
  g_in_flight.store(0);
  t_call_threads = 0;
  if (g_threads_used.load()) g_serial_after_fork.store(true);
}

const int g_atfork_registered = pthread_atfork(nullptr, nullptr, &after_fork_in_child);

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
  if (t_call_threads > 0) return;  // an enclosing entry on this thread holds the count
  int want = configured_threads();
  if (omp_in_parallel() || g_serial_after_fork.load(std::memory_order_relaxed)) want = 1;
  const double per_thread = g_min_work.load(std::memory_order_relaxed);
  if (want > 1 && per_thread > 0 && multiply_adds < per_thread * want)
    want = static_cast<int>(std::clamp(multiply_adds / per_thread, 1.0, double(want)));
  // Alone, a call takes what it asked for; otherwise only the cores that other calls leave free.
  int held = g_in_flight.load();
  int grant = want;
  do {
    grant = held == 0 ? want : std::max(1, std::min(want, cores() - held));
  } while (!g_in_flight.compare_exchange_weak(held, held + grant));
  granted_ = grant;
  t_call_threads = t_last_call_threads = grant;
  if (grant > 1) g_threads_used.store(true, std::memory_order_relaxed);
}

CallThreads::~CallThreads() {
  if (granted_ == 0) return;
  g_in_flight.fetch_sub(granted_);
  t_call_threads = 0;
}

void set_min_work_per_thread(double multiply_adds) { g_min_work.store(std::max(0.0, multiply_adds)); }
double min_work_per_thread() { return g_min_work.load(); }
int last_call_threads() { return t_last_call_threads; }
int threads_in_flight() { return g_in_flight.load(); }
void hold_threads(int n) { g_in_flight.fetch_add(n); }
bool serial_after_fork() { return g_serial_after_fork.load(); }

}  // namespace convfast
