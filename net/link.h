// Thin cppzmq adapter that moves protocol messages over ZeroMQ sockets.
//
// Each socket belongs to exactly one thread (the process's loop). Sending
// never blocks forever: sockets get a send timeout and linger at creation.
// Receiving reads one multipart message, keeping at most kMaxKeptFrames
// frames (extra frames of a hostile message are read and discarded, so a
// malformed message can never grow memory or desynchronise the stream).
#pragma once

#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include <zmq.hpp>

#include "common/status.h"
#include "protocol/message.h"

namespace sps::net {

inline constexpr size_t kMaxKeptFrames = 4;  // routing id + the 3 protocol frames
// Largest message a socket accepts (ZMQ_MAXMSGSIZE); bigger peers are dropped by libzmq.
inline constexpr int64_t kMaxMessageBytes = int64_t{1} << 32;

enum class SocketKind { kRouter, kDealer };

// A socket with sps's standard options: linger, send timeout, message size cap.
zmq::socket_t make_socket(zmq::context_t& ctx, SocketKind kind, int linger_ms = 1000);

// Binds to tcp://host:port (port 0 = any free port) and returns the endpoint
// actually bound, e.g. "tcp://127.0.0.1:40123". Throws zmq::error_t on failure
// (setup only).
std::string bind_tcp(zmq::socket_t& s, const std::string& host, int port);

// Sends a protocol message; `routing_id` (ROUTER sockets) is sent first.
// Returns the protocol bytes sent (header + frames), or an error when the
// peer cannot take it within the send timeout. The rvalue form hands data
// frames of kZeroCopyBytes or more to ZeroMQ as they are (libzmq frees them
// by callback once written, from its I/O thread); the const form copies.
Result<size_t> send(zmq::socket_t& s, protocol::EncodedMessage&& m, const zmq::message_t* routing_id = nullptr);
Result<size_t> send(zmq::socket_t& s, const protocol::EncodedMessage& m,
                    const zmq::message_t* routing_id = nullptr);
// Below this a copy is cheaper than the callback and the shared refcount.
inline constexpr size_t kZeroCopyBytes = 4096;

// One received multipart message.
struct Received {
  zmq::message_t routing_id;              // ROUTER sockets only
  std::vector<zmq::message_t> frames;     // protocol frames (at most kMaxKeptFrames)
  size_t dropped_frames = 0;              // frames beyond the cap, discarded
  size_t bytes() const;                   // protocol bytes (frames only)
};

// Non-blocking receive of one message; nullopt when none is waiting.
std::optional<Received> try_recv(zmq::socket_t& s, bool routed);

// Validates the frames of `r` as a protocol message (views into r).
Result<protocol::MessageView> decode(const Received& r);

// Waits up to `timeout` for any of `sockets` to be readable; returns a
// readiness flag per socket. Interrupted waits (signals) return all-false.
std::vector<bool> wait_readable(std::vector<zmq::socket_t*> sockets, std::chrono::milliseconds timeout);

std::string routing_id_hex(const zmq::message_t& id);

// The descriptor of the TCP connection `r` came through (ZMQ_SRCFD), or -1.
int source_fd(const Received& r);

// The TCP connections of one socket that closed, as libzmq's socket monitor
// reports them (ZMQ_EVENT_DISCONNECTED, by file descriptor). A peer process
// that exits or is killed has its connections closed by its kernel, so the
// other side learns of it in milliseconds instead of after a heartbeat
// timeout. Match a descriptor to a peer through source_fd(). Belongs
// to the thread of the watched socket; destroy it before the context.
class ClosedConnections {
 public:
  ClosedConnections(zmq::context_t& ctx, zmq::socket_t& watched);
  ClosedConnections(const ClosedConnections&) = delete;
  ClosedConnections& operator=(const ClosedConnections&) = delete;

  // Readable when events wait (pass it to wait_readable next to the watched socket).
  zmq::socket_t& socket() { return events_; }
  // The descriptors of the connections closed since the last call (never blocks).
  std::vector<int> take();

 private:
  zmq::socket_t events_;
};

}  // namespace sps::net
