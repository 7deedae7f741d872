// The weight gradient's Winograd F(m, 3) variant: its entry. Its code is the GEMM unit's
// (gemm.cpp: WeightGrad::run_winograd, whose per-point GEMMs are the GEMM's), and so is its rule
// (WeightGrad::choose_winograd: stride-1 3-tap axes, enough channels; CONVFAST_ALGO=winograd forces
// it, gemm|direct exclude it; F(4, 3) in float64 where it pays).
#include <cstdint>

#include "algorithm.hpp"

namespace convfast {
namespace wgrad {

namespace winograd_entry {
constexpr double kRank = 4.0;  // its place in the table (registry.cpp)
template <typename T>
bool applies(WgradChoice<T>& c) {  // stride-1 3-tap axes, at least two, and one-tap axes
  int axes = 0;
  for (int a = 0; a < kSpatialRank; ++a) {
    if (c.p.kernel[a] == 3 && c.p.stride[a] != 1) return false;
    if (c.p.kernel[a] != 3 && c.p.kernel[a] != 1) return false;
    axes += c.p.kernel[a] == 3;
  }
  return axes >= 2;
}
template <typename T>
double cost(WgradChoice<T>& c) {
  c.winograd_m = winograd_weight_grad_tile(c.p);
  if (c.winograd_m == 0) return c.refuse("too few channels, or gemm|direct forced");
  return c.take(c.winograd_m == 4 ? "F(4,3)" : "F(2,3)", kRank);
}
template <typename T>
bool run(WgradChoice<T>& c) {
  gemm_weight_grad(c.p, c.winograd_m);
  return true;
}
inline const char* describe() { return "winograd: F(m,3) transforms, one GEMM per transform point"; }
}  // namespace winograd_entry

template <typename T>
const WeightGradAlgorithm<T>& winograd_weight_grad_algorithm() {
  static const WeightGradAlgorithm<T> entry = {"winograd", winograd_entry::kRank,
      winograd_entry::applies<T>, winograd_entry::cost<T>,
      winograd_entry::run<T>, winograd_entry::describe};
  return entry;
}
template const WeightGradAlgorithm<float>& winograd_weight_grad_algorithm<float>();
template const WeightGradAlgorithm<double>& winograd_weight_grad_algorithm<double>();

}  // namespace wgrad
}  // namespace convfast
