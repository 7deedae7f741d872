// The choice over an algorithm table, shared by the forward engine's registry (../registry.cpp)
// and the weight gradient's (../weight_grad/registry.cpp).
#pragma once
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>

namespace convfast {
namespace engine {

bool verbose();  // CONVFAST_VERBOSE=1, read once (../registry.cpp)

// What every choice carries: the forced algorithm and why the last cost() returned what it did.
struct ChoiceNotes {
  const char* forced = nullptr;  // CONVFAST_ALGO (or AlgorithmOverride's name); null: none
  const char* note = "";         // a literal, for CONVFAST_VERBOSE

  double take(const char* why, double rank) {
    note = why;
    return rank;
  }
  double refuse(const char* why) {
    note = why;
    return std::numeric_limits<double>::infinity();
  }
  bool forcing() const { return forced != nullptr; }
  bool forced_is(const char* name) const { return forced != nullptr && std::strcmp(forced, name) == 0; }
};

// The applicable entry of least cost, the first on ties, among those not in `excluded` (a bit per
// table index); -1 if none. An entry's cost is never below its rank and the table is in ascending
// rank, so once an entry is taken no later one can win and, unless CONVFAST_VERBOSE asks for every
// candidate, the rest are not evaluated: as cheap as a chain of ifs (no allocation, no string).
template <typename Entry, typename Choice>
int choose_entry(const Entry* const* table, int n, Choice& c, unsigned excluded) {
  int best = -1;
  double best_cost = std::numeric_limits<double>::infinity();
  for (int i = 0; i < n; ++i) {
    const Entry& a = *table[i];
    if (excluded & (1u << i)) {
      if (verbose()) std::fprintf(stderr, "convfast:   %-9s cannot run it, excluded\n", a.name);
      continue;
    }
    if (best >= 0 && best_cost <= a.rank && !verbose()) break;
    c.note = "";
    bool applies = false;
    double cost = std::numeric_limits<double>::infinity();
    try {
      applies = a.applies(c);
      if (applies) cost = a.cost(c);
    } catch (const std::exception& e) {
      if (best < 0) throw;  // a candidate evaluated only for the report must not change the outcome
      c.note = e.what();
    }
    if (verbose() && !applies)
      std::fprintf(stderr, "convfast:   %-9s applies=no%s%s\n", a.name, *c.note ? "  " : "", c.note);
    if (verbose() && applies)
      std::fprintf(stderr, "convfast:   %-9s applies=yes cost=%g%s%s\n", a.name, cost, *c.note ? "  " : "", c.note);
    if (applies && cost < best_cost) {
      best = i;
      best_cost = cost;
    }
  }
  return best;
}

}  // namespace engine
}  // namespace convfast
