// Loops over ascending keys into a large array (a server applying a push or
// gathering a sparse pull answer, a worker scattering one into its copy of
// the parameters). At 1 % of a 25M array the keys are about 400 bytes apart,
// so each one is a cache miss the hardware prefetchers do not predict; the
// loop asks for the line of the key kKeysAhead positions on, so that many
// misses are in flight at once.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sps {

// Measured on the 2-core development machine (docs/benchmarks.md,
// "Scattered keys"): a scatter-add of 4 × 250,000 sorted keys into 25M
// floats took 4.0 ms with 16 keys ahead, 3.2 with 32, 2.5 with 64 and 1.9
// with 128; 256 gained nothing more.
inline constexpr size_t kKeysAhead = 128;

enum class Access { kRead = 0, kWrite = 1 };

// Calls body(i) for every i in [begin, end), in order, after asking for the
// cache line of base[keys[i + kKeysAhead] - key_base]. `keys` must be
// ascending and in [key_base, key_base + size of base).
template <Access kAccess, class T, class Body>
inline void for_scattered_keys(T* base, uint32_t key_base, const uint32_t* keys, size_t begin, size_t end,
                               Body&& body) {
  const size_t head = end - begin > kKeysAhead ? end - kKeysAhead : begin;
  size_t i = begin;
  for (; i < head; ++i) {
    __builtin_prefetch(base + (keys[i + kKeysAhead] - key_base), static_cast<int>(kAccess));
    body(i);
  }
  for (; i < end; ++i) body(i);
}

}  // namespace sps
