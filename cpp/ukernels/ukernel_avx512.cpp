// AVX-512F: 32 zmm registers hold 24 accumulators (12 rows x 2 vectors), 2 B vectors and a
// broadcast. Compiled with -mavx512f; selected only when the CPU (and OS) support it.
#include <cstdint>

#include "convfast/dispatch.hpp"

namespace {
#include "gemm_ukernel_impl.hpp"
}  // namespace

namespace convfast {
const UkernelSet& ukernels_avx512() {
  static const UkernelSet set = {
      "avx512",
      {&gemm_ukernel<float, 12, 64, 2>, 12, 32,
       {&direct_ukernel<float, 1, 64, 2>, &direct_ukernel<float, 2, 64, 2>, &direct_ukernel<float, 4, 64, 2>},
       32},
      {&gemm_ukernel<double, 12, 64, 2>, 12, 16,
       {&direct_ukernel<double, 1, 64, 2>, &direct_ukernel<double, 2, 64, 2>, &direct_ukernel<double, 4, 64, 2>},
       16},
  };
  return set;
}
}  // namespace convfast
