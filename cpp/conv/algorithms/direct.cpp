// The direct algorithm: output channels broadcast, pixels in the vector lanes, inputs copied into
// row buffers (rows) or 2-D slabs (planes, for short rows); chosen in registry.cpp.
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

// Direct path, one output row (all axes but the last fixed) at a time. The inputs each
// (outer tap, input channel) reads along the last axis are first copied into row buffers laid
// out by RowBufferPlan -- so every tap of every pixel tile reads PW contiguous values, whatever
// the stride, padding mode or input layout -- and one source pointer per (tap, input channel)
// serves all tiles of the row.
template <typename T>
template <bool kToY>
void ConvPlan<T>::Impl::direct_rows(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s) const {
  const Phase& ph = phases[it.phase];
  const PhaseShape shape(ph);
  const AxisPlan &a0 = *ph[0], &a1 = *ph[1], &a2 = *ph[2];
  const RowBufferPlan& rb = row_plans[ph[2] - axes[2].data()];
  const int64_t T0 = shape.taps[0], T1 = shape.taps[1], T2 = shape.taps[2];
  const int64_t cin = p.cin_per_group, cs = p.x_stride_c, xs2 = p.x_stride[2];
  const int64_t K = shape.num_taps * cin, cnt1 = shape.count[1], cnt2 = shape.count[2];
  const int64_t n_slots = (int64_t)rb.residue.size(), L = rb.length;
  const int pw = tile_m;
  const bool y_unit = p.y_stride[2] == 1 && a2.out_step == 1;
  const T* wp = wpack->get() + wpack_offset[it.g * (int64_t)phases.size() + it.phase];
  const T* xg = p.x + it.n * p.x_stride_n + it.g * cin * cs;
  const T** rows = s.src_rows.data();
  T* buffers = s.row_buffers.get();
  const T* zeros = zero_row->get();
  // Input rows are cached across output rows (a 3x3 stride-1 layer reads each input row for
  // three output rows): entries are keyed by (i0, i1); an entry used by the current output row is
  // never evicted, and there are twice as many entries as one row needs.
  const int64_t entries = cache_entries(T0, T1), entry_size = cin * n_slots * L;
  int64_t* key0 = s.cache_key0.data();
  int64_t* key1 = s.cache_key1.data();
  int64_t* stamp = s.cache_stamp.data();
  std::fill(stamp, stamp + entries, int64_t(-1));
  for (int64_t row = it.m0; row < it.m1; ++row) {
    const int64_t j0 = row / cnt1, j1 = row % cnt1;
    const int64_t taps = shape.num_taps;
    for (int64_t t0 = 0; t0 < T0; ++t0) {
      const int64_t i0 = a0.index(j0, t0);
      for (int64_t t1 = 0; t1 < T1; ++t1) {
        const int64_t i1 = a1.index(j1, t1);
        const bool outer_zero = i0 < 0 || i1 < 0;
        T* slab = nullptr;
        if (!outer_zero) {
          int64_t hit = -1, victim = -1;
          for (int64_t e = 0; e < entries && hit < 0; ++e) {
            if (stamp[e] >= 0 && key0[e] == i0 && key1[e] == i1) hit = e;
            else if (stamp[e] < row && (victim < 0 || stamp[e] < stamp[victim])) victim = e;
          }
          const int64_t e = hit >= 0 ? hit : victim;
          slab = buffers + e * entry_size;
          if (hit < 0) {
            key0[e] = i0;
            key1[e] = i1;
            for (int64_t ci = 0; ci < cin; ++ci) {
              const T* x_row = xg + ci * cs + i0 * p.x_stride[0] + i1 * p.x_stride[1];
              for (int64_t sl = 0; sl < n_slots; ++sl)
                fill_row_buffer(rb, sl, x_row, xs2, slab + (ci * n_slots + sl) * L);
            }
          }
          stamp[e] = row;
        }
        for (int64_t ci = 0; ci < cin; ++ci) {
          // k = ci * taps + t, t = (t0 * T1 + t1) * T2 + t2: the weight panels' order.
          const T** r = rows + ci * taps + (t0 * T1 + t1) * T2;
          for (int64_t t2 = 0; t2 < T2; ++t2)
            r[t2] = (outer_zero ? zeros : slab + (ci * n_slots + rb.slot[t2]) * L) + rb.shift[t2];
        }
      }
    }
    T* y_row = p.y + it.n * p.y_stride_n + (a0.out_start + j0 * a0.out_step) * p.y_stride[0] +
               (a1.out_start + j1 * a1.out_step) * p.y_stride[1];
    for (int64_t j2 = 0; j2 < cnt2; j2 += pw) {
      const int64_t npix = std::min<int64_t>(pw, cnt2 - j2);
      T* y_tile = kToY && y_unit && npix == pw ? y_row + it.g * p.cout_per_group * p.y_stride_c + a2.out_start + j2
                                               : nullptr;
      direct_tile(p, K, rows, j2, wp, it.g, s, y_tile, [&](const T* o, T b, int64_t cg) {
        T* yc = y_row + cg * p.y_stride_c;
        if (y_unit)
          store_with_bias(o, b, npix, yc + a2.out_start + j2);
        else
          for (int64_t q = 0; q < npix; ++q) yc[(a2.out_start + (j2 + q) * a2.out_step) * p.y_stride[2]] = o[q] + b;
      });
    }
  }
}

// Plane mode: item rows are (output plane j0, block of plane_rows output rows along axis 1). The
// slabs hold, per (axis-0 tap, input channel, axis-1 slot, axis-2 slot), the rows the block reads,
// each a full pitch P wide; output (j1, j2) of the block is flat pixel q = (j1 - first) * P + j2
// and reads slab + shift1[t1] * P + shift2[t2] at offset q for tap (t1, t2).
template <typename T>
template <bool kToY>
void ConvPlan<T>::Impl::direct_planes(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s) const {
  const Phase& ph = phases[it.phase];
  const PhaseShape shape(ph);
  const AxisPlan &a0 = *ph[0], &a1 = *ph[1], &a2 = *ph[2];
  const RowBufferPlan& cp = col_plans[ph[2] - axes[2].data()];
  const RowBufferPlan& lp = line_plans[ph[1] - axes[1].data()];
  const int64_t T0 = shape.taps[0], T1 = shape.taps[1], T2 = shape.taps[2], taps = shape.num_taps;
  const int64_t cin = p.cin_per_group, cs = p.x_stride_c, xs2 = p.x_stride[2];
  const int64_t K = taps * cin, cnt1 = shape.count[1], cnt2 = shape.count[2];
  const int64_t P = cp.length, S1 = (int64_t)lp.residue.size(), S2 = (int64_t)cp.residue.size();
  const int64_t span1 = lp.length - cnt1;
  const int pw = tile_m;
  const bool y_unit = p.y_stride[2] == 1 && a2.out_step == 1;
  const T* wp = wpack->get() + wpack_offset[it.g * (int64_t)phases.size() + it.phase];
  const T* xg = p.x + it.n * p.x_stride_n + it.g * cin * cs;
  const T** rows = s.src_rows.data();
  T* slabs = s.row_buffers.get();
  // A tile's lanes, split at the pitch into pieces of one output row each (lanes past the row's
  // last output are dropped). The split is found once per tile, not once per output channel.
  struct Piece {
    int64_t lane, y_offset, count;
  };
  Piece pieces[kMaxTilePixels];  // each piece holds at least one lane
  // Item rows run block-major (m = block * cnt0 + j0), so that consecutive rows are the same
  // block of consecutive output planes. The T0 slots of slabs hold input planes (i0; -1: a zero
  // plane) of the current block, kept from one output plane to the next: a plane read by several
  // taps of consecutive output planes is copied once per item, not once per tap (the 3-D 1 -> 32
  // grad_input's copies were a third of its time: 1.07-1.19x, medians of alternating processes).
  constexpr int64_t kNoPlane = INT64_MIN;
  std::vector<int64_t> slot_plane(static_cast<size_t>(T0), kNoPlane), slot_of(static_cast<size_t>(T0));
  std::vector<char> slot_used(static_cast<size_t>(T0));
  const int64_t cnt0 = shape.count[0];
  int64_t held_first = -1;  // the block whose planes the slots hold
  for (int64_t m = it.m0; m < it.m1; ++m) {
    const int64_t j0 = m % cnt0, first = (m / cnt0) * plane_rows;
    const int64_t rows_out = std::min(plane_rows, cnt1 - first), rows_in = rows_out + span1;
    const int64_t slab_size = rows_in * P;
    auto slab = [&](int64_t slot, int64_t ci, int64_t s1, int64_t s2) {
      return slabs + (((slot * cin + ci) * S1 + s1) * S2 + s2) * slab_size;
    };
    // Fill the slabs. Dropped lanes of the last tiles read up to (axis-2 span + pw - 1) entries past
    // a slab's end: into the next slab, or into P + pw zeroed entries after the last one.
    std::fill(slabs + T0 * cin * S1 * S2 * slab_size, slabs + T0 * cin * S1 * S2 * slab_size + P + pw, T(0));
    if (first != held_first) std::fill(slot_plane.begin(), slot_plane.end(), kNoPlane);  // slabs of another size
    held_first = first;
    std::fill(slot_used.begin(), slot_used.end(), char(0));
    for (int64_t t0 = 0; t0 < T0; ++t0) {  // the planes already held
      const int64_t i0 = std::max<int64_t>(a0.index(j0, t0), -1);
      slot_of[t0] = -1;
      for (int64_t sl = 0; sl < T0 && slot_of[t0] < 0; ++sl)
        if (slot_plane[sl] == i0) slot_of[t0] = sl, slot_used[sl] = 1;
    }
    for (int64_t t0 = 0; t0 < T0; ++t0) {
      const int64_t i0 = std::max<int64_t>(a0.index(j0, t0), -1);
      for (int64_t sl = 0; sl < T0 && slot_of[t0] < 0; ++sl)  // filled for an earlier tap just now
        if (slot_used[sl] && slot_plane[sl] == i0) slot_of[t0] = sl;
      if (slot_of[t0] >= 0) continue;
      int64_t free_slot = 0;
      while (slot_used[free_slot]) ++free_slot;  // at most T0 planes are in use: one is free
      slot_of[t0] = free_slot;
      slot_used[free_slot] = 1;
      slot_plane[free_slot] = i0;
      const int64_t slot = free_slot;
      for (int64_t ci = 0; ci < cin; ++ci)
        for (int64_t s1 = 0; s1 < S1; ++s1)
          for (int64_t u = 0; u < rows_in; ++u) {
            const int64_t i1 = lp.src_index[s1][first + u];
            const T* x_row = xg + ci * cs + i0 * p.x_stride[0] + i1 * p.x_stride[1];
            for (int64_t s2 = 0; s2 < S2; ++s2) {
              T* dst = slab(slot, ci, s1, s2) + u * P;
              if (i0 < 0 || i1 < 0)
                std::fill(dst, dst + P, T(0));
              else
                fill_row_buffer(cp, s2, x_row, xs2, dst);
            }
          }
    }
    // k = ci * taps + t, t = (t0 * T1 + t1) * T2 + t2: the weight panels' order.
    for (int64_t t0 = 0; t0 < T0; ++t0)
      for (int64_t ci = 0; ci < cin; ++ci)
        for (int64_t t1 = 0; t1 < T1; ++t1)
          for (int64_t t2 = 0; t2 < T2; ++t2)
            rows[ci * taps + (t0 * T1 + t1) * T2 + t2] =
                slab(slot_of[t0], ci, lp.slot[t1], cp.slot[t2]) + lp.shift[t1] * P + cp.shift[t2];
    T* y_plane = p.y + it.n * p.y_stride_n + (a0.out_start + j0 * a0.out_step) * p.y_stride[0];
    // Rows at least a tile wide are tiled row by row (the last tile of a row overlapping the one
    // before it: its lanes compute the same chains, so the outputs written twice are equal), so
    // that every tile is pw consecutive outputs of one row and goes straight into y; tiles
    // running on over the pitch split into pieces that went through the scratch tile, 24 % of
    // the 3-D 1 -> 32 layer (32-wide rows, pitch 34). Narrower rows share tiles.
    auto run_tile = [&](int64_t q0, int64_t npix) {
      int num_pieces = 0;
      for (int64_t lane = 0; lane < npix;) {
        const int64_t q = q0 + lane, j1 = q / P, j2 = q % P, run = std::min(npix - lane, P - j2);
        if (j2 < cnt2)
          pieces[num_pieces++] = {lane,
                                  (a1.out_start + (first + j1) * a1.out_step) * p.y_stride[1] +
                                      (a2.out_start + j2 * a2.out_step) * p.y_stride[2],
                                  std::min(run, cnt2 - j2)};
        lane += run;
      }
      const bool one_piece = kToY && y_unit && num_pieces == 1 && pieces[0].count == pw;
      T* y_tile = one_piece ? y_plane + it.g * p.cout_per_group * p.y_stride_c + pieces[0].y_offset : nullptr;
      direct_tile(p, K, rows, q0, wp, it.g, s, y_tile, [&](const T* o, T b, int64_t cg) {
        T* yc = y_plane + cg * p.y_stride_c;
        for (int i = 0; i < num_pieces; ++i) {
          const Piece& pc = pieces[i];
          if (y_unit)
            store_with_bias(o + pc.lane, b, pc.count, yc + pc.y_offset);
          else
            for (int64_t v = 0; v < pc.count; ++v)
              yc[pc.y_offset + v * a2.out_step * p.y_stride[2]] = o[pc.lane + v] + b;
        }
      });
    };
    if (cnt2 >= pw) {
      for (int64_t j1 = 0; j1 < rows_out; ++j1)
        for (int64_t j2 = 0; j2 < cnt2; j2 += pw) run_tile(j1 * P + std::min<int64_t>(j2, cnt2 - pw), pw);
    } else {
      for (int64_t q0 = 0, total = rows_out * P; q0 < total; q0 += pw) run_tile(q0, std::min<int64_t>(pw, total - q0));
    }
  }
}

// One pixel tile of the direct path, at offset of the K source rows: every output-channel tile of
// the group through the micro-kernel, then write(results, bias, channel) per output channel. With
// y_tile (the tile's first output in the group's first channel row: its pw outputs consecutive in
// y; callers pass one only from their <true> loops, which run with several channel tiles), whole
// channel tiles are written straight into y and then get their bias; the copy of every
// output through the scratch tile took 11 % of the 3-D 1 -> 32 layer (1.09-1.11x measured, the
// stem 1.03-1.06x, 3 -> 16 1.03-1.04x). Only with several channel tiles: with one (depthwise, the
// 4 -> 4 groups of the grouped layer), where a tile's kernel is short and its stores dominate, it
// measured 0.93-0.98x.
template <typename T>
template <typename Write>
inline void ConvPlan<T>::Impl::direct_tile(const ConvProblem<T>& p, int64_t K, const T* const* rows, int64_t offset, const T* wp, int64_t g,
                 ThreadScratch<T>& s, T* y_tile, Write&& write) const {
  const int pw = tile_m, mro = tile_n;
  const int64_t cout = p.cout_per_group;
  T* out = s.out_tile.get();
  // With several output-channel tiles the tile's inputs are read once per channel tile. When the
  // row buffers they come from are large (long 1-D rows: one buffer per input channel, each k on
  // another page), they are first copied into one sequential panel, which the hardware prefetcher
  // streams; compact buffers (plane mode, short 2-D rows) are read as they are, as the copy would
  // cost more than it saves. Measured (1 thread): the copy is 3-5 % faster on the 64-channel
  // 16000-sample 1-D layer (4 MiB of buffers), 5-12 % slower on the 3-D layers and the 7x7 stem
  // (at most 128 KiB).
  constexpr int64_t kCompactBufferBytes = 512 * 1024;
  const T* const* src = rows;
  if (n_tiles > 1 && row_buffer_size * (int64_t)sizeof(T) > kCompactBufferBytes) {
    T* panel = s.a_panel.get();
    for (int64_t kk = 0; kk < K; ++kk) std::memcpy(panel + kk * pw, rows[kk] + offset, sizeof(T) * pw);
    src = s.panel_rows.data();
    offset = 0;
  }
  for (int64_t nt = 0; nt < n_tiles; ++nt) {
    if (y_tile && K > 0 && (nt + 1) * mro <= cout) {
      // The bias goes into the kernel's store: adding it to y afterwards read y back, a pass over
      // the output that took ~10 % of the 3-D 1 -> 32 layer.
      T bias_tile[kMaxDirectChannels];
      if (p.bias)
        for (int r = 0; r < mro; ++r) bias_tile[r] = p.bias[(g * cout + nt * mro + r) * p.bias_stride];
      uk.direct[direct_variant](K, src, offset, wp + nt * K * mro, y_tile + nt * mro * p.y_stride_c, p.y_stride_c,
                                p.bias ? bias_tile : nullptr);
      continue;
    }
    if (K > 0)
      uk.direct[direct_variant](K, src, offset, wp + nt * K * mro, out, pw, nullptr);
    else
      std::memset(out, 0, sizeof(T) * static_cast<size_t>(mro * pw));
    for (int r = 0; r < mro && nt * mro + r < cout; ++r) {
      const int64_t cg = g * cout + nt * mro + r;
      write(out + r * pw, p.bias ? p.bias[cg * p.bias_stride] : T(0), cg);
    }
  }
}

// Not inlined: the stride-2 depthwise layer, whose time is mostly this copy, measured 0.94-0.97x
// when it was inlined into a larger direct_planes; its code then no longer depends on the caller.
template <typename T>
void ConvPlan<T>::Impl::fill_row_buffer(const RowBufferPlan& rb, int64_t slot, const T* x_row,
                                                      int64_t xs2, T* dst) {
  const int64_t* src = rb.src_index[slot].data();
  const int64_t begin = rb.run_begin[slot], end = rb.run_end[slot];
  for (int64_t u = 0; u < begin; ++u) dst[u] = src[u] >= 0 ? x_row[src[u] * xs2] : T(0);
  if (end > begin) {
    const T* first = x_row + src[begin] * xs2;
    const int64_t stride = rb.in_step * xs2;
    const int64_t n = end - begin;
    switch (stride) {  // compile-time strides for the common cases, so that the copy vectorises
      case 1: std::memcpy(dst + begin, first, sizeof(T) * static_cast<size_t>(n)); break;
      case 2: strided_copy<2>(first, n, dst + begin); break;
      case 3: strided_copy<3>(first, n, dst + begin); break;
      case 4: strided_copy<4>(first, n, dst + begin); break;
      default:
        for (int64_t u = 0; u < n; ++u) dst[begin + u] = first[u * stride];
    }
  }
  for (int64_t u = end; u < rb.length; ++u) dst[u] = src[u] >= 0 ? x_row[src[u] * xs2] : T(0);
}

template void ConvPlan<float>::Impl::direct_rows<true>(const ConvProblem<float>& p, const WorkItem& it, ThreadScratch<float>& s) const;
template void ConvPlan<float>::Impl::direct_rows<false>(const ConvProblem<float>& p, const WorkItem& it, ThreadScratch<float>& s) const;
template void ConvPlan<double>::Impl::direct_rows<true>(const ConvProblem<double>& p, const WorkItem& it, ThreadScratch<double>& s) const;
template void ConvPlan<double>::Impl::direct_rows<false>(const ConvProblem<double>& p, const WorkItem& it, ThreadScratch<double>& s) const;
template void ConvPlan<float>::Impl::direct_planes<true>(const ConvProblem<float>& p, const WorkItem& it, ThreadScratch<float>& s) const;
template void ConvPlan<float>::Impl::direct_planes<false>(const ConvProblem<float>& p, const WorkItem& it, ThreadScratch<float>& s) const;
template void ConvPlan<double>::Impl::direct_planes<true>(const ConvProblem<double>& p, const WorkItem& it, ThreadScratch<double>& s) const;
template void ConvPlan<double>::Impl::direct_planes<false>(const ConvProblem<double>& p, const WorkItem& it, ThreadScratch<double>& s) const;
template void ConvPlan<float>::Impl::fill_row_buffer(const RowBufferPlan& rb, int64_t slot, const float* x_row, int64_t xs2, float* dst);
template void ConvPlan<double>::Impl::fill_row_buffer(const RowBufferPlan& rb, int64_t slot, const double* x_row, int64_t xs2, double* dst);


// ---- The entry -----------------------------------------------------------------------------------

// GEMM (pixels x output channels, output channels in the vector lanes) or direct (output
// channels broadcast, pixels in the vector lanes, inputs copied row by row, channels-first rows
// written in place). Measured on the layer suite (AVX2, 2 threads), direct wins when a group has
// few output channels (depthwise: one; a GEMM would leave most lanes empty), for very few input
// channels (the 3 -> 64 stem, 3-D 1 -> 32: K too short to amortise packing) and for large
// channels-first planes at stride 1 (U-Net 128x128, 3-D 32^3: GEMM packing strides across
// planes of 64 KiB and more) and 1-D layers at stride 1; GEMM wins for the usual 2-D layers,
// strided 3-D layers, transposed layers, channels-last outputs and short rows (7x7 maps), where it tiles across rows.
// CONVFAST_ALGO=gemm|direct forces one where it can run (tests use it).
namespace engine {
namespace direct {

constexpr double kRank = 4.0;  // its place in the table (registry.cpp)

// Where every axis-2 plan has a usable row buffer (the rows are copied into it) and the buffers
// fit 8 MiB per thread; the row plans are kept for create.
template <typename T>
bool applies(Choice<T>& c) {
  const typename ConvPlan<T>::Impl& plan = c.plan;
  const UkernelInfo<T>& uk = plan.uk;
  const int pw = uk.pw[ConvPlan<T>::Impl::direct_variant_for(c.p.cout_per_group)];
  c.row_plans.clear();
  c.row_buffer_size = c.max_cache_entries = 0;
  c.row_fill = 1.0;
  bool possible = uk.direct[0] != nullptr && plan.max_k <= 16384;
  for (const AxisPlan& a2 : plan.axes[2]) {
    if (!possible) break;
    c.row_plans.emplace_back(a2, pw, int64_t(1) << 22);
    possible = c.row_plans.back().usable;
    c.row_fill = std::min(c.row_fill, double(a2.count) / double(ceil_div(std::max<int64_t>(a2.count, 1), pw) * pw));
  }
  if (!possible) return false;
  for (const Phase& ph : plan.phases) {
    const RowBufferPlan& rb = c.row_plans[ph[2] - plan.axes[2].data()];
    const int64_t entries = ConvPlan<T>::Impl::cache_entries(ph[0]->taps.size(), ph[1]->taps.size());
    const int64_t size =
        checked_mul(checked_mul(entries, c.p.cin_per_group), checked_mul((int64_t)rb.residue.size(), rb.length));
    c.row_buffer_size = std::max(c.row_buffer_size, size);
    c.max_cache_entries = std::max(c.max_cache_entries, entries);
  }
  return c.row_buffer_size * (int64_t)sizeof(T) <= (int64_t(8) << 20);
}

template <typename T>
double cost(Choice<T>& c) {
  constexpr int64_t kLargePlane = 16384;  // input elements per channel
  const ConvProblem<T>& p = c.p;
  const double rank = kRank;
  if (c.forced_is("gemm")) return c.refuse("gemm forced");
  if (c.forced_is("direct")) return c.take("forced", rank);
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group;
  const int64_t plane = p.in_size[0] * p.in_size[1] * p.in_size[2];
  // 1-D layers (one row per plane) at stride 1, forward or transposed, take the direct path too:
  // AVX-512, 1 thread, f32, against the GEMM: 32 -> 32 k3 on 8 x 16000 1.31x (its grad_input 1.32x),
  // k3 dilation 4 at batch 1 1.14x, 64 -> 64 k3 on 8 x 4000 1.12x (grad_input 1.19x), 128 on 2000
  // 1.10x, 256 on 1000 1.09x, 512 on 128 1.14x, 1x1 32 -> 64 1.30x. Its items are whole rows, so only
  // with two rows per thread: at batch 1 on 2 threads the one-row direct call ran on one thread
  // (1x1 32 -> 64 on 16000: 3.4 ms against the pixel-lanes GEMM's 0.54).
  const bool one_row = p.in_size[0] == 1 && p.in_size[1] == 1 && p.out_size[0] == 1 && p.out_size[1] == 1 &&
                       p.stride[2] == 1 && p.batch * p.groups >= 2 * (int64_t)get_num_threads();
  const bool unit_stride = p.kind == ConvKind::Forward && p.stride[0] == 1 && p.stride[1] == 1 && p.stride[2] == 1;
  if (2 * cout <= c.plan.uk.nr) return c.take("few output channels per group", rank);
  if (p.y_stride[2] == 1 && c.row_fill >= 0.75 && (cin <= 4 || one_row || (plane >= kLargePlane && unit_stride)))
    return c.take(cin <= 4 ? "few input channels" : one_row ? "1-D at unit stride" : "large planes at unit stride",
                  rank);
  return c.refuse("the GEMM tiles it better");
}

template <typename T>
bool create(Choice<T>& c) {
  typename ConvPlan<T>::Impl& plan = c.plan;
  const ConvProblem<T>& p = c.p;
  plan.direct = true;
  plan.direct_variant = ConvPlan<T>::Impl::direct_variant_for(p.cout_per_group);
  const int pw = plan.uk.pw[plan.direct_variant];
  plan.row_plans = std::move(c.row_plans);
  plan.row_buffer_size = c.row_buffer_size;
  plan.max_cache_entries = c.max_cache_entries;
  plan.choose_plane_mode(p);
  int64_t longest = 0;
  for (const RowBufferPlan& rb : plan.row_plans) longest = std::max(longest, rb.length);
  plan.zero_row.reset(new AlignedBuffer<T>(longest + pw));
  std::fill(plan.zero_row->get(), plan.zero_row->get() + longest + pw, T(0));
  plan.tile_m = pw;
  if (plan.tile_m > ConvPlan<T>::Impl::kMaxTilePixels) throw std::logic_error("direct tile wider than kMaxTilePixels");
  plan.tile_n = kDirectChannelTiles[plan.direct_variant];
  plan.kc_max = std::max<int64_t>(plan.max_k, 1);
  plan.mc_max = plan.tile_m;
  plan.plan_blocks(p);
  return true;
}

template <typename T>
std::string describe(const typename ConvPlan<T>::Impl& plan) {
  return plan.describe_blocks(plan.plane_mode ? "direct_planes" : "direct_rows");
}

}  // namespace direct

template <typename T>
const Algorithm<T>& direct_algorithm() {
  static const Algorithm<T> entry = {"direct", direct::kRank,
      direct::applies<T>, direct::cost<T>,
      direct::create<T>, execute_items<T>, direct::describe<T>};
  return entry;
}
template const Algorithm<float>& direct_algorithm<float>();
template const Algorithm<double>& direct_algorithm<double>();
}  // namespace engine

// Plane mode pays off for short output rows (under 5 tiles; measured on the layer suite: depthwise
// 56 and 112 wide, ResNeXt groups at 56, 3-D 32^3 gain 1.3-3x, the 112-wide stem does not), when a
// useful block of rows of every (axis-0 tap, input channel, slot) fits a per-thread budget of half
// the L2 size. (Under 4 tiles and 128 KiB left the 3-D 1 -> 32 layer's float64 passes to rows:
// 4 tiles of 8 in its forward, 32 input channels x 3 taps per buffered row in its grad_input.
// Planes: forward 8.7 -> 7.8 ms, grad_input 20.6 -> 14.7; the stem's float32 grad_input (its
// 3-channel tiles are 24 wide) 31.6 -> 28.1; p25, one process.)
template <typename T>
void ConvPlan<T>::Impl::choose_plane_mode(const ConvProblem<T>& p) {
  const int64_t kShortRow = 5 * uk.pw[direct_variant], kBudgetBytes = 256 * 1024, kMinRows = 4;
  if (const char* forced = std::getenv("CONVFAST_DIRECT")) {
    if (std::strcmp(forced, "rows") == 0) return;
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

template void ConvPlan<float>::Impl::choose_plane_mode(const ConvProblem<float>& p);
template void ConvPlan<double>::Impl::choose_plane_mode(const ConvProblem<double>& p);

}  // namespace convfast
