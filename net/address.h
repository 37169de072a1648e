// Network addresses for jobs that span hosts: resolving configured host
// names once (with errors that name the config key and the host), finding
// the address a wildcard-bound process should advertise to its peers,
// binding inside a port range, and checking that a peer's TCP port answers
// before ZeroMQ's silent reconnect loop would hide that it does not.
//
// IPv4 only: ZeroMQ sockets here are created without ZMQ_IPV6.
#pragma once

#include <string>

#include <zmq.hpp>

#include "common/status.h"

namespace sps::net {

// True for addresses that mean "every interface" (0.0.0.0, *), which a
// process may bind to but a peer cannot connect to.
bool is_wildcard_host(const std::string& host);

// The dotted IPv4 address of `host` (an address or a name, resolved once
// via getaddrinfo). Wildcards come back as 0.0.0.0. `key` names the config
// key the host came from, for the error message.
Result<std::string> resolve_ipv4(const std::string& host, const std::string& key);

// The local IPv4 address this host uses to reach `peer_ip` (the source
// address the kernel's routing table picks; no packet is sent).
Result<std::string> route_source_ipv4(const std::string& peer_ip);

// The address peers should use to reach a process bound to `bind_ip`:
// `advertise_host` when set (resolved), else `bind_ip` unless it is a
// wildcard, else this host's address on the route to `scheduler_ip`.
Result<std::string> advertised_ipv4(const std::string& advertise_host, const std::string& bind_ip,
                                    const std::string& scheduler_ip);

// Binds `s` to tcp://ip:port for the first free port in [lo, hi], or to any
// free port when lo == 0. Returns the bound endpoint. A full or invalid
// range is an error naming the range.
Result<std::string> bind_tcp_in_range(zmq::socket_t& s, const std::string& ip, int lo, int hi);

// The host and port of "tcp://host:port".
struct TcpEndpoint {
  std::string host;
  int port = 0;
};
Result<TcpEndpoint> parse_tcp_endpoint(const std::string& endpoint);

// Waits until a TCP connection to ip:port succeeds (then closes it), trying
// again every 100 ms on refusal or timeout, for at most timeout_ms. The error
// names `what` and the address, and says what the last attempt got. Returns
// early, unavailable, once the process was asked to stop (stop_requested()).
Status wait_tcp_reachable(const std::string& ip, int port, int timeout_ms, const std::string& what);

// wait_tcp_reachable for the scheduler at ip:port; `configured_host` is
// cluster.scheduler_host as written, for the message.
Status wait_for_scheduler(const std::string& ip, int port, const std::string& configured_host, int timeout_ms);

// The error for a scheduler port that accepts connections but has not said
// a word in `waited_ms` (a wrong port, a proxy, or security.curve set on one
// side only).
std::string scheduler_never_answered(const std::string& ip, int port, const std::string& configured_host,
                                     double waited_ms);

}  // namespace sps::net
