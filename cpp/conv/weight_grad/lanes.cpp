// The depthwise weight gradient with the channels in the vector lanes: the forward channel-lanes
// plan's weight_grad (../algorithms/channel_lanes.cpp, through depthwise_lanes_weight_grad).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "algorithm.hpp"

namespace convfast {
namespace wgrad {
namespace lanes_entry {
constexpr double kRank = 1.0;  // its place in the table (registry.cpp)

// Depthwise (one channel in and out per group), at least a vector's width of groups;
// CONVFAST_ALGO=gemm|direct excludes it.
template <typename T>
bool applies(WgradChoice<T>& c) {
  return is_depthwise(c.p.a_channels, c.p.b_channels, c.p.groups) && c.p.groups >= active_ukernel<T>().lanes;
}

template <typename T>
double cost(WgradChoice<T>& c) {
  if (c.forced_is("gemm") || c.forced_is("direct")) return c.refuse("gemm or direct forced");
  return c.take("depthwise", kRank);
}

// False where the channel-lanes plan does not apply after all (an empty axis, a window too large).
template <typename T>
bool run(WgradChoice<T>& c) {
  const WeightGradProblem<T>& p = c.p;
  const ConvProblem<T> fp = depthwise_forward_problem(p);
  if (!depthwise_lanes_weight_grad(fp, p.out)) return false;
  set_last_algorithm("weight_grad channel_lanes threads=" + std::to_string(get_num_threads()));
  return true;
}

inline const char* describe() { return "lanes: depthwise, the channels in the vector lanes"; }

}  // namespace lanes_entry

template <typename T>
const WeightGradAlgorithm<T>& lanes_weight_grad_algorithm() {
  static const WeightGradAlgorithm<T> entry = {"lanes", lanes_entry::kRank,
      lanes_entry::applies<T>, lanes_entry::cost<T>,
      lanes_entry::run<T>, lanes_entry::describe};
  return entry;
}
template const WeightGradAlgorithm<float>& lanes_weight_grad_algorithm<float>();
template const WeightGradAlgorithm<double>& lanes_weight_grad_algorithm<double>();

}  // namespace wgrad
}  // namespace convfast
