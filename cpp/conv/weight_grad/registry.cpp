// The weight gradient (see convfast/weight_grad.hpp): the table of its algorithms, in order of
// preference, and the one choice among them (engine::choose_entry, run by weight_grad below):
//   planes     planes.cpp: depthwise, unit stride, small channels-first planes, the forward's
//              depthwise-planes plan
//   lanes      lanes.cpp: depthwise, the forward's channel-lanes plan (CONVFAST_ALGO=gemm|direct
//              excludes it)
//   depthwise  depthwise.cpp: Ca/G = 1, Cb/G <= kMaxMultiplier
//   channel_rows  channel_rows.cpp: 1x1 stride-1 unpadded layers with few input channels per group
//              (CONVFAST_WGRAD_GEMM=1 excludes it)
//   winograd   winograd.cpp (code in gemm.cpp): F(2, 3) / F(4, 3) where WeightGrad::choose_winograd
//              takes it (CONVFAST_ALGO=winograd forces it)
//   rows       rows.cpp: few input channels per group (CONVFAST_WGRAD_GEMM=1 excludes it)
//   gemm       gemm.cpp: everything else
// CONVFAST_VERBOSE=1 prints every candidate and the winner of each call to stderr.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
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

// Along an axis with one tap (a 1x1 layer's) and a stride, the outputs read a[first + o * stride]:
// when those all lie inside a, the problem is the same on the view a[first::stride] at stride 1 --
// the same products summed in the same order -- and the channels-last copy that the GEMM path
// makes of a then holds only the pixels read (a quarter of a 1x1 stride-2 layer's input), not all
// of them: the 1x1 stride-2 256->512 layer's grad_weight took 55 ms in float64 against PyTorch's 28,
// its copy of the whole input and the page faults of that copy 25 % of it.
template <typename T>
WeightGradProblem<T> fold_one_tap_strides(WeightGradProblem<T> p) {
  for (int a = 0; a < kSpatialRank; ++a) {
    const int64_t first = -p.pad_before[a], last = first + (p.b_size[a] - 1) * p.stride[a];
    if (p.kernel[a] != 1 || p.stride[a] == 1 || p.b_size[a] < 1 || first < 0 || last >= p.a_size[a]) continue;
    p.a += first * p.a_stride[a];
    p.a_stride[a] *= p.stride[a];
    p.a_size[a] = p.b_size[a];
    p.stride[a] = 1;
    p.pad_before[a] = 0;
  }
  return p;
}


// A one-tap layer at unit stride without padding whose input and output-gradient planes are each
// one contiguous run is the same problem as one long row per image: the reduction's k = (n, pixel)
// keeps its order (the same chains, the same bits), and the GEMM's panels are packed from runs of
// a whole plane through the vector transposes, where rows of a small map (14 wide: under one
// vector) were packed one element at a time: MobileNetV2's 1x1 192 -> 32 on 8 x 14x14 spent 60 %
// of its grad_weight there.
template <typename T>
WeightGradProblem<T> flatten_one_tap_planes(WeightGradProblem<T> p) {
  int64_t plane = 1;
  for (int a = 0; a < kSpatialRank; ++a) {
    if (p.kernel[a] != 1 || p.stride[a] != 1 || p.pad_before[a] != 0 || p.a_size[a] != p.b_size[a]) return p;
    plane *= p.a_size[a];
  }
  // Row-major planes with unit steps: a stride only matters along axes longer than one.
  const auto contiguous = [](const int64_t* size, const int64_t* stride) {
    int64_t run = 1;
    for (int a = kSpatialRank - 1; a >= 0; --a) {
      if (size[a] > 1 && stride[a] != run) return false;
      run *= size[a];
    }
    return true;
  };
  if (plane <= 1 || !contiguous(p.a_size, p.a_stride) || !contiguous(p.b_size, p.b_stride)) return p;
  for (int a = 0; a < kSpatialRank; ++a) {
    p.a_size[a] = p.b_size[a] = a == 2 ? plane : 1;
    p.a_stride[a] = p.b_stride[a] = 1;
  }
  return p;
}

namespace {

// Every variant, in order of preference (ascending rank).
constexpr int kNumAlgorithms = 7;
template <typename T>
const WeightGradAlgorithm<T>* const* algorithms() {
  static const WeightGradAlgorithm<T>* const table[kNumAlgorithms] = {
      &planes_weight_grad_algorithm<T>(),     // planes.cpp
      &lanes_weight_grad_algorithm<T>(),      // lanes.cpp
      &depthwise_weight_grad_algorithm<T>(),  // depthwise.cpp
      &channel_rows_weight_grad_algorithm<T>(),  // channel_rows.cpp
      &winograd_weight_grad_algorithm<T>(),   // winograd.cpp (its code: gemm.cpp)
      &rows_weight_grad_algorithm<T>(),       // rows.cpp
      &gemm_weight_grad_algorithm<T>(),       // gemm.cpp
  };
  return table;
}

}  // namespace
}  // namespace wgrad

using namespace wgrad;

template <typename T>
void weight_grad(const WeightGradProblem<T>& problem) {
  validate(problem);
  const WeightGradProblem<T> p = flatten_one_tap_planes(fold_one_tap_strides(problem));
  // The work (as the forward's conv_work): the multiply-adds plus 12 per element of a and b.
  double multiply_adds = double(p.batch) * double(p.b_channels) * double(p.a_channels / std::max<int64_t>(1, p.groups));
  double elements_a = double(p.batch) * double(p.a_channels), elements_b = double(p.batch) * double(p.b_channels);
  for (int a = 0; a < kSpatialRank; ++a) {
    multiply_adds *= double(p.kernel[a]) * double(p.b_size[a]);
    elements_a *= double(p.a_size[a]);
    elements_b *= double(p.b_size[a]);
  }
  const CallThreads threads(multiply_adds + 12.0 * (elements_a + elements_b));
  WgradChoice<T> c(p);
  c.forced = std::getenv("CONVFAST_ALGO");
  if (c.forced && !*c.forced) c.forced = nullptr;
  if (verbose())
    std::fprintf(stderr, "convfast: weight_grad %s N=%lld G=%lld C=%lld->%lld k=%lldx%lldx%lld stride=%lldx%lldx%lld%s%s\n",
                 sizeof(T) == 4 ? "float32" : "float64", (long long)p.batch, (long long)p.groups,
                 (long long)p.a_channels, (long long)p.b_channels, (long long)p.kernel[0], (long long)p.kernel[1],
                 (long long)p.kernel[2], (long long)p.stride[0], (long long)p.stride[1], (long long)p.stride[2],
                 c.forced ? " forced=" : "", c.forced ? c.forced : "");
  unsigned excluded = 0;
  for (;;) {
    const int i = engine::choose_entry(algorithms<T>(), kNumAlgorithms, c, excluded);  // gemm always applies
    const WeightGradAlgorithm<T>& a = *algorithms<T>()[i];
    if (a.run(c)) {
      if (verbose()) std::fprintf(stderr, "convfast:   winner %s: %s\n", a.name, last_algorithm().c_str());
      return;
    }
    excluded |= 1u << i;
  }
}

template void weight_grad<float>(const WeightGradProblem<float>&);
template void weight_grad<double>(const WeightGradProblem<double>&);

}  // namespace convfast
