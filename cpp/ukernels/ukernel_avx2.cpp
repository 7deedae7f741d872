// AVX2 + FMA: 16 ymm registers hold 12 accumulators (6 rows x 2 vectors), 2 B vectors and one
// broadcast. Compiled with -mavx2 -mfma; selected only when the CPU (and OS) support both.
#include <cstdint>

#include "convfast/dispatch.hpp"

namespace {
#include "gemm_ukernel_impl.hpp"
}  // namespace

namespace convfast {
const UkernelSet& ukernels_avx2() {
  static const UkernelSet set = {
      "avx2",
      {&gemm_ukernel<float, 6, 32, 2>, 6, 16,
       {&direct_ukernel<float, 1, 32, 2>, &direct_ukernel<float, 2, 32, 2>, &direct_ukernel<float, 4, 32, 2>},
       16},
      {&gemm_ukernel<double, 6, 32, 2>, 6, 8,
       {&direct_ukernel<double, 1, 32, 2>, &direct_ukernel<double, 2, 32, 2>, &direct_ukernel<double, 4, 32, 2>},
       8},
  };
  return set;
}
}  // namespace convfast
