// The rows weight gradient: few input channels per group (chosen in registry.cpp).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
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

// Few input channels per group (Ca/G <= kMaxRowsInputs), with the output gradient's rows
// contiguous: the GEMM would pack b transposed (a pass over the largest operand, written and read
// again) and a per tap for a tile of at most Ca/G x taps rows, and was memory-bound (the 3-D 1 -> 32
// layer: 22 ms on 1 or 2 threads). Here nothing of b is copied. a (the small operand) is first
// copied padded by the padding mode, so that every tap reads a whole row, and each row split into
// its stride phases, so that a tap's inputs are consecutive. Then each item -- a group's block of
// kWgradRowsMB output channels -- streams its gradient rows once, and the row micro-kernel
// multiplies kWgradRowsMB gradient rows by kWgradRowsTB tap-shifted input rows, pixels in the
// vector lanes, into per-lane partial sums, summed in lane order at the end. One item owns its
// outputs and runs all of K in a fixed order, so the result is the same for any thread count.
// Memory: the padded a, and per thread kWgradRowsMB x Ca/G x taps vectors.
// 8 measured 1.35x (f32) / 1.43x (f64) over the GEMM on a 3x3 8 -> 64 layer, 56x56; at 16 the two
// paths were level (0.97x / 1.10x), the GEMM's tiles being full there.
constexpr int64_t kMaxRowsInputs = 8;

template <typename T>
bool rows_weight_grad_applies(const WeightGradProblem<T>& p) {
  const UkernelInfo<T>& uk = active_ukernel<T>();
  // With 64-byte vectors the rows of strided layers (stored as stride phases) lose to the GEMM:
  // AVX-512, 2 threads, against it: stride 2 (the 7x7 stem, 3x3 s2 first layers) 0.46-0.76x float32,
  // 0.78-0.99x float64; stride 1 (3-D 1 -> 32, 3 -> 16/32 3x3) 1.5-2.8x.
  const bool wide_vectors = uk.lanes * static_cast<int>(sizeof(T)) >= 64;
  // Its calls are per image, input channel and tap row, each over one image's gradient: from 32
  // output channels the GEMM wins unless the images are large for their input channels (2 threads,
  // float32, min of interleaved runs, rows / GEMM ms): 64 x 1 -> 32 on 28x28 1.99 / 1.10, 8 x 8 -> 64
  // on 56x56 5.89 / 2.50, 8 x 4 -> 64 on 28x28 1.79 / 0.27, 8 x 3 -> 32 on 56x56 1.25 / 0.67, 8 x 8 ->
  // 32 on 112x112 7.26 / 5.94; rows kept: 8 x 1 -> 32 on 64x64 0.33 / 0.70, on 128x128 1.38 / 3.18,
  // 8 x 3 -> 32 on 112x112 2.86 / 3.12, 3 -> 64 on 224x224 20.8 / 22.1, 3 -> 16 on 56x56 0.48 /
  // 0.71, 3-D 1 -> 16 on 32^3 2.2 / 10.8, 1-D 1 -> 32 k7 on 16000 0.14 / 0.22.
  const int64_t ca_g = p.a_channels / p.groups, pixels = p.b_size[0] * p.b_size[1] * p.b_size[2];
  const bool large_images = p.b_channels / p.groups < 32 || pixels >= 4096 * ca_g;
  return uk.wgrad_rows[0] && ca_g <= kMaxRowsInputs && p.b_stride[2] == 1 && large_images &&
         p.b_size[2] >= uk.lanes && p.b_channels / p.groups >= kWgradRowsMax && !(wide_vectors && p.stride[2] > 1);
}

template <typename T>
void rows_weight_grad(const WeightGradProblem<T>& p) {
  const UkernelInfo<T>& uk = active_ukernel<T>();
  const int L = uk.lanes;
  const int64_t G = p.groups, ca_g = p.a_channels / G, cb_g = p.b_channels / G;
  const int64_t K0 = p.kernel[0], K1 = p.kernel[1], K2 = p.kernel[2];
  // The shape: calls (channel blocks x tap blocks) weighed, 4 x 3 at 1.4 for the vector it reloads.
  // The stem (64 channels, 7 taps per row): 16 x 3 calls at 4 x 3 against 22 x 2 at 3 x 4, which ran
  // its grad_weight 1.4x faster (both dtypes); a group of 4 channels with 3 taps: 1 x 1 against
  // 2 x 1 (3 x 4 1.2-2x slower); 32 channels with 3 taps: 8 against 11 x 1 (3 x 4 1.3x faster in
  // float32, level in float64); alternating processes, 2 threads.
  auto calls = [&](int v) {
    return double(ceil_div(cb_g, (int64_t)kWgradRowsShape[v][0]) * ceil_div(K2, (int64_t)kWgradRowsShape[v][1]));
  };
  const int variant = uk.wgrad_rows[1] && calls(1) <= 1.4 * calls(0) ? 1 : 0;
  const int MB = kWgradRowsShape[variant][0], TB = kWgradRowsShape[variant][1];
  const WgradRowsUkernel<T> kernel = uk.wgrad_rows[variant];
  set_last_algorithm("weight_grad rows " + std::to_string(MB) + "x" + std::to_string(TB) +
                     " threads=" + std::to_string(get_num_threads()));
  const int64_t t2_blocks = ceil_div(K2, (int64_t)TB);
  // The padded input: along each axis the E positions the taps of all outputs read, from -pad_before.
  int64_t E[kSpatialRank];
  std::vector<std::vector<int64_t>> source(kSpatialRank);  // per axis and position: the input index, or -1
  for (int a = 0; a < kSpatialRank; ++a) {
    E[a] = checked_add(checked_mul(p.b_size[a] - 1, p.stride[a]), checked_mul(p.kernel[a] - 1, p.dilation[a])) + 1;
    source[a].resize(static_cast<size_t>(E[a]));
    for (int64_t e = 0; e < E[a]; ++e) source[a][e] = map_padded_index(e - p.pad_before[a], p.a_size[a], p.mode);
  }
  // A padded row is stored as its s2 stride phases, each P2 long (position e2 at phase e2 mod s2,
  // index e2 / s2), so that every tap reads consecutive inputs for consecutive outputs.
  const int64_t s2 = p.stride[2], P2 = ceil_div(E[2], s2), row_size = checked_mul(s2, P2);
  const int64_t plane = checked_mul(E[1], row_size), volume = checked_mul(E[0], plane);
  const int64_t channels = checked_mul(p.batch, p.a_channels);
  AlignedBuffer<T> padded(checked_mul(channels, volume));
  const int64_t blocks = ceil_div(cb_g, (int64_t)MB), items = checked_mul(G, blocks);
  const int64_t acc_size = checked_mul(checked_mul(ca_g * K0 * K1, t2_blocks), (int64_t)MB * TB * L);
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), items)));
  std::vector<std::unique_ptr<AlignedBuffer<T>>> partials;
  for (int t = 0; t < nthreads; ++t) partials.emplace_back(new AlignedBuffer<T>(acc_size));
  T* ap = padded.get();
  // Each (input channel, tap row, tap block) call reads the item's output-gradient rows again:
  // where those rows of one image plane pass 128 KiB, the plane goes in blocks of rows holding
  // about 8 KiB of them (L1-resident across the calls; the same chains, in the same order). The
  // stem's 3->64 7x7 grad_weight (401 KiB per plane in float64): 55.9 -> 41.5 ms float64, 26.3 ->
  // 23.9 float32 (p25, one process alternating, 2 threads); the grouped and 3-D 1->32 layers'
  // planes (at most 100 KiB) were level to 3 % slower blocked, so they are not.
  const int64_t gy_row_bytes = checked_mul(MB * p.b_size[2], (int64_t)sizeof(T));
  const int64_t row_block = checked_mul(gy_row_bytes, p.b_size[1]) > (int64_t(128) << 10)
                                ? std::max<int64_t>(1, (int64_t(8) << 10) / gy_row_bytes)
                                : std::max<int64_t>(1, p.b_size[1]);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t job = 0; job < channels * E[0]; ++job) {
    const int64_t nc = job / E[0], e0 = job % E[0], n = nc / p.a_channels, c = nc % p.a_channels;
    T* dst = ap + nc * volume + e0 * plane;
    const int64_t i0 = source[0][e0];
    for (int64_t e1 = 0; e1 < E[1]; ++e1) {
      const int64_t i1 = source[1][e1];
      T* row = dst + e1 * row_size;
      if (i0 < 0 || i1 < 0) {
        std::fill(row, row + row_size, T(0));
        continue;
      }
      const T* src = p.a + n * p.a_stride_n + c * p.a_stride_c + i0 * p.a_stride[0] + i1 * p.a_stride[1];
      for (int64_t e2 = 0; e2 < E[2]; ++e2) {
        const int64_t i2 = source[2][e2];
        row[(e2 % s2) * P2 + e2 / s2] = i2 < 0 ? T(0) : src[i2 * p.a_stride[2]];
      }
      for (int64_t e2 = E[2]; e2 < row_size; ++e2) row[(e2 % s2) * P2 + e2 / s2] = T(0);  // never read
    }
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t g = item / blocks, cb0 = (item % blocks) * MB, valid = std::min<int64_t>(MB, cb_g - cb0);
    T* acc = partials[omp_get_thread_num()]->get();
    std::fill(acc, acc + acc_size, T(0));
    const T* gy[kWgradRowsMax];
    const T* x[kWgradRowsMax];
    for (int64_t n = 0; n < p.batch; ++n)
      for (int64_t o0 = 0; o0 < p.b_size[0]; ++o0)
        for (int64_t r0 = 0; r0 < p.b_size[1]; r0 += row_block) {
          const int64_t rows = std::min(row_block, p.b_size[1] - r0);
          for (int m = 0; m < MB; ++m)  // channels past the group's last are computed from its first, and dropped
            gy[m] = p.b + n * p.b_stride_n + (g * cb_g + cb0 + (m < valid ? m : 0)) * p.b_stride_c +
                    o0 * p.b_stride[0] + r0 * p.b_stride[1];
          for (int64_t ca = 0; ca < ca_g; ++ca)
            for (int64_t t0 = 0; t0 < K0; ++t0)
              for (int64_t t1 = 0; t1 < K1; ++t1) {
                const T* x_row = ap + (n * p.a_channels + g * ca_g + ca) * volume +
                                 (o0 * p.stride[0] + t0 * p.dilation[0]) * plane +
                                 (r0 * p.stride[1] + t1 * p.dilation[1]) * row_size;
                for (int64_t tb = 0; tb < t2_blocks; ++tb) {
                  for (int t = 0; t < TB; ++t) {  // taps past the last are computed from it, and dropped
                    const int64_t e2 = std::min<int64_t>(tb * TB + t, K2 - 1) * p.dilation[2];
                    x[t] = x_row + (e2 % s2) * P2 + e2 / s2;
                  }
                  T* block = acc + (((ca * K0 + t0) * K1 + t1) * t2_blocks + tb) * (MB * TB * L);
                  kernel(rows, p.b_size[2], gy, p.b_stride[1], x, p.stride[1] * row_size, block);
                }
              }
        }
    for (int64_t m = 0; m < valid; ++m)
      for (int64_t ca = 0; ca < ca_g; ++ca)
        for (int64_t t0 = 0; t0 < K0; ++t0)
          for (int64_t t1 = 0; t1 < K1; ++t1)
            for (int64_t t2 = 0; t2 < K2; ++t2) {
              const T* lanes = acc + (((ca * K0 + t0) * K1 + t1) * t2_blocks + t2 / TB) * (MB * TB * L) +
                               (m * TB + t2 % TB) * L;
              T sum = T(0);
              for (int l = 0; l < L; ++l) sum += lanes[l];
              p.out[((((g * cb_g + cb0 + m) * ca_g + ca) * K0 + t0) * K1 + t1) * K2 + t2] = sum;
            }
  }
}

template bool rows_weight_grad_applies<float>(const WeightGradProblem<float>&);
template bool rows_weight_grad_applies<double>(const WeightGradProblem<double>&);
template void rows_weight_grad<float>(const WeightGradProblem<float>&);
template void rows_weight_grad<double>(const WeightGradProblem<double>&);

// ---- The entry: few input channels per group; CONVFAST_WGRAD_GEMM=1 excludes it (tests) ---------
namespace rows_entry {
constexpr double kRank = 5.0;  // its place in the table (registry.cpp)
template <typename T>
bool applies(WgradChoice<T>& c) {
  return rows_weight_grad_applies(c.p);
}
template <typename T>
double cost(WgradChoice<T>& c) {
  if (wgrad_gemm_forced()) return c.refuse("CONVFAST_WGRAD_GEMM=1");
  return c.take("few input channels per group", kRank);
}
template <typename T>
bool run(WgradChoice<T>& c) {
  rows_weight_grad(c.p);
  return true;
}
inline const char* describe() { return "rows: gradient rows times tap-shifted input rows, pixels in the lanes"; }
}  // namespace rows_entry

template <typename T>
const WeightGradAlgorithm<T>& rows_weight_grad_algorithm() {
  static const WeightGradAlgorithm<T> entry = {"rows", rows_entry::kRank,
      rows_entry::applies<T>, rows_entry::cost<T>,
      rows_entry::run<T>, rows_entry::describe};
  return entry;
}
template const WeightGradAlgorithm<float>& rows_weight_grad_algorithm<float>();
template const WeightGradAlgorithm<double>& rows_weight_grad_algorithm<double>();

}  // namespace wgrad
}  // namespace convfast
