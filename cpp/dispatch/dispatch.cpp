#include "convfast/dispatch.hpp"

#include <omp.h>

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
std::atomic<int> g_num_threads{0};

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
  const UkernelSet* t = table_for(name);
  if (!t || !cpu_supports(name)) return false;
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

void set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0); }

int get_num_threads() {
  const int n = g_num_threads.load();
  return n > 0 ? n : omp_get_max_threads();
}

}  // namespace convfast
