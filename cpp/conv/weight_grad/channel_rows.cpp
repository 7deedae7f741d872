// The channel-rows weight gradient: one-tap layers (1x1, stride 1, no padding; chosen in
// registry.cpp) with few input channels. Both operands are read in place: every output
// out[cb, ca] is a dot product of a gradient row and an input row over the pixels, so the row
// micro-kernel (the rows weight gradient's) multiplies MB gradient rows by TB input-channel rows,
// pixels in the vector lanes, into per-lane partial sums summed in lane order at the end. The GEMM
// copies both operands transposed first, and with few channels those copies cost more than the
// products (1x1 16 -> 96 on 8 x 56 x 56, 1 thread: the two copies 51 % of the time).
// Each item -- a group's block of MB output channels -- owns its outputs and runs all pixels in a
// fixed order (images, then rows, then chunks of a row), so the result is the same for any thread
// count. The chunks keep the item's MB gradient rows in L1 while every input-channel block reads
// them; a lane sums the same pixels in the same order as over the whole row.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "convfast/dispatch.hpp"
#include "convfast/engine.hpp"
#include "convfast/scratch.hpp"
#include "convfast/threads.hpp"
#include "convfast/weight_grad.hpp"

#include "algorithm.hpp"

namespace convfast {
namespace wgrad {

// Where the copies outweigh the row kernel's lower multiply-add rate (it loads MB + TB vectors
// per MB x TB multiply-adds, from L1): few input channels, or few on both sides. Against the GEMM,
// 1 thread, f32, batch 8, Ca -> Cb: 16 -> 96 on 56x56 2.0x, 24 -> 144 on 28x28 1.4x, 32 -> 16 on
// 56x56 1.5x, 32 -> 32 on 28x28 1.1x; but 32 -> 192 and 192 -> 32 on 14x14 0.75x and 0.67x, 96 -> 24
// on 56x56 0.73x, 64 -> 64 on 56x56 (batch 1) 0.73x.
constexpr int64_t kChannelRowsFewInputs = 24, kChannelRowsFewBoth = 32;
// Pixels per chunk of a row: MB + TB rows of 2 KiB (float32) stay in L1.
constexpr int64_t kChannelRowsChunkBytes = 2048;

template <typename T>
bool channel_rows_weight_grad_applies(const WeightGradProblem<T>& p) {
  const UkernelInfo<T>& uk = active_ukernel<T>();
  for (int a = 0; a < kSpatialRank; ++a)
    if (p.kernel[a] != 1 || p.stride[a] != 1 || p.pad_before[a] != 0 || p.a_size[a] != p.b_size[a]) return false;
  const int64_t ca_g = p.a_channels / p.groups, cb_g = p.b_channels / p.groups;
  return uk.wgrad_rows[0] && p.a_stride[2] == 1 && p.b_stride[2] == 1 && p.b_size[2] >= uk.lanes &&
         cb_g >= kWgradRowsMax &&
         (ca_g <= kChannelRowsFewInputs || (ca_g <= kChannelRowsFewBoth && cb_g <= kChannelRowsFewBoth));
}

template <typename T>
void channel_rows_weight_grad(const WeightGradProblem<T>& p) {
  const UkernelInfo<T>& uk = active_ukernel<T>();
  const int L = uk.lanes;
  const int64_t G = p.groups, ca_g = p.a_channels / G, cb_g = p.b_channels / G;
  // The shape with fewer wasted rows in its last blocks (4 x 3 on ties, as the rows path).
  auto waste = [&](int v) {
    return ceil_div(cb_g, (int64_t)kWgradRowsShape[v][0]) * kWgradRowsShape[v][0] * ceil_div(ca_g, (int64_t)kWgradRowsShape[v][1]) *
           kWgradRowsShape[v][1];
  };
  const int variant = uk.wgrad_rows[1] && waste(1) < waste(0) ? 1 : 0;
  const int MB = kWgradRowsShape[variant][0], TB = kWgradRowsShape[variant][1];
  const WgradRowsUkernel<T> kernel = uk.wgrad_rows[variant];
  const int64_t blocks = ceil_div(cb_g, (int64_t)MB), items = checked_mul(G, blocks);
  const int64_t ca_blocks = ceil_div(ca_g, (int64_t)TB);
  const int64_t acc_size = checked_mul(ca_blocks, (int64_t)MB * TB * L);
  const int64_t chunk = std::max<int64_t>(L, kChannelRowsChunkBytes / (int64_t)sizeof(T) / L * L);
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), items)));
  set_last_algorithm("weight_grad channel_rows " + std::to_string(MB) + "x" + std::to_string(TB) +
                     " threads=" + std::to_string(nthreads));
  std::vector<std::unique_ptr<AlignedBuffer<T>>> partials;
  for (int t = 0; t < nthreads; ++t) partials.emplace_back(new AlignedBuffer<T>(acc_size));
  const int64_t n2 = p.b_size[2];
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t g = item / blocks, cb0 = (item % blocks) * MB, valid = std::min<int64_t>(MB, cb_g - cb0);
    T* acc = partials[omp_get_thread_num()]->get();
    std::fill(acc, acc + acc_size, T(0));
    const T* gy[kWgradRowsMax];
    const T* x[kWgradRowsMax];
    for (int64_t n = 0; n < p.batch; ++n)
      for (int64_t o0 = 0; o0 < p.b_size[0]; ++o0)
        for (int64_t o1 = 0; o1 < p.b_size[1]; ++o1)
          for (int64_t j0 = 0; j0 < n2; j0 += chunk) {
            const int64_t len = std::min(chunk, n2 - j0);
            for (int m = 0; m < MB; ++m)  // channels past the group's last are computed from its first, and dropped
              gy[m] = p.b + n * p.b_stride_n + (g * cb_g + cb0 + (m < valid ? m : 0)) * p.b_stride_c +
                      o0 * p.b_stride[0] + o1 * p.b_stride[1] + j0;
            for (int64_t cab = 0; cab < ca_blocks; ++cab) {
              for (int t = 0; t < TB; ++t)  // likewise the input channels past the last
                x[t] = p.a + n * p.a_stride_n + (g * ca_g + std::min<int64_t>(cab * TB + t, ca_g - 1)) * p.a_stride_c +
                       o0 * p.a_stride[0] + o1 * p.a_stride[1] + j0;
              kernel(1, len, gy, 0, x, 0, acc + cab * (MB * TB * L));
            }
          }
    for (int64_t m = 0; m < valid; ++m)
      for (int64_t ca = 0; ca < ca_g; ++ca) {
        const T* lanes = acc + (ca / TB) * (MB * TB * L) + (m * TB + ca % TB) * L;
        T sum = T(0);
        for (int l = 0; l < L; ++l) sum += lanes[l];
        p.out[(g * cb_g + cb0 + m) * ca_g + ca] = sum;
      }
  }
}

template bool channel_rows_weight_grad_applies<float>(const WeightGradProblem<float>&);
template bool channel_rows_weight_grad_applies<double>(const WeightGradProblem<double>&);
template void channel_rows_weight_grad<float>(const WeightGradProblem<float>&);
template void channel_rows_weight_grad<double>(const WeightGradProblem<double>&);

// ---- The entry: 1x1 stride-1 unpadded layers, few input channels; CONVFAST_WGRAD_GEMM=1 excludes it
namespace channel_rows_entry {
constexpr double kRank = 3.0;  // its place in the table (registry.cpp)
template <typename T>
bool applies(WgradChoice<T>& c) {
  return channel_rows_weight_grad_applies(c.p);
}
template <typename T>
double cost(WgradChoice<T>& c) {
  if (wgrad_gemm_forced()) return c.refuse("CONVFAST_WGRAD_GEMM=1");
  return c.take("one tap, few input channels per group", kRank);
}
template <typename T>
bool run(WgradChoice<T>& c) {
  channel_rows_weight_grad(c.p);
  return true;
}
inline const char* describe() { return "channel_rows: the rows kernel with input channels in place of taps"; }
}  // namespace channel_rows_entry

template <typename T>
const WeightGradAlgorithm<T>& channel_rows_weight_grad_algorithm() {
  static const WeightGradAlgorithm<T> entry = {"channel_rows", channel_rows_entry::kRank,
      channel_rows_entry::applies<T>, channel_rows_entry::cost<T>,
      channel_rows_entry::run<T>, channel_rows_entry::describe};
  return entry;
}
template const WeightGradAlgorithm<float>& channel_rows_weight_grad_algorithm<float>();
template const WeightGradAlgorithm<double>& channel_rows_weight_grad_algorithm<double>();

}  // namespace wgrad
}  // namespace convfast
