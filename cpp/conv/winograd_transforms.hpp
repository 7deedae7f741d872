// The 1-D Winograd transforms (see winograd.hpp): shared by the forward engine (gather_gemm.cpp,
// through winograd.hpp) and the weight gradient (weight_grad.cpp uses input_line<2, 3>, the same
// B^T). Included inside those files' anonymous namespaces.
#pragma once
#include <cstdint>
#include <cstring>

namespace winograd {

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
// The lanes are walked in blocks of 4 through local arrays (every tile width is a multiple of 4),
// which the compiler vectorises without the aliasing checks a runtime point stride would need.
constexpr int kLaneBlock = 4;

// Walks the lanes in blocks of kLaneBlock: the P entries of a block (s apart) into d[P][Q], f
// fills r[N][Q], which goes back over entries 0 .. N - 1.
template <int P, int N, typename V, typename F>
inline void in_lane_blocks(V* b, int64_t s, int lanes, F&& f) {
  constexpr int Q = kLaneBlock;
  for (int l0 = 0; l0 < lanes; l0 += Q) {
    V d[P][Q], r[N][Q];
    for (int e = 0; e < P; ++e) std::memcpy(d[e], b + e * s + l0, sizeof(d[e]));
    f(d, r);
    for (int e = 0; e < N; ++e) std::memcpy(b + e * s + l0, r[e], sizeof(r[e]));
  }
}

template <int M, int R, typename V>
inline void input_line(V* b, int64_t s, int lanes) {
  constexpr int Q = kLaneBlock, points = M + R - 1;
  in_lane_blocks<points, points>(b, s, lanes, [](const V (&d)[points][Q], V (&r)[points][Q]) {
    if constexpr (R == 2)
      for (int l = 0; l < Q; ++l) {
        r[0][l] = d[0][l] - d[1][l];
        r[1][l] = d[1][l];
        r[2][l] = d[2][l] - d[1][l];
      }
    else if constexpr (M == 2)
      for (int l = 0; l < Q; ++l) {
        r[0][l] = d[0][l] - d[2][l];
        r[1][l] = d[1][l] + d[2][l];
        r[2][l] = d[2][l] - d[1][l];
        r[3][l] = d[1][l] - d[3][l];
      }
    else
      for (int l = 0; l < Q; ++l) {
        r[0][l] = V(4) * d[0][l] - V(5) * d[2][l] + d[4][l];
        r[1][l] = d[3][l] + d[4][l] - V(4) * (d[1][l] + d[2][l]);
        r[2][l] = d[4][l] - d[3][l] + V(4) * (d[1][l] - d[2][l]);
        r[3][l] = d[4][l] - d[2][l] + V(2) * (d[3][l] - d[1][l]);
        r[4][l] = d[4][l] - d[2][l] - V(2) * (d[3][l] - d[1][l]);
        r[5][l] = V(4) * d[1][l] - V(5) * d[3][l] + d[5][l];
      }
  });
}
template <int M, int R, typename V>
inline void output_line(V* b, int64_t s, int lanes) {  // results in points 0 .. M - 1
  constexpr int Q = kLaneBlock, points = M + R - 1;
  in_lane_blocks<points, M>(b, s, lanes, [](const V (&d)[points][Q], V (&r)[M][Q]) {
    if constexpr (R == 2)
      for (int l = 0; l < Q; ++l) {
        r[0][l] = d[0][l] + d[1][l];
        r[1][l] = d[1][l] + d[2][l];
      }
    else if constexpr (M == 2)
      for (int l = 0; l < Q; ++l) {
        r[0][l] = d[0][l] + d[1][l] + d[2][l];
        r[1][l] = d[1][l] - d[2][l] - d[3][l];
      }
    else
      for (int l = 0; l < Q; ++l) {
        const V sum12 = d[1][l] + d[2][l], diff12 = d[1][l] - d[2][l], sum34 = d[3][l] + d[4][l],
                diff34 = d[3][l] - d[4][l];
        r[0][l] = d[0][l] + sum12 + sum34;
        r[1][l] = diff12 + V(2) * diff34;
        r[2][l] = sum12 + V(4) * sum34;
        r[3][l] = diff12 + V(8) * diff34 + d[5][l];
      }
  });
}
inline void weight_line(double* b, int64_t s, int64_t lanes, int m, int taps) {  // g -> m + taps - 1 points
  for (int64_t l = 0; l < lanes; ++l) {
    if (taps == 2) {
      const double g0 = b[l], g1 = b[s + l];
      b[s + l] = g0 + g1;
      b[2 * s + l] = g1;
      continue;
    }
    const double g0 = b[l], g1 = b[s + l], g2 = b[2 * s + l];
    if (m == 2) {
      b[s + l] = (g0 + g1 + g2) * 0.5;
      b[2 * s + l] = (g0 - g1 + g2) * 0.5;
      b[3 * s + l] = g2;
    } else {
      b[l] = g0 / 4;
      b[s + l] = -(g0 + g1 + g2) / 6;
      b[2 * s + l] = -(g0 - g1 + g2) / 6;
      b[3 * s + l] = g0 / 24 + g1 / 12 + g2 / 6;
      b[4 * s + l] = g0 / 24 - g1 / 12 + g2 / 6;
      b[5 * s + l] = g2;
    }
  }
}

}  // namespace winograd
