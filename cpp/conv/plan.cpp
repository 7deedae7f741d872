// The convolution engine's plan execution (the chosen algorithm's execute), and the GEMM and
// direct paths' shared blocking, weight packing and work split. Those paths are an implicit
// ("gather") GEMM and its relatives over strided N-D views (registry.cpp lists every algorithm).
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

#include "algorithm.hpp"

namespace convfast {

thread_local std::string t_last_algorithm;

// The outputs no phase writes are the bias (or zero). Filled first; the phases then overwrite theirs.
template <typename T>
void ConvPlan<T>::Impl::fill_with_bias(const ConvProblem<T>& p) const {
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
  for (int a = 0; a < kSpatialRank; ++a)
    if (p.out_size[a] == 0) return;  // nothing to write (the Python layer never calls with this)
  if (outputs_uncovered) fill_with_bias(p);
  algorithm->execute(*this, p);
}

// The GEMM and direct paths' blocking (tile_m, tile_n, kc_max and mc_max set by their create):
// the channel tiles, the pixel-lanes and fused phases' pixel blocks, the phase pairs, and the
// packed weights, one panel set [n_tile][K][tile_n] per (group, phase).
template <typename T>
void ConvPlan<T>::Impl::plan_blocks(const ConvProblem<T>& p) {
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group, G = p.groups;
  n_tiles = ceil_div(cout, tile_n);
  nt_per_block = direct || pixel_lanes ? n_tiles : std::max<int64_t>(1, 256 / tile_n);
  ldc = std::min<int64_t>(n_tiles, nt_per_block) * tile_n;
  if (pixel_lanes) {
    // C is [channel][pixel] for all channels of the group, its pitch the pixel block. The block
    // takes a panel of up to 256 KiB (half of L2: as read from x, each channel's run of pixels is
    // one sequential stream, and longer runs were slightly faster on the 1x1 256->64 layer: 128 px
    // 15.0 ms, 256 px 14.8 ms, f32, 2 threads; f64 64 px 29.8 ms, 128 px 29.2 ms) and a C of up to
    // 128 KiB, down to one tile.
    constexpr int64_t kPanelBytes = 262144, kCBytes = 131072;
    mc_max = std::max<int64_t>(tile_m, std::min(kPanelBytes / (kc_max * (int64_t)sizeof(T)),
                                                kCBytes / (ldc * (int64_t)sizeof(T))) / tile_m * tile_m);
  }
  fuse_phases = !direct && !pixel_lanes && phases.size() > 1 && (int64_t)phases.size() <= kMaxFusedPhases;
  for (const Phase& ph : phases)
    for (int a = 0; a < kSpatialRank; ++a)
      fuse_phases = fuse_phases && ph[a]->count == phases[0][a]->count && ph[a]->out_step == phases[0][a]->out_step;
  if (fuse_phases && phases[0][2]->out_step == 2) {
    std::vector<bool> paired(phases.size(), false);
    for (size_t a = 0; a < phases.size(); ++a)
      for (size_t b = 0; b < phases.size(); ++b)
        if (!paired[a] && !paired[b] && phases[a][0] == phases[b][0] && phases[a][1] == phases[b][1] &&
            phases[b][2]->out_start == phases[a][2]->out_start + 1) {
          row_pairs.push_back({(int64_t)a, (int64_t)b});
          paired[a] = paired[b] = true;
        }
    if (row_pairs.size() * 2 != phases.size()) row_pairs.clear();  // all phases paired, or none
  }
  phases_share_patches = fuse_phases;
  for (const Phase& ph : phases)
    for (int a = 0; a < kSpatialRank; ++a)
      phases_share_patches = phases_share_patches && ph[a]->in_step == phases[0][a]->in_step &&
                             ph[a]->tap_offset == phases[0][a]->tap_offset;
  if (fuse_phases)  // the C blocks of all phases together stay near L2 size
    mc_max = std::max<int64_t>(
        tile_m, std::min<int64_t>(mc_max, 262144 / (ldc * (int64_t)phases.size() * (int64_t)sizeof(T)) / tile_m * tile_m));

  if (weights_in_place) return;
  // Packed weights: one panel set [n_tile][K][tile_n] per (group, phase).
  wpack_offset.assign(static_cast<size_t>(checked_mul(G, (int64_t)phases.size())) + 1, 0);
  size_t idx = 0;
  for (int64_t g = 0; g < G; ++g)
    for (const Phase& ph : phases) {
      const int64_t K = checked_mul(PhaseShape(ph).num_taps, cin);
      wpack_offset[idx + 1] = checked_add(wpack_offset[idx], checked_mul(n_tiles * tile_n, K));
      ++idx;
    }
  wpack.reset(new AlignedBuffer<T>(wpack_offset.back()));
  const int64_t n_phases = (int64_t)phases.size(), n_panels = G * n_phases * n_tiles;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), n_panels)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t i = 0; i < n_panels; ++i) {
    const int64_t gp = i / n_tiles, nt = i % n_tiles;
    const int64_t K = PhaseShape(phases[gp % n_phases]).num_taps * cin;
    pack_weight_tile(p, phases[gp % n_phases], gp / n_phases, tile_n, nt,
                     wpack->get() + wpack_offset[gp] + nt * K * tile_n, uk.transpose_block, uk.lanes);
  }
}

template <typename T>
void ConvPlan<T>::Impl::run_items(const ConvProblem<T>& p) const {
  const int64_t G = p.groups;
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
  // Weights in place: each pixel block's patches packed once for its items (pixel_lanes_patches).
  std::vector<int64_t> patch_offset;
  const std::unique_ptr<AlignedBuffer<T>> patches =
      weights_in_place ? pixel_lanes_patches(p, items, scratch, nt_block, patch_offset) : nullptr;
#pragma omp parallel for schedule(dynamic, chunk) num_threads(nthreads)
  for (int64_t i = 0; i < (int64_t)items.size(); ++i)
    run_item(p, items[i], *scratch[omp_get_thread_num()], patches ? patches->get() + patch_offset[i] : nullptr);
  record_algorithm<T>(*this, nthreads);
}

template <typename T>
std::string ConvPlan<T>::Impl::describe_blocks(const char* name) const {
  return std::string(name) + " " + isa + " " + std::to_string(tile_m) + "x" + std::to_string(tile_n) +
         " phases=" + std::to_string(phases.size()) + (fuse_phases ? " fused" : "") +
         (row_pairs.empty() ? "" : " paired");
}

namespace engine {
template <typename T>
void execute_items(const typename ConvPlan<T>::Impl& plan, const ConvProblem<T>& p) {
  plan.run_items(p);
}
template void execute_items<float>(const ConvPlan<float>::Impl&, const ConvProblem<float>&);
template void execute_items<double>(const ConvPlan<double>::Impl&, const ConvProblem<double>&);
}  // namespace engine

template std::string ConvPlan<float>::Impl::describe_blocks(const char*) const;
template std::string ConvPlan<double>::Impl::describe_blocks(const char*) const;
template void ConvPlan<float>::Impl::execute(const ConvProblem<float>& p) const;
template void ConvPlan<double>::Impl::execute(const ConvProblem<double>& p) const;
template void ConvPlan<float>::Impl::plan_blocks(const ConvProblem<float>& p);
template void ConvPlan<double>::Impl::plan_blocks(const ConvProblem<double>& p);
template void ConvPlan<float>::Impl::run_items(const ConvProblem<float>& p) const;
template void ConvPlan<double>::Impl::run_items(const ConvProblem<double>& p) const;
template void ConvPlan<float>::Impl::fill_with_bias(const ConvProblem<float>& p) const;
template void ConvPlan<double>::Impl::fill_with_bias(const ConvProblem<double>& p) const;
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

template class ConvPlan<float>;
template class ConvPlan<double>;
template void run_convolution<float>(const ConvProblem<float>&);
template void run_convolution<double>(const ConvProblem<double>&);
}  // namespace convfast
