// Depthwise layers (one input and one output channel per group) with the channels in the vector
// lanes, as oneDNN runs them after reordering to nChw8c: a work item takes L groups (L = the
// vector width: 8 floats with AVX2) of one image and a block of output rows, copies the input
// window they read into a buffer of pixels of L channels each (transposing channels-first
// input, L x L at a time; channels-last input is copied as it is), with the padding written in,
// and computes every output as one vector: per tap, one multiply-add of a weight vector (the L
// channels' weights) with the buffered pixel the tap reads. Stride and dilation are only the
// distances between the pixels an output reads, so a strided layer reads its buffer at a step
// instead of splitting it into stride phases.
//
// Transposed layers come as stride phases (AxisPlans per axis, common/geometry.hpp). An item takes one
// phase plan along axes 0 and 1 and every phase plan along axis 2: those read the same input rows
// (at different taps), so one buffer serves them, and their outputs interleave along the row. Two
// phases at step 2 (stride 2) are stored together by the pair store, contiguous rows of 2L outputs.
//
// The direct path (pixels in the lanes, one channel per tile) spent a stride-2 depthwise layer
// filling its stride-phase slabs and splitting tiles at row ends (the kernel itself was 13 % of
// its time); here the buffer is filled once with whole-vector transposes.
//
// Each output is one chain over the taps in the direct kernel's order (k = t, row-major taps),
// starting from zero, the bias added to the finished sum: bitwise the direct path's and the
// GEMM's results.
//
// The entry (channel_lanes_algorithm) is at the end of this unit, after the depthwise weight
// gradient (depthwise_lanes_weight_grad), which reuses the plan.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "../algorithm.hpp"
#include "../common/geometry.hpp"
#include "../common/packing.hpp"

namespace convfast {
namespace engine {

namespace channel_lanes {

template <typename T>
struct Conv final : AlgorithmPlan {
  // Input buffer per item, all slices together; an item takes as many output rows as fit.
  static constexpr int64_t kBudgetBytes = 192 * 1024;
  static constexpr int64_t kMaxBufferBytes = int64_t(8) << 20;  // one row's window past this: not taken

  // The buffered rows of one axis-1 plan: an item's output rows and the input rows they read.
  struct RowPlan {
    int64_t min1 = 0, span1 = 0, rows_per_item = 1, pitch = 0;
  };
  // One phase: its taps' buffer offsets (for output (first row of the item, 0)) and weights.
  struct PhasePlan {
    std::vector<int64_t> tap_offset;
    int64_t wpack_offset = 0;
  };
  struct Item {
    int64_t p0, p1, j0, r0, r1;  // axis-0 plan and its output j0, axis-1 plan and its outputs [r0, r1)
  };

  const UkernelInfo<T>& uk;
  int L;
  std::vector<const AxisPlan*> plans[kSpatialRank];  // the phase plans along each axis
  int64_t blocks = 0;          // channel blocks of L groups (the last may be partial)
  int64_t min2 = 0, cols = 0;  // buffered pixels per row (axis 2), from input coordinate min2
  int64_t buffer_size = 0;     // elements per thread
  int64_t out_size = 0;        // one output row of every axis-2 plan, elements
  bool pair_store = false;     // two axis-2 plans at step 2, residues 0 and 1
  std::vector<RowPlan> rows;   // per axis-1 plan
  std::vector<PhasePlan> phase_plans;  // per (p0, p1, p2), row-major
  std::vector<Item> items;     // per image and channel block
  std::unique_ptr<AlignedBuffer<T>> wpack;  // per phase [block][tap][L], zero for lanes past the last group

  // Whether the layer can run here (else the caller keeps its other paths).
  static bool applies(const ConvProblem<T>& p, const std::vector<Phase>& phases, const UkernelInfo<T>& uk) {
    return uk.channel_lanes && uk.transpose_block && p.cin_per_group == 1 && p.cout_per_group == 1 &&
           !phases.empty();
  }

  static int64_t taps(const AxisPlan& a) { return static_cast<int64_t>(a.taps.size()); }

  Conv(const ConvProblem<T>& p, const std::vector<AxisPlan> (&axes)[kSpatialRank], const UkernelInfo<T>& ukernel,
       bool& ok)
      : uk(ukernel), L(ukernel.lanes) {
    ok = false;
    blocks = ceil_div(p.groups, L);
    for (int a = 0; a < kSpatialRank; ++a)
      for (const AxisPlan& plan : axes[a])
        if (plan.count > 0) plans[a].push_back(&plan);
    int64_t max2 = INT64_MIN, max_taps0 = 1;
    min2 = INT64_MAX;
    for (const AxisPlan* a2 : plans[2]) {
      min2 = std::min(min2, a2->lowest_offset());
      max2 = std::max(max2, (a2->count - 1) * a2->in_step + a2->highest_offset());
      out_size = checked_add(out_size, checked_mul(a2->count, L));
    }
    for (const AxisPlan* a0 : plans[0]) max_taps0 = std::max(max_taps0, taps(*a0));
    cols = max2 - min2 + 1;
    const int64_t slice_elements = checked_mul(cols, L);
    for (const AxisPlan* a1 : plans[1]) {
      RowPlan r;
      r.min1 = a1->lowest_offset();
      r.span1 = a1->highest_offset() - r.min1 + 1;
      if (checked_mul(checked_mul(max_taps0 * r.span1, slice_elements), sizeof(T)) > kMaxBufferBytes) return;
      // Rows per item: the most whose window fits the budget, and at least one.
      const int64_t per_row = checked_mul(max_taps0 * a1->in_step, slice_elements);
      const int64_t fixed = checked_mul(max_taps0 * r.span1, slice_elements) - per_row;
      r.rows_per_item = std::max<int64_t>(
          1, std::min<int64_t>(a1->count, (kBudgetBytes / (int64_t)sizeof(T) - fixed) / std::max<int64_t>(per_row, 1)));
      r.pitch = (r.rows_per_item - 1) * a1->in_step + r.span1;
      buffer_size = std::max(buffer_size, checked_mul(max_taps0 * r.pitch, slice_elements));
      rows.push_back(r);
    }
    pair_store = plans[2].size() == 2 && plans[2][0]->out_step == 2 && plans[2][0]->out_start == 0 &&
                 plans[2][1]->out_start == 1 && plans[2][0]->count - plans[2][1]->count <= 1;
    // Phases and their packed weights: group c's kernel, at the phase's taps, in lane c % L of block c / L.
    int64_t wpack_size = 0;
    for (const AxisPlan* a0 : plans[0])
      for (size_t i1 = 0; i1 < plans[1].size(); ++i1)
        for (const AxisPlan* a2 : plans[2]) {
          const AxisPlan* a1 = plans[1][i1];
          PhasePlan ph;
          for (int64_t t0 = 0; t0 < taps(*a0); ++t0)
            for (int64_t t1 = 0; t1 < taps(*a1); ++t1)
              for (int64_t t2 = 0; t2 < taps(*a2); ++t2)
                ph.tap_offset.push_back(
                    ((t0 * rows[i1].pitch + (a1->tap_offset[t1] - rows[i1].min1)) * cols + (a2->tap_offset[t2] - min2)) * L);
          ph.wpack_offset = wpack_size;
          wpack_size = checked_add(wpack_size, checked_mul(checked_mul(blocks, (int64_t)ph.tap_offset.size()), L));
          phase_plans.push_back(std::move(ph));
        }
    wpack.reset(new AlignedBuffer<T>(wpack_size));
    std::fill(wpack->get(), wpack->get() + wpack_size, T(0));
    size_t phase = 0;
    for (const AxisPlan* a0 : p.w ? plans[0] : std::vector<const AxisPlan*>())  // no weights: weight_grad
      for (const AxisPlan* a1 : plans[1])
        for (const AxisPlan* a2 : plans[2]) {
          const int64_t n_taps = (int64_t)phase_plans[phase].tap_offset.size();
          T* wp = wpack->get() + phase_plans[phase++].wpack_offset;
          for (int64_t c = 0; c < p.groups; ++c)
            for (int64_t t0 = 0, t = 0; t0 < taps(*a0); ++t0)
              for (int64_t t1 = 0; t1 < taps(*a1); ++t1)
                for (int64_t t2 = 0; t2 < taps(*a2); ++t2, ++t)
                  wp[((c / L) * n_taps + t) * L + c % L] =
                      p.w[c * p.w_stride_g + a0->taps[t0] * p.w_stride[0] + a1->taps[t1] * p.w_stride[1] +
                          a2->taps[t2] * p.w_stride[2]];
        }
    for (int64_t p0 = 0; p0 < (int64_t)plans[0].size(); ++p0)
      for (int64_t j0 = 0; j0 < plans[0][p0]->count; ++j0)
        for (int64_t p1 = 0; p1 < (int64_t)plans[1].size(); ++p1)
          for (int64_t r0 = 0; r0 < plans[1][p1]->count; r0 += rows[p1].rows_per_item)
            items.push_back({p0, p1, j0, r0, std::min(plans[1][p1]->count, r0 + rows[p1].rows_per_item)});
    ok = true;
  }

  // Per thread. out_rows has 2 L pixels of zeros past its end, which a store's last transpose
  // may read; block takes the transposes of short runs (the flat fill's, a store's last).
  struct Scratch {
    AlignedBuffer<T> buffer, out_rows, block;
    std::vector<const T*> src;
    Scratch(int64_t buffer_size, int64_t out_size, int64_t max_taps, int lanes)
        : buffer(buffer_size), out_rows(out_size + 2 * lanes * lanes), block(2 * int64_t(lanes) * lanes),
          src(static_cast<size_t>(max_taps)) {
      std::fill(out_rows.get() + out_size, out_rows.get() + out_size + 2 * lanes * lanes, T(0));
    }
  };

  int64_t max_rows_per_item() const {
    int64_t m = 1;
    for (const RowPlan& r : rows) m = std::max(m, r.rows_per_item);
    return m;
  }

  int64_t max_taps() const {
    int64_t m = 1;
    for (const PhasePlan& ph : phase_plans) m = std::max(m, (int64_t)ph.tap_offset.size());
    return m;
  }

  // The buffered entries u in [u_begin, u_end) read input pixels v = min2 + u in [0, in_size) of a
  // row (the interior), the others the padding mode's pixels (a2's: the axis's plans share it).
  int64_t interior_begin() const { return std::min(cols, std::max<int64_t>(0, -min2)); }
  int64_t interior_end(const AxisPlan& a2) const { return std::max(interior_begin(), std::min(cols, a2.in_size - min2)); }

  // One buffered pixel (L elements) copied or zeroed, as a fixed-size copy where L is a vector:
  // std::copy / std::fill of a run-time L were library calls, 8 % of a 7x7 map's weight gradient.
  void copy_lanes(const T* s, T* d) const {
    switch (L * sizeof(T)) {
      case 64: std::memcpy(d, s, 64); break;
      case 32: std::memcpy(d, s, 32); break;
      case 16: std::memcpy(d, s, 16); break;
      default: std::copy(s, s + L, d);
    }
  }
  void zero_lanes(T* d) const {
    alignas(64) static const T zeros[64 / sizeof(T)] = {};
    copy_lanes(zeros, d);
  }

  // Input pixel i of the row x_row (lane l: channel l's, lanes past `lanes` zero; zeros for i < 0)
  // into the buffered pixel d.
  void copy_pixel(const ConvProblem<T>& p, const T* x_row, int64_t i, int64_t lanes, T* d) const {
    if (i < 0)
      zero_lanes(d);
    else
      copy_channels(x_row + i * p.x_stride[2], p.x_stride_c, lanes, d);
  }

  // One pixel of L channels from channels `stride` apart (lanes past `lanes` zero): the input's
  // (copy_pixel) and the output gradient's.
  void copy_channels(const T* src, int64_t stride, int64_t lanes, T* d) const {
    for (int64_t l = 0; l < lanes; ++l) d[l] = src[l * stride];
    for (int64_t l = lanes; l < L; ++l) d[l] = T(0);
  }

  // The buffered row's entries outside the interior, mapped by the padding mode.
  void fill_row_padding(const ConvProblem<T>& p, const AxisPlan& a2, const T* x_row, int64_t lanes, T* dst) const {
    for (int64_t u = 0; u < interior_begin(); ++u)
      copy_pixel(p, x_row, map_padded_index(min2 + u, a2.in_size, a2.mode), lanes, dst + u * L);
    for (int64_t u = interior_end(a2); u < cols; ++u)
      copy_pixel(p, x_row, map_padded_index(min2 + u, a2.in_size, a2.mode), lanes, dst + u * L);
  }

  // One buffered row: pixels v = min2 + u (u < cols) of the input row x_row.
  void fill_row(const ConvProblem<T>& p, const AxisPlan& a2, const T* x_row, int64_t lanes, T* dst) const {
    const int64_t xsc = p.x_stride_c, u_end = interior_end(a2);
    int64_t u = interior_begin();
    if (lanes == L && p.x_stride[2] == 1 && xsc != 1)  // channels-first rows: L x L transposes
      for (; u + L <= u_end; u += L) uk.transpose_block(x_row + (min2 + u), xsc, dst + u * L, L);
    for (; u < u_end; ++u) copy_pixel(p, x_row, min2 + u, lanes, dst + u * L);
    fill_row_padding(p, a2, x_row, lanes, dst);
  }

  // Whether consecutive interior rows can be filled as one run of pixels (flat_fill): channels-first
  // input rows stored one after the other, each buffered whole, all L lanes used.
  bool fills_flat(const ConvProblem<T>& p, const AxisPlan& a2, int64_t lanes) const {
    return lanes == L && p.x_stride[2] == 1 && p.x_stride_c != 1 && p.x_stride[1] == a2.in_size &&
           interior_begin() == -min2 && interior_end(a2) - interior_begin() == a2.in_size;
  }

  // Rows [0, n_rows) of the buffer from as many consecutive input rows starting at x_row, their
  // pixels transposed as one run, L at a time: a row shorter than L (7x7 and 14x14 maps) was copied
  // a scalar at a time per lane.
  void flat_fill(const ConvProblem<T>& p, const AxisPlan& a2, const T* x_row, int64_t n_rows, T* dst,
                 Scratch& s) const {
    const int64_t width = a2.in_size, pixels = n_rows * width, row_elements = cols * L;
    T* dst_interior = dst + interior_begin() * L;
    T* block = s.block.get();
    int64_t q = 0, row = 0, col = 0;
    for (; q + L <= pixels; q += L) {
      uk.transpose_block(x_row + q, p.x_stride_c, block, L);
      for (int64_t k = 0; k < L; ++k) {
        copy_lanes(block + k * L, dst_interior + row * row_elements + col * L);
        if (++col == width) col = 0, ++row;
      }
    }
    for (; q < pixels; ++q) {
      copy_pixel(p, x_row, q, L, dst_interior + row * row_elements + col * L);
      if (++col == width) col = 0, ++row;
    }
    for (int64_t r = 0; r < n_rows; ++r)
      fill_row_padding(p, a2, x_row + r * p.x_stride[1], L, dst + r * row_elements);
  }

  // The item's input window into the scratch buffer: per axis-0 tap, the rows its output rows read.
  void fill_window(const ConvProblem<T>& p, int64_t n, int64_t cb, const Item& it, Scratch& s) const {
    const AxisPlan &a0 = *plans[0][it.p0], &a1 = *plans[1][it.p1];
    const RowPlan& rp = rows[it.p1];
    const int64_t c0 = cb * L, lanes = std::min<int64_t>(L, p.groups - c0);
    const int64_t rows_in = (it.r1 - it.r0 - 1) * a1.in_step + rp.span1;
    T* buf = s.buffer.get();
    const T* xc = p.x + n * p.x_stride_n + c0 * p.x_stride_c;
    const AxisPlan& a2 = *plans[2][0];
    const bool flat = fills_flat(p, a2, lanes);
    for (int64_t t0 = 0; t0 < taps(a0); ++t0) {
      const int64_t i0 = a0.index(it.j0, t0);
      for (int64_t u1 = 0; u1 < rows_in;) {
        T* dst = buf + (t0 * rp.pitch + u1) * cols * L;
        const int64_t v1 = it.r0 * a1.in_step + rp.min1 + u1;  // the input row, before the padding mode
        if (flat && i0 >= 0 && v1 >= 0 && v1 < a1.in_size) {  // the interior rows from here, as one run
          const int64_t n_rows = std::min(rows_in - u1, a1.in_size - v1);
          flat_fill(p, a2, xc + i0 * p.x_stride[0] + v1 * p.x_stride[1], n_rows, dst, s);
          u1 += n_rows;
          continue;
        }
        const int64_t i1 = map_padded_index(v1, a1.in_size, a1.mode);
        if (i0 < 0 || i1 < 0)
          std::fill(dst, dst + cols * L, T(0));
        else
          fill_row(p, a2, xc + i0 * p.x_stride[0] + i1 * p.x_stride[1], lanes, dst);
        ++u1;
      }
    }
  }

  void run_item(const ConvProblem<T>& p, int64_t n, int64_t cb, const Item& it, const T* bias, Scratch& s) const {
    const AxisPlan &a0 = *plans[0][it.p0], &a1 = *plans[1][it.p1];
    const int64_t c0 = cb * L, lanes = std::min<int64_t>(L, p.groups - c0), n_rows = it.r1 - it.r0;
    fill_window(p, n, cb, it, s);
    // Every phase's outputs of the item's rows, phase after phase: [phase][row][output][L].
    const size_t first_phase = (it.p0 * plans[1].size() + it.p1) * plans[2].size();
    T* out = s.out_rows.get();
    for (size_t p2 = 0; p2 < plans[2].size(); ++p2) {
      const AxisPlan& a2 = *plans[2][p2];
      const PhasePlan& ph = phase_plans[first_phase + p2];
      const int64_t n_taps = (int64_t)ph.tap_offset.size();
      for (int64_t t = 0; t < n_taps; ++t) s.src[t] = s.buffer.get() + ph.tap_offset[t];
      uk.channel_lanes(n_rows * a2.count, n_taps, s.src.data(), a2.in_step * L, a2.count, a1.in_step * cols * L,
                       wpack->get() + ph.wpack_offset + cb * n_taps * L, out);
      out += n_rows * a2.count * L;
    }
    const T* bias_block = bias + c0;
    T* yc = p.y + n * p.y_stride_n + c0 * p.y_stride_c + (a0.out_start + it.j0 * a0.out_step) * p.y_stride[0];
    const AxisPlan& first2 = *plans[2][0];
    if (plans[2].size() == 1 && first2.out_step == 1 && first2.out_start == 0 &&
        a1.out_step * p.y_stride[1] == first2.count * p.y_stride[2]) {  // the item's rows are one run of y
      store(s.out_rows.get(), nullptr, first2, n_rows * first2.count, lanes, bias_block,
            yc + (a1.out_start + it.r0 * a1.out_step) * p.y_stride[1], p, s.block.get());
      return;
    }
    for (int64_t r = it.r0; r < it.r1; ++r) {
      T* yr = yc + (a1.out_start + r * a1.out_step) * p.y_stride[1];
      const T* rows_of_phase = s.out_rows.get();
      const T* even = rows_of_phase + (r - it.r0) * first2.count * L;  // phase 0's row (the pair store's)
      for (size_t p2 = 0; p2 < plans[2].size(); ++p2) {
        const AxisPlan& a2 = *plans[2][p2];
        // with phase 1's row (the next), stored as pairs of outputs 2j and 2j + 1 below
        if (!(pair_store && p2 == 0))
          store(rows_of_phase + (r - it.r0) * a2.count * L, pair_store ? even : nullptr, a2, a2.count, lanes,
                bias_block, yr, p, s.block.get());
        rows_of_phase += n_rows * a2.count * L;
      }
    }
  }

  // `count` outputs of the phase a2 (one row, or consecutive rows as one run) into y from yr:
  // y[out_start + j * out_step (axis 2) + l * ysc] = out[j][l] + bias[l]. With `even` (phase 0's
  // outputs, this phase being 1 of a pair), outputs 2j from even and 2j + 1 from out.
  // Channels-first rows get L x L transposes (pairs of them for two interleaved phases); the last
  // short run goes through `block` and is copied a channel row at a time (stored a scalar at a time,
  // the 14-output rows of the stride-2 grad_input on 28x28 maps stored no vector).
  void store(const T* out, const T* even, const AxisPlan& a2, int64_t count, int64_t lanes, const T* bias, T* yr,
             const ConvProblem<T>& p, T* block) const {
    const int64_t ysc = p.y_stride_c;
    const bool transpose = lanes == L && ysc != 1 && p.y_stride[2] == 1;
    auto copy_channel_rows = [&](T* y, int64_t width, int64_t pitch) {
      for (int64_t l = 0; l < L; ++l) copy_short_run(block + l * pitch, y + l * ysc, width);
    };
    int64_t j = 0;
    if (even) {
      const AxisPlan& phase0 = *plans[2][0];
      if (transpose) {
        for (; j + L <= count; j += L) uk.store_transposed_pair(even + j * L, out + j * L, L, bias, yr + 2 * j, ysc);
        if (j < phase0.count) {
          uk.store_transposed_pair(even + j * L, out + j * L, L, bias, block, 2 * L);
          copy_channel_rows(yr + 2 * j, (phase0.count - j) + (count - j), 2 * L);
          return;
        }
      }
      store_scalar(even, phase0.count, j, lanes, bias, yr, phase0.out_step * p.y_stride[2],
                   phase0.out_start * p.y_stride[2], ysc);
    } else if (transpose && a2.out_step == 1) {
      for (; j + L <= count; j += L) uk.store_transposed(out + j * L, L, bias, yr + a2.out_start + j, ysc);
      if (j < count) {
        uk.store_transposed(out + j * L, L, bias, block, L);
        copy_channel_rows(yr + a2.out_start + j, count - j, L);
        return;
      }
    }
    store_scalar(out, count, j, lanes, bias, yr, a2.out_step * p.y_stride[2], a2.out_start * p.y_stride[2], ysc);
  }

  // Outputs [j, count) of one phase's row: y[start + j * step + l * ysc] = out[j][l] + bias[l].
  void store_scalar(const T* out, int64_t count, int64_t j, int64_t lanes, const T* bias, T* yr, int64_t step,
                    int64_t start, int64_t ysc) const {
    for (; j < count; ++j)
      for (int64_t l = 0; l < lanes; ++l) yr[start + j * step + l * ysc] = out[j * L + l] + bias[l];
  }

  // The weight gradient of the (forward, one-phase) depthwise layer p: out[c][t] = sum over images
  // and outputs of p.x at tap t of the output times p.y (here the output gradient, read only), as
  // the GEMM path defines it (padding products included). Per item, the input window is buffered as
  // for the forward and the gradient's rows as pixels of L channels, and every tap is one vector
  // chain over the item's outputs; the items' sums are then added per channel in item order, so the
  // result does not depend on the thread count. Memory: taps x L per item, and the forward's scratch.
  void weight_grad(const ConvProblem<T>& p, T* out, int nthreads_max) const {
    const int64_t taps = (int64_t)phase_plans[0].tap_offset.size(), count2 = plans[2][0]->count;
    const int64_t per_image = blocks * (int64_t)items.size(), total = p.batch * per_image;
    AlignedBuffer<T> partial(checked_mul(checked_mul(std::max<int64_t>(total, 1), taps), L));
    const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads_max, total)));
    std::vector<std::unique_ptr<Scratch>> scratch;
    for (int t = 0; t < nthreads; ++t) scratch.emplace_back(new Scratch(buffer_size, out_size * rows[0].rows_per_item, taps, L));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t i = 0; i < total; ++i) {
      const int64_t n = i / per_image, cb = (i % per_image) / (int64_t)items.size();
      const Item& it = items[i % (int64_t)items.size()];
      Scratch& s = *scratch[omp_get_thread_num()];
      fill_window(p, n, cb, it, s);
      const AxisPlan &a0 = *plans[0][0], &a1 = *plans[1][0], &a2 = *plans[2][0];
      const int64_t c0 = cb * L, lanes = std::min<int64_t>(L, p.groups - c0);
      const int64_t gsc = p.y_stride_c, gs2 = p.y_stride[2];
      T* acc = partial.get() + i * taps * L;
      std::fill(acc, acc + taps * L, T(0));
      // The gradient's rows as pixels of L channels (lanes past the last group zero), row after row.
      T* gy_rows = s.out_rows.get();
      const int64_t n_rows = it.r1 - it.r0;
      const T* g_first = p.y + n * p.y_stride_n + c0 * gsc + (a0.out_start + it.j0 * a0.out_step) * p.y_stride[0] +
                         (a1.out_start + it.r0 * a1.out_step) * p.y_stride[1] + a2.out_start * gs2;
      const bool transpose = lanes == L && gs2 == 1 && gsc != 1 && a2.out_step == 1;
      if (transpose && a1.out_step * p.y_stride[1] == count2) {  // the rows are one run of pixels
        int64_t j = 0;
        for (; j + L <= n_rows * count2; j += L) uk.transpose_block(g_first + j, gsc, gy_rows + j * L, L);
        for (; j < n_rows * count2; ++j) copy_channels(g_first + j, gsc, lanes, gy_rows + j * L);
      } else {
        for (int64_t r = 0; r < n_rows; ++r) {
          const T* g = g_first + r * a1.out_step * p.y_stride[1];
          T* row = gy_rows + r * count2 * L;
          int64_t j = 0;
          if (transpose)
            for (; j + L <= count2; j += L) uk.transpose_block(g + j, gsc, row + j * L, L);
          for (; j < count2; ++j) copy_channels(g + j * a2.out_step * gs2, gsc, lanes, row + j * L);
        }
      }
      for (int64_t t = 0; t < taps; ++t) s.src[t] = s.buffer.get() + phase_plans[0].tap_offset[t];
      uk.channel_lanes_wgrad(n_rows * count2, taps, s.src.data(), a2.in_step * L, count2, a1.in_step * cols * L,
                             gy_rows, acc);
    }
    // out (C, 1, taps): each channel's sums over the items, in item order (images outer), added
    // item by item as [taps][L] vectors per channel block (a division per term, with the items
    // innermost, was a quarter of the 8 x 576 stride-2 7x7 layer's weight gradient; scalar adds
    // into out's [channel][tap] order, a twentieth of a 7x7 map's), then stored per channel.
    AlignedBuffer<T> sums(checked_mul(checked_mul(blocks, taps), L));
    std::fill(sums.get(), sums.get() + blocks * taps * L, T(0));
    for (int64_t n = 0; n < p.batch; ++n)
      for (int64_t cb = 0; cb < blocks; ++cb) {
        T* __restrict sum = sums.get() + cb * taps * L;
        for (int64_t k = 0; k < (int64_t)items.size(); ++k) {
          const T* __restrict part = partial.get() + (n * per_image + cb * (int64_t)items.size() + k) * taps * L;
          for (int64_t e = 0; e < taps * L; ++e) sum[e] += part[e];
        }
      }
    for (int64_t cb = 0; cb < blocks; ++cb)
      for (int64_t l = 0; l < std::min<int64_t>(L, p.groups - cb * L); ++l)
        for (int64_t t = 0; t < taps; ++t) out[(cb * L + l) * taps + t] = sums.get()[(cb * taps + t) * L + l];
  }

  void execute(const ConvProblem<T>& p, int nthreads_max) const {
    // The bias per group, zero without one (the direct path adds a zero bias too).
    std::vector<T> bias(static_cast<size_t>(blocks * L), T(0));
    if (p.bias)
      for (int64_t c = 0; c < p.groups; ++c) bias[c] = p.bias[c * p.bias_stride];
    const int64_t per_image = blocks * (int64_t)items.size(), total = p.batch * per_image;
    const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads_max, total)));
    std::vector<std::unique_ptr<Scratch>> scratch;
    for (int t = 0; t < nthreads; ++t)
      scratch.emplace_back(new Scratch(buffer_size, out_size * max_rows_per_item(), max_taps(), L));
    // Runs of consecutive items per grab, up to an image's channel block (its items write the same
    // planes: one item per grab put neighbouring rows, which share cache lines on small maps, on
    // different threads), at least four grabs per thread. The grad_input of a stride-2 depthwise
    // layer, 2 threads, float32, min of interleaved runs: 8 x 576 on 7x7 0.304 -> 0.202 ms, 8 x 192
    // on 14x14 0.292 -> 0.199 (one thread alone: 0.27); forward and unit stride level.
    const int64_t run = std::max<int64_t>(1, std::min<int64_t>((int64_t)items.size(), total / (4 * (int64_t)nthreads)));
#pragma omp parallel for schedule(dynamic, run) num_threads(nthreads)
    for (int64_t i = 0; i < total; ++i)
      run_item(p, i / per_image, (i % per_image) / (int64_t)items.size(), items[i % (int64_t)items.size()], bias.data(),
               *scratch[omp_get_thread_num()]);
  }
};


// ---- The entry -----------------------------------------------------------------------------------

constexpr double kRank = 3.0;  // its place in the table (registry.cpp)

// Depthwise layers (one channel in and out per group) with at least a vector's width of groups
// take the channel lanes; CONVFAST_ALGO=lanes forces them wherever they apply, the other forced
// algorithms never take them.
template <typename T>
bool applies(Choice<T>& c) {
  return Conv<T>::applies(c.p, c.plan.phases, c.plan.uk);
}

template <typename T>
double cost(Choice<T>& c) {
  const double rank = kRank;
  if (c.forced_is("lanes")) return c.take("forced", rank);
  if (c.forcing()) return c.refuse("another algorithm forced");
  return c.p.groups < c.plan.uk.lanes ? c.refuse("fewer groups than vector lanes") : c.take("depthwise", rank);
}

// False where the input window of a row is too large for its buffer (the next algorithm runs).
template <typename T>
bool create(Choice<T>& c) {
  bool ok = false;
  std::unique_ptr<Conv<T>> conv(new Conv<T>(c.p, c.plan.axes, c.plan.uk, ok));
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
  const Conv<T>& lanes = static_cast<const Conv<T>&>(*plan.own);
  return std::string("channel_lanes ") + plan.isa + " " + std::to_string(lanes.L) + " lanes rows=" +
         std::to_string(lanes.rows[0].rows_per_item) + " phases=" + std::to_string(lanes.phase_plans.size()) +
         (lanes.pair_store ? " paired" : "");
}

}  // namespace channel_lanes

template <typename T>
const Algorithm<T>& channel_lanes_algorithm() {
  static const Algorithm<T> entry = {"lanes", channel_lanes::kRank,
      channel_lanes::applies<T>, channel_lanes::cost<T>,
      channel_lanes::create<T>, channel_lanes::execute<T>, channel_lanes::describe<T>};
  return entry;
}
template const Algorithm<float>& channel_lanes_algorithm<float>();
template const Algorithm<double>& channel_lanes_algorithm<double>();

}  // namespace engine

template <typename T>
bool depthwise_lanes_weight_grad(const ConvProblem<T>& p, T* out) {
  const UkernelInfo<T>& uk = active_ukernel<T>();
  std::vector<AxisPlan> axes[kSpatialRank];
  Phase phase;
  if (p.groups < uk.lanes || !forward_phase(p, axes, phase)) return false;
  if (!channel_lanes::Conv<T>::applies(p, {phase}, uk)) return false;
  bool ok = false;
  const channel_lanes::Conv<T> conv(p, axes, uk, ok);
  if (!ok) return false;
  conv.weight_grad(p, out, get_num_threads());
  return true;
}

template bool depthwise_lanes_weight_grad<float>(const ConvProblem<float>&, float*);
template bool depthwise_lanes_weight_grad<double>(const ConvProblem<double>&, double*);

}  // namespace convfast
