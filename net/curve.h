// CURVE security for sps sockets: ZeroMQ's CurveZMQ handshake (Curve25519
// keys, libsodium) authenticates both ends and encrypts every frame.
//
// Who is who: the scheduler's socket and each server's data socket are
// CURVE servers; every connecting socket (workers, a server's link to the
// scheduler) is a CURVE client that must know the servers' public key.
// A CURVE server only admits clients whose public key is in its allowed
// set: libzmq asks the process's ZAP handler (ZapAuthenticator, RFC 27),
// which must be running before any CURVE server socket binds.
//
// Key files (written by sps-keygen), Z85 text:
//   NAME.key   "public-key <40 chars>\nsecret-key <40 chars>\n", mode 0600
//   NAME.pub   "public-key <40 chars>\n"
#pragma once

#include <atomic>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include <zmq.hpp>

#include "common/status.h"

namespace sps::net {

struct CurveKeyPair {
  std::string public_key;  // Z85, 40 characters
  std::string secret_key;
};

// A fresh key pair (fails only when libzmq was built without CURVE).
Result<CurveKeyPair> generate_curve_keys();
// Writes STEM.key (0600) and STEM.pub; refuses to overwrite unless `force`.
Status write_key_files(const std::string& stem, const CurveKeyPair& keys, bool force);
// Reads a .key file (both keys), checking that the public key belongs to
// the secret one.
Result<CurveKeyPair> read_key_file(const std::string& path);
// The public keys in a file: a .pub, a .key (its public half) or a list
// with one "public-key <key>" or bare key per line; a line starting with
// '#' is a comment ('#' inside a key is a Z85 digit).
Result<std::set<std::string>> read_public_keys(const std::string& path);

// What a process needs to speak CURVE; empty `own.public_key` = off.
struct CurveSettings {
  CurveKeyPair own;                 // this process's key pair
  std::string server_public_key;    // the key the CURVE servers of the job use
  std::set<std::string> allowed;    // client keys a CURVE server admits
  bool enabled() const { return !own.public_key.empty(); }
};
// From the config's file names: `key_file` is required; `server_key_file`
// defaults to key_file's public half, `allowed_keys_file` to that key only.
// Errors name the file and the key (security.*) that pointed at it.
Result<CurveSettings> load_curve_settings(const std::string& key_file, const std::string& server_key_file,
                                          const std::string& allowed_keys_file);

// Socket roles; call before bind()/connect(). No-ops when CURVE is off.
void make_curve_server(zmq::socket_t& s, const CurveSettings& c);
void make_curve_client(zmq::socket_t& s, const CurveSettings& c);

// The ZAP handler of one ZeroMQ context: admits CURVE clients whose public
// key is allowed and refuses every other handshake (a refused peer never
// gets a message through). Runs on its own thread; counts refusals.
class ZapAuthenticator {
 public:
  // Binds inproc://zeromq.zap.01 in `ctx` and starts answering; `who` names
  // the process in log lines ("server 1").
  static Result<std::unique_ptr<ZapAuthenticator>> start(zmq::context_t& ctx, std::set<std::string> allowed,
                                                          std::string who);
  ~ZapAuthenticator();
  ZapAuthenticator(const ZapAuthenticator&) = delete;
  ZapAuthenticator& operator=(const ZapAuthenticator&) = delete;
  uint64_t admitted() const { return admitted_.load(); }
  uint64_t refused() const { return refused_.load(); }

 private:
  ZapAuthenticator(zmq::socket_t socket, std::set<std::string> allowed, std::string who);
  void serve();
  zmq::socket_t socket_;
  std::set<std::string> allowed_;
  std::string who_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> admitted_{0};
  std::atomic<uint64_t> refused_{0};
  std::thread thread_;
};

}  // namespace sps::net
