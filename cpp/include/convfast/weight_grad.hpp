// The weight gradient of a convolution as one kernel (python/convfast/backward.py::_weight_grad):
//
//   out[cb, ca, t] = sum_{n, o} A[n, G(cb) * Ca_g + ca, t * dilation + o * stride - pad_before] * b[n, cb, o]
//
// with A read through the padding mode (map_padded_index on the unpadded input), G(cb) the group
// of cb, Ca_g = Ca / groups. Used for the convolution (a = x, b = grad_output) and the transposed
// convolution (a = grad_output, b = x). Rank 3 like the forward problem: 1-D/2-D problems have
// unit leading spatial axes.
#pragma once
#include <cstdint>

#include "convfast/spec.hpp"

namespace convfast {

template <typename T>
struct WeightGradProblem {
  int64_t batch = 0, groups = 1;
  int64_t a_channels = 0, b_channels = 0;         // Ca, Cb (both multiples of groups)
  int64_t a_size[kSpatialRank] = {1, 1, 1};        // La: the unpadded input
  int64_t b_size[kSpatialRank] = {1, 1, 1};        // O
  int64_t kernel[kSpatialRank] = {1, 1, 1};
  int64_t stride[kSpatialRank] = {1, 1, 1};
  int64_t dilation[kSpatialRank] = {1, 1, 1};
  int64_t pad_before[kSpatialRank] = {0, 0, 0};
  PadMode mode = PadMode::Zeros;

  // a: (N, Ca, L0, L1, L2), b: (N, Cb, O0, O1, O2): element strides, any sign or layout.
  const T* a = nullptr;
  int64_t a_stride_n = 0, a_stride_c = 0, a_stride[kSpatialRank] = {0, 0, 0};
  const T* b = nullptr;
  int64_t b_stride_n = 0, b_stride_c = 0, b_stride[kSpatialRank] = {0, 0, 0};
  // out: C-contiguous (Cb, Ca / groups, K0, K1, K2), fully overwritten.
  T* out = nullptr;
};

// Throws std::invalid_argument on an inconsistent problem and std::bad_alloc / std::length_error
// when working memory cannot be had, before any output is written. Results are bitwise identical
// for any thread count.
template <typename T>
void weight_grad(const WeightGradProblem<T>& p);

}  // namespace convfast
