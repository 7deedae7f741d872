// N-D padding (the np.pad drop-in). Rows along the last axis are the unit of work: each output row
// is copied from one mapped input row, with the last axis resolved through a precomputed index map.
// Constant corners follow np.pad: where several axes are padded, the constant of the last such
// axis wins.
#include <omp.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "convfast/dispatch.hpp"
#include "convfast/engine.hpp"
#include "convfast/threads.hpp"

namespace convfast {
namespace {

// Source coordinate of output coordinate i along one axis, or -1 for the constant. Computed on the
// fly rather than tabulated: a table costs 8 bytes per output position, several times the output
// itself for a long axis of small items.
inline int64_t source_index(const PadRequest& r, int a, int64_t i, PadMode mode) {
  const int64_t v = i - r.pad_before[a];
  if (v >= 0 && v < r.shape[a]) return v;
  return r.shape[a] == 0 ? -1 : map_padded_index(v, r.shape[a], mode);
}

template <typename E>
void copy_row(const PadRequest& r, const char* src_row, char* dst_row, int64_t n_out, PadMode mode,
              const char* row_fill) {
  const int last = r.ndim - 1;
  const int64_t stride = r.src_stride_bytes[last];
  E* dst = reinterpret_cast<E*>(dst_row);
  E fill_row, fill_before, fill_after;
  if (r.constant) {
    std::memcpy(&fill_before, r.fill + (2 * last) * r.itemsize, sizeof(E));
    std::memcpy(&fill_after, r.fill + (2 * last + 1) * r.itemsize, sizeof(E));
    if (row_fill) std::memcpy(&fill_row, row_fill, sizeof(E));
  }
  // The interior of a copied row is one block when the source row is contiguous.
  const int64_t lo = r.pad_before[last], hi = lo + r.shape[last];
  const bool block = !row_fill && stride == static_cast<int64_t>(sizeof(E)) && hi > lo;
  for (int64_t i = 0; i < n_out; ++i) {
    if (block && i == lo) {
      std::memcpy(dst + lo, src_row, static_cast<size_t>(hi - lo) * sizeof(E));
      i = hi - 1;
      continue;
    }
    const int64_t src_i = source_index(r, last, i, mode);
    if (src_i >= 0) {
      if (row_fill) {
        dst[i] = fill_row;
      } else {
        E v;
        std::memcpy(&v, src_row + src_i * stride, sizeof(E));
        dst[i] = v;
      }
    } else {
      dst[i] = i < r.pad_before[last] ? fill_before : fill_after;
    }
  }
}

struct Bytes16 {
  char b[16];
};

}  // namespace

void run_pad(const PadRequest& r) {
  const int nd = r.ndim;
  if (nd < 1) throw std::invalid_argument("convfast.pad: ndim must be >= 1");
  std::vector<int64_t> out_shape(nd);
  for (int a = 0; a < nd; ++a) {
    if (r.shape[a] < 0 || r.pad_before[a] < 0 || r.pad_after[a] < 0 ||
        __builtin_add_overflow(r.shape[a], r.pad_before[a], &out_shape[a]) ||
        __builtin_add_overflow(out_shape[a], r.pad_after[a], &out_shape[a]))
      throw std::invalid_argument("convfast.pad: sizes must be non-negative and their sum fit in 64 bits");
    if (!r.constant && r.shape[a] == 0 && out_shape[a] > 0)
      throw std::invalid_argument("convfast.pad: can't extend an empty axis in a non-constant mode");
  }
  const PadMode mode = r.constant ? PadMode::Zeros : r.mode;
  for (int a = 0; a < nd; ++a)
    if (out_shape[a] == 0) return;
  // The caller allocated the output, so its element and byte counts fit in 64 bits.
  int64_t rows = 1;
  for (int a = 0; a < nd - 1; ++a) rows *= out_shape[a];
  const int64_t row_bytes = out_shape[nd - 1] * r.itemsize;
  // The copy's own rule: threads only above 64 KiB (a smaller copy takes one core's token).
  const bool threaded = rows > 1 && rows * row_bytes > (1 << 16);
  const CallThreads threads(threaded ? CallThreads::kAnyWork : 0.0);
  const int nthreads = threaded ? get_num_threads() : 1;

#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t row = 0; row < rows; ++row) {
    // Decompose the row index, map each outer axis, and note the last padded axis (its constant
    // fills the row in constant mode).
    const char* src = r.src;
    const char* row_fill = nullptr;
    int64_t rem = row;
    for (int a = nd - 2; a >= 0; --a) {
      const int64_t i = rem % out_shape[a];
      rem /= out_shape[a];
      const int64_t s = source_index(r, a, i, mode);
      if (s < 0) {
        if (!row_fill) row_fill = r.fill + (2 * a + (i < r.pad_before[a] ? 0 : 1)) * r.itemsize;
      } else {
        src += s * r.src_stride_bytes[a];
      }
    }
    char* dst = r.dst + row * row_bytes;
    switch (r.itemsize) {
      case 1: copy_row<uint8_t>(r, src, dst, out_shape[nd - 1], mode, row_fill); break;
      case 2: copy_row<uint16_t>(r, src, dst, out_shape[nd - 1], mode, row_fill); break;
      case 4: copy_row<uint32_t>(r, src, dst, out_shape[nd - 1], mode, row_fill); break;
      case 8: copy_row<uint64_t>(r, src, dst, out_shape[nd - 1], mode, row_fill); break;
      case 16: copy_row<Bytes16>(r, src, dst, out_shape[nd - 1], mode, row_fill); break;
      default: break;  // the binding only passes the sizes above
    }
  }
}

}  // namespace convfast
