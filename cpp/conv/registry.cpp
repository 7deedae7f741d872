// The forward engine's algorithms and the choice among them. A plan is, in order of preference:
//   winograd       (algorithms/winograd.hpp)      choose_winograd: 3x3-like stride phases, enough
//                                                 channels and tiles; CONVFAST_ALGO=winograd forces it
//   channel_lanes  (algorithms/channel_lanes.hpp) choose_channel_lanes: depthwise, >= one vector of
//                                                 groups; CONVFAST_ALGO=lanes forces it
//   direct rows / planes (algorithms/direct.cpp)  choose_algorithm + choose_plane_mode
//   gather GEMM / pixel-lanes GEMM (algorithms/gemm.cpp)  choose_algorithm + choose_pixel_lanes
// CONVFAST_ALGO=gemm|direct, CONVFAST_PIXEL_LANES=0|1 and CONVFAST_DIRECT=rows force the others.
// The constructor below runs the chain and builds the chosen algorithm's plan (packed weights).
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

// allow_winograd = false: the exact-chain paths only (the fallback of a Winograd plan whose
// output came out non-finite, see execute).
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
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group, G = p.groups;
  max_k = checked_mul(max_taps, cin);

  if (choose_scatter_gemm(p)) return;
  if (p.kind == ConvKind::Transposed && !weights_finite(p)) {
    // The other algorithms multiply the zeros beyond the input's edges by the weights (0 * Inf =
    // NaN); the scatter GEMM forms only the true products, as PyTorch does.
    scatter.reset(new scatter_gemm::Conv<T>(p, uk));
    return;
  }
  if (allow_winograd && choose_winograd(p)) return;
  if (choose_channel_lanes(p)) return;
  choose_algorithm(p);
  if (direct) {
    tile_m = uk.pw[direct_variant];
    if (tile_m > kMaxTilePixels) throw std::logic_error("direct tile wider than kMaxTilePixels");
    tile_n = kDirectChannelTiles[direct_variant];
    kc_max = std::max<int64_t>(max_k, 1);
    mc_max = tile_m;
  } else {
    pixel_lanes = choose_pixel_lanes(p);
    weights_in_place = choose_weights_in_place(p, pixel_lanes);
    pixel_lanes = pixel_lanes || weights_in_place;
    tile_m = pixel_lanes ? uk.nr : uk.mr;
    tile_n = pixel_lanes ? uk.mr : uk.nr;
    if (tile_m != 4 && tile_m != 6 && tile_m != 8 && tile_m != 12 && tile_m != 16 && tile_m != 32)
      throw std::logic_error("convfast: no input packing routine for micro-kernel height " + std::to_string(tile_m));
    // Cache blocking: a KC x NR panel of B stays in L1 (~16 KiB) while MC x KC of A streams from L2.
    // (Both orientations take the same KC, so that their K blocks and results are identical.)
    kc_max = std::max<int64_t>(64, std::min<int64_t>(512, 16384 / (uk.nr * (int64_t)sizeof(T))));
    mc_max = std::max<int64_t>(tile_m, (131072 / (kc_max * (int64_t)sizeof(T))) / tile_m * tile_m);
  }
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
inline bool ConvPlan<T>::Impl::integer_weights(const ConvProblem<T>& p) {
  return every_weight(p, [](T v) { return v == std::nearbyint(v); });
}

// Winograd (winograd.hpp) where it applies: every stride phase reads its inputs at unit step
// along each axis with 3 or 2 equally spaced taps (any dilation, forward or transposed) or 1 tap,
// at least two axes with more than one (a 1-D tile saves only a third of the products, which the
// transforms eat). Chosen automatically when each channel count per group is at least 16 and
// both together at least 48, where the GEMMs of the transform points amortise the transforms,
// and on enough tiles (below); CONVFAST_ALGO=winograd forces it wherever it applies, gemm|direct
// never take it. Measured (float32, 1 thread, minimum of interleaved runs, against the algorithm
// chosen before, AVX-512 / AVX2 kernels): 8 x 32 -> 32 on 64x64 1.68x / 1.70x, 16 -> 32 1.63x /
// 1.17x, 1 x 24 on 56x56 1.49x / 1.47x, 8 x 48 on 28x28 1.76x / 1.36x, 3-D 8 x 16 -> 32 on 16^3
// 1.61x / 1.55x; 16 -> 16 stays on the direct path (2-D 64x64 0.87x, 3-D 32^3 0.91x).
template <typename T>
inline bool ConvPlan<T>::Impl::choose_winograd(const ConvProblem<T>& p) {
  const char* forced = forced_algorithm();
  const std::string force = forced ? forced : "";
  // (No phases: a transposed convolution whose outputs no tap reaches, all bias.)
  if (force == "gemm" || force == "direct" || p.cin_per_group < 1 || phases.empty()) return false;
  // Every phase must qualify (a transposed convolution's stride phases each become one
  // Winograd convolution writing its own outputs; k4 s2: four phases of 2 x 2 taps).
  std::vector<std::array<winograd::Axis, kSpatialRank>> planned(phases.size());
  int winograd_axes = 0;
  double points2 = 0;  // the weight transforms' points, all phases, with F(2, *) tiles
  for (size_t ph = 0; ph < phases.size(); ++ph) {
    int axes_here = 0;
    double points_here = 1;
    for (int a = 0; a < kSpatialRank; ++a) {
      const AxisPlan& ap = *phases[ph][a];
      winograd::Axis& w = planned[ph][a];
      w.count = ap.count;
      w.out_start = ap.out_start;
      w.out_step = ap.out_step;
      w.in_size = ap.in_size;
      w.in_step = ap.in_step;
      w.mode = ap.mode;
      const int nt = static_cast<int>(ap.taps.size());
      if (nt == 1) {
        w.first = ap.tap_offset[0];
        w.kernel_index[0] = ap.taps[0];
        continue;
      }
      if ((nt != 2 && nt != 3) || ap.in_step != 1) return false;
      int order[3] = {0, 1, 2};
      std::sort(order, order + nt, [&](int i, int j) { return ap.tap_offset[i] < ap.tap_offset[j]; });
      const int64_t spacing = ap.tap_offset[order[1]] - ap.tap_offset[order[0]];
      if (spacing < 1 || (nt == 3 && ap.tap_offset[order[2]] - ap.tap_offset[order[1]] != spacing)) return false;
      w.taps = nt;
      w.first = ap.tap_offset[order[0]];
      w.spacing = spacing;
      for (int e = 0; e < nt; ++e) w.kernel_index[e] = ap.taps[order[e]];
      ++axes_here;
      points_here *= nt + 1;
    }
    if (axes_here < 2) return false;
    winograd_axes = std::max(winograd_axes, axes_here);
    points2 += points_here;
  }
  // Tile size along 3-tap axes: F(2, 3), or in float64 F(4, 3) (36 points for 16 outputs in
  // 2-D, 4x fewer products than the direct sum against 2.25x; its larger transform coefficients
  // cost float64 no measurable accuracy, while in float32 they would approach the documented
  // error bound) where the products it saves beat its coarser tiles' waste at the edges by 20 %
  // (the model overestimated F(4, 3) by 10-15 % on the layer suite) and its weight transform
  // (points x C_in/G x C_out/G) is at most 32 MiB: 1-thread-pair A/B, float64, F(4, 3) over
  // F(2, 3): ResNet 64x56 1.56x, 128x28 1.29x, 256x14 1.47x, U-Net 1.63x, dilation 2 1.13x; VGG
  // 512x14 (76 MiB) 0.94x, dilation 6 at 32 (equal modelled cost) 0.89x. 2-tap axes (stride
  // phases of even kernels) take F(2, 2): 3 points for 2 outputs, coefficients 0 and +-1.
  if (sizeof(T) == 8 && phases.size() == 1 && !integer_weights(p)) {
    double cost2 = 1, cost4 = 1, points4 = 1;
    for (const winograd::Axis& w : planned[0])
      if (w.taps == 3) {
        cost2 *= 4.0 * double(w.tiles_for(2));
        cost4 *= 6.0 * double(w.tiles_for(4));
        points4 *= 6.0;
      } else if (w.taps == 2) {
        points4 *= 3.0;
      }
    const double transform4 = points4 * double(p.cin_per_group) * double(p.cout_per_group) * sizeof(T);
    if (cost4 * 1.2 < cost2 && double(p.groups) * transform4 <= double(32 << 20))
      for (winograd::Axis& w : planned[0])
        if (w.taps == 3) w.m = 4;
  }
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group;
  if (force != "winograd" && (std::min(cin, cout) < 16 || cin + cout < 48)) return false;
  // Enough tiles to amortise the weight transform, which each call redoes: at least 16 (256 for
  // fewer than 128 channels in and out together: 8 x 32 on 7x7, 128 tiles, 0.93x; 32 on 14x14,
  // 49 tiles, 0.86x), plus 4 per MiB of transformed weights (they outgrow the caches). 1 thread, float32, against the GEMM:
  // 512 channels on 4x4 maps (4 tiles) 0.66x, on 7x7 (16 tiles) 0.9x, 8 x 7x7 (128 tiles) 0.96x;
  // 256 on 14x14 (49 tiles, 4 MiB) 1.43x; 128 on 28x28 1.56x.
  double tiles = 0;  // of the phase with the fewest
  for (size_t ph = 0; ph < phases.size(); ++ph) {
    double phase_tiles = double(p.batch);
    for (const winograd::Axis& w : planned[ph]) phase_tiles *= double(w.tiles_for(w.m));
    tiles = ph == 0 ? phase_tiles : std::min(tiles, phase_tiles);
  }
  const double transform_mib =
      points2 * double(p.groups) * double(p.cin_per_group) * double(p.cout_per_group) * sizeof(T) / double(1 << 20);
  // A kept plan transforms its weights once: there, large weights (at least 8 MiB transformed) need
  // only 32 tiles (2 per thread and point block; 16 tiles ran on one thread). Kept plans, f32,
  // against the GEMM: 512 -> 512 on 8 x 4x4 (32 tiles, 16 MiB) 2.2x on 1 thread, 2.3x on 2; on 7x7
  // at batch 1 (16 tiles) 1.15x on 1 thread but 0.5x on 2; 256 -> 256 on 7x7 (4 MiB) 0.93x.
  const bool kept_large = plan_is_kept() && transform_mib >= 8.0;
  const double min_tiles = kept_large ? 32.0 : (cin + cout < 128 ? 256.0 : 16.0) + 4.0 * transform_mib;
  if (force != "winograd" && tiles < min_tiles) return false;
  // Working memory: the weight transforms are (points / taps) times the packed weights (16/9 in
  // 2-D, 64/27 in 3-D, more with F(4, 3) above); past 48 MiB (a 3-D 512-channel float64 layer
  // would need 134 MiB) the GEMM path keeps the documented bound.
  if (force != "winograd" &&
      points2 * double(p.groups) * double(p.cin_per_group) * double(p.cout_per_group) * sizeof(T) > double(48 << 20))
    return false;
  // The transforms copy lanes in blocks of kLaneBlock: a 3-channel tile of the baseline float64
  // kernels (3 vectors of 2) takes the 4-channel tiles instead.
  int variant = direct_variant_for(p.cout_per_group);
  if (uk.pw[variant] % winograd::kLaneBlock != 0) variant = direct_variant_for(4);
  if (uk.direct[variant] == nullptr || uk.pw[variant] % winograd::kLaneBlock != 0) return false;
  for (const auto& axes_of_phase : planned) {
    winograd::Axis ax[kSpatialRank] = {axes_of_phase[0], axes_of_phase[1], axes_of_phase[2]};
    wino.emplace_back(new winograd::Conv<T>(p, ax, uk, variant, get_num_threads()));
  }
  return true;
}

// Depthwise layers (one channel in and out per group) with at least a vector's width of groups
// take the channel-lanes path (channel_lanes.hpp); CONVFAST_ALGO=lanes forces it wherever it
// applies, gemm|direct|winograd never take it.
template <typename T>
inline bool ConvPlan<T>::Impl::choose_channel_lanes(const ConvProblem<T>& p) {
  const char* forced = forced_algorithm();
  const std::string force = forced ? forced : "";
  if (!channel_lanes::Conv<T>::applies(p, phases, uk) || (force.empty() ? p.groups < uk.lanes : force != "lanes"))
    return false;
  bool ok = false;
  lanes.reset(new channel_lanes::Conv<T>(p, axes, uk, ok));
  if (!ok) lanes.reset();
  return ok;
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

// Transposed layers of small inputs take the scatter GEMM (scatter_gemm.hpp): at most twice as
// many pixels (batch included) as input channels per group, i.e. where packing the weights costs
// as much as a good share of the products, and at most kScatterMaxPixels; single-phase layers
// (stride 1), whose weights the pixel-lanes GEMM already reads in place, only for a handful of
// pixels. 1 thread, float32, against the phase GEMMs (Winograd where it applied), one process,
// minimum of interleaved runs: k4s2 512 -> 256 on 4x4 1.60x (8 images 1.14x), 256 -> 128 on 8x8
// 1.03x; k2s2 1024 -> 512 on 7x7 1.58x, 512 -> 256 on 14x14 1.06x, 3-D 256 -> 128 on 4^3 1.20x; 1-D
// k4s2 512 -> 256 on 64 1.20x; DCGAN's k4 100 -> 512 on 1x1 1.8x; outside the rule: 3-D k2s2 on
// 8^3 (512 pixels, 256 channels) 0.82x, k3s2 256 -> 128 on 14x14 0.87x, k3s1 512 on 7x7 0.95x,
// 8 x 512 on 7x7 0.73x, 64 on 28x28 0.31x.
// CONVFAST_ALGO=scatter forces it wherever it applies, the other forced algorithms never take it;
// CONVFAST_SCATTER=0|1 excludes it or takes it wherever it applies (tests, measurements). Weights
// holding an infinity or NaN take it wherever it applies, whatever is forced (see the constructor).
template <typename T>
inline bool ConvPlan<T>::Impl::choose_scatter_gemm(const ConvProblem<T>& p) {
  const char* forced = forced_algorithm();
  const std::string force = forced ? forced : "";
  if (!scatter_gemm::Conv<T>::applies(p) || (!force.empty() && force != "scatter")) return false;
  if (force.empty()) {
    const char* knob = std::getenv("CONVFAST_SCATTER");
    if (knob && *knob) {
      if (std::string(knob) != "1") return false;
    } else {
      const int64_t pixels = p.batch * p.in_size[0] * p.in_size[1] * p.in_size[2];
      const bool one_phase = phases.size() == 1;
      if (pixels > (one_phase ? kScatterMaxPixelsOnePhase : kScatterMaxPixels) || 2 * pixels > p.cin_per_group)
        return false;
    }
  }
  scatter.reset(new scatter_gemm::Conv<T>(p, uk));
  return true;
}

// GEMM (pixels x output channels, output channels in the vector lanes) or direct (output
// channels broadcast, pixels in the vector lanes, inputs copied row by row, channels-first rows
// written in place). Measured on the layer suite (AVX2, 2 threads), direct wins when a group has
// few output channels (depthwise: one; a GEMM would leave most lanes empty), for very few input
// channels (the 3 -> 64 stem, 3-D 1 -> 32: K too short to amortise packing) and for large
// channels-first planes at stride 1 (U-Net 128x128, 3-D 32^3: GEMM packing strides across
// planes of 64 KiB and more) and 1-D layers at stride 1; GEMM wins for the usual 2-D layers, strided 3-D layers,
// transposed layers, channels-last outputs and short rows (7x7 maps), where it tiles across rows.
// CONVFAST_ALGO=gemm|direct forces one where it can run (tests use it).
template <typename T>
inline void ConvPlan<T>::Impl::choose_algorithm(const ConvProblem<T>& p) {
  constexpr int64_t kLargePlane = 16384;  // input elements per channel
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group;
  const int64_t plane = p.in_size[0] * p.in_size[1] * p.in_size[2];
  // 1-D layers (one row per plane) at stride 1, forward or transposed, take the direct path too:
  // AVX-512, 1 thread, f32, against the GEMM: 32 -> 32 k3 on 8 x 16000 1.31x (its grad_input 1.32x),
  // k3 dilation 4 at batch 1 1.14x, 64 -> 64 k3 on 8 x 4000 1.12x (grad_input 1.19x), 128 on 2000
  // 1.10x, 256 on 1000 1.09x, 512 on 128 1.14x, 1x1 32 -> 64 1.30x.
  const bool one_row = p.in_size[0] == 1 && p.in_size[1] == 1 && p.out_size[0] == 1 && p.out_size[1] == 1 &&
                       p.stride[2] == 1;
  const bool unit_stride = p.kind == ConvKind::Forward && p.stride[0] == 1 && p.stride[1] == 1 && p.stride[2] == 1;
  direct_variant = direct_variant_for(cout);
  const int pw = uk.pw[direct_variant];
  bool possible = uk.direct[0] != nullptr && max_k <= 16384;
  double fill = 1.0;
  for (const AxisPlan& a2 : axes[2]) {
    if (!possible) break;
    row_plans.emplace_back(a2, pw, int64_t(1) << 22);
    possible = row_plans.back().usable;
    fill = std::min(fill, double(a2.count) / double(ceil_div(std::max<int64_t>(a2.count, 1), pw) * pw));
  }
  if (possible) {
    for (const Phase& ph : phases) {
      const RowBufferPlan& rb = row_plans[ph[2] - axes[2].data()];
      const int64_t size = checked_mul(checked_mul(cache_entries(ph[0]->taps.size(), ph[1]->taps.size()), cin),
                                       checked_mul((int64_t)rb.residue.size(), rb.length));
      row_buffer_size = std::max(row_buffer_size, size);
      max_cache_entries = std::max(max_cache_entries, cache_entries(ph[0]->taps.size(), ph[1]->taps.size()));
    }
    possible = row_buffer_size * (int64_t)sizeof(T) <= (int64_t(8) << 20);
  }
  const char* forced = forced_algorithm();
  const std::string force = forced ? forced : "";
  if (force == "gemm")
    direct = false;
  else if (force == "direct")
    direct = possible;
  else
    direct = possible && (2 * cout <= uk.nr || (p.y_stride[2] == 1 && fill >= 0.75 &&
                                                (cin <= 4 || one_row || (plane >= kLargePlane && unit_stride))));
  if (!direct) {
    row_plans.clear();
    row_buffer_size = 0;
    return;
  }
  choose_plane_mode(p);
  int64_t longest = 0;
  for (const RowBufferPlan& rb : row_plans) longest = std::max(longest, rb.length);
  zero_row.reset(new AlignedBuffer<T>(longest + pw));
  std::fill(zero_row->get(), zero_row->get() + longest + pw, T(0));
}

// Plane mode pays off for short output rows (under 5 tiles; measured on the layer suite: depthwise
// 56 and 112 wide, ResNeXt groups at 56, 3-D 32^3 gain 1.3-3x, the 112-wide stem does not), when a
// useful block of rows of every (axis-0 tap, input channel, slot) fits a per-thread budget of half
// the L2 size. (Under 4 tiles and 128 KiB left the 3-D 1 -> 32 layer's float64 passes to rows:
// 4 tiles of 8 in its forward, 32 input channels x 3 taps per buffered row in its grad_input.
// Planes: forward 8.7 -> 7.8 ms, grad_input 20.6 -> 14.7; the stem's float32 grad_input (its
// 3-channel tiles are 24 wide) 31.6 -> 28.1; p25, one process.)
template <typename T>
inline void ConvPlan<T>::Impl::choose_plane_mode(const ConvProblem<T>& p) {
  const int64_t kShortRow = 5 * uk.pw[direct_variant], kBudgetBytes = 256 * 1024, kMinRows = 4;
  if (const char* forced = std::getenv("CONVFAST_DIRECT")) {
    if (std::string(forced) == "rows") return;
  }
  const int64_t cin = p.cin_per_group;
  for (const AxisPlan& a2 : axes[2]) {
    col_plans.emplace_back(a2, 1, int64_t(1) << 22);
    if (!col_plans.back().usable || a2.count >= kShortRow) return col_plans.clear();
  }
  for (const AxisPlan& a1 : axes[1]) {
    line_plans.emplace_back(a1, 1, int64_t(1) << 22);
    if (!line_plans.back().usable) return col_plans.clear(), line_plans.clear();
  }
  // Per phase: elements of one buffered row across all slabs, the extra rows the axis-1 taps
  // read, and the pitch.
  struct SlabShape {
    int64_t row_elements, span1, pitch;
  };
  std::vector<SlabShape> shapes;
  for (const Phase& ph : phases) {
    const RowBufferPlan &cp = col_plans[ph[2] - axes[2].data()], &lp = line_plans[ph[1] - axes[1].data()];
    shapes.push_back({cin * (int64_t)ph[0]->taps.size() * (int64_t)(lp.residue.size() * cp.residue.size()) *
                          cp.length,
                      lp.length - ph[1]->count, cp.length});
  }
  int64_t rows = INT64_MAX, size = 0;
  for (size_t i = 0; i < phases.size(); ++i) {
    const int64_t count1 = phases[i][1]->count;
    const int64_t fit = kBudgetBytes / (int64_t)sizeof(T) / std::max<int64_t>(shapes[i].row_elements, 1) -
                        shapes[i].span1;
    rows = std::min(rows, std::min(fit, count1));
    if (fit < std::min(kMinRows, count1)) return col_plans.clear(), line_plans.clear();
  }
  plane_rows = std::max<int64_t>(rows, 1);
  for (const SlabShape& sh : shapes)  // the slabs, then the slack read by dropped lanes (direct_planes)
    size = std::max(size, sh.row_elements * (plane_rows + sh.span1) + sh.pitch + uk.pw[direct_variant]);
  plane_mode = true;
  row_buffer_size = size;
  max_cache_entries = 0;
}

// Pixels in the vector lanes: single-phase layers with channels-first outputs whose every tile
// gemm_block would pack (one-tap layers, strided layers not read in place). There the
// usual orientation (pixels broadcast, channels in the lanes) spends its time outside the
// micro-kernel: packing six pixels per k and transposing C into y's channel-major rows; swapped,
// a k of the panel is NR pixels (a row's contiguous run, one copy) and C's rows are y's rows.
// CONVFAST_PIXEL_LANES=0|1 excludes or forces it (tests use it).
template <typename T>
inline bool ConvPlan<T>::Impl::choose_pixel_lanes(const ConvProblem<T>& p) const {
  const char* forced = std::getenv("CONVFAST_PIXEL_LANES");
  if (forced && std::string(forced) == "0") return false;
  if (forced && std::string(forced) == "1") return true;
  if (phases.size() != 1 || p.y_stride_c == 1 || p.y_stride[2] * phases[0][2]->out_step != 1) return false;
  // Where gemm_block reads no tile in place and packs them all anyway: one tap (gemm_block packs
  // one-tap phases), or a step along the row it does not read in place (stride 3 and more; the
  // k2s2 convolution, the grad_input of k2s2 up-convolutions: 1.05-1.2x measured).
  return max_taps == 1 ||
         !steps_in_place(phases[0][2]->in_step * p.x_stride[2], (int64_t)phases[0][2]->taps.size());
}

// The weights read in place: one phase (forward or transposed), y channels-first with contiguous
// rows (the pixel-lanes store), few output pixels (at most kSmallM = 128 over the whole call, the batch
// included) and large weights, which a call would otherwise pack (read and write) before reading
// them once more for so few pixels: from 1 MiB where the packed GEMM would take the pixel lanes too
// (1x1 layers) or the pixels fit one tile, from 8 MiB against the usual orientation, whose tiles
// suit 49 pixels better. 2 threads, float32, p25 against the packed GEMM (noisy host, several
// runs): 512 -> 2048 1x1 on 7x7 1.36-1.52x, 320 -> 1280 1.37-1.46x, 512 3x3 on 4x4 0.98-1.8x, on
// 7x7 0.98-1.22x, DCGAN's 100 -> 512 k4 on 1x1 1.12-1.22x; 256 -> 512 3x3 s2 on 14x14 (4.5 MiB)
// 0.82-1.06x, 256 3x3 on 7x7 (2.3 MiB) 0.76-0.85x; 1 thread, AVX-512, min of interleaved runs:
// 8 x 512 3x3 on 4x4 (128 pixels) 1.17x, 6 x 512 on 4x4 (96) 1.13x, 2 x 512 on 7x7 (98) 0.90-0.98x. CONVFAST_WEIGHTS_IN_PLACE=1 takes it wherever it
// can run, =0 never (tests); CONVFAST_PIXEL_LANES=0 or a forced CONVFAST_ALGO keeps the packed GEMM.
template <typename T>
inline bool ConvPlan<T>::Impl::choose_weights_in_place(const ConvProblem<T>& p, bool packed_pixel_lanes) const {
  constexpr int64_t kSmallM = 128;
  if (phases.size() != 1 || p.y_stride_c == 1 || uk.fn_pixels == nullptr ||
      p.y_stride[2] * phases[0][2]->out_step != 1)
    return false;
  if (const char* forced = std::getenv("CONVFAST_WEIGHTS_IN_PLACE")) {
    if (*forced) return std::string(forced) == "1";
  }
  if (const char* lanes = std::getenv("CONVFAST_PIXEL_LANES")) {
    if (std::string(lanes) == "0") return false;  // no pixel-lanes orientation at all
  }
  if (const char* algo = forced_algorithm()) {
    if (*algo) return false;
  }
  const int64_t pixels = checked_mul(p.batch, PhaseShape(phases[0]).num_pixels);
  // A kept plan packs its weights once, and the packed GEMM then streams them faster (f32, batch 1,
  // 1 thread: 512 -> 512 3x3 on 7x7 1.26x, on 4x4 1.43x, 1x1 1024 -> 1024 on 7x7 1.18x; 2 threads:
  // 3x3 512 on 7x7 1.57x), except a packed pixel-lanes GEMM of one pixel tile, which runs on one
  // thread where the in-place kernel splits the channels (1x1 2048 -> 512 on 4x4, 2 threads: 0.7x).
  if (plan_is_kept() && (!packed_pixel_lanes || pixels > uk.nr)) return false;
  const int64_t weight_bytes = checked_mul(checked_mul(p.groups * p.cout_per_group, max_k), (int64_t)sizeof(T));
  const int64_t large = packed_pixel_lanes || pixels <= uk.nr ? int64_t(1) << 20 : int64_t(8) << 20;
  // Past 64 pixels only whole-ish pixel tiles (the last at least half full): the in-place kernel's
  // tiles are NR pixels, and a nearly empty last tile costs a whole pass over the weights.
  const int64_t tail = pixels % uk.nr;
  const bool tiles_full = pixels <= 64 || tail == 0 || 2 * tail >= uk.nr;
  return pixels <= kSmallM && tiles_full && weight_bytes >= large;
}

template <typename T>
std::string ConvPlan<T>::Impl::describe() const {
  if (!wino.empty()) {  // the tile of phase 0's first Winograd axis, e.g. "F(2,3)"
    const winograd::Conv<T>& w0 = *wino[0];
    const winograd::Axis& ax = w0.axes[0].winograd() ? w0.axes[0] : w0.axes[1];
    return std::string("winograd F(") + std::to_string(ax.m) + "," + std::to_string(ax.taps) + ") " + isa + " " +
           std::to_string(w0.points) + " points " + std::to_string(w0.pw) + "x" + std::to_string(w0.mro) +
           " phases=" + std::to_string(wino.size());
  }
  if (scatter) return scatter->describe(isa);
  if (lanes)
    return std::string("channel_lanes ") + isa + " " + std::to_string(lanes->L) + " lanes rows=" +
           std::to_string(lanes->rows[0].rows_per_item) + " phases=" + std::to_string(lanes->phase_plans.size()) +
           (lanes->pair_store ? " paired" : "");
  return std::string(plane_mode ? "direct_planes" : direct ? "direct_rows" : weights_in_place ? "pixel_lanes_gemm_in_place" : pixel_lanes ? "pixel_lanes_gemm" : "gather_gemm") + " " + isa + " " + std::to_string(tile_m) + "x" +
         std::to_string(tile_n) + " phases=" + std::to_string(phases.size()) + (fuse_phases ? " fused" : "") +
         (row_pairs.empty() ? "" : " paired");
}

template ConvPlan<float>::Impl::Impl(const ConvProblem<float>& p, bool allow_winograd);
template ConvPlan<double>::Impl::Impl(const ConvProblem<double>& p, bool allow_winograd);
template std::string ConvPlan<float>::Impl::describe() const;
template std::string ConvPlan<double>::Impl::describe() const;
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
