// Run-time selection of the micro-kernel variant. The micro-kernels are the only ISA-specific
// code; each variant lives in its own translation unit compiled with its own target flags.
#pragma once
#include <cstdint>
#include <string>

namespace convfast {

// C[MR x NR] (+)= sum_k A[k][0..MR) * B[k][0..NR); A and B are packed panels, C row-major with
// leading dimension ldc (a multiple of the vector width, 64-byte aligned rows).
template <typename T>
using GemmUkernel = void (*)(int64_t kc, const T* a, const T* b, T* c, int64_t ldc, int accumulate);
// The same product with row k of A read in place: the MR scalars at rows[k] + offset + r * step.
template <typename T>
using GemmRowsUkernel = void (*)(int64_t kc, const T* const* rows, int64_t offset, const T* b, T* c, int64_t ldc,
                                 int accumulate);
// The same with row k of A read in place at MR offsets shared by every k: rows[k][pixel[r]].
// The packed product with row_bias[r] added to row r of the finished C.
template <typename T>
using GemmRowBiasUkernel = void (*)(int64_t kc, const T* a, const T* b, T* c, int64_t ldc, int accumulate,
                                    const T* row_bias);
template <typename T>
using GemmPixelsUkernel = void (*)(int64_t kc, const T* const* rows, const int64_t* pixel, const T* b, T* c,
                                   int64_t ldc, int accumulate);

// out[r * ldo + 0..PW) = sum_k w[k][r] * src[k][offset + 0..PW) (+ bias[r], added to the finished sum,
// when bias is not null) for r < MRO: PW pixels in vector registers, one broadcast weight per output
// channel (the "direct" orientation: no packing of the input, results land as rows of the
// channels-first output). src[k] points into per-row buffers in which each tap's inputs are contiguous.
template <typename T>
using DirectUkernel = void (*)(int64_t k, const T* const* src, int64_t offset, const T* w, T* out, int64_t ldo,
                               const T* bias);

constexpr int kDirectChannelTiles[] = {1, 2, 3, 4, 6};  // MRO variants

// y[j * ys + i] = c[i * ldc + j] + bias[j] for i, j < lanes: an L x L block of a pixel-major GEMM
// output stored channel-major (channels-first outputs, L pixels contiguous per channel).
template <typename T>
using TransposeStore = void (*)(const T* c, int64_t ldc, const T* bias, T* y, int64_t ys);
// y[j * ys + 2 * i + h] = c_h[i * ldc + j] + bias[j] for h = 0, 1 (c_0 = ca, c_1 = cb), i, j < lanes:
// two such blocks whose outputs interleave along the row (stride-2 transposed phases).
template <typename T>
using TransposePairStore = void (*)(const T* ca, const T* cb, int64_t ldc, const T* bias, T* y, int64_t ys);

// y[j * ys + i] = c[i * ldc + j] for i, j < lanes: the same transpose without a bias (values unchanged,
// -0.0 included): L channel rows of a channels-first input into L pixels of L channel lanes each.
template <typename T>
using TransposeBlock = void (*)(const T* c, int64_t ldc, T* y, int64_t ys);

// out[j * lanes + l] = sum_t w[t * lanes + l] * src[t][(j / row_len) * row_step + (j % row_len) * step + l]
// for j < n, over the taps t < taps in order (one chain per output, as in the direct kernel): channels
// in the vector lanes (depthwise layers, see cpp/conv/algorithms/channel_lanes.cpp); src[t] is tap t's
// input for output 0 in a buffer of pixels of `lanes` channels each; outputs come as rows of row_len,
// consecutive ones `step` elements apart and rows `row_step` apart.
template <typename T>
using ChannelLanesUkernel = void (*)(int64_t n, int64_t taps, const T* const* src, int64_t step, int64_t row_len,
                                     int64_t row_step, const T* w, T* out);

// acc[t * lanes + l] += sum_j src[t][(j / row_len) * row_step + (j % row_len) * step + l] * gy[j * lanes + l]
// for t < taps, j < n (a multiple of row_len), each tap one chain over j in order: the weight gradient
// of depthwise layers with the channels in the lanes (outputs as rows, as in ChannelLanesUkernel).
template <typename T>
using ChannelLanesWgradUkernel = void (*)(int64_t n, int64_t taps, const T* const* src, int64_t step,
                                          int64_t row_len, int64_t row_step, const T* gy, T* acc);

// out[i] = sum_t w[t] * src[i + off[t]] for i < n (a multiple of the vector width), over the taps t <
// taps in order (one chain per output, from zero): a depthwise plane laid out flat, rows one pitch
// apart (cpp/conv/algorithms/depthwise_planes.cpp).
template <typename T>
using PlaneTapsUkernel = void (*)(int64_t n, int64_t taps, const T* src, const int64_t* off, const T* w, T* out);

// acc[t * lanes + l] += sum_j src[off[t] + j * lanes + l] * gy[j * lanes + l] for t < taps, j < n / lanes
// (n a multiple of lanes), each lane of each tap one chain over j in order: the depthwise-planes
// weight gradient.
template <typename T>
using PlaneTapsWgradUkernel = void (*)(int64_t n, int64_t taps, const T* src, const int64_t* off, const T* gy,
                                       T* acc);

// out[q] = sum over k < n, in order, of w[q * ldw + k] * x[k] for q < count <= kGemvChains, each
// one multiply-add chain from zero as in the GEMM micro-kernel (bitwise its result): one-tap
// layers with one output pixel (cpp/conv/algorithms/gemv.cpp).
constexpr int kGemvChains = 8;
template <typename T>
using GemvChainsUkernel = void (*)(int64_t n, const T* w, int64_t ldw, const T* x, int count, T* out);

// acc[m][t][0..lanes) += gy[m][r * gy_rs + j] * x[t][r * x_rs + j] for r < rows, j < n (whole vectors
// in lanes, the tail in lane 0), m < MB, t < TB: the weight gradient of layers with few input
// channels (rows of pixels in the vector lanes, no packing). Two shapes of 12 accumulators,
// kWgradRowsShape[v] = {MB, TB}: 4 x 3 (one output-gradient vector more live than registers allow
// on AVX2: the compiler reloads one of them per tap) and 3 x 4 (none reloaded).
constexpr int kWgradRowsShapes = 2, kWgradRowsShape[kWgradRowsShapes][2] = {{4, 3}, {3, 4}}, kWgradRowsMax = 4;
template <typename T>
using WgradRowsUkernel = void (*)(int64_t rows, int64_t n, const T* const* gy, int64_t gy_rs, const T* const* x,
                                  int64_t x_rs, T* acc);

// The fused Winograd tile transforms (cpp/ukernels/winograd_ukernel_impl.hpp): every point of
// src[q * src_pitch + 0..lanes) through the input (or output) transform of a tile with the same
// F(m, r) on each of its Winograd axes, into dst[q * dst_pitch + 0..lanes); lanes a multiple of
// the vector width.
template <typename T>
using WinogradTransform = void (*)(const T* src, int64_t src_pitch, T* dst, int64_t dst_pitch, int64_t lanes);
// The weight transform G g G^T of `lanes` independent weights (any count), in double: src holds the
// taps at the points whose every coordinate is below R, src_pitch apart; every point goes, rounded
// to T, to dst[q * dst_pitch + 0..lanes).
template <typename T>
using WinogradWeightTransform = void (*)(const double* src, int64_t src_pitch, T* dst, int64_t dst_pitch,
                                         int64_t lanes);
constexpr int kWinogradTiles = 3;  // F(2, 2), F(2, 3), F(4, 3)
// The P = m + r - 1 points of n tiles m apart along a row: d[e * pitch + i] = src[m i + e].
template <typename T>
using WinogradSplitRow = void (*)(const T* src, int64_t n, T* d, int64_t pitch);
// Back into a row: y[m i + e] = a[e * pitch + i] + bias for e < m, i < n; returns the sum of 0 *
// each value stored (NaN iff one was an infinity or NaN).
template <typename T>
using WinogradStoreRow = T (*)(const T* a, int64_t pitch, T bias, int64_t n, T* y);

template <typename T>
struct UkernelInfo {
  GemmUkernel<T> fn = nullptr;
  GemmRowsUkernel<T> fn_rows[2] = {nullptr, nullptr};  // [step - 1]: A's scalars 1 or 2 apart
  GemmPixelsUkernel<T> fn_pixels = nullptr;              // A's scalars at any MR offsets
  GemmRowBiasUkernel<T> fn_row_bias = nullptr;           // fn, then row_bias[r] added to row r
  int mr = 0, nr = 0;
  DirectUkernel<T> direct[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};  // MRO = 1, 2, 3, 4, 6
  int pw[5] = {0, 0, 0, 0, 0};  // pixels per direct tile, per variant: whole vectors (multiples of lanes)
  TransposeStore<T> store_transposed = nullptr;
  TransposePairStore<T> store_transposed_pair = nullptr;
  int lanes = 0;                                             // L of store_transposed (the vector width)
  WgradRowsUkernel<T> wgrad_rows[kWgradRowsShapes] = {nullptr, nullptr};  // [v]: kWgradRowsShape[v]
  TransposeBlock<T> transpose_block = nullptr;               // L x L, as store_transposed without a bias
  ChannelLanesUkernel<T> channel_lanes = nullptr;
  ChannelLanesWgradUkernel<T> channel_lanes_wgrad = nullptr;
  PlaneTapsUkernel<T> plane_taps = nullptr;
  PlaneTapsWgradUkernel<T> plane_taps_wgrad = nullptr;
  GemvChainsUkernel<T> gemv_chains = nullptr;
  WinogradTransform<T> winograd_input[kWinogradTiles][3] = {};   // [tile][Winograd axes - 1]
  WinogradTransform<T> winograd_output[kWinogradTiles][3] = {};
  WinogradWeightTransform<T> winograd_weight[kWinogradTiles][3] = {};
  // The weight gradient's F(m, 3) output transform G^T M G, in double, of the (m + 2)^axes points
  // src[q * src_pitch + 0..lanes) into the 3^axes taps dst[t * dst_pitch + 0..lanes), rounded to
  // T; lanes any count. [tile][Winograd axes - 1], the tiles F(2, 3) and F(4, 3) (F(2, 2): null).
  WinogradTransform<T> winograd_gradient_taps[kWinogradTiles][3] = {};
  WinogradSplitRow<T> winograd_split_row[kWinogradTiles] = {};
  WinogradStoreRow<T> winograd_store_row[kWinogradTiles] = {};
};

struct UkernelSet {
  const char* isa = "";
  UkernelInfo<float> f32;
  UkernelInfo<double> f64;
};

// Per-variant tables, defined in cpp/ukernels/ukernel_<isa>.cpp.
const UkernelSet& ukernels_baseline();
#if defined(CONVFAST_X86_VARIANTS)
const UkernelSet& ukernels_avx2();
const UkernelSet& ukernels_avx512();
#endif

// Names of the variants this CPU can run, best first ("avx512", "avx2", "baseline").
std::string supported_isas();
// Select a variant by name ("auto" = best supported). Returns false if it cannot run here.
bool select_isa(const std::string& name);
const UkernelSet& active_ukernels();

template <typename T>
const UkernelInfo<T>& active_ukernel();
template <>
inline const UkernelInfo<float>& active_ukernel<float>() { return active_ukernels().f32; }
template <>
inline const UkernelInfo<double>& active_ukernel<double>() { return active_ukernels().f64; }

// Threads used by the kernels (defaults to omp_get_max_threads(), i.e. OMP_NUM_THREADS); inside an
// engine call, that call's count (convfast/threads.hpp, defined in cpp/dispatch/threads.cpp).
void set_num_threads(int n);
int get_num_threads();

// GFLOP/s of the active GEMM micro-kernel on L1-resident panels, on the calling thread, for about `seconds`.
double ukernel_peak_gflops(bool f64, double seconds);

}  // namespace convfast
