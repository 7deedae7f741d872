// The forward engine's algorithms and the one choice among them. The table (algorithms() below)
// lists every algorithm in order of preference, each an entry of its own unit (algorithm.hpp):
//   scatter   algorithms/scatter_gemm.cpp   transposed layers of small inputs; non-finite weights
//   winograd  algorithms/winograd.cpp       3x3-like stride phases, enough channels and tiles
//   planes    algorithms/depthwise_planes.cpp  depthwise, unit stride, small channels-first planes
//   lanes     algorithms/channel_lanes.cpp  depthwise, at least a vector's width of groups
//   gemv      algorithms/gemv.cpp           one-tap layers with at most 4 output pixels
//   direct    algorithms/direct.cpp         few output channels per group, stems, large planes
//                                           (rows or planes: CONVFAST_DIRECT=rows)
//   gemm      algorithms/gemm.cpp           everything else (gather or pixel lanes, weights in
//                                           place: CONVFAST_PIXEL_LANES, CONVFAST_WEIGHTS_IN_PLACE)
// choose_entry (common/choice.hpp) takes the applicable entry of least cost; CONVFAST_ALGO=<name>
// (or AlgorithmOverride) makes the named one's cost its rank wherever it applies and excludes the
// others as each entry's cost() says. CONVFAST_VERBOSE=1 prints every candidate and the winner of
// each plan to stderr.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "algorithm.hpp"

namespace convfast {

// The algorithm a plan made on this thread is forced to: AlgorithmOverride's (the layer objects'
// measured choice, see engine.hpp), else CONVFAST_ALGO; null or empty: the automatic choice.
thread_local const char* t_forced_algorithm = nullptr;
AlgorithmOverride::AlgorithmOverride(const char* algorithm) : previous_(t_forced_algorithm) {
  t_forced_algorithm = algorithm;
}
AlgorithmOverride::~AlgorithmOverride() { t_forced_algorithm = previous_; }
const char* forced_algorithm() { return t_forced_algorithm ? t_forced_algorithm : std::getenv("CONVFAST_ALGO"); }
thread_local bool t_plan_kept = false;
KeptPlanScope::KeptPlanScope() : previous_(t_plan_kept) { t_plan_kept = true; }
KeptPlanScope::~KeptPlanScope() { t_plan_kept = previous_; }
bool plan_is_kept() { return t_plan_kept; }

namespace engine {

bool verbose() {
  static const bool on = [] {
    const char* v = std::getenv("CONVFAST_VERBOSE");
    return v != nullptr && *v != 0 && std::strcmp(v, "0") != 0;
  }();
  return on;
}

namespace {

// Every algorithm, in order of preference (ascending rank).
constexpr int kNumAlgorithms = 7;
template <typename T>
const Algorithm<T>* const* algorithms() {
  static const Algorithm<T>* const table[kNumAlgorithms] = {
      &scatter_gemm_algorithm<T>(),  // algorithms/scatter_gemm.cpp
      &winograd_algorithm<T>(),      // algorithms/winograd.cpp
      &depthwise_planes_algorithm<T>(),  // algorithms/depthwise_planes.cpp
      &channel_lanes_algorithm<T>(), // algorithms/channel_lanes.cpp
      &gemv_algorithm<T>(),          // algorithms/gemv.cpp
      &direct_algorithm<T>(),        // algorithms/direct.cpp
      &gemm_algorithm<T>(),          // algorithms/gemm.cpp
  };
  return table;
}

template <typename T>
void print_problem(const Choice<T>& c) {
  const ConvProblem<T>& p = c.p;
  std::fprintf(stderr,
               "convfast: plan %s %s N=%lld G=%lld C/G=%lld->%lld in=%lldx%lldx%lld out=%lldx%lldx%lld "
               "k=%lldx%lldx%lld stride=%lldx%lldx%lld phases=%zu%s%s%s\n",
               sizeof(T) == 4 ? "float32" : "float64", p.kind == ConvKind::Forward ? "forward" : "transposed",
               (long long)p.batch, (long long)p.groups, (long long)p.cin_per_group, (long long)p.cout_per_group,
               (long long)p.in_size[0], (long long)p.in_size[1], (long long)p.in_size[2], (long long)p.out_size[0],
               (long long)p.out_size[1], (long long)p.out_size[2], (long long)p.kernel[0], (long long)p.kernel[1],
               (long long)p.kernel[2], (long long)p.stride[0], (long long)p.stride[1], (long long)p.stride[2],
               c.plan.phases.size(), c.forcing() ? " forced=" : "", c.forcing() ? c.forced : "",
               c.allow_winograd ? "" : " (exact-chain fallback)");
}

}  // namespace
}  // namespace engine

// allow_winograd = false: the exact-chain paths only (the fallback of a Winograd plan whose
// output came out non-finite, see winograd.cpp).
template <typename T>
ConvPlan<T>::Impl::Impl(const ConvProblem<T>& p, bool allow_winograd)
    : shape(p), uk(active_ukernel<T>()), isa(active_ukernels().isa) {
  for (int a = 0; a < kSpatialRank; ++a) {
    if (p.kind == ConvKind::Forward)
      axes[a].push_back(forward_axis(p.in_size[a], p.out_size[a], p.kernel[a], p.stride[a], p.dilation[a],
                                     p.pad_before[a], p.mode));
    else
      axes[a] = transposed_axis(p.in_size[a], p.out_size[a], p.kernel[a], p.stride[a], p.dilation[a],
                                p.pad_before[a]);
  }
  for (int a = 0; a < kSpatialRank; ++a) {
    int64_t covered = 0;
    for (const AxisPlan& plan : axes[a]) covered += plan.count;
    outputs_uncovered = outputs_uncovered || covered < p.out_size[a];
  }
  for (const AxisPlan& a0 : axes[0])
    for (const AxisPlan& a1 : axes[1])
      for (const AxisPlan& a2 : axes[2])
        if (a0.count > 0 && a1.count > 0 && a2.count > 0) phases.push_back({&a0, &a1, &a2});
  for (const Phase& ph : phases) max_taps = std::max(max_taps, PhaseShape(ph).num_taps);
  max_k = checked_mul(max_taps, p.cin_per_group);

  Choice<T> c(p, *this);
  c.forced = forced_algorithm();
  if (c.forced && !*c.forced) c.forced = nullptr;
  c.allow_winograd = allow_winograd;
  if (verbose()) print_problem(c);
  unsigned excluded = 0;
  for (;;) {
    const int i = choose_entry(algorithms<T>(), kNumAlgorithms, c, excluded);
    if (i < 0) throw std::logic_error("convfast: no algorithm takes the problem");  // gemm always does
    if (algorithms<T>()[i]->create(c)) {
      algorithm = algorithms<T>()[i];
      break;
    }
    excluded |= 1u << i;
  }
  if (verbose()) std::fprintf(stderr, "convfast:   winner %s: %s\n", algorithm->name, describe().c_str());
}

// Whether every weight is an integer: such layers keep F(2, 3), whose transform coefficients
// (0, +-1, 1/2) compute integer data exactly (integer inputs are computed in float64, exactly,
// as documented), where F(4, 3)'s 1/6 and 1/24 would round.
namespace {
// Whether ok(w) holds for every weight of p, any strides (the generic walk of the weight checks).
template <typename T, typename Ok>
bool every_weight(const ConvProblem<T>& p, Ok ok) {
  for (int64_t g = 0; g < p.groups; ++g)
    for (int64_t co = 0; co < p.cout_per_group; ++co)
      for (int64_t ci = 0; ci < p.cin_per_group; ++ci)
        for (int64_t k0 = 0; k0 < p.kernel[0]; ++k0)
          for (int64_t k1 = 0; k1 < p.kernel[1]; ++k1)
            for (int64_t k2 = 0; k2 < p.kernel[2]; ++k2)
              if (!ok(p.w[g * p.w_stride_g + co * p.w_stride_co + ci * p.w_stride_ci + k0 * p.w_stride[0] +
                          k1 * p.w_stride[1] + k2 * p.w_stride[2]]))
                return false;
  return true;
}
}  // namespace

template <typename T>
bool ConvPlan<T>::Impl::integer_weights(const ConvProblem<T>& p) {
  return every_weight(p, [](T v) { return v == std::nearbyint(v); });
}

// Whether no weight is an infinity or NaN: the exponent bits, tested as integers so that the
// contiguous runs vectorise (the weights of a transposed layer are checked once per plan, which is
// once per call outside the layer objects).
template <typename T>
bool ConvPlan<T>::Impl::weights_finite(const ConvProblem<T>& p) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr Bits kExponent = sizeof(T) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  // The innermost axes that are one contiguous run of memory.
  const int64_t sizes[6] = {p.groups, p.cout_per_group, p.cin_per_group, p.kernel[0], p.kernel[1], p.kernel[2]};
  const int64_t strides[6] = {p.w_stride_g, p.w_stride_co, p.w_stride_ci, p.w_stride[0], p.w_stride[1], p.w_stride[2]};
  int order[6] = {0, 1, 2, 3, 4, 5};
  std::sort(order, order + 6, [&](int a, int b) { return std::abs(strides[a]) > std::abs(strides[b]); });
  int64_t run = 1, outer = 1;
  bool contiguous = true;
  for (int i = 5; i >= 0; --i) {
    const int a = order[i];
    if (sizes[a] == 1) continue;
    if (contiguous && strides[a] == run)
      run *= sizes[a];
    else {
      contiguous = false;
      outer *= sizes[a];
    }
  }
  if (outer == 1) {  // one run: the common case (any C-contiguous weight)
    const T* base = p.w;
    for (int a = 0; a < 6; ++a) if (strides[a] < 0) base += strides[a] * (sizes[a] - 1);
    Bits bad = 0;
    for (int64_t i = 0; i < run; ++i) {
      Bits bits;
      std::memcpy(&bits, base + i, sizeof(T));
      bad |= Bits((bits & kExponent) == kExponent);
    }
    return bad == 0;
  }
  return every_weight(p, [](T v) { return std::isfinite(v); });
}

template <typename T>
std::string ConvPlan<T>::Impl::describe() const {
  return algorithm->describe(*this);
}

template ConvPlan<float>::Impl::Impl(const ConvProblem<float>& p, bool allow_winograd);
template ConvPlan<double>::Impl::Impl(const ConvProblem<double>& p, bool allow_winograd);
template std::string ConvPlan<float>::Impl::describe() const;
template std::string ConvPlan<double>::Impl::describe() const;
template bool ConvPlan<float>::Impl::integer_weights(const ConvProblem<float>&);
template bool ConvPlan<double>::Impl::integer_weights(const ConvProblem<double>&);
template bool ConvPlan<float>::Impl::weights_finite(const ConvProblem<float>&);
template bool ConvPlan<double>::Impl::weights_finite(const ConvProblem<double>&);
// A batch of small 1-D or 2-D images (the unit axis 0, as Python presents them) is planned as one
// image whose axis 0 is the batch (one tap, stride 1, no padding: output i reads input i), so that
// GEMM blocks, and the reuse of each packed weight panel, span images: a 7x7 map has 49 pixels, 5
// micro-tiles, per image. Every output keeps its multiply-add chain, so results are unchanged.
// 8 x 512 x 7 x 7 3x3 GEMM, 1 thread: 41 -> 19 ms.
template <typename T>
ConvProblem<T> batch_as_axis0(const ConvProblem<T>& p) {
  constexpr int64_t kSmallImage = 1024;  // output pixels per image
  if (p.batch <= 1 || p.in_size[0] != 1 || p.out_size[0] != 1 || p.kernel[0] != 1 || p.stride[0] != 1 ||
      p.pad_before[0] != 0 || p.out_size[1] * p.out_size[2] >= kSmallImage)
    return p;
  ConvProblem<T> q = p;
  q.in_size[0] = q.out_size[0] = p.batch;
  q.x_stride[0] = p.x_stride_n;
  q.y_stride[0] = p.y_stride_n;
  q.dilation[0] = 1;
  q.batch = 1;
  return q;
}

template <typename T>
ConvPlan<T>::ConvPlan(const ConvProblem<T>& p) {
  validate(p);
  const CallThreads threads(conv_work(p));
  impl_ = std::make_shared<const Impl>(batch_as_axis0(p));
}
template ConvProblem<float> batch_as_axis0<float>(const ConvProblem<float>&);
template ConvProblem<double> batch_as_axis0<double>(const ConvProblem<double>&);
template ConvPlan<float>::ConvPlan(const ConvProblem<float>&);
template ConvPlan<double>::ConvPlan(const ConvProblem<double>&);

}  // namespace convfast

