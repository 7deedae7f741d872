// Portable baseline: 16-byte vectors (SSE2 on x86-64, NEON on aarch64), no FMA assumed.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "convfast/dispatch.hpp"

namespace {
#include "gemm_ukernel_impl.hpp"
}  // namespace

namespace convfast {
const UkernelSet& ukernels_baseline() {
  static const UkernelSet set = make_ukernel_set<16, 4>("baseline");
  return set;
}
}  // namespace convfast
