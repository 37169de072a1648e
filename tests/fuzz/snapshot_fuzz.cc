// libFuzzer harness for the snapshot reader: arbitrary bytes as a snapshot
// file. Every outcome must be a validated snapshot whose sections can be
// read, or a Status naming what is wrong; nothing may crash or over-read.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/snapshot.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
  std::vector<std::byte> data(size);
  if (size > 0) std::memcpy(data.data(), bytes, size);
  auto s = sps::Snapshot::parse(std::move(data), "fuzz.snap");
  if (!s.ok()) return 0;
  for (const auto& name : s->section_names()) {
    (void)s->u64(name);
    (void)s->f32(name);
    (void)s->u64s(name);
  }
  return 0;
}
