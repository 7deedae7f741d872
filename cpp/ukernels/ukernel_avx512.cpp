// AVX-512F: 32 zmm registers hold 24 accumulators (12 rows x 2 vectors), 2 B vectors and a
// broadcast. Compiled with -mavx512f; selected only when the CPU (and OS) support it.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "convfast/dispatch.hpp"

namespace {
#include "gemm_ukernel_impl.hpp"
}  // namespace

namespace convfast {
const UkernelSet& ukernels_avx512() {
  static const UkernelSet set = make_ukernel_set<64, 12>("avx512");
  return set;
}
}  // namespace convfast
