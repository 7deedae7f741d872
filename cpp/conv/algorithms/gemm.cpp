// Implicit ("gather") GEMM: M = output pixels, N = output channels of one group, K = taps x input
// channels of one group, patches packed straight from the unpadded input (or read in place), and
// the pixel-lanes variant with the roles of A and B swapped. run_item is the per-work-item entry
// of every non-Winograd, non-channel-lanes plan and dispatches to the direct path where chosen.
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

#include "../algorithm.hpp"

namespace convfast {

// A tile whose MR pixels read, for every tap, the same inputs as its first pixel shifted by one
// offset per pixel (no padding, no tile end inside the block) is not packed: the micro-kernel reads
// its rows in place, through one pointer per k shared by the tiles that follow it (tile_anchor),
// at each pixel's offset from the anchor (tile_pixel): the rows variant where the pixels are 1 or 2
// apart (tile_step; the step-2 variant for stride 2: 1.06-1.08x on the 3-D stride-2 layer, both
// dtypes), the pixels variant for tiles that wrap to the next output row. This is done where
// neighbouring pixels of a row read inputs 1 apart, or 2 apart with more than 2 taps along the
// row, so that the lines a tile reads serve several taps: with k = s = 2 (the adjoint of a k2s2
// up-convolution) every k reads two lines of its own, once per output-channel tile, and packing
// was 1.6x faster. Other tiles (padding, reflected edges, other strides) are packed, and so are
// all tiles of a one-tap phase (1x1 layers, k = s transposed phases): there every k of the
// micro-kernel would read another channel plane, another page (256 per tile for 256 channels),
// for each output-channel tile, where packing reads them once per block; measured at 2 threads,
// packing is 6-10 % faster on the 1x1 256->64 layer in float64 (equal in float32) and on the 3-D
// k2s2 up-convolution in both dtypes, while in-place reads are 12 % faster on ResNet's 3x3.
// row_step: the input step between neighbouring pixels of a row. reuse_patches: the scratch
// already holds this block's patches for all of K (K <= kc_max), from the previous fused phase.
template <typename T>
inline void ConvPlan<T>::Impl::gemm_block(const ConvProblem<T>& p, const PhaseShape& shape, const WorkItem& it, const T* wp, const T* xg,
                int64_t row_step, ThreadScratch<T>& s, T* C, bool reuse_patches) const {
  const int mr = tile_m, nr = tile_n;
  const int64_t T_ = shape.num_taps, cin = p.cin_per_group, cs = p.x_stride_c;
  const int64_t K = T_ * cin, mcount = it.m1 - it.m0, m_tiles = ceil_div(mcount, mr);
  const int64_t* xoff = s.x_offsets.get();
  int64_t* anchor = s.tile_anchor.data();
  int64_t* pixel = s.tile_pixel.data();
  int64_t* step = s.tile_step.data();
  T* A = s.a_panel.get();
  const T** rows = s.a_rows.data();
  const bool layer_in_place = reads_in_place(shape, row_step, cs, cin);
  if (K == 0) std::memset(C, 0, sizeof(T) * static_cast<size_t>(m_tiles * mr * ldc));
  if (!reuse_patches)
    for (int64_t mt = 0, last = -1; mt < m_tiles; ++mt) {
      const int64_t* o = xoff + mt * mr * T_;
      bool in_place = layer_in_place && (mt + 1) * mr <= mcount;
      for (int r = 0; r < mr && in_place; ++r)
        for (int64_t t = 0; t < T_ && in_place; ++t)
          in_place = o[r * T_ + t] != kOutside && o[r * T_ + t] - o[t] == o[r * T_] - o[0];
      const int64_t* oa = xoff + std::max<int64_t>(last, 0) * mr * T_;
      bool follows = in_place && last >= 0;
      for (int64_t t = 0; t < T_ && follows; ++t) follows = o[t] - oa[t] == o[0] - oa[0];
      anchor[mt] = !in_place ? -1 : follows ? last : mt;
      last = in_place ? anchor[mt] : -1;
      int64_t* px = pixel + mt * mr;
      const int64_t shift = follows ? o[0] - oa[0] : 0;
      for (int r = 0; r < mr && in_place; ++r) px[r] = shift + o[r * T_] - o[0];
      const int64_t st = in_place && mr > 1 ? px[1] - px[0] : 1;
      bool uniform = in_place && (st == 1 || st == 2);
      for (int r = 2; r < mr && uniform; ++r) uniform = px[r] == px[0] + r * st;
      step[mt] = uniform ? st : 0;
    }
  for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, K - k0);
    for (int64_t mt = 0; mt < m_tiles && !reuse_patches; ++mt) {
      if (anchor[mt] < 0)
        pack_input_patches(xg, cs, xoff, T_, mcount, mr, mt, k0, kc, s.tap_kind.data(), s.tap_base.data(),
                           s.tap_step.data(), A + mt * mr * kc);
      else if (anchor[mt] == mt) {
        const int64_t* o = xoff + mt * mr * T_;
        const T** r = rows + mt * kc_max;
        for (int64_t k = k0, ci = k0 / T_, t = k0 % T_; k < k0 + kc; ++k) {
          *r++ = xg + ci * cs + o[t];
          if (++t == T_) t = 0, ++ci;
        }
      }
    }
    for (int64_t nt = 0; nt < it.nt1 - it.nt0; ++nt) {
      const T* B = wp + (it.nt0 + nt) * K * nr + k0 * nr;
      for (int64_t mt = 0; mt < m_tiles; ++mt) {
        T* Ct = C + mt * mr * ldc + nt * nr;
        const int64_t* px = pixel + mt * mr;
        if (anchor[mt] < 0)
          uk.fn(kc, A + mt * mr * kc, B, Ct, ldc, k0 > 0);
        else if (step[mt] > 0)
          uk.fn_rows[step[mt] - 1](kc, rows + anchor[mt] * kc_max, px[0], B, Ct, ldc, k0 > 0);
        else
          uk.fn_pixels(kc, rows + anchor[mt] * kc_max, px, B, Ct, ldc, k0 > 0);
      }
    }
  }
}

// One item of the pixel-lanes GEMM: pixels [m0, m1) of one phase, all output channels of the
// group. Per K block, the pixels' patches are packed as B panels [kc][NR] (pack_input_patches,
// NR pixels per k) and every (pixel tile, channel tile) runs the GEMM micro-kernel with the
// weights' [K][MR] panels as A. A pixel tile whose NR pixels are consecutive in y is written
// straight into y (ldc = y's channel stride), then gets its bias added; other tiles (the block's
// last, partial one, or one that crosses a gap in y) go to C [channel][pixel] (pitch mc_max),
// copied to y with the bias along the pixels' runs. The copy of every output through C took 11 %
// of the 1x1 64 -> 256 layer. Each output is the same chain over k, in the same K blocks, as in
// the usual orientation, and the bias is added to the finished sum in both: bitwise identical.
//
// With the weights in place, the items of one pixel block differ only in their channel tiles;
// pixel_lanes_patches packs the block's panels once, for the whole K ([K block][tile][kc][NR]),
// and run_items passes them as `packed`.
template <typename T>
typename ConvPlan<T>::Impl::PixelBlock ConvPlan<T>::Impl::pixel_block(const ConvProblem<T>& p, const WorkItem& it,
                                                                      ThreadScratch<T>& s) const {
  const Phase& ph = phases[it.phase];
  const PhaseShape shape(ph);
  PixelBlock b;
  b.taps = shape.num_taps;
  b.mcount = it.m1 - it.m0;
  b.p_tiles = ceil_div(b.mcount, (int64_t)tile_m);
  b.xg = p.x + it.n * p.x_stride_n + it.g * p.cin_per_group * p.x_stride_c;
  block_offsets(p, ph, shape, it.m0, b.mcount, s.tap_base.data(), s.x_offsets.get(), s.y_offsets.get());
  // One tap and the block's pixels consecutive in x (a 1x1 stride-1 layer on a contiguous plane):
  // the whole tiles are packed channel by channel, each channel's run of the block read once,
  // front to back, into every tile's panel, instead of tile by tile (each tile reading 64 bytes
  // from every channel plane: more streams than the hardware prefetcher follows). The values
  // and their places in the panels are the same.
  const int64_t* xoff = s.x_offsets.get();
  bool consecutive = b.taps == 1 && b.mcount >= tile_m && xoff[0] != kOutside;
  for (int64_t m = 1; m < b.mcount && consecutive; ++m) consecutive = xoff[m] == xoff[0] + m;
  b.run_tiles = consecutive ? b.mcount / tile_m : 0;
  b.run_start = consecutive ? b.xg + xoff[0] : nullptr;
  return b;
}

// The B panels of K block [k0, k0 + kc) of every tile of the block: panel + (tile * kc + kk) * NR.
template <typename T>
void ConvPlan<T>::Impl::pack_pixel_panels(const ConvProblem<T>& p, const PixelBlock& b, ThreadScratch<T>& s,
                                          int64_t k0, int64_t kc, T* panel) const {
  constexpr int64_t kPrefetchChannels = 8;
  const int nr = tile_m;
  if (b.run_tiles > 0)
    for (int64_t kk = 0; kk < kc; ++kk) {
      const T* __restrict src = b.run_start + (k0 + kk) * p.x_stride_c;
      if (kk + kPrefetchChannels < kc)
        for (int64_t e = 0; e < b.run_tiles * nr; e += 64 / (int64_t)sizeof(T))
          __builtin_prefetch(src + kPrefetchChannels * p.x_stride_c + e);
      for (int64_t pt = 0; pt < b.run_tiles; ++pt) {
        T* __restrict dst = panel + (pt * kc + kk) * nr;
        for (int r = 0; r < nr; ++r) dst[r] = src[pt * nr + r];  // inline: a memcpy call per 64 bytes cost more
      }
    }
  // Several taps: k by k across the tiles (pack_tiles_by_k; the k2s2 grad_inputs 1.07-1.11x in
  // 2-D, 1.07 / 1.17x in 3-D, float64 / float32, p25, one process alternating). One tap (the 1x1 stride-2 forward) measured
  // 0.93-0.96x that way, so those keep tile by tile.
  if (b.taps > 1)
    pack_patches_by_k(b.xg, p.x_stride_c, s.x_offsets.get(), b.taps, b.mcount, nr, b.run_tiles, b.p_tiles, k0, kc,
                      s.tap_kind.data(), s.tap_base.data(), s.tap_step.data(), panel);
  else
    for (int64_t pt = b.run_tiles; pt < b.p_tiles; ++pt)
      pack_input_patches(b.xg, p.x_stride_c, s.x_offsets.get(), b.taps, b.mcount, nr, pt, k0, kc, s.tap_kind.data(),
                         s.tap_base.data(), s.tap_step.data(), panel + pt * nr * kc);
}

// Weights in place: the items of a pixel block (consecutive in the list) differ only in their
// channel tiles, and each would pack the block's patches; they are packed once per call, in
// parallel over blocks of K, as [block][K block][tile][kc][NR], where that is at most the size of
// the weights (which this path does not pack) and a block has several items. Returns the buffer
// (null where not packed) and each item's offset into it. 8 x 512 -> 512 3x3 on 4x4, float32, four
// items per block at 2 threads: 3.94 -> 3.40 ms; 1 x 512 on 7x7 2.54 -> 1.67.
template <typename T>
std::unique_ptr<AlignedBuffer<T>> ConvPlan<T>::Impl::pixel_lanes_patches(
    const ConvProblem<T>& p, const std::vector<WorkItem>& items, std::vector<std::unique_ptr<ThreadScratch<T>>>& scratch,
    int64_t nt_block, std::vector<int64_t>& offset) const {
  const int64_t K = checked_mul(PhaseShape(phases[0]).num_taps, p.cin_per_group);  // (one phase)
  const int64_t block_size = checked_mul(ceil_div(mc_max, (int64_t)tile_m) * tile_m, K);
  std::vector<int64_t> first_item;  // per block
  offset.assign(items.size(), 0);
  for (size_t i = 0; i < items.size() && K > 0; ++i) {
    if (items[i].nt0 == 0) first_item.push_back(static_cast<int64_t>(i));
    offset[i] = (static_cast<int64_t>(first_item.size()) - 1) * block_size;
  }
  const int64_t blocks = static_cast<int64_t>(first_item.size());
  if (blocks == 0 || n_tiles <= nt_block ||
      checked_mul(blocks, block_size) > checked_mul(checked_mul(p.groups, n_tiles * tile_n), K))
    return nullptr;
  const int nthreads = static_cast<int>(scratch.size());
  const int64_t k_blocks = ceil_div(K, kc_max);
  const int64_t parts = std::clamp<int64_t>(ceil_div(2 * (int64_t)nthreads, blocks), 1, k_blocks);
  std::unique_ptr<AlignedBuffer<T>> patches(new AlignedBuffer<T>(checked_mul(blocks, block_size)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t job = 0; job < blocks * parts; ++job) {
    ThreadScratch<T>& s = *scratch[omp_get_thread_num()];
    const int64_t b = job / parts, part = job % parts;
    const PixelBlock pixels = pixel_block(p, items[first_item[b]], s);
    for (int64_t kb = part * k_blocks / parts; kb < (part + 1) * k_blocks / parts; ++kb) {
      const int64_t k0 = kb * kc_max;
      pack_pixel_panels(p, pixels, s, k0, std::min(kc_max, K - k0),
                        patches->get() + b * block_size + k0 * pixels.p_tiles * tile_m);
    }
  }
  return patches;
}

template <typename T>
inline void ConvPlan<T>::Impl::pixel_lanes_item(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s,
                                                const T* packed) const {
  const Phase& ph = phases[it.phase];
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group;
  const PixelBlock blk = pixel_block(p, it, s);
  const int64_t T_ = blk.taps, K = T_ * cin, mcount = blk.mcount, p_tiles = blk.p_tiles;
  const int nr = tile_m, mr = tile_n;
  const T* wp = weights_in_place ? nullptr : wpack->get() + wpack_offset[it.g * (int64_t)phases.size() + it.phase];
  // In place: row k = (ci, tap) of the group's weights, and per channel tile the MR channels'
  // offsets (the last tile's missing channels repeat the last one; their rows are never stored).
  std::vector<int64_t> w_row, w_channel;
  std::vector<const T*> w_rows;
  if (weights_in_place) {
    const std::vector<int64_t> tap_offset = weight_tap_offsets(p, ph);
    for (int64_t ci = 0; ci < cin; ++ci)
      for (const int64_t offset : tap_offset) w_row.push_back(ci * p.w_stride_ci + offset);
    for (int64_t co = 0; co < n_tiles * mr; ++co) w_channel.push_back(std::min(co, cout - 1) * p.w_stride_co);
    w_rows.resize(static_cast<size_t>(kc_max));
  }
  const T* wg_in_place = p.w + it.g * p.w_stride_g;
  const int64_t* yoff = s.y_offsets.get();
  T* C = s.c_block.get();
  T* yg = p.y + it.n * p.y_stride_n + it.g * cout * p.y_stride_c;
  const T* bg = p.bias ? p.bias + it.g * cout * p.bias_stride : nullptr;
  // The channel tiles cover n_tiles * mr >= cout rows: the whole ones (all but a partial last)
  // of a pixel tile in y go straight into y, the partial one through C (cout 32 with 12-channel
  // tiles: 1-D 1x1 32 -> 32 on 16000 samples, 1 thread, 0.72 -> 0.69 ms, one run each, noisy host).
  const int64_t y_tiles = weights_in_place ? 0 : cout / mr;
  // Tiles in y get the bias from the micro-kernel with their last K block, from the group's bias
  // made contiguous (adding it afterwards read y back; 1x1 256->64: 1.04-1.2x float32 at 2
  // threads on a noisy host, level at 1 thread).
  T* bias_rows = bg && y_tiles > 0 ? s.row_bias.get() : nullptr;
  if (bias_rows)
    for (int64_t co = 0; co < cout; ++co) bias_rows[co] = bg[co * p.bias_stride];
  char* in_y = s.tile_in_y.data();  // per tile: its NR pixels all exist and are consecutive in y
  for (int64_t pt = 0; pt < p_tiles; ++pt) {
    const int64_t r0 = pt * nr;
    bool consecutive = K > 0 && y_tiles > 0 && r0 + nr <= mcount;
    for (int64_t r = 1; r < nr && consecutive; ++r) consecutive = yoff[r0 + r] == yoff[r0] + r;
    in_y[pt] = consecutive;
  }
  if (K == 0) std::memset(C, 0, sizeof(T) * static_cast<size_t>(n_tiles * mr * mc_max));
  for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, K - k0);
    T* panel = s.a_panel.get();
    if (packed)
      panel = const_cast<T*>(packed) + k0 * p_tiles * nr;  // (only read)
    else
      pack_pixel_panels(p, blk, s, k0, kc, panel);
    // While the tiles compute, the next block's channel runs (the same pixels' successors in x,
    // most likely the next item's) are prefetched, a share per tile, so that its packing does not
    // wait on memory.
    const int64_t next_lines = !packed && blk.run_tiles > 0 && it.m1 + mcount <= PhaseShape(ph).num_pixels
                                   ? ceil_div(mcount * (int64_t)sizeof(T), 64) : 0;
    const int64_t share = ceil_div(kc * next_lines, p_tiles);
    for (int64_t pt = 0; pt < p_tiles; ++pt) {
      for (int64_t q = pt * share; q < std::min(kc * next_lines, (pt + 1) * share); ++q)
        __builtin_prefetch(blk.run_start + mcount + (k0 + q / next_lines) * p.x_stride_c + (q % next_lines) * (64 / (int64_t)sizeof(T)), 0, 1);
      T* c_tile = in_y[pt] ? yg + yoff[pt * nr] : C + pt * nr;
      const int64_t ldc_ = in_y[pt] ? p.y_stride_c : mc_max;
      if (weights_in_place) {  // never in y (y_tiles = 0)
        for (int64_t kk = 0; kk < kc; ++kk) w_rows[kk] = wg_in_place + w_row[k0 + kk];
        for (int64_t ct = it.nt0; ct < it.nt1; ++ct)
          uk.fn_pixels(kc, w_rows.data(), w_channel.data() + ct * mr, panel + pt * nr * kc, c_tile + ct * mr * ldc_,
                       ldc_, k0 > 0);
        continue;
      }
      for (int64_t ct = 0; ct < n_tiles; ++ct) {
        const bool to_y = in_y[pt] && ct < y_tiles;
        T* tile = to_y ? c_tile + ct * mr * ldc_ : C + pt * nr + ct * mr * mc_max;
        if (to_y && bias_rows && k0 + kc == K)
          uk.fn_row_bias(kc, wp + ct * K * mr + k0 * mr, panel + pt * nr * kc, tile, ldc_, k0 > 0, bias_rows + ct * mr);
        else
          uk.fn(kc, wp + ct * K * mr + k0 * mr, panel + pt * nr * kc, tile, to_y ? ldc_ : mc_max, k0 > 0);
      }
    }
  }
  // The rest of y: each tile's bias, or its runs of pixels contiguous in y copied from C.
  for (int64_t pt = 0; pt < p_tiles; ++pt) {
    const int64_t tile_end = std::min(mcount, (pt + 1) * nr);
    // Tiles in y: their whole channel tiles are complete, bias included; the partial one is in C.
    const int64_t co_begin = in_y[pt] ? y_tiles * mr : it.nt0 * mr;
    if (co_begin >= std::min(cout, it.nt1 * mr)) continue;
    for (int64_t r0 = pt * nr; r0 < tile_end;) {
      int64_t r1 = r0 + 1;
      while (r1 < tile_end && yoff[r1] == yoff[r0] + (r1 - r0)) ++r1;
      for (int64_t co = co_begin; co < std::min(cout, it.nt1 * mr); ++co) {  // the item's channel tiles
        const T b = bg ? bg[co * p.bias_stride] : T(0);
        const T* __restrict src = C + co * mc_max + r0;
        T* __restrict dst = yg + co * p.y_stride_c + yoff[r0];
        for (int64_t q = 0; q < r1 - r0; ++q) dst[q] = src[q] + b;
      }
      r0 = r1;
    }
  }
}

template <typename T>
void ConvPlan<T>::Impl::run_item(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s,
                                 const T* packed) const {
  // Layers with one channel tile never write y directly (see direct_tile), and their loops are
  // compiled without that code: with it, the depthwise layers measured 0.94x in float32 and the
  // grouped 4 -> 4 layer 0.91x in float64.
  if (plane_mode) return n_tiles > 1 ? direct_planes<true>(p, it, s) : direct_planes<false>(p, it, s);
  if (direct) return n_tiles > 1 ? direct_rows<true>(p, it, s) : direct_rows<false>(p, it, s);
  if (pixel_lanes) return pixel_lanes_item(p, it, s, packed);
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group, mcount = it.m1 - it.m0;
  const T* xg = p.x + it.n * p.x_stride_n + it.g * cin * p.x_stride_c;
  int64_t* yoff = s.y_offsets.get();
  // The item's phases (fused: all of them, on the same pixels) and where each one's outputs lie
  // relative to the first's.
  const int64_t first = fuse_phases ? 0 : it.phase, count = fuse_phases ? (int64_t)phases.size() : 1;
  const int64_t c_size = mc_max * ldc;
  int64_t delta[kMaxFusedPhases];
  for (int64_t q = 0; q < count; ++q) {
    const Phase& ph = phases[first + q];
    const PhaseShape shape(ph);
    delta[q] = 0;
    for (int a = 0; a < kSpatialRank; ++a) delta[q] += (ph[a]->out_start - phases[first][a]->out_start) * p.y_stride[a];
    const T* wp = wpack->get() + wpack_offset[it.g * (int64_t)phases.size() + first + q];
    const bool reuse = q > 0 && phases_share_patches && shape.num_taps * cin <= kc_max;
    // A single-phase plan puts each block's edge pixels last (block_offsets), so that its interior
    // tiles are all read in place. With several phases the order stays row-major: fused phases
    // share C's pixel rows, and for them edges last (over the union of their edges) measured level.
    const int64_t row_step = ph[2]->in_step * p.x_stride[2];
    const bool edges_last = phases.size() == 1 && reads_in_place(shape, row_step, p.x_stride_c, cin);
    if (!reuse)
      block_offsets(p, ph, shape, it.m0, mcount, s.tap_base.data(), s.x_offsets.get(), q == 0 ? yoff : nullptr,
                    edges_last);
    gemm_block(p, shape, it, wp, xg, row_step, s, s.c_block.get() + q * c_size, reuse);
  }
  // Scatter the blocks to y, adding the bias; the phases of one pixel are written together. C is
  // pixel-major and y channel-major: walking blocks of 16 pixels keeps the C lines being read
  // (one per pixel and phase) in L1 across consecutive channels, where a whole column per channel
  // fetched every C element from L2 (a third of the time of short-K layers such as k2s2 up-convs).
  // Runs of L pixels contiguous in y (channels-first rows) go through the micro-kernel table's
  // SIMD transposing store, L channels at a time; channels-last y takes C's rows as they are.
  constexpr int64_t kPixelBlock = 16;
  const T* C = s.c_block.get();
  T* yn = p.y + it.n * p.y_stride_n;
  const int64_t co_begin = it.nt0 * tile_n, co_end = std::min(it.nt1 * tile_n, cout);
  T* yg = yn + it.g * cout * p.y_stride_c;
  const T* bg = p.bias ? p.bias + it.g * cout * p.bias_stride : nullptr;
  const int64_t bias_stride = p.bias_stride, ysc = p.y_stride_c, ldc_ = ldc;
  auto bias_of = [bg, bias_stride](int64_t co) { return bg ? bg[co * bias_stride] : T(0); };
  // Channels [c0, c1) of pixels [m0, m1), one scalar at a time.
  auto scatter = [=](int64_t c0, int64_t c1, int64_t m0, int64_t m1) {
    for (int64_t co = c0; co < c1; ++co) {
      const T b = bias_of(co);
      T* yc = yg + co * ysc;
      const T* ccol = C + (co - co_begin);
      for (int64_t q = 0; q < count; ++q)
        for (int64_t mi = m0; mi < m1; ++mi) yc[yoff[mi] + delta[q]] = ccol[q * c_size + mi * ldc_] + b;
    }
  };
  if (p.y_stride_c == 1) {  // channels-last: a pixel's channels are contiguous in C and in y
    for (int64_t q = 0; q < count; ++q)
      for (int64_t mi = 0; mi < mcount; ++mi) {
        T* yp = yg + yoff[mi] + delta[q];
        const T* cp = C + q * c_size + mi * ldc - co_begin;
        for (int64_t co = co_begin; co < co_end; ++co) yp[co] = cp[co] + bias_of(co);
      }
    return;
  }
  const int L = uk.lanes;
  // Vector stores take runs of L pixels: at unit output step, L contiguous outputs per channel
  // (store_transposed); for paired phases, outputs 2 apart in one row, both phases of each pair
  // zipped into 2L contiguous outputs (store_transposed_pair). Consecutive pixels of a phase are
  // otherwise not adjacent in y (the stride phases of a transposed convolution interleave).
  const bool paired = !row_pairs.empty() && count == (int64_t)phases.size() && uk.store_transposed_pair &&
                      p.y_stride[2] == 1;
  const bool rows_contiguous = p.y_stride[2] * phases[first][2]->out_step == 1;
  const int64_t co_vec_end =
      paired || (uk.store_transposed && rows_contiguous) ? co_begin + (co_end - co_begin) / L * L : co_begin;
  if (co_vec_end == co_begin) {
    for (int64_t m0 = 0; m0 < mcount; m0 += kPixelBlock)
      scatter(co_begin, co_end, m0, std::min(mcount, m0 + kPixelBlock));
    return;
  }
  const int64_t run_step = paired ? 2 : 1;
  // Greedy runs: a pixel that does not start a run (a row's end) is stored alone, and the next
  // run starts after it, so rows shorter than a block still vectorise. A shorter run of a single
  // phase (2 to L - 1 pixels: the pieces of rows between the edge pixels that block_offsets puts
  // last) is transposed whole into a scratch block, of which its pixels are copied.
  T bias_block[64 / sizeof(T)], partial[(64 / sizeof(T)) * (64 / sizeof(T))];
  for (int64_t mv = 0; mv < mcount;) {
    int64_t n = 1;
    while (n < L && mv + n < mcount && yoff[mv + n] == yoff[mv] + run_step * n) ++n;
    if (n < L) {
      if (n >= 2 && count == 1 && mv + L <= mc_max) {  // (one phase: never paired)
        for (int64_t co = co_begin; co < co_vec_end; co += L) {
          for (int j = 0; j < L; ++j) bias_block[j] = bias_of(co + j);
          uk.store_transposed(C + mv * ldc + (co - co_begin), ldc, bias_block, partial, L);
          for (int j = 0; j < L; ++j) std::memcpy(yg + (co + j) * ysc + yoff[mv], partial + j * L, sizeof(T) * n);
        }
        scatter(co_vec_end, co_end, mv, mv + n);
      } else {
        scatter(co_begin, co_end, mv, mv + n);
      }
      mv += n;
      continue;
    }
    for (int64_t co = co_begin; co < co_vec_end; co += L) {
      for (int j = 0; j < L; ++j) bias_block[j] = bias_of(co + j);
      T* y0 = yg + co * ysc + yoff[mv];
      const T* c0 = C + mv * ldc + (co - co_begin);
      if (paired)
        for (const auto& [a, b] : row_pairs)
          uk.store_transposed_pair(c0 + a * c_size, c0 + b * c_size, ldc, bias_block, y0 + delta[a], ysc);
      else
        for (int64_t q = 0; q < count; ++q) uk.store_transposed(c0 + q * c_size, ldc, bias_block, y0 + delta[q], ysc);
    }
    scatter(co_vec_end, co_end, mv, mv + L);
    mv += L;
  }
}

template void ConvPlan<float>::Impl::run_item(const ConvProblem<float>& p, const WorkItem& it, ThreadScratch<float>& s,
                                                     const float* packed) const;
template ConvPlan<float>::Impl::PixelBlock ConvPlan<float>::Impl::pixel_block(const ConvProblem<float>&, const WorkItem&,
                                                                          ThreadScratch<float>&) const;
template void ConvPlan<float>::Impl::pack_pixel_panels(const ConvProblem<float>&, const PixelBlock&, ThreadScratch<float>&, int64_t,
                                                       int64_t, float*) const;
template std::unique_ptr<AlignedBuffer<float>> ConvPlan<float>::Impl::pixel_lanes_patches(
    const ConvProblem<float>&, const std::vector<WorkItem>&, std::vector<std::unique_ptr<ThreadScratch<float>>>&, int64_t,
    std::vector<int64_t>&) const;
template void ConvPlan<double>::Impl::run_item(const ConvProblem<double>& p, const WorkItem& it, ThreadScratch<double>& s,
                                                     const double* packed) const;
template ConvPlan<double>::Impl::PixelBlock ConvPlan<double>::Impl::pixel_block(const ConvProblem<double>&, const WorkItem&,
                                                                          ThreadScratch<double>&) const;
template void ConvPlan<double>::Impl::pack_pixel_panels(const ConvProblem<double>&, const PixelBlock&, ThreadScratch<double>&, int64_t,
                                                       int64_t, double*) const;
template std::unique_ptr<AlignedBuffer<double>> ConvPlan<double>::Impl::pixel_lanes_patches(
    const ConvProblem<double>&, const std::vector<WorkItem>&, std::vector<std::unique_ptr<ThreadScratch<double>>>&, int64_t,
    std::vector<int64_t>&) const;


// ---- The entry -----------------------------------------------------------------------------------

// The GEMM runs every problem: the choice's last resort. Its orientation (gather, or pixel lanes
// with the weights packed or read in place) is chosen below.
namespace engine {
namespace gemm {

constexpr double kRank = 5.0;  // its place in the table (registry.cpp)

template <typename T>
bool applies(Choice<T>&) {
  return true;
}

template <typename T>
double cost(Choice<T>& c) {
  return c.take(c.forced_is("gemm") ? "forced" : "runs everything", kRank);
}

template <typename T>
bool create(Choice<T>& c) {
  typename ConvPlan<T>::Impl& plan = c.plan;
  const ConvProblem<T>& p = c.p;
  const UkernelInfo<T>& uk = plan.uk;
  plan.direct_variant = ConvPlan<T>::Impl::direct_variant_for(p.cout_per_group);
  plan.pixel_lanes = plan.choose_pixel_lanes(p);
  plan.weights_in_place = plan.choose_weights_in_place(p, plan.pixel_lanes);
  plan.pixel_lanes = plan.pixel_lanes || plan.weights_in_place;
  const int tile_m = plan.tile_m = plan.pixel_lanes ? uk.nr : uk.mr;
  plan.tile_n = plan.pixel_lanes ? uk.mr : uk.nr;
  if (tile_m != 4 && tile_m != 6 && tile_m != 8 && tile_m != 12 && tile_m != 16 && tile_m != 32)
    throw std::logic_error("convfast: no input packing routine for micro-kernel height " + std::to_string(tile_m));
  // Cache blocking: a KC x NR panel of B stays in L1 (~16 KiB) while MC x KC of A streams from L2.
  // (Both orientations take the same KC, so that their K blocks and results are identical.)
  plan.kc_max = std::max<int64_t>(64, std::min<int64_t>(512, 16384 / (uk.nr * (int64_t)sizeof(T))));
  plan.mc_max = std::max<int64_t>(tile_m, (131072 / (plan.kc_max * (int64_t)sizeof(T))) / tile_m * tile_m);
  plan.plan_blocks(p);
  return true;
}

template <typename T>
std::string describe(const typename ConvPlan<T>::Impl& plan) {
  return plan.describe_blocks(plan.weights_in_place ? "pixel_lanes_gemm_in_place"
                              : plan.pixel_lanes    ? "pixel_lanes_gemm"
                                                    : "gather_gemm");
}

}  // namespace gemm

template <typename T>
const Algorithm<T>& gemm_algorithm() {
  static const Algorithm<T> entry = {"gemm", gemm::kRank,
      gemm::applies<T>, gemm::cost<T>,
      gemm::create<T>, execute_items<T>, gemm::describe<T>};
  return entry;
}
template const Algorithm<float>& gemm_algorithm<float>();
template const Algorithm<double>& gemm_algorithm<double>();
}  // namespace engine

// Pixels in the vector lanes: single-phase layers with channels-first outputs whose every tile
// gemm_block would pack (one-tap layers, strided layers not read in place). There the
// usual orientation (pixels broadcast, channels in the lanes) spends its time outside the
// micro-kernel: packing six pixels per k and transposing C into y's channel-major rows; swapped,
// a k of the panel is NR pixels (a row's contiguous run, one copy) and C's rows are y's rows.
// CONVFAST_PIXEL_LANES=0|1 excludes or forces it (tests use it).
template <typename T>
bool ConvPlan<T>::Impl::choose_pixel_lanes(const ConvProblem<T>& p) const {
  const char* forced = std::getenv("CONVFAST_PIXEL_LANES");
  if (forced && std::strcmp(forced, "0") == 0) return false;
  if (forced && std::strcmp(forced, "1") == 0) return true;
  if (phases.size() != 1 || p.y_stride_c == 1 || p.y_stride[2] * phases[0][2]->out_step != 1) return false;
  // Where gemm_block reads no tile in place and packs them all anyway: one tap (gemm_block packs
  // one-tap phases), or a step along the row it does not read in place (stride 3 and more; the
  // k2s2 convolution, the grad_input of k2s2 up-convolutions: 1.05-1.2x measured).
  if (max_taps == 1) return !gather_tiles_fit_better(p);
  return !steps_in_place(phases[0][2]->in_step * p.x_stride[2], (int64_t)phases[0][2]->taps.size());
}

// One-tap layers on small maps whose tiles the usual orientation (MR pixels, NR channels) fills
// better than the pixel lanes (NR pixels, MR channels) by at least 5 %: there the tiles' waste
// outweighs the transposes of C. Float32, AVX-512 (MR 12, NR 32), 1 thread, kept plans, min of
// interleaved runs, gather / pixel lanes: 1 x 960 -> 160 on 7x7 0.85, 2 x 960 -> 160 0.78, 8 x
// 960 -> 160 0.86, 1 x 576 -> 96 on 14x14 0.91, 1 x 1024 -> 256 on 14x14 0.88, 1 x 2048 -> 512 on
// 7x7 0.93, 1 x 384 -> 64 on 28x28 0.91, 8 x 192 -> 32 on 28x28 0.89; kept pixel lanes: 1 x 32 ->
// 192 on 28x28 (gather 1.14), 8 x 256 -> 64 on 56x56 (1.13, a large map), 1 x 144 -> 24 on 56x56
// (1.17), 8 x 576 -> 96 on 14x14 and 8 x 1024 -> 256 (1.0, equal fill). The tiles' fill counts
// the pixels of the phase, where the images of a 1x1 layer on small maps fold in (8 x 28x28).
template <typename T>
bool ConvPlan<T>::Impl::gather_tiles_fit_better(const ConvProblem<T>& p) const {
  constexpr int64_t kSmallMap = 1024;  // output pixels per plane (a 32x32 map)
  if (p.out_size[1] * p.out_size[2] > kSmallMap) return false;
  const int64_t pixels = PhaseShape(phases[0]).num_pixels, cout = p.cout_per_group;
  auto filled = [](int64_t n, int64_t tile) { return double(n) / double(ceil_div(n, tile) * tile); };
  return filled(pixels, uk.mr) * filled(cout, uk.nr) >= 1.05 * filled(pixels, uk.nr) * filled(cout, uk.mr);
}

// The weights read in place: one phase (forward or transposed), y channels-first with contiguous
// rows (the pixel-lanes store), few output pixels (at most kSmallM = 128 over the whole call, the batch
// included) and large weights, which a call would otherwise pack (read and write) before reading
// them once more for so few pixels: from 1 MiB (see `large` below). 2 threads, float32, p25 against
// the packed GEMM (noisy host, several runs): 512 -> 2048 1x1 on 7x7 1.36-1.52x, 320 -> 1280
// 1.37-1.46x, 512 3x3 on 4x4 0.98-1.8x, on 7x7 0.98-1.22x, DCGAN's 100 -> 512 k4 on 1x1
// 1.12-1.22x; 1 thread, AVX-512, min of interleaved runs: 8 x 512 3x3 on 4x4 (128 pixels) 1.17x,
// 6 x 512 on 4x4 (96) 1.13x, 2 x 512 on 7x7 (98) 0.90-0.98x. CONVFAST_WEIGHTS_IN_PLACE=1 takes it
// wherever it can run, =0 never (tests); CONVFAST_PIXEL_LANES=0 or a forced CONVFAST_ALGO keeps the
// packed GEMM.
template <typename T>
bool ConvPlan<T>::Impl::choose_weights_in_place(const ConvProblem<T>& p, bool packed_pixel_lanes) const {
  constexpr int64_t kSmallM = 128;
  if (phases.size() != 1 || p.y_stride_c == 1 || uk.fn_pixels == nullptr ||
      p.y_stride[2] * phases[0][2]->out_step != 1)
    return false;
  if (const char* forced = std::getenv("CONVFAST_WEIGHTS_IN_PLACE")) {
    if (*forced) return std::strcmp(forced, "1") == 0;
  }
  if (const char* lanes = std::getenv("CONVFAST_PIXEL_LANES")) {
    if (std::strcmp(lanes, "0") == 0) return false;  // no pixel-lanes orientation at all
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
  // From 1 MiB in either orientation since the patches are packed once per call
  // (pixel_lanes_patches): against the gather GEMM, 2 threads, float32, min of interleaved runs:
  // 1 x 192 3x3 on 7x7 (1.3 MiB) 1.10x, 1 x 256 on 7x7 1.37x, 4 x 128 -> 256 s2 on 7x7 1.32x,
  // 4 x 256 -> 256 s2 1.34x, 8 x 256 -> 512 s2 1.15-1.19x, 1 x 384 on 7x7 1.18x.
  const int64_t large = int64_t(1) << 20;
  // Past 64 pixels only whole-ish pixel tiles (the last at least half full): the in-place kernel's
  // tiles are NR pixels, and a nearly empty last tile costs a whole pass over the weights.
  const int64_t tail = pixels % uk.nr;
  const bool tiles_full = pixels <= 64 || tail == 0 || 2 * tail >= uk.nr;
  return pixels <= kSmallM && tiles_full && weight_bytes >= large;
}

template bool ConvPlan<float>::Impl::choose_pixel_lanes(const ConvProblem<float>& p) const;
template bool ConvPlan<double>::Impl::choose_pixel_lanes(const ConvProblem<double>& p) const;
template bool ConvPlan<float>::Impl::choose_weights_in_place(const ConvProblem<float>& p, bool) const;
template bool ConvPlan<double>::Impl::choose_weights_in_place(const ConvProblem<double>& p, bool) const;

}  // namespace convfast
