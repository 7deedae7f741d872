// The convolution engine's plan execution. The engine is an implicit ("gather") GEMM and its
// relatives over strided N-D views (see registry.cpp for the algorithms).
//
//   M = output pixels, N = output channels of one group, K = taps x input channels of one group.
//
// Padding, stride, dilation and every padding mode are resolved per axis (AxisPlan::index), so the
// packing step reads patches straight from the unpadded input and no
// padded copy or whole-input im2col buffer ever exists. Transposed convolution is split by output
// residue modulo the stride ("phases"): within a phase the contributing kernel taps are fixed, so
// each phase is an ordinary gather-convolution with no multiplications by inserted zeros and no
// scattered (atomic) writes.
//
// Work is split over (batch, group, phase, M-block, N-block). Every output element is produced by
// exactly one work item with a fixed K order, so results are bitwise identical for any thread
// count and any schedule.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "plan.hpp"
#include "algorithms/channel_lanes.hpp"
#include "algorithms/scatter_gemm.hpp"
#include "algorithms/winograd.hpp"

namespace convfast {

thread_local std::string t_last_algorithm;

template <typename T>
ConvPlan<T>::Impl::~Impl() {}  // here, where winograd::Conv and channel_lanes::Conv are complete

// The outputs no phase writes are the bias (or zero). Filled first; the phases then overwrite theirs.
template <typename T>
inline void ConvPlan<T>::Impl::fill_with_bias(const ConvProblem<T>& p) const {
  const int64_t planes = p.batch * p.groups * p.cout_per_group;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), planes)));
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const int64_t n = plane / (p.groups * p.cout_per_group), c = plane % (p.groups * p.cout_per_group);
    const T b = p.bias ? p.bias[c * p.bias_stride] : T(0);
    T* yc = p.y + n * p.y_stride_n + c * p.y_stride_c;
    for (int64_t i0 = 0; i0 < p.out_size[0]; ++i0)
      for (int64_t i1 = 0; i1 < p.out_size[1]; ++i1)
        for (int64_t i2 = 0; i2 < p.out_size[2]; ++i2)
          yc[i0 * p.y_stride[0] + i1 * p.y_stride[1] + i2 * p.y_stride[2]] = b;
  }
}

// Output rows per direct item: about kDirectItemPixels outputs, as each item starts with an empty
// row-buffer cache and copies every input row its first output row reads (T1 rows per input
// channel), where later rows copy one. At 256 outputs (2 rows of the 7x7 stem's 112-wide
// transposed phases) the copies were 20 % of the stem's float64 grad_input; 1024 measured it
// 7-8 % faster (both dtypes), the 3-D 1 -> 32 layer's float64 grad_input 4-7 %, p25, one
// process. Fewer rows where that would leave under 4 items per thread.
template <typename T>
inline int64_t ConvPlan<T>::Impl::direct_rows_per_item(const ConvProblem<T>& p, int64_t rows, int64_t row_length) const {
  constexpr int64_t kDirectItemPixels = 1024;
  const int64_t units = std::max<int64_t>(1, p.batch * p.groups * (int64_t)phases.size());
  const int64_t min_blocks = ceil_div(4 * (int64_t)std::max(1, get_num_threads()), units);
  return std::max<int64_t>(1, std::min(kDirectItemPixels / std::max<int64_t>(1, row_length), ceil_div(rows, min_blocks)));
}

template <typename T>
void ConvPlan<T>::Impl::execute(const ConvProblem<T>& p) const {
  const int64_t G = p.groups;
  for (int a = 0; a < kSpatialRank; ++a)
    if (p.out_size[a] == 0) return;  // nothing to write (the Python layer never calls with this)
  if (outputs_uncovered || scatter) fill_with_bias(p);  // the scatter GEMM adds into y
  if (!wino.empty()) {
    // Non-finite values: an infinity in a tile spreads through the transforms into Inf - Inf =
    // NaN where the direct sum gives +-Inf, so an output holding any Inf or NaN is recomputed
    // by the exact-chain GEMM / direct plan (built here: this is rare, and costs one plan), whose
    // IEEE results are those of PyTorch's. Checking the outputs as they are stored costs a
    // multiply-add per output; checking the input instead would read it twice.
    bool finite = true;
    for (const auto& phase : wino) finite = phase->execute(p, get_num_threads()) && finite;
    if (!finite) {
      Impl(p, false).execute(p);
      t_last_algorithm += " (after winograd: non-finite output)";
      return;
    }
    t_last_algorithm = describe() + " threads=" + std::to_string(get_num_threads());
    return;
  }
  if (scatter) {
    scatter->execute(p, get_num_threads());
    t_last_algorithm = describe() + " threads=" + std::to_string(get_num_threads());
    return;
  }
  if (lanes) {
    lanes->execute(p, get_num_threads());
    t_last_algorithm = describe() + " threads=" + std::to_string(get_num_threads());
    return;
  }
  // Items are ordered block by block with the stride phases of a block adjacent: the phases of a
  // transposed convolution interleave their outputs (stride 2: every other element of every other
  // row), so running a block's phases back to back on one thread writes each output cache line
  // while it is still cached. (A design choice, not a measured gain: the fused path above is what
  // the common cases take.)
  const int64_t n_phases = (int64_t)phases.size();
  std::vector<int64_t> rows_of(n_phases), step_of(n_phases);
  int64_t max_blocks = 0;
  for (int64_t ph = 0; ph < n_phases; ++ph) {
    const PhaseShape shape(phases[ph]);
    // GEMM items are blocks of pixels; direct items are blocks of output rows; plane-mode
    // items are blocks of plane_rows rows of one output plane.
    rows_of[ph] = plane_mode ? shape.count[0] * ceil_div(shape.count[1], plane_rows)
                  : direct   ? shape.count[0] * shape.count[1]
                             : shape.num_pixels;
    // Plane-mode items with several taps along axis 0 take runs of consecutive planes of a block,
    // which share input planes (direct_planes keeps them): up to 8, leaving at least 4 items per
    // thread. With one tap there is nothing to share, and an item is one block (2-D layers).
    const int64_t plane_run =
        shape.taps[0] == 1 ? 1
                           : std::clamp<int64_t>(checked_mul(p.batch * G, rows_of[ph]) / (4 * get_num_threads()), 1,
                                                 kMaxPlanesPerItem);
    step_of[ph] = plane_mode ? plane_run : direct ? direct_rows_per_item(p, rows_of[ph], shape.count[2]) : mc_max;
    max_blocks = std::max(max_blocks, ceil_div(rows_of[ph], step_of[ph]));
  }
  // GEMM blocks are MC pixels: at batch 1 with few groups, small maps made fewer items than
  // threads (a 3x3 stride-2 layer's 14x14 output, 196 pixels, was one item, run on one thread
  // at any setting). The pixel blocks then shrink, down to one micro-tile, until every thread
  // has two items (which pixels share a block changes no multiply-add chain).
  if (!direct && !plane_mode && !weights_in_place && get_num_threads() > 1) {
    const int64_t units = p.batch * G * ceil_div(n_tiles, nt_per_block) * (fuse_phases ? 1 : n_phases);
    const int64_t want = 2 * (int64_t)get_num_threads();
    if (units * max_blocks < want) {
      const int64_t blocks = ceil_div(want, std::max<int64_t>(1, units));
      max_blocks = 0;
      for (int64_t ph = 0; ph < n_phases; ++ph) {
        step_of[ph] = std::min(step_of[ph], std::max<int64_t>(tile_m, ceil_div(ceil_div(rows_of[ph], blocks), tile_m) * tile_m));
        max_blocks = std::max(max_blocks, ceil_div(rows_of[ph], step_of[ph]));
      }
    }
  }
  // Weights in place: the items split the channel tiles (two per thread; a block of pixels is one
  // tile or two), each streaming its own share of the weights once.
  const int64_t nt_block = weights_in_place ? std::max<int64_t>(1, ceil_div(n_tiles, 2 * (int64_t)get_num_threads()))
                                            : nt_per_block;
  std::vector<WorkItem> items;
  for (int64_t n = 0; n < p.batch; ++n)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t b = 0; b < max_blocks; ++b)
        for (int64_t ph = 0; ph < (fuse_phases ? 1 : n_phases); ++ph) {
          const int64_t m0 = b * step_of[ph], M = rows_of[ph];
          if (m0 >= M) continue;
          for (int64_t nt0 = 0; nt0 < n_tiles; nt0 += nt_block)
            items.push_back({n, g, ph, m0, std::min(M, m0 + step_of[ph]), nt0, std::min(n_tiles, nt0 + nt_block)});
        }
  const int nthreads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), (int64_t)items.size())));
  // Unfused phases: contiguous runs of items per thread (the blocks above stay together);
  // otherwise dynamic, for balance (a fused item holds all of its block's phases).
  const int64_t chunk = n_phases > 1 && !fuse_phases ? ceil_div((int64_t)items.size(), nthreads) : 1;
  const int64_t a_panel = direct ? checked_mul(max_k, tile_m) : checked_mul(mc_max, kc_max);
  std::vector<std::unique_ptr<ThreadScratch<T>>> scratch;
  for (int t = 0; t < nthreads; ++t)
    scratch.emplace_back(new ThreadScratch<T>(direct ? 1 : mc_max, a_panel,
                                              direct ? 1 : ldc * (fuse_phases ? n_phases : 1), direct ? 0 : max_taps,
                                              direct ? max_k : 0, (int64_t)tile_m * tile_n, row_buffer_size,
                                              direct ? 0 : checked_mul(ceil_div(mc_max, tile_m), kc_max)));
  if (direct)
    for (auto& sc : scratch) sc->set_direct_panel(max_k, tile_m, max_cache_entries);
#pragma omp parallel for schedule(dynamic, chunk) num_threads(nthreads)
  for (int64_t i = 0; i < (int64_t)items.size(); ++i) run_item(p, items[i], *scratch[omp_get_thread_num()]);
  t_last_algorithm = describe() + " threads=" + std::to_string(nthreads);
}

template void ConvPlan<float>::Impl::execute(const ConvProblem<float>& p) const;
template void ConvPlan<double>::Impl::execute(const ConvProblem<double>& p) const;
template ConvPlan<float>::Impl::~Impl();
template ConvPlan<double>::Impl::~Impl();
template <typename T>
void ConvPlan<T>::execute(const ConvProblem<T>& given) const {
  validate(given);
  const ConvProblem<T> p = batch_as_axis0(given);
  const ConvProblem<T>& s = impl_->shape;
  bool same = p.kind == s.kind && p.groups == s.groups && p.cin_per_group == s.cin_per_group &&
              p.cout_per_group == s.cout_per_group && p.mode == s.mode;
  for (int a = 0; a < kSpatialRank; ++a)
    same = same && p.in_size[a] == s.in_size[a] && p.out_size[a] == s.out_size[a] && p.kernel[a] == s.kernel[a] &&
           p.stride[a] == s.stride[a] && p.dilation[a] == s.dilation[a] && p.pad_before[a] == s.pad_before[a];
  if (!same) throw std::invalid_argument("convfast kernel: the problem does not match the plan's shapes");
  const CallThreads threads(conv_work(p));
  impl_->execute(p);
}

template <typename T>
std::string ConvPlan<T>::describe() const {
  return impl_->describe();
}

std::string last_algorithm() { return t_last_algorithm; }
void set_last_algorithm(std::string description) { t_last_algorithm = std::move(description); }

template <typename T>
void run_convolution(const ConvProblem<T>& p) {
  const CallThreads threads(conv_work(p));
  ConvPlan<T>(p).execute(p);
}

template <typename T>
bool depthwise_lanes_weight_grad(const ConvProblem<T>& p, T* out) {
  const UkernelInfo<T>& uk = active_ukernel<T>();
  if (p.kind != ConvKind::Forward || p.groups < uk.lanes) return false;
  std::vector<AxisPlan> axes[kSpatialRank];
  for (int a = 0; a < kSpatialRank; ++a) {
    if (p.out_size[a] < 1) return false;
    axes[a].push_back(forward_axis(p.in_size[a], p.out_size[a], p.kernel[a], p.stride[a], p.dilation[a],
                                   p.pad_before[a], p.mode));
  }
  const std::vector<Phase> phases = {{&axes[0][0], &axes[1][0], &axes[2][0]}};
  if (!channel_lanes::Conv<T>::applies(p, phases, uk)) return false;
  bool ok = false;
  const channel_lanes::Conv<T> conv(p, axes, uk, ok);
  if (!ok) return false;
  conv.weight_grad(p, out, get_num_threads());
  return true;
}

template class ConvPlan<float>;
template class ConvPlan<double>;
template void run_convolution<float>(const ConvProblem<float>&);
template void run_convolution<double>(const ConvProblem<double>&);
template bool depthwise_lanes_weight_grad<float>(const ConvProblem<float>&, float*);
template bool depthwise_lanes_weight_grad<double>(const ConvProblem<double>&, double*);
}  // namespace convfast
