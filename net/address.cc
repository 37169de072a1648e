#include "net/address.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "common/process.h"

namespace sps::net {

namespace {

// Closes a file descriptor on every path out.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

Result<sockaddr_in> ipv4_sockaddr(const std::string& ip, int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, ip.c_str(), &a.sin_addr) != 1) return invalid_argument(fmt::format("'{}' is not an IPv4 address", ip));
  return a;
}

std::string ipv4_text(const in_addr& a) {
  char buf[INET_ADDRSTRLEN] = {0};
  inet_ntop(AF_INET, &a, buf, sizeof(buf));
  return buf;
}

// One connection attempt with a deadline; 0 on success, else the errno.
int try_connect(const sockaddr_in& a, int timeout_ms) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return errno;
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&a), sizeof(a)) == 0) return 0;
  if (errno != EINPROGRESS) return errno;
  pollfd p{fd.get(), POLLOUT, 0};
  const int n = ::poll(&p, 1, timeout_ms);
  if (n == 0) return ETIMEDOUT;
  if (n < 0) return errno;
  int err = 0;
  socklen_t len = sizeof(err);
  if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) return errno;
  return err;
}

}  // namespace

bool is_wildcard_host(const std::string& host) { return host == "0.0.0.0" || host == "*" || host.empty(); }

Result<std::string> resolve_ipv4(const std::string& host, const std::string& key) {
  if (is_wildcard_host(host)) return std::string("0.0.0.0");
  in_addr literal{};
  if (inet_pton(AF_INET, host.c_str(), &literal) == 1) return host;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &found);
  if (rc != 0 || found == nullptr)
    return unavailable(fmt::format("{}: cannot resolve host '{}': {}", key, host,
                                   rc == EAI_SYSTEM ? std::strerror(errno) : gai_strerror(rc)));
  const std::string ip = ipv4_text(reinterpret_cast<const sockaddr_in*>(found->ai_addr)->sin_addr);
  ::freeaddrinfo(found);
  return ip;
}

Result<std::string> route_source_ipv4(const std::string& peer_ip) {
  // connect() on a UDP socket only consults the routing table; nothing is sent.
  auto peer = ipv4_sockaddr(peer_ip, 9);
  if (!peer.ok()) return peer.status();
  Fd fd(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) return unavailable(fmt::format("socket(): {}", std::strerror(errno)));
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&*peer), sizeof(*peer)) != 0)
    return unavailable(fmt::format("no route to {}: {}", peer_ip, std::strerror(errno)));
  sockaddr_in local{};
  socklen_t len = sizeof(local);
  if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&local), &len) != 0)
    return unavailable(fmt::format("getsockname(): {}", std::strerror(errno)));
  return ipv4_text(local.sin_addr);
}

Result<std::string> advertised_ipv4(const std::string& advertise_host, const std::string& bind_ip,
                                    const std::string& scheduler_ip) {
  if (!advertise_host.empty()) {
    auto ip = resolve_ipv4(advertise_host, "cluster.advertise_host");
    if (!ip.ok()) return ip.status();
    if (is_wildcard_host(*ip))
      return invalid_argument(fmt::format("cluster.advertise_host: '{}' is a wildcard, which peers cannot connect to",
                                          advertise_host));
    return ip;
  }
  if (!is_wildcard_host(bind_ip)) return bind_ip;
  auto ip = route_source_ipv4(scheduler_ip);
  if (!ip.ok())
    return ip.status().with_context(fmt::format(
        "cluster.bind_host is a wildcard, so this process advertises its address on the route to the scheduler "
        "({}); set cluster.advertise_host instead",
        scheduler_ip));
  return ip;
}

Result<std::string> bind_tcp_in_range(zmq::socket_t& s, const std::string& ip, int lo, int hi) {
  if (lo == 0) {
    try {
      s.bind(fmt::format("tcp://{}:*", ip));
    } catch (const zmq::error_t& e) {
      return unavailable(fmt::format("cannot bind to {}: {}", ip, e.what()));
    }
    return s.get(zmq::sockopt::last_endpoint);
  }
  if (lo < 1 || hi > 65535 || hi < lo)
    return invalid_argument(fmt::format("port range {}-{} is not within 1-65535", lo, hi));
  std::string last_error;
  for (int port = lo; port <= hi; ++port) {
    try {
      s.bind(fmt::format("tcp://{}:{}", ip, port));
      return s.get(zmq::sockopt::last_endpoint);
    } catch (const zmq::error_t& e) {
      if (e.num() != EADDRINUSE) return unavailable(fmt::format("cannot bind to {}:{}: {}", ip, port, e.what()));
      last_error = e.what();
    }
  }
  return resource_exhausted(
      fmt::format("no free port in cluster.port_min..port_max ({}-{}) on {}: {}", lo, hi, ip, last_error));
}

Result<TcpEndpoint> parse_tcp_endpoint(const std::string& endpoint) {
  constexpr std::string_view kScheme = "tcp://";
  const auto colon = endpoint.rfind(':');
  if (endpoint.rfind(kScheme, 0) != 0 || colon == std::string::npos || colon < kScheme.size())
    return invalid_argument(fmt::format("'{}' is not a tcp://host:port endpoint", endpoint));
  TcpEndpoint ep;
  ep.host = endpoint.substr(kScheme.size(), colon - kScheme.size());
  const std::string port = endpoint.substr(colon + 1);
  if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos)
    return invalid_argument(fmt::format("'{}' has no valid port", endpoint));
  ep.port = std::stoi(port);
  if (ep.port < 1 || ep.port > 65535) return invalid_argument(fmt::format("'{}' has no valid port", endpoint));
  return ep;
}

Status wait_tcp_reachable(const std::string& ip, int port, int timeout_ms, const std::string& what) {
  auto a = ipv4_sockaddr(ip, port);
  if (!a.ok()) return a.status().with_context(what);
  if (is_wildcard_host(ip))
    return invalid_argument(fmt::format("{} at {}:{}: a wildcard address cannot be connected to", what, ip, port));
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  int err = 0;
  while (true) {
    // A node told to stop (SIGTERM from a dying launcher, Ctrl-C) must not
    // wait out the whole timeout for a scheduler that is gone too.
    if (stop_requested())
      return unavailable(fmt::format("stopped by signal {} while waiting for {} at {}:{}", stop_signal(), what, ip,
                                     port));
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    err = try_connect(*a, static_cast<int>(std::clamp<int64_t>(left, 1, 1000)));
    if (err == 0) return {};
    // Refused: not listening yet (a launcher starts every role at once).
    // Unreachable or timed out: a link may still be coming up. Both retry.
    if (Clock::now() + std::chrono::milliseconds(100) >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return unavailable(fmt::format("cannot reach {} at {}:{} within {} ms (last attempt: {})", what, ip, port, timeout_ms,
                                 std::strerror(err)));
}

Status wait_for_scheduler(const std::string& ip, int port, const std::string& configured_host, int timeout_ms) {
  return wait_tcp_reachable(
      ip, port, timeout_ms,
      fmt::format("the scheduler (cluster.scheduler_host '{}', cluster.scheduler_port)", configured_host));
}

std::string scheduler_never_answered(const std::string& ip, int port, const std::string& configured_host,
                                     double waited_ms) {
  return fmt::format(
      "no answer from the scheduler at {}:{} (cluster.scheduler_host '{}') within {:.0f} ms "
      "(cluster.connect_timeout_ms): the port accepts connections but nothing answers (a wrong address or port, or "
      "security.curve set on one side only)",
      ip, port, configured_host, waited_ms);
}

}  // namespace sps::net
