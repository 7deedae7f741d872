// Transposed convolutions of small inputs as one GEMM over the input pixels, scattered into the
// output (col2im, the way a forward convolution's input gradient is often computed):
//
//   C[p][n] = sum_ci X[ci][p] * W[ci][n]   p = input pixel (batch included), n = (output channel, tap)
//   y[co][p * stride - crop + tap * dilation] += C[p][(co, tap)]
//
// A transposed weight (C_in, C_out/G, k...) is, per input channel, one contiguous row over
// (output channel, tap) (other strides are gathered). Each work item copies its columns of those
// rows into NR-wide panels (one sequential read per row, which the hardware prefetchers stream) that stay in L2 while every
// pixel tile passes, so each weight is read from memory once per call; the small input is packed
// (MR pixels broadcast, NR columns in the vector lanes). The stride-phase GEMMs (gemm.cpp) instead
// pack all weights of every phase before the products and gather zeros at the phases' edges: on
// small inputs under large weights (a DCGAN generator's 1x1 and 4x4 maps, a U-Net's bottom
// up-convolution at batch 1) that cost more than the products.
//
// Work items are blocks of whole output channels (item_columns, fixed by the shapes, so the split
// does not depend on the thread count), so no two items write one output. Each output receives its
// contributions in the order (column tile, pixel tile, pixel, n) whatever the thread count: results are
// bitwise identical for any count. The summation order differs from the other algorithms' single
// chain per output (each tap's sum over input channels is rounded, then added), like Winograd's.
//
// The entry (scatter_gemm_algorithm) is at the end of this unit.
#include <omp.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>

#include "../algorithm.hpp"
#include "../common/geometry.hpp"

namespace convfast {
namespace engine {

namespace scatter_gemm {

template <typename T>
struct Conv final : AlgorithmPlan {
  // Work items: at least kItemColumns (channel, tap) columns of whole channels, a multiple of NR
  // where the channels allow (a constant split: results must not depend on the thread count).
  static constexpr int64_t kItemColumns = 256;

  const UkernelInfo<T>& uk;
  int64_t K = 0, N = 0, M = 0, taps = 0;  // input channels, (channel, tap) columns, pixels of one group
  int64_t p_tiles = 0, item_columns = 0;
  std::vector<int64_t> x_offset;               // per pixel: its input offset (batch and position)
  std::vector<int64_t> y_base;                 // per pixel: y offset of its tap-0, uncropped output
  std::vector<int64_t> coord[kSpatialRank];    // per pixel: input coordinate along each axis
  std::vector<int64_t> n_offset;               // per n: y offset of (channel, tap) relative to y_base
  std::vector<int64_t> lo[kSpatialRank], hi[kSpatialRank];  // per n: the input coordinates it writes
  std::vector<int64_t> w_offset;  // per n: its weight's offset in an input channel's row (w_contiguous: n)
  bool w_contiguous = true;       // each input channel's weights one run over (output channel, tap)

  static bool applies(const ConvProblem<T>& p) { return p.kind == ConvKind::Transposed; }

  // Output coordinate i * stride + c (c = tap * dilation - crop) is in [0, out) for i in [lo, hi).
  static void input_range(int64_t c, int64_t stride, int64_t out, int64_t in, int64_t& lo, int64_t& hi) {
    lo = std::max<int64_t>(0, ceil_div_signed(-c, stride));
    hi = std::min<int64_t>(in, ceil_div_signed(out - c, stride));
  }
  static int64_t ceil_div_signed(int64_t a, int64_t b) { return -floor_div(-a, b); }

  Conv(const ConvProblem<T>& p, const UkernelInfo<T>& ukernel) : uk(ukernel) {
    K = p.cin_per_group;
    taps = p.kernel[0] * p.kernel[1] * p.kernel[2];
    N = checked_mul(p.cout_per_group, taps);
    const int64_t pixels = p.in_size[0] * p.in_size[1] * p.in_size[2];
    M = checked_mul(p.batch, pixels);
    p_tiles = ceil_div(M, uk.mr);
    const int64_t unit = taps / std::gcd(taps, int64_t(uk.nr)) * uk.nr;  // lcm(taps, NR) columns
    item_columns = std::min(ceil_div(N, unit) * unit, ceil_div(kItemColumns, unit) * unit);
    x_offset.resize(M);
    y_base.resize(M);
    for (int a = 0; a < kSpatialRank; ++a) coord[a].resize(M);
    int64_t q = 0;
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t i0 = 0; i0 < p.in_size[0]; ++i0)
        for (int64_t i1 = 0; i1 < p.in_size[1]; ++i1)
          for (int64_t i2 = 0; i2 < p.in_size[2]; ++i2, ++q) {
            const int64_t i[kSpatialRank] = {i0, i1, i2};
            x_offset[q] = b * p.x_stride_n;
            y_base[q] = b * p.y_stride_n;
            for (int a = 0; a < kSpatialRank; ++a) {
              x_offset[q] += i[a] * p.x_stride[a];
              y_base[q] += i[a] * p.stride[a] * p.y_stride[a];
              coord[a][q] = i[a];
            }
          }
    n_offset.resize(N);
    for (int a = 0; a < kSpatialRank; ++a) {
      lo[a].resize(N);
      hi[a].resize(N);
    }
    w_offset.resize(N);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t co = n / taps, t = n % taps;
      const int64_t tap[kSpatialRank] = {t / (p.kernel[1] * p.kernel[2]), t / p.kernel[2] % p.kernel[1],
                                         t % p.kernel[2]};
      w_offset[n] = co * p.w_stride_co + tap[0] * p.w_stride[0] + tap[1] * p.w_stride[1] + tap[2] * p.w_stride[2];
      w_contiguous = w_contiguous && w_offset[n] == n;
      n_offset[n] = co * p.y_stride_c;
      for (int a = 0; a < kSpatialRank; ++a) {
        const int64_t c = tap[a] * p.dilation[a] - p.pad_before[a];
        n_offset[n] += c * p.y_stride[a];
        input_range(c, p.stride[a], p.out_size[a], p.in_size[a], lo[a][n], hi[a][n]);
      }
    }
  }

  // y must hold the bias (or zeros) everywhere; adds every product.
  void execute(const ConvProblem<T>& p, int nthreads) const {
    const int MR = uk.mr, NR = uk.nr;
    const int64_t G = p.groups;
    // The input of every group, packed: [group][pixel tile][K][MR], zero past the last pixel.
    const int64_t panel = checked_mul(K, MR);
    AlignedBuffer<T> packed(checked_mul(checked_mul(G, p_tiles), panel));
    const int pack_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, G * p_tiles)));
#pragma omp parallel for schedule(static) num_threads(pack_threads)
    for (int64_t gt = 0; gt < G * p_tiles; ++gt) {
      const int64_t g = gt / p_tiles, p0 = gt % p_tiles * MR, height = std::min<int64_t>(MR, M - p0);
      T* dst = packed.get() + gt * panel;
      const T* xg = p.x + g * K * p.x_stride_c;
      for (int64_t k = 0; k < K; ++k, dst += MR) {
        const T* xk = xg + k * p.x_stride_c;
        for (int64_t r = 0; r < height; ++r) dst[r] = xk[x_offset[p0 + r]];
        for (int64_t r = height; r < MR; ++r) dst[r] = T(0);
      }
    }
    const int64_t items_per_group = ceil_div(N, item_columns), items = G * items_per_group;
    const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, items)));
    std::vector<std::unique_ptr<AlignedBuffer<T>>> c_tiles, b_tiles;
    for (int t = 0; t < threads; ++t) {
      c_tiles.emplace_back(new AlignedBuffer<T>(int64_t(MR) * NR));
      b_tiles.emplace_back(new AlignedBuffer<T>(checked_mul(K, ceil_div(item_columns, NR) * NR)));
    }
    std::vector<const T*> rows(static_cast<size_t>(checked_mul(G, K)));
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < K; ++k) rows[g * K + k] = p.w + g * p.w_stride_g + k * p.w_stride_ci;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t g = item / items_per_group, n_begin = item % items_per_group * item_columns;
      const int64_t n_end = std::min(N, n_begin + item_columns);
      T* C = c_tiles[omp_get_thread_num()]->get();
      T* B = b_tiles[omp_get_thread_num()]->get();
      const T* const* wrows = rows.data() + g * K;
      T* yg = p.y + g * p.cout_per_group * p.y_stride_c;
      // The item's weights, copied as NR-column panels [tile][K][NR] (zero past the item's last
      // column): each input channel's run of item_columns is one sequential read, which the
      // hardware prefetchers stream, where tiles read in place made K scattered 2-line reads per tile.
      const int64_t tiles = ceil_div(n_end - n_begin, NR);
      for (int64_t k = 0; k < K; ++k) {
        const T* src = wrows[k] + n_begin;
        for (int64_t t = 0; t < tiles; ++t) {
          T* dst = B + (t * K + k) * NR;
          const int64_t width = std::min<int64_t>(NR, n_end - n_begin - t * NR);
          if (w_contiguous)
            std::memcpy(dst, src + t * NR, sizeof(T) * width);
          else  // any weight strides (a transposed or sliced view)
            for (int64_t j = 0; j < width; ++j) dst[j] = wrows[k][w_offset[n_begin + t * NR + j]];
          for (int64_t j = width; j < NR; ++j) dst[j] = T(0);
        }
      }
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = n_begin + t * NR, width = std::min<int64_t>(NR, n_end - n0);
        for (int64_t pt = 0; pt < p_tiles; ++pt) {
          uk.fn(K, packed.get() + (g * p_tiles + pt) * panel, B + t * K * NR, C, NR, 0);
          scatter(C, NR, pt * MR, std::min<int64_t>(MR, M - pt * MR), n0, width, yg);
        }
      }
    }
  }

  // y[pixel, n] += C[r][j] for the tile's pixels p0 + r and columns n0 + j whose output is inside y.
  void scatter(const T* C, int64_t ldc, int64_t p0, int64_t height, int64_t n0, int64_t width, T* yg) const {
    for (int64_t r = 0; r < height; ++r) {
      const int64_t q = p0 + r, i0 = coord[0][q], i1 = coord[1][q], i2 = coord[2][q];
      const T* c = C + r * ldc;
      T* yq = yg + y_base[q];
      for (int64_t j = 0; j < width; ++j) {
        const int64_t n = n0 + j;
        if (i0 >= lo[0][n] && i0 < hi[0][n] && i1 >= lo[1][n] && i1 < hi[1][n] && i2 >= lo[2][n] && i2 < hi[2][n])
          yq[n_offset[n]] += c[j];
      }
    }
  }

  std::string describe(const char* isa) const {
    return std::string("scatter_gemm ") + isa + " " + std::to_string(uk.mr) + "x" + std::to_string(uk.nr) +
           " pixels=" + std::to_string(M);
  }
};

// ---- The entry -----------------------------------------------------------------------------------

constexpr double kRank = 1.0;  // its place in the table (registry.cpp)

// Transposed layers of small inputs take the scatter GEMM (this unit): at most twice as
// many pixels (batch included) as input channels per group, i.e. where packing the weights costs
// as much as a good share of the products, and at most kScatterMaxPixels; single-phase layers
// (stride 1), whose weights the pixel-lanes GEMM already reads in place, only for a handful of
// pixels. 1 thread, float32, against the phase GEMMs (Winograd where it applied), one process,
// minimum of interleaved runs: k4s2 512 -> 256 on 4x4 1.60x (8 images 1.14x), 256 -> 128 on 8x8
// 1.03x; k2s2 1024 -> 512 on 7x7 1.58x, 512 -> 256 on 14x14 1.06x, 3-D 256 -> 128 on 4^3 1.20x; 1-D
// k4s2 512 -> 256 on 64 1.20x; DCGAN's k4 100 -> 512 on 1x1 1.8x; outside the rule: 3-D k2s2 on
// 8^3 (512 pixels, 256 channels) 0.82x, k3s2 256 -> 128 on 14x14 0.87x, k3s1 512 on 7x7 0.95x,
// 8 x 512 on 7x7 0.73x, 64 on 28x28 0.31x.
// CONVFAST_ALGO=scatter forces it wherever it applies, the other forced algorithms never take it;
// CONVFAST_SCATTER=0|1 excludes it or takes it wherever it applies (tests, measurements). Weights
// holding an infinity or NaN take it wherever it applies, whatever is forced (cost below).
constexpr int64_t kScatterMaxPixels = 512, kScatterMaxPixelsOnePhase = 16;

template <typename T>
bool applies(Choice<T>& c) {
  return Conv<T>::applies(c.p);
}

template <typename T>
double cost(Choice<T>& c) {
  const ConvProblem<T>& p = c.p;
  const double rank = kRank;
  if (!c.forcing() || c.forced_is("scatter")) {
    if (c.forcing()) return c.take("forced", rank);
    const char* knob = std::getenv("CONVFAST_SCATTER");
    if (knob && *knob) {
      if (std::strcmp(knob, "1") == 0) return c.take("CONVFAST_SCATTER=1", rank);
    } else {
      const int64_t pixels = p.batch * p.in_size[0] * p.in_size[1] * p.in_size[2];
      const bool one_phase = c.plan.phases.size() == 1;
      if (pixels <= (one_phase ? kScatterMaxPixelsOnePhase : kScatterMaxPixels) && 2 * pixels <= p.cin_per_group)
        return c.take("small input under large weights", rank);
    }
  }
  // The other algorithms multiply the zeros beyond the input's edges by the weights (0 * Inf =
  // NaN); the scatter GEMM forms only the true products, as PyTorch does.
  if (!ConvPlan<T>::Impl::weights_finite(p)) return c.take("non-finite weights", rank);
  return c.refuse(c.forcing() ? "another algorithm forced" : "input too large for its weights");
}

template <typename T>
bool create(Choice<T>& c) {
  c.plan.own.reset(new Conv<T>(c.p, c.plan.uk));
  return true;
}

template <typename T>
void execute(const typename ConvPlan<T>::Impl& plan, const ConvProblem<T>& p) {
  if (!plan.outputs_uncovered) plan.fill_with_bias(p);  // the scatter GEMM adds into y
  static_cast<const Conv<T>&>(*plan.own).execute(p, get_num_threads());
  record_algorithm<T>(plan, get_num_threads());
}

template <typename T>
std::string describe(const typename ConvPlan<T>::Impl& plan) {
  return static_cast<const Conv<T>&>(*plan.own).describe(plan.isa);
}

}  // namespace scatter_gemm

template <typename T>
const Algorithm<T>& scatter_gemm_algorithm() {
  static const Algorithm<T> entry = {"scatter", scatter_gemm::kRank,
      scatter_gemm::applies<T>, scatter_gemm::cost<T>,
      scatter_gemm::create<T>, scatter_gemm::execute<T>, scatter_gemm::describe<T>};
  return entry;
}
template const Algorithm<float>& scatter_gemm_algorithm<float>();
template const Algorithm<double>& scatter_gemm_algorithm<double>();

}  // namespace engine
}  // namespace convfast
