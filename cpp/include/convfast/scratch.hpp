// Small helpers shared by the kernel translation units: overflow-checked size arithmetic (sizes
// come from users; a wrapped product would allocate too little) and 64-byte aligned scratch.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <cstddef>
#include <mutex>
#include <stdexcept>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace convfast {
namespace detail {

inline int64_t checked_mul(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) throw std::length_error("convfast: working size overflows 64 bits");
  return r;
}
inline int64_t checked_add(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) throw std::length_error("convfast: working size overflows 64 bits");
  return r;
}
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }  // a >= 0, b > 0; no overflow

// Large scratch blocks kept between calls. Each call of a layer allocates the same few large
// buffers (packed operands, channels-last copies, Winograd transforms) and frees them at its end;
// fresh pages are zeroed by the kernel on first touch, which was 5-9 % of the float64 weight
// gradients (ResNet 64x56, the 1x1 layers) and showed in most profiles. Freed blocks of
// kLargeBlockMin bytes or more (and, through _core.output_array, the blocks of large outputs once
// their arrays are freed) are kept, up to a cap (CONVFAST_SCRATCH_CACHE_MB, read once,
// default 128; 0 keeps none), and handed to a later request of at least half their size. A
// request no kept block fits releases the oldest kept blocks until the kept ones and the new block
// together stay within the cap (all of them for a request larger than the cap), so that the layers
// of a network, whose buffers differ in size, keep each other's blocks instead of releasing and
// refaulting them layer after layer (ResNet-18's 512-channel layers at batch 1 took 3x longer
// inside the network than alone, from huge-page faults). The peak resident memory of a call is
// therefore at most its own working memory plus the cap, and between calls at most the cap stays
// resident. CONVFAST_SCRATCH_POISON=1 (read once; for the tests) fills every kept
// block with NaN bytes as it is handed out, so that a path reading scratch it did not write shows.
class BlockCache {
 public:
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();  // never destroyed: blocks may be freed at exit
    return *cache;
  }
  // A kept block of at least `bytes` (its size into `bytes`), or nullptr if none fits.
  void* take(size_t& bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t best = blocks_.size();
    for (size_t i = 0; i < blocks_.size(); ++i)
      if (blocks_[i].bytes >= bytes && blocks_[i].bytes / 2 <= bytes &&
          (best == blocks_.size() || blocks_[i].bytes < blocks_[best].bytes))
        best = i;
    if (best == blocks_.size()) {
      size_t evict = 0;  // blocks_ is oldest first (give appends)
      while (evict < blocks_.size() && kept_ + bytes > cap_) {
        std::free(blocks_[evict].ptr);
        kept_ -= blocks_[evict].bytes;
        ++evict;
      }
      blocks_.erase(blocks_.begin(), blocks_.begin() + static_cast<std::ptrdiff_t>(evict));
      return nullptr;
    }
    void* p = blocks_[best].ptr;
    bytes = blocks_[best].bytes;
    kept_ -= bytes;
    if (poison_) std::memset(p, 0xFF, bytes);
    blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(best));
    return p;
  }
  // Keeps the block of `bytes` if the cap allows, else frees it.
  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (kept_ + bytes > cap_) {
      std::free(p);
      return;
    }
    blocks_.push_back({p, bytes});
    kept_ += bytes;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  BlockCache() {
    const char* env = std::getenv("CONVFAST_SCRATCH_CACHE_MB");
    long mb = 128;
    if (env && *env) {
      char* end = nullptr;
      const long v = std::strtol(env, &end, 10);
      if (end && *end == '\0' && v >= 0) mb = std::min<long>(v, long(1) << 20);
    }
    cap_ = static_cast<size_t>(mb) << 20;
    const char* poison = std::getenv("CONVFAST_SCRATCH_POISON");
    poison_ = poison && std::strcmp(poison, "1") == 0;
  }
  std::mutex mutex_;
  std::vector<Block> blocks_;
  size_t kept_ = 0, cap_ = 0;
  bool poison_ = false;
};

// A block of at least `bytes` (rounded up to 2 MiB; its size into `bytes`), 2 MiB aligned: a kept
// one, or fresh memory advised as transparent huge pages where Linux offers them (as NumPy does for
// its arrays): one fault per 2 MiB instead of per 4 KiB (two threads faulting also contended on
// the kernel's locks): the 512-channel 14x14 float64 weight gradient 55 -> 34 ms, its forward 50 ->
// 39 ms. It goes back through release_large_block.
inline void* take_large_block(size_t& bytes) {
  constexpr int64_t kAlign = int64_t(2) << 20;
  bytes = static_cast<size_t>(checked_add(static_cast<int64_t>(bytes), kAlign - 1) / kAlign * kAlign);
  if (void* kept = BlockCache::instance().take(bytes)) return kept;  // bytes: the kept block's size
  void* p = std::aligned_alloc(static_cast<size_t>(kAlign), bytes);
  if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: errors ignored
#endif
  return p;
}
inline void release_large_block(void* p, size_t bytes) { BlockCache::instance().give(p, bytes); }

// Blocks of kLargeBlockMin bytes or more come from take_large_block; smaller ones are 64-byte
// aligned and freed.
constexpr int64_t kLargeBlockMin = int64_t(4) << 20;

// 64-byte aligned scratch memory, zero-initialised lazily by its users. Buffers of kLargeBlockMin
// or more (the weight transforms, channels-last copies, packed operands: allocated per call) are
// large blocks, kept for later calls by BlockCache.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t count) {
    const int64_t bytes = checked_mul(std::max<int64_t>(count, 1), sizeof(T));
    if (bytes >= kLargeBlockMin) {
      size_t size = static_cast<size_t>(bytes);
      ptr_ = static_cast<T*>(take_large_block(size));
      bytes_ = size;  // a kept block may be larger: it goes back whole
      return;
    }
    ptr_ = static_cast<T*>(std::aligned_alloc(64, static_cast<size_t>(checked_add(bytes, 63) / 64 * 64)));
    if (!ptr_) throw std::bad_alloc();
  }
  ~AlignedBuffer() {
    if (bytes_)
      release_large_block(ptr_, bytes_);
    else
      std::free(ptr_);
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
  size_t bytes_ = 0;  // a large block's size (0: a small buffer, freed)
};

}  // namespace detail
}  // namespace convfast
