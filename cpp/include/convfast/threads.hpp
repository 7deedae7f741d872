// How many threads one engine call uses (cpp/dispatch/threads.cpp).
//
// Every engine entry (run_convolution, ConvPlan's constructor and execute, weight_grad, run_pad)
// holds a CallThreads for its duration. It fixes the call's thread count, which get_num_threads()
// returns on the calling thread while the guard lives, as the smallest of
//   - the setting: convfast.set_num_threads, unless the OpenMP runtime's own setting (omp_set_num_threads,
//     which threadpoolctl calls) changed after it; else omp_get_max_threads(),
//   - the work: one thread per kMinWorkPerThread multiply-adds (so small layers run on one thread),
//   - the cores: the cores are tokens; a call takes what it wants of the free ones, and when none is
//     free it waits (first come, first served) until a call in flight gives some back, so that
//     Python threads calling at once never run more threads than cores; tokens given back while
//     several calls wait go one per call first. A call that finds every token free and no call
//     waiting takes its whole setting, even above the cores. A call from inside an OpenMP
//     parallel region takes no token and runs serially, as does every call in a child forked after
//     threaded calls (libgomp's pool does not survive fork).
// Guards nest: an entry called from another (run_convolution -> ConvPlan) keeps the outer count and
// tokens. The guard must be made with the GIL released (module.cpp), since it may wait. Tokens go
// back when the outermost guard is destroyed, also by an exception.
// Results never depend on the count (the kernels' sums do not change with the split), and every
// per-thread scratch array is sized at execute time from the count in force then.
#pragma once
#include <cstdint>
#include <limits>

#include "convfast/spec.hpp"

namespace convfast {

class CallThreads {
 public:
  static constexpr double kAnyWork = std::numeric_limits<double>::infinity();
  // multiply_adds <= 0: one thread.
  explicit CallThreads(double multiply_adds);
  ~CallThreads();
  CallThreads(const CallThreads&) = delete;
  CallThreads& operator=(const CallThreads&) = delete;

 private:
  bool outermost_ = false;  // false: an enclosing guard on this thread decides
  int tokens_ = 0;          // the cores' tokens this call holds
};

// The multiply-adds of a forward or transposed convolution (the work CallThreads weighs).
template <typename T>
double conv_multiply_adds(const ConvProblem<T>& p) {
  double v = double(p.batch) * double(p.groups) * double(p.cin_per_group) * double(p.cout_per_group);
  for (int a = 0; a < kSpatialRank; ++a)
    v *= double(p.kernel[a]) * double(p.kind == ConvKind::Forward ? p.out_size[a] : p.in_size[a]);
  return v;
}

// Multiply-adds below which a call stays on one thread, per thread (n threads need n times this).
void set_min_work_per_thread(double multiply_adds);
double min_work_per_thread();
// The thread count of the last engine call made on this thread (0 before any).
int last_call_threads();
// The cores' tokens held by convfast calls in flight, all threads together. hold_threads(n) takes n
// of them as another call would, without waiting, and hold_threads(-n) gives them back (tests).
int threads_in_flight();
void hold_threads(int n);
// Whether this process is a child forked after threaded calls (every call then runs serially).
bool serial_after_fork();

}  // namespace convfast
