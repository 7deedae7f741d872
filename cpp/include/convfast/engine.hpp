#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "convfast/spec.hpp"

namespace convfast {

// A convolution planned once for fixed shapes and weights (axis plans, stride phases, blocking,
// packed weights) and executed on any inputs of those shapes. Immutable after construction, so one
// plan may be executed from several threads at once.
template <typename T>
class ConvPlan {
 public:
  explicit ConvPlan(const ConvProblem<T>& p);  // uses p's sizes and weights; p.x / p.y unused
  void execute(const ConvProblem<T>& p) const;  // p must have the plan's sizes
  std::string describe() const;

  struct Impl;  // the plan's internals (cpp/conv/plan.hpp), opaque here

 private:
  std::shared_ptr<const Impl> impl_;
};

// Forces, while it lives, the algorithm of the plans made on this thread ("gemm", "direct",
// "winograd", "lanes", "scatter", as CONVFAST_ALGO, which it overrides; "" the automatic choice).
// Where the forced algorithm cannot run, the plan takes the others as CONVFAST_ALGO would.
class AlgorithmOverride {
 public:
  explicit AlgorithmOverride(const char* algorithm);
  ~AlgorithmOverride();
  AlgorithmOverride(const AlgorithmOverride&) = delete;
  AlgorithmOverride& operator=(const AlgorithmOverride&) = delete;

 private:
  const char* previous_;
};
const char* forced_algorithm();  // the override, else CONVFAST_ALGO (null: none)

// Marks, while it lives, the plans made on this thread as kept for many calls with the same
// weights (the layer objects' and modules' planned calls): their weight packing and Winograd
// weight transform are done once, so the choice need not amortise them per call.
class KeptPlanScope {
 public:
  KeptPlanScope();
  ~KeptPlanScope();
  KeptPlanScope(const KeptPlanScope&) = delete;
  KeptPlanScope& operator=(const KeptPlanScope&) = delete;

 private:
  bool previous_;
};
bool plan_is_kept();  // inside a KeptPlanScope on this thread

// Runs a forward or transposed convolution (plan + execute). Throws std::invalid_argument on an inconsistent
// problem and std::bad_alloc when working memory cannot be had (before any output is written).
template <typename T>
void run_convolution(const ConvProblem<T>& p);

// The weight gradient of a depthwise layer (one channel in and out per group) with the channels in
// the vector lanes (cpp/conv/algorithms/channel_lanes.cpp): p describes the forward layer, p.x its input and
// p.y its output gradient (read only; p.w unused); out is (C, 1, k...) C-contiguous. Returns false,
// writing nothing, where that path does not apply (fewer groups than vector lanes, an empty axis,
// an input window too large for its buffer).
template <typename T>
bool depthwise_lanes_weight_grad(const ConvProblem<T>& p, T* out);

// The same with the pixels of a channel plane in the lanes (cpp/conv/algorithms/depthwise_planes.cpp):
// unit stride, zeros padding, channels-first rows, planes whose buffer fits 64 KiB; false, writing
// nothing, elsewhere.
template <typename T>
bool depthwise_planes_weight_grad(const ConvProblem<T>& p, T* out);

// The algorithm the last call on this thread chose (for CONVFAST_VERBOSE / show_config); the weight
// gradient (weight_grad.hpp) records its own.
std::string last_algorithm();
void set_last_algorithm(std::string description);

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
