// The forward engine's algorithm interface (internal). Each algorithm is one unit under algorithms/
// defining one Algorithm<T> entry; registry.cpp lists them in one table (kAlgorithms, in order of
// preference) and chooses among them with one function (choose), which CONVFAST_ALGO /
// AlgorithmOverride force and CONVFAST_VERBOSE=1 reports.
#pragma once
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/choice.hpp"
#include "plan.hpp"

namespace convfast {
namespace engine {

// A problem being planned, as the entries see it: the problem, the plan under construction (its
// axis plans, stride phases, max_taps and max_k are set; the winner's create fills the rest), the
// forced algorithm, and what the entries' applies/cost leave for their own create.
template <typename T>
struct Choice : ChoiceNotes {
  using Impl = typename ConvPlan<T>::Impl;
  Choice(const ConvProblem<T>& problem, Impl& planned) : p(problem), plan(planned) {}
  const ConvProblem<T>& p;
  Impl& plan;
  bool allow_winograd = true;  // false: the exact-chain fallback of a Winograd plan
  // The direct entry's row plans (its applies builds them; its create keeps them).
  std::vector<RowBufferPlan> row_plans;
  int64_t row_buffer_size = 0, max_cache_entries = 0;
  double row_fill = 1.0;
  int winograd_m = 2;  // the Winograd entry's tile along 3-tap axes (its cost decides it)
};

// One algorithm. cost() is in units of preference: today the measured rules of each unit (see its
// comments) decide, so cost() returns `rank` where its rule (or CONVFAST_ALGO) takes the algorithm
// and infinity where it does not; `rank` is also the least it can return, which lets the choice
// stop at the first algorithm taken. A modelled time can replace it entry by entry.
template <typename T>
struct Algorithm {
  using Impl = typename ConvPlan<T>::Impl;
  const char* name;  // CONVFAST_ALGO's name for it
  double rank;       // the table's order: the least cost() returns
  bool (*applies)(Choice<T>& c);  // whether it can run the problem at all
  double (*cost)(Choice<T>& c);   // given applies: rank, or infinity where the rules do not take it
  bool (*create)(Choice<T>& c);   // fills its part of c.plan; false: it cannot after all (the next is chosen)
  void (*execute)(const Impl& plan, const ConvProblem<T>& p);
  std::string (*describe)(const Impl& plan);
};

// The entries, one per unit under algorithms/.
template <typename T>
const Algorithm<T>& scatter_gemm_algorithm();  // algorithms/scatter_gemm.cpp
template <typename T>
const Algorithm<T>& winograd_algorithm();  // algorithms/winograd.cpp
template <typename T>
const Algorithm<T>& depthwise_planes_algorithm();  // algorithms/depthwise_planes.cpp
template <typename T>
const Algorithm<T>& channel_lanes_algorithm();  // algorithms/channel_lanes.cpp
template <typename T>
const Algorithm<T>& gemv_algorithm();  // algorithms/gemv.cpp
template <typename T>
const Algorithm<T>& direct_algorithm();  // algorithms/direct.cpp
template <typename T>
const Algorithm<T>& gemm_algorithm();  // algorithms/gemm.cpp

// The GEMM and direct entries' execute: the plan's work items (plan.cpp).
template <typename T>
void execute_items(const typename ConvPlan<T>::Impl& plan, const ConvProblem<T>& p);

// The thread's last call's description (for last_algorithm()): "<describe> threads=<n>".
template <typename T>
inline void record_algorithm(const typename ConvPlan<T>::Impl& plan, int threads) {
  t_last_algorithm = plan.describe() + " threads=" + std::to_string(threads);
}

}  // namespace engine
}  // namespace convfast
