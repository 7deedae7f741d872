// The weight gradient's algorithm interface (internal), as the forward's (../algorithm.hpp): each
// variant is an entry of its unit; registry.cpp lists them in one table and chooses with one
// function. A weight gradient is planned per call, so an entry's run() creates and executes at
// once; it returns false, writing nothing, where the variant cannot run after all (the next one
// is chosen).
#pragma once
#include <cstdlib>
#include <cstring>
#include <string>

#include "../common/choice.hpp"
#include "common.hpp"

namespace convfast {
namespace wgrad {
using engine::verbose;

template <typename T>
struct WgradChoice : engine::ChoiceNotes {
  explicit WgradChoice(const WeightGradProblem<T>& problem) : p(problem) {}
  const WeightGradProblem<T>& p;
  int winograd_m = 0;  // the Winograd entry's tile (its cost decides it; 0: none)
};

// CONVFAST_WGRAD_GEMM=1: the rows and channel-rows entries step aside for the GEMM (tests compare them).
inline bool wgrad_gemm_forced() {
  const char* v = std::getenv("CONVFAST_WGRAD_GEMM");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// The forward depthwise layer whose weight gradient p is (one channel in and out per group): p.a
// as its input and p.b, the output gradient, as its y (read only), without weights; the depthwise
// entries (lanes.cpp, planes.cpp) run the forward's plans on it.
template <typename T>
ConvProblem<T> depthwise_forward_problem(const WeightGradProblem<T>& p) {
  ConvProblem<T> fp;
  fp.batch = p.batch;
  fp.groups = p.groups;
  fp.cin_per_group = fp.cout_per_group = 1;
  fp.mode = p.mode;
  for (int a = 0; a < kSpatialRank; ++a) {
    fp.in_size[a] = p.a_size[a];
    fp.out_size[a] = p.b_size[a];
    fp.kernel[a] = p.kernel[a];
    fp.stride[a] = p.stride[a];
    fp.dilation[a] = p.dilation[a];
    fp.pad_before[a] = p.pad_before[a];
    fp.x_stride[a] = p.a_stride[a];
    fp.y_stride[a] = p.b_stride[a];
  }
  fp.x = p.a;
  fp.x_stride_n = p.a_stride_n;
  fp.x_stride_c = p.a_stride_c;
  fp.y = const_cast<T*>(p.b);  // read only: the output gradient
  fp.y_stride_n = p.b_stride_n;
  fp.y_stride_c = p.b_stride_c;
  return fp;
}

inline bool is_depthwise(int64_t a_channels, int64_t b_channels, int64_t groups) {
  return a_channels == groups && b_channels == groups;
}

// cost() is the rank where the unit's rule takes the variant and infinity elsewhere, as the forward's.
template <typename T>
struct WeightGradAlgorithm {
  const char* name;
  double rank;
  bool (*applies)(WgradChoice<T>& c);
  double (*cost)(WgradChoice<T>& c);
  bool (*run)(WgradChoice<T>& c);  // create and execute; false: cannot after all, nothing written
  const char* (*describe)();       // what it is (the call's details go to last_algorithm())
};

template <typename T>
const WeightGradAlgorithm<T>& planes_weight_grad_algorithm();     // planes.cpp
template <typename T>
const WeightGradAlgorithm<T>& lanes_weight_grad_algorithm();      // lanes.cpp
template <typename T>
const WeightGradAlgorithm<T>& depthwise_weight_grad_algorithm();  // depthwise.cpp
template <typename T>
const WeightGradAlgorithm<T>& channel_rows_weight_grad_algorithm();  // channel_rows.cpp
template <typename T>
const WeightGradAlgorithm<T>& winograd_weight_grad_algorithm();   // winograd.cpp
template <typename T>
const WeightGradAlgorithm<T>& rows_weight_grad_algorithm();       // rows.cpp
template <typename T>
const WeightGradAlgorithm<T>& gemm_weight_grad_algorithm();       // gemm.cpp

}  // namespace wgrad
}  // namespace convfast
