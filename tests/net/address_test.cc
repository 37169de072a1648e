// Addresses for multi-host jobs: resolution errors name the key and host,
// wildcards are never advertised, port ranges bind inside the range, and an
// unreachable peer is reported (with its address) instead of hanging.
#include "net/address.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>

#include <gtest/gtest.h>

namespace sps::net {
namespace {

TEST(AddressTest, ResolvesLiteralsNamesAndWildcards) {
  EXPECT_EQ(*resolve_ipv4("127.0.0.1", "k"), "127.0.0.1");
  EXPECT_EQ(*resolve_ipv4("10.1.2.3", "k"), "10.1.2.3");
  EXPECT_EQ(*resolve_ipv4("0.0.0.0", "k"), "0.0.0.0");
  EXPECT_EQ(*resolve_ipv4("*", "k"), "0.0.0.0");
  auto local = resolve_ipv4("localhost", "k");
  ASSERT_TRUE(local.ok()) << local.status().message();
  EXPECT_EQ(local->rfind("127.", 0), 0u) << *local;
}

TEST(AddressTest, AnUnknownHostFailsNamingTheKeyAndTheHost) {
  auto r = resolve_ipv4("no-such-host.invalid", "cluster.scheduler_host");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("cluster.scheduler_host"), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find("no-such-host.invalid"), std::string::npos) << r.status().message();
}

TEST(AddressTest, AWildcardBindAdvertisesTheRouteToTheScheduler) {
  EXPECT_TRUE(is_wildcard_host("0.0.0.0"));
  EXPECT_TRUE(is_wildcard_host("*"));
  EXPECT_FALSE(is_wildcard_host("127.0.0.1"));
  // A specific bind address is advertised as it is.
  EXPECT_EQ(*advertised_ipv4("", "127.0.0.5", "127.0.0.1"), "127.0.0.5");
  // A wildcard bind advertises the source address toward the scheduler.
  EXPECT_EQ(*advertised_ipv4("", "0.0.0.0", "127.0.0.1"), "127.0.0.1");
  EXPECT_EQ(*route_source_ipv4("127.0.0.1"), "127.0.0.1");
  // An explicit advertise_host wins, and must not be a wildcard itself.
  EXPECT_EQ(*advertised_ipv4("127.0.0.9", "0.0.0.0", "127.0.0.1"), "127.0.0.9");
  auto wild = advertised_ipv4("0.0.0.0", "0.0.0.0", "127.0.0.1");
  ASSERT_FALSE(wild.ok());
  EXPECT_NE(wild.status().message().find("cluster.advertise_host"), std::string::npos);
}

TEST(AddressTest, BindsInsideAPortRangeAndReportsAFullOne) {
  zmq::context_t ctx(1);
  // Find two adjacent free ports by binding a throwaway socket to any port.
  zmq::socket_t probe(ctx, zmq::socket_type::router);
  auto any = bind_tcp_in_range(probe, "127.0.0.1", 0, 0);
  ASSERT_TRUE(any.ok()) << any.status().message();
  const int taken = parse_tcp_endpoint(*any)->port;
  ASSERT_LT(taken, 65535);
  zmq::socket_t a(ctx, zmq::socket_type::router);
  a.set(zmq::sockopt::linger, 0);
  // The range starts at the taken port, so the bind must skip to the next.
  auto next = bind_tcp_in_range(a, "127.0.0.1", taken, taken + 1);
  if (!next.ok()) GTEST_SKIP() << "port " << taken + 1 << " is busy: " << next.status().message();
  EXPECT_EQ(parse_tcp_endpoint(*next)->port, taken + 1);
  zmq::socket_t b(ctx, zmq::socket_type::router);
  b.set(zmq::sockopt::linger, 0);
  auto full = bind_tcp_in_range(b, "127.0.0.1", taken, taken + 1);
  ASSERT_FALSE(full.ok());
  EXPECT_NE(full.status().message().find(std::to_string(taken)), std::string::npos) << full.status().message();
  auto bad = bind_tcp_in_range(b, "127.0.0.1", 10, 5);
  EXPECT_FALSE(bad.ok());
  probe.set(zmq::sockopt::linger, 0);
}

TEST(AddressTest, ParsesTcpEndpoints) {
  auto ep = parse_tcp_endpoint("tcp://10.0.0.2:4567");
  ASSERT_TRUE(ep.ok());
  EXPECT_EQ(ep->host, "10.0.0.2");
  EXPECT_EQ(ep->port, 4567);
  for (const char* bad : {"", "tcp://", "udp://1.2.3.4:5", "tcp://1.2.3.4", "tcp://1.2.3.4:", "tcp://1.2.3.4:x",
                          "tcp://1.2.3.4:70000", "tcp://1.2.3.4:0"})
    EXPECT_FALSE(parse_tcp_endpoint(bad).ok()) << bad;
}

TEST(AddressTest, AListeningPortIsReachable) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(::listen(fd, 4), 0);
  socklen_t len = sizeof(a);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  const Status s = wait_tcp_reachable("127.0.0.1", ntohs(a.sin_port), 1000, "the test listener");
  EXPECT_TRUE(s.ok()) << s.message();
  ::close(fd);
}

TEST(AddressTest, AClosedPortFailsWithinTheTimeoutNamingTheAddress) {
  // Bind then close: the port is (almost certainly) free and refuses.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  socklen_t len = sizeof(a);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  const int port = ntohs(a.sin_port);
  ::close(fd);
  const auto t0 = std::chrono::steady_clock::now();
  const Status s = wait_tcp_reachable("127.0.0.1", port, 500, "the scheduler");
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("the scheduler"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("127.0.0.1:" + std::to_string(port)), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("refused"), std::string::npos) << s.message();
  EXPECT_GE(waited, 0.3);  // it kept trying (a launcher may start the peer late)...
  EXPECT_LT(waited, 5.0);  // ...but gave up at its timeout
  EXPECT_FALSE(wait_tcp_reachable("0.0.0.0", port, 100, "x").ok());
}

}  // namespace
}  // namespace sps::net
