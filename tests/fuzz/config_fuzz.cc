// libFuzzer harness for the config loader: arbitrary bytes as a YAML job
// file, and as a --set override. Every outcome must be a Config or a Status
// naming what is wrong; nothing may crash.
#include <cstddef>
#include <cstdint>
#include <string>

#include "config/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
  const std::string text(reinterpret_cast<const char*>(bytes), size);
  auto c = sps::config::load_from_string(text, "fuzz.yaml");
  if (c.ok()) (void)sps::config::to_json(*c).dump();
  // The same bytes as an override of some key.
  const auto newline = text.find('\n');
  const std::string override_text = newline == std::string::npos ? text : text.substr(0, newline);
  (void)sps::config::load_from_string("", "fuzz.yaml", {override_text});
  return 0;
}
