#include "convfast/dispatch.hpp"
#include "convfast/scratch.hpp"

#include <omp.h>

#include <algorithm>
#include <atomic>

namespace convfast {
namespace {

bool cpu_supports(const std::string& isa) {
  if (isa == "baseline") return true;
#if defined(CONVFAST_X86_VARIANTS)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XGETBV).
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#endif
  return false;
}

const UkernelSet* table_for(const std::string& isa) {
  if (isa == "baseline") return &ukernels_baseline();
#if defined(CONVFAST_X86_VARIANTS)
  if (isa == "avx2") return &ukernels_avx2();
  if (isa == "avx512") return &ukernels_avx512();
#endif
  return nullptr;
}

const char* const kIsasBestFirst[] = {"avx512", "avx2", "baseline"};

const UkernelSet* best_supported() {
  for (const char* isa : kIsasBestFirst)
    if (cpu_supports(isa) && table_for(isa)) return table_for(isa);
  return &ukernels_baseline();
}

std::atomic<const UkernelSet*> g_active{nullptr};

}  // namespace

std::string supported_isas() {
  std::string out;
  for (const char* isa : kIsasBestFirst) {
    if (cpu_supports(isa) && table_for(isa)) {
      if (!out.empty()) out += ",";
      out += isa;
    }
  }
  return out;
}

bool select_isa(const std::string& name) {
  if (name == "auto" || name.empty()) {
    g_active.store(best_supported());
    return true;
  }
  // The CPU first: building a variant's table runs code compiled for that ISA (the AVX-512 table's
  // initialisation uses AVX-512 stores), which would fault on a CPU without it.
  if (!cpu_supports(name)) return false;
  const UkernelSet* t = table_for(name);
  if (!t) return false;
  g_active.store(t);
  return true;
}

const UkernelSet& active_ukernels() {
  const UkernelSet* t = g_active.load();
  if (!t) {
    t = best_supported();
    g_active.store(t);
  }
  return *t;
}


namespace {
// The calling thread runs the active GEMM micro-kernel on L1-resident panels (K block 256, the
// engine's) for about `seconds`: the attainable FMA rate of one core, against which the
// benchmark's "% peak" is computed (a constant would not follow the host's clock).
template <typename T>
double measure_ukernel_peak(double seconds) {
  const UkernelInfo<T>& uk = active_ukernel<T>();
  constexpr int64_t kc = 256;
  // 64-byte aligned, as the engine's panels are (line-splitting loads would halve the rate).
  detail::AlignedBuffer<T> a(kc * uk.mr), b(kc * uk.nr), c(uk.mr * uk.nr);
  std::fill(a.get(), a.get() + kc * uk.mr, T(1e-3));
  std::fill(b.get(), b.get() + kc * uk.nr, T(1e-3));
  std::fill(c.get(), c.get() + uk.mr * uk.nr, T(0));
  int64_t calls = 0;
  const double start = omp_get_wtime();
  while (omp_get_wtime() - start < seconds)
    for (int i = 0; i < 64; ++i, ++calls) uk.fn(kc, a.get(), b.get(), c.get(), uk.nr, 1);
  const double elapsed = omp_get_wtime() - start;
  return 2.0 * kc * uk.mr * uk.nr * static_cast<double>(calls) / elapsed / 1e9;
}
}  // namespace

double ukernel_peak_gflops(bool f64, double seconds) {
  return f64 ? measure_ukernel_peak<double>(seconds) : measure_ukernel_peak<float>(seconds);
}

}  // namespace convfast
