// Packing shared by the GEMM and direct algorithms: weight panels, input patches (by tile or by
// k), per-thread scratch, and the per-pixel offsets of a block of outputs.
#pragma once
#include <cstdlib>
#include <cstring>

#include "geometry.hpp"
#include "convfast/dispatch.hpp"

namespace convfast {
namespace engine {

// How the MR pixels of an m-tile read one tap: one contiguous run (interior, stride 1: a copy per
// k), a constant stride (strided convolutions: an unrolled gather), or anything else (tiles
// crossing an output row or touching the padding: element by element, zeros for padding).
enum class TapRead : int8_t { Run, Strided, Gather };

constexpr int kMinTileHeight = 4;  // the smallest tile height with_tile_height allows

// Per-thread scratch, allocated once per call before the parallel region (so that allocation
// failure is an exception on the calling thread, never inside OpenMP).
template <typename T>
struct ThreadScratch {
  AlignedBuffer<T> a_panel, c_block, out_tile, row_buffers;
  AlignedBuffer<int64_t> x_offsets, y_offsets;
  std::vector<const T*> src_rows, panel_rows;
  std::vector<int64_t> cache_key0, cache_key1, cache_stamp;  // direct path: row-buffer cache entries
  std::vector<TapRead> tap_kind;          // GEMM packing: per tap of the current m-tile (pixel lanes: of each)
  std::vector<int64_t> tile_anchor, tile_step;  // GEMM: per m-tile, read in place (see gemm_block)
  std::vector<int64_t> tile_pixel;              // GEMM: per pixel of an in-place tile, its offset from the anchor's
  std::vector<char> tile_in_y;                  // pixel lanes: per pixel tile, written straight into y
  AlignedBuffer<T> row_bias;                    // pixel lanes: the group's bias, contiguous
  std::vector<const T*> a_rows;           // GEMM: per anchor tile, the row of A of each k of a K block
  std::vector<int64_t> tap_base, tap_step;
  ThreadScratch(int64_t mc, int64_t a_panel_size, int64_t nc, int64_t max_taps, int64_t direct_k, int64_t out_tile_size,
                int64_t row_buffer_size, int64_t in_place_rows)
      : a_panel(a_panel_size), c_block(checked_mul(mc, nc)), out_tile(out_tile_size), row_buffers(row_buffer_size),
        x_offsets(checked_mul(mc, std::max<int64_t>(max_taps, 1))), y_offsets(mc),
        src_rows(static_cast<size_t>(std::max<int64_t>(direct_k, 1))),
        tap_kind(static_cast<size_t>(checked_mul(ceil_div(std::max<int64_t>(mc, 1), kMinTileHeight),
                                                 std::max<int64_t>(max_taps, 1)))),  // per tap of every tile
        tile_anchor(static_cast<size_t>(mc)), tile_step(static_cast<size_t>(mc)),
        tile_pixel(static_cast<size_t>(mc)),  // GEMM blocks are whole tiles: mc is a multiple of MR
        tile_in_y(static_cast<size_t>(mc)), row_bias(nc),
        a_rows(static_cast<size_t>(in_place_rows)),
        tap_base(tap_kind.size()),
        tap_step(tap_kind.size()) {}

  // Direct path: the panel holds direct_k rows of pw values; panel_rows points at each.
  void set_direct_panel(int64_t direct_k, int pw, int64_t cache_entries) {
    cache_key0.assign(static_cast<size_t>(cache_entries), 0);
    cache_key1.assign(static_cast<size_t>(cache_entries), 0);
    cache_stamp.assign(static_cast<size_t>(cache_entries), -1);
    panel_rows.resize(static_cast<size_t>(direct_k));
    for (int64_t k = 0; k < direct_k; ++k) panel_rows[k] = a_panel.get() + k * pw;
  }
};

// The functions below have internal linkage in each unit that includes this header, as they had when
// one file held the engine: GCC inlines a local function called once and then drops it, which it
// does not do for one with external linkage (measured: pixel-lanes 1x1 layers 3-8 % slower).
namespace {

// The weight offset of each of a phase's taps, in the K order of the packed panels (axis 0 outermost):
// row k = ci * taps + t of a weight panel is w[ci * w_stride_ci + offsets[t]].
template <typename T>
std::vector<int64_t> weight_tap_offsets(const ConvProblem<T>& p, const Phase& ph) {
  const PhaseShape shape(ph);
  std::vector<int64_t> offsets;
  for (int64_t t0 = 0; t0 < shape.taps[0]; ++t0)
    for (int64_t t1 = 0; t1 < shape.taps[1]; ++t1)
      for (int64_t t2 = 0; t2 < shape.taps[2]; ++t2)
        offsets.push_back(ph[0]->taps[t0] * p.w_stride[0] + ph[1]->taps[t1] * p.w_stride[1] +
                          ph[2]->taps[t2] * p.w_stride[2]);
  return offsets;
}

// Packs one n-tile of B for one (group, phase): panel[K][NR], K ordered channel-major then tap
// (k = ci * taps + t), the order of a contiguous (C_out, C_in, *k) weight row, so each of the NR
// source rows is read along its length; walked in chunks of k so that the chunk of the panel being
// written stays in L1.
//
// n elements (a short run, under a few vectors) in 16-byte pieces: std::copy of a run-time length
// is a library call, which cost more than the copy on runs of 7-28 elements.
template <typename T>
inline void copy_short_run(const T* s, T* d, int64_t n) {
  constexpr int64_t piece = 16 / sizeof(T);
  int64_t k = 0;
  for (; k + piece <= n; k += piece) std::memcpy(d + k, s + k, 16);
  for (; k < n; ++k) d[k] = s[k];
}

// Where each row's K weights are contiguous in that order (a C-contiguous forward weight, every
// tap in the phase) and the tile's rows, rounded up to a multiple of the vector width, exist, the
// panel is written by L x L transposes of the rows (`transpose`, the micro-kernel table's
// transpose_block); a last group of fewer than L rows (NR = 12 of the pixel-lanes GEMM) is
// transposed into a block and copied: the element-by-element loop took 2.5 ms of a 1 x 512 x 4 x 4
// 3x3 layer's 3.8 ms (its 9.4 MB of weights are packed on every call), and a fifth of the ViT
// patch embedding's (1 x 3 x 224 x 224, 768 16x16 s16 filters).
template <typename T>
void pack_weight_tile(const ConvProblem<T>& p, const Phase& ph, int64_t g, int nr, int64_t nt, T* panel,
                      TransposeBlock<T> transpose, int lanes) {
  const PhaseShape shape(ph);
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group;
  const int64_t K = shape.num_taps * cin;
  const std::vector<int64_t> tap_offset = weight_tap_offsets(p, ph);
  const T* wg = p.w + g * p.w_stride_g;
  constexpr int kMaxBlock = 256;  // L x L elements (L <= 16)
  bool rows_contiguous = transpose != nullptr && lanes > 0 && lanes * lanes <= kMaxBlock &&
                         nt * nr + ceil_div(nr, lanes) * lanes <= cout &&
                         (cin == 1 || p.w_stride_ci == shape.num_taps);
  for (int64_t t = 0; t < shape.num_taps && rows_contiguous; ++t) rows_contiguous = tap_offset[t] == t;
  int64_t k_start = 0;
  if (rows_contiguous) {
    k_start = K / lanes * lanes;
    alignas(64) T block[kMaxBlock];
    for (int64_t k0 = 0; k0 < k_start; k0 += lanes)
      for (int c0 = 0; c0 < nr; c0 += lanes) {
        const T* rows = wg + (nt * nr + c0) * p.w_stride_co + k0;
        if (c0 + lanes <= nr) {
          transpose(rows, p.w_stride_co, panel + k0 * nr + c0, nr);
          continue;
        }
        transpose(rows, p.w_stride_co, block, lanes);
        for (int k = 0; k < lanes; ++k) copy_short_run(block + k * lanes, panel + (k0 + k) * nr + c0, nr - c0);
      }
  }
  if (!rows_contiguous && std::abs(p.w_stride_ci) > std::abs(p.w_stride_co)) {
    // Input channels outermost in memory (a transposed convolution's (C_in, C_out/G, k...) weight):
    // per input channel, the tile's NR rows of taps lie together, so they are read channel by
    // channel; reading along k instead jumped C_out/G x taps elements per step, a page per read
    // (the 512 -> 256 k4s2 up-convolution's weights took 25 ms to pack, its products 1 ms).
    const int64_t taps = shape.num_taps;
    for (int64_t ci = 0; ci < cin; ++ci)
      for (int c = 0; c < nr; ++c) {
        const int64_t co = nt * nr + c;
        T* dst = panel + ci * taps * nr + c;
        if (co >= cout) {
          for (int64_t t = 0; t < taps; ++t) dst[t * nr] = T(0);
          continue;
        }
        const T* src = wg + co * p.w_stride_co + ci * p.w_stride_ci;
        for (int64_t t = 0; t < taps; ++t) dst[t * nr] = src[tap_offset[t]];
      }
    return;
  }
  constexpr int64_t kChunk = 64;
  for (int64_t k0 = k_start; k0 < K; k0 += kChunk) {
    const int64_t k1 = std::min(K, k0 + kChunk);
    for (int c = 0; c < nr; ++c) {
      const int64_t co = nt * nr + c;
      if (co >= cout) {
        for (int64_t k = k0; k < k1; ++k) panel[k * nr + c] = T(0);
        continue;
      }
      const T* row = wg + co * p.w_stride_co;
      const int64_t taps = shape.num_taps;
      int64_t ci = k0 / taps, t = k0 % taps;
      for (int64_t k = k0; k < k1; ++k) {
        panel[k * nr + c] = row[ci * p.w_stride_ci + tap_offset[t]];
        if (++t == taps) {
          t = 0;
          ++ci;
        }
      }
    }
  }
}

// How each tap of an m-tile reads: its kind, its first pixel's offset and the step between pixels.
template <int MR>
void classify_taps(const int64_t* xoff, int64_t taps, int64_t valid_rows, int64_t m_first, TapRead* kind,
                   int64_t* base, int64_t* step) {
  for (int64_t t = 0; t < taps; ++t) {
    int64_t off[MR];
    bool inside = true;
    for (int r = 0; r < MR; ++r) {
      off[r] = r < valid_rows ? xoff[(m_first + r) * taps + t] : kOutside;
      inside = inside && off[r] != kOutside;
    }
    const int64_t st = inside && MR > 1 ? off[1] - off[0] : 0;
    bool constant = inside;
    for (int r = 2; r < MR && constant; ++r) constant = off[r] == off[0] + r * st;
    kind[t] = !constant ? TapRead::Gather : st == 1 ? TapRead::Run : TapRead::Strided;
    base[t] = off[0];
    step[t] = st;
  }
}

// The MR entries of one k (tap t of the channel at `plane`) of an m-tile classified as above.
template <int MR, typename T>
inline void copy_tap(const T* plane, TapRead kind, int64_t base, int64_t step, const int64_t* xoff, int64_t taps,
                     int64_t t, int64_t valid_rows, int64_t m_first, T* d) {
  switch (kind) {
    case TapRead::Run:
      std::memcpy(d, plane + base, MR * sizeof(T));
      break;
    case TapRead::Strided:
      for (int r = 0; r < MR; ++r) d[r] = plane[base + r * step];
      break;
    case TapRead::Gather:
      for (int r = 0; r < MR; ++r) {
        const int64_t o = r < valid_rows ? xoff[(m_first + r) * taps + t] : kOutside;
        d[r] = o == kOutside ? T(0) : plane[o];
      }
      break;
  }
}

// pack_input_patches: A[k][MR] for one m-tile (rows m_first .. m_first + MR, of which valid_rows
// exist) and k in [k0, k0 + kc), k = ci * taps + t, straight from the unpadded input (xoff holds
// each pixel's spatial offset per tap, kOutside = zero). The taps of one input channel read
// neighbouring rows of the same plane, which keeps the packing's footprint (and TLB) small.
template <int MR, typename T>
void pack_tile(const T* xg, int64_t cs, const int64_t* xoff, int64_t taps, int64_t valid_rows, int64_t m_first,
               int64_t k0, int64_t kc, TapRead* kind, int64_t* base, int64_t* step, T* dst) {
  classify_taps<MR>(xoff, taps, valid_rows, m_first, kind, base, step);
  int64_t ci = k0 / taps, t = k0 % taps;
  for (int64_t kk = 0; kk < kc; ++kk) {
    copy_tap<MR>(xg + ci * cs, kind[t], base[t], step[t], xoff, taps, t, valid_rows, m_first, dst + kk * MR);
    if (++t == taps) {
      t = 0;
      ++ci;
    }
  }
}

// Calls f(std::integral_constant<int, MR>) for the tile heights the plan allows (MR pixels in the
// broadcast rows, or NR in the vector lanes of pixel_lanes).
template <typename F>
void with_tile_height(int mr, F&& f) {
  switch (mr) {
    case 4: return f(std::integral_constant<int, 4>());
    case 6: return f(std::integral_constant<int, 6>());
    case 8: return f(std::integral_constant<int, 8>());
    case 12: return f(std::integral_constant<int, 12>());
    case 16: return f(std::integral_constant<int, 16>());
    case 32: return f(std::integral_constant<int, 32>());
    default: return;  // unreachable: the plan refuses other heights (no exception inside OpenMP)
  }
}

template <typename T>
void pack_input_patches(const T* xg, int64_t cs, const int64_t* xoff, int64_t taps, int64_t mcount, int mr,
                        int64_t mt, int64_t k0, int64_t kc, TapRead* kind, int64_t* base, int64_t* step, T* dst) {
  const int64_t m_first = mt * mr, valid = std::min<int64_t>(mr, mcount - m_first);
  with_tile_height(mr, [&](auto height) {
    pack_tile<decltype(height)::value>(xg, cs, xoff, taps, valid, m_first, k0, kc, kind, base, step, dst);
  });
}

// The same panels for m-tiles [pt0, pt1) of a block (tile pt's at dst + pt * MR * kc), packed k by
// k across the tiles rather than tile by tile. Tile by tile, each tile reads a few cache lines
// from each of K channel planes (the grad_input of the k2s2 up-convolution: 256 planes per tile),
// more streams than the hardware prefetcher follows, and the packing waited on memory (22 % of
// that layer's float64 time); k by k, the block's reads of one channel are one run along its rows,
// and the next k's are prefetched. kind / base / step hold taps entries per tile.
template <int MR, typename T>
void pack_tiles_by_k(const T* xg, int64_t cs, const int64_t* xoff, int64_t taps, int64_t mcount, int64_t pt0,
                     int64_t pt1, int64_t k0, int64_t kc, TapRead* kind, int64_t* base, int64_t* step, T* dst) {
  for (int64_t pt = pt0; pt < pt1; ++pt)
    classify_taps<MR>(xoff, taps, std::min<int64_t>(MR, mcount - pt * MR), pt * MR, kind + pt * taps,
                      base + pt * taps, step + pt * taps);
  constexpr int64_t kLine = 64 / (int64_t)sizeof(T);
  int64_t ci = k0 / taps, t = k0 % taps;
  for (int64_t kk = 0; kk < kc; ++kk) {
    const T* plane = xg + ci * cs;
    const int64_t tn = t + 1 == taps ? 0 : t + 1;
    if (kk + 1 < kc && kind[pt0 * taps + tn] != TapRead::Gather) {  // the next k's span, from its first tile
      const T* next = xg + (ci + (tn == 0)) * cs + base[pt0 * taps + tn];
      const int64_t span = (pt1 - pt0) * MR * std::max<int64_t>(step[pt0 * taps + tn], 1);
      for (int64_t e = 0; e < span; e += kLine) __builtin_prefetch(next + e);
    }
    for (int64_t pt = pt0; pt < pt1; ++pt) {
      const int64_t i = pt * taps + t;
      copy_tap<MR>(plane, kind[i], base[i], step[i], xoff, taps, t, std::min<int64_t>(MR, mcount - pt * MR), pt * MR,
                   dst + (pt * kc + kk) * MR);
    }
    t = tn;
    if (t == 0) ++ci;
  }
}

template <typename T>
void pack_patches_by_k(const T* xg, int64_t cs, const int64_t* xoff, int64_t taps, int64_t mcount, int mr,
                       int64_t pt0, int64_t pt1, int64_t k0, int64_t kc, TapRead* kind, int64_t* base, int64_t* step,
                       T* dst) {
  with_tile_height(mr, [&](auto height) {
    pack_tiles_by_k<decltype(height)::value>(xg, cs, xoff, taps, mcount, pt0, pt1, k0, kc, kind, base, step, dst);
  });
}

// Where each pixel of the block reads for each tap (spatial offset into x, or kOutside for a zero), and
// (unless yoff is null) where it writes. Pixels are in row-major order, or with edges_last the block's
// interior pixels (whose taps all read unmapped inputs inside x) first, in row-major order, then its
// edge pixels: a tile of MR interior pixels is read in place by gemm_block even where it wraps to
// the next row, so only the edge pixels are packed.
// An interior pixel's offsets are its own offset plus each tap's (tap_scratch: num_taps entries).
template <typename T>
void block_offsets(const ConvProblem<T>& p, const Phase& ph, const PhaseShape& shape, int64_t m0, int64_t mcount,
                   int64_t* tap_scratch, int64_t* xoff, int64_t* yoff, bool edges_last = false) {
  const int64_t T_ = shape.num_taps;
  // Per axis, the outputs [lo, hi) whose taps all read inside x.
  int64_t lo[kSpatialRank], hi[kSpatialRank];
  for (int a = 0; a < kSpatialRank; ++a) {
    const AxisPlan& ax = *ph[a];
    const auto [first, last] = std::minmax_element(ax.tap_offset.begin(), ax.tap_offset.end());
    lo[a] = *first >= 0 ? 0 : ceil_div(-*first, ax.in_step);
    hi[a] = ax.in_size - *last <= 0 ? 0 : ceil_div(ax.in_size - *last, ax.in_step);
    hi[a] = std::max(lo[a], std::min(hi[a], shape.count[a]));
  }
  int64_t* tap_rel = tap_scratch;
  for (int64_t t0 = 0, t = 0; t0 < shape.taps[0]; ++t0)
    for (int64_t t1 = 0; t1 < shape.taps[1]; ++t1)
      for (int64_t t2 = 0; t2 < shape.taps[2]; ++t2)
        tap_rel[t++] = ph[0]->tap_offset[t0] * p.x_stride[0] + ph[1]->tap_offset[t1] * p.x_stride[1] +
                       ph[2]->tap_offset[t2] * p.x_stride[2];
  int64_t written = 0;
  for (int pass = edges_last ? 0 : 2; pass < (edges_last ? 2 : 3); ++pass) {  // 0: interior, 1: edges, 2: all
    // Pixel m of the phase is (j0, j1, j2) in row-major order; step it incrementally.
    int64_t j2 = m0 % shape.count[2];
    int64_t j1 = (m0 / shape.count[2]) % shape.count[1];
    int64_t j0 = m0 / (shape.count[2] * shape.count[1]);
    for (int64_t mi = 0; mi < mcount; ++mi) {
      const bool interior =
          j0 >= lo[0] && j0 < hi[0] && j1 >= lo[1] && j1 < hi[1] && j2 >= lo[2] && j2 < hi[2];
      if (pass == 2 || interior == (pass == 0)) {
        if (yoff)
          yoff[written] = (ph[0]->out_start + j0 * ph[0]->out_step) * p.y_stride[0] +
                          (ph[1]->out_start + j1 * ph[1]->out_step) * p.y_stride[1] +
                          (ph[2]->out_start + j2 * ph[2]->out_step) * p.y_stride[2];
        int64_t* row = xoff + written * T_;
        ++written;
        if (interior) {
          const int64_t base = j0 * ph[0]->in_step * p.x_stride[0] + j1 * ph[1]->in_step * p.x_stride[1] +
                               j2 * ph[2]->in_step * p.x_stride[2];
          for (int64_t t = 0; t < T_; ++t) row[t] = base + tap_rel[t];
        } else {  // padding: zeros (kOutside) or mapped indices
          for (int64_t t0 = 0; t0 < shape.taps[0]; ++t0) {
            const int64_t i0 = ph[0]->index(j0, t0);
            for (int64_t t1 = 0; t1 < shape.taps[1]; ++t1) {
              const int64_t i1 = ph[1]->index(j1, t1);
              const bool outer_inside = i0 >= 0 && i1 >= 0;
              const int64_t outer = i0 * p.x_stride[0] + i1 * p.x_stride[1];
              for (int64_t t2 = 0; t2 < shape.taps[2]; ++t2) {
                const int64_t i2 = ph[2]->index(j2, t2);
                *row++ = outer_inside && i2 >= 0 ? outer + i2 * p.x_stride[2] : kOutside;
              }
            }
          }
        }
      }
      if (++j2 == shape.count[2]) {
        j2 = 0;
        if (++j1 == shape.count[1]) {
          j1 = 0;
          ++j0;
        }
      }
    }
  }
}
}  // namespace
}  // namespace engine
}  // namespace convfast
