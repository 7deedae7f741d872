// One-tap layers (1x1, one stride phase) with one output pixel in the call, the batch included:
// the squeeze-and-excitation convolutions of EfficientNet and MobileNetV3 on 1x1 maps at batch 1,
// 1x1 classifiers. The GEMM's tiles hold 12 or 32 pixels, of which one is used there, and its
// weights are packed per call (or kept packed); here the weight rows are read in place, 8 output
// channels side by side (the micro-kernel table's gemv_chains), each output one multiply-add chain
// over the input channels in order from zero, as in the GEMM micro-kernel: the same bits as the
// GEMM, whatever the batch (an unbatched call takes this path where its batched form takes the
// GEMM). Each output is computed by one thread, so nothing depends on the threads.
// 2 threads, kept plans, min of interleaved runs, gemv / GEMM ms: 1152 -> 48 0.021 / 0.033,
// 2048 -> 1000 0.26 / 0.38; from 4 pixels the GEMM's tiles win (4 x 1152 -> 48 0.049 / 0.037).
#include <omp.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../algorithm.hpp"
#include "../common/geometry.hpp"
#include "../common/packing.hpp"

namespace convfast {
namespace engine {

namespace gemv {

constexpr double kRank = 3.5;  // its place in the table (registry.cpp): before the direct path
constexpr int64_t kMaxPixels = 1;
// Input channels per group past which it does not apply (a thread's copy of a strided pixel, and
// the GEMM's packing, which raises MemoryError cleanly, take broadcast giants of 2**40 channels).
constexpr int64_t kMaxChannels = int64_t(1) << 24;

// Runs of output channels per work item, so that a large layer still splits over the threads.
constexpr int64_t kChannelRun = 64;

template <typename T>
bool applies(Choice<T>& c) {
  return c.plan.phases.size() == 1 && c.plan.max_taps == 1 && c.plan.uk.gemv_chains != nullptr &&
         c.p.cin_per_group <= kMaxChannels;
}

template <typename T>
double cost(Choice<T>& c) {
  if (c.forced_is("gemv")) return c.take("forced", kRank);
  if (c.forcing()) return c.refuse("another algorithm forced");
  const int64_t pixels = checked_mul(c.p.batch, PhaseShape(c.plan.phases[0]).num_pixels);
  return pixels > kMaxPixels ? c.refuse("more than one output pixel") : c.take("one tap, one output pixel", kRank);
}

template <typename T>
bool create(Choice<T>&) {
  return true;  // nothing kept: the weights are read in place
}

template <typename T>
void execute(const typename ConvPlan<T>::Impl& plan, const ConvProblem<T>& p) {
  const Phase& ph = plan.phases[0];
  const PhaseShape shape(ph);
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group, G = p.groups;
  const int64_t w_tap = weight_tap_offsets(p, ph)[0];
  const int64_t runs = ceil_div(cout, kChannelRun), per_image = G * shape.num_pixels * runs;
  const int64_t items = p.batch * per_image;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), items)));
  const bool w_rows = p.w_stride_ci == 1;  // each output channel's weights contiguous
  // Per thread, contiguous copies of a strided pixel's channels and of kGemvChains weight rows
  // (allocated here: an allocation failure raises, where inside the parallel region it would
  // terminate).
  std::vector<std::vector<T>> x_copies(nthreads), w_copies(nthreads);
  for (int t = 0; t < nthreads; ++t) {
    x_copies[t].resize(p.x_stride_c == 1 ? 0 : static_cast<size_t>(cin));
    w_copies[t].resize(w_rows ? 0 : static_cast<size_t>(checked_mul(cin, kGemvChains)));
  }
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T>& xv = x_copies[omp_get_thread_num()];
    std::vector<T>& wv = w_copies[omp_get_thread_num()];
    T sums[kGemvChains];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t n = i / per_image, g = (i % per_image) / (shape.num_pixels * runs);
      const int64_t m = (i / runs) % shape.num_pixels, run = i % runs;
      const int64_t j2 = m % shape.count[2], j1 = (m / shape.count[2]) % shape.count[1];
      const int64_t j0 = m / (shape.count[2] * shape.count[1]);
      const int64_t i0 = ph[0]->index(j0, 0), i1 = ph[1]->index(j1, 0), i2 = ph[2]->index(j2, 0);
      // The input pixel's channels of the group, contiguous (none where the tap reads a zero pad).
      const T* x = nullptr;
      if (i0 >= 0 && i1 >= 0 && i2 >= 0) {
        x = p.x + n * p.x_stride_n + g * cin * p.x_stride_c + i0 * p.x_stride[0] + i1 * p.x_stride[1] +
            i2 * p.x_stride[2];
        if (p.x_stride_c != 1) {
          for (int64_t ci = 0; ci < cin; ++ci) xv[ci] = x[ci * p.x_stride_c];
          x = xv.data();
        }
      }
      T* y = p.y + n * p.y_stride_n + g * cout * p.y_stride_c + (ph[0]->out_start + j0 * ph[0]->out_step) * p.y_stride[0] +
             (ph[1]->out_start + j1 * ph[1]->out_step) * p.y_stride[1] +
             (ph[2]->out_start + j2 * ph[2]->out_step) * p.y_stride[2];
      const int64_t co_end = std::min(cout, (run + 1) * kChannelRun);
      for (int64_t co = run * kChannelRun; co < co_end; co += kGemvChains) {
        const int count = static_cast<int>(std::min<int64_t>(kGemvChains, co_end - co));
        if (!x) {  // the tap reads a zero pad: the bias alone
          std::fill(sums, sums + count, T(0));
        } else {
          const T* w = p.w + g * p.w_stride_g + co * p.w_stride_co + w_tap;
          int64_t ldw = p.w_stride_co;
          if (!w_rows) {
            for (int q = 0; q < count; ++q)
              for (int64_t ci = 0; ci < cin; ++ci) wv[q * cin + ci] = w[q * p.w_stride_co + ci * p.w_stride_ci];
            w = wv.data();
            ldw = cin;
          }
          plan.uk.gemv_chains(cin, w, ldw, x, count, sums);
        }
        for (int q = 0; q < count; ++q)
          y[(co + q) * p.y_stride_c] = sums[q] + (p.bias ? p.bias[(g * cout + co + q) * p.bias_stride] : T(0));
      }
    }
  }
  record_algorithm<T>(plan, nthreads);
}

template <typename T>
std::string describe(const typename ConvPlan<T>::Impl& plan) {
  return std::string("gemv ") + plan.isa;
}

}  // namespace gemv

template <typename T>
const Algorithm<T>& gemv_algorithm() {
  static const Algorithm<T> entry = {"gemv", gemv::kRank, gemv::applies<T>, gemv::cost<T>,
                                     gemv::create<T>, gemv::execute<T>, gemv::describe<T>};
  return entry;
}
template const Algorithm<float>& gemv_algorithm<float>();
template const Algorithm<double>& gemv_algorithm<double>();

}  // namespace engine
}  // namespace convfast
