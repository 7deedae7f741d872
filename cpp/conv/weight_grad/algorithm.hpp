// The weight gradient's algorithm interface (internal), as the forward's (../algorithm.hpp): each
// variant is an entry of its unit; registry.cpp lists them in one table and chooses with one
// function. A weight gradient is planned per call, so an entry's run() creates and executes at
// once; it returns false, writing nothing, where the variant cannot run after all (the next one
// is chosen).
#pragma once
#include <cstring>
#include <limits>
#include <string>

#include "common.hpp"

namespace convfast {
namespace engine {
bool verbose();  // CONVFAST_VERBOSE=1, read once (../registry.cpp)
}  // namespace engine
namespace wgrad {
using engine::verbose;

template <typename T>
struct WgradChoice {
  const WeightGradProblem<T>& p;
  const char* forced = nullptr;  // CONVFAST_ALGO; null: none
  const char* note = "";         // why cost() returned what it did (CONVFAST_VERBOSE)
  int winograd_m = 0;            // the Winograd entry's tile (its cost decides it; 0: none)

  double take(const char* why, double rank) {
    note = why;
    return rank;
  }
  double refuse(const char* why) {
    note = why;
    return std::numeric_limits<double>::infinity();
  }
  bool forced_is(const char* name) const { return forced != nullptr && std::strcmp(forced, name) == 0; }
};

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
const WeightGradAlgorithm<T>& lanes_weight_grad_algorithm();      // lanes.cpp
template <typename T>
const WeightGradAlgorithm<T>& depthwise_weight_grad_algorithm();  // depthwise.cpp
template <typename T>
const WeightGradAlgorithm<T>& winograd_weight_grad_algorithm();   // winograd.cpp
template <typename T>
const WeightGradAlgorithm<T>& rows_weight_grad_algorithm();       // rows.cpp
template <typename T>
const WeightGradAlgorithm<T>& gemm_weight_grad_algorithm();       // gemm.cpp

}  // namespace wgrad
}  // namespace convfast
