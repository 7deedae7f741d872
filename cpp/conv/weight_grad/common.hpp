// Pieces shared by the weight-gradient algorithms (internal): validation, lane copies, K runs and
// pixel cursors, the gradient-point transforms, channels-last views, and the declarations of the
// algorithm units, which registry.cpp chooses among.
#pragma once
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

namespace convfast {
namespace wgrad {

#include "../winograd_transforms.hpp"  // the dilated tiles' layout, shared with the forward

using detail::AlignedBuffer;
using detail::ceil_div;
using detail::checked_add;
using detail::checked_mul;

// K block: a B-panel of kKc x NR (16 KiB for float32 AVX2) stays in L1.
constexpr int64_t kKc = 256;
// L2 budget of one item, in bytes: three quarters for its row panels of a k-block (kKc x rows,
// with one lane tile's C buffer), the rest for its lane panels and C buffers. (Half for the rows
// split the 128 row channels of a float64 layer into two blocks, and each block packs a's panels
// again: the transposed k3s2p1op1 128 -> 64 layer's float64 weight gradient 16.8 -> 15.9 ms, k2s2
// 8.5 -> 7.5, p25, one process; float32 level to 5 % better.)
constexpr int64_t kL2Bytes = 512 << 10;
// Most blocks of b tiles for which a channels-first a is packed straight from its layout (see run()).
constexpr int64_t kMaxDirectBBlocks = 2;

template <typename T>
void validate(const WeightGradProblem<T>& p) {
  auto bad = [](const char* what) { throw std::invalid_argument(std::string("convfast weight_grad: ") + what); };
  if (p.batch < 0 || p.groups < 1 || p.a_channels < 0 || p.b_channels < 0) bad("bad channel/batch sizes");
  if (p.a_channels % p.groups != 0 || p.b_channels % p.groups != 0) bad("channels must be multiples of groups");
  constexpr int64_t kLimit = int64_t(1) << 61;
  for (int a = 0; a < kSpatialRank; ++a) {
    if (p.a_size[a] < 0 || p.b_size[a] < 0 || p.kernel[a] < 0) bad("bad spatial sizes");
    if (p.stride[a] < 1 || p.dilation[a] < 1) bad("stride and dilation must be positive");
    // Every coordinate computed below (o * stride + t * dilation - pad) stays far from overflow.
    int64_t span_out, span_kernel;
    if (__builtin_mul_overflow(std::max<int64_t>(p.b_size[a], 1) - 1, p.stride[a], &span_out) ||
        __builtin_mul_overflow(std::max<int64_t>(p.kernel[a], 1) - 1, p.dilation[a], &span_kernel) ||
        span_out > kLimit || span_kernel > kLimit || p.a_size[a] > kLimit || p.b_size[a] > kLimit ||
        p.pad_before[a] > kLimit || p.pad_before[a] < -kLimit)
      bad("sizes, stride, dilation or padding too large for 64-bit index arithmetic");
  }
  if (static_cast<int>(p.mode) < 0 || static_cast<int>(p.mode) > 4) bad("bad padding mode");
  if (!p.a || !p.b || !p.out) bad("null tensor");
}

// Copies n lanes; the common widths as fixed-size copies (inlined vector moves).
template <typename T>
inline void copy_lanes(T* __restrict dst, const T* __restrict src, int n) {
  switch (n) {
    case 4: std::memcpy(dst, src, 4 * sizeof(T)); return;
    case 6: std::memcpy(dst, src, 6 * sizeof(T)); return;
    case 8: std::memcpy(dst, src, 8 * sizeof(T)); return;
    case 12: std::memcpy(dst, src, 12 * sizeof(T)); return;
    case 16: std::memcpy(dst, src, 16 * sizeof(T)); return;
    case 32: std::memcpy(dst, src, 32 * sizeof(T)); return;
    default: std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
  }
}

// Zeroes / copies a few entries with fixed-size calls (inlined), where a loop would be turned into
// a library call per row by the compiler.
template <typename T>
inline void zero_lanes(T* dst, int n) {
  switch (n) {
    case 4: std::memset(dst, 0, 4 * sizeof(T)); return;
    case 6: std::memset(dst, 0, 6 * sizeof(T)); return;
    case 8: std::memset(dst, 0, 8 * sizeof(T)); return;
    case 12: std::memset(dst, 0, 12 * sizeof(T)); return;
    case 16: std::memset(dst, 0, 16 * sizeof(T)); return;
    case 32: std::memset(dst, 0, 32 * sizeof(T)); return;
    default: std::memset(dst, 0, static_cast<size_t>(n) * sizeof(T));
  }
}
template <typename T>
inline void copy_few(T* __restrict dst, const T* __restrict src, int n) {
  switch (n) {
    case 1: dst[0] = src[0]; return;
    case 2: std::memcpy(dst, src, 2 * sizeof(T)); return;
    case 3: std::memcpy(dst, src, 3 * sizeof(T)); return;
    case 4: std::memcpy(dst, src, 4 * sizeof(T)); return;
    case 5: std::memcpy(dst, src, 5 * sizeof(T)); return;
    case 6: std::memcpy(dst, src, 6 * sizeof(T)); return;
    case 7: std::memcpy(dst, src, 7 * sizeof(T)); return;
    case 8: std::memcpy(dst, src, 8 * sizeof(T)); return;
    case 9: std::memcpy(dst, src, 9 * sizeof(T)); return;
    case 10: std::memcpy(dst, src, 10 * sizeof(T)); return;
    default: copy_lanes(dst, src, n);
  }
}

// A run of consecutive k along the innermost output axis: k = ((n * O0 + o0) * O1 + o1) * O2 + o2
// for o2 in [o2, o2 + len).
struct Run {
  int64_t n, o0, o1, o2, len;
};

// Position k = (n, o0, o1, o2) of the reduction (batch x output pixels, row-major), stepped along
// runs of the last axis without divisions.
struct PixelCursor {
  int64_t k, n, o0, o1, o2;
  PixelCursor(int64_t k0, const int64_t O[3]) : k(k0) {
    int64_t rem = k0;
    o2 = rem % O[2];
    rem /= O[2];
    o1 = rem % O[1];
    rem /= O[1];
    o0 = rem % O[0];
    n = rem / O[0];
  }
  void advance(int64_t len, const int64_t O[3]) {  // len <= O[2] - o2
    k += len;
    if ((o2 += len) < O[2]) return;
    o2 = 0;
    if (++o1 < O[1]) return;
    o1 = 0;
    if (++o0 < O[0]) return;
    o0 = 0;
    ++n;
  }
};


// The Winograd weight gradient's transform A dy of F(M, 3) along one axis (see
// WeightGrad::run_winograd), on `lanes` independent lanes whose entries along the axis are s
// apart: the gradients of a tile's M outputs (entries 0 .. M - 1) -> its M + 2 points. (G^T m,
// the points back to the taps, is the micro-kernel unit's winograd_gradient_taps.)
template <int M, typename T>
inline void gradient_line(T* __restrict b, int64_t s, int64_t lanes) {
  for (int64_t l = 0; l < lanes; ++l) {
    T g[M], r[M + 2];
    for (int e = 0; e < M; ++e) g[e] = b[e * s + l];
    winograd::gradient_points<M>(g, r);
    for (int e = 0; e < M + 2; ++e) b[e * s + l] = r[e];
  }
}

// Calls line(offset, stride) for every line along each axis a with along[a] of an
// n[0] x n[1] x n[2] x lanes buffer.
template <typename Line>
inline void for_each_line(const bool along[kSpatialRank], const int64_t n[kSpatialRank], int64_t lanes, Line&& line) {
  for (int a = 0; a < kSpatialRank; ++a) {
    if (!along[a]) continue;
    int64_t inner = lanes, outer = 1;
    for (int b = a + 1; b < kSpatialRank; ++b) inner *= n[b];
    for (int b = 0; b < a; ++b) outer *= n[b];
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t i = 0; i < inner; i += lanes) line(o * n[a] * inner + i, inner);
  }
}

// A channel-contiguous view of an (N, C, S0, S1, S2) tensor src with element strides sn, sc, ss:
// src itself when its channel stride is 1 (channels-last), C is 1 or in_place is set, else a
// channels-last copy (N, S0, S1, S2, C) made in `copy`. Returns the view's data; its batch and
// spatial strides go to view_n, view_s (channels at stride 1). uk's transpose_block moves L x L
// blocks where the rows are contiguous.
template <typename T>
const T* channels_last(const T* src, int64_t batch, int64_t C, const int64_t size[kSpatialRank], int64_t sn, int64_t sc,
                       const int64_t ss[kSpatialRank], bool in_place, int nthreads, const UkernelInfo<T>& uk,
                       std::unique_ptr<AlignedBuffer<T>>& copy, int64_t& view_n, int64_t view_s[kSpatialRank]) {
  if (sc == 1 || C == 1 || in_place) {
    view_n = sn;
    for (int a = 0; a < kSpatialRank; ++a) view_s[a] = ss[a];
    return src;
  }
  const int64_t rows = checked_mul(checked_mul(batch, size[0]), size[1]);
  copy = std::make_unique<AlignedBuffer<T>>(checked_mul(checked_mul(rows, size[2]), C));
  T* base = copy->get();
  view_s[2] = C;
  view_s[1] = size[2] * C;
  view_s[0] = size[1] * view_s[1];
  view_n = size[0] * view_s[0];
  // Blocks of kSeg positions, walked kCb channels at a time: kCb source rows are read along
  // their length while each position's kCb channels are written as one contiguous run (writing
  // one channel at a time would stride the destination by C, which thrashes the cache sets).
  // Contiguous rows go L x L through the unit's transpose (element by element, the copies were
  // 14 % of the 64-channel 56x56 layer's float64 weight gradient).
  constexpr int64_t kSeg = 64, kCb = 16;
  const int64_t segs = ceil_div(size[2], kSeg), jobs = checked_mul(rows, segs);
  const int64_t row_stride = view_s[1];
  const int L = uk.transpose_block && ss[2] == 1 ? uk.lanes : 0;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t job = 0; job < jobs; ++job) {
    const int64_t row = job / segs, i2b = (job % segs) * kSeg, len = std::min(kSeg, size[2] - i2b);
    const int64_t n = row / (size[0] * size[1]), i0 = (row / size[1]) % size[0], i1 = row % size[1];
    const T* from = src + n * sn + i0 * ss[0] + i1 * ss[1] + i2b * ss[2];
    T* dst = base + row * row_stride + i2b * C;
    const int64_t s2 = ss[2];
    int64_t c0 = 0;
    if (L)
      for (; c0 + L <= C; c0 += L) {
        const T* fc = from + c0 * sc;
        T* dc = dst + c0;
        int64_t j = 0;
        for (; j + L <= len; j += L) uk.transpose_block(fc + j, sc, dc + j * C, C);
        for (; j < len; ++j)
          for (int64_t c = 0; c < L; ++c) dc[j * C + c] = fc[c * sc + j];
      }
    for (; c0 < C; c0 += kCb) {
      const T* fc = from + c0 * sc;
      T* dc = dst + c0;
      if (C - c0 >= kCb) {
        for (int64_t j = 0; j < len; ++j)
          for (int64_t c = 0; c < kCb; ++c) dc[j * C + c] = fc[c * sc + j * s2];
      } else {
        for (int64_t j = 0; j < len; ++j)
          for (int64_t c = 0; c < C - c0; ++c) dc[j * C + c] = fc[c * sc + j * s2];
      }
    }
  }
  return base;
}

// Whether every element of the (batch, C, S0, S1, S2) tensor is an integer (stops at the first
// that is not: at once for most real data).
template <typename T>
bool integer_valued(const T* x, int64_t batch, int64_t C, const int64_t size[kSpatialRank], int64_t sn, int64_t sc,
                    const int64_t ss[kSpatialRank]) {
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i0 = 0; i0 < size[0]; ++i0)
        for (int64_t i1 = 0; i1 < size[1]; ++i1) {
          const T* row = x + n * sn + c * sc + i0 * ss[0] + i1 * ss[1];
          for (int64_t i2 = 0; i2 < size[2]; ++i2)
            if (row[i2 * ss[2]] != std::nearbyint(row[i2 * ss[2]])) return false;
        }
  return true;
}

// The algorithm units (each explicitly instantiated for float and double).
// depthwise.cpp: Ca/G = 1 and Cb/G <= kMaxMultiplier.
constexpr int64_t kMaxMultiplier = 4;
template <typename T>
void depthwise_weight_grad(const WeightGradProblem<T>& p);
// rows.cpp: few input channels per group, contiguous output-gradient rows.
template <typename T>
bool rows_weight_grad_applies(const WeightGradProblem<T>& p);
template <typename T>
void rows_weight_grad(const WeightGradProblem<T>& p);
// channel_rows.cpp: one-tap layers (1x1, stride 1, unpadded) with contiguous rows and few input
// channels per group.
template <typename T>
bool channel_rows_weight_grad_applies(const WeightGradProblem<T>& p);
template <typename T>
void channel_rows_weight_grad(const WeightGradProblem<T>& p);
// gemm.cpp: the Winograd tile WeightGrad::choose_winograd takes (0: none), and the GEMM, Winograd
// with tile wino_m (0: the GEMM).
template <typename T>
int winograd_weight_grad_tile(const WeightGradProblem<T>& p);
template <typename T>
void gemm_weight_grad(const WeightGradProblem<T>& p, int wino_m);

}  // namespace wgrad
}  // namespace convfast
