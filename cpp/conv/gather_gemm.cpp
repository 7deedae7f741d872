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

namespace convfast {
namespace {

thread_local std::string t_last_algorithm;

// Marks a tap that reads the zero padding in the per-pixel offset tables. Offsets themselves can be
// negative (negative-stride views), so -1 cannot serve.
constexpr int64_t kOutside = INT64_MIN;

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
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }  // a >= 0, b > 0; no overflow

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
  a.taps.reserve(static_cast<size_t>(k));  // a huge (broadcast) kernel fails here, before any work
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

// Packs one n-tile of B for one (group, phase): panel[K][NR], K ordered tap-major then input
// channel. Walked in chunks of k so that the NR source rows are read along their length while the
// chunk of the panel being written stays in L1.
template <typename T>
void pack_weight_tile(const ConvProblem<T>& p, const Phase& ph, int64_t g, int nr, int64_t nt, T* panel) {
  const PhaseShape shape(ph);
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group;
  const int64_t K = shape.num_taps * cin;
  std::vector<int64_t> tap_offset;
  for (int64_t t0 = 0; t0 < shape.taps[0]; ++t0)
    for (int64_t t1 = 0; t1 < shape.taps[1]; ++t1)
      for (int64_t t2 = 0; t2 < shape.taps[2]; ++t2)
        tap_offset.push_back(ph[0]->taps[t0] * p.w_stride[0] + ph[1]->taps[t1] * p.w_stride[1] +
                             ph[2]->taps[t2] * p.w_stride[2]);
  const T* wg = p.w + g * p.w_stride_g;
  constexpr int64_t kChunk = 64;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = std::min(K, k0 + kChunk);
    for (int c = 0; c < nr; ++c) {
      const int64_t co = nt * nr + c;
      if (co >= cout) {
        for (int64_t k = k0; k < k1; ++k) panel[k * nr + c] = T(0);
        continue;
      }
      const T* row = wg + co * p.w_stride_co;
      int64_t t = k0 / cin, ci = k0 % cin;
      for (int64_t k = k0; k < k1; ++k) {
        panel[k * nr + c] = row[tap_offset[t] + ci * p.w_stride_ci];
        if (++ci == cin) {
          ci = 0;
          ++t;
        }
      }
    }
  }
}

// Copies n contiguous runs of MR values (one per k) into the packed panel; a compile-time MR makes
// each run a couple of vector moves.
template <int MR, typename T>
void copy_runs(const T* src, int64_t src_stride, int64_t n, T* dst) {
  for (int64_t q = 0; q < n; ++q) std::memcpy(dst + q * MR, src + q * src_stride, MR * sizeof(T));
}

// pack_input_patches: A[k][MR] for m-tile mt and k in [k0, k0 + kc), k = tap * cin + channel,
// straight from the unpadded input (xoff holds each pixel's spatial offset per tap, kOutside = zero).
// When all MR pixels of the tile read inside the input at a constant step (the common interior
// case) the rows are copied as runs instead of gathered one element at a time.
template <typename T>
void pack_input_patches(const T* xg, int64_t cs, const int64_t* xoff, int64_t taps, int64_t cin,
                        int64_t mcount, int mr, int64_t mt, int64_t k0, int64_t kc, T* dst) {
  const int64_t m_first = mt * mr;
  for (int64_t k = k0; k < k0 + kc;) {
    const int64_t t = k / cin, ci = k % cin;
    const int64_t n = std::min(cin - ci, k0 + kc - k);
    T* d = dst + (k - k0) * mr;
    bool regular = m_first + mr <= mcount;
    int64_t base = 0, step = 0;
    for (int r = 0; r < mr && regular; ++r) regular = xoff[(m_first + r) * taps + t] != kOutside;
    if (regular) {
      base = xoff[m_first * taps + t];
      step = mr > 1 ? xoff[(m_first + 1) * taps + t] - base : 0;
      for (int r = 2; r < mr && regular; ++r) regular = xoff[(m_first + r) * taps + t] == base + r * step;
    }
    if (regular && step == 1 && (mr == 4 || mr == 6 || mr == 12)) {
      const T* src = xg + base + ci * cs;
      if (mr == 4) copy_runs<4>(src, cs, n, d);
      else if (mr == 6) copy_runs<6>(src, cs, n, d);
      else copy_runs<12>(src, cs, n, d);
    } else {
      for (int r = 0; r < mr; ++r) {
        const int64_t mi = m_first + r;
        const int64_t o = regular ? base + r * step : (mi < mcount ? xoff[mi * taps + t] : kOutside);
        if (o == kOutside) {
          for (int64_t q = 0; q < n; ++q) d[q * mr + r] = T(0);
        } else {
          const T* src = xg + o + ci * cs;
          for (int64_t q = 0; q < n; ++q) d[q * mr + r] = src[q * cs];
        }
      }
    }
    k += n;
  }
}

// Per-thread scratch, allocated once per call before the parallel region (so that allocation
// failure is an exception on the calling thread, never inside OpenMP).
template <typename T>
struct ThreadScratch {
  AlignedBuffer<T> a_panel, c_block, out_tile, zero_row;
  AlignedBuffer<int64_t> x_offsets, y_offsets;
  std::vector<const T*> src_rows;
  ThreadScratch(int64_t mc, int64_t a_panel_size, int64_t nc, int64_t max_taps, int64_t direct_k, int64_t out_tile_size)
      : a_panel(a_panel_size), c_block(checked_mul(mc, nc)), out_tile(out_tile_size), zero_row(out_tile_size),
        x_offsets(checked_mul(mc, std::max<int64_t>(max_taps, 1))), y_offsets(mc),
        src_rows(static_cast<size_t>(std::max<int64_t>(direct_k, 1))) {
    std::memset(zero_row.get(), 0, sizeof(T) * static_cast<size_t>(std::max<int64_t>(out_tile_size, 1)));
  }
};

// Where each pixel of the block reads for each tap (spatial offset into x, or kOutside for a zero), and
// where it writes.
template <typename T>
void block_offsets(const ConvProblem<T>& p, const Phase& ph, const PhaseShape& shape, int64_t m0, int64_t mcount,
                   int64_t* xoff, int64_t* yoff) {
  const int64_t T_ = shape.num_taps;
  // Pixel m of the phase is (j0, j1, j2) in row-major order; step it incrementally.
  int64_t j2 = m0 % shape.count[2];
  int64_t j1 = (m0 / shape.count[2]) % shape.count[1];
  int64_t j0 = m0 / (shape.count[2] * shape.count[1]);
  for (int64_t mi = 0; mi < mcount; ++mi) {
    yoff[mi] = (ph[0]->out_start + j0 * ph[0]->out_step) * p.y_stride[0] +
               (ph[1]->out_start + j1 * ph[1]->out_step) * p.y_stride[1] +
               (ph[2]->out_start + j2 * ph[2]->out_step) * p.y_stride[2];
    const int64_t* i0 = ph[0]->in_index.data() + j0 * shape.taps[0];
    const int64_t* i1 = ph[1]->in_index.data() + j1 * shape.taps[1];
    const int64_t* i2 = ph[2]->in_index.data() + j2 * shape.taps[2];
    int64_t* row = xoff + mi * T_;
    for (int64_t t0 = 0; t0 < shape.taps[0]; ++t0)
      for (int64_t t1 = 0; t1 < shape.taps[1]; ++t1) {
        const bool outer_inside = i0[t0] >= 0 && i1[t1] >= 0;
        const int64_t outer = i0[t0] * p.x_stride[0] + i1[t1] * p.x_stride[1];
        for (int64_t t2 = 0; t2 < shape.taps[2]; ++t2)
          *row++ = outer_inside && i2[t2] >= 0 ? outer + i2[t2] * p.x_stride[2] : kOutside;
      }
    if (++j2 == shape.count[2]) {
      j2 = 0;
      if (++j1 == shape.count[1]) {
        j1 = 0;
        ++j0;
      }
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// ConvPlan: everything that depends only on shapes and weights (axis plans, phases, blocking,
// packed weights) is built once; execute() runs it on any x/y/bias of those shapes.
// ------------------------------------------------------------------------------------------------

template <typename T>
struct ConvPlan<T>::Impl {
  ConvProblem<T> shape;  // sizes, strides of w; x/y pointers unused
  UkernelInfo<T> uk;
  const char* isa = "";
  bool direct = false;   // pixel-vector kernel (depthwise / small groups) instead of GEMM
  int tile_m = 0;        // pixels per micro-tile (GEMM: MR; direct: PW)
  int tile_n = 0;        // output channels per micro-tile (GEMM: NR; direct: MRO)
  int direct_variant = 0;
  std::vector<AxisPlan> axes[kSpatialRank];
  std::vector<Phase> phases;
  std::vector<int64_t> wpack_offset;
  std::unique_ptr<AlignedBuffer<T>> wpack;
  std::vector<std::vector<int64_t>> contiguous_runs;  // direct path: per axis-2 plan, [tile][tap]
  int64_t n_tiles = 0, kc_max = 0, mc_max = 0, nt_per_block = 0, ldc = 0, max_taps = 0, max_k = 0;

  explicit Impl(const ConvProblem<T>& p) : shape(p), uk(active_ukernel<T>()), isa(active_ukernels().isa) {
    for (int a = 0; a < kSpatialRank; ++a) {
      if (p.kind == ConvKind::Forward)
        axes[a].push_back(forward_axis(p.in_size[a], p.out_size[a], p.kernel[a], p.stride[a], p.dilation[a],
                                       p.pad_before[a], p.mode));
      else
        axes[a] = transposed_axis(p.in_size[a], p.out_size[a], p.kernel[a], p.stride[a], p.dilation[a],
                                  p.pad_before[a]);
    }
    for (const AxisPlan& a0 : axes[0])
      for (const AxisPlan& a1 : axes[1])
        for (const AxisPlan& a2 : axes[2]) phases.push_back({&a0, &a1, &a2});
    for (const Phase& ph : phases) max_taps = std::max(max_taps, PhaseShape(ph).num_taps);
    const int64_t cin = p.cin_per_group, cout = p.cout_per_group, G = p.groups;
    max_k = checked_mul(max_taps, cin);

    // A GEMM over output channels wastes vector lanes when a group has few output channels
    // (depthwise: one); then the pixels go in the vector lanes instead.
    direct = uk.direct[0] && 2 * cout <= uk.nr && max_k <= 4096;
    if (direct) {
      direct_variant = cout <= 1 ? 0 : cout <= 2 ? 1 : 2;
      tile_n = kDirectChannelTiles[direct_variant];
      tile_m = uk.pw;
      kc_max = std::max<int64_t>(max_k, 1);
      mc_max = tile_m;
      // For each tile of PW outputs along the last axis and each tap: the first input index when
      // the tile reads PW consecutive inputs, else -1.
      for (const AxisPlan& a2 : axes[2]) {
        const int64_t taps = (int64_t)a2.taps.size(), tiles = ceil_div(a2.count, tile_m);
        std::vector<int64_t> runs(static_cast<size_t>(tiles * taps), -1);
        for (int64_t tile = 0; tile < tiles; ++tile) {
          if ((tile + 1) * tile_m > a2.count) continue;
          for (int64_t t = 0; t < taps; ++t) {
            const int64_t first = a2.in_index[tile * tile_m * taps + t];
            bool ok = first >= 0;
            for (int q = 1; q < tile_m && ok; ++q) ok = a2.in_index[(tile * tile_m + q) * taps + t] == first + q;
            if (ok) runs[tile * taps + t] = first;
          }
        }
        contiguous_runs.push_back(std::move(runs));
      }
    } else {
      tile_m = uk.mr;
      tile_n = uk.nr;
      // Cache blocking: a KC x NR panel of B stays in L1 (~16 KiB) while MC x KC of A streams from L2.
      kc_max = std::max<int64_t>(64, std::min<int64_t>(512, 16384 / (tile_n * (int64_t)sizeof(T))));
      mc_max = std::max<int64_t>(tile_m, (131072 / (kc_max * (int64_t)sizeof(T))) / tile_m * tile_m);
    }
    n_tiles = ceil_div(cout, tile_n);
    nt_per_block = direct ? n_tiles : std::max<int64_t>(1, 256 / tile_n);
    ldc = std::min<int64_t>(n_tiles, nt_per_block) * tile_n;

    // Packed weights: one panel set [n_tile][K][tile_n] per (group, phase).
    wpack_offset.assign(static_cast<size_t>(checked_mul(G, (int64_t)phases.size())) + 1, 0);
    size_t idx = 0;
    for (int64_t g = 0; g < G; ++g)
      for (const Phase& ph : phases) {
        const int64_t K = checked_mul(PhaseShape(ph).num_taps, cin);
        wpack_offset[idx + 1] = checked_add(wpack_offset[idx], checked_mul(n_tiles * tile_n, K));
        ++idx;
      }
    wpack.reset(new AlignedBuffer<T>(wpack_offset.back()));
    const int64_t n_phases = (int64_t)phases.size(), n_panels = G * n_phases * n_tiles;
    const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), n_panels)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t i = 0; i < n_panels; ++i) {
      const int64_t gp = i / n_tiles, nt = i % n_tiles;
      const int64_t K = PhaseShape(phases[gp % n_phases]).num_taps * cin;
      pack_weight_tile(p, phases[gp % n_phases], gp / n_phases, tile_n, nt,
                       wpack->get() + wpack_offset[gp] + nt * K * tile_n);
    }
  }

  void gemm_block(const ConvProblem<T>& p, const PhaseShape& shape, const WorkItem& it, const T* wp, const T* xg,
                  ThreadScratch<T>& s) const {
    const int mr = tile_m, nr = tile_n;
    const int64_t T_ = shape.num_taps, cin = p.cin_per_group;
    const int64_t K = T_ * cin, mcount = it.m1 - it.m0, m_tiles = ceil_div(mcount, mr);
    T* A = s.a_panel.get();
    T* C = s.c_block.get();
    if (K == 0) std::memset(C, 0, sizeof(T) * static_cast<size_t>(m_tiles * mr * ldc));
    for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, K - k0);
      for (int64_t mt = 0; mt < m_tiles; ++mt)
        pack_input_patches(xg, p.x_stride_c, s.x_offsets.get(), T_, cin, mcount, mr, mt, k0, kc, A + mt * mr * kc);
      for (int64_t nt = 0; nt < it.nt1 - it.nt0; ++nt) {
        const T* B = wp + (it.nt0 + nt) * K * nr + k0 * nr;
        for (int64_t mt = 0; mt < m_tiles; ++mt)
          uk.fn(kc, A + mt * mr * kc, B, C + mt * mr * ldc + nt * nr, ldc, k0 > 0);
      }
    }
  }

  // Pixel-vector path, one output row (all axes but the last fixed) at a time: for each tile of PW
  // pixels along the last axis, one source row per (tap, input channel), pointing straight into x
  // when the tile reads PW contiguous inputs (precomputed per tile and tap in contiguous_runs),
  // at a zero row when the tap falls in the zero padding of an outer axis, else into a gathered
  // panel. Results go straight to y with the bias.
  void direct_rows(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s) const {
    const Phase& ph = phases[it.phase];
    const PhaseShape shape(ph);
    const AxisPlan &a0 = *ph[0], &a1 = *ph[1], &a2 = *ph[2];
    const int64_t T0 = shape.taps[0], T1 = shape.taps[1], T2 = shape.taps[2];
    const int64_t cin = p.cin_per_group, cout = p.cout_per_group, cs = p.x_stride_c;
    const int64_t K = shape.num_taps * cin, cnt1 = shape.count[1], cnt2 = shape.count[2];
    const int pw = tile_m, mro = tile_n;
    const std::vector<int64_t>& contig = contiguous_runs[ph[2] - axes[2].data()];
    const bool x_unit = p.x_stride[2] == 1;
    const bool y_unit = p.y_stride[2] == 1 && a2.out_step == 1;
    const T* wp = wpack->get() + wpack_offset[it.g * (int64_t)phases.size() + it.phase];
    const T* xg = p.x + it.n * p.x_stride_n + it.g * cin * cs;
    const T** rows = s.src_rows.data();
    T* panel = s.a_panel.get();
    T* out = s.out_tile.get();
    const T* zero_row = s.zero_row.get();
    const DirectUkernel<T> fn = uk.direct[direct_variant];
    for (int64_t row = it.m0; row < it.m1; ++row) {
      const int64_t j0 = row / cnt1, j1 = row % cnt1;
      T* y_row = p.y + it.n * p.y_stride_n + (a0.out_start + j0 * a0.out_step) * p.y_stride[0] +
                 (a1.out_start + j1 * a1.out_step) * p.y_stride[1];
      for (int64_t tile = 0; tile * pw < cnt2; ++tile) {
        const int64_t j2 = tile * pw, npix = std::min<int64_t>(pw, cnt2 - j2);
        int64_t k = 0;
        for (int64_t t0 = 0; t0 < T0; ++t0) {
          const int64_t i0 = a0.in_index[j0 * T0 + t0];
          for (int64_t t1 = 0; t1 < T1; ++t1) {
            const int64_t i1 = a1.in_index[j1 * T1 + t1];
            const T* x_row = xg + i0 * p.x_stride[0] + i1 * p.x_stride[1];
            for (int64_t t2 = 0; t2 < T2; ++t2, k += cin) {
              const int64_t first = contig[tile * T2 + t2];
              if (i0 < 0 || i1 < 0) {
                for (int64_t ci = 0; ci < cin; ++ci) rows[k + ci] = zero_row;
              } else if (x_unit && first >= 0) {
                for (int64_t ci = 0; ci < cin; ++ci) rows[k + ci] = x_row + first + ci * cs;
              } else {
                for (int64_t ci = 0; ci < cin; ++ci) {
                  T* dst = panel + (k + ci) * pw;
                  for (int q = 0; q < pw; ++q) {
                    const int64_t i2 = q < npix ? a2.in_index[(j2 + q) * T2 + t2] : -1;
                    dst[q] = i2 >= 0 ? x_row[i2 * p.x_stride[2] + ci * cs] : T(0);
                  }
                  rows[k + ci] = dst;
                }
              }
            }
          }
        }
        for (int64_t nt = 0; nt < n_tiles; ++nt) {
          if (K > 0)
            fn(K, rows, wp + nt * K * mro, out);
          else
            std::memset(out, 0, sizeof(T) * static_cast<size_t>(mro * pw));
          for (int r = 0; r < mro && nt * mro + r < cout; ++r) {
            const int64_t cg = it.g * cout + nt * mro + r;
            const T b = p.bias ? p.bias[cg * p.bias_stride] : T(0);
            T* yc = y_row + cg * p.y_stride_c;
            const T* o = out + r * pw;
            if (y_unit) {
              T* yd = yc + a2.out_start + j2;
              for (int64_t q = 0; q < npix; ++q) yd[q] = o[q] + b;
            } else {
              for (int64_t q = 0; q < npix; ++q) yc[(a2.out_start + (j2 + q) * a2.out_step) * p.y_stride[2]] = o[q] + b;
            }
          }
        }
      }
    }
  }

  void run_item(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s) const {
    if (direct) return direct_rows(p, it, s);
    const Phase& ph = phases[it.phase];
    const PhaseShape shape(ph);
    const int64_t cin = p.cin_per_group, cout = p.cout_per_group, mcount = it.m1 - it.m0;
    const T* wp = wpack->get() + wpack_offset[it.g * (int64_t)phases.size() + it.phase];
    const T* xg = p.x + it.n * p.x_stride_n + it.g * cin * p.x_stride_c;
    int64_t* yoff = s.y_offsets.get();
    block_offsets(p, ph, shape, it.m0, mcount, s.x_offsets.get(), yoff);
    gemm_block(p, shape, it, wp, xg, s);
    // Scatter the block to y, adding the bias.
    const T* C = s.c_block.get();
    T* yn = p.y + it.n * p.y_stride_n;
    const int64_t co_begin = it.nt0 * tile_n, co_end = std::min(it.nt1 * tile_n, cout);
    for (int64_t co = co_begin; co < co_end; ++co) {
      const int64_t cg = it.g * cout + co;
      const T b = p.bias ? p.bias[cg * p.bias_stride] : T(0);
      T* yc = yn + cg * p.y_stride_c;
      const T* ccol = C + (co - co_begin);
      for (int64_t mi = 0; mi < mcount; ++mi) yc[yoff[mi]] = ccol[mi * ldc] + b;
    }
  }

  void execute(const ConvProblem<T>& p) const {
    const int64_t G = p.groups;
    std::vector<WorkItem> items;
    for (int64_t n = 0; n < p.batch; ++n)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t ph = 0; ph < (int64_t)phases.size(); ++ph) {
          const PhaseShape shape(phases[ph]);
          // GEMM items are blocks of pixels; direct items are blocks of output rows.
          const int64_t M = direct ? shape.count[0] * shape.count[1] : shape.num_pixels;
          const int64_t step = direct ? std::max<int64_t>(1, 256 / shape.count[2]) : mc_max;
          for (int64_t m0 = 0; m0 < M; m0 += step)
            for (int64_t nt0 = 0; nt0 < n_tiles; nt0 += nt_per_block)
              items.push_back({n, g, ph, m0, std::min(M, m0 + step), nt0, std::min(n_tiles, nt0 + nt_per_block)});
        }
    const int nthreads =
        static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), (int64_t)items.size())));
    const int64_t a_panel = direct ? checked_mul(max_k, tile_m) : checked_mul(mc_max, kc_max);
    std::vector<std::unique_ptr<ThreadScratch<T>>> scratch;
    for (int t = 0; t < nthreads; ++t)
      scratch.emplace_back(new ThreadScratch<T>(mc_max, a_panel, ldc, max_taps, direct ? max_k : 0,
                                                (int64_t)tile_m * tile_n));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t i = 0; i < (int64_t)items.size(); ++i) run_item(p, items[i], *scratch[omp_get_thread_num()]);
    t_last_algorithm = describe() + " threads=" + std::to_string(nthreads);
  }

  std::string describe() const {
    return std::string(direct ? "direct_pixels" : "gather_gemm") + " " + isa + " " + std::to_string(tile_m) + "x" +
           std::to_string(tile_n) + " phases=" + std::to_string(phases.size());
  }
};

template <typename T>
ConvPlan<T>::ConvPlan(const ConvProblem<T>& p) {
  validate(p);
  impl_ = std::make_shared<const Impl>(p);
}

template <typename T>
void ConvPlan<T>::execute(const ConvProblem<T>& p) const {
  validate(p);
  const ConvProblem<T>& s = impl_->shape;
  bool same = p.kind == s.kind && p.groups == s.groups && p.cin_per_group == s.cin_per_group &&
              p.cout_per_group == s.cout_per_group && p.mode == s.mode;
  for (int a = 0; a < kSpatialRank; ++a)
    same = same && p.in_size[a] == s.in_size[a] && p.out_size[a] == s.out_size[a] && p.kernel[a] == s.kernel[a] &&
           p.stride[a] == s.stride[a] && p.dilation[a] == s.dilation[a] && p.pad_before[a] == s.pad_before[a];
  if (!same) throw std::invalid_argument("convfast kernel: the problem does not match the plan's shapes");
  impl_->execute(p);
}

template <typename T>
std::string ConvPlan<T>::describe() const {
  return impl_->describe();
}

std::string last_algorithm() { return t_last_algorithm; }

template <typename T>
void run_convolution(const ConvProblem<T>& p) {
  ConvPlan<T>(p).execute(p);
}

template class ConvPlan<float>;
template class ConvPlan<double>;
template void run_convolution<float>(const ConvProblem<float>&);
template void run_convolution<double>(const ConvProblem<double>&);

}  // namespace convfast
