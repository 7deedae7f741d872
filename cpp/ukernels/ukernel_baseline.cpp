// Portable baseline: 16-byte vectors (SSE2 on x86-64, NEON on aarch64), no FMA assumed.
#include <cstdint>

#include "convfast/dispatch.hpp"

namespace {
#include "gemm_ukernel_impl.hpp"
}  // namespace

namespace convfast {
const UkernelSet& ukernels_baseline() {
  static const UkernelSet set = {
      "baseline",
      {&gemm_ukernel<float, 4, 16, 2>, 4, 8,
       {&direct_ukernel<float, 1, 16, 2>, &direct_ukernel<float, 2, 16, 2>, &direct_ukernel<float, 4, 16, 2>},
       8},
      {&gemm_ukernel<double, 4, 16, 2>, 4, 4,
       {&direct_ukernel<double, 1, 16, 2>, &direct_ukernel<double, 2, 16, 2>, &direct_ukernel<double, 4, 16, 2>},
       4},
  };
  return set;
}
}  // namespace convfast
