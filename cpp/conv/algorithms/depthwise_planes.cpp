// Depthwise layers (one input and one output channel per group) on small channels-first maps at
// unit stride, a plane at a time with the pixels in the vector lanes. A work item is one channel
// plane of one image: its input rows are copied into a flat buffer, one pitch apart, with zeros
// around them that the buffer keeps from call to call (only the input's own pixels are ever
// written); there every tap of every output is one load at a fixed distance, so the plane is one
// long row of outputs, pitch x rows of them, computed a vector at a time (the pitch's columns past
// the row's outputs are computed and dropped). The left padding is the previous row's right zeros,
// so the pitch is the row plus the wider of the two paddings.
//
// The channel lanes (channel_lanes.cpp) transpose every input pixel into a buffer of pixels of L
// channels and every output back; on 7x7 and 14x14 maps those transposes dominate, while here an
// item reads its input plane and writes its output plane once, each as whole rows.
//
// Each output is one chain over the taps in the direct kernel's order (row-major taps), starting
// from zero, the bias added to the finished sum: bitwise the channel lanes', the direct path's and
// the GEMM's results.
//
// The weight gradient (depthwise_planes_weight_grad) uses the same layout: per channel, over every
// image, each tap is one vector chain (a chain per lane) of the buffered input at the tap's offset
// times the output gradient laid out at the same pitch, with zeros in the dropped columns; the
// lanes are summed in order at the end, so the result does not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "../algorithm.hpp"
#include "../common/geometry.hpp"

namespace convfast {
namespace engine {

namespace depthwise_planes {

template <typename T>
struct Conv final : AlgorithmPlan {
  // The largest buffered plane (input window) taken: 64 KiB (L1 holds a 14x14 plane many times).
  static constexpr int64_t kMaxBufferBytes = 65536;
  // The weight gradient's stacked planes per micro-kernel call: about this many bytes of them.
  static constexpr int64_t kChunkBytes = 16384;

  const UkernelInfo<T>& uk;
  const AxisPlan *a0, *a1, *a2;  // the one phase's plans (axis 0: one tap, any count: images or planes)
  int64_t L = 1;
  int64_t pitch = 0, top = 0;     // buffer row pitch; buffer rows above input row 0
  int64_t base = 0;               // the buffer offset of input pixel (row -top, column 0)
  int64_t first_row = 0, last_row = -1;  // the input rows any output reads, clipped to the input
  int64_t outputs = 0;            // computed outputs per plane: pitch x rows, rounded up to vectors
  int64_t buffer_size = 0;        // elements per thread
  std::vector<int64_t> tap_offset;  // per tap (axis-1 taps outer), from output i's buffer position
  std::vector<T> weights;         // [group][tap]

  static bool applies(const ConvProblem<T>& p, const std::vector<Phase>& phases, const UkernelInfo<T>& uk) {
    if (!uk.plane_taps || p.cin_per_group != 1 || p.cout_per_group != 1 || phases.size() != 1) return false;
    const Phase& ph = phases[0];
    if (ph[0]->taps.size() != 1 || ph[0]->in_step != 1) return false;
    for (int a = 1; a < kSpatialRank; ++a)
      if (ph[a]->in_step != 1 || ph[a]->out_step != 1 || ph[a]->out_start != 0 || ph[a]->mode != PadMode::Zeros)
        return false;
    return p.x_stride[2] == 1 && p.y_stride[2] == 1;
  }


  Conv(const ConvProblem<T>& p, const Phase& ph, const UkernelInfo<T>& ukernel, bool& ok)
      : uk(ukernel), a0(ph[0]), a1(ph[1]), a2(ph[2]), L(ukernel.lanes) {
    ok = false;
    const int64_t H = a1->in_size, W = a2->in_size, lo1 = a1->lowest_offset(), hi1 = a1->highest_offset();
    const int64_t lo2 = a2->lowest_offset(), hi2 = a2->highest_offset();
    // Output column j reads input column j + offset: below 0 it lands in the previous buffer row's
    // zeros (pitch - W of them), past W - 1 in its own row's.
    const int64_t gap = std::max({int64_t(0), -lo2, a2->count + hi2 - W});
    pitch = W + gap;
    if (a2->count > pitch) return;
    top = std::max<int64_t>(0, -lo1);
    const int64_t rows = top + std::max(H, a1->count + hi1);  // buffer rows read
    base = gap;
    first_row = std::max<int64_t>(0, lo1);
    last_row = std::min(H - 1, a1->count - 1 + hi1);
    outputs = ceil_div(checked_mul(a1->count, pitch), L) * L;
    for (int64_t t1 = 0; t1 < (int64_t)a1->taps.size(); ++t1)
      for (int64_t t2 = 0; t2 < (int64_t)a2->taps.size(); ++t2)
        tap_offset.push_back((a1->tap_offset[t1] + top) * pitch + a2->tap_offset[t2]);
    const int64_t reach = *std::max_element(tap_offset.begin(), tap_offset.end());
    buffer_size = std::max(checked_add(base, checked_mul(rows, pitch)), checked_add(base + outputs, reach)) + kChunk;
    if (checked_mul(buffer_size, sizeof(T)) > kMaxBufferBytes) return;
    if (p.w) {
      const int64_t taps = (int64_t)tap_offset.size();
      weights.resize(static_cast<size_t>(checked_mul(p.groups, taps)));
      for (int64_t c = 0; c < p.groups; ++c)
        for (int64_t t1 = 0, t = 0; t1 < (int64_t)a1->taps.size(); ++t1)
          for (int64_t t2 = 0; t2 < (int64_t)a2->taps.size(); ++t2, ++t)
            weights[c * taps + t] = p.w[c * p.w_stride_g + a0->taps[0] * p.w_stride[0] + a1->taps[t1] * p.w_stride[1] +
                                        a2->taps[t2] * p.w_stride[2]];
    }
    ok = true;
  }

  // Per thread: the buffered plane (zeros where no input pixel goes, written once) and the
  // computed outputs.
  struct Scratch {
    AlignedBuffer<T> buffer, rows;
    explicit Scratch(const Conv& c) : buffer(c.buffer_size), rows(c.outputs + kChunk) {
      std::fill(buffer.get(), buffer.get() + c.buffer_size, T(0));
      std::fill(rows.get(), rows.get() + c.outputs + kChunk, T(0));
    }
  };

  // Short rows are copied in whole chunks of kChunk elements, as far as the chunks stay inside the
  // operand's own rows: a 7-wide row copied element by element took longer than its products.
  static constexpr int64_t kChunk = 64 / sizeof(T);

  // rows rows of n elements, src_stride apart, into dst rows pitch apart (pitch >= n). The elements
  // between the rows, and up to kChunk past the last one, must be zero and stay zero (whole chunks
  // written past a row's end are cleared).
  // (Not distributed into memset/memcpy calls: the gaps are an element or two.)
  __attribute__((optimize("no-tree-loop-distribute-patterns"))) static void copy_rows(
      const T* __restrict src, int64_t src_stride, int64_t rows, int64_t n, T* __restrict dst, int64_t pitch) {
    const int64_t whole = ceil_div(n, kChunk) * kChunk, src_end = (rows - 1) * src_stride + n;
    int64_t r = 0, written = 0;
    if (src_stride >= n)
      for (; r < rows && r * src_stride + whole <= src_end; ++r) {
        for (int64_t i = 0; i < whole; i += kChunk)
          for (int64_t q = 0; q < kChunk; ++q) dst[r * pitch + i + q] = src[r * src_stride + i + q];
        for (int64_t i = n; i < pitch; ++i) dst[r * pitch + i] = T(0);
        written = r * pitch + whole;
      }
    for (; r < rows; ++r) {
      for (int64_t i = 0; i < n; ++i) dst[r * pitch + i] = src[r * src_stride + i];
      for (int64_t i = n; i < pitch; ++i) dst[r * pitch + i] = T(0);
    }
    for (int64_t i = rows * pitch; i < written; ++i) dst[i] = T(0);
  }

  // y's rows (n elements, ys apart) = the computed rows (pitch apart) + bias; whole chunks where y's
  // rows are contiguous (a chunk past a row's end is overwritten by the next row), up to its last.
  static void store_rows(const T* __restrict out, int64_t pitch, int64_t rows, int64_t n, T bias, T* __restrict y,
                         int64_t ys) {
    const int64_t whole = ceil_div(n, kChunk) * kChunk;
    int64_t r = 0;
    if (ys == n)
      for (; r < rows && r * n + whole <= rows * n; ++r)
        for (int64_t i = 0; i < whole; i += kChunk)
          for (int64_t q = 0; q < kChunk; ++q) y[r * n + i + q] = out[r * pitch + i + q] + bias;
    for (; r < rows; ++r) ConvPlan<T>::Impl::store_with_bias(out + r * pitch, bias, n, y + r * ys);
  }

  // Output (for the weight gradient: output-gradient) plane (image n, channel c, axis-0 output j0).
  T* y_plane(const ConvProblem<T>& p, int64_t n, int64_t c, int64_t j0) const {
    return p.y + n * p.y_stride_n + c * p.y_stride_c + (a0->out_start + j0 * a0->out_step) * p.y_stride[0];
  }

  // Copies input plane (image n, channel c, axis-0 output j0) into the buffer: its rows that any
  // output reads, the rest of the buffer untouched.
  void fill_plane(const ConvProblem<T>& p, int64_t n, int64_t c, int64_t j0, T* buf) const {
    const int64_t i0 = a0->index(j0, 0), W = a2->in_size;
    if (last_row < first_row) return;
    T* dst = buf + base + (first_row + top) * pitch;
    if (i0 < 0) {  // a padding plane (zeros along axis 0)
      for (int64_t r = 0; r <= last_row - first_row; ++r) std::fill(dst + r * pitch, dst + r * pitch + W, T(0));
      return;
    }
    copy_rows(p.x + n * p.x_stride_n + c * p.x_stride_c + i0 * p.x_stride[0] + first_row * p.x_stride[1], p.x_stride[1],
              last_row - first_row + 1, W, dst, pitch);
  }

  void run_plane(const ConvProblem<T>& p, int64_t n, int64_t c, int64_t j0, const T* bias, Scratch& s) const {
    fill_plane(p, n, c, j0, s.buffer.get());
    const int64_t taps = (int64_t)tap_offset.size();
    T* out = s.rows.get();
    uk.plane_taps(outputs, taps, s.buffer.get() + base, tap_offset.data(), weights.data() + c * taps, out);
    const T b = bias ? bias[c * p.bias_stride] : T(0);
    store_rows(out, pitch, a1->count, a2->count, b, y_plane(p, n, c, j0), p.y_stride[1]);
  }

  void execute(const ConvProblem<T>& p, int nthreads_max) const {
    const int64_t planes = a0->count * p.groups, total = p.batch * planes;
    const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads_max, total)));
    std::vector<std::unique_ptr<Scratch>> scratch;
    for (int t = 0; t < nthreads; ++t) scratch.emplace_back(new Scratch(*this));
    // Each thread a contiguous run of planes (image, axis-0 output, channel), its position carried
    // from plane to plane (no divisions per plane).
#pragma omp parallel num_threads(nthreads)
    {
      const int64_t t = omp_get_thread_num(), begin = total * t / nthreads, end = total * (t + 1) / nthreads;
      int64_t n = begin / planes, j0 = (begin % planes) / p.groups, c = begin % p.groups;
      for (int64_t i = begin; i < end; ++i) {
        run_plane(p, n, c, j0, p.bias, *scratch[t]);
        if (++c == p.groups) {
          c = 0;
          if (++j0 == a0->count) j0 = 0, ++n;
        }
      }
    }
  }

  // The weight gradient of the (forward) layer p, whose y is the output gradient (read only):
  // out[c][t] = sum over images, planes and outputs of gy times the input at tap t. Per channel,
  // its planes are stacked in the buffer, plane_rows buffer rows apart (a plane's bottom padding
  // rows are the next one's top), the output gradient at the same positions and zeros between, so
  // that one micro-kernel call runs over a chunk of planes (on 7x7 maps a plane is 4 vectors, too
  // few to pay for loading and storing the accumulators per plane). The stacked planes' dropped
  // columns and padding rows multiply input pixels by zero, which adds nothing unless a pixel is
  // an infinity or NaN: a channel whose sums come out non-finite is summed again output by output.
  void weight_grad(const ConvProblem<T>& p, T* out, int nthreads_max) const {
    const int64_t taps = (int64_t)tap_offset.size(), H = a1->in_size;
    const int64_t overhang = std::max<int64_t>(0, a1->count + a1->highest_offset() - H);  // rows read past the input
    const int64_t plane_rows = top + H + std::max<int64_t>(0, overhang - top), stride = plane_rows * pitch;
    const int64_t planes = p.batch * a0->count;
    const int64_t chunk = std::clamp<int64_t>(kChunkBytes / checked_mul(stride, sizeof(T)), 1, planes);
    const int64_t outputs_max = ceil_div(checked_mul(chunk, stride), L) * L;
    const int64_t reach = *std::max_element(tap_offset.begin(), tap_offset.end());
    const int64_t x_size = std::max(checked_add(base, checked_mul(chunk, stride) + overhang * pitch),
                                    base + outputs_max + reach) + kChunk;
    const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads_max, p.groups)));
#pragma omp parallel num_threads(nthreads)
    {
      AlignedBuffer<T> xbuf(x_size), gbuf(outputs_max + kChunk);
      std::fill(xbuf.get(), xbuf.get() + x_size, T(0));
      std::fill(gbuf.get(), gbuf.get() + outputs_max + kChunk, T(0));
      std::vector<T> acc(static_cast<size_t>(taps * L));
#pragma omp for schedule(static)
      for (int64_t c = 0; c < p.groups; ++c) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t first = 0; first < planes; first += chunk) {
          const int64_t count = std::min(chunk, planes - first), n_out = ceil_div(count * stride, L) * L;
          for (int64_t k = 0; k < count; ++k) {
            const int64_t n = (first + k) / a0->count, j0 = (first + k) % a0->count;
            fill_plane(p, n, c, j0, xbuf.get() + k * stride);
            copy_rows(y_plane(p, n, c, j0), p.y_stride[1], a1->count, a2->count, gbuf.get() + k * stride, pitch);
          }
          std::fill(gbuf.get() + count * stride, gbuf.get() + n_out, T(0));  // a previous chunk's planes
          uk.plane_taps_wgrad(n_out, taps, xbuf.get() + base, tap_offset.data(), gbuf.get(), acc.data());
        }
        // Each tap's lanes summed in lane order (the taps' chains side by side: one chain of
        // taps x lanes additions was a third of a 7x7 channel's time).
        T* sums = out + c * taps;
        std::fill(sums, sums + taps, T(0));
        for (int64_t l = 0; l < L; ++l)
          for (int64_t t = 0; t < taps; ++t) sums[t] += acc[t * L + l];
        bool finite = true;
        for (int64_t t = 0; t < taps; ++t) finite = finite && std::isfinite(sums[t]);
        if (!finite) exact_weight_grad(p, c, xbuf.get(), out + c * taps);
      }
    }
  }

  // One channel's weight gradient output by output (each tap one chain over images, planes and
  // outputs in order), through the buffer one plane at a time.
  void exact_weight_grad(const ConvProblem<T>& p, int64_t c, T* buf, T* out) const {
    const int64_t taps = (int64_t)tap_offset.size();
    std::fill(out, out + taps, T(0));
    for (int64_t n = 0; n < p.batch; ++n)
      for (int64_t j0 = 0; j0 < a0->count; ++j0) {
        fill_plane(p, n, c, j0, buf);
        const T* g = y_plane(p, n, c, j0);
        for (int64_t t = 0; t < taps; ++t)
          for (int64_t r = 0; r < a1->count; ++r)
            for (int64_t j = 0; j < a2->count; ++j)
              out[t] += g[r * p.y_stride[1] + j] * buf[base + r * pitch + j + tap_offset[t]];
      }
  }
};

// ---- The entry -----------------------------------------------------------------------------------

constexpr double kRank = 2.5;  // its place in the table (registry.cpp): before the channel lanes

// Output planes of at most kMaxPlanePixels pixels, rows of at least kMinRow and kernels of at most
// kMaxTaps taps take the planes over the channel lanes (whose short rows run as one sequence of
// outputs). Float32, AVX-512, 2 threads, minimum of interleaved runs, forward (planes / lanes ms):
// 8 x 672 x 14x14 5x5 0.78 / 0.90, 8 x 240 x 28x28 5x5 0.97 / 1.13, 8 x 576 x 14x14 0.32 / 0.36,
// 8 x 144 x 28x28 0.26 / 0.35, 8 x 32 x 32x32 0.074 / 0.128; 8 x 128 x 20x20 0.30 / 0.30; lanes:
// 8 x 256 x 12x12 0.22 / 0.17, 8 x 256 x 10x10 0.23 / 0.18, 8 x 960 x 7x7 0.26 / 0.19,
// 8 x 384 x 14x14 7x7 0.82 / 0.56, 8 x 96 x 28x28 7x7 0.63 / 0.49.
constexpr int64_t kMaxPlanePixels = 1024, kMinRow = 14, kMaxTaps = 25;

template <typename T>
bool applies(Choice<T>& c) {
  return Conv<T>::applies(c.p, c.plan.phases, c.plan.uk);
}

template <typename T>
double cost(Choice<T>& c) {
  if (c.forced_is("planes")) return c.take("forced", kRank);
  if (c.forcing()) return c.refuse("another algorithm forced");
  if (c.p.out_size[1] * c.p.out_size[2] > kMaxPlanePixels) return c.refuse("large planes");
  if (c.p.out_size[2] < kMinRow) return c.refuse("short rows");
  const Phase& ph = c.plan.phases[0];
  if (int64_t(ph[1]->taps.size() * ph[2]->taps.size()) > kMaxTaps) return c.refuse("large kernel");
  return c.take("depthwise, small planes", kRank);
}

// False where a plane's buffer would exceed kMaxBufferBytes (the next algorithm runs).
template <typename T>
bool create(Choice<T>& c) {
  bool ok = false;
  std::unique_ptr<Conv<T>> conv(new Conv<T>(c.p, c.plan.phases[0], c.plan.uk, ok));
  if (ok) c.plan.own = std::move(conv);
  return ok;
}

template <typename T>
void execute(const typename ConvPlan<T>::Impl& plan, const ConvProblem<T>& p) {
  static_cast<const Conv<T>&>(*plan.own).execute(p, get_num_threads());
  record_algorithm<T>(plan, get_num_threads());
}

template <typename T>
std::string describe(const typename ConvPlan<T>::Impl& plan) {
  const Conv<T>& planes = static_cast<const Conv<T>&>(*plan.own);
  return std::string("depthwise_planes ") + plan.isa + " pitch=" + std::to_string(planes.pitch);
}

}  // namespace depthwise_planes

template <typename T>
const Algorithm<T>& depthwise_planes_algorithm() {
  static const Algorithm<T> entry = {"planes", depthwise_planes::kRank,
      depthwise_planes::applies<T>, depthwise_planes::cost<T>,
      depthwise_planes::create<T>, depthwise_planes::execute<T>, depthwise_planes::describe<T>};
  return entry;
}
template const Algorithm<float>& depthwise_planes_algorithm<float>();
template const Algorithm<double>& depthwise_planes_algorithm<double>();

}  // namespace engine

template <typename T>
bool depthwise_planes_weight_grad(const ConvProblem<T>& p, T* out) {
  const UkernelInfo<T>& uk = active_ukernel<T>();
  std::vector<AxisPlan> axes[kSpatialRank];
  Phase phase;
  if (!forward_phase(p, axes, phase) || !engine::depthwise_planes::Conv<T>::applies(p, {phase}, uk)) return false;
  bool ok = false;
  const engine::depthwise_planes::Conv<T> conv(p, phase, uk, ok);
  if (!ok) return false;
  conv.weight_grad(p, out, get_num_threads());
  return true;
}

template bool depthwise_planes_weight_grad<float>(const ConvProblem<float>&, float*);
template bool depthwise_planes_weight_grad<double>(const ConvProblem<double>&, double*);

}  // namespace convfast
