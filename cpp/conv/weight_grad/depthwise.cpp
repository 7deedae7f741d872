// The depthwise / channel-multiplier weight gradient (chosen in registry.cpp).
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

// Depthwise and channel-multiplier groups (Ca/G = 1, Cb/G <= kMaxMultiplier): a GEMM tile would be
// 1 row by a few lanes, so each output channel instead streams its input channel and its gradient
// once per (row, tap), keeping kLanes partial sums per tap (independent lanes, which the compiler
// vectorises without reassociating anything), summed in lane order at the end. One thread owns an
// output channel, so the result is the same for any thread count. Memory: taps x kLanes per thread.


template <typename T>
void depthwise_weight_grad(const WeightGradProblem<T>& p) {
  constexpr int kLanes = 8;
  const int64_t G = p.groups, cb_g = p.b_channels / G;
  const int64_t K0 = p.kernel[0], K1 = p.kernel[1], K2 = p.kernel[2];
  const int64_t taps = checked_mul(checked_mul(K0, K1), K2);
  const int64_t L2 = p.a_size[2], s2 = p.stride[2], d2 = p.dilation[2], pad2 = p.pad_before[2];
  const int64_t O2 = p.b_size[2], as2 = p.a_stride[2], bs2 = p.b_stride[2];
  const bool zeros = p.mode == PadMode::Zeros;
  const int64_t channels = p.b_channels;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), channels)));
  std::vector<std::unique_ptr<AlignedBuffer<T>>> partials;
  for (int t = 0; t < nthreads; ++t) partials.emplace_back(new AlignedBuffer<T>(checked_mul(taps, kLanes)));
  // Output positions o2 whose tap t2 reads inside the input row: [first[t2], last[t2]).
  std::vector<int64_t> first(K2), last(K2);
  for (int64_t t2 = 0; t2 < K2; ++t2) {
    const int64_t shift = t2 * d2 - pad2;  // i2 = o2 * s2 + shift
    const int64_t lo = shift >= 0 ? 0 : ceil_div(-shift, s2);
    const int64_t hi = L2 - 1 - shift < 0 ? 0 : (L2 - 1 - shift) / s2 + 1;
    first[t2] = std::min(lo, O2);
    last[t2] = std::max(first[t2], std::min(hi, O2));
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t cb = 0; cb < channels; ++cb) {
    T* part = partials[omp_get_thread_num()]->get();
    std::fill(part, part + taps * kLanes, T(0));
    const int64_t g = cb / cb_g;
    for (int64_t n = 0; n < p.batch; ++n)
      for (int64_t o0 = 0; o0 < p.b_size[0]; ++o0)
        for (int64_t t0 = 0; t0 < K0; ++t0) {
          const int64_t i0 = map_padded_index(o0 * p.stride[0] + t0 * p.dilation[0] - p.pad_before[0], p.a_size[0], p.mode);
          if (i0 < 0) continue;
          for (int64_t o1 = 0; o1 < p.b_size[1]; ++o1) {
            const T* brow = p.b + n * p.b_stride_n + cb * p.b_stride_c + o0 * p.b_stride[0] + o1 * p.b_stride[1];
            for (int64_t t1 = 0; t1 < K1; ++t1) {
              const int64_t i1 =
                  map_padded_index(o1 * p.stride[1] + t1 * p.dilation[1] - p.pad_before[1], p.a_size[1], p.mode);
              if (i1 < 0) continue;
              const T* arow = p.a + n * p.a_stride_n + g * p.a_stride_c + i0 * p.a_stride[0] + i1 * p.a_stride[1];
              for (int64_t t2 = 0; t2 < K2; ++t2) {
                T lane[kLanes];
                T* acc = part + ((t0 * K1 + t1) * K2 + t2) * kLanes;
                for (int l = 0; l < kLanes; ++l) lane[l] = acc[l];
                const int64_t shift = t2 * d2 - pad2;
                int64_t o2 = first[t2];
                if (s2 == 1 && as2 == 1 && bs2 == 1) {  // the strided loop below with unit steps, kept
                                                         // apart so that the compiler sees them and vectorises
                  for (; o2 + kLanes <= last[t2]; o2 += kLanes)
                    for (int l = 0; l < kLanes; ++l) lane[l] += arow[o2 + shift + l] * brow[o2 + l];
                } else {  // strided rows or views: the same lanes, the loads at their steps. One chain
                          // through the row ran at FMA latency: the stride-2 layer took 7.2 ms, now 6.6
                          // (splitting each row into its stride phases first, per tap row: 9.8 ms)
                  const int64_t step_a = s2 * as2;
                  const T* a0 = arow + shift * as2;
                  for (; o2 + kLanes <= last[t2]; o2 += kLanes)
                    for (int l = 0; l < kLanes; ++l) lane[l] += a0[(o2 + l) * step_a] * brow[(o2 + l) * bs2];
                }
                for (; o2 < last[t2]; ++o2) lane[0] += arow[(o2 * s2 + shift) * as2] * brow[o2 * bs2];
                if (!zeros) {  // the row's ends read the padding mode's values
                  auto edge = [&](int64_t e) {
                    lane[1] += arow[map_padded_index(e * s2 + shift, L2, p.mode) * as2] * brow[e * bs2];
                  };
                  for (int64_t e = 0; e < first[t2]; ++e) edge(e);
                  for (int64_t e = last[t2]; e < O2; ++e) edge(e);
                }
                for (int l = 0; l < kLanes; ++l) acc[l] = lane[l];
              }
            }
          }
        }
    T* dst = p.out + cb * taps;
    for (int64_t t = 0; t < taps; ++t) {
      T sum = T(0);
      for (int l = 0; l < kLanes; ++l) sum += part[t * kLanes + l];
      dst[t] = sum;
    }
  }
}

template void depthwise_weight_grad<float>(const WeightGradProblem<float>&);
template void depthwise_weight_grad<double>(const WeightGradProblem<double>&);

// ---- The entry: depthwise and channel-multiplier layers (after the channel lanes) ----------------
namespace depthwise_entry {
constexpr double kRank = 2.0;  // its place in the table (registry.cpp)
template <typename T>
bool applies(WgradChoice<T>& c) {
  return c.p.a_channels == c.p.groups && c.p.b_channels <= kMaxMultiplier * c.p.groups;
}
template <typename T>
double cost(WgradChoice<T>& c) {
  return c.take("depthwise or channel multiplier", kRank);
}
template <typename T>
bool run(WgradChoice<T>& c) {
  set_last_algorithm("weight_grad depthwise threads=" + std::to_string(get_num_threads()));
  depthwise_weight_grad(c.p);
  return true;
}
inline const char* describe() { return "depthwise: per output channel, lanes of partial sums per tap"; }
}  // namespace depthwise_entry

template <typename T>
const WeightGradAlgorithm<T>& depthwise_weight_grad_algorithm() {
  static const WeightGradAlgorithm<T> entry = {"depthwise", depthwise_entry::kRank,
      depthwise_entry::applies<T>, depthwise_entry::cost<T>,
      depthwise_entry::run<T>, depthwise_entry::describe};
  return entry;
}
template const WeightGradAlgorithm<float>& depthwise_weight_grad_algorithm<float>();
template const WeightGradAlgorithm<double>& depthwise_weight_grad_algorithm<double>();

}  // namespace wgrad
}  // namespace convfast
