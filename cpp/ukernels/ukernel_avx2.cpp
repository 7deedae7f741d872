// AVX2 + FMA: 16 ymm registers hold 12 accumulators (6 rows x 2 vectors), 2 B vectors and one
// broadcast. Compiled with -mavx2 -mfma; selected only when the CPU (and OS) support both.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "convfast/dispatch.hpp"

namespace {
#include "gemm_ukernel_impl.hpp"
}  // namespace

namespace convfast {
const UkernelSet& ukernels_avx2() {
  static const UkernelSet set = make_ukernel_set<32, 6>("avx2");
  return set;
}
}  // namespace convfast
