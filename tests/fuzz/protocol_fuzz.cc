// libFuzzer harness for the wire protocol: arbitrary bytes as a message of
// up to four frames go through every decoder a server, worker or scheduler
// runs on received data. Nothing may crash, hang or read out of bounds
// (built with ASan + UBSan); refusals are the expected outcome.
//
// Input layout: byte 0 = number of frames (mod 5); then per frame a 2-byte
// little-endian length (clamped to what is left) and the frame's bytes.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "protocol/message.h"

using namespace sps::protocol;

namespace {

volatile float sink;  // keeps the decoded values alive

void consume_data(const MessageView& m, uint32_t begin, uint32_t end) {
  DecodeScratch scratch;
  auto data = decode_data(m, begin, end, scratch);
  if (!data.ok()) return;
  float acc = 0;
  for (uint32_t i = 0; i < data->size(); ++i) acc += static_cast<float>(data->key(i)) + data->value(i);
  sink = acc;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
  if (size == 0) return 0;
  const auto* data = reinterpret_cast<const std::byte*>(bytes);
  const size_t frames = bytes[0] % 5;
  size_t pos = 1;
  std::vector<ByteSpan> spans;
  for (size_t f = 0; f < frames; ++f) {
    size_t len = 0;
    if (pos + 2 <= size) len = size_t{bytes[pos]} | (size_t{bytes[pos + 1]} << 8);
    pos = pos + 2 <= size ? pos + 2 : size;
    len = len < size - pos ? len : size - pos;
    spans.emplace_back(data + pos, len);
    pos += len;
  }
  if (!spans.empty()) (void)decode_header(spans[0]);
  auto m = decode_message(spans);
  if (!m.ok()) return 0;
  switch (m->header.type) {
    case MessageType::kPush:
    case MessageType::kPullResponse:
      consume_data(*m, m->header.key_begin, m->header.key_end);
      consume_data(*m, 0, 1000);
      break;
    default:
      (void)decode_register(m->frame1);
      (void)decode_assign(m->frame1);
      (void)decode_done(m->frame1);
      (void)decode_text(m->frame1);
      (void)decode_rank(m->frame1);
      (void)decode_clocks(m->frame1);
      (void)decode_server_report(m->frame1);
      break;
  }
  return 0;
}
