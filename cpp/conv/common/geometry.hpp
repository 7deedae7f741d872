// Geometry shared by every forward algorithm: per-axis plans (where each output's taps read,
// padding modes resolved by index), stride phases of transposed convolutions, row-buffer layouts
// of the direct path, work items, and the validation of a problem's sizes.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "convfast/engine.hpp"
#include "convfast/scratch.hpp"

namespace convfast {
namespace engine {

// negative (negative-stride views), so -1 cannot serve.
constexpr int64_t kOutside = INT64_MIN;

using detail::AlignedBuffer;
using detail::ceil_div;
using detail::checked_add;
using detail::checked_mul;

// Floor division and its remainder for a positive divisor.
inline int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

// One spatial axis of one phase: which outputs it covers and where each tap reads. Output j of the
// phase (y coordinate out_start + j * out_step) reads, for tap t, input coordinate
// index(j, t) = map(j * in_step + tap_offset[t]) -- mapped by the padding mode, or -1 for a zero.
// It is computed when needed rather than tabulated: a table would cost 8 bytes per output position
// and tap, several times the output itself along a long axis. validate() bounds the sizes so that
// the arithmetic cannot overflow.
struct AxisPlan {
  int64_t out_start = 0, out_step = 1, count = 0;
  int64_t in_size = 1, in_step = 1;
  PadMode mode = PadMode::Zeros;
  std::vector<int64_t> taps;        // kernel index of each tap
  std::vector<int64_t> tap_offset;  // unmapped input coordinate of output 0, per tap

  int64_t index(int64_t j, int64_t t) const {
    const int64_t v = j * in_step + tap_offset[t];
    return v >= 0 && v < in_size ? v : map_padded_index(v, in_size, mode);
  }
  // The least and greatest tap offsets (taps is never empty).
  int64_t lowest_offset() const { return *std::min_element(tap_offset.begin(), tap_offset.end()); }
  int64_t highest_offset() const { return *std::max_element(tap_offset.begin(), tap_offset.end()); }
};

inline AxisPlan forward_axis(int64_t in, int64_t out, int64_t k, int64_t s, int64_t d, int64_t pb, PadMode mode) {
  AxisPlan a;
  a.count = out;
  a.in_size = in;
  a.in_step = s;
  a.mode = mode;
  a.taps.reserve(static_cast<size_t>(k));  // a huge (broadcast) kernel fails here, before any work
  a.tap_offset.reserve(static_cast<size_t>(k));
  for (int64_t t = 0; t < k; ++t) {
    a.taps.push_back(t);
    a.tap_offset.push_back(t * d - pb);
  }
  return a;
}

// Output o receives x[i] * w[t] where o + pb = i*s + t*d. Outputs with the same residue
// r = o mod s share one set of taps, and within a residue class i = j + (r + pb - t*d) / s.
// Only residues that some tap reaches become phases (at most k of them, however large the stride);
// the outputs of the others receive no product and are set to the bias by execute().
inline std::vector<AxisPlan> transposed_axis(int64_t in, int64_t out, int64_t k, int64_t s, int64_t d, int64_t pb) {
  // (residue, tap) for every tap whose outputs are not all cropped; sorted, each residue's taps are
  // consecutive and in kernel order.
  std::vector<std::pair<int64_t, int64_t>> reach;
  reach.reserve(static_cast<size_t>(k));  // a huge (broadcast) kernel fails here, before any work
  for (int64_t t = 0; t < k; ++t) {
    const int64_t o = t * d - pb;               // output coordinate of input 0 through tap t
    const int64_t r = o - floor_div(o, s) * s;  // its residue, in [0, s)
    if (r < out) reach.emplace_back(r, t);
  }
  std::sort(reach.begin(), reach.end());
  std::vector<AxisPlan> phases;
  for (const auto& [r, t] : reach) {
    if (phases.empty() || phases.back().out_start != r) {
      AxisPlan a;
      a.out_start = r;
      a.out_step = s;
      a.count = ceil_div(out - r, s);
      a.in_size = in;
      phases.push_back(std::move(a));
    }
    phases.back().taps.push_back(t);
    phases.back().tap_offset.push_back((r + pb - t * d) / s);  // exact: r + pb - t*d is a multiple of s
  }
  return phases;
}

// The direct path reads the last axis through per-row buffers in which every tap's inputs are
// contiguous: inputs are split by residue modulo in_step (so a strided convolution reads
// consecutive buffer entries) and padded (zeros, or the padding mode's values) at both ends.
// Tap t reads buffer slot[t] from entry j + shift[t]; the buffer of slot r holds, at entry u,
// input map((u + shift_min) * in_step + residue[r]).
struct RowBufferPlan {
  int64_t length = 0;                             // entries per buffer, PW-tile slack included
  std::vector<int64_t> residue;                   // per slot
  std::vector<std::vector<int64_t>> src_index;    // per slot: input coordinate per entry, or -1
  std::vector<int64_t> run_begin, run_end;        // per slot: entries reading inputs in_step apart
  int64_t in_step = 1;
  std::vector<int64_t> slot, shift;               // per tap

  bool usable = false;  // false when the buffers would be unreasonably long (huge dilation)

  RowBufferPlan(const AxisPlan& a, int tile, int64_t max_length) {
    const int64_t nt = static_cast<int64_t>(a.taps.size());
    int64_t shift_min = 0, shift_max = 0;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t q = floor_div(a.tap_offset[t], a.in_step), r = a.tap_offset[t] - q * a.in_step;
      shift_min = t == 0 ? q : std::min(shift_min, q);
      shift_max = t == 0 ? q : std::max(shift_max, q);
      const auto it = std::find(residue.begin(), residue.end(), r);
      slot.push_back(it - residue.begin());
      if (it == residue.end()) residue.push_back(r);
      shift.push_back(q);
    }
    for (int64_t& q : shift) q -= shift_min;
    in_step = a.in_step;
    length = ceil_div(a.count, tile) * tile + (shift_max - shift_min);
    // The buffers extend past the last output to whole tiles; their coordinates
    // (u + shift_min) * in_step must stay far from overflow even for an enormous (irrelevant) step.
    int64_t extent;
    usable = length <= max_length &&
             !__builtin_mul_overflow(std::max(std::abs(shift_min), std::abs(shift_min + length)), a.in_step, &extent) &&
             extent <= (int64_t(1) << 61);
    if (!usable) return;
    for (const int64_t r : residue) {
      std::vector<int64_t> src(static_cast<size_t>(length));
      for (int64_t u = 0; u < length; ++u) src[u] = map_padded_index((u + shift_min) * a.in_step + r, a.in_size, a.mode);
      // The longest run of entries reading inputs in_step apart (the interior), copied as a block
      // (a strided copy for a strided convolution).
      int64_t best_begin = 0, best_end = 0;
      for (int64_t u = 0; u < length;) {
        int64_t v = u + 1;
        if (src[u] >= 0)
          while (v < length && src[v] == src[v - 1] + a.in_step) ++v;
        if (src[u] >= 0 && v - u > best_end - best_begin) best_begin = u, best_end = v;
        u = v;
      }
      run_begin.push_back(best_begin);
      run_end.push_back(best_end);
      src_index.push_back(std::move(src));
    }
  }
};

using Phase = std::array<const AxisPlan*, kSpatialRank>;

// The axis plans of a forward problem, one per axis, and its one phase (the depthwise weight
// gradients run the forward's plans on them); false where an axis has no output.
template <typename T>
bool forward_phase(const ConvProblem<T>& p, std::vector<AxisPlan> (&axes)[kSpatialRank], Phase& phase) {
  if (p.kind != ConvKind::Forward) return false;
  for (int a = 0; a < kSpatialRank; ++a) {
    if (p.out_size[a] < 1) return false;
    axes[a].assign(1, forward_axis(p.in_size[a], p.out_size[a], p.kernel[a], p.stride[a], p.dilation[a],
                                   p.pad_before[a], p.mode));
  }
  phase = {&axes[0][0], &axes[1][0], &axes[2][0]};
  return true;
}

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
    // Bounds under which every coordinate the plans compute (j * stride + t * dilation - pad, and
    // the transposed residue arithmetic) stays far from int64 overflow.
    constexpr int64_t kLimit = int64_t(1) << 61;
    int64_t span_out, span_kernel;
    if (__builtin_mul_overflow(std::max<int64_t>(p.out_size[a], 1) - 1, p.stride[a], &span_out) ||
        __builtin_mul_overflow(std::max<int64_t>(p.kernel[a], 1) - 1, p.dilation[a], &span_kernel) ||
        span_out > kLimit || span_kernel > kLimit || p.in_size[a] > kLimit || p.out_size[a] > kLimit ||
        p.pad_before[a] > kLimit || p.pad_before[a] < -kLimit)
      bad("sizes, stride, dilation or padding too large for 64-bit index arithmetic");
  }
  if (!p.x || !p.w || !p.y) bad("null tensor");
}
}  // namespace engine
}  // namespace convfast
