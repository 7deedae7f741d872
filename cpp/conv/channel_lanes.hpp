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
// The direct path (pixels in the lanes, one channel per tile) spends a stride-2 depthwise layer
// filling its stride-phase slabs and splitting tiles at row ends (the kernel itself was 13 % of
// its time); here the buffer is filled once with whole-vector transposes.
//
// Each output is one chain over the taps in the direct kernel's order (k = t, row-major taps),
// starting from zero, the bias added to the finished sum: bitwise the direct path's and the
// GEMM's results.
//
// Included inside gather_gemm.cpp's anonymous namespace (it uses AxisPlan, Phase and PhaseShape).
#pragma once

namespace channel_lanes {

template <typename T>
struct Conv {
  // Input buffer per item, all slices together; an item takes as many output rows as fit.
  static constexpr int64_t kBudgetBytes = 192 * 1024;
  static constexpr int64_t kMaxBufferBytes = int64_t(8) << 20;  // one row's window past this: not taken

  const UkernelInfo<T>& uk;
  Phase ph;
  PhaseShape shape;
  int L;
  int64_t blocks = 0;          // channel blocks of L groups (the last may be partial)
  int64_t min1 = 0, min2 = 0;  // the smallest tap offsets along axes 1 and 2
  int64_t cols = 0;            // buffered pixels per row (axis 2)
  int64_t rows_per_item = 1;   // output rows (axis 1) per item
  int64_t span1 = 0;           // buffered rows one output row reads
  int64_t pitch = 0;           // buffered rows per axis-0 slice (an item's most)
  int64_t buffer_size = 0;     // elements per thread
  std::vector<int64_t> tap_offset;  // per tap: buffer offset for output (first row of the item, 0)
  std::unique_ptr<AlignedBuffer<T>> wpack;  // [block][tap][L], zero for lanes past the last group

  // Whether the layer can run here (else the caller keeps its other paths).
  static bool applies(const ConvProblem<T>& p, const std::vector<Phase>& phases, const UkernelInfo<T>& uk) {
    return uk.channel_lanes && uk.transpose_block && p.cin_per_group == 1 && p.cout_per_group == 1 &&
           phases.size() == 1;
  }

  static int64_t window(const AxisPlan& a, int64_t outputs, int64_t& lowest) {
    const auto [lo, hi] = std::minmax_element(a.tap_offset.begin(), a.tap_offset.end());
    lowest = *lo;
    return (outputs - 1) * a.in_step + (*hi - *lo) + 1;
  }

  Conv(const ConvProblem<T>& p, const Phase& phase, const UkernelInfo<T>& ukernel, bool& ok)
      : uk(ukernel), ph(phase), shape(phase), L(ukernel.lanes) {
    ok = false;
    blocks = ceil_div(p.groups, L);
    const int64_t T0 = shape.taps[0];
    int64_t lo0;
    window(*ph[0], 1, lo0);
    cols = window(*ph[2], shape.count[2], min2);
    span1 = window(*ph[1], 1, min1);
    const int64_t slice_elements = checked_mul(cols, L);
    if (checked_mul(checked_mul(T0 * span1, slice_elements), sizeof(T)) > kMaxBufferBytes) return;
    // Rows per item: the most whose window fits the budget, and at least one.
    const int64_t per_row = checked_mul(T0 * ph[1]->in_step, slice_elements);
    const int64_t fixed = checked_mul(T0 * span1, slice_elements) - per_row;
    rows_per_item = std::max<int64_t>(1, std::min<int64_t>(shape.count[1], (kBudgetBytes / (int64_t)sizeof(T) - fixed) /
                                                                             std::max<int64_t>(per_row, 1)));
    pitch = window(*ph[1], rows_per_item, min1);
    buffer_size = checked_mul(T0 * pitch, slice_elements);
    for (int64_t t0 = 0; t0 < T0; ++t0)
      for (int64_t t1 = 0; t1 < shape.taps[1]; ++t1)
        for (int64_t t2 = 0; t2 < shape.taps[2]; ++t2)
          tap_offset.push_back(((t0 * pitch + (ph[1]->tap_offset[t1] - min1)) * cols + (ph[2]->tap_offset[t2] - min2)) *
                               L);
    // Weights: group c's kernel, at the phase's taps, in lane c % L of block c / L.
    const int64_t taps = shape.num_taps;
    wpack.reset(new AlignedBuffer<T>(checked_mul(checked_mul(blocks, taps), L)));
    T* wp = wpack->get();
    std::fill(wp, wp + blocks * taps * L, T(0));
    for (int64_t c = 0; c < p.groups; ++c)
      for (int64_t t0 = 0, t = 0; t0 < T0; ++t0)
        for (int64_t t1 = 0; t1 < shape.taps[1]; ++t1)
          for (int64_t t2 = 0; t2 < shape.taps[2]; ++t2, ++t)
            wp[((c / L) * taps + t) * L + c % L] =
                p.w[c * p.w_stride_g + ph[0]->taps[t0] * p.w_stride[0] + ph[1]->taps[t1] * p.w_stride[1] +
                    ph[2]->taps[t2] * p.w_stride[2]];
    ok = true;
  }

  struct Scratch {
    AlignedBuffer<T> buffer, out_row;
    std::vector<const T*> src;
    Scratch(int64_t buffer_size, int64_t out_row_size, int64_t taps)
        : buffer(buffer_size), out_row(out_row_size), src(static_cast<size_t>(taps)) {}
  };

  // One buffered row: pixels v = min2 + u (u < cols) of the input row x_row (lane l: channel l's
  // row, lanes past `lanes` zero), mapped by the padding mode.
  void fill_row(const ConvProblem<T>& p, const T* x_row, int64_t lanes, T* dst) const {
    const AxisPlan& a2 = *ph[2];
    const int64_t xsc = p.x_stride_c, xs2 = p.x_stride[2];
    // The interior: buffered pixels that read x[v] for v in [0, in_size).
    const int64_t u_begin = std::min(cols, std::max<int64_t>(0, -min2));
    const int64_t u_end = std::max(u_begin, std::min(cols, a2.in_size - min2));
    auto pixel = [&](int64_t u, int64_t i) {  // input pixel i (or zeros for i < 0) into entry u
      T* d = dst + u * L;
      if (i < 0) {
        std::fill(d, d + L, T(0));
        return;
      }
      const T* s = x_row + i * xs2;
      for (int64_t l = 0; l < lanes; ++l) d[l] = s[l * xsc];
      for (int64_t l = lanes; l < L; ++l) d[l] = T(0);
    };
    for (int64_t u = 0; u < u_begin; ++u) pixel(u, map_padded_index(min2 + u, a2.in_size, a2.mode));
    int64_t u = u_begin;
    if (lanes == L && xs2 == 1 && xsc != 1)  // channels-first rows: L x L transposes
      for (; u + L <= u_end; u += L) uk.transpose_block(x_row + (min2 + u), xsc, dst + u * L, L);
    for (; u < u_end; ++u) pixel(u, min2 + u);
    for (; u < cols; ++u) pixel(u, map_padded_index(min2 + u, a2.in_size, a2.mode));
  }

  // Output rows [r0, r1) of output plane j0 for channel block cb of image n.
  void run_item(const ConvProblem<T>& p, int64_t n, int64_t cb, int64_t j0, int64_t r0, int64_t r1, const T* bias,
                Scratch& s) const {
    const AxisPlan &a0 = *ph[0], &a1 = *ph[1], &a2 = *ph[2];
    const int64_t c0 = cb * L, lanes = std::min<int64_t>(L, p.groups - c0);
    const int64_t rows_in = (r1 - r0 - 1) * a1.in_step + span1;
    T* buf = s.buffer.get();
    const T* xc = p.x + n * p.x_stride_n + c0 * p.x_stride_c;
    for (int64_t t0 = 0; t0 < shape.taps[0]; ++t0) {
      const int64_t i0 = a0.index(j0, t0);
      for (int64_t u1 = 0; u1 < rows_in; ++u1) {
        T* dst = buf + (t0 * pitch + u1) * cols * L;
        const int64_t i1 = map_padded_index(r0 * a1.in_step + min1 + u1, a1.in_size, a1.mode);
        if (i0 < 0 || i1 < 0)
          std::fill(dst, dst + cols * L, T(0));
        else
          fill_row(p, xc + i0 * p.x_stride[0] + i1 * p.x_stride[1], lanes, dst);
      }
    }
    const int64_t taps = shape.num_taps, count2 = shape.count[2];
    const T* wp = wpack->get() + cb * taps * L;
    const T* bias_block = bias + c0;
    T* out = s.out_row.get();
    T* yc = p.y + n * p.y_stride_n + c0 * p.y_stride_c + (a0.out_start + j0 * a0.out_step) * p.y_stride[0];
    const int64_t ys2 = p.y_stride[2] * a2.out_step, ysc = p.y_stride_c;
    const bool transpose = lanes == L && ys2 == 1 && ysc != 1;  // channels-first rows: L x L transposes
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row_offset = (r - r0) * a1.in_step * cols * L;
      for (int64_t t = 0; t < taps; ++t) s.src[t] = buf + row_offset + tap_offset[t];
      uk.channel_lanes(count2, taps, s.src.data(), a2.in_step * L, wp, out);
      T* yr = yc + (a1.out_start + r * a1.out_step) * p.y_stride[1] + a2.out_start * p.y_stride[2];
      int64_t j = 0;
      if (transpose)
        for (; j + L <= count2; j += L) uk.store_transposed(out + j * L, L, bias_block, yr + j, ysc);
      for (; j < count2; ++j)
        for (int64_t l = 0; l < lanes; ++l) yr[j * ys2 + l * ysc] = out[j * L + l] + bias_block[l];
    }
  }

  void execute(const ConvProblem<T>& p, int nthreads_max) const {
    // The bias per group, zero without one (the direct path adds a zero bias too).
    std::vector<T> bias(static_cast<size_t>(blocks * L), T(0));
    if (p.bias)
      for (int64_t c = 0; c < p.groups; ++c) bias[c] = p.bias[c * p.bias_stride];
    const int64_t row_blocks = ceil_div(shape.count[1], rows_per_item);
    const int64_t items = p.batch * blocks * shape.count[0] * row_blocks;
    const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads_max, items)));
    std::vector<std::unique_ptr<Scratch>> scratch;
    for (int t = 0; t < nthreads; ++t)
      scratch.emplace_back(new Scratch(buffer_size, checked_mul(shape.count[2], L), shape.num_taps));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t rb = i % row_blocks, j0 = (i / row_blocks) % shape.count[0];
      const int64_t cb = (i / (row_blocks * shape.count[0])) % blocks, n = i / (row_blocks * shape.count[0] * blocks);
      const int64_t r0 = rb * rows_per_item, r1 = std::min(shape.count[1], r0 + rows_per_item);
      run_item(p, n, cb, j0, r0, r1, bias.data(), *scratch[omp_get_thread_num()]);
    }
  }
};

}  // namespace channel_lanes
