// The convolution engine: an implicit ("gather") GEMM over strided N-D views.
//
//   M = output pixels, N = output channels of one group, K = taps x input channels of one group.
//
// Padding, stride, dilation and every padding mode are resolved per axis into small index tables
// (AxisPlan::in_index), so the packing step reads patches straight from the unpadded input and no
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
#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "convfast/dispatch.hpp"
#include "convfast/engine.hpp"

namespace convfast {
namespace {

thread_local std::string t_last_algorithm;

int64_t checked_mul(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) throw std::length_error("convfast: working size overflows 64 bits");
  return r;
}
int64_t checked_add(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) throw std::length_error("convfast: working size overflows 64 bits");
  return r;
}
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 64-byte aligned scratch memory, zero-initialised lazily by its users.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t count) {
    const int64_t bytes = checked_mul(std::max<int64_t>(count, 1), sizeof(T));
    const int64_t rounded = checked_add(bytes, 63) / 64 * 64;
    ptr_ = static_cast<T*>(std::aligned_alloc(64, static_cast<size_t>(rounded)));
    if (!ptr_) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(ptr_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
};

// One spatial axis of one phase: which outputs it covers and where each tap reads.
struct AxisPlan {
  int64_t out_start = 0, out_step = 1, count = 0;
  std::vector<int64_t> taps;      // kernel index of each tap
  std::vector<int64_t> in_index;  // count x taps.size(): input coordinate, or -1 (reads zero)
};

AxisPlan forward_axis(int64_t in, int64_t out, int64_t k, int64_t s, int64_t d, int64_t pb, PadMode mode) {
  AxisPlan a;
  a.count = out;
  for (int64_t t = 0; t < k; ++t) a.taps.push_back(t);
  a.in_index.resize(static_cast<size_t>(checked_mul(out, k)));
  for (int64_t j = 0; j < out; ++j)
    for (int64_t t = 0; t < k; ++t) a.in_index[j * k + t] = map_padded_index(j * s - pb + t * d, in, mode);
  return a;
}

// Output o receives x[i] * w[t] where o + pb = i*s + t*d. Outputs with the same residue
// r = o mod s share one set of taps.
std::vector<AxisPlan> transposed_axis(int64_t in, int64_t out, int64_t k, int64_t s, int64_t d, int64_t pb) {
  std::vector<AxisPlan> phases;
  for (int64_t r = 0; r < std::min(s, out); ++r) {
    AxisPlan a;
    a.out_start = r;
    a.out_step = s;
    a.count = ceil_div(out - r, s);
    for (int64_t t = 0; t < k; ++t)
      if ((r + pb - t * d) % s == 0) a.taps.push_back(t);
    const int64_t nt = static_cast<int64_t>(a.taps.size());
    a.in_index.resize(static_cast<size_t>(checked_mul(a.count, nt)));
    for (int64_t j = 0; j < a.count; ++j) {
      for (int64_t ti = 0; ti < nt; ++ti) {
        const int64_t i = (r + pb - a.taps[ti] * d) / s + j;
        a.in_index[j * nt + ti] = (i >= 0 && i < in) ? i : -1;
      }
    }
    phases.push_back(std::move(a));
  }
  return phases;
}

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
  }
  if (!p.x || !p.w || !p.y) bad("null tensor");
}

// Packs B for one (group, phase): [n_tile][K][NR], K ordered tap-major then input channel.
template <typename T>
void pack_weights(const ConvProblem<T>& p, const Phase& ph, int64_t g, int nr, T* dst) {
  const PhaseShape shape(ph);
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group;
  const int64_t K = shape.num_taps * cin;
  const int64_t n_tiles = ceil_div(cout, nr);
  const T* wg = p.w + g * p.w_stride_g;
  for (int64_t nt = 0; nt < n_tiles; ++nt) {
    T* panel = dst + nt * K * nr;
    int64_t k = 0;
    for (int64_t t0 = 0; t0 < shape.taps[0]; ++t0)
      for (int64_t t1 = 0; t1 < shape.taps[1]; ++t1)
        for (int64_t t2 = 0; t2 < shape.taps[2]; ++t2) {
          const T* wt = wg + ph[0]->taps[t0] * p.w_stride[0] + ph[1]->taps[t1] * p.w_stride[1] +
                        ph[2]->taps[t2] * p.w_stride[2];
          for (int64_t ci = 0; ci < cin; ++ci, ++k) {
            for (int c = 0; c < nr; ++c) {
              const int64_t co = nt * nr + c;
              panel[k * nr + c] = co < cout ? wt[co * p.w_stride_co + ci * p.w_stride_ci] : T(0);
            }
          }
        }
  }
}

// Per-thread scratch, allocated once per call before the parallel region (so that allocation
// failure is an exception on the calling thread, never inside OpenMP).
template <typename T>
struct ThreadScratch {
  AlignedBuffer<T> a_panel, c_block;
  AlignedBuffer<int64_t> x_offsets, y_offsets;
  ThreadScratch(int64_t mc, int64_t kc, int64_t nc, int64_t max_taps)
      : a_panel(checked_mul(mc, kc)), c_block(checked_mul(mc, nc)),
        x_offsets(checked_mul(mc, std::max<int64_t>(max_taps, 1))), y_offsets(mc) {}
};

template <typename T>
void run_item(const ConvProblem<T>& p, const UkernelInfo<T>& uk, const Phase& ph, const WorkItem& it,
              const T* wpack, int64_t kc_max, int64_t ldc, ThreadScratch<T>& s) {
  const int mr = uk.mr, nr = uk.nr;
  const PhaseShape shape(ph);
  const int64_t T_ = shape.num_taps, cin = p.cin_per_group, cout = p.cout_per_group;
  const int64_t K = T_ * cin;
  const int64_t mcount = it.m1 - it.m0;
  const int64_t m_tiles = ceil_div(mcount, mr);
  int64_t* xoff = s.x_offsets.get();
  int64_t* yoff = s.y_offsets.get();
  T* A = s.a_panel.get();
  T* C = s.c_block.get();
  const T* xg = p.x + it.n * p.x_stride_n + it.g * cin * p.x_stride_c;

  // Where each pixel of the block reads for each tap (spatial offset into x, or -1 for a zero),
  // and where it writes.
  for (int64_t mi = 0; mi < mcount; ++mi) {
    const int64_t m = it.m0 + mi;
    const int64_t j2 = m % shape.count[2];
    const int64_t j1 = (m / shape.count[2]) % shape.count[1];
    const int64_t j0 = m / (shape.count[2] * shape.count[1]);
    const int64_t j[3] = {j0, j1, j2};
    int64_t yo = 0;
    for (int a = 0; a < kSpatialRank; ++a) yo += (ph[a]->out_start + j[a] * ph[a]->out_step) * p.y_stride[a];
    yoff[mi] = yo;
    const int64_t* i0 = ph[0]->in_index.data() + j0 * shape.taps[0];
    const int64_t* i1 = ph[1]->in_index.data() + j1 * shape.taps[1];
    const int64_t* i2 = ph[2]->in_index.data() + j2 * shape.taps[2];
    int64_t* row = xoff + mi * T_;
    for (int64_t t0 = 0; t0 < shape.taps[0]; ++t0)
      for (int64_t t1 = 0; t1 < shape.taps[1]; ++t1)
        for (int64_t t2 = 0; t2 < shape.taps[2]; ++t2) {
          const bool inside = i0[t0] >= 0 && i1[t1] >= 0 && i2[t2] >= 0;
          *row++ = inside ? i0[t0] * p.x_stride[0] + i1[t1] * p.x_stride[1] + i2[t2] * p.x_stride[2] : -1;
        }
  }

  const int64_t n_tiles = it.nt1 - it.nt0;
  if (K == 0) std::memset(C, 0, sizeof(T) * static_cast<size_t>(m_tiles * mr * ldc));
  for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
    const int64_t kc = std::min(kc_max, K - k0);
    // pack_input_patches: A[m_tile][k][MR], zero rows past the block end.
    for (int64_t mt = 0; mt < m_tiles; ++mt) {
      T* dst = A + mt * mr * kc;
      int64_t t = k0 / cin, ci = k0 % cin;
      for (int64_t kk = 0; kk < kc; ++kk) {
        for (int r = 0; r < mr; ++r) {
          const int64_t mi = mt * mr + r;
          T v = T(0);
          if (mi < mcount) {
            const int64_t o = xoff[mi * T_ + t];
            if (o >= 0) v = xg[o + ci * p.x_stride_c];
          }
          dst[kk * mr + r] = v;
        }
        if (++ci == cin) {
          ci = 0;
          ++t;
        }
      }
    }
    for (int64_t nt = 0; nt < n_tiles; ++nt) {
      const T* B = wpack + (it.nt0 + nt) * K * nr + k0 * nr;
      for (int64_t mt = 0; mt < m_tiles; ++mt)
        uk.fn(kc, A + mt * mr * kc, B, C + mt * mr * ldc + nt * nr, ldc, k0 > 0);
    }
  }

  // Scatter the block to y, adding the bias.
  T* yn = p.y + it.n * p.y_stride_n;
  const int64_t co_begin = it.nt0 * nr, co_end = std::min(it.nt1 * nr, cout);
  for (int64_t co = co_begin; co < co_end; ++co) {
    const int64_t cg = it.g * cout + co;
    const T b = p.bias ? p.bias[cg * p.bias_stride] : T(0);
    T* yc = yn + cg * p.y_stride_c;
    const T* ccol = C + (co - co_begin);
    for (int64_t mi = 0; mi < mcount; ++mi) yc[yoff[mi]] = ccol[mi * ldc] + b;
  }
}

}  // namespace

std::string last_algorithm() { return t_last_algorithm; }

template <typename T>
void run_convolution(const ConvProblem<T>& p) {
  validate(p);
  const UkernelInfo<T>& uk = active_ukernel<T>();
  const int mr = uk.mr, nr = uk.nr;

  // Axis plans and the phases (cartesian product of per-axis residue classes).
  std::vector<AxisPlan> axes[kSpatialRank];
  for (int a = 0; a < kSpatialRank; ++a) {
    if (p.kind == ConvKind::Forward)
      axes[a].push_back(forward_axis(p.in_size[a], p.out_size[a], p.kernel[a], p.stride[a], p.dilation[a],
                                     p.pad_before[a], p.mode));
    else
      axes[a] = transposed_axis(p.in_size[a], p.out_size[a], p.kernel[a], p.stride[a], p.dilation[a],
                                p.pad_before[a]);
  }
  std::vector<Phase> phases;
  for (const AxisPlan& a0 : axes[0])
    for (const AxisPlan& a1 : axes[1])
      for (const AxisPlan& a2 : axes[2]) phases.push_back({&a0, &a1, &a2});

  const int64_t cin = p.cin_per_group, cout = p.cout_per_group, G = p.groups;
  const int64_t n_tiles = ceil_div(cout, nr);
  const int64_t npad = n_tiles * nr;

  // Cache blocking: a KC x NR panel of B stays in L1 (~16 KiB) while MC x KC of A streams from L2.
  const int64_t kc_max = std::max<int64_t>(64, std::min<int64_t>(512, 16384 / (nr * (int64_t)sizeof(T))));
  const int64_t mc_max = std::max<int64_t>(mr, (131072 / (kc_max * (int64_t)sizeof(T))) / mr * mr);
  const int64_t nt_per_block = std::max<int64_t>(1, 256 / nr);
  const int64_t ldc = std::min<int64_t>(npad, nt_per_block * nr);

  // Packed weights: one panel set per (group, phase).
  std::vector<int64_t> wpack_offset(static_cast<size_t>(checked_mul(G, (int64_t)phases.size())) + 1, 0);
  int64_t max_taps = 0;
  {
    size_t idx = 0;
    for (int64_t g = 0; g < G; ++g)
      for (const Phase& ph : phases) {
        const PhaseShape shape(ph);
        max_taps = std::max(max_taps, shape.num_taps);
        wpack_offset[idx + 1] = checked_add(wpack_offset[idx], checked_mul(npad, checked_mul(shape.num_taps, cin)));
        ++idx;
      }
  }
  AlignedBuffer<T> wpack(wpack_offset.back());

  std::vector<WorkItem> items;
  for (int64_t n = 0; n < p.batch; ++n)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t ph = 0; ph < (int64_t)phases.size(); ++ph) {
        const int64_t M = PhaseShape(phases[ph]).num_pixels;
        for (int64_t m0 = 0; m0 < M; m0 += mc_max)
          for (int64_t nt0 = 0; nt0 < n_tiles; nt0 += nt_per_block)
            items.push_back({n, g, ph, m0, std::min(M, m0 + mc_max), nt0, std::min(n_tiles, nt0 + nt_per_block)});
      }

  const int nthreads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), std::max<int64_t>((int64_t)items.size(), G))));
  std::vector<std::unique_ptr<ThreadScratch<T>>> scratch;
  for (int t = 0; t < nthreads; ++t)
    scratch.emplace_back(new ThreadScratch<T>(mc_max, kc_max, ldc, max_taps));

  const int64_t n_phases = (int64_t)phases.size();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t gp = 0; gp < G * n_phases; ++gp)
    pack_weights(p, phases[gp % n_phases], gp / n_phases, nr, wpack.get() + wpack_offset[gp]);

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t i = 0; i < (int64_t)items.size(); ++i) {
    const WorkItem& it = items[i];
    run_item(p, uk, phases[it.phase], it, wpack.get() + wpack_offset[it.g * n_phases + it.phase], kc_max, ldc,
             *scratch[omp_get_thread_num()]);
  }

  t_last_algorithm = std::string("gather_gemm ") + active_ukernels().isa + " " + std::to_string(mr) + "x" +
                     std::to_string(nr) + " phases=" + std::to_string(phases.size()) +
                     " threads=" + std::to_string(nthreads);
}

template void run_convolution<float>(const ConvProblem<float>&);
template void run_convolution<double>(const ConvProblem<double>&);

}  // namespace convfast
