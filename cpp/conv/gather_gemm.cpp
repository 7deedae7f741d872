// The convolution engine: an implicit ("gather") GEMM over strided N-D views.
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
#include <cmath>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#include "convfast/dispatch.hpp"
#include "convfast/scratch.hpp"
#include "convfast/engine.hpp"
#include "convfast/threads.hpp"

namespace convfast {
namespace {

thread_local std::string t_last_algorithm;

// Marks a tap that reads the zero padding in the per-pixel offset tables. Offsets themselves can be
// negative (negative-stride views), so -1 cannot serve.
constexpr int64_t kOutside = INT64_MIN;

using detail::AlignedBuffer;
using detail::ceil_div;
using detail::checked_add;
using detail::checked_mul;

// Floor division and its remainder for a positive divisor.
int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

// One spatial axis of one phase: which outputs it covers and where each tap reads. Output j of the
// phase (y coordinate out_start + j * out_step) reads, for tap t, input coordinate
// index(j, t) = map(j * in_step + tap_offset[t]) -- mapped by the padding mode, or -1 for a zero.
// It is computed when needed rather than tabulated: a table would cost 8 bytes per output position
// and tap, several times the output itself along a long axis. validate() bounds the sizes so that
// the arithmetic cannot overflow.
struct AxisPlan {
  int64_t out_start = 0, out_step = 1, count = 0;
  int64_t in_size = 1, in_step = 1;
  PadMode mode = PadMode::Zeros;
  std::vector<int64_t> taps;        // kernel index of each tap
  std::vector<int64_t> tap_offset;  // unmapped input coordinate of output 0, per tap

  int64_t index(int64_t j, int64_t t) const {
    const int64_t v = j * in_step + tap_offset[t];
    return v >= 0 && v < in_size ? v : map_padded_index(v, in_size, mode);
  }
};

AxisPlan forward_axis(int64_t in, int64_t out, int64_t k, int64_t s, int64_t d, int64_t pb, PadMode mode) {
  AxisPlan a;
  a.count = out;
  a.in_size = in;
  a.in_step = s;
  a.mode = mode;
  a.taps.reserve(static_cast<size_t>(k));  // a huge (broadcast) kernel fails here, before any work
  a.tap_offset.reserve(static_cast<size_t>(k));
  for (int64_t t = 0; t < k; ++t) {
    a.taps.push_back(t);
    a.tap_offset.push_back(t * d - pb);
  }
  return a;
}

// Output o receives x[i] * w[t] where o + pb = i*s + t*d. Outputs with the same residue
// r = o mod s share one set of taps, and within a residue class i = j + (r + pb - t*d) / s.
// Only residues that some tap reaches become phases (at most k of them, however large the stride);
// the outputs of the others receive no product and are set to the bias by execute().
std::vector<AxisPlan> transposed_axis(int64_t in, int64_t out, int64_t k, int64_t s, int64_t d, int64_t pb) {
  // (residue, tap) for every tap whose outputs are not all cropped; sorted, each residue's taps are
  // consecutive and in kernel order.
  std::vector<std::pair<int64_t, int64_t>> reach;
  reach.reserve(static_cast<size_t>(k));  // a huge (broadcast) kernel fails here, before any work
  for (int64_t t = 0; t < k; ++t) {
    const int64_t o = t * d - pb;               // output coordinate of input 0 through tap t
    const int64_t r = o - floor_div(o, s) * s;  // its residue, in [0, s)
    if (r < out) reach.emplace_back(r, t);
  }
  std::sort(reach.begin(), reach.end());
  std::vector<AxisPlan> phases;
  for (const auto& [r, t] : reach) {
    if (phases.empty() || phases.back().out_start != r) {
      AxisPlan a;
      a.out_start = r;
      a.out_step = s;
      a.count = ceil_div(out - r, s);
      a.in_size = in;
      phases.push_back(std::move(a));
    }
    phases.back().taps.push_back(t);
    phases.back().tap_offset.push_back((r + pb - t * d) / s);  // exact: r + pb - t*d is a multiple of s
  }
  return phases;
}

// The direct path reads the last axis through per-row buffers in which every tap's inputs are
// contiguous: inputs are split by residue modulo in_step (so a strided convolution reads
// consecutive buffer entries) and padded (zeros, or the padding mode's values) at both ends.
// Tap t reads buffer slot[t] from entry j + shift[t]; the buffer of slot r holds, at entry u,
// input map((u + shift_min) * in_step + residue[r]).
struct RowBufferPlan {
  int64_t length = 0;                             // entries per buffer, PW-tile slack included
  std::vector<int64_t> residue;                   // per slot
  std::vector<std::vector<int64_t>> src_index;    // per slot: input coordinate per entry, or -1
  std::vector<int64_t> run_begin, run_end;        // per slot: entries reading inputs in_step apart
  int64_t in_step = 1;
  std::vector<int64_t> slot, shift;               // per tap

  bool usable = false;  // false when the buffers would be unreasonably long (huge dilation)

  RowBufferPlan(const AxisPlan& a, int tile, int64_t max_length) {
    const int64_t nt = static_cast<int64_t>(a.taps.size());
    int64_t shift_min = 0, shift_max = 0;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t q = floor_div(a.tap_offset[t], a.in_step), r = a.tap_offset[t] - q * a.in_step;
      shift_min = t == 0 ? q : std::min(shift_min, q);
      shift_max = t == 0 ? q : std::max(shift_max, q);
      const auto it = std::find(residue.begin(), residue.end(), r);
      slot.push_back(it - residue.begin());
      if (it == residue.end()) residue.push_back(r);
      shift.push_back(q);
    }
    for (int64_t& q : shift) q -= shift_min;
    in_step = a.in_step;
    length = ceil_div(a.count, tile) * tile + (shift_max - shift_min);
    // The buffers extend past the last output to whole tiles; their coordinates
    // (u + shift_min) * in_step must stay far from overflow even for an enormous (irrelevant) step.
    int64_t extent;
    usable = length <= max_length &&
             !__builtin_mul_overflow(std::max(std::abs(shift_min), std::abs(shift_min + length)), a.in_step, &extent) &&
             extent <= (int64_t(1) << 61);
    if (!usable) return;
    for (const int64_t r : residue) {
      std::vector<int64_t> src(static_cast<size_t>(length));
      for (int64_t u = 0; u < length; ++u) src[u] = map_padded_index((u + shift_min) * a.in_step + r, a.in_size, a.mode);
      // The longest run of entries reading inputs in_step apart (the interior), copied as a block
      // (a strided copy for a strided convolution).
      int64_t best_begin = 0, best_end = 0;
      for (int64_t u = 0; u < length;) {
        int64_t v = u + 1;
        if (src[u] >= 0)
          while (v < length && src[v] == src[v - 1] + a.in_step) ++v;
        if (src[u] >= 0 && v - u > best_end - best_begin) best_begin = u, best_end = v;
        u = v;
      }
      run_begin.push_back(best_begin);
      run_end.push_back(best_end);
      src_index.push_back(std::move(src));
    }
  }
};

using Phase = std::array<const AxisPlan*, kSpatialRank>;

struct PhaseShape {
  int64_t taps[kSpatialRank];
  int64_t count[kSpatialRank];
  int64_t num_taps = 1, num_pixels = 1;
  explicit PhaseShape(const Phase& ph) {
    for (int a = 0; a < kSpatialRank; ++a) {
      taps[a] = static_cast<int64_t>(ph[a]->taps.size());
      count[a] = ph[a]->count;
      num_taps *= taps[a];
      num_pixels *= count[a];
    }
  }
};

struct WorkItem {
  int64_t n, g, phase, m0, m1, nt0, nt1;
};

template <typename T>
void validate(const ConvProblem<T>& p) {
  auto bad = [](const char* what) { throw std::invalid_argument(std::string("convfast kernel: ") + what); };
  if (p.batch < 0 || p.groups < 1 || p.cin_per_group < 0 || p.cout_per_group < 0) bad("bad channel/batch sizes");
  for (int a = 0; a < kSpatialRank; ++a) {
    if (p.in_size[a] < 1 || p.out_size[a] < 0 || p.kernel[a] < 0) bad("bad spatial sizes");
    if (p.stride[a] < 1 || p.dilation[a] < 1) bad("stride and dilation must be positive");
    // Bounds under which every coordinate the plans compute (j * stride + t * dilation - pad, and
    // the transposed residue arithmetic) stays far from int64 overflow.
    constexpr int64_t kLimit = int64_t(1) << 61;
    int64_t span_out, span_kernel;
    if (__builtin_mul_overflow(std::max<int64_t>(p.out_size[a], 1) - 1, p.stride[a], &span_out) ||
        __builtin_mul_overflow(std::max<int64_t>(p.kernel[a], 1) - 1, p.dilation[a], &span_kernel) ||
        span_out > kLimit || span_kernel > kLimit || p.in_size[a] > kLimit || p.out_size[a] > kLimit ||
        p.pad_before[a] > kLimit || p.pad_before[a] < -kLimit)
      bad("sizes, stride, dilation or padding too large for 64-bit index arithmetic");
  }
  if (!p.x || !p.w || !p.y) bad("null tensor");
}

// Packs one n-tile of B for one (group, phase): panel[K][NR], K ordered channel-major then tap
// (k = ci * taps + t), the order of a contiguous (C_out, C_in, *k) weight row, so each of the NR
// source rows is read along its length; walked in chunks of k so that the chunk of the panel being
// written stays in L1.
//
// Where the tile's NR rows are whole and each row's K weights are contiguous in that order (a
// C-contiguous forward weight, every tap in the phase) and NR is a multiple of the vector width,
// the panel is written by L x L transposes of the rows (`transpose`, the micro-kernel table's
// transpose_block): the element-by-element loop took 2.5 ms of a 1 x 512 x 4 x 4 3x3 layer's 3.8 ms
// (its 9.4 MB of weights are packed on every call).
template <typename T>
void pack_weight_tile(const ConvProblem<T>& p, const Phase& ph, int64_t g, int nr, int64_t nt, T* panel,
                      TransposeBlock<T> transpose, int lanes) {
  const PhaseShape shape(ph);
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group;
  const int64_t K = shape.num_taps * cin;
  std::vector<int64_t> tap_offset;
  for (int64_t t0 = 0; t0 < shape.taps[0]; ++t0)
    for (int64_t t1 = 0; t1 < shape.taps[1]; ++t1)
      for (int64_t t2 = 0; t2 < shape.taps[2]; ++t2)
        tap_offset.push_back(ph[0]->taps[t0] * p.w_stride[0] + ph[1]->taps[t1] * p.w_stride[1] +
                             ph[2]->taps[t2] * p.w_stride[2]);
  const T* wg = p.w + g * p.w_stride_g;
  bool rows_contiguous = transpose != nullptr && lanes > 0 && nr % lanes == 0 && (nt + 1) * nr <= cout &&
                         (cin == 1 || p.w_stride_ci == shape.num_taps);
  for (int64_t t = 0; t < shape.num_taps && rows_contiguous; ++t) rows_contiguous = tap_offset[t] == t;
  int64_t k_start = 0;
  if (rows_contiguous) {
    k_start = K / lanes * lanes;
    for (int64_t k0 = 0; k0 < k_start; k0 += lanes)
      for (int c0 = 0; c0 < nr; c0 += lanes)
        transpose(wg + (nt * nr + c0) * p.w_stride_co + k0, p.w_stride_co, panel + k0 * nr + c0, nr);
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

// How the MR pixels of an m-tile read one tap: one contiguous run (interior, stride 1: a copy per
// k), a constant stride (strided convolutions: an unrolled gather), or anything else (tiles
// crossing an output row or touching the padding: element by element, zeros for padding).
enum class TapRead : int8_t { Run, Strided, Gather };

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
constexpr int kMinTileHeight = 4;  // the smallest height above

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

#include "winograd.hpp"
#include "channel_lanes.hpp"

}  // namespace

// ------------------------------------------------------------------------------------------------
// ConvPlan: everything that depends only on shapes and weights (axis plans, phases, blocking,
// packed weights) is built once; execute() runs it on any x/y/bias of those shapes.
// ------------------------------------------------------------------------------------------------

template <typename T>
struct ConvPlan<T>::Impl {
  ConvProblem<T> shape;  // sizes, strides of w; x/y pointers unused
  UkernelInfo<T> uk;
  const char* isa = "";
  bool direct = false;   // pixel-vector kernel (depthwise / small groups) instead of GEMM
  // GEMM with the roles of A and B swapped (see pixel_lanes_item): the packed weights are the
  // broadcast rows (MR output channels) and the packed input patches the vector lanes (NR pixels),
  // so C comes out channel-major, as channels-first y is.
  bool pixel_lanes = false;
  // Pixel lanes with the weights read in place (gemm_pixels micro-kernel: each k's MR channel
  // scalars at fixed offsets from row k of the weight), not packed: small maps under large
  // weights, where packing the weights cost as much as the products (see choose_pixel_lanes).
  bool weights_in_place = false;
  bool outputs_uncovered = false;  // transposed: some outputs receive no product (stride > kernel span)
  // GEMM, several phases of equal pixel counts (a transposed convolution whose output is stride x
  // its input, the common case): one work item runs a pixel block through every phase and then
  // writes the phases' interleaved outputs together, each output cache line in one pass. Measured
  // on 3-D k2s2 (1 thread): fusing alone did not change the time; with the blocked store of
  // run_item and the shared patches below, 1.3-1.5x.
  bool fuse_phases = false;
  static constexpr int64_t kMaxFusedPhases = 64;  // run_item keeps one output offset per phase
  static constexpr int kMaxTilePixels = 64;       // the widest direct tile (4 AVX-512 float vectors)
  static constexpr int kMaxDirectChannels = 6;    // the most output channels of a direct tile (kDirectChannelTiles)
  static_assert(kDirectChannelTiles[4] == kMaxDirectChannels, "direct_tile's bias_tile holds the widest channel tile");
  // Fused phases whose outputs interleave along the row (stride 2 along the last axis: residues 0
  // and 1 of the same rows), paired for the micro-kernel table's pair store: with the scalar scatter
  // they replace, storing took 40-75 % of run_item on k2s2 up-convolutions and on the grad_input
  // of stride-2 layers.
  std::vector<std::pair<int64_t, int64_t>> row_pairs;
  // Fused phases that also read the same input pixels for every tap (kernel size = stride, no
  // cropping: the U-Net up-convolution) pack the input patches once for all phases when K fits one
  // K block.
  bool phases_share_patches = false;
  int tile_m = 0;        // pixels per micro-tile (GEMM: MR; direct: PW)
  int tile_n = 0;        // output channels per micro-tile (GEMM: NR; direct: MRO)
  int direct_variant = 0;
  std::vector<AxisPlan> axes[kSpatialRank];
  std::vector<Phase> phases;
  std::vector<int64_t> wpack_offset;
  std::unique_ptr<AlignedBuffer<T>> wpack;
  std::vector<RowBufferPlan> row_plans;  // direct path: one per axis-2 plan
  // Direct path, plane mode (short rows): the last two axes are buffered together as 2-D slabs of
  // pitch col_plans[..].length, and pixel tiles run across output rows (the pitch's extra columns
  // are computed and dropped), so the per-row costs of short rows are paid once per block of rows.
  bool plane_mode = false;
  std::vector<RowBufferPlan> col_plans;   // per axis-2 plan, untiled: the pitch
  std::vector<RowBufferPlan> line_plans;  // per axis-1 plan: slots and shifts of the rows
  int64_t plane_rows = 0;                 // output rows (axis 1) per plane-mode work item
  static constexpr int64_t kMaxPlanesPerItem = 8;
  std::unique_ptr<AlignedBuffer<T>> zero_row;
  int64_t row_buffer_size = 0;           // direct path: per-thread row buffers, elements
  int64_t max_cache_entries = 0;         // direct path: row-buffer cache entries per thread
  int64_t n_tiles = 0, kc_max = 0, mc_max = 0, nt_per_block = 0, ldc = 0, max_taps = 0, max_k = 0;
  std::vector<std::unique_ptr<winograd::Conv<T>>> wino;  // per phase, when the layer runs Winograd (winograd.hpp)
  std::unique_ptr<channel_lanes::Conv<T>> lanes;         // depthwise layers with channels in the lanes

  // allow_winograd = false: the exact-chain paths only (the fallback of a Winograd plan whose
  // output came out non-finite, see execute).
  explicit Impl(const ConvProblem<T>& p, bool allow_winograd = true)
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
  static bool integer_weights(const ConvProblem<T>& p) {
    for (int64_t g = 0; g < p.groups; ++g)
      for (int64_t co = 0; co < p.cout_per_group; ++co)
        for (int64_t ci = 0; ci < p.cin_per_group; ++ci)
          for (int64_t k0 = 0; k0 < p.kernel[0]; ++k0)
            for (int64_t k1 = 0; k1 < p.kernel[1]; ++k1)
              for (int64_t k2 = 0; k2 < p.kernel[2]; ++k2) {
                const T v = p.w[g * p.w_stride_g + co * p.w_stride_co + ci * p.w_stride_ci + k0 * p.w_stride[0] +
                                k1 * p.w_stride[1] + k2 * p.w_stride[2]];
                if (v != std::nearbyint(v)) return false;
              }
    return true;
  }

  // Winograd (winograd.hpp) where it applies: every stride phase reads its inputs at unit step
  // along each axis with 3 or 2 equally spaced taps (any dilation, forward or transposed) or 1 tap,
  // at least two axes with more than one (a 1-D tile saves only a third of the products, which the
  // transforms eat). Chosen automatically when both channel counts per group reach kMinChannels
  // (64 in 2-D, 32 in 3-D), where the GEMMs of the transform points amortise the transforms;
  // CONVFAST_ALGO=winograd forces it wherever it applies, gemm|direct never take it. Measured
  // (float32, AVX2, 8 x C x 56 x 56, 3x3, 1 thread, against the GEMM): 0.72x at 16 channels, 0.80x
  // at 32, 1.03x at 48, 1.37x at 64; 3-D 3x3x3 (2 x C x 24^3): 0.87x at 16, 1.67x at 32, where a
  // tile saves 3.4x of the products instead of 2.25x.
  bool choose_winograd(const ConvProblem<T>& p) {
    const char* forced = std::getenv("CONVFAST_ALGO");
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
    const int64_t kMinChannels = winograd_axes == 3 ? 32 : 64;
    if (force != "winograd" && (p.cin_per_group < kMinChannels || p.cout_per_group < kMinChannels)) return false;
    // Enough tiles to amortise the weight transform, which each call redoes: at least 16, plus 4 per
    // MiB of transformed weights (they outgrow the caches). 1 thread, float32, against the GEMM:
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
    if (force != "winograd" && tiles < 16.0 + 4.0 * transform_mib) return false;
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
  bool choose_channel_lanes(const ConvProblem<T>& p) {
    const char* forced = std::getenv("CONVFAST_ALGO");
    const std::string force = forced ? forced : "";
    if (!channel_lanes::Conv<T>::applies(p, phases, uk) || (force.empty() ? p.groups < uk.lanes : force != "lanes"))
      return false;
    bool ok = false;
    lanes.reset(new channel_lanes::Conv<T>(p, axes, uk, ok));
    if (!ok) lanes.reset();
    return ok;
  }

  // The direct micro-kernel's channel tile (index into kDirectChannelTiles) for C_out/G channels:
  // the smallest that holds them, up to 6. 6-channel tiles have the best loads-per-FMA ratio, but
  // a C_out/G that is a multiple of 4 and that 6-channel tiles overshoot by more than 10 % (8, 16,
  // 20, 32, ...: 32 channels would be computed as 36) takes 4-channel tiles, which waste none.
  // 3 channels (an RGB output, the stem's grad_input) take 3-channel tiles of three vectors of
  // pixels: 4-channel tiles wasted a quarter of their products; the stem's grad_input measured
  // 46.1 -> 40.9 ms float64, 37.1 -> 32.7 float32 (medians, alternating processes, 2 rounds each).
  // Three channels by four vectors ran float32 at half the speed, probably because twelve
  // accumulators and four input vectors fill all sixteen AVX2 registers (not profiled).
  static int direct_variant_for(int64_t cout) {
    const int variant = cout <= 1 ? 0 : cout <= 2 ? 1 : cout <= 3 ? 2 : cout <= 4 ? 3 : 4;
    return variant == 4 && cout % 4 == 0 && ceil_div(cout, 6) * 6 * 10 > cout * 11 ? 3 : variant;
  }

  // GEMM (pixels x output channels, output channels in the vector lanes) or direct (output
  // channels broadcast, pixels in the vector lanes, inputs copied row by row, channels-first rows
  // written in place). Measured on the layer suite (AVX2, 2 threads), direct wins when a group has
  // few output channels (depthwise: one; a GEMM would leave most lanes empty), for very few input
  // channels (the 3 -> 64 stem, 3-D 1 -> 32: K too short to amortise packing) and for large
  // channels-first planes at stride 1 (U-Net 128x128, 3-D 32^3: GEMM packing strides across
  // planes of 64 KiB and more); GEMM wins for the usual 2-D layers, strided 3-D layers,
  // transposed layers, channels-last outputs and short rows (7x7 maps), where it tiles across rows.
  // CONVFAST_ALGO=gemm|direct forces one where it can run (tests use it).
  void choose_algorithm(const ConvProblem<T>& p) {
    constexpr int64_t kLargePlane = 16384;  // input elements per channel
    const int64_t cin = p.cin_per_group, cout = p.cout_per_group;
    const int64_t plane = p.in_size[0] * p.in_size[1] * p.in_size[2];
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
    const char* forced = std::getenv("CONVFAST_ALGO");
    const std::string force = forced ? forced : "";
    if (force == "gemm")
      direct = false;
    else if (force == "direct")
      direct = possible;
    else
      direct = possible && (2 * cout <= uk.nr || (p.y_stride[2] == 1 && fill >= 0.75 &&
                                                  (cin <= 4 || (plane >= kLargePlane && unit_stride))));
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
  void choose_plane_mode(const ConvProblem<T>& p) {
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

  // Whether gemm_block reads a tile whose pixels' inputs are `step` apart (for every tap) in place,
  // with `row_taps` taps along the row (see below).
  static bool steps_in_place(int64_t step, int64_t row_taps) { return step == 1 || (step == 2 && row_taps > 2); }
  static bool reads_in_place(const PhaseShape& shape, int64_t row_step) {
    return shape.num_taps > 1 && steps_in_place(row_step, shape.taps[2]);
  }

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
  void gemm_block(const ConvProblem<T>& p, const PhaseShape& shape, const WorkItem& it, const T* wp, const T* xg,
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
    const bool layer_in_place = reads_in_place(shape, row_step);
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

  // Direct path, one output row (all axes but the last fixed) at a time. The inputs each
  // (outer tap, input channel) reads along the last axis are first copied into row buffers laid
  // out by RowBufferPlan -- so every tap of every pixel tile reads PW contiguous values, whatever
  // the stride, padding mode or input layout -- and one source pointer per (tap, input channel)
  // serves all tiles of the row.
  template <bool kToY>
  void direct_rows(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s) const {
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

  // y[q] = tile[q] + bias; restrict (the tile is thread scratch, never y) lets it vectorise.
  static void store_with_bias(const T* __restrict tile, T bias, int64_t n, T* __restrict y) {
    for (int64_t q = 0; q < n; ++q) y[q] = tile[q] + bias;
  }

  // Plane mode: item rows are (output plane j0, block of plane_rows output rows along axis 1). The
  // slabs hold, per (axis-0 tap, input channel, axis-1 slot, axis-2 slot), the rows the block reads,
  // each a full pitch P wide; output (j1, j2) of the block is flat pixel q = (j1 - first) * P + j2
  // and reads slab + shift1[t1] * P + shift2[t2] at offset q for tap (t1, t2).
  template <bool kToY>
  void direct_planes(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s) const {
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
  template <typename Write>
  void direct_tile(const ConvProblem<T>& p, int64_t K, const T* const* rows, int64_t offset, const T* wp, int64_t g,
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

  static int64_t cache_entries(int64_t outer_taps0, int64_t outer_taps1) { return 2 * outer_taps0 * outer_taps1; }

  template <int STRIDE>
  static void strided_copy(const T* __restrict src, int64_t n, T* __restrict dst) {
    for (int64_t u = 0; u < n; ++u) dst[u] = src[u * STRIDE];
  }

  // Not inlined: the stride-2 depthwise layer, whose time is mostly this copy, measured 0.94-0.97x
  // when it was inlined into a larger direct_planes; its code then no longer depends on the caller.
  __attribute__((noinline)) static void fill_row_buffer(const RowBufferPlan& rb, int64_t slot, const T* x_row,
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

  // Pixels in the vector lanes: single-phase layers with channels-first outputs whose every tile
  // gemm_block would pack (one-tap layers, strided layers not read in place). There the
  // usual orientation (pixels broadcast, channels in the lanes) spends its time outside the
  // micro-kernel: packing six pixels per k and transposing C into y's channel-major rows; swapped,
  // a k of the panel is NR pixels (a row's contiguous run, one copy) and C's rows are y's rows.
  // CONVFAST_PIXEL_LANES=0|1 excludes or forces it (tests use it).
  bool choose_pixel_lanes(const ConvProblem<T>& p) const {
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

  // The weights read in place: one phase (forward or transposed), y channels-first with
  // contiguous rows (the pixel-lanes store), few output pixels (at most kSmallM over the whole
  // call, the batch included) and large weights, which a call would otherwise pack (read and
  // write) before reading them once more for so few pixels: from 1 MiB where the packed GEMM would
  // take the pixel lanes too (1x1 layers) or the pixels fit one tile, from 8 MiB against the usual
  // orientation, whose tiles suit 49 pixels better. 2 threads, float32, p25 against the packed
  // GEMM (noisy host, several runs): 512 -> 2048 1x1 on 7x7 1.36-1.52x, 320 -> 1280 1.37-1.46x,
  // 512 3x3 on 4x4 0.98-1.8x, on 7x7 0.98-1.22x, DCGAN's 100 -> 512 k4 on 1x1 1.12-1.22x;
  // 256 -> 512 3x3 s2 on 14x14 (4.5 MiB) 0.82-1.06x, 256 3x3 on 7x7 (2.3 MiB) 0.76-0.85x.
  // CONVFAST_WEIGHTS_IN_PLACE=1 takes it wherever it can run, =0 never (tests); a forced
  // CONVFAST_ALGO keeps the packed GEMM.
  bool choose_weights_in_place(const ConvProblem<T>& p, bool packed_pixel_lanes) const {
    constexpr int64_t kSmallM = 64;
    if (phases.size() != 1 || p.y_stride_c == 1 || uk.fn_pixels == nullptr ||
        p.y_stride[2] * phases[0][2]->out_step != 1)
      return false;
    if (const char* forced = std::getenv("CONVFAST_WEIGHTS_IN_PLACE")) {
      if (*forced) return std::string(forced) == "1";
    }
    if (const char* lanes = std::getenv("CONVFAST_PIXEL_LANES")) {
      if (std::string(lanes) == "0") return false;  // no pixel-lanes orientation at all
    }
    if (const char* algo = std::getenv("CONVFAST_ALGO")) {
      if (*algo) return false;
    }
    const int64_t pixels = checked_mul(p.batch, PhaseShape(phases[0]).num_pixels);
    const int64_t weight_bytes = checked_mul(checked_mul(p.groups * p.cout_per_group, max_k), (int64_t)sizeof(T));
    const int64_t large = packed_pixel_lanes || pixels <= uk.nr ? int64_t(1) << 20 : int64_t(8) << 20;
    return pixels <= kSmallM && weight_bytes >= large;
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
  void pixel_lanes_item(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s) const {
    const Phase& ph = phases[it.phase];
    const PhaseShape shape(ph);
    const int64_t cin = p.cin_per_group, cout = p.cout_per_group, T_ = shape.num_taps, K = T_ * cin;
    const int64_t mcount = it.m1 - it.m0, p_tiles = ceil_div(mcount, (int64_t)tile_m);
    const int nr = tile_m, mr = tile_n;
    const T* xg = p.x + it.n * p.x_stride_n + it.g * cin * p.x_stride_c;
    const T* wp = weights_in_place ? nullptr : wpack->get() + wpack_offset[it.g * (int64_t)phases.size() + it.phase];
    // In place: row k = (ci, tap) of the group's weights, and per channel tile the MR channels'
    // offsets (the last tile's missing channels repeat the last one; their rows are never stored).
    std::vector<int64_t> w_row, w_channel;
    std::vector<const T*> w_rows;
    if (weights_in_place) {
      for (int64_t ci = 0; ci < cin; ++ci)
        for (int64_t t0 = 0; t0 < shape.taps[0]; ++t0)
          for (int64_t t1 = 0; t1 < shape.taps[1]; ++t1)
            for (int64_t t2 = 0; t2 < shape.taps[2]; ++t2)
              w_row.push_back(ci * p.w_stride_ci + ph[0]->taps[t0] * p.w_stride[0] + ph[1]->taps[t1] * p.w_stride[1] +
                              ph[2]->taps[t2] * p.w_stride[2]);
      for (int64_t co = 0; co < n_tiles * mr; ++co) w_channel.push_back(std::min(co, cout - 1) * p.w_stride_co);
      w_rows.resize(static_cast<size_t>(kc_max));
    }
    const T* wg_in_place = p.w + it.g * p.w_stride_g;
    int64_t* yoff = s.y_offsets.get();
    block_offsets(p, ph, shape, it.m0, mcount, s.tap_base.data(), s.x_offsets.get(), yoff);
    T* C = s.c_block.get();
    T* panel = s.a_panel.get();
    T* yg = p.y + it.n * p.y_stride_n + it.g * cout * p.y_stride_c;
    const T* bg = p.bias ? p.bias + it.g * cout * p.bias_stride : nullptr;
    // The channel tiles cover n_tiles * mr >= cout rows: a tile in y needs them all to be y's.
    const bool whole_channel_tiles = n_tiles * mr == cout && !weights_in_place;
    // Tiles in y get the bias from the micro-kernel with their last K block, from the group's bias
    // made contiguous (adding it afterwards read y back; 1x1 256->64: 1.04-1.2x float32 at 2
    // threads on a noisy host, level at 1 thread).
    T* bias_rows = bg && whole_channel_tiles ? s.row_bias.get() : nullptr;
    if (bias_rows)
      for (int64_t co = 0; co < cout; ++co) bias_rows[co] = bg[co * p.bias_stride];
    char* in_y = s.tile_in_y.data();  // per tile: its NR pixels all exist and are consecutive in y
    for (int64_t pt = 0; pt < p_tiles; ++pt) {
      const int64_t r0 = pt * nr;
      bool consecutive = K > 0 && whole_channel_tiles && r0 + nr <= mcount;
      for (int64_t r = 1; r < nr && consecutive; ++r) consecutive = yoff[r0 + r] == yoff[r0] + r;
      in_y[pt] = consecutive;
    }
    // One tap and the block's pixels consecutive in x (a 1x1 stride-1 layer on a contiguous plane):
    // the whole tiles are packed channel by channel, each channel's run of the block read once,
    // front to back, into every tile's panel, instead of tile by tile (each tile reading 64 bytes
    // from every channel plane: more streams than the hardware prefetcher follows). The values
    // and their places in the panels are the same.
    const int64_t* xoff = s.x_offsets.get();
    bool consecutive = T_ == 1 && mcount >= nr && xoff[0] != kOutside;
    for (int64_t m = 1; m < mcount && consecutive; ++m) consecutive = xoff[m] == xoff[0] + m;
    const int64_t run_tiles = consecutive ? mcount / nr : 0;
    constexpr int64_t kPrefetchChannels = 8;
    const T* const run_start = consecutive ? xg + xoff[0] : nullptr;
    if (K == 0) std::memset(C, 0, sizeof(T) * static_cast<size_t>(n_tiles * mr * mc_max));
    for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, K - k0);
      if (run_tiles > 0)
        for (int64_t kk = 0; kk < kc; ++kk) {
          const T* __restrict src = run_start + (k0 + kk) * p.x_stride_c;
          if (kk + kPrefetchChannels < kc)
            for (int64_t e = 0; e < run_tiles * nr; e += 64 / (int64_t)sizeof(T))
              __builtin_prefetch(src + kPrefetchChannels * p.x_stride_c + e);
          for (int64_t pt = 0; pt < run_tiles; ++pt) {
            T* __restrict dst = panel + (pt * kc + kk) * nr;
            for (int r = 0; r < nr; ++r) dst[r] = src[pt * nr + r];  // inline: a memcpy call per 64 bytes cost more
          }
        }
      // Several taps: k by k across the tiles (pack_tiles_by_k; the k2s2 grad_inputs 1.07-1.11x in
      // 2-D, 1.07 / 1.17x in 3-D, float64 / float32, p25, one process alternating). One tap (the 1x1 stride-2 forward) measured
      // 0.93-0.96x that way, so those keep tile by tile.
      if (T_ > 1)
        pack_patches_by_k(xg, p.x_stride_c, s.x_offsets.get(), T_, mcount, nr, run_tiles, p_tiles, k0, kc,
                          s.tap_kind.data(), s.tap_base.data(), s.tap_step.data(), panel);
      else
        for (int64_t pt = run_tiles; pt < p_tiles; ++pt)
          pack_input_patches(xg, p.x_stride_c, s.x_offsets.get(), T_, mcount, nr, pt, k0, kc, s.tap_kind.data(),
                             s.tap_base.data(), s.tap_step.data(), panel + pt * nr * kc);
      // While the tiles compute, the next block's channel runs (the same pixels' successors in x,
      // most likely the next item's) are prefetched, a share per tile, so that its packing does not
      // wait on memory.
      const int64_t next_lines = run_tiles > 0 && it.m1 + mcount <= PhaseShape(ph).num_pixels
                                     ? ceil_div(mcount * (int64_t)sizeof(T), 64) : 0;
      const int64_t share = ceil_div(kc * next_lines, p_tiles);
      for (int64_t pt = 0; pt < p_tiles; ++pt) {
        for (int64_t q = pt * share; q < std::min(kc * next_lines, (pt + 1) * share); ++q)
          __builtin_prefetch(run_start + mcount + (k0 + q / next_lines) * p.x_stride_c + (q % next_lines) * (64 / (int64_t)sizeof(T)), 0, 1);
        T* c_tile = in_y[pt] ? yg + yoff[pt * nr] : C + pt * nr;
        const int64_t ldc_ = in_y[pt] ? p.y_stride_c : mc_max;
        if (weights_in_place) {
          for (int64_t kk = 0; kk < kc; ++kk) w_rows[kk] = wg_in_place + w_row[k0 + kk];
          for (int64_t ct = it.nt0; ct < it.nt1; ++ct)
            uk.fn_pixels(kc, w_rows.data(), w_channel.data() + ct * mr, panel + pt * nr * kc, c_tile + ct * mr * ldc_,
                         ldc_, k0 > 0);
          continue;
        }
        for (int64_t ct = 0; ct < n_tiles; ++ct)
          if (in_y[pt] && bias_rows && k0 + kc == K)
            uk.fn_row_bias(kc, wp + ct * K * mr + k0 * mr, panel + pt * nr * kc, c_tile + ct * mr * ldc_, ldc_, k0 > 0,
                           bias_rows + ct * mr);
          else
            uk.fn(kc, wp + ct * K * mr + k0 * mr, panel + pt * nr * kc, c_tile + ct * mr * ldc_, ldc_, k0 > 0);
      }
    }
    // The rest of y: each tile's bias, or its runs of pixels contiguous in y copied from C.
    for (int64_t pt = 0; pt < p_tiles; ++pt) {
      const int64_t tile_end = std::min(mcount, (pt + 1) * nr);
      if (in_y[pt]) continue;  // complete, bias included
      for (int64_t r0 = pt * nr; r0 < tile_end;) {
        int64_t r1 = r0 + 1;
        while (r1 < tile_end && yoff[r1] == yoff[r0] + (r1 - r0)) ++r1;
        for (int64_t co = it.nt0 * mr; co < std::min(cout, it.nt1 * mr); ++co) {  // the item's channel tiles
          const T b = bg ? bg[co * p.bias_stride] : T(0);
          const T* __restrict src = C + co * mc_max + r0;
          T* __restrict dst = yg + co * p.y_stride_c + yoff[r0];
          for (int64_t q = 0; q < r1 - r0; ++q) dst[q] = src[q] + b;
        }
        r0 = r1;
      }
    }
  }

  void run_item(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s) const {
    // Layers with one channel tile never write y directly (see direct_tile), and their loops are
    // compiled without that code: with it, the depthwise layers measured 0.94x in float32 and the
    // grouped 4 -> 4 layer 0.91x in float64.
    if (plane_mode) return n_tiles > 1 ? direct_planes<true>(p, it, s) : direct_planes<false>(p, it, s);
    if (direct) return n_tiles > 1 ? direct_rows<true>(p, it, s) : direct_rows<false>(p, it, s);
    if (pixel_lanes) return pixel_lanes_item(p, it, s);
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
      const bool edges_last = phases.size() == 1 && reads_in_place(shape, row_step);
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

  // The outputs no phase writes are the bias (or zero). Filled first; the phases then overwrite theirs.
  void fill_with_bias(const ConvProblem<T>& p) const {
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
  int64_t direct_rows_per_item(const ConvProblem<T>& p, int64_t rows, int64_t row_length) const {
    constexpr int64_t kDirectItemPixels = 1024;
    const int64_t units = std::max<int64_t>(1, p.batch * p.groups * (int64_t)phases.size());
    const int64_t min_blocks = ceil_div(4 * (int64_t)std::max(1, get_num_threads()), units);
    return std::max<int64_t>(1, std::min(kDirectItemPixels / std::max<int64_t>(1, row_length), ceil_div(rows, min_blocks)));
  }

  void execute(const ConvProblem<T>& p) const {
    const int64_t G = p.groups;
    for (int a = 0; a < kSpatialRank; ++a)
      if (p.out_size[a] == 0) return;  // nothing to write (the Python layer never calls with this)
    if (outputs_uncovered) fill_with_bias(p);
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
    if (!direct && !plane_mode && !pixel_lanes && get_num_threads() > 1) {
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

  std::string describe() const {
    if (!wino.empty()) {  // the tile of phase 0's first Winograd axis, e.g. "F(2,3)"
      const winograd::Conv<T>& w0 = *wino[0];
      const winograd::Axis& ax = w0.axes[0].winograd() ? w0.axes[0] : w0.axes[1];
      return std::string("winograd F(") + std::to_string(ax.m) + "," + std::to_string(ax.taps) + ") " + isa + " " +
             std::to_string(w0.points) + " points " + std::to_string(w0.pw) + "x" + std::to_string(w0.mro) +
             " phases=" + std::to_string(wino.size());
    }
    if (lanes)
      return std::string("channel_lanes ") + isa + " " + std::to_string(lanes->L) + " lanes rows=" +
             std::to_string(lanes->rows[0].rows_per_item) + " phases=" + std::to_string(lanes->phase_plans.size()) +
             (lanes->pair_store ? " paired" : "");
    return std::string(plane_mode ? "direct_planes" : direct ? "direct_rows" : weights_in_place ? "pixel_lanes_gemm_in_place" : pixel_lanes ? "pixel_lanes_gemm" : "gather_gemm") + " " + isa + " " + std::to_string(tile_m) + "x" +
           std::to_string(tile_n) + " phases=" + std::to_string(phases.size()) + (fuse_phases ? " fused" : "") +
           (row_pairs.empty() ? "" : " paired");
  }
};

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
  const CallThreads threads(conv_multiply_adds(p));
  impl_ = std::make_shared<const Impl>(batch_as_axis0(p));
}

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
  const CallThreads threads(conv_multiply_adds(p));
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
  const CallThreads threads(conv_multiply_adds(p));
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
