// Small helpers shared by the kernel translation units: overflow-checked size arithmetic (sizes
// come from users; a wrapped product would allocate too little) and 64-byte aligned scratch.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <stdexcept>

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

// 64-byte aligned scratch memory, zero-initialised lazily by its users.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t count) {
    const int64_t bytes = checked_mul(std::max<int64_t>(count, 1), sizeof(T));
    const int64_t rounded = checked_add(bytes, 63) / 64 * 64;
    ptr_ = static_cast<T*>(std::aligned_alloc(64, static_cast<size_t>(rounded)));
    if (!ptr_) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(ptr_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
};

}  // namespace detail
}  // namespace convfast
