// The forward engine's plan (internal): ConvPlan<T>::Impl holds what the chosen algorithm needs.
// The algorithms and the choice among them are listed in algorithm.hpp / registry.cpp; the units:
//   registry.cpp             the table of algorithms, the choice (one function over the table),
//                            the constructor (axis plans, stride phases), CONVFAST_VERBOSE
//   plan.cpp                 the GEMM and direct paths' blocking, weight packing and work split
//                            (plan_blocks, run_items), execute(); the public ConvPlan API
//   algorithms/*.cpp         one unit per algorithm: its entry (applies, cost, create, execute,
//                            describe) and its code; winograd, channel lanes and the scatter GEMM
//                            keep their own plan (an AlgorithmPlan, held in `own`)
#pragma once
#include "common/geometry.hpp"
#include "common/packing.hpp"
#include "convfast/dispatch.hpp"
#include "convfast/engine.hpp"
#include "convfast/scratch.hpp"
#include "convfast/threads.hpp"

namespace convfast {
namespace engine {
// An algorithm's own part of a plan (Winograd's transformed weights, the channel lanes' and the
// scatter GEMM's plans), defined in its unit; the Impl holds it without knowing its type.
struct AlgorithmPlan {
  virtual ~AlgorithmPlan() = default;
};
template <typename T>
struct Algorithm;  // algorithm.hpp
}  // namespace engine

using namespace engine;  // internal header: the engine's units share these names

// The problem as planned: a batch of small 1-D/2-D images as one image (registry.cpp).
template <typename T>
ConvProblem<T> batch_as_axis0(const ConvProblem<T>& p);

// The work a call's thread count is weighed by (CallThreads): the multiply-adds, plus 4 per weight,
// which every algorithm reads (or packs) once per call, and 12 per input and output element, which
// it reads, copies or writes: layers of few products per byte (depthwise, few pixels under large
// weights) stream more than their products suggest. 2 threads against 1, float32, min of
// interleaved runs: DCGAN's 100 -> 512 k4 on 1x1 (0.8 M products, 3.3 MB of weights) 0.50 -> 0.36
// ms; depthwise 3x3 on 8 x 192 x 14x14 (2.7 M products) 0.35 -> 0.19 ms, 8 x 384 x 7x7 0.21 ->
// 0.12, 8 x 960 x 4x4 0.21 -> 0.13 (MobileNetV2's last stages at batch 8).
template <typename T>
double conv_work(const ConvProblem<T>& p) {
  double weights = double(p.groups) * double(p.cin_per_group) * double(p.cout_per_group);
  double inputs = double(p.batch) * double(p.groups) * double(p.cin_per_group);
  double outputs = double(p.batch) * double(p.groups) * double(p.cout_per_group);
  for (int a = 0; a < kSpatialRank; ++a) {
    weights *= double(p.kernel[a]);
    inputs *= double(p.in_size[a]);
    outputs *= double(p.out_size[a]);
  }
  return conv_multiply_adds(p) + 4.0 * weights + 12.0 * (inputs + outputs);
}

// The last plan's description (plan.cpp), for last_algorithm().
extern thread_local std::string t_last_algorithm;

// ------------------------------------------------------------------------------------------------
// ConvPlan: everything that depends only on shapes and weights (axis plans, phases, blocking,
// packed weights) is built once; execute() runs it on any x/y/bias of those shapes.
// ------------------------------------------------------------------------------------------------
template <typename T>
struct ConvPlan<T>::Impl {
  ConvProblem<T> shape;  // sizes, strides of w; x/y pointers unused
  UkernelInfo<T> uk;
  const char* isa = "";
  bool direct = false;   // pixel-vector kernel (depthwise / small groups) instead of GEMM
  // GEMM with the roles of A and B swapped (see pixel_lanes_item): the packed weights are the
  // broadcast rows (MR output channels) and the packed input patches the vector lanes (NR pixels),
  // so C comes out channel-major, as channels-first y is.
  bool pixel_lanes = false;
  // Pixel lanes with the weights read in place (gemm_pixels micro-kernel: each k's MR channel
  // scalars at fixed offsets from row k of the weight), not packed: small maps under large
  // weights, where packing the weights cost as much as the products (choose_weights_in_place).
  bool weights_in_place = false;
  bool outputs_uncovered = false;  // transposed: some outputs receive no product (stride > kernel span)
  // GEMM, several phases of equal pixel counts (a transposed convolution whose output is stride x
  // its input, the common case): one work item runs a pixel block through every phase and then
  // writes the phases' interleaved outputs together, each output cache line in one pass. Measured
  // on 3-D k2s2 (1 thread): fusing alone did not change the time; with the blocked store of
  // run_item and the shared patches below, 1.3-1.5x.
  bool fuse_phases = false;
  static constexpr int64_t kMaxFusedPhases = 64;  // run_item keeps one output offset per phase
  static constexpr int kMaxTilePixels = 64;       // the widest direct tile (4 AVX-512 float vectors)
  static constexpr int kMaxDirectChannels = 6;    // the most output channels of a direct tile (kDirectChannelTiles)
  static_assert(kDirectChannelTiles[4] == kMaxDirectChannels, "direct_tile's bias_tile holds the widest channel tile");
  // Fused phases whose outputs interleave along the row (stride 2 along the last axis: residues 0
  // and 1 of the same rows), paired for the micro-kernel table's pair store: with the scalar scatter
  // they replace, storing took 40-75 % of run_item on k2s2 up-convolutions and on the grad_input
  // of stride-2 layers.
  std::vector<std::pair<int64_t, int64_t>> row_pairs;
  // Fused phases that also read the same input pixels for every tap (kernel size = stride, no
  // cropping: the U-Net up-convolution) pack the input patches once for all phases when K fits one
  // K block.
  bool phases_share_patches = false;
  int tile_m = 0;        // pixels per micro-tile (GEMM: MR; direct: PW)
  int tile_n = 0;        // output channels per micro-tile (GEMM: NR; direct: MRO)
  int direct_variant = 0;
  std::vector<AxisPlan> axes[kSpatialRank];
  std::vector<Phase> phases;
  std::vector<int64_t> wpack_offset;
  std::unique_ptr<AlignedBuffer<T>> wpack;
  std::vector<RowBufferPlan> row_plans;  // direct path: one per axis-2 plan
  // Direct path, plane mode (short rows): the last two axes are buffered together as 2-D slabs of
  // pitch col_plans[..].length, and pixel tiles run across output rows (the pitch's extra columns
  // are computed and dropped), so the per-row costs of short rows are paid once per block of rows.
  bool plane_mode = false;
  std::vector<RowBufferPlan> col_plans;   // per axis-2 plan, untiled: the pitch
  std::vector<RowBufferPlan> line_plans;  // per axis-1 plan: slots and shifts of the rows
  int64_t plane_rows = 0;                 // output rows (axis 1) per plane-mode work item
  static constexpr int64_t kMaxPlanesPerItem = 8;
  std::unique_ptr<AlignedBuffer<T>> zero_row;
  int64_t row_buffer_size = 0;           // direct path: per-thread row buffers, elements
  int64_t max_cache_entries = 0;         // direct path: row-buffer cache entries per thread
  int64_t n_tiles = 0, kc_max = 0, mc_max = 0, nt_per_block = 0, ldc = 0, max_taps = 0, max_k = 0;
  const Algorithm<T>* algorithm = nullptr;  // the chosen entry of the table (registry.cpp)
  std::unique_ptr<const AlgorithmPlan> own;  // its own plan, where it keeps one (its unit's type)

  explicit Impl(const ConvProblem<T>& p, bool allow_winograd = true);  // registry.cpp: the choice

  static bool integer_weights(const ConvProblem<T>& p);  // registry.cpp
  static bool weights_finite(const ConvProblem<T>& p);   // registry.cpp

  // The direct micro-kernel's channel tile (index into kDirectChannelTiles) for C_out/G channels:
  // the smallest that holds them, up to 6. 6-channel tiles have the best loads-per-FMA ratio, but
  // a C_out/G that is a multiple of 4 and that 6-channel tiles overshoot by more than 10 % (8, 16,
  // 20, 32, ...: 32 channels would be computed as 36) takes 4-channel tiles, which waste none.
  // 3 channels (an RGB output, the stem's grad_input) take 3-channel tiles of three vectors of
  // pixels: 4-channel tiles wasted a quarter of their products; the stem's grad_input measured
  // 46.1 -> 40.9 ms float64, 37.1 -> 32.7 float32 (medians, alternating processes, 2 rounds each).
  // Three channels by four vectors ran float32 at half the speed, probably because twelve
  // accumulators and four input vectors fill all sixteen AVX2 registers (not profiled).
  static int direct_variant_for(int64_t cout) {
    const int variant = cout <= 1 ? 0 : cout <= 2 ? 1 : cout <= 3 ? 2 : cout <= 4 ? 3 : 4;
    return variant == 4 && cout % 4 == 0 && ceil_div(cout, 6) * 6 * 10 > cout * 11 ? 3 : variant;
  }

  void choose_plane_mode(const ConvProblem<T>& p);  // algorithms/direct.cpp

  // The GEMM and direct paths: cache blocking, phase fusion and the packed weights, once tile_m,
  // tile_n and the orientation are set (plan.cpp).
  void plan_blocks(const ConvProblem<T>& p);

  // Whether gemm_block reads a tile whose pixels' inputs are `step` apart (for every tap) in place,
  // with `row_taps` taps along the row (see below).
  static bool steps_in_place(int64_t step, int64_t row_taps) { return step == 1 || (step == 2 && row_taps > 2); }
  // Channels-last inputs (channel stride 1, at least 16 channels per group) are read in place
  // whatever the taps and steps: there consecutive k are neighbouring channels of one pixel, and
  // the MR lines a tile reads serve 16 k each.
  static bool reads_in_place(const PhaseShape& shape, int64_t row_step, int64_t channel_stride, int64_t cin) {
    if (channel_stride == 1 && cin >= 16) return true;
    return shape.num_taps > 1 && steps_in_place(row_step, shape.taps[2]);
  }

  void gemm_block(const ConvProblem<T>& p, const PhaseShape& shape, const WorkItem& it, const T* wp, const T* xg,
                  int64_t row_step, ThreadScratch<T>& s, T* C, bool reuse_patches) const;

  template <bool kToY>
  void direct_rows(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s) const;

  // y[q] = tile[q] + bias; restrict (the tile is thread scratch, never y) lets it vectorise.
  static void store_with_bias(const T* __restrict tile, T bias, int64_t n, T* __restrict y) {
    for (int64_t q = 0; q < n; ++q) y[q] = tile[q] + bias;
  }

  template <bool kToY>
  void direct_planes(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s) const;

  template <typename Write>
  void direct_tile(const ConvProblem<T>& p, int64_t K, const T* const* rows, int64_t offset, const T* wp, int64_t g,
                   ThreadScratch<T>& s, T* y_tile, Write&& write) const;

  static int64_t cache_entries(int64_t outer_taps0, int64_t outer_taps1) { return 2 * outer_taps0 * outer_taps1; }

  template <int STRIDE>
  static void strided_copy(const T* __restrict src, int64_t n, T* __restrict dst) {
    for (int64_t u = 0; u < n; ++u) dst[u] = src[u * STRIDE];
  }

  __attribute__((noinline)) static void fill_row_buffer(const RowBufferPlan& rb, int64_t slot, const T* x_row,
                                                        int64_t xs2, T* dst);

  bool choose_pixel_lanes(const ConvProblem<T>& p) const;                                 // algorithms/gemm.cpp
  bool gather_tiles_fit_better(const ConvProblem<T>& p) const;                           // algorithms/gemm.cpp
  bool choose_weights_in_place(const ConvProblem<T>& p, bool packed_pixel_lanes) const;  // algorithms/gemm.cpp

  // Pixel lanes: an item's block of pixels, its offsets set up in the scratch (pixel_block), and
  // the B panels of one of its K blocks (pack_pixel_panels).
  struct PixelBlock {
    const T* xg = nullptr;         // the item's image and group in x
    int64_t taps = 0, mcount = 0, p_tiles = 0;
    int64_t run_tiles = 0;         // leading tiles packed channel by channel from one run of x
    const T* run_start = nullptr;  // that run
  };
  PixelBlock pixel_block(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s) const;
  void pack_pixel_panels(const ConvProblem<T>& p, const PixelBlock& b, ThreadScratch<T>& s, int64_t k0, int64_t kc,
                         T* panel) const;
  // Weights in place: every pixel block's panels over the whole K, packed once for its items.
  std::unique_ptr<AlignedBuffer<T>> pixel_lanes_patches(const ConvProblem<T>& p, const std::vector<WorkItem>& items,
                                                        std::vector<std::unique_ptr<ThreadScratch<T>>>& scratch,
                                                        int64_t nt_block, std::vector<int64_t>& offset) const;
  // packed: the item's panels over the whole K, packed beforehand (weights in place), or null.
  void pixel_lanes_item(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s, const T* packed) const;

  void run_item(const ConvProblem<T>& p, const WorkItem& it, ThreadScratch<T>& s, const T* packed = nullptr) const;

  void fill_with_bias(const ConvProblem<T>& p) const;

  int64_t direct_rows_per_item(const ConvProblem<T>& p, int64_t rows, int64_t row_length) const;

  // The GEMM and direct paths' execution: the work split, scratch and threads (plan.cpp).
  void run_items(const ConvProblem<T>& p) const;

  void execute(const ConvProblem<T>& p) const;  // the chosen algorithm's (plan.cpp)

  std::string describe() const;  // the chosen algorithm's (registry.cpp)
  // The GEMM and direct paths' description: name, ISA, tile, phases (plan.cpp).
  std::string describe_blocks(const char* name) const;
};

}  // namespace convfast
