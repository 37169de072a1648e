#include "net/metrics_http.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string_view>
#include <thread>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>
#include <prometheus/text_serializer.h>

namespace sps::net {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

// What the owner published, read by every session.
struct Documents {
  std::mutex mu;
  std::map<std::string, std::string, std::less<>> by_path;
};

constexpr auto kRequestTimeout = std::chrono::seconds(5);
constexpr size_t kMaxRequestBytes = 8 * 1024;
constexpr int kMaxConnections = 64;

// One connection: read requests, answer each, until the peer closes, a
// limit is hit or the endpoint stops.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, std::shared_ptr<prometheus::Registry> registry, std::shared_ptr<Documents> documents,
          std::atomic<int>& open)
      : stream_(std::move(socket)), registry_(std::move(registry)), documents_(std::move(documents)), open_(open) {
    ++open_;
  }
  ~Session() { --open_; }
  void start() { read(); }

 private:
  void read() {
    parser_.emplace();
    parser_->header_limit(kMaxRequestBytes);
    parser_->body_limit(kMaxRequestBytes);
    stream_.expires_after(kRequestTimeout);
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, size_t) { self->on_read(ec); });
  }

  void on_read(beast::error_code ec) {
    if (ec) return close();  // closed, timed out, too large or not HTTP
    const auto& req = parser_->get();
    auto res = std::make_shared<http::response<http::string_body>>();
    res->version(req.version());
    res->set(http::field::server, "sps");
    res->keep_alive(req.keep_alive());
    const beast::string_view target = req.target();
    const std::string_view path(target.data(), std::min(target.find('?'), target.size()));
    std::optional<std::string> document;
    {
      std::lock_guard lock(documents_->mu);
      if (auto it = documents_->by_path.find(path); it != documents_->by_path.end()) document = it->second;
    }
    if (req.method() != http::verb::get && req.method() != http::verb::head) {
      res->result(http::status::method_not_allowed);
      res->set(http::field::allow, "GET, HEAD");
      res->set(http::field::content_type, "text/plain");
      res->body() = "only GET and HEAD\n";
    } else if (path == "/metrics") {
      std::ostringstream text;
      prometheus::TextSerializer().Serialize(text, registry_->Collect());
      res->result(http::status::ok);
      res->set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
      res->body() = std::move(text).str();
    } else if (document) {
      res->result(http::status::ok);
      res->set(http::field::content_type, "application/json");
      res->body() = std::move(*document);
    } else {
      res->result(http::status::not_found);
      res->set(http::field::content_type, "text/plain");
      std::string paths = "/metrics";
      {
        std::lock_guard lock(documents_->mu);
        for (const auto& [p, _] : documents_->by_path) paths += ", " + p;
      }
      res->body() = fmt::format("not found: this endpoint serves {}\n", paths);
    }
    res->prepare_payload();
    if (req.method() == http::verb::head) res->body().clear();
    stream_.expires_after(kRequestTimeout);
    http::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code wec, size_t) {
      if (wec || !res->keep_alive()) return self->close();
      self->read();
    });
  }

  void close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<Documents> documents_;
  std::atomic<int>& open_;
};

}  // namespace

struct MetricsEndpoint::Impl {
  asio::io_context io{1};
  tcp::acceptor acceptor{io};
  std::shared_ptr<prometheus::Registry> registry;
  std::shared_ptr<Documents> documents = std::make_shared<Documents>();
  std::atomic<int> open{0};
  std::string host;
  int port = 0;
  std::thread thread;

  void accept() {
    acceptor.async_accept(asio::make_strand(io), [this](beast::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (!ec) {
        if (open.load() >= kMaxConnections) {
          beast::error_code ignored;
          socket.close(ignored);  // over the limit: refuse rather than queue
        } else {
          std::make_shared<Session>(std::move(socket), registry, documents, open)->start();
        }
      }
      accept();
    });
  }
};

MetricsEndpoint::MetricsEndpoint(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<MetricsEndpoint>> MetricsEndpoint::start(const std::string& host, int port,
                                                                std::shared_ptr<prometheus::Registry> registry) {
  auto impl = std::make_unique<Impl>();
  impl->registry = std::move(registry);
  impl->host = host;
  beast::error_code ec;
  const auto address = asio::ip::make_address(host, ec);
  if (ec) return invalid_argument(fmt::format("metrics: '{}' is not an IP address: {}", host, ec.message()));
  const tcp::endpoint where(address, static_cast<unsigned short>(port));
  impl->acceptor.open(where.protocol(), ec);
  if (!ec) impl->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(where, ec);
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return unavailable(fmt::format("metrics: cannot listen on {}:{}: {}", host, port, ec.message()));
  impl->port = impl->acceptor.local_endpoint().port();
  impl->accept();
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->io.run(); });
  return std::unique_ptr<MetricsEndpoint>(new MetricsEndpoint(std::move(impl)));
}

MetricsEndpoint::~MetricsEndpoint() {
  impl_->io.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

void MetricsEndpoint::publish(const std::string& path, std::string json) {
  std::lock_guard lock(impl_->documents->mu);
  impl_->documents->by_path[path] = std::move(json);
}

int MetricsEndpoint::port() const { return impl_->port; }

std::string MetricsEndpoint::url() const {
  const bool v6 = impl_->host.find(':') != std::string::npos;
  return v6 ? fmt::format("http://[{}]:{}/metrics", impl_->host, impl_->port)
            : fmt::format("http://{}:{}/metrics", impl_->host, impl_->port);
}

}  // namespace sps::net
