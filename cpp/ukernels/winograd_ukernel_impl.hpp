// Fused N-D Winograd tile transforms (see cpp/conv/winograd.hpp), compiled by each
// ukernel_<isa>.cpp with its vector width: per vector of lanes (tiles, or tiles x output
// channels), every point of the tile is loaded once, transformed along each Winograd axis in
// registers, and stored once. (Applied axis by axis over a buffer, the transforms read and wrote
// every point once per axis and were compiled for the baseline ISA: 34 % + 14 % of the
// 64-channel 56x56 float32 layer.) Include inside an anonymous namespace, after
// winograd_transforms.hpp (the point formulas).

// The lines of a tile of P^AXES points, as compile-time tables (so that the loops over them
// unroll into register code without divisions). A point is live after k axes when its coordinates
// along the axes before k are below BEFORE (what the transform leaves there: M results of an output
// transform, P points otherwise) and along the axes from k on below FROM (R taps of a weight
// transform not yet expanded, P points otherwise). Per axis a, the first point of every line along
// it through live points (stride[a] apart); load: the points live before any axis (loaded at the
// start); keep: those live after all of them (stored at the end).
template <int P, int AXES, int BEFORE, int FROM>
struct TileLines {
  static constexpr int N = AXES == 1 ? P : AXES == 2 ? P * P : P * P * P;
  int count[AXES] = {}, stride[AXES] = {}, first[AXES][N] = {}, loaded = 0, load[N] = {}, kept = 0, keep[N] = {};
  static constexpr bool live(int q, int k) {
    int s = N / P;
    for (int b = 0; b < AXES; ++b, s /= P)
      if ((q / s) % P >= (b < k ? BEFORE : FROM)) return false;
    return true;
  }
  constexpr TileLines() {
    for (int a = 0, s = N / P; a < AXES; ++a, s /= P) {
      stride[a] = s;
      for (int q = 0; q < N; ++q)
        if ((q / s) % P == 0 && live(q, a)) first[a][count[a]++] = q;
    }
    for (int q = 0; q < N; ++q) {
      if (live(q, 0)) load[loaded++] = q;
      if (live(q, AXES)) keep[kept++] = q;
    }
  }
};

// Runs the lines of a tile held in d (vectors, or doubles for the tails) through points(x, r): along
// each axis a in turn, the lines starting at lines.first[a][..] with entries lines.stride[a] apart,
// IN entries read and OUT written back from the line's start (the tables are compile-time, so
// this unrolls into register code).
template <int AXES, int IN, int OUT, typename Lines, typename E, typename Points>
inline void transform_lines(const Lines& lines, E* d, Points&& points) {
#pragma GCC unroll 3
  for (int a = 0; a < AXES; ++a) {
    const int s = lines.stride[a];
#pragma GCC unroll 36
    for (int i = 0; i < lines.count[a]; ++i) {
      E* line = d + lines.first[a][i];
      E x[IN], r[OUT];
      for (int e = 0; e < IN; ++e) x[e] = line[e * s];
      points(x, r);
      for (int e = 0; e < OUT; ++e) line[e * s] = r[e];
    }
  }
}

// src[q * src_pitch + l] for the P^AXES points q (P = M + R - 1 per axis, row-major) and lanes l
// < lanes, a multiple of the vector width. OUTPUT false: the input transform B^T d B of every
// point into dst[q * dst_pitch + l]. OUTPUT true: the output transform A^T m A, whose M^AXES
// outputs land at the points with every coordinate below M (the rest of dst is left as it was).
// src and dst may be the same (each vector is loaded whole before any store).
template <typename T, int VECTOR_BYTES, int M, int R, int AXES, bool OUTPUT>
void winograd_tile_transform(const T* src, int64_t src_pitch, T* dst, int64_t dst_pitch, int64_t lanes) {
  typedef T vec __attribute__((vector_size(VECTOR_BYTES)));
  typedef T vec_u __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T)), may_alias));
  constexpr int L = VECTOR_BYTES / sizeof(T), P = M + R - 1;
  using Lines = TileLines<P, AXES, OUTPUT ? M : P, P>;
  static constexpr Lines lines{};
  for (int64_t l = 0; l < lanes; l += L) {
    vec d[Lines::N];
#pragma GCC unroll 64
    for (int q = 0; q < Lines::N; ++q) d[q] = *reinterpret_cast<const vec_u*>(src + q * src_pitch + l);
    if constexpr (OUTPUT)
      transform_lines<AXES, P, M>(lines, d, [](const vec* x, vec* r) { winograd::output_points<M, R, T>(x, r); });
    else
      transform_lines<AXES, P, P>(lines, d, [](const vec* x, vec* r) { winograd::input_points<M, R, T>(x, r); });
#pragma GCC unroll 64
    for (int i = 0; i < lines.kept; ++i)
      *reinterpret_cast<vec_u*>(dst + lines.keep[i] * dst_pitch + l) = d[lines.keep[i]];
  }
}

// The fused weight transform (WinogradWeightTransform): per vector of lanes, the taps are loaded
// once, expanded along each axis in registers (in double, as the line path), and every point is
// rounded and stored once; the lanes past the last whole vector one at a time. (Line by line in
// the baseline unit, with a separate rounding pass, it was 20 % of the 512-channel 14x14 float32
// forward, whose functional calls transform the weights every time.)
template <typename T, int VECTOR_BYTES, int M, int R, int AXES>
void winograd_weight_transform(const double* src, int64_t src_pitch, T* dst, int64_t dst_pitch, int64_t lanes) {
  typedef double dvec __attribute__((vector_size(VECTOR_BYTES)));
  typedef double dvec_u __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(double)), may_alias));
  constexpr int L = VECTOR_BYTES / sizeof(double), P = M + R - 1;
  typedef T tvec __attribute__((vector_size(L * sizeof(T))));
  using Lines = TileLines<P, AXES, P, R>;  // taps below R, expanded axis by axis
  static constexpr Lines lines{};
  auto expand = [](auto* d) {
    transform_lines<AXES, R, P>(lines, d, [](const auto* g, auto* r) { winograd::weight_points<M, R>(g, r); });
  };
  int64_t l = 0;
  for (; l + L <= lanes; l += L) {
    dvec d[Lines::N];
#pragma GCC unroll 27
    for (int i = 0; i < lines.loaded; ++i)
      d[lines.load[i]] = *reinterpret_cast<const dvec_u*>(src + lines.load[i] * src_pitch + l);
    expand(d);
#pragma GCC unroll 64
    for (int q = 0; q < Lines::N; ++q) {
      const tvec v = __builtin_convertvector(d[q], tvec);
      std::memcpy(dst + q * dst_pitch + l, &v, sizeof(v));
    }
  }
  for (; l < lanes; ++l) {
    double d[Lines::N];
    for (int i = 0; i < lines.loaded; ++i) d[lines.load[i]] = src[lines.load[i] * src_pitch + l];
    expand(d);
    for (int q = 0; q < Lines::N; ++q) dst[q * dst_pitch + l] = static_cast<T>(d[q]);
  }
}

// The weight gradient's output transform (winograd_gradient_taps) of F(M, 3): per vector of lanes,
// the (M + 2)^AXES points are loaded once, widened to double, reduced to the 3 taps along each axis
// in registers (the lines of an output transform with 3 results per line), and every tap rounded
// and stored once; the lanes past the last whole vector one at a time.
template <typename T, int VECTOR_BYTES, int M, int AXES>
void winograd_gradient_taps(const T* src, int64_t src_pitch, T* dst, int64_t dst_pitch, int64_t lanes) {
  typedef double dvec __attribute__((vector_size(VECTOR_BYTES)));
  constexpr int L = VECTOR_BYTES / sizeof(double), P = M + 2, R = 3;
  typedef T tvec __attribute__((vector_size(L * sizeof(T))));
  using Lines = TileLines<P, AXES, R, P>;  // 3 results per line
  static constexpr Lines lines{};
  auto reduce = [](auto* d) {
    transform_lines<AXES, P, R>(lines, d, [](const auto* m, auto* r) { winograd::gradient_taps<M>(m, r); });
  };
  int64_t l = 0;
  for (; l + L <= lanes; l += L) {
    dvec d[Lines::N];
#pragma GCC unroll 64
    for (int q = 0; q < Lines::N; ++q) {
      tvec v;
      std::memcpy(&v, src + q * src_pitch + l, sizeof(v));
      d[q] = __builtin_convertvector(v, dvec);
    }
    reduce(d);
#pragma GCC unroll 27
    for (int i = 0; i < lines.kept; ++i) {
      const tvec v = __builtin_convertvector(d[lines.keep[i]], tvec);
      std::memcpy(dst + i * dst_pitch + l, &v, sizeof(v));
    }
  }
  for (; l < lanes; ++l) {
    double d[Lines::N];
    for (int q = 0; q < Lines::N; ++q) d[q] = static_cast<double>(src[q * src_pitch + l]);
    reduce(d);
    for (int i = 0; i < lines.kept; ++i) dst[i * dst_pitch + l] = static_cast<T>(d[lines.keep[i]]);
  }
}

// The types of the row kernels below: vectors, unaligned vectors, shuffle masks (integers of the
// scalar's width) of one width, for rows of tiles of M outputs.
template <typename T, int VECTOR_BYTES, int M>
struct RowShuffles {
  static_assert(M == 2 || M == 4, "tiles of 2 or 4 outputs");
  typedef T vec __attribute__((vector_size(VECTOR_BYTES)));
  typedef T vec_u __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T)), may_alias));
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type index_t;
  typedef index_t mask __attribute__((vector_size(VECTOR_BYTES)));
  static constexpr int L = VECTOR_BYTES / sizeof(T);
};

// The P points of n tiles M apart along a row: d[e * pitch + i] = src[M i + e] for e < P, i < n
// (the row's inputs split into one line per point, which the tile transform then reads as
// vectors). Stride-M selection by halving: the even elements of two vectors, log2(M) times.
// (The baseline build's scalar-array loop was 11 % of the 64-channel 56x56 float32 layer.)
template <typename T, int VECTOR_BYTES, int M, int P>
void winograd_split_row(const T* src, int64_t n, T* d, int64_t pitch) {
  using V = RowShuffles<T, VECTOR_BYTES, M>;
  using vec = typename V::vec;
  using vec_u = typename V::vec_u;
  constexpr int L = V::L;
  typename V::mask evens{};
  for (int k = 0; k < L; ++k) evens[k] = 2 * k;
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int e = 0; e < P; ++e) {
      const T* s = src + M * i + e;
      vec v[M];
      for (int k = 0; k < M; ++k) v[k] = *reinterpret_cast<const vec_u*>(s + k * L);
      for (int w = M; w > 1; w /= 2)
        for (int k = 0; k < w / 2; ++k) v[k] = __builtin_shuffle(v[2 * k], v[2 * k + 1], evens);
      *reinterpret_cast<vec_u*>(d + e * pitch + i) = v[0];
    }
  for (; i < n; ++i)
    for (int e = 0; e < P; ++e) d[e * pitch + i] = src[M * i + e];
}

// The inverse for the outputs: y[M i + e] = a[e * pitch + i] + bias for e < M, i < n (M lines
// of a tile's outputs interleaved into a row), by log2(M) rounds of zipping two vectors. Returns
// the sum of 0 * each value stored: NaN iff one of them was an infinity or NaN.
template <typename T, int VECTOR_BYTES, int M>
T winograd_store_row(const T* a, int64_t pitch, T bias, int64_t n, T* y) {
  using V = RowShuffles<T, VECTOR_BYTES, M>;
  using vec = typename V::vec;
  using vec_u = typename V::vec_u;
  constexpr int L = V::L;
  typename V::mask low{}, high{};  // zip of two vectors: their first halves' entries alternating, and the second halves'
  for (int k = 0; k < L; ++k) {
    low[k] = k / 2 + (k % 2) * L;
    high[k] = L / 2 + k / 2 + (k % 2) * L;
  }
  vec probe{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    vec u[M], z[M];
    for (int e = 0; e < M; ++e) u[e] = *reinterpret_cast<const vec_u*>(a + e * pitch + i) + bias;
    for (int e = 0; e < M; ++e) probe += u[e] * T(0);
    for (int w = 1; w < M; w *= 2) {
      for (int k = 0; k < M / 2; ++k) {
        z[2 * k] = __builtin_shuffle(u[k], u[k + M / 2], low);
        z[2 * k + 1] = __builtin_shuffle(u[k], u[k + M / 2], high);
      }
      for (int e = 0; e < M; ++e) u[e] = z[e];
    }
    for (int e = 0; e < M; ++e) *reinterpret_cast<vec_u*>(y + M * i + e * L) = u[e];
  }
  T sum = 0;
  for (; i < n; ++i)
    for (int e = 0; e < M; ++e) {
      const T v = a[e * pitch + i] + bias;
      y[M * i + e] = v;
      sum += v * T(0);
    }
  for (int k = 0; k < L; ++k) sum += probe[k];
  return sum;
}

// Fills info's tables: [tile: F(2, 2), F(2, 3), F(4, 3)][Winograd axes - 1].
template <typename T, int VECTOR_BYTES>
void fill_winograd_transforms(convfast::UkernelInfo<T>& info) {
  auto per_tile = [&](auto M, auto R, int tile) {
    info.winograd_input[tile][0] = &winograd_tile_transform<T, VECTOR_BYTES, M, R, 1, false>;
    info.winograd_input[tile][1] = &winograd_tile_transform<T, VECTOR_BYTES, M, R, 2, false>;
    info.winograd_input[tile][2] = &winograd_tile_transform<T, VECTOR_BYTES, M, R, 3, false>;
    info.winograd_output[tile][0] = &winograd_tile_transform<T, VECTOR_BYTES, M, R, 1, true>;
    info.winograd_output[tile][1] = &winograd_tile_transform<T, VECTOR_BYTES, M, R, 2, true>;
    info.winograd_output[tile][2] = &winograd_tile_transform<T, VECTOR_BYTES, M, R, 3, true>;
    info.winograd_weight[tile][0] = &winograd_weight_transform<T, VECTOR_BYTES, M, R, 1>;
    info.winograd_weight[tile][1] = &winograd_weight_transform<T, VECTOR_BYTES, M, R, 2>;
    info.winograd_weight[tile][2] = &winograd_weight_transform<T, VECTOR_BYTES, M, R, 3>;
    info.winograd_split_row[tile] = &winograd_split_row<T, VECTOR_BYTES, M, M + R - 1>;
    info.winograd_store_row[tile] = &winograd_store_row<T, VECTOR_BYTES, M>;
  };
  auto gradient_taps = [&](auto M, int tile) {
    info.winograd_gradient_taps[tile][0] = &winograd_gradient_taps<T, VECTOR_BYTES, M, 1>;
    info.winograd_gradient_taps[tile][1] = &winograd_gradient_taps<T, VECTOR_BYTES, M, 2>;
    info.winograd_gradient_taps[tile][2] = &winograd_gradient_taps<T, VECTOR_BYTES, M, 3>;
  };
  using two = std::integral_constant<int, 2>;
  per_tile(two{}, two{}, 0);
  per_tile(two{}, std::integral_constant<int, 3>{}, 1);
  per_tile(std::integral_constant<int, 4>{}, std::integral_constant<int, 3>{}, 2);
  gradient_taps(two{}, 1);
  gradient_taps(std::integral_constant<int, 4>{}, 2);
}
