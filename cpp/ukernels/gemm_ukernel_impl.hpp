// The register-blocked GEMM micro-kernel, written once with GCC/Clang vector extensions and
// compiled by each ukernel_<isa>.cpp with that ISA's target flags and vector width (the NumPy
// dispatch-source idea). This is the only code that knows about SIMD.
//
// Include it only inside an anonymous namespace: each variant must keep internal linkage, or the
// linker could merge the AVX-512 and baseline instantiations and run the wrong one.
//
// C[MR x NR] (+)= A * B with A packed as kc rows of MR scalars and B as kc rows of NR scalars.
// The MR*NR/L accumulators stay in registers; per k the kernel issues NR/L vector loads, MR
// broadcasts and MR*NR/L FMAs.

// a_row(k) gives row k of A, whose scalar r is a_row(k)[a_index(r)]: a packed panel (index r), or
// input pixels read in place, which spares the packing of interior tiles: MR pixels 1 or 2 apart
// (gemm_rows_ukernel; 2 for the in-place rows of a stride-2 convolution, where it costs nothing:
// each scalar is a broadcast load with its own displacement), or at any MR offsets shared by all
// k (gemm_pixels_ukernel: a tile that wraps to the next output row, or strides other than 1 and 2).
#include "../conv/winograd_transforms.hpp"
#include "winograd_ukernel_impl.hpp"

// Loops over registers are unrolled before GCC's scalar replacement runs (the pragma): left to the
// later complete unrolling, the accumulator array stayed in memory around the K loop (zeroed on
// the stack, copied out and back before the stores: 67 stack moves per AVX-512 call).
#define CONVFAST_UNROLL _Pragma("GCC unroll 64")

// ACCUMULATE and ROW_BIAS are compile-time: with them as run-time branches, GCC kept the 24
// AVX-512 accumulators on the stack around the loop (zeroed there, copied out and back before the
// stores), which cost more than the multiply-adds on short K (1x1 16 -> 96 on 56x56, kc = 16).
template <typename T, int MR, int VECTOR_BYTES, int NV, bool ACCUMULATE, bool ROW_BIAS, typename ARow, typename AIndex>
inline void gemm_core_body(int64_t kc, ARow a_row, AIndex a_index, const T* __restrict b, T* __restrict c, int64_t ldc,
                           const T* __restrict row_bias) {
  typedef T vec __attribute__((vector_size(VECTOR_BYTES)));
  // Unaligned-safe alias for loads/stores of caller memory.
  typedef T vec_u __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T)), may_alias));
  constexpr int L = VECTOR_BYTES / sizeof(T);
  constexpr int NR = NV * L;
  // Accumulating starts from C, so that a sum split into K blocks is the same single chain
  // (bit for bit) as an unsplit one -- and as the direct kernel's, whatever algorithm or blocking
  // a problem gets (chunked computations, e.g. convfast.dask, rely on it).
  vec acc[MR][NV];
  CONVFAST_UNROLL for (int r = 0; r < MR; ++r)
    CONVFAST_UNROLL for (int v = 0; v < NV; ++v)
      if constexpr (ACCUMULATE)
        acc[r][v] = *reinterpret_cast<const vec_u*>(c + r * ldc + v * L);
      else
        acc[r][v] = vec{};
  for (int64_t k = 0; k < kc; ++k) {
    vec bv[NV];
    CONVFAST_UNROLL for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const vec_u*>(b + k * NR + v * L);
    const T* __restrict a = a_row(k);
    CONVFAST_UNROLL for (int r = 0; r < MR; ++r) {
      const T ar = a[a_index(r)];
      CONVFAST_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] += bv[v] * ar;
    }
  }
  if constexpr (ROW_BIAS)  // added to the finished sums (the caller passes it with the last K block)
    CONVFAST_UNROLL for (int r = 0; r < MR; ++r)
      CONVFAST_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] += row_bias[r];
  CONVFAST_UNROLL for (int r = 0; r < MR; ++r)
    CONVFAST_UNROLL for (int v = 0; v < NV; ++v) *reinterpret_cast<vec_u*>(c + r * ldc + v * L) = acc[r][v];
}

template <typename T, int MR, int VECTOR_BYTES, int NV, typename ARow, typename AIndex>
inline void gemm_core(int64_t kc, ARow a_row, AIndex a_index, const T* __restrict b, T* __restrict c, int64_t ldc,
                      int accumulate, const T* __restrict row_bias = nullptr) {
  if (row_bias) {
    if (accumulate)
      gemm_core_body<T, MR, VECTOR_BYTES, NV, true, true>(kc, a_row, a_index, b, c, ldc, row_bias);
    else
      gemm_core_body<T, MR, VECTOR_BYTES, NV, false, true>(kc, a_row, a_index, b, c, ldc, row_bias);
  } else if (accumulate) {
    gemm_core_body<T, MR, VECTOR_BYTES, NV, true, false>(kc, a_row, a_index, b, c, ldc, nullptr);
  } else {
    gemm_core_body<T, MR, VECTOR_BYTES, NV, false, false>(kc, a_row, a_index, b, c, ldc, nullptr);
  }
}

template <typename T, int MR, int VECTOR_BYTES, int NV>
void gemm_ukernel(int64_t kc, const T* __restrict a, const T* __restrict b, T* __restrict c, int64_t ldc,
                  int accumulate) {
  gemm_core<T, MR, VECTOR_BYTES, NV>(
      kc, [a](int64_t k) { return a + k * MR; }, [](int r) { return r; }, b, c, ldc, accumulate);
}

// gemm_ukernel plus row_bias[r] on row r of the finished C (the pixel-lanes GEMM, whose rows are
// output channels, stores its last K block straight into y with the bias this way).
template <typename T, int MR, int VECTOR_BYTES, int NV>
void gemm_row_bias_ukernel(int64_t kc, const T* __restrict a, const T* __restrict b, T* __restrict c, int64_t ldc,
                           int accumulate, const T* __restrict row_bias) {
  gemm_core<T, MR, VECTOR_BYTES, NV>(
      kc, [a](int64_t k) { return a + k * MR; }, [](int r) { return r; }, b, c, ldc, accumulate, row_bias);
}

template <typename T, int MR, int VECTOR_BYTES, int NV, int A_STEP>
void gemm_rows_ukernel(int64_t kc, const T* const* __restrict rows, int64_t offset, const T* __restrict b,
                       T* __restrict c, int64_t ldc, int accumulate) {
  gemm_core<T, MR, VECTOR_BYTES, NV>(
      kc, [rows, offset](int64_t k) { return rows[k] + offset; }, [](int r) { return r * A_STEP; }, b, c, ldc,
      accumulate);
}

// Row k of A is rows[k][pixel[r]]: the MR offsets, copied to locals, live in registers for all k.
template <typename T, int MR, int VECTOR_BYTES, int NV>
void gemm_pixels_ukernel(int64_t kc, const T* const* __restrict rows, const int64_t* __restrict pixel,
                         const T* __restrict b, T* __restrict c, int64_t ldc, int accumulate) {
  int64_t at[MR];
  for (int r = 0; r < MR; ++r) at[r] = pixel[r];
  gemm_core<T, MR, VECTOR_BYTES, NV>(
      kc, [rows](int64_t k) { return rows[k]; }, [&at](int r) { return at[r]; }, b, c, ldc, accumulate);
}

// The direct (pixel-vector) kernel: out[MRO][PW] = sum_k w[k][MRO] * src[k][offset + PW), PW = NV * L,
// out's rows ldo apart (a scratch tile, or y's channel rows); the bias, if given, is added to the
// finished sums before the store, so that y is written once.
// Each output is one chain over k in order, exactly as in the GEMM kernel, so both algorithms give
// identical bits; the variants with few output channels take more pixel vectors (NV) instead of
// split accumulator banks to keep enough independent chains in flight.
template <typename T, int MRO, int VECTOR_BYTES, int NV>
void direct_ukernel(int64_t kc, const T* const* __restrict src, int64_t offset, const T* __restrict w,
                    T* __restrict out, int64_t ldo, const T* __restrict bias) {
  typedef T vec __attribute__((vector_size(VECTOR_BYTES)));
  typedef T vec_u __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T)), may_alias));
  constexpr int L = VECTOR_BYTES / sizeof(T);
  vec acc[MRO][NV];
  CONVFAST_UNROLL for (int r = 0; r < MRO; ++r)
    CONVFAST_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = vec{};
  for (int64_t k = 0; k < kc; ++k) {
    vec xv[NV];
    CONVFAST_UNROLL for (int v = 0; v < NV; ++v) xv[v] = *reinterpret_cast<const vec_u*>(src[k] + offset + v * L);
    CONVFAST_UNROLL for (int r = 0; r < MRO; ++r) {
      const T wr = w[k * MRO + r];
      CONVFAST_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] += xv[v] * wr;
    }
  }
  if (bias)  // added to the finished sum, as the other paths add it
    CONVFAST_UNROLL for (int r = 0; r < MRO; ++r)
      CONVFAST_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] += bias[r];
  CONVFAST_UNROLL for (int r = 0; r < MRO; ++r)
    CONVFAST_UNROLL for (int v = 0; v < NV; ++v) *reinterpret_cast<vec_u*>(out + r * ldo + v * L) = acc[r][v];
}

// The weight gradient's row kernel (few input channels, see cpp/conv/weight_grad.cpp):
// acc[m][t][0..L) += gy[m][r * gy_rs + j] * x[t][r * x_rs + j] over the rows r < rows and pixels j < n,
// for MB output-gradient rows m and TB input rows t (taps); lane l sums the pixels j = l (mod L) of
// the whole vectors, in order, and lane 0 then the ragged tail. The MB x TB chains are independent.
template <typename T, int VECTOR_BYTES, int MB, int TB>
void wgrad_rows_ukernel(int64_t rows, int64_t n, const T* const* __restrict gy, int64_t gy_rs,
                        const T* const* __restrict x, int64_t x_rs, T* __restrict acc) {
  typedef T vec __attribute__((vector_size(VECTOR_BYTES)));
  typedef T vec_u __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T)), may_alias));
  constexpr int L = VECTOR_BYTES / sizeof(T);
  vec a[MB][TB];
  CONVFAST_UNROLL for (int m = 0; m < MB; ++m)
    CONVFAST_UNROLL for (int t = 0; t < TB; ++t) a[m][t] = *reinterpret_cast<const vec_u*>(acc + (m * TB + t) * L);
  for (int64_t r = 0; r < rows; ++r) {
    const T* g[MB];
    const T* xr[TB];
    CONVFAST_UNROLL for (int m = 0; m < MB; ++m) g[m] = gy[m] + r * gy_rs;
    CONVFAST_UNROLL for (int t = 0; t < TB; ++t) xr[t] = x[t] + r * x_rs;
    int64_t j = 0;
    for (; j + L <= n; j += L) {
      vec gv[MB];
      CONVFAST_UNROLL for (int m = 0; m < MB; ++m) gv[m] = *reinterpret_cast<const vec_u*>(g[m] + j);
      CONVFAST_UNROLL for (int t = 0; t < TB; ++t) {
        const vec xv = *reinterpret_cast<const vec_u*>(xr[t] + j);
        CONVFAST_UNROLL for (int m = 0; m < MB; ++m) a[m][t] += gv[m] * xv;
      }
    }
    for (; j < n; ++j)
      CONVFAST_UNROLL for (int m = 0; m < MB; ++m)
        CONVFAST_UNROLL for (int t = 0; t < TB; ++t) a[m][t][0] += g[m][j] * xr[t][j];
  }
  CONVFAST_UNROLL for (int m = 0; m < MB; ++m)
    CONVFAST_UNROLL for (int t = 0; t < TB; ++t) *reinterpret_cast<vec_u*>(acc + (m * TB + t) * L) = a[m][t];
}

// The transposing store: y[j * ys + i] = c[i * ldc + j] + bias[j] for i, j < L (L = vector lanes).
// An L x L block of the pixel-major GEMM output lands in the channels-first output (L pixels
// contiguous per channel) through log2(L) butterfly stages of two-input shuffles, each swapping
// the off-diagonal h x h blocks of every 2h x 2h block; the scalar scatter it replaces cost ~4
// cycles per output, 9-13 % of a 3x3 or 1x1 layer.
template <typename T, int VECTOR_BYTES>
struct Transpose {
  typedef T vec __attribute__((vector_size(VECTOR_BYTES)));
  typedef T vec_u __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T)), may_alias));
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type index;
  typedef index mask __attribute__((vector_size(VECTOR_BYTES)));
  static constexpr int L = VECTOR_BYTES / sizeof(T);

  // One butterfly stage: row i (i & h == 0) takes row i + h's low half-blocks, row i + h row i's
  // high ones. The masks are built from compile-time indices, so that they are constants the
  // compiler maps onto single shuffles (unpck, vperm2f128, ...); filled in a loop they were left to
  // run time, and the 8 x 8 float transpose took ~110 shuffle, blend and insert instructions.
  template <int H, size_t... K>
  static inline void stage(vec (&r)[L], std::index_sequence<K...>) {
    const mask low = {static_cast<index>((K & H) ? L + K - H : K)...};
    const mask high = {static_cast<index>((K & H) ? L + K : K + H)...};
    for (int i = 0; i < L; ++i)
      if (!(i & H)) {
        const vec a = r[i], b = r[i + H];
        r[i] = __builtin_shuffle(a, b, low);
        r[i + H] = __builtin_shuffle(a, b, high);
      }
  }

  // r[j][i] = c[i * ldc + j] for i, j < L.
  static inline void load(const T* __restrict c, int64_t ldc, vec (&r)[L]) {
    for (int i = 0; i < L; ++i) r[i] = *reinterpret_cast<const vec_u*>(c + i * ldc);
    constexpr auto lanes = std::make_index_sequence<L>{};
    if constexpr (L >= 16) stage<8>(r, lanes);
    if constexpr (L >= 8) stage<4>(r, lanes);
    if constexpr (L >= 4) stage<2>(r, lanes);
    stage<1>(r, lanes);
  }
};

template <typename T, int VECTOR_BYTES>
void transpose_store(const T* __restrict c, int64_t ldc, const T* __restrict bias, T* __restrict y, int64_t ys) {
  using Tr = Transpose<T, VECTOR_BYTES>;
  typename Tr::vec r[Tr::L];
  Tr::load(c, ldc, r);
  for (int j = 0; j < Tr::L; ++j) *reinterpret_cast<typename Tr::vec_u*>(y + j * ys) = r[j] + bias[j];
}

template <typename T, int VECTOR_BYTES>
void transpose_block(const T* __restrict c, int64_t ldc, T* __restrict y, int64_t ys) {
  using Tr = Transpose<T, VECTOR_BYTES>;
  typename Tr::vec r[Tr::L];
  Tr::load(c, ldc, r);
  for (int j = 0; j < Tr::L; ++j) *reinterpret_cast<typename Tr::vec_u*>(y + j * ys) = r[j];
}

// The channel-lanes kernel (depthwise layers): NJ outputs at a time, each one vector of L channels
// and one chain over the taps; per tap one weight vector serves the NJ outputs, which read their
// input at off[q] from the tap's pointer.
template <typename T, int VECTOR_BYTES, int NJ>
inline void channel_lanes_block(const int64_t* __restrict off, int64_t taps, const T* const* __restrict src,
                                const T* __restrict w, T* __restrict out) {
  typedef T vec __attribute__((vector_size(VECTOR_BYTES)));
  typedef T vec_u __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T)), may_alias));
  constexpr int L = VECTOR_BYTES / sizeof(T);
  vec acc[NJ];
  int64_t o[NJ];
  CONVFAST_UNROLL for (int q = 0; q < NJ; ++q) {
    acc[q] = vec{};
    o[q] = off[q];
  }
  for (int64_t t = 0; t < taps; ++t) {
    const vec wv = *reinterpret_cast<const vec_u*>(w + t * L);
    const T* s = src[t];
    CONVFAST_UNROLL for (int q = 0; q < NJ; ++q) acc[q] += *reinterpret_cast<const vec_u*>(s + o[q]) * wv;
  }
  CONVFAST_UNROLL for (int q = 0; q < NJ; ++q) *reinterpret_cast<vec_u*>(out + q * L) = acc[q];
}

// Outputs j < n, row j / row_len at row_step and column j % row_len at step: the rows of a work
// item run as one sequence, so short rows (7 or 14 outputs) still fill blocks of 8 independent
// chains (a 7-output row alone ran one block of 4 and three single chains, latency-bound). With the
// items' flat fill and store (channel_lanes.cpp), 8 x 768 x 7x7, 7x7 kernel, forward, 2 threads:
// 0.56 -> 0.34 ms (PyTorch 0.36-0.41).
template <typename T, int VECTOR_BYTES>
void channel_lanes_ukernel(int64_t n, int64_t taps, const T* const* __restrict src, int64_t step, int64_t row_len,
                           int64_t row_step, const T* __restrict w, T* __restrict out) {
  constexpr int L = VECTOR_BYTES / sizeof(T);
  int64_t off[8], row = 0, col = 0;
  auto next = [&]() {
    const int64_t o = row * row_step + col * step;
    if (++col == row_len) col = 0, ++row;
    return o;
  };
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int q = 0; q < 8; ++q) off[q] = next();
    channel_lanes_block<T, VECTOR_BYTES, 8>(off, taps, src, w, out + j * L);
  }
  for (; j + 4 <= n; j += 4) {
    for (int q = 0; q < 4; ++q) off[q] = next();
    channel_lanes_block<T, VECTOR_BYTES, 4>(off, taps, src, w, out + j * L);
  }
  for (; j < n; ++j) {
    off[0] = next();
    channel_lanes_block<T, VECTOR_BYTES, 1>(off, taps, src, w, out + j * L);
  }
}

// The depthwise-planes kernel: NV vectors of consecutive outputs of a plane laid out flat (rows
// one pitch apart, cpp/conv/algorithms/depthwise_planes.cpp), each one chain over the taps; per
// tap, one broadcast weight and NV unaligned loads at the tap's offset.
template <typename T, int VECTOR_BYTES, int NV>
inline void plane_taps_block(int64_t i, int64_t taps, const T* __restrict src, const int64_t* __restrict off,
                             const T* __restrict w, T* __restrict out) {
  typedef T vec __attribute__((vector_size(VECTOR_BYTES)));
  typedef T vec_u __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T)), may_alias));
  constexpr int L = VECTOR_BYTES / sizeof(T);
  vec acc[NV];
  CONVFAST_UNROLL for (int q = 0; q < NV; ++q) acc[q] = vec{};
  for (int64_t t = 0; t < taps; ++t) {
    const T wt = w[t];
    const T* s = src + off[t] + i;
    CONVFAST_UNROLL for (int q = 0; q < NV; ++q) acc[q] += *reinterpret_cast<const vec_u*>(s + q * L) * wt;
  }
  CONVFAST_UNROLL for (int q = 0; q < NV; ++q) *reinterpret_cast<vec_u*>(out + i + q * L) = acc[q];
}

template <typename T, int VECTOR_BYTES>
void plane_taps_ukernel(int64_t n, int64_t taps, const T* __restrict src, const int64_t* __restrict off,
                        const T* __restrict w, T* __restrict out) {
  constexpr int L = VECTOR_BYTES / sizeof(T);
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) plane_taps_block<T, VECTOR_BYTES, 4>(i, taps, src, off, w, out);
  for (; i < n; i += L) plane_taps_block<T, VECTOR_BYTES, 1>(i, taps, src, off, w, out);
}

// The depthwise-planes weight gradient: NT taps at a time, their NT chains (one per lane) in
// registers, one gradient vector serving all of them.
template <typename T, int VECTOR_BYTES, int NT>
inline void plane_taps_wgrad_block(int64_t n, const T* __restrict src, const int64_t* __restrict off,
                                   const T* __restrict gy, T* __restrict acc) {
  typedef T vec __attribute__((vector_size(VECTOR_BYTES)));
  typedef T vec_u __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T)), may_alias));
  constexpr int L = VECTOR_BYTES / sizeof(T);
  vec a[NT];
  const T* s[NT];
  CONVFAST_UNROLL for (int q = 0; q < NT; ++q) {
    a[q] = *reinterpret_cast<const vec_u*>(acc + q * L);
    s[q] = src + off[q];
  }
  for (int64_t j = 0; j < n; j += L) {
    const vec g = *reinterpret_cast<const vec_u*>(gy + j);
    CONVFAST_UNROLL for (int q = 0; q < NT; ++q) a[q] += *reinterpret_cast<const vec_u*>(s[q] + j) * g;
  }
  CONVFAST_UNROLL for (int q = 0; q < NT; ++q) *reinterpret_cast<vec_u*>(acc + q * L) = a[q];
}

template <typename T, int VECTOR_BYTES>
void plane_taps_wgrad_ukernel(int64_t n, int64_t taps, const T* __restrict src, const int64_t* __restrict off,
                              const T* __restrict gy, T* __restrict acc) {
  constexpr int L = VECTOR_BYTES / sizeof(T);
  int64_t t = 0;
  for (; t + 8 <= taps; t += 8) plane_taps_wgrad_block<T, VECTOR_BYTES, 8>(n, src, off + t, gy, acc + t * L);
  for (; t + 4 <= taps; t += 4) plane_taps_wgrad_block<T, VECTOR_BYTES, 4>(n, src, off + t, gy, acc + t * L);
  for (; t < taps; ++t) plane_taps_wgrad_block<T, VECTOR_BYTES, 1>(n, src, off + t, gy, acc + t * L);
}

// count (<= kGemvChains) outputs out[q] = sum over k < n, in order, of w[q * ldw + k] * x[k]: each
// one chain from zero, as the GEMM's micro-kernel computes an output (the same contraction into
// FMA in this ISA's unit), so bitwise its result; the chains run side by side (GemvChainsUkernel).
// Not auto-vectorised: GCC 12 turned the k loop into vector partial sums, another summation order.
template <typename T>
__attribute__((optimize("no-tree-vectorize"))) void gemv_chains_ukernel(int64_t n, const T* __restrict w, int64_t ldw, const T* __restrict x, int count,
                         T* __restrict out) {
  T acc[convfast::kGemvChains] = {};
  if (count == convfast::kGemvChains) {
    for (int64_t k = 0; k < n; ++k) {
      const T xk = x[k];
      CONVFAST_UNROLL for (int q = 0; q < convfast::kGemvChains; ++q) acc[q] += w[q * ldw + k] * xk;
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const T xk = x[k];
      for (int q = 0; q < count; ++q) acc[q] += w[q * ldw + k] * xk;
    }
  }
  for (int q = 0; q < count; ++q) out[q] = acc[q];
}

// The zip mask from compile-time indices (constants, as in Transpose::stage): k -> (k % 2) * L + first + k / 2.
template <typename Tr, int FIRST, size_t... K>
inline typename Tr::mask zip_mask(std::index_sequence<K...>) {
  return typename Tr::mask{static_cast<typename Tr::index>((K % 2) * Tr::L + FIRST + K / 2)...};
}

// The channel-lanes weight gradient: NT taps at a time, their NT chains in registers, one gradient
// vector per output serving all of them; the outputs come as rows (see channel_lanes_ukernel).
template <typename T, int VECTOR_BYTES, int NT>
inline void channel_lanes_wgrad_block(int64_t rows, int64_t row_len, const T* const* __restrict src, int64_t step,
                                      int64_t row_step, const T* __restrict gy, T* __restrict acc) {
  typedef T vec __attribute__((vector_size(VECTOR_BYTES)));
  typedef T vec_u __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T)), may_alias));
  constexpr int L = VECTOR_BYTES / sizeof(T);
  vec a[NT];
  CONVFAST_UNROLL for (int q = 0; q < NT; ++q) a[q] = *reinterpret_cast<const vec_u*>(acc + q * L);
  for (int64_t r = 0; r < rows; ++r, gy += row_len * L) {
    const int64_t base = r * row_step;
    for (int64_t j = 0; j < row_len; ++j) {
      const vec g = *reinterpret_cast<const vec_u*>(gy + j * L);
      CONVFAST_UNROLL for (int q = 0; q < NT; ++q)
        a[q] += *reinterpret_cast<const vec_u*>(src[q] + base + j * step) * g;
    }
  }
  CONVFAST_UNROLL for (int q = 0; q < NT; ++q) *reinterpret_cast<vec_u*>(acc + q * L) = a[q];
}

// Blocks of 8 taps, the last 9 where that many are left: odd square kernels (9, 25, 49 taps) are
// one more than a multiple of 8, and a single tap's chain alone is latency-bound.
template <typename T, int VECTOR_BYTES>
void channel_lanes_wgrad_ukernel(int64_t n, int64_t taps, const T* const* __restrict src, int64_t step,
                                 int64_t row_len, int64_t row_step, const T* __restrict gy, T* __restrict acc) {
  constexpr int L = VECTOR_BYTES / sizeof(T);
  const int64_t rows = n / row_len;
  int64_t t = 0;
  for (; t + 8 <= taps; t += 8) {
    if (taps - t == 9) {
      channel_lanes_wgrad_block<T, VECTOR_BYTES, 9>(rows, row_len, src + t, step, row_step, gy, acc + t * L);
      return;
    }
    channel_lanes_wgrad_block<T, VECTOR_BYTES, 8>(rows, row_len, src + t, step, row_step, gy, acc + t * L);
  }
  for (; t + 4 <= taps; t += 4)
    channel_lanes_wgrad_block<T, VECTOR_BYTES, 4>(rows, row_len, src + t, step, row_step, gy, acc + t * L);
  for (; t < taps; ++t)
    channel_lanes_wgrad_block<T, VECTOR_BYTES, 1>(rows, row_len, src + t, step, row_step, gy, acc + t * L);
}

// The transposing store of two blocks whose outputs interleave along the row (the residue-0 and
// residue-1 phases of a stride-2 transposed convolution): y[j * ys + 2 * i + h] =
// c_h[i * ldc + j] + bias[j] for h = 0, 1 (c_0 = ca, c_1 = cb) and i, j < L. Both blocks are
// transposed, then each channel's two vectors are zipped into 2L contiguous outputs.
template <typename T, int VECTOR_BYTES>
void transpose_pair_store(const T* __restrict ca, const T* __restrict cb, int64_t ldc, const T* __restrict bias,
                          T* __restrict y, int64_t ys) {
  using Tr = Transpose<T, VECTOR_BYTES>;
  constexpr int L = Tr::L;
  typename Tr::vec ra[L], rb[L];
  Tr::load(ca, ldc, ra);
  Tr::load(cb, ldc, rb);
  // zip: a0 b0 a1 b1 ... (the low halves), then the high halves
  const typename Tr::mask low = zip_mask<Tr, 0>(std::make_index_sequence<L>{});
  const typename Tr::mask high = zip_mask<Tr, L / 2>(std::make_index_sequence<L>{});
  for (int j = 0; j < L; ++j) {
    const typename Tr::vec a = ra[j] + bias[j], b = rb[j] + bias[j];
    *reinterpret_cast<typename Tr::vec_u*>(y + j * ys) = __builtin_shuffle(a, b, low);
    *reinterpret_cast<typename Tr::vec_u*>(y + j * ys + L) = __builtin_shuffle(a, b, high);
  }
}

// The table of one variant: GEMM tiles MR x (2 vectors); direct tiles of 4 vectors of pixels for
// 1 or 2 output channels (4 or 8 chains), 2 vectors for 4 or 6 (8 or 12 chains).
template <int VECTOR_BYTES, int MR>
convfast::UkernelSet make_ukernel_set(const char* isa) {
  constexpr int L32 = VECTOR_BYTES / 4, L64 = VECTOR_BYTES / 8;
  convfast::UkernelSet set{isa,
          {&gemm_ukernel<float, MR, VECTOR_BYTES, 2>,
           {&gemm_rows_ukernel<float, MR, VECTOR_BYTES, 2, 1>, &gemm_rows_ukernel<float, MR, VECTOR_BYTES, 2, 2>},
           &gemm_pixels_ukernel<float, MR, VECTOR_BYTES, 2>,
           &gemm_row_bias_ukernel<float, MR, VECTOR_BYTES, 2>,
           MR,
           2 * L32,
           {&direct_ukernel<float, 1, VECTOR_BYTES, 4>, &direct_ukernel<float, 2, VECTOR_BYTES, 4>,
            &direct_ukernel<float, 3, VECTOR_BYTES, 3>, &direct_ukernel<float, 4, VECTOR_BYTES, 2>,
            &direct_ukernel<float, 6, VECTOR_BYTES, 2>},
           {4 * L32, 4 * L32, 3 * L32, 2 * L32, 2 * L32},
           &transpose_store<float, VECTOR_BYTES>, &transpose_pair_store<float, VECTOR_BYTES>, L32,
           {&wgrad_rows_ukernel<float, VECTOR_BYTES, 4, 3>, &wgrad_rows_ukernel<float, VECTOR_BYTES, 3, 4>},
           &transpose_block<float, VECTOR_BYTES>, &channel_lanes_ukernel<float, VECTOR_BYTES>,
           &channel_lanes_wgrad_ukernel<float, VECTOR_BYTES>,
           &plane_taps_ukernel<float, VECTOR_BYTES>, &plane_taps_wgrad_ukernel<float, VECTOR_BYTES>,
           &gemv_chains_ukernel<float>},
          {&gemm_ukernel<double, MR, VECTOR_BYTES, 2>,
           {&gemm_rows_ukernel<double, MR, VECTOR_BYTES, 2, 1>, &gemm_rows_ukernel<double, MR, VECTOR_BYTES, 2, 2>},
           &gemm_pixels_ukernel<double, MR, VECTOR_BYTES, 2>,
           &gemm_row_bias_ukernel<double, MR, VECTOR_BYTES, 2>,
           MR,
           2 * L64,
           {&direct_ukernel<double, 1, VECTOR_BYTES, 4>, &direct_ukernel<double, 2, VECTOR_BYTES, 4>,
            &direct_ukernel<double, 3, VECTOR_BYTES, 3>, &direct_ukernel<double, 4, VECTOR_BYTES, 2>,
            &direct_ukernel<double, 6, VECTOR_BYTES, 2>},
           {4 * L64, 4 * L64, 3 * L64, 2 * L64, 2 * L64},
           &transpose_store<double, VECTOR_BYTES>, &transpose_pair_store<double, VECTOR_BYTES>, L64,
           {&wgrad_rows_ukernel<double, VECTOR_BYTES, 4, 3>, &wgrad_rows_ukernel<double, VECTOR_BYTES, 3, 4>},
           &transpose_block<double, VECTOR_BYTES>, &channel_lanes_ukernel<double, VECTOR_BYTES>,
           &channel_lanes_wgrad_ukernel<double, VECTOR_BYTES>,
           &plane_taps_ukernel<double, VECTOR_BYTES>, &plane_taps_wgrad_ukernel<double, VECTOR_BYTES>,
           &gemv_chains_ukernel<double>}};
  fill_winograd_transforms<float, VECTOR_BYTES>(set.f32);
  fill_winograd_transforms<double, VECTOR_BYTES>(set.f64);
  return set;
}
