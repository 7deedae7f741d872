#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "convfast/spec.hpp"

namespace convfast {

// Runs a forward or transposed convolution. Throws std::invalid_argument on an inconsistent
// problem and std::bad_alloc when working memory cannot be had (before any output is written).
template <typename T>
void run_convolution(const ConvProblem<T>& p);

// The algorithm the last call on this thread chose (for CONVFAST_VERBOSE / show_config).
std::string last_algorithm();

// N-D padding of a strided array of any element size into a C-contiguous output.
// pad_before/pad_after per axis; `fill` holds 2*ndim constants (before/after per axis, each
// itemsize bytes) for constant mode.
struct PadRequest {
  int ndim = 0;
  int64_t itemsize = 0;
  const char* src = nullptr;
  std::vector<int64_t> shape, src_stride_bytes, pad_before, pad_after;
  char* dst = nullptr;  // C-contiguous, shape[i] + pad_before[i] + pad_after[i]
  bool constant = true;
  PadMode mode = PadMode::Zeros;  // used when !constant
  const char* fill = nullptr;
};
void run_pad(const PadRequest& r);

}  // namespace convfast
