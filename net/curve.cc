#include "net/curve.h"

#include <sys/stat.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <zmq_addon.hpp>

namespace sps::net {

namespace {

constexpr size_t kZ85KeyChars = 40;
constexpr const char* kZapEndpoint = "inproc://zeromq.zap.01";

bool is_z85_key(const std::string& k) {
  if (k.size() != kZ85KeyChars) return false;
  uint8_t raw[32];
  return zmq_z85_decode(raw, k.c_str()) != nullptr;
}

Result<std::string> read_text(const std::string& path) {
  std::ifstream f(path);
  if (!f) return unavailable(fmt::format("cannot read {}: {}", path, std::strerror(errno)));
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// "name value" lines and bare values; lines starting with '#' are comments
// (only at the start: '#' is a Z85 digit), blank lines skipped.
std::vector<std::pair<std::string, std::string>> key_lines(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::string a, b;
    if (!(words >> a) || a[0] == '#') continue;
    if (words >> b) {
      out.emplace_back(a, b);
    } else {
      out.emplace_back("", a);
    }
  }
  return out;
}

}  // namespace

Result<CurveKeyPair> generate_curve_keys() {
  char pub[kZ85KeyChars + 1] = {0};
  char sec[kZ85KeyChars + 1] = {0};
  if (zmq_curve_keypair(pub, sec) != 0)
    return failed_precondition(fmt::format("cannot make CURVE keys: {} (libzmq without libsodium?)",
                                           zmq_strerror(zmq_errno())));
  return CurveKeyPair{pub, sec};
}

Status write_key_files(const std::string& stem, const CurveKeyPair& keys, bool force) {
  const std::string key_path = stem + ".key";
  const std::string pub_path = stem + ".pub";
  if (!force) {
    for (const auto& p : {key_path, pub_path})
      if (std::filesystem::exists(p))
        return failed_precondition(fmt::format("{} exists; pass --force to replace it", p));
  }
  if (const auto parent = std::filesystem::path(key_path).parent_path(); !parent.empty())
    std::filesystem::create_directories(parent);
  {
    // Created 0600 before the secret goes in.
    std::ofstream(key_path, std::ios::trunc).close();
    if (::chmod(key_path.c_str(), 0600) != 0)
      return unavailable(fmt::format("cannot restrict {}: {}", key_path, std::strerror(errno)));
    std::ofstream f(key_path, std::ios::trunc);
    f << "# sps CURVE key pair: keep this file secret\npublic-key " << keys.public_key << "\nsecret-key "
      << keys.secret_key << "\n";
    if (!f) return unavailable(fmt::format("cannot write {}", key_path));
  }
  std::ofstream f(pub_path, std::ios::trunc);
  f << "# sps CURVE public key\npublic-key " << keys.public_key << "\n";
  if (!f) return unavailable(fmt::format("cannot write {}", pub_path));
  return {};
}

Result<CurveKeyPair> read_key_file(const std::string& path) {
  auto text = read_text(path);
  if (!text.ok()) return text.status();
  CurveKeyPair k;
  for (const auto& [name, value] : key_lines(*text)) {
    if (name == "public-key") k.public_key = value;
    if (name == "secret-key") k.secret_key = value;
  }
  if (!is_z85_key(k.secret_key))
    return malformed(fmt::format("{}: no valid 'secret-key <40 Z85 characters>' line (make one with sps-keygen)", path));
  char derived[kZ85KeyChars + 1] = {0};
  if (zmq_curve_public(derived, k.secret_key.c_str()) != 0)
    return failed_precondition(fmt::format("{}: {}", path, zmq_strerror(zmq_errno())));
  if (k.public_key.empty()) k.public_key = derived;
  if (k.public_key != derived) return malformed(fmt::format("{}: the public key does not belong to the secret key", path));
  return k;
}

Result<std::set<std::string>> read_public_keys(const std::string& path) {
  auto text = read_text(path);
  if (!text.ok()) return text.status();
  std::set<std::string> keys;
  int line_no = 0;
  for (const auto& [name, value] : key_lines(*text)) {
    ++line_no;
    if (name == "secret-key") continue;  // a .key file: its public half is what counts
    if (!name.empty() && name != "public-key")
      return malformed(fmt::format("{}: entry {}: expected 'public-key <key>' or a bare key, got '{}'", path, line_no, name));
    if (!is_z85_key(value)) return malformed(fmt::format("{}: entry {}: '{}' is not a 40-character Z85 key", path, line_no, value));
    keys.insert(value);
  }
  if (keys.empty()) return malformed(fmt::format("{}: no public keys in the file", path));
  return keys;
}

Result<CurveSettings> load_curve_settings(const std::string& key_file, const std::string& server_key_file,
                                          const std::string& allowed_keys_file) {
  if (key_file.empty())
    return invalid_argument("security.key_file: CURVE is on (security.curve: true) but no key file is named; make "
                            "one with sps-keygen");
  CurveSettings c;
  auto own = read_key_file(key_file);
  if (!own.ok()) return own.status().with_context("security.key_file");
  c.own = *own;
  c.server_public_key = c.own.public_key;
  if (!server_key_file.empty()) {
    auto keys = read_public_keys(server_key_file);
    if (!keys.ok()) return keys.status().with_context("security.server_key_file");
    if (keys->size() != 1)
      return invalid_argument(fmt::format("security.server_key_file: {} holds {} keys; the servers' key is one key",
                                          server_key_file, keys->size()));
    c.server_public_key = *keys->begin();
  }
  c.allowed = {c.own.public_key};
  if (!allowed_keys_file.empty()) {
    auto keys = read_public_keys(allowed_keys_file);
    if (!keys.ok()) return keys.status().with_context("security.allowed_keys_file");
    c.allowed = *keys;
  }
  return c;
}

void make_curve_server(zmq::socket_t& s, const CurveSettings& c) {
  if (!c.enabled()) return;
  s.set(zmq::sockopt::curve_server, 1);
  s.set(zmq::sockopt::curve_secretkey, c.own.secret_key);
  s.set(zmq::sockopt::zap_domain, "sps");
}

void make_curve_client(zmq::socket_t& s, const CurveSettings& c) {
  if (!c.enabled()) return;
  s.set(zmq::sockopt::curve_serverkey, c.server_public_key);
  s.set(zmq::sockopt::curve_publickey, c.own.public_key);
  s.set(zmq::sockopt::curve_secretkey, c.own.secret_key);
}

// ---- ZAP --------------------------------------------------------------------

Result<std::unique_ptr<ZapAuthenticator>> ZapAuthenticator::start(zmq::context_t& ctx, std::set<std::string> allowed,
                                                                   std::string who) {
  zmq::socket_t socket(ctx, zmq::socket_type::rep);
  socket.set(zmq::sockopt::linger, 0);
  try {
    socket.bind(kZapEndpoint);
  } catch (const zmq::error_t& e) {
    return unavailable(fmt::format("cannot start the CURVE authenticator: {}", e.what()));
  }
  return std::unique_ptr<ZapAuthenticator>(new ZapAuthenticator(std::move(socket), std::move(allowed), std::move(who)));
}

ZapAuthenticator::ZapAuthenticator(zmq::socket_t socket, std::set<std::string> allowed, std::string who)
    : socket_(std::move(socket)), allowed_(std::move(allowed)), who_(std::move(who)) {
  thread_ = std::thread([this] { serve(); });
}

ZapAuthenticator::~ZapAuthenticator() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

void ZapAuthenticator::serve() {
  std::vector<zmq::message_t> request;
  while (!stop_.load()) {
    zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, std::chrono::milliseconds(100)) <= 0) continue;
    request.clear();
    if (!zmq::recv_multipart(socket_, std::back_inserter(request), zmq::recv_flags::dontwait)) continue;
    // RFC 27: version, request id, domain, address, identity, mechanism, credentials...
    std::string status = "400";
    std::string text = "malformed ZAP request";
    std::string key;
    std::string address = request.size() > 3 ? request[3].to_string() : "?";
    if (request.size() >= 7 && request[0].to_string() == "1.0" && request[5].to_string() == "CURVE" &&
        request[6].size() == 32) {
      char z85[kZ85KeyChars + 1] = {0};
      zmq_z85_encode(z85, static_cast<const uint8_t*>(request[6].data()), 32);
      key = z85;
      if (allowed_.count(key) != 0) {
        status = "200";
        text = "OK";
      } else {
        text = "key not allowed";
      }
    } else if (request.size() >= 6) {
      text = "only CURVE is accepted";
    }
    if (status == "200") {
      ++admitted_;
    } else {
      const uint64_t n = ++refused_;
      if (n <= 10 || n % 1000 == 0)  // bounded: a flood of handshakes cannot fill the log
        spdlog::warn("{}: refused a connection from {} ({}{}); {} refused so far", who_, address, text,
                     key.empty() ? "" : ", key " + key, n);
    }
    const std::string user = status == "200" ? key : std::string();
    std::array<zmq::const_buffer, 6> reply = {zmq::str_buffer("1.0"),
                                              zmq::buffer(request.size() > 1 ? request[1].data() : nullptr,
                                                          request.size() > 1 ? request[1].size() : 0),
                                              zmq::buffer(status),
                                              zmq::buffer(text),
                                              zmq::buffer(user),
                                              zmq::str_buffer("")};
    (void)zmq::send_multipart(socket_, reply, zmq::send_flags::dontwait);
  }
}

}  // namespace sps::net
