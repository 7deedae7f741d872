// Winograd minimal filtering F(m, 3), m = 2 or 4, and F(2, 2) for one stride phase whose inputs
// advance one per output along every axis, with 3 or 2 taps along two or three axes (dilated or
// not; forward, or transposed, whose taps run backwards) and one tap on the others. F(2, 2):
//   input (d0 - d1, d1, d2 - d1), weight (g0, g0 + g1, g1), output (m0 + m1, m1 + m2).
//
// Along each 3-tap ("Winograd") axis an output tile of m outputs, `spacing` apart (the dilation),
// reads m + 2 inputs and costs m + 2 multiplications instead of 3m; an N-D tile is the tensor
// product, (m + 2)^w transform points for m^w outputs (2-D 3x3: F(2, 3) 16 for 4, 2.25x fewer
// multiply-adds, F(4, 3) 36 for 16, 4x; 3-D 3x3x3: 64 for 8, 3.4x, and 216 for 64, 8x). Per
// transform point p the products are one GEMM,
//
//   M[p][tile][co] = sum_ci V[p][tile][ci] * U[p][ci][co],
//
// run by the engine's direct micro-kernel on rows the input transform writes (V) and panels
// packed once per plan (U, the weight transform, computed in double precision). The output
// transform then sums the products of each tile into its outputs and adds the bias. The
// transforms are listed in winograd_transforms.hpp. F(2, 3)'s coefficients are 0, +-1 and 1/2, so
// integer-valued data stays exact while it fits the mantissa, and its rounding error is a small
// multiple of the direct sum's (measured in the tests); F(4, 3)'s are larger (up to 8, and 1/6,
// 1/24 in G) and it is used in float64 only.
//
// The entry (winograd_algorithm: where it applies, when it is chosen) is at the end of this unit.
// The 1-D transforms are in ../winograd_transforms.hpp, which the weight gradient and the
// micro-kernel units share.
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <type_traits>

#include "../algorithm.hpp"

#include "../common/geometry.hpp"
#include "../common/packing.hpp"

namespace convfast {
namespace engine {
#include "../winograd_transforms.hpp"  // inside namespace convfast::engine: engine::winograd

namespace winograd {

constexpr int kMaxOutputs = 64;  // 4^3 (F(4, 3) in 3-D)

struct Axis {
  int taps = 1;             // 2 or 3: a Winograd axis (tiles of m outputs, m + taps - 1 inputs); 1: one output per tile
  int m = 2;                // outputs per tile on a Winograd axis: F(2, 3), F(4, 3) or F(2, 2)
  int64_t count = 1;        // outputs along the axis (of the phase: y coordinate out_start + j * out_step)
  int64_t out_start = 0, out_step = 1;
  int64_t in_size = 1;
  int64_t in_step = 1;      // one-tap axes: the stride
  int64_t first = 0;        // unmapped input coordinate of output 0's first tap (taps sorted by offset)
  int64_t spacing = 1;      // distance between the taps (the dilation)
  int64_t kernel_index[3] = {0, 0, 0};  // kernel index of each sorted tap
  PadMode mode = PadMode::Zeros;
  std::vector<int64_t> origin;    // per tile: its first output
  std::vector<int64_t> in_index;  // per tile and tile input: the mapped input coordinate, or -1

  bool winograd() const { return taps > 1; }
  int points() const { return taps > 1 ? m + taps - 1 : 1; }
  int outputs() const { return taps > 1 ? m : 1; }

  // Tiles along the axis with tile_m outputs per tile (the count make_tiles gives).
  int64_t tiles_for(int tile_m) const {
    return taps == 1 ? count : dilated_tile_count(count, tile_m, spacing);
  }

  // Tiles: outputs o + e * spacing (e < m), dilated_tile_origin's o (dilated tiles interleave and
  // cover every output once); a tile's outputs past the end are computed and dropped.
  void make_tiles() {
    origin.clear();
    in_index.clear();
    if (taps == 1) {
      for (int64_t j = 0; j < count; ++j) origin.push_back(j);
    } else {
      for (int64_t t = 0, n = dilated_tile_count(count, m, spacing); t < n; ++t)
        origin.push_back(dilated_tile_origin(t, m, spacing));
    }
    for (const int64_t o : origin)
      for (int e = 0; e < points(); ++e) {
        const int64_t v = (taps == 1 ? o * in_step : o) + first + e * spacing;
        in_index.push_back(v >= 0 && v < in_size ? v : map_padded_index(v, in_size, mode));
      }
  }
};

// Applies line(offset, stride, axis) to every line along every Winograd axis of a [m+2|1]^3 x lanes buffer.
template <typename Line>
inline void along_axes(const Axis* axes, int lanes, Line&& line) {
  int64_t n[3];
  for (int a = 0; a < 3; ++a) n[a] = axes[a].points();
  for (int a = 0; a < 3; ++a) {
    if (!axes[a].winograd()) continue;
    int64_t inner = lanes;
    for (int b = a + 1; b < 3; ++b) inner *= n[b];
    int64_t outer = 1;
    for (int b = 0; b < a; ++b) outer *= n[b];
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t i = 0; i < inner; i += lanes) line(o * n[a] * inner + i, inner, axes[a]);
  }
}

// The axis's tile as an index of the micro-kernel tables (UkernelInfo::winograd_*): 0 F(2, 2),
// 1 F(2, 3), 2 F(4, 3).
inline int tile_index(const Axis& ax) { return ax.taps == 2 ? 0 : ax.m == 2 ? 1 : 2; }

// Calls f(M, R) with the axis's tile as compile-time constants (std::integral_constant): M
// outputs per tile, R taps, so that the transforms, span reads and run stores are instantiated per
// tile (the tiles of tile_index).
template <typename F>
inline void with_tile(const Axis& ax, F&& f) {
  using two = std::integral_constant<int, 2>;
  using three = std::integral_constant<int, 3>;
  switch (tile_index(ax)) {
    case 0: f(two{}, two{}); return;
    case 1: f(two{}, three{}); return;
    default: f(std::integral_constant<int, 4>{}, three{});
  }
}

// Input planes ahead whose row spans run_block prefetches.
constexpr int64_t kPrefetchPlanes = 2;

// Chunks (of pw tiles) per work item with a large weight transform (see Conv's constructor).
constexpr int64_t kGroupChunks = 4;

// One planned Winograd convolution: axes, the packed weight transform, blocking. The products run
// on the engine's direct micro-kernel: tiles in the vector lanes (pw of them), mro output channels
// broadcast, so the input transform writes whole vectors of tiles (V[point][chunk][ci][pw]) and each
// kernel call leaves an L1-resident [point][mro][pw] block that the output transform turns into
// outputs at once, never writing the products back to memory.
template <typename T>
struct Conv {
  using Bits = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
  Axis axes[3];
  int64_t points = 1, outputs = 1, tiles = 1;
  int64_t tiles_along[3] = {1, 1, 1};
  int64_t out_point[kMaxOutputs] = {};  // the transform point holding each output of a tile
  int64_t cin = 0, cout = 0, groups = 1;
  UkernelInfo<T> uk;
  int variant = 0, mro = 0, pw = 0;
  int64_t n_tiles = 0;      // output-channel tiles of mro
  int64_t block_tiles = 0;  // tiles per work item, a multiple of pw
  bool group_chunks = false;  // products of a block's chunks at once (large weight transforms)
  int64_t group_tiles = 0;     // n-tiles whose products wait together (group_chunks)
  int64_t point_pitch = 0;     // distance between the points' slices of V ([point][chunk][ci][pw])
  // The fused tile transforms (every Winograd axis with the same tile), else null: the lines.
  WinogradTransform<T> input_transform = nullptr, output_transform = nullptr;
  WinogradWeightTransform<T> weight_transform = nullptr;
  WinogradSplitRow<T> split_row = nullptr;  // the last axis's, when it is a Winograd axis
  WinogradStoreRow<T> store_row = nullptr;
  std::unique_ptr<AlignedBuffer<T>> u;  // [g][n-tile][point][ci][mro]

  Conv(const ConvProblem<T>& p, const Axis (&planned)[3], const UkernelInfo<T>& ukernel, int variant_, int nthreads)
      : cin(p.cin_per_group), cout(p.cout_per_group), groups(p.groups), uk(ukernel), variant(variant_),
        mro(kDirectChannelTiles[variant_]), pw(ukernel.pw[variant_]) {
    for (int a = 0; a < 3; ++a) {
      axes[a] = planned[a];
      axes[a].make_tiles();
      tiles_along[a] = (int64_t)axes[a].origin.size();
      points *= axes[a].points();
      outputs *= axes[a].outputs();
      tiles = checked_mul(tiles, tiles_along[a]);
    }
    for (int64_t e0 = 0, e = 0; e0 < axes[0].outputs(); ++e0)
      for (int64_t e1 = 0; e1 < axes[1].outputs(); ++e1)
        for (int64_t e2 = 0; e2 < axes[2].outputs(); ++e2)
          out_point[e++] = (e0 * axes[1].points() + e1) * axes[2].points() + e2;
    n_tiles = ceil_div(cout, mro);
    // A work item transforms block_tiles tiles of every input channel once (V, about 128 KiB, re-read
    // from L2 by each output-channel tile) and runs them through every n-tile. The block shrinks
    // when batch * groups is too small to give every thread several items. (V of 1 MiB, more than
    // L2, had its stores from the input transform miss: the 64-channel 56x56 float32 layer took
    // 15.3 ms (p25) with 1 MiB, 14.8 with 512 KiB, 13.1-13.7 with 64-256 KiB.)
    // A weight transform larger than L2 (group_chunks) is streamed from L3 or memory once per
    // block, so the block spans kGroupChunks chunks for each panel to be reused from L1 (V up to
    // about 4 MiB: only one point's slice, cin x block, is hot at a time) and the products wait
    // in scratch for groups of group_tiles n-tiles (about 512 KiB). With one chunk per block, the
    // 512-channel 14x14 float64 layer streamed its 34 MB transform once per 8 tiles: 76-84 ms,
    // 48-50 with 4 chunks (2: 56-62 ms). More chunks shrink the groups, and each group re-reads V:
    // the 3-D 32 -> 64 float32 layer took 15.4 ms (p25) with 2 chunks, 16.0 with 4, 16.9 with 8
    // and 22.5 with 32 (one n-tile per group).
    group_chunks = checked_mul(checked_mul(points * (int64_t)sizeof(T), cin), n_tiles * mro) > (int64_t(512) << 10);
    const int64_t per_tile = checked_mul(points * (int64_t)sizeof(T), cin);
    int64_t block = std::max<int64_t>(pw, (group_chunks ? int64_t(4) << 20 : int64_t(128) << 10) / per_tile / pw * pw);
    if (group_chunks) block = std::min<int64_t>(block, kGroupChunks * pw);
    const int64_t images = std::max<int64_t>(1, checked_mul(p.batch, groups));  // batch 0: no items, any block
    const int64_t want_items = 4 * (int64_t)std::max(nthreads, 1);
    if (images < want_items)
      block = std::min(block, std::max<int64_t>(pw, ceil_div(ceil_div(tiles, ceil_div(want_items, images)), pw) * pw));
    block_tiles = std::min(block, ceil_div(tiles, pw) * pw);
    group_tiles = group_chunks ? std::min<int64_t>(n_tiles, std::max<int64_t>(1, (int64_t(512) << 10) /
                                                    checked_mul(points * block_tiles * mro, (int64_t)sizeof(T))))
                               : n_tiles;
    // A multiple of 4 KiB would put the input transform's stores of one channel's points (pw
    // each) into the same L1 sets, as many as there are points (16 or more, against 8 ways), so
    // it is moved off by one cache line.
    point_pitch = checked_mul(cin, block_tiles);
    if (point_pitch * (int64_t)sizeof(T) % 4096 == 0) point_pitch += 64 / (int64_t)sizeof(T);
    if (axes[2].winograd()) {
      split_row = uk.winograd_split_row[tile_index(axes[2])];
      store_row = uk.winograd_store_row[tile_index(axes[2])];
    }
    int tile = -1, winograd_axes = 0;
    bool same_tile = true;
    for (const Axis& ax : axes)
      if (ax.winograd()) {
        const int t = tile_index(ax);
        same_tile = same_tile && (tile < 0 || tile == t);
        tile = t;
        ++winograd_axes;
      }
    if (same_tile && winograd_axes > 0) {  // (pw is a multiple of the vector lanes in every set)
      input_transform = uk.winograd_input[tile][winograd_axes - 1];
      output_transform = uk.winograd_output[tile][winograd_axes - 1];
      weight_transform = uk.winograd_weight[tile][winograd_axes - 1];
    }
    pack_weights(p);
  }

  // U[g][nt][point][ci][c] = (G g G^T)[point] of weight (g, nt * mro + c, ci), zero past C_out/G.
  void pack_weights(const ConvProblem<T>& p) {
    const int64_t panel = checked_mul(cin, mro), size = checked_mul(checked_mul(groups * n_tiles, points), panel);
    u.reset(new AlignedBuffer<T>(size));
    int64_t n[3];
    for (int a = 0; a < 3; ++a) n[a] = axes[a].points();
    // A job is one output-channel tile and a block of input channels, in double, laid out like its
    // panels ([point][ci][c], lanes = block x mro): gathered per tap, transformed along each axis
    // with all its lanes at once, then converted into the panels as one contiguous run per point.
    // (Per output channel with lanes = C_in/G, the stores into the panels were strided by mro:
    // 10-18 % of the 512-channel 14x14 layer, forward and transposed.) In parallel over jobs, as
    // the functional API plans (and so transforms) per call.
    constexpr int64_t kChannelBlock = 64;
    const int64_t blocks = ceil_div(cin, kChannelBlock), jobs = checked_mul(groups * n_tiles, blocks);
    const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), jobs)));
    std::vector<std::vector<double>> scratch(static_cast<size_t>(nthreads));
    for (auto& sc : scratch) sc.resize(static_cast<size_t>(checked_mul(points, kChannelBlock * mro)));
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t tile = job / blocks, g = tile / n_tiles, co0 = (tile % n_tiles) * mro;
      const int64_t ci0 = (job % blocks) * kChannelBlock, cc = std::min(kChannelBlock, cin - ci0), lanes = cc * mro;
      const int64_t valid = std::min<int64_t>(mro, cout - co0);
      double* buf = scratch[omp_get_thread_num()].data();
      // The transforms write every point from the taps' entries; only channels past C_out/G (tile
      // padding) need zeros.
      if (valid < mro) std::fill(buf, buf + points * lanes, 0.0);
      const T* wtile = p.w + g * p.w_stride_g + co0 * p.w_stride_co + ci0 * p.w_stride_ci;
      for (int e0 = 0; e0 < axes[0].taps; ++e0)
        for (int e1 = 0; e1 < axes[1].taps; ++e1)
          for (int e2 = 0; e2 < axes[2].taps; ++e2) {
            const T* w = wtile + axes[0].kernel_index[e0] * p.w_stride[0] + axes[1].kernel_index[e1] * p.w_stride[1] +
                         axes[2].kernel_index[e2] * p.w_stride[2];
            double* b = buf + ((e0 * n[1] + e1) * n[2] + e2) * lanes;
            for (int64_t ci = 0; ci < cc; ++ci)
              for (int64_t c = 0; c < valid; ++c)
                b[ci * mro + c] = static_cast<double>(w[ci * p.w_stride_ci + c * p.w_stride_co]);
          }
      T* dst = u->get() + tile * points * panel + ci0 * mro;
      if (weight_transform) {
        weight_transform(buf, lanes, dst, panel, lanes);
        continue;
      }
      along_axes(axes, (int)lanes,
                 [&](int64_t base, int64_t st, const Axis& ax) {
                   with_tile(ax, [&](auto M, auto R) { weight_line<M, R>(buf + base, st, lanes); });
                 });
      for (int64_t q = 0; q < points; ++q)
        for (int64_t l = 0; l < lanes; ++l) dst[q * panel + l] = static_cast<T>(buf[q * lanes + l]);
    }
  }

  struct Scratch {
    AlignedBuffer<T> v, out, buf;
    AlignedBuffer<int64_t> off;
    std::unique_ptr<Bits[]> keep;
    std::vector<const T*> rows;
    std::vector<int64_t> runs;  // per chunk: runs of tiles read as spans, then of paired outputs
    std::unique_ptr<int[]> single;  // per chunk: the tiles gathered point by point
    std::vector<int64_t> left;      // per chunk: outputs stored one by one
    T probe = 0;                    // sum of 0 * every output stored: NaN iff one was Inf or NaN
    Scratch(int64_t v_size, int64_t out_size, int64_t off_size, int64_t n_rows, int pw)
        : v(v_size), out(out_size), buf(off_size), off(off_size), keep(new Bits[off_size]),
          rows(static_cast<size_t>(n_rows)), single(new int[pw]) {}
  };

  // Returns false if any output is an infinity or NaN (the caller recomputes then).
  bool execute(const ConvProblem<T>& p, int nthreads_max) const {
    const int64_t blocks = ceil_div(tiles, block_tiles), items = checked_mul(checked_mul(p.batch, groups), blocks);
    const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads_max, items)));
    std::vector<std::unique_ptr<Scratch>> scratch;
    for (int t = 0; t < nthreads; ++t)
      scratch.emplace_back(new Scratch(checked_mul(points, point_pitch),
                                       group_chunks ? checked_mul(points * block_tiles, group_tiles * mro) : points * mro * pw,
                                       std::max(points, outputs) * pw, points * cin, pw));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t n = i / (groups * blocks), g = (i / blocks) % groups, b = i % blocks;
      run_block(p, n, g, b * block_tiles, std::min(tiles, (b + 1) * block_tiles), *scratch[omp_get_thread_num()]);
    }
    bool finite = true;
    for (const auto& sc : scratch) finite = finite && sc->probe == T(0);
    return finite;
  }

  // Tile m's coordinate index along each axis.
  void tile_coords(int64_t m, int64_t* t) const {
    t[2] = m % tiles_along[2];
    t[1] = (m / tiles_along[2]) % tiles_along[1];
    t[0] = m / (tiles_along[2] * tiles_along[1]);
  }

  // Tiles [m0, m1) of image n, group g: the input transform into V[point][chunk][ci][pw] (each
  // micro-kernel call streams one contiguous chunk), then per
  // chunk of pw tiles and output-channel tile the points' products and the output transform into y.
  void run_block(const ConvProblem<T>& p, int64_t n, int64_t g, int64_t m0, int64_t m1, Scratch& s) const {
    const T* xg = p.x + n * p.x_stride_n + g * cin * p.x_stride_c;
    int64_t np[3];
    for (int a = 0; a < 3; ++a) np[a] = axes[a].points();
    T* V = s.v.get();
    T* buf = s.buf.get();
    int64_t* off = s.off.get();
    Bits* keep = s.keep.get();
    // Row runs: along a unit-stride last axis at spacing 1, consecutive interior tiles of one row
    // read inputs m apart, m + taps - 1 each, so a run of them is read as one contiguous span per
    // row of the tile (split into its points by stride-m loads); other tiles (row ends, padding,
    // other layouts) gather point by point through offsets.
    const bool spans = split_row && axes[2].spacing == 1 && p.x_stride[2] == 1;
    const int m2 = axes[2].m;  // outputs per tile along the last axis
    const int64_t rows_per_tile = points / np[2];
    std::vector<int64_t>& runs = s.runs;
    for (int64_t c0 = m0; c0 < m1; c0 += pw) {
      runs.clear();  // per run: first tile, end tile, first input column, then one row offset per tile row
      int n_single = 0;
      int* single = s.single.get();
      for (int w = 0; w < pw;) {
        const int64_t tile = c0 + w;
        int64_t t[3];
        if (tile < m1) tile_coords(tile, t);
        auto contiguous = [&](int64_t t2) {
          const int64_t* i2 = &axes[2].in_index[t2 * np[2]];
          bool run = i2[0] >= 0;
          for (int64_t e = 1; e < np[2] && run; ++e) run = i2[e] == i2[0] + e;
          return run;
        };
        int v = w;
        if (spans && tile < m1)
          while (v < pw && c0 + v < m1 && t[2] + (v - w) < tiles_along[2] && contiguous(t[2] + (v - w)) &&
                 (v == w || axes[2].in_index[(t[2] + v - w) * np[2]] == axes[2].in_index[(t[2] + v - w - 1) * np[2]] + m2))
            ++v;
        if (v - w >= 2) {
          runs.insert(runs.end(), {w, v, axes[2].in_index[t[2] * np[2]]});
          for (int64_t e0 = 0; e0 < np[0]; ++e0)
            for (int64_t e1 = 0; e1 < np[1]; ++e1) {
              const int64_t i0 = axes[0].in_index[t[0] * np[0] + e0], i1 = axes[1].in_index[t[1] * np[1] + e1];
              runs.push_back(i0 < 0 || i1 < 0 ? kOutside : i0 * p.x_stride[0] + i1 * p.x_stride[1]);
            }
          w = v;
          continue;
        }
        // One tile point by point (kOutside: a padding zero, or no tile past the end).
        single[n_single++] = w;
        for (int64_t e0 = 0, q = 0; e0 < np[0]; ++e0)
          for (int64_t e1 = 0; e1 < np[1]; ++e1)
            for (int64_t e2 = 0; e2 < np[2]; ++e2, ++q) {
              int64_t o = kOutside;
              if (tile < m1) {
                const int64_t i0 = axes[0].in_index[t[0] * np[0] + e0], i1 = axes[1].in_index[t[1] * np[1] + e1],
                              i2 = axes[2].in_index[t[2] * np[2] + e2];
                if (i0 >= 0 && i1 >= 0 && i2 >= 0) o = i0 * p.x_stride[0] + i1 * p.x_stride[1] + i2 * p.x_stride[2];
              }
              // Branch-free: a zero reads the plane's first element, which a zero mask then clears
              // (bitwise, so that an Inf or NaN there cannot leak).
              keep[q * pw + w] = o == kOutside ? Bits(0) : ~Bits(0);
              off[q * pw + w] = o == kOutside ? 0 : o;
            }
        ++w;
      }
      const size_t run_size = 3 + rows_per_tile;
      for (int64_t ci = 0; ci < cin; ++ci) {
        const T* plane = xg + ci * p.x_stride_c;
        for (size_t r = 0; r < runs.size(); r += run_size) {
          const int64_t wb = runs[r], n = runs[r + 1] - wb, span = m2 * n + np[2] - m2;
          for (int64_t row = 0; row < rows_per_tile; ++row) {
            T* b = buf + row * np[2] * pw + wb;
            if (runs[r + 3 + row] == kOutside) {
              for (int64_t e = 0; e < np[2]; ++e) std::fill(b + e * pw, b + e * pw + n, T(0));
              continue;
            }
            const T* src = plane + runs[r + 3 + row] + runs[r + 2];
            // The same span kPrefetchPlanes channels ahead: a few short rows per plane are too
            // short a stream for the hardware prefetchers.
            if (ci + kPrefetchPlanes < cin)
              for (int64_t k = 0; k < span; k += 64 / (int64_t)sizeof(T))
                __builtin_prefetch(src + kPrefetchPlanes * p.x_stride_c + k);
            split_row(src, n, b, pw);
          }
        }
        for (int i = 0; i < n_single; ++i) {
          const int w = single[i];
          for (int64_t q = 0; q < points; ++q) {
            Bits v;
            std::memcpy(&v, plane + off[q * pw + w], sizeof(T));
            v &= keep[q * pw + w];
            std::memcpy(buf + q * pw + w, &v, sizeof(T));
          }
        }
        T* dst = V + (c0 - m0) * cin + ci * pw;  // chunk (c0 - m0) / pw
        if (input_transform) {
          input_transform(buf, pw, dst, point_pitch, pw);
          continue;
        }
        along_axes(axes, pw, [&](int64_t base, int64_t st, const Axis& ax) {
          with_tile(ax, [&](auto M, auto R) { input_line<M, R>(buf + base, st, pw); });
        });
        for (int64_t q = 0; q < points; ++q)  // in lane blocks: constant-size copies inline
          for (int l0 = 0; l0 < pw; l0 += kLaneBlock)
            std::memcpy(dst + q * point_pitch + l0, buf + q * pw + l0, sizeof(T) * kLaneBlock);
      }
    }
    const T** rows = s.rows.data();
    for (int64_t q = 0; q < points; ++q)
      for (int64_t ci = 0; ci < cin; ++ci) rows[q * cin + ci] = V + q * point_pitch + ci * pw;
    T* out = s.out.get();
    const int64_t lanes = (int64_t)mro * pw, chunks = ceil_div(m1 - m0, pw);
    if (!group_chunks) {
      // Per chunk and n-tile: the points' products into an L1-resident block, transformed at once.
      for (int64_t c = 0; c < chunks; ++c) {
        chunk_outputs(p, m0 + c * pw, m1, s);
        for (int64_t nt = 0; nt < n_tiles; ++nt) {
          const T* U = u->get() + (g * n_tiles + nt) * points * cin * mro;
          for (int64_t q = 0; q < points; ++q)
            uk.direct[variant](cin, rows + q * cin, c * pw * cin, U + q * cin * mro, out + q * lanes, pw, nullptr);
          store_block(p, n, g, nt, out, s);
        }
      }
    } else {
      // A large weight transform: each point's panels are read once per block (every chunk runs
      // through a panel while it is in L1) and the products of a group of n-tiles wait in
      // out[chunk][n-tile][point] for the output transform.
      for (int64_t nt0 = 0; nt0 < n_tiles; nt0 += group_tiles) {
        const int64_t nts = std::min(group_tiles, n_tiles - nt0);
        for (int64_t q = 0; q < points; ++q)
          for (int64_t nt = 0; nt < nts; ++nt) {
            const T* U = u->get() + ((g * n_tiles + nt0 + nt) * points + q) * cin * mro;
            for (int64_t c = 0; c < chunks; ++c)
              uk.direct[variant](cin, rows + q * cin, c * pw * cin, U, out + ((c * nts + nt) * points + q) * lanes, pw,
                                 nullptr);
          }
        for (int64_t c = 0; c < chunks; ++c) {
          chunk_outputs(p, m0 + c * pw, m1, s);
          for (int64_t nt = 0; nt < nts; ++nt)
            store_block(p, n, g, nt0 + nt, out + (c * nts + nt) * points * lanes, s);
        }
      }
    }
  }

  // Where each output of each tile of the chunk at c0 lands in y: runs of tiles whose outputs are
  // contiguous (s.runs) and the rest one by one (s.left).
  void chunk_outputs(const ConvProblem<T>& p, int64_t c0, int64_t m1, Scratch& s) const {
    int64_t* off = s.off.get();
    const int64_t lanes = (int64_t)mro * pw;
    for (int w = 0; w < pw; ++w) {
      const int64_t tile = c0 + w;
      int64_t t[3];
      if (tile < m1) tile_coords(tile, t);
      for (int64_t e0 = 0, e = 0; e0 < axes[0].outputs(); ++e0)
        for (int64_t e1 = 0; e1 < axes[1].outputs(); ++e1)
          for (int64_t e2 = 0; e2 < axes[2].outputs(); ++e2, ++e) {
            int64_t o = kOutside;  // past the end, or no tile
            if (tile < m1) {
              const int64_t j0 = axes[0].origin[t[0]] + e0 * axes[0].spacing,
                            j1 = axes[1].origin[t[1]] + e1 * axes[1].spacing,
                            j2 = axes[2].origin[t[2]] + e2 * axes[2].spacing;
              if (j0 < axes[0].count && j1 < axes[1].count && j2 < axes[2].count)
                o = (axes[0].out_start + j0 * axes[0].out_step) * p.y_stride[0] +
                    (axes[1].out_start + j1 * axes[1].out_step) * p.y_stride[1] +
                    (axes[2].out_start + j2 * axes[2].out_step) * p.y_stride[2];
            }
            off[e * pw + w] = o;
          }
    }
    // Channels-first rows at unit spacing along the last axis: a tile's m outputs there are
    // adjacent and the next tile's follow, so runs of tiles store contiguous interleaved outputs
    // (vectorisable); other outputs are stored one by one.
    std::vector<int64_t>& runs = s.runs;
    runs.clear();  // per run of tiles: output index, first tile, tiles, y offset
    const bool pairs = store_row && axes[2].spacing == 1 && p.y_stride[2] * axes[2].out_step == 1;
    const int m = axes[2].m;
    for (int64_t e = 0; e < outputs && pairs; e += m) {
      int64_t* yo = off + e * pw;
      auto whole = [&](int v) {  // all m outputs of tile v along the row exist
        bool all = true;
        for (int k = 0; k < m && all; ++k) all = yo[k * pw + v] != kOutside;
        return all;
      };
      for (int w = 0; w < pw;) {
        int v = w;
        while (v < pw && whole(v) && (v == w || yo[v] == yo[v - 1] + m)) ++v;
        if (v - w >= 2) {
          runs.insert(runs.end(), {e, w, v - w, yo[w]});
          for (int i = w; i < v; ++i)
            for (int k = 0; k < m; ++k) yo[k * pw + i] = kOutside;  // stored by the run
        }
        w = std::max(v, w + 1);
      }
    }
    std::vector<int64_t>& left = s.left;  // (index in the product block, y offset)
    left.clear();
    for (int64_t e = 0; e < outputs; ++e)
      for (int w = 0; w < pw; ++w)
        if (off[e * pw + w] != kOutside) left.insert(left.end(), {out_point[e] * lanes + w, off[e * pw + w]});
  }

  // The output transform of one [point][mro][pw] product block (in place) and its stores, with
  // the bias, for n-tile nt of image n, group g.
  void store_block(const ConvProblem<T>& p, int64_t n, int64_t g, int64_t nt, T* block, Scratch& s) const {
    const int64_t lanes = (int64_t)mro * pw;
    if (output_transform)
      output_transform(block, lanes, block, lanes, lanes);
    else
      along_axes(axes, lanes, [&](int64_t base, int64_t st, const Axis& ax) {
        with_tile(ax, [&](auto M, auto R) { output_line<M, R>(block + base, st, lanes); });
      });
    const std::vector<int64_t>& runs = s.runs;
    const std::vector<int64_t>& left = s.left;
    for (int r = 0; r < mro && nt * mro + r < cout; ++r) {
      const int64_t co = g * cout + nt * mro + r;
      const T b = p.bias ? p.bias[co * p.bias_stride] : T(0);
      T* yc = p.y + n * p.y_stride_n + co * p.y_stride_c;
      for (size_t i = 0; i < runs.size(); i += 4) {
        const T* first = block + out_point[runs[i]] * lanes + r * pw + runs[i + 1];
        s.probe += store_row(first, lanes, b, runs[i + 2], yc + runs[i + 3]);
      }
      T probe = 0;
      for (size_t i = 0; i < left.size(); i += 2) {
        const T v = block[left[i] + r * pw] + b;
        yc[left[i + 1]] = v;
        probe += v * T(0);
      }
      s.probe += probe;
    }
  }
};


// ---- The entry -----------------------------------------------------------------------------------

constexpr double kRank = 2.0;  // its place in the table (registry.cpp)

// Winograd (this unit) where it applies: every stride phase reads its inputs at unit step
// along each axis with 3 or 2 equally spaced taps (any dilation, forward or transposed) or 1 tap,
// at least two axes with more than one (a 1-D tile saves only a third of the products, which the
// transforms eat). Chosen automatically when each channel count per group is at least 16 and
// both together at least 48, where the GEMMs of the transform points amortise the transforms,
// and on enough tiles (below); CONVFAST_ALGO=winograd forces it wherever it applies, gemm|direct
// never take it. Measured (float32, 1 thread, minimum of interleaved runs, against the algorithm
// chosen before, AVX-512 / AVX2 kernels): 8 x 32 -> 32 on 64x64 1.68x / 1.70x, 16 -> 32 1.63x /
// 1.17x, 1 x 24 on 56x56 1.49x / 1.47x, 8 x 48 on 28x28 1.76x / 1.36x, 3-D 8 x 16 -> 32 on 16^3
// 1.61x / 1.55x; 16 -> 16 stays on the direct path (2-D 64x64 0.87x, 3-D 32^3 0.91x).

// The plan: one Winograd convolution per stride phase.
template <typename T>
struct Plan final : AlgorithmPlan {
  std::vector<std::unique_ptr<Conv<T>>> phases;
};

// Calls f(phase, axes, winograd_axes, points) with each stride phase's Winograd axes (F(2, *) tiles,
// taps sorted by offset); false where a phase does not qualify (every phase must: a transposed
// convolution's stride phases each become one Winograd convolution writing its own outputs; k4
// s2: four phases of 2 x 2 taps).
template <typename T, typename F>
bool for_each_phase(const typename ConvPlan<T>::Impl& plan, F&& f) {
  for (size_t ph = 0; ph < plan.phases.size(); ++ph) {
    std::array<Axis, kSpatialRank> planned;
    int axes_here = 0;
    double points_here = 1;
    for (int a = 0; a < kSpatialRank; ++a) {
      const AxisPlan& ap = *plan.phases[ph][a];
      Axis& w = planned[a];
      w.count = ap.count;
      w.out_start = ap.out_start;
      w.out_step = ap.out_step;
      w.in_size = ap.in_size;
      w.in_step = ap.in_step;
      w.mode = ap.mode;
      const int nt = static_cast<int>(ap.taps.size());
      if (nt == 1) {
        w.first = ap.tap_offset[0];
        w.kernel_index[0] = ap.taps[0];
        continue;
      }
      if ((nt != 2 && nt != 3) || ap.in_step != 1) return false;
      int order[3] = {0, 1, 2};
      std::sort(order, order + nt, [&](int i, int j) { return ap.tap_offset[i] < ap.tap_offset[j]; });
      const int64_t spacing = ap.tap_offset[order[1]] - ap.tap_offset[order[0]];
      if (spacing < 1 || (nt == 3 && ap.tap_offset[order[2]] - ap.tap_offset[order[1]] != spacing)) return false;
      w.taps = nt;
      w.first = ap.tap_offset[order[0]];
      w.spacing = spacing;
      for (int e = 0; e < nt; ++e) w.kernel_index[e] = ap.taps[order[e]];
      ++axes_here;
      points_here *= nt + 1;
    }
    if (axes_here < 2) return false;
    f(ph, planned, points_here);
  }
  return true;
}

// The direct micro-kernel variant of the products. The transforms copy lanes in blocks of
// kLaneBlock: a 3-channel tile of the baseline float64 kernels (3 vectors of 2) takes the 4-channel
// tiles instead. -1: none fits.
template <typename T>
int lane_variant(const UkernelInfo<T>& uk, int64_t cout) {
  using Impl = typename ConvPlan<T>::Impl;
  int variant = Impl::direct_variant_for(cout);
  if (uk.pw[variant] % kLaneBlock != 0) variant = Impl::direct_variant_for(4);
  return uk.direct[variant] != nullptr && uk.pw[variant] % kLaneBlock == 0 ? variant : -1;
}

template <typename T>
bool applies(Choice<T>& c) {
  // (No phases: a transposed convolution whose outputs no tap reaches, all bias.)
  if (!c.allow_winograd || c.p.cin_per_group < 1 || c.plan.phases.empty()) return false;
  return for_each_phase<T>(c.plan, [](size_t, const std::array<Axis, kSpatialRank>&, double) {}) &&
         lane_variant(c.plan.uk, c.p.cout_per_group) >= 0;
}

template <typename T>
double cost(Choice<T>& c) {
  const ConvProblem<T>& p = c.p;
  const double rank = kRank;
  if (c.forced_is("gemm") || c.forced_is("direct")) return c.refuse("another algorithm forced");
  const bool forced = c.forced_is("winograd");
  const int64_t cin = p.cin_per_group, cout = p.cout_per_group;
  if (!forced && (std::min(cin, cout) < 16 || cin + cout < 48)) return c.refuse("too few channels per group");
  // Tile size along 3-tap axes: F(2, 3), or in float64 F(4, 3) (36 points for 16 outputs in
  // 2-D, 4x fewer products than the direct sum against 2.25x; its larger transform coefficients
  // cost float64 no measurable accuracy, while in float32 they would approach the documented
  // error bound) where the products it saves beat its coarser tiles' waste at the edges by 20 %
  // (the model overestimated F(4, 3) by 10-15 % on the layer suite) and its weight transform
  // (points x C_in/G x C_out/G) is at most 32 MiB: 1-thread-pair A/B, float64, F(4, 3) over
  // F(2, 3): ResNet 64x56 1.56x, 128x28 1.29x, 256x14 1.47x, U-Net 1.63x, dilation 2 1.13x; VGG
  // 512x14 (76 MiB) 0.94x, dilation 6 at 32 (equal modelled cost) 0.89x. 2-tap axes (stride
  // phases of even kernels) take F(2, 2): 3 points for 2 outputs, coefficients 0 and +-1.
  c.winograd_m = 2;
  if (sizeof(T) == 8 && c.plan.phases.size() == 1 && !ConvPlan<T>::Impl::integer_weights(p)) {
    double cost2 = 1, cost4 = 1, points4 = 1;
    for_each_phase<T>(c.plan, [&](size_t, const std::array<Axis, kSpatialRank>& planned, double) {
      for (const Axis& w : planned)
        if (w.taps == 3) {
          cost2 *= 4.0 * double(w.tiles_for(2));
          cost4 *= 6.0 * double(w.tiles_for(4));
          points4 *= 6.0;
        } else if (w.taps == 2) {
          points4 *= 3.0;
        }
    });
    const double transform4 = points4 * double(p.cin_per_group) * double(p.cout_per_group) * sizeof(T);
    if (cost4 * 1.2 < cost2 && double(p.groups) * transform4 <= double(32 << 20)) c.winograd_m = 4;
  }
  // Enough tiles to amortise the weight transform, which each call redoes: at least 16 (256 for
  // fewer than 128 channels in and out together: 8 x 32 on 7x7, 128 tiles, 0.93x; 32 on 14x14,
  // 49 tiles, 0.86x), plus 4 per MiB of transformed weights (they outgrow the caches). 1 thread, float32, against the GEMM:
  // 512 channels on 4x4 maps (4 tiles) 0.66x, on 7x7 (16 tiles) 0.9x, 8 x 7x7 (128 tiles) 0.96x;
  // 256 on 14x14 (49 tiles, 4 MiB) 1.43x; 128 on 28x28 1.56x.
  double tiles = 0;   // of the phase with the fewest
  double points2 = 0;  // the weight transforms' points, all phases, with F(2, *) tiles
  for_each_phase<T>(c.plan, [&](size_t ph, std::array<Axis, kSpatialRank>& planned, double points) {
    double phase_tiles = double(p.batch);
    for (Axis& w : planned) {
      if (w.taps == 3) w.m = c.winograd_m;
      phase_tiles *= double(w.tiles_for(w.m));
    }
    tiles = ph == 0 ? phase_tiles : std::min(tiles, phase_tiles);
    points2 += points;
  });
  const double transform_mib =
      points2 * double(p.groups) * double(p.cin_per_group) * double(p.cout_per_group) * sizeof(T) / double(1 << 20);
  // A kept plan transforms its weights once: there, large weights (at least 8 MiB transformed) need
  // only 32 tiles (2 per thread and point block; 16 tiles ran on one thread). Kept plans, f32,
  // against the GEMM: 512 -> 512 on 8 x 4x4 (32 tiles, 16 MiB) 2.2x on 1 thread, 1.1x on 2 (noisy
  // host); on 7x7 at batch 1 (16 tiles) 1.15x on 1 thread but 0.5x on 2; 256 -> 256 on 7x7 (4 MiB) 0.93x.
  const bool kept_large = plan_is_kept() && transform_mib >= 8.0;
  const double min_tiles = kept_large ? 32.0 : (cin + cout < 128 ? 256.0 : 16.0) + 4.0 * transform_mib;
  if (!forced && tiles < min_tiles) return c.refuse("too few tiles");
  // Working memory: the weight transforms are (points / taps) times the packed weights (16/9 in
  // 2-D, 64/27 in 3-D, more with F(4, 3) above); past 48 MiB (a 3-D 512-channel float64 layer
  // would need 134 MiB) the GEMM path keeps the documented bound.
  if (!forced &&
      points2 * double(p.groups) * double(p.cin_per_group) * double(p.cout_per_group) * sizeof(T) > double(48 << 20))
    return c.refuse("weight transforms over 48 MiB");
  return c.take(forced ? "forced" : "enough channels and tiles", rank);
}

template <typename T>
bool create(Choice<T>& c) {
  const int variant = lane_variant(c.plan.uk, c.p.cout_per_group);
  std::unique_ptr<Plan<T>> plan(new Plan<T>);
  for_each_phase<T>(c.plan, [&](size_t, std::array<Axis, kSpatialRank>& ax, double) {
    for (Axis& w : ax)
      if (w.taps == 3) w.m = c.winograd_m;
    const Axis axes[kSpatialRank] = {ax[0], ax[1], ax[2]};
    plan->phases.emplace_back(new Conv<T>(c.p, axes, c.plan.uk, variant, get_num_threads()));
  });
  c.plan.own = std::move(plan);
  return true;
}

// Non-finite values: an infinity in a tile spreads through the transforms into Inf - Inf = NaN
// where the direct sum gives +-Inf, so an output holding any Inf or NaN is recomputed by the
// exact-chain GEMM / direct plan (built here: this is rare, and costs one plan), whose IEEE results
// are those of PyTorch's. Checking the outputs as they are stored costs a multiply-add per output;
// checking the input instead would read it twice.
template <typename T>
void execute(const typename ConvPlan<T>::Impl& plan, const ConvProblem<T>& p) {
  bool finite = true;
  for (const auto& phase : static_cast<const Plan<T>&>(*plan.own).phases)
    finite = phase->execute(p, get_num_threads()) && finite;
  if (!finite) {
    typename ConvPlan<T>::Impl(p, false).execute(p);
    t_last_algorithm += " (after winograd: non-finite output)";
    return;
  }
  record_algorithm<T>(plan, get_num_threads());
}

// The tile of phase 0's first Winograd axis, e.g. "F(2,3)".
template <typename T>
std::string describe(const typename ConvPlan<T>::Impl& plan) {
  const auto& phases = static_cast<const Plan<T>&>(*plan.own).phases;
  const Conv<T>& w0 = *phases[0];
  const Axis& ax = w0.axes[0].winograd() ? w0.axes[0] : w0.axes[1];
  return std::string("winograd F(") + std::to_string(ax.m) + "," + std::to_string(ax.taps) + ") " + plan.isa + " " +
         std::to_string(w0.points) + " points " + std::to_string(w0.pw) + "x" + std::to_string(w0.mro) +
         " phases=" + std::to_string(phases.size());
}

}  // namespace winograd

template <typename T>
const Algorithm<T>& winograd_algorithm() {
  static const Algorithm<T> entry = {"winograd", winograd::kRank,
      winograd::applies<T>, winograd::cost<T>,
      winograd::create<T>, winograd::execute<T>, winograd::describe<T>};
  return entry;
}
template const Algorithm<float>& winograd_algorithm<float>();
template const Algorithm<double>& winograd_algorithm<double>();

}  // namespace engine
}  // namespace convfast
