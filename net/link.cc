#include "net/link.h"

#include <atomic>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace sps::net {

zmq::socket_t make_socket(zmq::context_t& ctx, SocketKind kind, int linger_ms) {
  zmq::socket_t s(ctx, kind == SocketKind::kRouter ? zmq::socket_type::router : zmq::socket_type::dealer);
  s.set(zmq::sockopt::linger, linger_ms);
  s.set(zmq::sockopt::sndtimeo, 5000);
  s.set(zmq::sockopt::maxmsgsize, kMaxMessageBytes);
  // High-water marks bound queued messages per peer in both directions.
  s.set(zmq::sockopt::sndhwm, 10000);
  s.set(zmq::sockopt::rcvhwm, 10000);
  return s;
}

std::string bind_tcp(zmq::socket_t& s, const std::string& host, int port) {
  const std::string ep = port == 0 ? fmt::format("tcp://{}:*", host) : fmt::format("tcp://{}:{}", host, port);
  s.bind(ep);
  return s.get(zmq::sockopt::last_endpoint);
}

namespace {

zmq::message_t adopt(protocol::Frame&& f) {
  if (f.size() < kZeroCopyBytes) return zmq::message_t(f.data(), f.size());
  auto* owned = new protocol::Frame(std::move(f));
  // libzmq calls this once the frame is written (or dropped); the Frame's
  // storage goes back to its pool, if it came from one.
  return zmq::message_t(
      owned->data(), owned->size(), [](void*, void* hint) { delete static_cast<protocol::Frame*>(hint); }, owned);
}

Result<size_t> send_parts(zmq::socket_t& s, zmq::message_t header, zmq::message_t f1, zmq::message_t f2,
                          const zmq::message_t* routing_id) {
  const size_t total = header.size() + f1.size() + f2.size();
  try {
    if (routing_id != nullptr) {
      zmq::message_t id(routing_id->data(), routing_id->size());
      if (!s.send(id, zmq::send_flags::sndmore)) return deadline_exceeded("send timed out");
    }
    if (!s.send(header, zmq::send_flags::sndmore) || !s.send(f1, zmq::send_flags::sndmore) ||
        !s.send(f2, zmq::send_flags::none))
      return deadline_exceeded("send timed out (peer not reading)");
  } catch (const zmq::error_t& e) {
    if (e.num() == EHOSTUNREACH) return unavailable("peer is gone");
    return unavailable(fmt::format("send failed: {}", e.what()));
  }
  return total;
}

}  // namespace

Result<size_t> send(zmq::socket_t& s, protocol::EncodedMessage&& m, const zmq::message_t* routing_id) {
  return send_parts(s, zmq::message_t(m.header.data(), m.header.size()), adopt(std::move(m.frame1)),
                    adopt(std::move(m.frame2)), routing_id);
}

Result<size_t> send(zmq::socket_t& s, const protocol::EncodedMessage& m, const zmq::message_t* routing_id) {
  return send_parts(s, zmq::message_t(m.header.data(), m.header.size()), zmq::message_t(m.frame1.data(), m.frame1.size()),
                    zmq::message_t(m.frame2.data(), m.frame2.size()), routing_id);
}

size_t Received::bytes() const {
  size_t n = 0;
  for (const auto& f : frames) n += f.size();
  return n;
}

std::optional<Received> try_recv(zmq::socket_t& s, bool routed) {
  Received r;
  zmq::message_t part;
  bool first = true;
  while (true) {
    zmq::recv_result_t got;
    try {
      got = s.recv(part, first ? zmq::recv_flags::dontwait : zmq::recv_flags::none);
    } catch (const zmq::error_t&) {
      return std::nullopt;  // EINTR and friends: nothing consumed on a first part
    }
    if (!got) return std::nullopt;
    const bool more = part.more();
    if (first && routed) {
      r.routing_id = std::move(part);
    } else if (r.frames.size() < kMaxKeptFrames) {
      r.frames.push_back(std::move(part));
    } else {
      ++r.dropped_frames;
    }
    part = zmq::message_t();
    first = false;
    if (!more) break;
  }
  return r;
}

Result<protocol::MessageView> decode(const Received& r) {
  if (r.dropped_frames > 0)
    return malformed(fmt::format("message has {} frames, expected {}", r.frames.size() + r.dropped_frames,
                                 protocol::kFrameCount));
  std::vector<protocol::ByteSpan> spans;
  spans.reserve(r.frames.size());
  for (const auto& f : r.frames) spans.emplace_back(static_cast<const std::byte*>(f.data()), f.size());
  return protocol::decode_message(spans);
}

std::vector<bool> wait_readable(std::vector<zmq::socket_t*> sockets, std::chrono::milliseconds timeout) {
  std::vector<zmq::pollitem_t> items;
  items.reserve(sockets.size());
  for (auto* s : sockets) items.push_back({s->handle(), 0, ZMQ_POLLIN, 0});
  std::vector<bool> ready(sockets.size(), false);
  try {
    zmq::poll(items.data(), items.size(), timeout);
  } catch (const zmq::error_t&) {
    return ready;  // EINTR: the caller re-checks its stop flag
  }
  for (size_t i = 0; i < items.size(); ++i) ready[i] = (items[i].revents & ZMQ_POLLIN) != 0;
  return ready;
}

std::string routing_id_hex(const zmq::message_t& id) {
  std::string out;
  const auto* p = static_cast<const unsigned char*>(id.data());
  for (size_t i = 0; i < id.size(); ++i) out += fmt::format("{:02x}", p[i]);
  return out;
}

int source_fd(const Received& r) {
  // A ROUTER's routing-id frame carries no metadata when the message was
  // prefetched by a poll: the first protocol frame does.
  for (const zmq::message_t* part : {&r.routing_id, r.frames.empty() ? nullptr : &r.frames.front()}) {
    if (part == nullptr) continue;
    const int fd = zmq_msg_get(part->handle(), ZMQ_SRCFD);
    if (fd >= 0) return fd;
  }
  return -1;
}

ClosedConnections::ClosedConnections(zmq::context_t& ctx, zmq::socket_t& watched)
    : events_(ctx, zmq::socket_type::pair) {
  // One inproc name per watched socket in this process.
  static std::atomic<uint64_t> next{0};
  const std::string name = fmt::format("inproc://sps-closed-connections-{}", next++);
  if (zmq_socket_monitor(watched.handle(), name.c_str(), ZMQ_EVENT_DISCONNECTED) != 0) throw zmq::error_t();
  events_.set(zmq::sockopt::linger, 0);
  events_.connect(name);
}

std::vector<int> ClosedConnections::take() {
  std::vector<int> closed;
  while (true) {
    // An event is two frames: 2 bytes event id + 4 bytes value (the
    // descriptor), then the endpoint.
    zmq::message_t event;
    zmq::recv_result_t got;
    try {
      got = events_.recv(event, zmq::recv_flags::dontwait);
    } catch (const zmq::error_t&) {
      break;
    }
    if (!got) break;
    for (bool more = event.more(); more;) {
      zmq::message_t rest;
      (void)events_.recv(rest, zmq::recv_flags::none);
      more = rest.more();
    }
    if (event.size() < 6) continue;
    uint16_t id = 0;
    int32_t value = 0;
    std::memcpy(&id, event.data(), sizeof id);
    std::memcpy(&value, static_cast<const char*>(event.data()) + sizeof id, sizeof value);
    if (id == ZMQ_EVENT_DISCONNECTED) closed.push_back(value);
  }
  return closed;
}

}  // namespace sps::net
