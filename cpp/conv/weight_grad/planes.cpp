// The depthwise weight gradient with the pixels of a channel plane in the vector lanes: the forward
// depthwise-planes plan's weight_grad (../algorithms/depthwise_planes.cpp, through
// depthwise_planes_weight_grad), on small channels-first maps at unit stride.
#include <cstdint>
#include <string>

#include "algorithm.hpp"

namespace convfast {
namespace wgrad {
namespace planes_entry {
constexpr double kRank = 0.5;  // its place in the table (registry.cpp): before the channel lanes

// Output-gradient planes of at most this many pixels, at least kMinPlanes of them per channel
// (its planes are stacked into one micro-kernel call; alone, a plane's accumulators and lane sums
// cost more), and fewer groups than vector lanes: from a vector's width of groups the channel
// lanes, which run an item's rows as one sequence (chains across short rows, input and gradient
// transposed as runs of pixels), are faster on every small map measured. Float32, 1 thread,
// minimum of interleaved runs (planes / lanes ms): 8 x 576 x 7x7 3x3 0.36 / 0.21, 8 x 960 x 7x7
// 0.59 / 0.33, 8 x 384 x 14x14 0.54 / 0.42, 8 x 768 x 7x7 7x7 1.51 / 0.76, 8 x 672 x 14x14 5x5
// 2.21 / 1.52.
constexpr int64_t kMaxPlanePixels = 256, kMinPlanes = 4;

// Depthwise (one channel in and out per group); the plan's own conditions are checked by run.
template <typename T>
bool applies(WgradChoice<T>& c) {
  return is_depthwise(c.p.a_channels, c.p.b_channels, c.p.groups);
}

template <typename T>
double cost(WgradChoice<T>& c) {
  if (c.forced_is("planes")) return c.take("forced", kRank);
  if (c.forcing()) return c.refuse("another algorithm forced");
  if (c.p.groups >= active_ukernel<T>().lanes) return c.refuse("the channel lanes are faster");
  const int64_t pixels = c.p.b_size[1] * c.p.b_size[2];
  if (pixels > kMaxPlanePixels) return c.refuse("large planes");
  return c.p.batch * c.p.b_size[0] < kMinPlanes ? c.refuse("few planes per channel")
                                                 : c.take("depthwise, small planes", kRank);
}

// False where the planes plan does not apply (a stride, a padding mode, channels-last rows, a
// plane too large for its buffer).
template <typename T>
bool run(WgradChoice<T>& c) {
  if (!depthwise_planes_weight_grad(depthwise_forward_problem(c.p), c.p.out)) return false;
  set_last_algorithm("weight_grad depthwise_planes threads=" + std::to_string(get_num_threads()));
  return true;
}

inline const char* describe() { return "planes: depthwise, unit stride, a channel plane in the vector lanes"; }

}  // namespace planes_entry

template <typename T>
const WeightGradAlgorithm<T>& planes_weight_grad_algorithm() {
  static const WeightGradAlgorithm<T> entry = {"planes", planes_entry::kRank,
      planes_entry::applies<T>, planes_entry::cost<T>,
      planes_entry::run<T>, planes_entry::describe};
  return entry;
}
template const WeightGradAlgorithm<float>& planes_weight_grad_algorithm<float>();
template const WeightGradAlgorithm<double>& planes_weight_grad_algorithm<double>();

}  // namespace wgrad
}  // namespace convfast
