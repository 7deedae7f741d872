// The problem description the kernels trust. Python normalises every user-facing parameter into
// this form (python/convfast/_spec.py); the binding re-checks it cheaply before any kernel runs.
//
// Everything is rank 3: 1-D and 2-D problems are 3-D problems with unit leading spatial axes, so
// there is one code path. Tensors are strided views (element strides, 64-bit, possibly negative),
// which is how channels_last, non-contiguous and negative-stride inputs reach the kernels without
// a copy.
#pragma once
#include <cstdint>

namespace convfast {

constexpr int kSpatialRank = 3;

enum class PadMode : int { Zeros = 0, Reflect = 1, Replicate = 2, Circular = 3, Symmetric = 4 };

// Maps a (possibly out-of-range) coordinate onto the input axis of length n, or -1 for a zero.
// The periodic forms equal np.pad's iterated reflection for any pad width.
inline int64_t map_padded_index(int64_t i, int64_t n, PadMode mode) {
  if (i >= 0 && i < n) return i;
  switch (mode) {
    case PadMode::Zeros: return -1;
    case PadMode::Replicate: return i < 0 ? 0 : n - 1;
    case PadMode::Circular: {
      int64_t r = i % n;
      return r < 0 ? r + n : r;
    }
    case PadMode::Reflect: {
      if (n == 1) return 0;
      const int64_t period = 2 * (n - 1);
      int64_t r = i % period;
      if (r < 0) r += period;
      return r < n ? r : period - r;
    }
    case PadMode::Symmetric: {
      const int64_t period = 2 * n;
      int64_t r = i % period;
      if (r < 0) r += period;
      return r < n ? r : period - 1 - r;
    }
  }
  return -1;
}

enum class ConvKind : int { Forward = 0, Transposed = 1 };

template <typename T>
struct ConvProblem {
  ConvKind kind = ConvKind::Forward;
  int64_t batch = 0, groups = 1;
  int64_t cin_per_group = 0, cout_per_group = 0;
  int64_t in_size[kSpatialRank] = {1, 1, 1};
  int64_t out_size[kSpatialRank] = {1, 1, 1};
  int64_t kernel[kSpatialRank] = {1, 1, 1};
  int64_t stride[kSpatialRank] = {1, 1, 1};
  int64_t dilation[kSpatialRank] = {1, 1, 1};
  // Forward: zeros added before each axis. Transposed: pixels cropped from the start of each axis.
  int64_t pad_before[kSpatialRank] = {0, 0, 0};
  PadMode mode = PadMode::Zeros;  // forward only; transposed always reads zeros outside the input

  // x: (N, C_in, D, H, W)
  const T* x = nullptr;
  int64_t x_stride_n = 0, x_stride_c = 0, x_stride[kSpatialRank] = {0, 0, 0};
  // w: (G, C_out/G, C_in/G, kD, kH, kW) for both kinds (Python presents the transposed weight
  // (C_in, C_out/G, k...) as this view, so the kernels see one weight format).
  const T* w = nullptr;
  int64_t w_stride_g = 0, w_stride_co = 0, w_stride_ci = 0, w_stride[kSpatialRank] = {0, 0, 0};
  const T* bias = nullptr;  // (C_out) or null
  int64_t bias_stride = 0;
  // y: (N, C_out, oD, oH, oW)
  T* y = nullptr;
  int64_t y_stride_n = 0, y_stride_c = 0, y_stride[kSpatialRank] = {0, 0, 0};
};

}  // namespace convfast
