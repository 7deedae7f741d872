// The 1-D Winograd transforms (see algorithms/winograd.cpp): the point formulas, shared by the forward
// engine's line-by-line path (algorithms/winograd.cpp) and the fused tile transforms
// of the micro-kernel units (cpp/ukernels/winograd_ukernel_impl.hpp, which the weight gradient's
// F(2, 3) also uses). Each includer places it in its own namespace (winograd::).
#pragma once
#include <cstdint>
#include <cstring>

namespace winograd {

// Tiles along an axis at dilation d: a tile holds outputs o + e * d (e < m), for o = b * m * d + r,
// r < d (blocks of m * d outputs holding d tiles each, the last block only the r it reaches), so
// that dilated tiles interleave and every output is in one tile. Shared by the forward's axes
// (algorithms/winograd.cpp) and the weight gradient's F(2, 3) (weight_grad/gemm.cpp).
inline int64_t dilated_tile_count(int64_t count, int64_t m, int64_t d) {
  return count / (m * d) * d + (count % (m * d) < d ? count % (m * d) : d);
}
inline int64_t dilated_tile_origin(int64_t tile, int64_t m, int64_t d) { return tile / d * m * d + tile % d; }

// The 1-D transforms along one axis of buf, laid out [n0][n1][n2][lanes] with n_a = m + 2 on
// Winograd axes and 1 elsewhere; `s` is the distance between consecutive points of the axis.
// F(2, 3) (Lavin & Gray, section 4.1):
//   input  B^T d = (d0 - d2, d1 + d2, d2 - d1, d1 - d3)
//   weight G g   = (g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2)
//   output A^T m = (m0 + m1 + m2, m1 - m2 - m3)
// F(4, 3) (section 4.2, points 0, +-1, +-2, infinity):
//   input  B^T d = (4 d0 - 5 d2 + d4, -4 d1 - 4 d2 + d3 + d4, 4 d1 - 4 d2 - d3 + d4,
//                   -2 d1 - d2 + 2 d3 + d4, 2 d1 - d2 - 2 d3 + d4, 4 d1 - 5 d3 + d5)
//   weight G g   = (g0 / 4, -(g0 + g1 + g2) / 6, -(g0 - g1 + g2) / 6, g0 / 24 + g1 / 12 + g2 / 6,
//                   g0 / 24 - g1 / 12 + g2 / 6, g2)
//   output A^T m = (m0 + m1 + m2 + m3 + m4, m1 - m2 + 2 (m3 - m4), m1 + m2 + 4 (m3 + m4),
//                   m1 - m2 + 8 (m3 - m4) + m5)
// The point formulas are written once for any element type E (a scalar, or a GCC vector of
// scalars T, which multiplies by a scalar lane-wise): the lane-block lines below and the fused
// tile transforms of the micro-kernel units (cpp/ukernels/winograd_ukernel_impl.hpp) share them.
template <int M, int R, typename T, typename E>
inline void input_points(const E* d, E* r) {  // M + R - 1 points -> as many
  if constexpr (R == 2) {
    r[0] = d[0] - d[1];
    r[1] = d[1];
    r[2] = d[2] - d[1];
  } else if constexpr (M == 2) {
    r[0] = d[0] - d[2];
    r[1] = d[1] + d[2];
    r[2] = d[2] - d[1];
    r[3] = d[1] - d[3];
  } else {
    r[0] = T(4) * d[0] - T(5) * d[2] + d[4];
    r[1] = d[3] + d[4] - T(4) * (d[1] + d[2]);
    r[2] = d[4] - d[3] + T(4) * (d[1] - d[2]);
    r[3] = d[4] - d[2] + T(2) * (d[3] - d[1]);
    r[4] = d[4] - d[2] - T(2) * (d[3] - d[1]);
    r[5] = T(4) * d[1] - T(5) * d[3] + d[5];
  }
}
template <int M, int R, typename T, typename E>
inline void output_points(const E* d, E* r) {  // M + R - 1 points -> M outputs
  if constexpr (R == 2) {
    r[0] = d[0] + d[1];
    r[1] = d[1] + d[2];
  } else if constexpr (M == 2) {
    r[0] = d[0] + d[1] + d[2];
    r[1] = d[1] - d[2] - d[3];
  } else {
    const E sum12 = d[1] + d[2], diff12 = d[1] - d[2], sum34 = d[3] + d[4], diff34 = d[3] - d[4];
    r[0] = d[0] + sum12 + sum34;
    r[1] = diff12 + T(2) * diff34;
    r[2] = sum12 + T(4) * sum34;
    r[3] = diff12 + T(8) * diff34 + d[5];
  }
}

// The lines: the lanes are walked in blocks of 4, each one GCC vector of 4 scalars (every tile
// width is a multiple of 4), so the compiler needs no aliasing checks for the runtime point stride.
constexpr int kLaneBlock = 4;

// The P entries of each lane block (s apart) through f into N entries, written back over entries 0 .. N - 1.
template <int P, int N, typename V, typename F>
inline void in_lane_blocks(V* b, int64_t s, int lanes, F&& f) {
  typedef V block __attribute__((vector_size(kLaneBlock * sizeof(V))));
  for (int l0 = 0; l0 < lanes; l0 += kLaneBlock) {
    block d[P], r[N];
    for (int e = 0; e < P; ++e) std::memcpy(&d[e], b + e * s + l0, sizeof(block));
    f(d, r);
    for (int e = 0; e < N; ++e) std::memcpy(b + e * s + l0, &r[e], sizeof(block));
  }
}

template <int M, int R, typename V>
inline void input_line(V* b, int64_t s, int lanes) {
  in_lane_blocks<M + R - 1, M + R - 1>(b, s, lanes, [](const auto* d, auto* r) { input_points<M, R, V>(d, r); });
}
template <int M, int R, typename V>
inline void output_line(V* b, int64_t s, int lanes) {  // results in points 0 .. M - 1
  in_lane_blocks<M + R - 1, M>(b, s, lanes, [](const auto* d, auto* r) { output_points<M, R, V>(d, r); });
}
// G g: R taps -> M + R - 1 points (in double: the packed weight transform's precision).
template <int M, int R, typename E>
inline void weight_points(const E* g, E* r) {
  if constexpr (R == 2) {
    r[0] = g[0];
    r[1] = g[0] + g[1];
    r[2] = g[1];
  } else if constexpr (M == 2) {
    r[0] = g[0];
    r[1] = (g[0] + g[1] + g[2]) * 0.5;
    r[2] = (g[0] - g[1] + g[2]) * 0.5;
    r[3] = g[2];
  } else {
    r[0] = g[0] / 4;
    r[1] = -(g[0] + g[1] + g[2]) / 6;
    r[2] = -(g[0] - g[1] + g[2]) / 6;
    r[3] = g[0] / 24 + g[1] / 12 + g[2] / 6;
    r[4] = g[0] / 24 - g[1] / 12 + g[2] / 6;
    r[5] = g[2];
  }
}
// The weight gradient's transforms (F(m, 3)'s adjoint with respect to the weights, see
// cpp/conv/weight_grad/gemm.cpp). A dy: the gradients of a tile's M outputs -> its M + 2 points (the
// transpose of output_points' A^T):
//   F(2, 3): (g0, g0 + g1, g0 - g1, -g1)
//   F(4, 3): (g0, g0 + g1 + g2 + g3, g0 - g1 + g2 - g3, g0 + 2 g1 + 4 g2 + 8 g3, g0 - 2 g1 + 4 g2 - 8 g3, g3)
template <int M, typename E>
inline void gradient_points(const E* g, E* r) {
  if constexpr (M == 2) {
    r[0] = g[0];
    r[1] = g[0] + g[1];
    r[2] = g[0] - g[1];
    r[3] = -g[1];
  } else {
    static_assert(M == 4, "F(2, 3) or F(4, 3)");
    const E even = g[0] + g[2], odd = g[1] + g[3], even4 = g[0] + g[2] * 4, odd8 = g[1] * 2 + g[3] * 8;
    r[0] = g[0];
    r[1] = even + odd;
    r[2] = even - odd;
    r[3] = even4 + odd8;
    r[4] = even4 - odd8;
    r[5] = g[3];
  }
}
// G^T m: the M + 2 points -> the 3 taps (the transpose of weight_points' G; in double: the
// products are summed in T, the transform is not).
template <int M, typename E>
inline void gradient_taps(const E* m, E* r) {
  if constexpr (M == 2) {
    r[0] = m[0] + (m[1] + m[2]) * 0.5;
    r[1] = (m[1] - m[2]) * 0.5;
    r[2] = (m[1] + m[2]) * 0.5 + m[3];
  } else {
    static_assert(M == 4, "F(2, 3) or F(4, 3)");
    const E sum12 = m[1] + m[2], diff21 = m[2] - m[1], sum34 = m[3] + m[4], diff34 = m[3] - m[4];
    r[0] = m[0] / 4 - sum12 / 6 + sum34 / 24;
    r[1] = diff21 / 6 + diff34 / 12;
    r[2] = (sum34 - sum12) / 6 + m[5];
  }
}
template <int M, int R>
inline void weight_line(double* b, int64_t s, int64_t lanes) {  // taps in entries 0 .. R - 1
  typedef double block __attribute__((vector_size(kLaneBlock * sizeof(double))));
  constexpr int P = M + R - 1;
  int64_t l = 0;
  for (; l + kLaneBlock <= lanes; l += kLaneBlock) {
    block g[R], r[P];
    for (int e = 0; e < R; ++e) std::memcpy(&g[e], b + e * s + l, sizeof(block));
    weight_points<M, R>(g, r);
    for (int e = 0; e < P; ++e) std::memcpy(b + e * s + l, &r[e], sizeof(block));
  }
  for (; l < lanes; ++l) {
    double g[R], r[P];
    for (int e = 0; e < R; ++e) g[e] = b[e * s + l];
    weight_points<M, R>(g, r);
    for (int e = 0; e < P; ++e) b[e * s + l] = r[e];
  }
}

}  // namespace winograd
