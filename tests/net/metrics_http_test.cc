// MetricsEndpoint over a real loopback socket: /metrics, published JSON
// documents (the scheduler's /status), and the answers to everything else.
#include <gtest/gtest.h>

#include <string>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <prometheus/counter.h>

#include "net/metrics_http.h"

namespace sps::net {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
using tcp = boost::asio::ip::tcp;

struct Reply {
  unsigned status = 0;
  std::string content_type;
  std::string body;
};

Reply request(int port, http::verb method, const std::string& target) {
  boost::asio::io_context io;
  tcp::resolver resolver(io);
  beast::tcp_stream stream(io);
  stream.connect(resolver.resolve("127.0.0.1", std::to_string(port)));
  http::request<http::string_body> req(method, target, 11);
  req.set(http::field::host, "127.0.0.1");
  http::write(stream, req);
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.skip(method == http::verb::head);  // a HEAD answer has a length but no body
  http::read(stream, buffer, parser);
  const auto& res = parser.get();
  beast::error_code ignored;
  stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
  return {res.result_int(), std::string(res[http::field::content_type]), res.body()};
}

class MetricsEndpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    registry_ = std::make_shared<prometheus::Registry>();
    auto& family = prometheus::BuildCounter().Name("sps_test_events_total").Help("test").Register(*registry_);
    family.Add({}).Increment(3);
    auto ep = MetricsEndpoint::start("127.0.0.1", 0, registry_);
    ASSERT_TRUE(ep.ok()) << ep.status().to_string();
    endpoint_ = std::move(ep).value();
  }
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<MetricsEndpoint> endpoint_;
};

TEST_F(MetricsEndpointTest, ServesTheRegistryAsPrometheusText) {
  const Reply r = request(endpoint_->port(), http::verb::get, "/metrics");
  EXPECT_EQ(r.status, 200u);
  EXPECT_NE(r.content_type.find("text/plain"), std::string::npos);
  EXPECT_NE(r.body.find("sps_test_events_total 3"), std::string::npos) << r.body;
  EXPECT_EQ(request(endpoint_->port(), http::verb::get, "/metrics?x=1").status, 200u);
}

TEST_F(MetricsEndpointTest, ServesThePublishedDocumentAndItsNewestVersion) {
  Reply r = request(endpoint_->port(), http::verb::get, "/status");
  EXPECT_EQ(r.status, 404u);
  EXPECT_EQ(r.body, "not found: this endpoint serves /metrics\n");

  endpoint_->publish("/status", R"({"state": "training"})");
  r = request(endpoint_->port(), http::verb::get, "/status");
  EXPECT_EQ(r.status, 200u);
  EXPECT_EQ(r.content_type, "application/json");
  EXPECT_EQ(r.body, R"({"state": "training"})");
  EXPECT_EQ(request(endpoint_->port(), http::verb::get, "/status?pretty").body, R"({"state": "training"})");

  endpoint_->publish("/status", R"({"state": "finished"})");
  EXPECT_EQ(request(endpoint_->port(), http::verb::get, "/status").body, R"({"state": "finished"})");
  // HEAD: the headers only.
  r = request(endpoint_->port(), http::verb::head, "/status");
  EXPECT_EQ(r.status, 200u);
  EXPECT_EQ(r.body, "");
  // Unknown paths list what there is; only GET and HEAD are answered.
  r = request(endpoint_->port(), http::verb::get, "/statusx");
  EXPECT_EQ(r.status, 404u);
  EXPECT_EQ(r.body, "not found: this endpoint serves /metrics, /status\n");
  EXPECT_EQ(request(endpoint_->port(), http::verb::post, "/status").status, 405u);
}

}  // namespace
}  // namespace sps::net
