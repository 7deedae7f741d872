// The weight gradient (see convfast/weight_grad.hpp) as a GEMM per group on the forward engine's
// micro-kernel:
//
//   C_t[cb][ca] = sum_k Bm[cb][k] * At[k][ca]     for every kernel tap t, k = (n, output pixel o).
//
// Normal orientation: rows = output-gradient channels cb (the micro-kernel's MR, packed from b),
// vector lanes = input channels ca (NR, packed from a, per tap). Bm does not depend on the tap, so
// b is packed once into panels [g][tile][k][width] for the whole call. a is copied once into a
// channels-last buffer (N, L0, L1, L2, Ca) -- or read in place when its channels are already
// contiguous -- so that the channels of a tile at any (n, position) are one contiguous run, and the
// panel of (k-block, tap, tile) is built from contiguous copies: zeros where the tap reads the zero
// padding, map_padded_index for the other padding modes (the input is never padded). When no
// element of a would be packed twice per block of b tiles (non-overlapping taps) and there are at
// most kMaxDirectBBlocks such blocks, a channels-first a is read directly instead
// (pack_panel_direct), skipping the copy.
// Swapped orientation (few input channels: see WeightGrad::swapped): rows = ca, lanes = cb, b packed
// once as NR-lane panels, a per tap as MR-row panels, several taps per panel when Ca_g <= MR / 2.
//
// Work items are (group, block of b tiles, block of a tiles, block of tap slots). Each owns its
// outputs and runs the whole K in a fixed order (k-blocks of kKc, the taps inside each, so the
// item's row panels stay in L2 across its taps and lane tiles while each lane panel sits in L1),
// accumulating with the micro-kernel's accumulate flag into a per-thread C buffer
// [slot][rows][ldc]; so every output is one multiply-add chain over k in order and results are
// bitwise identical for any thread count (the block sizes, which follow the thread count, change
// no chain).
//
// Extra memory: the channels-last copy of a (a's size; skipped when a's channel stride is 1 or a
// is read directly), the packed b (b's size rounded up to whole tiles per group), and per thread
// the item's a panels (kKc x tile width x tiles), one C buffer (slots x rows x ldc) and kKc run
// descriptors. All of it is allocated on the calling thread, outside the parallel regions.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "convfast/dispatch.hpp"
#include "convfast/engine.hpp"
#include "convfast/scratch.hpp"
#include "convfast/threads.hpp"
#include "convfast/weight_grad.hpp"

#include "algorithm.hpp"

namespace convfast {
namespace wgrad {

namespace {

template <typename T>
struct Scratch {
  AlignedBuffer<T> panels;  // kKc x (the item's a-tiles x their width)
  AlignedBuffer<T> c;       // taps x rows x ldc
  std::vector<Run> runs;
  Scratch(int64_t panel_size, int64_t c_size) : panels(panel_size), c(c_size) { runs.reserve(kKc); }
};

template <typename T>
struct WeightGrad {
  const WeightGradProblem<T>& p;
  const UkernelInfo<T>& uk;
  int mr, nr;
  // Orientation. Normal: rows = cb (b packed once as MR-row panels), lanes = ca (a packed per tap
  // as NR-lane panels). Swapped, chosen when it fills the micro-kernel's tile much better (few
  // input channels per group, e.g. an RGB stem): rows = ca (a packed per tap as MR-row panels),
  // lanes = cb (b packed once as NR-lane panels). Either way b is packed once and a per tap.
  bool swapped = false;
  int bw, aw;  // packed widths of b and a panels
  // Swapped with Ca_g <= MR / 2: the rows of one a panel hold q = MR / Ca_g consecutive taps
  // (row j * Ca_g + ca = channel ca at tap j of the slot), so that a 3-channel input fills 6 rows,
  // not 3; normal with Ca_g <= NR / 2, likewise its lanes (lane j * Ca_g + ca), so that 16 input
  // channels fill 32 lanes. Otherwise q = 1. The items, panels and C buffers count tap slots of q
  // taps. (Lanes stacked, 2 threads, float32, min of interleaved runs, 3-D 3x3x3 weight gradients
  // against the unstacked GEMM: 8 x 16 -> 16 on 32^3 77.7 -> 36.1 ms, 16 -> 32 on 16^3 level.)
  int64_t q = 1, slots = 1;
  int64_t G, ca_g, cb_g, taps, P, K, b_tiles, a_tiles;
  int64_t O[kSpatialRank], L[kSpatialRank];
  // a as read by the panel packing: channel stride 1.
  const T* cl = nullptr;
  int64_t cl_n = 0, cl_s[kSpatialRank] = {0, 0, 0};
  std::unique_ptr<AlignedBuffer<T>> cl_copy;
  // a is read in its own (not channel-contiguous) layout, each panel column along a's rows: when
  // every element of a is packed at most once (see run()), a channels-last copy would only add a
  // pass over a.
  bool direct_a = false;
  std::unique_ptr<AlignedBuffer<T>> bpack;  // [g][b-tile][k][bw]

  // wino_m: the Winograd tile if already chosen (winograd_weight_grad_tile), else -1.
  explicit WeightGrad(const WeightGradProblem<T>& prob, int wino_m_chosen = -1)
      : p(prob), uk(active_ukernel<T>()) {
    mr = uk.mr;
    nr = uk.nr;
    G = p.groups;
    ca_g = p.a_channels / G;
    cb_g = p.b_channels / G;
    taps = 1;
    P = 1;
    for (int a = 0; a < kSpatialRank; ++a) {
      taps = checked_mul(taps, p.kernel[a]);
      P = checked_mul(P, p.b_size[a]);
      O[a] = p.b_size[a];
      L[a] = p.a_size[a];
    }
    K = checked_mul(p.batch, P);
    auto fill = [](int64_t n, int w) { return n > 0 ? double(n) / double(ceil_div(n, w) * w) : 1.0; };
    auto stack = [&](int width) { return ca_g > 0 && 2 * ca_g <= width && taps > 1 ? std::min<int64_t>(width / ca_g, taps) : 1; };
    // Winograd (normal orientation: its chosen channel counts fill either tile alike).
    wino_m = wino_m_chosen >= 0 ? wino_m_chosen : choose_winograd();
    winograd = wino_m != 0;
    swapped = !winograd && fill(stack(mr) * ca_g, mr) * fill(cb_g, nr) > 1.25 * fill(cb_g, mr) * fill(ca_g, nr);
    bw = swapped ? nr : mr;
    aw = swapped ? mr : nr;
    b_tiles = ceil_div(cb_g, bw);
    a_tiles = ceil_div(ca_g, aw);
    if (!winograd) q = stack(aw);
    slots = ceil_div(taps, q);
    int winograd_axes = 0;
    if (winograd)
      for (int a = 0; a < kSpatialRank; ++a) {
        wino_axis[a] = p.kernel[a] == 3;
        points_along[a] = wino_axis[a] ? wino_m + 2 : 1;
        // Dilation d: tiles of outputs o, o + d, ..., laid out as the forward's (so every output
        // is in one tile).
        tiles_along[a] = wino_axis[a] ? winograd::dilated_tile_count(O[a], wino_m, p.dilation[a]) : O[a];
        points *= points_along[a];
        tiles_per_image = checked_mul(tiles_per_image, tiles_along[a]);
        winograd_axes += wino_axis[a];
      }
    // (NR, the lanes of each call, is two vectors in every micro-kernel set.)
    if (winograd) {
      const int tile = wino_m == 4 ? 2 : 1;  // the tables' F(2, 3), F(4, 3)
      input_transform = uk.winograd_input[tile][winograd_axes - 1];
      gradient_taps = uk.winograd_gradient_taps[tile][winograd_axes - 1];
    }
  }

  // ---- Winograd F(m, 3), m = 2 or 4 (run_winograd) ----
  // The forward F(m, 3) computes a tile of m outputs from m + 2 inputs d as
  // y = A^T [(G g) . (B^T d)]; its adjoint with respect to the 3 weights g is
  // dg = G^T [(A dy) . (B^T d)]. Summed over the tiles (which partition the outputs), per transform
  // point q the products form one GEMM,
  //
  //   M[q][cb][ca] = sum over tiles k of all images  DY[q][k][cb] * X[q][k][ca],
  //
  // with X = B^T d the input transform and DY = A dy the output gradient's, and then
  // out[cb][ca] = G^T M[.][cb][ca] G (along each 3-tap axis; one-tap axes are trivial). A 2-D 3x3
  // layer has, per m x m outputs, (m + 2)^2 points against 9 m^2 products: F(2, 3) 16 per 4
  // (2.25x fewer), F(4, 3) 36 per 16 (4x); 3-D 3x3x3: 64 per 8 (3.4x), 216 per 64 (8x). F(2, 3)'s
  // coefficients are 0, +-1 and 1/2 (in G^T), so integer-valued data stays exact; F(4, 3)'s reach
  // 8 (in A) and 1/24 (in G^T) and it is taken in float64 only, as the forward's. Applies to
  // stride-1 3-tap axes (any dilation; at least two such axes) and one-tap axes, any padding mode,
  // groups, normal orientation; chosen when both channel counts per group reach 64 (2-D) or 16
  // (3-D; see choose_winograd); CONVFAST_ALGO=winograd forces it wherever it applies,
  // gemm|direct exclude it. F(2, 3) measured against the GEMM before the GEMM's copy-out and lane
  // stacking (2 threads, float32 unless noted):
  // 8 x C x 56 x 56 3x3: 0.95x at 32 channels, 1.07x at 48 (float64 1.20x), 1.13-1.25x at 64;
  // 128 x 28^2 1.35-1.55x, 256 x 14^2 1.65x, 512 x 14^2 1.4-1.6x; 3-D 3x3x3: 0.89x at 16
  // channels, 1.27x at 32 (16^3), 1.17x at 32 -> 64 (32^3). Fusing the F(2, 3) transforms' passes,
  // padding the buffer's tiles to 16 bytes and staging runs of tiles before the panels were each
  // tried and measured no faster.
  bool winograd = false;
  int wino_m = 0;  // outputs per tile along a Winograd axis: F(2, 3) or F(4, 3)
  bool wino_axis[kSpatialRank] = {false, false, false};
  int64_t points_along[kSpatialRank] = {1, 1, 1}, tiles_along[kSpatialRank] = {1, 1, 1};
  // The micro-kernel unit's fused F(m, 3) input transform of a whole tile (winograd_ukernel_impl.hpp).
  WinogradTransform<T> input_transform = nullptr;
  // Its output transform G^T M G of a row of channel pairs (winograd_gradient_taps).
  WinogradTransform<T> gradient_taps = nullptr;
  int64_t points = 1, tiles_per_image = 1;
  // b's channel-contiguous view (as cl for a).
  const T* gl = nullptr;
  int64_t gl_n = 0, gl_s[kSpatialRank] = {0, 0, 0};
  std::unique_ptr<AlignedBuffer<T>> gl_copy;

  // Returns m, or 0 where Winograd does not apply. F(4, 3) in float64 (as the forward) where its
  // products and transforms (both per point per tile) beat F(2, 3)'s by 50 % after the edge waste
  // of its coarser tiles, M stays within the bound, and the operands are not all integer-valued
  // (which F(2, 3) keeps exact). Measured, F(4, 3) against F(2, 3), float64, 2 threads (p25, one
  // process alternating): ResNet 64x56 1.25x, 128x28 1.26x, U-Net 64x128 1.32x, 3-D 32->64 at
  // 32^3 1.6x (all 1.78x fewer points x tiles in 2-D, 2.4x in 3-D); 256x14 and dilation 2 at 28
  // (1.36x fewer) level.
  int choose_winograd() const {
    const char* forced = std::getenv("CONVFAST_ALGO");
    const std::string force = forced ? forced : "";
    if (force == "gemm" || force == "direct") return 0;
    int axes = 0;
    double cost2 = 1, cost4 = 1;  // points x tiles per image
    for (int a = 0; a < kSpatialRank; ++a) {
      if (p.kernel[a] == 3) {
        if (p.stride[a] != 1) return 0;
        ++axes;
        cost2 *= 4.0 * double(winograd::dilated_tile_count(p.b_size[a], 2, p.dilation[a]));
        cost4 *= 6.0 * double(winograd::dilated_tile_count(p.b_size[a], 4, p.dilation[a]));
      } else if (p.kernel[a] != 1) {
        return 0;
      }
    }
    if (axes < 2) return 0;
    // 2-D from 64 channels: since the GEMM's results are copied out a tap at a time, it runs 2-D
    // layers of fewer channels faster (2 threads, float32, min of interleaved runs, GEMM /
    // Winograd: 8 x 32 -> 32 on 128x128 20.1 / 21.6 ms, 32 -> 64 on 64x64 9.1-10.0 / 10.7-12.6,
    // 64 -> 32 on 128x128 39.1 / 47.5, 48 -> 48 on 56x56 9.2 / 11.0, 1 x 32 on 112x112 2.0 / 2.5);
    // from 64 the two are mixed (64 on 56x56 12.7 / 15.3, on 64x64 15.3 / 13.5, on 28x28 3.5 /
    // 3.3) and Winograd wins from 128. 3-D, 1 thread, AVX-512: 8 x 16 -> 16 on 32^3 1.85x, 16 -> 32
    // on 16^3 1.26x over the GEMM before its lanes were stacked (see below).
    const int64_t min_channels = axes == 3 ? 16 : 64;
    if (force != "winograd" && (ca_g < min_channels || cb_g < min_channels)) return 0;
    // Input channels that stack in the GEMM's lanes (see q) fill its tiles too, and it wins unless
    // the output channels are many (2 threads, float32, min of interleaved runs, GEMM / Winograd:
    // 3-D 8 x 16 -> 16 on 32^3 36 / 54 ms, 2 x 16 -> 16 9.2 / 13.1, 8 x 16 -> 32 on 16^3 9.0 / 8.7,
    // 8 x 16 -> 64 on 8^3 2.48 / 1.98).
    if (force != "winograd" && 2 * ca_g <= nr && cb_g < 64) return 0;
    // M within the working-memory bound, as the forward's transform.
    constexpr double kMaxProductsBytes = double(int64_t(48) << 20);
    if (sizeof(T) == 8 && cost4 * 1.5 < cost2 && winograd_products_bytes(4) <= kMaxProductsBytes &&
        !(integer_valued(p.a, p.batch, p.a_channels, p.a_size, p.a_stride_n, p.a_stride_c, p.a_stride) &&
          integer_valued(p.b, p.batch, p.b_channels, p.b_size, p.b_stride_n, p.b_stride_c, p.b_stride)))
      return 4;
    return winograd_products_bytes(2) <= kMaxProductsBytes ? 2 : 0;
  }

  // ---- b -> panels [g][tile][k][bw] (zero entries past Cb_g) ----
  void pack_b(int nthreads) {
    bpack = std::make_unique<AlignedBuffer<T>>(checked_mul(checked_mul(checked_mul(G, b_tiles), K), bw));
    constexpr int64_t kChunk = 2048;
    const int64_t chunks = ceil_div(K, kChunk), jobs = checked_mul(checked_mul(G, b_tiles), chunks);
    T* dst_all = bpack->get();
    const int w = bw;
    // Whole tiles of pixel rows contiguous in b move L x L blocks at a time through the vector
    // transpose (the scalar gather, one strided load per element, was half of a 1x1 layer's
    // weight gradient: 16 -> 96 on 8 x 56 x 56, 1 thread).
    const int L = uk.transpose_block && p.b_stride[2] == 1 && w % uk.lanes == 0 ? uk.lanes : 0;
    // An image whose pixels are contiguous is one run (the scalar tail once per image, not per row:
    // per row it was a third of the 64 x 1 -> 32 layer's weight gradient on 28-wide rows).
    const bool whole_images = p.b_stride[2] == 1 && (O[1] == 1 || p.b_stride[1] == O[2]) &&
                              (O[0] == 1 || p.b_stride[0] == O[1] * O[2]);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t gt = job / chunks, k0 = (job % chunks) * kChunk, k1 = std::min(K, k0 + kChunk);
      const int64_t g = gt / b_tiles, bt = gt % b_tiles;
      const int64_t valid = std::min<int64_t>(w, cb_g - bt * w);
      const T* bg = p.b + (g * cb_g + bt * w) * p.b_stride_c;
      T* dst = dst_all + (gt * K + k0) * w;
      for (PixelCursor at(k0, O); at.k < k1;) {
        const T* src = bg + at.n * p.b_stride_n + at.o0 * p.b_stride[0] + at.o1 * p.b_stride[1];
        const int64_t len = whole_images ? std::min(P - ((at.o0 * O[1] + at.o1) * O[2] + at.o2), k1 - at.k)
                                         : std::min(O[2] - at.o2, k1 - at.k);
        int64_t j = 0;
        if (L > 0 && valid == w)
          for (; j + L <= len; j += L, dst += L * w)
            for (int r0 = 0; r0 < w; r0 += L) uk.transpose_block(src + at.o2 + j + r0 * p.b_stride_c, p.b_stride_c, dst + r0, w);
        for (; j < len; ++j, dst += w) {
          const T* s = src + (at.o2 + j) * p.b_stride[2];
          int r = 0;
          for (; r < valid; ++r) dst[r] = s[r * p.b_stride_c];
          for (; r < w; ++r) dst[r] = T(0);
        }
        if (whole_images)
          at = PixelCursor(at.k + len, O);
        else
          at.advance(len, O);
      }
    }
  }

  // ---- a -> channel-contiguous view ----
  void prepare_a(int nthreads) {
    cl = channels_last(p.a, p.batch, p.a_channels, L, p.a_stride_n, p.a_stride_c, p.a_stride, direct_a, nthreads, uk,
                       cl_copy, cl_n, cl_s);
  }

  // The runs of the k-block [k0, k0 + kc).
  void make_runs(int64_t k0, int64_t kc, std::vector<Run>& runs) const {
    runs.clear();
    for (PixelCursor at(k0, O); at.k < k0 + kc;) {
      const int64_t len = std::min(O[2] - at.o2, k0 + kc - at.k);
      runs.push_back({at.n, at.o0, at.o1, at.o2, len});
      at.advance(len, O);
    }
  }

  // a's outer coordinates (i0, i1) of run r's positions at tap offsets off (tap * dilation - pad);
  // false where they fall in the zero padding.
  bool outer_row(const Run& r, const int64_t off[kSpatialRank], int64_t& i0, int64_t& i1) const {
    i0 = map_padded_index(r.o0 * p.stride[0] + off[0], L[0], p.mode);
    i1 = map_padded_index(r.o1 * p.stride[1] + off[1], L[1], p.mode);
    return i0 >= 0 && i1 >= 0;
  }

  // Entries [0, lanes) of the rows of a panel [kc][aw] (dst: row 0's entry 0): tap (t0, t1, t2), input
  // channels [c0, c0 + lanes); entries [lanes, aw) zero too when `tail`. Source positions advance by
  // the stride along each run: no divisions except map_padded_index for positions in the padding.
  // span > 1 (stacked taps, see run_item; not with `tail`): taps t2 .. t2 + span - 1 too, each
  // `lanes` entries after the previous, where they lie side by side in a's view (consecutive taps
  // dilation x cl_s[2] = lanes apart): one copy per position inside the input, instead of one per
  // tap (the 7x7 stem's weight gradient packs 4 taps of 3 channels per position).
  void pack_panel(const std::vector<Run>& runs, const int64_t tap[kSpatialRank], int64_t c0, int lanes, bool tail,
                  T* __restrict dst, int span = 1) const {
    int64_t off[kSpatialRank];
    for (int a = 0; a < kSpatialRank; ++a) off[a] = tap[a] * p.dilation[a] - p.pad_before[a];
    const int64_t s2 = p.stride[2], L2 = L[2], cs2 = cl_s[2], d2 = p.dilation[2];
    const int w = aw, end = tail ? w : lanes * span;
    const bool full = lanes == w;
    for (const Run& r : runs) {
      int64_t i0, i1, n0, n1;
      if (!outer_row(r, off, i0, i1)) {
        if (end == w)
          std::memset(dst, 0, sizeof(T) * static_cast<size_t>(r.len * w));
        else
          for (int64_t j = 0; j < r.len; ++j)
            for (int l = 0; l < end; ++l) dst[j * w + l] = T(0);
        dst += r.len * w;
        continue;
      }
      const T* row = cl + r.n * cl_n + i0 * cl_s[0] + i1 * cl_s[1] + c0;
      int64_t i2 = r.o2 * s2 + off[2];
      // The next run's entries, one per position, prefetched alongside: a's rows are read a few
      // channels at a time, strided by its channel count, which the hardware prefetchers miss.
      const T* ahead = nullptr;
      int64_t ahead_i2 = 0, ahead_len = 0;
      if (&r + 1 != runs.data() + runs.size()) {
        const Run& nx = (&r)[1];
        if (outer_row(nx, off, n0, n1)) {
          ahead = cl + nx.n * cl_n + n0 * cl_s[0] + n1 * cl_s[1] + c0;
          ahead_i2 = nx.o2 * s2 + off[2];
          ahead_len = nx.len;
        }
      }
      for (int64_t j = 0; j < r.len; ++j, i2 += s2, dst += w) {
        if (j < ahead_len && ahead_i2 + j * s2 >= 0 && ahead_i2 + j * s2 < L2)
          __builtin_prefetch(ahead + (ahead_i2 + j * s2) * cs2);
        if (span > 1) {
          if (i2 >= 0 && i2 + (span - 1) * d2 < L2) {
            copy_few(dst, row + i2 * cs2, lanes * span);
          } else {  // some of the taps in the padding
            for (int u = 0; u < span; ++u) {
              const int64_t m = map_padded_index(i2 + u * d2, L2, p.mode);
              if (m < 0)
                zero_lanes(dst + u * lanes, lanes);
              else
                copy_few(dst + u * lanes, row + m * cs2, lanes);
            }
          }
          continue;
        }
        const int64_t m = i2 >= 0 && i2 < L2 ? i2 : map_padded_index(i2, L2, p.mode);
        if (m < 0) {
          zero_lanes(dst, end);
        } else if (full) {
          copy_lanes(dst, row + m * cs2, w);
        } else {  // a partial tile (few channels)
          if (tail) zero_lanes(dst, w);
          copy_few(dst, row + m * cs2, lanes);
        }
      }
    }
  }

  // pack_panel for direct_a: the panel's columns (channels) one at a time, along a's rows.
  void pack_panel_direct(const std::vector<Run>& runs, const int64_t tap[kSpatialRank], int64_t c0, int lanes,
                         T* __restrict dst) const {
    int64_t off[kSpatialRank];
    for (int a = 0; a < kSpatialRank; ++a) off[a] = tap[a] * p.dilation[a] - p.pad_before[a];
    const int64_t s2 = p.stride[2], L2 = L[2], as2 = p.a_stride[2], cs = p.a_stride_c;
    const int w = aw;
    for (const Run& r : runs) {
      int64_t i0, i1, n0, n1;
      if (!outer_row(r, off, i0, i1)) {
        std::memset(dst, 0, sizeof(T) * static_cast<size_t>(r.len * w));
        dst += r.len * w;
        continue;
      }
      const T* row = p.a + r.n * p.a_stride_n + c0 * cs + i0 * p.a_stride[0] + i1 * p.a_stride[1];
      // The run's interior [j_lo, j_hi): positions inside [0, L2), read at a constant step.
      const int64_t first = r.o2 * s2 + off[2];
      int64_t j_lo = 0, j_hi = r.len;
      while (j_lo < r.len && first + j_lo * s2 < 0) ++j_lo;
      while (j_hi > j_lo && first + (j_hi - 1) * s2 >= L2) --j_hi;
      const int64_t step = s2 * as2;
      // The next run's row of each lane, prefetched while this run's is read: the lanes are as many
      // streams as there are channels in the item, more than the hardware prefetchers follow.
      const T* ahead = nullptr;
      int64_t ahead_span = 0;
      if (&r + 1 != runs.data() + runs.size() && as2 == 1) {  // (rows at unit step: a's own layout)
        const Run& nx = (&r)[1];
        const int64_t lo = std::max<int64_t>(0, nx.o2 * s2 + off[2]);
        const int64_t hi = std::min<int64_t>(L2, (nx.o2 + nx.len - 1) * s2 + off[2] + 1);
        if (outer_row(nx, off, n0, n1) && lo < hi) {
          ahead = p.a + nx.n * p.a_stride_n + c0 * cs + n0 * p.a_stride[0] + n1 * p.a_stride[1] + lo;
          ahead_span = hi - lo;
        }
      }
      // The lanes past `lanes` (zeros), and the run's ends outside the interior (padding, mapped by
      // the mode), element by element.
      for (int l = 0; l < w; ++l) {
        T* d = dst + l;
        if (l >= lanes) {
          for (int64_t j = 0; j < r.len; ++j) d[j * w] = T(0);
          continue;
        }
        const T* src = row + l * cs;
        auto edge = [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t m = map_padded_index(first + j * s2, L2, p.mode);
            d[j * w] = m < 0 ? T(0) : src[m * as2];
          }
        };
        edge(0, j_lo);
        edge(j_hi, r.len);
      }
      // The interior, in blocks of positions, so that the panel lines being written (w values per
      // position) stay in L1 while each lane fills its column of the block.
      // Contiguous positions go L lanes x L positions at a time through the micro-kernel unit's
      // register transpose (a scalar copy per element was 16 % of the 1x1 256 -> 64 layer's float64
      // weight gradient; with the transpose it runs 2 % faster, float32 11 %, p25 in one process);
      // the remaining lanes and positions element by element.
      constexpr int64_t kBlock = 64;
      const int L = uk.lanes;
      const int vector_lanes = step == 1 && uk.transpose_block ? lanes / L * L : 0;
      for (int64_t jb = j_lo; jb < j_hi; jb += kBlock) {
        const int64_t je = std::min(j_hi, jb + kBlock);
        const int64_t vector_end = vector_lanes ? jb + (je - jb) / L * L : jb;
        for (int l = 0; l < lanes; ++l) {
          const T* __restrict s0 = row + l * cs + (first + j_lo * s2) * as2 - j_lo * step;
          T* __restrict d = dst + l;
          if (ahead && jb == j_lo)
            for (int64_t e = 0; e < ahead_span; e += 64 / static_cast<int64_t>(sizeof(T)))
              __builtin_prefetch(ahead + l * cs + e);
          if (l < vector_lanes && l % L == 0)
            for (int64_t j = jb; j < vector_end; j += L) uk.transpose_block(s0 + j, cs, d + j * w, w);
          const int64_t j_scalar = l < vector_lanes ? vector_end : jb;
          if (step == 1)
            for (int64_t j = j_scalar; j < je; ++j) d[j * w] = s0[j];
          else
            for (int64_t j = j_scalar; j < je; ++j) d[j * w] = s0[j * step];
        }
      }
      dst += r.len * w;
    }
  }

  // An item: group g, b-tiles [bt0, bt1), a-tiles [at0, at1), tap slots [slot0, slot1). Its C
  // buffer is [slot][rows][ldc], rows x lanes = (cb, ca) normal, (tap in slot, ca) swapped.
  struct Item {
    int64_t g, bt0, bt1, at0, at1, slot0, slot1;
  };

  void run_item(const Item& it, Scratch<T>& s) const {
    const int64_t nb = it.bt1 - it.bt0, na = it.at1 - it.at0;
    const int64_t rows = swapped ? na * mr : nb * mr, ldc = swapped ? nb * nr : na * nr;
    T* C = s.c.get();
    T* panels = s.panels.get();
    const T* bpan = bpack->get() + (it.g * b_tiles + it.bt0) * K * bw;
    const bool taps_side_by_side = p.dilation[2] * cl_s[2] == ca_g;
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0);
      make_runs(k0, kc, s.runs);
      const int64_t tap_first = it.slot0 * q;
      int64_t tap[kSpatialRank] = {tap_first / (p.kernel[1] * p.kernel[2]), (tap_first / p.kernel[2]) % p.kernel[1],
                                   tap_first % p.kernel[2]};
      auto next_tap = [&] {
        if (++tap[2] == p.kernel[2]) {
          tap[2] = 0;
          if (++tap[1] == p.kernel[1]) {
            tap[1] = 0;
            ++tap[0];
          }
        }
      };
      for (int64_t sl = 0; sl < it.slot1 - it.slot0; ++sl) {
        if (q == 1) {
          for (int64_t at = it.at0; at < it.at1; ++at) {
            const int lanes = static_cast<int>(std::min<int64_t>(aw, ca_g - at * aw));
            T* dst = panels + (at - it.at0) * kc * aw;
            if (direct_a)
              pack_panel_direct(s.runs, tap, it.g * ca_g + at * aw, lanes, dst);
            else
              pack_panel(s.runs, tap, it.g * ca_g + at * aw, lanes, true, dst);
          }
          next_tap();
        } else {  // q taps side by side in one panel (one a-tile: Ca_g <= half its width)
          const int64_t first = (it.slot0 + sl) * q, here = std::min(q, taps - first);
          for (int64_t j = 0; j < here;) {
            int span = 1;  // taps of one row, side by side in a's view
            while (taps_side_by_side && j + span < here && tap[2] + span < p.kernel[2]) ++span;
            pack_panel(s.runs, tap, it.g * ca_g, static_cast<int>(ca_g), false, panels + j * ca_g, span);
            for (int u = 0; u < span; ++u) next_tap();
            j += span;
          }
          const int64_t used = here * ca_g;
          if (used < aw)
            for (int64_t k = 0; k < kc; ++k)
              for (int64_t l = used; l < aw; ++l) panels[k * aw + l] = T(0);
        }
        T* ct = C + sl * rows * ldc;
        // The lane panel outermost (it stays in L1), the row panels (L2) inside.
        if (!swapped) {
          for (int64_t a = 0; a < na; ++a)
            for (int64_t b = 0; b < nb; ++b)
              uk.fn(kc, bpan + (b * K + k0) * mr, panels + a * kc * nr, ct + b * mr * ldc + a * nr, ldc, k0 > 0);
        } else {
          for (int64_t b = 0; b < nb; ++b)
            for (int64_t a = 0; a < na; ++a)
              uk.fn(kc, panels + a * kc * mr, bpan + (b * K + k0) * nr, ct + a * mr * ldc + b * nr, ldc, k0 > 0);
        }
      }
    }
    // C[slot][row][lane] -> out[(g * Cb_g + cb) * Ca_g + ca][t]; tap t = slot * q + j (j = 0 unless
    // stacked) sits in row j * Ca_g + ca, lane cb (swapped) or row cb, lane j * Ca_g + ca (normal).
    const int64_t cb_begin = it.bt0 * bw, cb_end = std::min(it.bt1 * bw, cb_g);
    const int64_t ca_begin = it.at0 * aw, ca_end = std::min(it.at1 * aw, ca_g);
    const int64_t cb_step = swapped ? 1 : ldc, ca_step = swapped ? ldc : 1, j_step = ca_g * ca_step;
    const int64_t tap_begin = it.slot0 * q, tap_end = std::min(taps, it.slot1 * q);
    // (The channels ca innermost: one division per tap, not per output, and a 1x1 layer's rows are
    // plain copies; with the taps innermost this loop was 38 % of the 1x1 960 -> 320 layer's weight
    // gradient on 8 x 4 x 4, float32, 1 thread.)
    for (int64_t cb = cb_begin; cb < cb_end; ++cb)
      for (int64_t t = tap_begin; t < tap_end; ++t) {
        const int64_t sl = t / q - it.slot0, j = t % q;
        const T* __restrict c = C + (cb - cb_begin) * cb_step + sl * rows * ldc + j * j_step - ca_begin * ca_step;
        T* __restrict o = p.out + ((it.g * cb_g + cb) * ca_g) * taps + t;
        for (int64_t ca = ca_begin; ca < ca_end; ++ca) o[ca * taps] = c[ca * ca_step];
      }
  }

  // Transforms tile k (the chunk's kk-th) of every group, all channels of a group at once:
  // X[q][g][at][kk][nr] from a's channel-contiguous view, DY[q][g][bt][kk][mr] from b's. buf:
  // points x max(a_tiles * nr, b_tiles * mr).
  void transform_tile(int64_t k, int64_t kk, int64_t chunk, T* buf, T* xt, T* dyt) const {
    int64_t t[kSpatialRank], rem = k;
    for (int a = kSpatialRank - 1; a >= 0; --a) {
      t[a] = rem % tiles_along[a];
      rem /= tiles_along[a];
    }
    const int64_t n = rem, *np = points_along;
    int64_t in[kSpatialRank][6];  // the tile's inputs along each axis, mapped (-1: zero)
    int64_t origin[kSpatialRank];  // the tile's first output along each axis (the next: + dilation)
    for (int a = 0; a < kSpatialRank; ++a) {
      const int64_t d = p.dilation[a];
      origin[a] = wino_axis[a] ? winograd::dilated_tile_origin(t[a], wino_m, d) : t[a];
      for (int64_t j = 0; j < np[a]; ++j)
        in[a][j] = map_padded_index(wino_axis[a] ? origin[a] + j * d - p.pad_before[a] : t[a] * p.stride[a] - p.pad_before[a],
                                    L[a], p.mode);
    }
    const int64_t lanes_a = a_tiles * nr, lanes_b = b_tiles * mr;
    // One channel row (C/G values, zeros up to `lanes`) per buffer entry.
    auto put_row = [](T* dst, const T* src, int64_t valid, int64_t lanes) {
      if (src)
        std::memcpy(dst, src, sizeof(T) * static_cast<size_t>(valid));
      else
        std::fill(dst, dst + valid, T(0));
      std::fill(dst + valid, dst + lanes, T(0));
    };
    for (int64_t g = 0; g < G; ++g) {
      const T* x = cl + n * cl_n + g * ca_g;
      for (int64_t j0 = 0; j0 < np[0]; ++j0)
        for (int64_t j1 = 0; j1 < np[1]; ++j1)
          for (int64_t j2 = 0; j2 < np[2]; ++j2) {
            const bool inside = in[0][j0] >= 0 && in[1][j1] >= 0 && in[2][j2] >= 0;
            put_row(buf + ((j0 * np[1] + j1) * np[2] + j2) * lanes_a,
                    inside ? x + in[0][j0] * cl_s[0] + in[1][j1] * cl_s[1] + in[2][j2] * cl_s[2] : nullptr, ca_g, lanes_a);
          }
      // B^T d of each block of nr channels, straight into X (point q at q * G * a_tiles * chunk * nr).
      // Line by line over buf and then copied, the float64 weight gradient of the 64-channel
      // 56x56 layer took 44.4 ms (p25, one process alternating), fused 35.1.
      for (int64_t at = 0; at < a_tiles; ++at)
        input_transform(buf + at * nr, lanes_a, xt + ((g * a_tiles + at) * chunk + kk) * nr, G * a_tiles * chunk * nr, nr);

      // The gradients of the tile's outputs at entries 0 .. m - 1 along each Winograd axis (the
      // transform overwrites the other entries, whatever they hold).
      const T* dy = gl + n * gl_n + g * cb_g;
      const int64_t m = wino_m;
      for (int64_t e0 = 0; e0 < (wino_axis[0] ? m : 1); ++e0)
        for (int64_t e1 = 0; e1 < (wino_axis[1] ? m : 1); ++e1)
          for (int64_t e2 = 0; e2 < (wino_axis[2] ? m : 1); ++e2) {
            const int64_t o0 = origin[0] + e0 * p.dilation[0], o1 = origin[1] + e1 * p.dilation[1],
                          o2 = origin[2] + e2 * p.dilation[2];
            const bool inside = o0 < O[0] && o1 < O[1] && o2 < O[2];  // past the end: no gradient
            put_row(buf + ((e0 * np[1] + e1) * np[2] + e2) * lanes_b,
                    inside ? dy + o0 * gl_s[0] + o1 * gl_s[1] + o2 * gl_s[2] : nullptr, cb_g, lanes_b);
          }
      for_each_line(wino_axis, np, lanes_b, [&](int64_t off, int64_t st) {
        if (m == 4)
          gradient_line<4>(buf + off, st, lanes_b);
        else
          gradient_line<2>(buf + off, st, lanes_b);
      });
      for (int64_t q = 0; q < points; ++q)
        for (int64_t bt = 0; bt < b_tiles; ++bt)
          copy_lanes(dyt + (((q * G + g) * b_tiles + bt) * chunk + kk) * mr, buf + q * lanes_b + bt * mr, mr);
    }
  }

  // Size in bytes of M (run_winograd): points x the weight gradient rounded to whole tiles (normal
  // orientation), as a double: choose_winograd asks before any size is checked for overflow.
  double winograd_products_bytes(int m) const {
    double pts = 1;
    for (int a = 0; a < kSpatialRank; ++a) pts *= p.kernel[a] == 3 ? m + 2 : 1;
    return double(G) * pts * double(ceil_div(cb_g, mr) * mr) * double(ceil_div(ca_g, nr) * nr) * double(sizeof(T));
  }

  // Returns false if an output is an infinity or NaN (where the direct sums may differ: Inf - Inf
  // inside a transform is NaN); the caller recomputes then.
  //
  // Chunks of tiles (in order) are transformed in parallel over the tiles, then their products
  // accumulated into M[q][g][cb][ca] in parallel over (q, g, a tile), each running its chunk in
  // K blocks in order: every entry of M is one multiply-add chain over the tiles in order, for
  // any thread count. A chunk's transforms take 16 MiB (at least 32 tiles), at least M's size
  // (at most 48 MiB), so that M, re-read once per chunk, costs little traffic beside them. Extra memory: channels-last
  // copies of a and b (unless they are channels-last), M (at most 48 MiB, see choose_winograd),
  // a chunk's transforms (at most 16 MiB, or 32 tiles' worth).
  bool run_winograd(int threads) {
    const int64_t rows_g = b_tiles * mr, lanes_g = a_tiles * nr, m_block = rows_g * lanes_g;
    const int64_t per_tile = checked_mul(checked_mul(points, G), lanes_g + rows_g) * (int64_t)sizeof(T);
    const int64_t KT = checked_mul(p.batch, tiles_per_image);
    // 16 MiB whatever M's size: each chunk is two parallel regions whose joins wait for every
    // thread, and with 4 MiB chunks the 3-D 16 -> 16 layer on 8 x 32^3 (32768 tiles) made 226 of
    // them per call, which took 2.7 s against 0.1 s on one thread while another process kept a
    // core busy (each join waited for a descheduled thread).
    constexpr int64_t budget = int64_t(16) << 20;
    const int64_t chunk = std::min(KT, std::max<int64_t>(32, budget / per_tile));
    AlignedBuffer<T> m(checked_mul(checked_mul(G, points), m_block));
    AlignedBuffer<T> xt(checked_mul(checked_mul(points * G, lanes_g), chunk));
    AlignedBuffer<T> dyt(checked_mul(checked_mul(points * G, rows_g), chunk));
    std::vector<std::unique_ptr<AlignedBuffer<T>>> bufs;
    std::vector<std::unique_ptr<AlignedBuffer<T>>> tap_rows;  // per thread: [tap][C_a/G] of one row
    for (int t = 0; t < threads; ++t) {
      bufs.emplace_back(new AlignedBuffer<T>(checked_mul(points, std::max(lanes_g, rows_g))));
      tap_rows.emplace_back(new AlignedBuffer<T>(checked_mul(taps, std::max<int64_t>(ca_g, 1))));
    }
    direct_a = false;
    prepare_a(threads);
    gl = channels_last(p.b, p.batch, p.b_channels, O, p.b_stride_n, p.b_stride_c, p.b_stride, false, threads, uk, gl_copy,
                       gl_n, gl_s);
    const int64_t items = checked_mul(G * points, a_tiles);
    for (int64_t k0 = 0; k0 < KT; k0 += chunk) {
      const int64_t kc = std::min(chunk, KT - k0);
#pragma omp parallel for schedule(static) num_threads(threads)
      for (int64_t kk = 0; kk < kc; ++kk)
        transform_tile(k0 + kk, kk, chunk, bufs[omp_get_thread_num()]->get(), xt.get(), dyt.get());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
      for (int64_t item = 0; item < items; ++item) {
        const int64_t qg = item / a_tiles, at = item % a_tiles;  // qg = q * G + g
        const T* xp = xt.get() + (qg * a_tiles + at) * chunk * nr;
        const T* dp = dyt.get() + qg * b_tiles * chunk * mr;
        T* mq = m.get() + qg * m_block + at * nr;
        for (int64_t k1 = 0; k1 < kc; k1 += kKc) {
          const int64_t kn = std::min(kKc, kc - k1);
          for (int64_t bt = 0; bt < b_tiles; ++bt)
            uk.fn(kn, dp + (bt * chunk + k1) * mr, xp + k1 * nr, mq + bt * mr * lanes_g, lanes_g, k0 + k1 > 0);
        }
      }
    }
    // out[cb][ca] = G^T M[.][cb][ca] G, in double, a row of C_a/G at a time (the unit's fused
    // kernel, into [tap][ca]; then transposed into out's [ca][tap]). Line by line in the baseline
    // unit with a conversion pass it was 15 % of the VGG 512x14 float32 grad_weight.
    bool finite = true;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(&& : finite)
    for (int64_t cbg = 0; cbg < p.b_channels; ++cbg) {
      const int64_t g = cbg / cb_g, cb = cbg % cb_g;
      T* v = tap_rows[omp_get_thread_num()]->get();
      gradient_taps(m.get() + g * m_block + cb * lanes_g, G * m_block, v, ca_g, ca_g);
      for (int64_t ca = 0; ca < ca_g; ++ca) {
        T* o = p.out + (cbg * ca_g + ca) * taps;
        for (int64_t t = 0; t < taps; ++t) {
          const T value = v[t * ca_g + ca];
          finite = finite && std::isfinite(value);
          o[t] = value;
        }
      }
    }
    return finite;
  }

  void run() {
    const int64_t out_count = checked_mul(checked_mul(p.b_channels, ca_g), taps);
    if (out_count == 0) return;
    bool empty = K == 0;
    for (int a = 0; a < kSpatialRank; ++a) empty = empty || L[a] == 0;
    if (empty) {  // no products: the sums are zero
      std::fill(p.out, p.out + out_count, T(0));
      return;
    }
    const int threads = std::max(1, get_num_threads());
    const std::string suffix = " threads=" + std::to_string(threads);
    if (winograd) {
      set_last_algorithm("weight_grad winograd F(" + std::to_string(wino_m) + ",3) " + std::to_string(points) + " points" + suffix);
      if (run_winograd(threads)) return;
      winograd = false;  // an infinity or NaN: the exact-chain sums below decide it
      set_last_algorithm("weight_grad gemm (after winograd: non-finite output)" + suffix);
    } else {
      set_last_algorithm(std::string("weight_grad gemm") + (swapped ? " swapped" : "") + suffix);
    }
    // Tiles per item, chosen from the shapes and the thread count only (the split changes no
    // multiply-add chain, so results do not depend on it). Rows: as many as keep the row panels of a
    // k-block (kKc x rows) in three quarters of the L2 budget, with one lane tile's C buffer. Lanes:
    // as many as fit their C buffers and panels in the rest. Then, while there are too few items to keep
    // every thread busy, halved: the a tiles first, then the taps (either re-reads the packed b once
    // more per extra block, but an item keeping all its taps reads each k-block of b's row panels
    // once for all of them, and the a split came out better balanced: 9 one-tap items on 2 threads
    // run as 5 + 4, 4 a-blocks x 2 tap groups as 9 + 9; measured 1.15-1.2x on the 64-channel 3x3
    // layer's weight gradient, float32, 2 threads), then the b tiles (an extra block packs a's
    // panels again).
    const int64_t sz = sizeof(T);
    const int64_t row_tiles = swapped ? a_tiles : b_tiles, lane_tiles = swapped ? b_tiles : a_tiles;
    const int64_t row_tile_bytes = checked_mul(checked_add(kKc * mr, checked_mul(slots, mr * nr)), sz);
    const int64_t row_budget = kL2Bytes * 3 / 4;
    int64_t row_per = std::min<int64_t>(row_tiles, std::max<int64_t>(1, row_budget / row_tile_bytes));
    const int64_t lane_tile_bytes =
        checked_mul(checked_add(kKc * nr, checked_mul(checked_mul(slots, row_per * mr), nr)), sz);
    int64_t lane_per = std::min<int64_t>(lane_tiles, std::max<int64_t>(1, (kL2Bytes - row_budget) / lane_tile_bytes));
    // Where an item's row panels over the whole K (the packed b it reads) are far beyond L2, every
    // item streams them from memory once: fewer, wider items then read less. Lanes: as many as
    // keep the C buffers within half the L2 budget (their panels are used one after another), and
    // items down to one per thread rather than three. Measured on the layers this reaches (p25,
    // one process alternating, 2 threads; the gains were larger while the host was busy): 1x1
    // 256->64 float64 level to 1.11x, 1x1 stride 2 level to 1.09x, transposed 3-D k2s2 1.06-1.12x,
    // k3s2p1op1 1.04-1.07x, the others level.
    const bool streamed = !swapped && double(K) * double(row_per * mr * sz) > 4.0 * double(kL2Bytes);
    if (streamed)
      lane_per = std::min<int64_t>(lane_tiles, std::max<int64_t>(1, kL2Bytes / 2 / (slots * row_per * mr * nr * sz)));
    int64_t& a_per = swapped ? row_per : lane_per;
    int64_t& b_per = swapped ? lane_per : row_per;
    int64_t tap_per = slots;  // tap slots per item
    auto count = [&] {
      return checked_mul(checked_mul(G, ceil_div(slots, tap_per)),
                         checked_mul(ceil_div(a_tiles, a_per), ceil_div(b_tiles, b_per)));
    };
    while (count() < (streamed ? 1 : 3) * threads && (tap_per > 1 || a_per > 1 || b_per > 1)) {
      if (a_per > 1)
        a_per = ceil_div(a_per, 2);
      else if (tap_per > 1)
        tap_per = ceil_div(tap_per, 2);
      else
        b_per = ceil_div(b_per, 2);
    }
    // A last block of fewer a tiles or taps leaves threads idle at the end: 32 a tiles in blocks of
    // 6 ran on 2 threads as 18 + 14 (the 1x1 256->64 layer's weight gradient in float64; blocks of
    // 4 run as 16 + 16, measured 1.1x). So where the items are few, the a and tap block sizes down
    // to half the chosen ones are tried, one at a time, and the one whose greedy schedule (what
    // schedule(dynamic) does: each item to the thread that is free first, in order) ends first is
    // kept, with the fewest items on ties. Costs count tile x tap products.
    if (count() < 16 * threads) {
      auto makespan = [&](int64_t tp, int64_t ap) {
        std::vector<int64_t> busy(static_cast<size_t>(threads), 0);
        for (int64_t g = 0; g < G; ++g)
          for (int64_t bt = 0; bt < b_tiles; bt += b_per)
            for (int64_t at = 0; at < a_tiles; at += ap)
              for (int64_t t = 0; t < slots; t += tp)
                *std::min_element(busy.begin(), busy.end()) += (std::min(b_tiles, bt + b_per) - bt) *
                                                               (std::min(a_tiles, at + ap) - at) *
                                                               (std::min(slots, t + tp) - t);
        return *std::max_element(busy.begin(), busy.end());
      };
      int64_t best_tap = tap_per, best_a = a_per, best = makespan(tap_per, a_per);
      auto consider = [&](int64_t tp, int64_t ap) {
        const int64_t m = makespan(tp, ap);
        if (m < best) best = m, best_tap = tp, best_a = ap;
      };
      for (int64_t ap = a_per - 1; ap >= ceil_div(a_per, 2); --ap) consider(tap_per, ap);
      for (int64_t tp = tap_per - 1; tp >= ceil_div(tap_per, 2); --tp) consider(tp, a_per);
      tap_per = best_tap;
      a_per = best_a;
    }
    std::vector<Item> items;
    items.reserve(static_cast<size_t>(count()));
    for (int64_t g = 0; g < G; ++g)
      for (int64_t bt = 0; bt < b_tiles; bt += b_per)
        for (int64_t at = 0; at < a_tiles; at += a_per)
          for (int64_t t = 0; t < slots; t += tap_per)
            items.push_back({g, bt, std::min(b_tiles, bt + b_per), at, std::min(a_tiles, at + a_per), t,
                             std::min(slots, t + tap_per)});
    const int nthreads = static_cast<int>(std::min<int64_t>(threads, static_cast<int64_t>(items.size())));

    // All memory before any parallel region: failures are exceptions on this thread.
    const int64_t c_size = checked_mul(checked_mul(tap_per, row_per * mr), lane_per * nr);
    const int64_t panel_size = checked_mul(kKc * aw, a_per);
    std::vector<std::unique_ptr<Scratch<T>>> scratch;
    for (int t = 0; t < nthreads; ++t) scratch.emplace_back(new Scratch<T>(panel_size, c_size));
    pack_b(threads);
    // Direct reading of a channels-first a when no input element is read twice per block of b
    // tiles: taps that do not overlap (stride >= the dilated kernel along every axis, e.g. one
    // tap, or a transposed convolution's k = s up-sampling), and at most kMaxDirectBBlocks blocks
    // of b tiles, each of which reads a again; the copy is one more pass over a (written, then
    // read per block). Two blocks: the transposed k2s2 128 -> 64 layer's float64 weight gradient
    // 11.7 -> 8.9 ms; three: the 1x1 stride-2 256 -> 512 layer's float32 one 0.93x.
    bool disjoint = q == 1 && ceil_div(b_tiles, b_per) <= kMaxDirectBBlocks;
    for (int a = 0; a < kSpatialRank; ++a)
      disjoint = disjoint && (p.kernel[a] <= 1 || p.stride[a] >= (p.kernel[a] - 1) * p.dilation[a] + 1);
    direct_a = p.a_stride_c != 1 && p.a_channels != 1 && disjoint;
    prepare_a(threads);

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t i = 0; i < static_cast<int64_t>(items.size()); ++i) run_item(items[i], *scratch[omp_get_thread_num()]);
  }
};

}  // namespace

template <typename T>
int winograd_weight_grad_tile(const WeightGradProblem<T>& p) {
  return WeightGrad<T>(p).wino_m;
}

template <typename T>
void gemm_weight_grad(const WeightGradProblem<T>& p, int wino_m) {
  WeightGrad<T>(p, wino_m).run();
}

template int winograd_weight_grad_tile<float>(const WeightGradProblem<float>&);
template int winograd_weight_grad_tile<double>(const WeightGradProblem<double>&);
template void gemm_weight_grad<float>(const WeightGradProblem<float>&, int);
template void gemm_weight_grad<double>(const WeightGradProblem<double>&, int);

// ---- The entry: the GEMM runs every problem (the choice's last resort) ----
namespace gemm_entry {
constexpr double kRank = 6.0;  // its place in the table (registry.cpp)
template <typename T>
bool applies(WgradChoice<T>&) { return true; }
template <typename T>
double cost(WgradChoice<T>& c) { return c.take("runs everything", kRank); }
template <typename T>
bool run(WgradChoice<T>& c) {
  gemm_weight_grad(c.p, 0);
  return true;
}
inline const char* describe() { return "gemm: one GEMM per tap over batch and output pixels"; }
}  // namespace gemm_entry

template <typename T>
const WeightGradAlgorithm<T>& gemm_weight_grad_algorithm() {
  static const WeightGradAlgorithm<T> entry = {"gemm", gemm_entry::kRank,
      gemm_entry::applies<T>, gemm_entry::cost<T>,
      gemm_entry::run<T>, gemm_entry::describe};
  return entry;
}
template const WeightGradAlgorithm<float>& gemm_weight_grad_algorithm<float>();
template const WeightGradAlgorithm<double>& gemm_weight_grad_algorithm<double>();

}  // namespace wgrad
}  // namespace convfast
