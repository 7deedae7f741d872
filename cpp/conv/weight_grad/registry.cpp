// The weight gradient (see convfast/weight_grad.hpp and gemm.cpp): the algorithms, in order of
// preference, and the one choice among them (weight_grad below):
//   channel lanes  depthwise, the forward's channel-lanes plan (depthwise_lanes_weight_grad, ../plan.cpp)
//   depthwise      depthwise.cpp: Ca/G = 1, Cb/G <= kMaxMultiplier
//   winograd       gemm.cpp: F(2, 3) where WeightGrad::choose_winograd takes it (CONVFAST_ALGO=winograd)
//   rows           rows.cpp: few input channels per group (CONVFAST_WGRAD_GEMM=1 excludes it)
//   gemm           gemm.cpp: everything else
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

#include "common.hpp"

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
  const char* forced = std::getenv("CONVFAST_ALGO");
  const bool lanes_excluded = forced && (std::string(forced) == "gemm" || std::string(forced) == "direct");
  if (p.a_channels == p.groups && p.b_channels == p.groups && !lanes_excluded) {
    // Depthwise: the channels in the vector lanes (../algorithms/channel_lanes.hpp, through depthwise_lanes_weight_grad), where that applies.
    ConvProblem<T> fp;
    fp.batch = p.batch;
    fp.groups = p.groups;
    fp.cin_per_group = fp.cout_per_group = 1;
    fp.mode = p.mode;
    for (int a = 0; a < kSpatialRank; ++a) {
      fp.in_size[a] = p.a_size[a];
      fp.out_size[a] = p.b_size[a];
      fp.kernel[a] = p.kernel[a];
      fp.stride[a] = p.stride[a];
      fp.dilation[a] = p.dilation[a];
      fp.pad_before[a] = p.pad_before[a];
      fp.x_stride[a] = p.a_stride[a];
      fp.y_stride[a] = p.b_stride[a];
    }
    fp.x = p.a;
    fp.x_stride_n = p.a_stride_n;
    fp.x_stride_c = p.a_stride_c;
    fp.y = const_cast<T*>(p.b);  // read only: the output gradient
    fp.y_stride_n = p.b_stride_n;
    fp.y_stride_c = p.b_stride_c;
    if (depthwise_lanes_weight_grad(fp, p.out)) {
      set_last_algorithm("weight_grad channel_lanes threads=" + std::to_string(get_num_threads()));
      return;
    }
  }
  if (p.a_channels == p.groups && p.b_channels <= kMaxMultiplier * p.groups) {
    set_last_algorithm("weight_grad depthwise threads=" + std::to_string(get_num_threads()));
    return depthwise_weight_grad(p);
  }
  // CONVFAST_WGRAD_GEMM=1 takes the GEMM instead of the channel-rows and rows paths (tests compare
  // them); Winograd, where chosen (or forced by CONVFAST_ALGO=winograd), comes before the rows path.
  const char* force_gemm = std::getenv("CONVFAST_WGRAD_GEMM");
  const bool gemm_forced = force_gemm && std::string(force_gemm) == "1";
  if (!gemm_forced && channel_rows_weight_grad_applies(p)) return channel_rows_weight_grad(p);
  const bool rows_preferred = rows_weight_grad_applies(p) && !gemm_forced;
  if (!gemm_weight_grad(p, rows_preferred)) return rows_weight_grad(p);
}


template void weight_grad<float>(const WeightGradProblem<float>&);
template void weight_grad<double>(const WeightGradProblem<double>&);

}  // namespace convfast
