// The Prometheus metrics of one server (metrics.enabled): counters and
// gauges mirrored from ServerStats once per loop tick, histograms observed
// as pushes are applied and pulls answered. Owned by the server's loop
// thread; the HTTP endpoint's thread only reads the registry.
#pragma once

#include <memory>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "common/status.h"
#include "config/config.h"
#include "net/metrics_http.h"

namespace sps::server {

struct ServerStats;

struct ServerGauges {
  uint64_t version = 0;
  size_t pending_pulls = 0;  // pulls held back by the consistency policy
  size_t early_messages = 0;  // data messages queued before the assignment
  uint32_t live_workers = 0;
  uint64_t min_clock = 0;
};

class ServerMetrics {
 public:
  // Starts the endpoint for shard `rank` (port per metrics.port) and writes
  // its URL to <run>/metrics-server-<rank>.url.
  static Result<std::unique_ptr<ServerMetrics>> start(const config::Config& cfg, uint32_t rank);

  void observe_staleness(uint64_t versions) { staleness_->Observe(static_cast<double>(versions)); }
  void observe_pull_wait(double seconds) { pull_wait_->Observe(seconds); }
  // Brings counters and gauges up to date.
  void update(const ServerStats& stats, const ServerGauges& gauges);
  const std::string& url() const { return url_; }

 private:
  ServerMetrics() = default;
  std::shared_ptr<prometheus::Registry> registry_ = std::make_shared<prometheus::Registry>();
  std::unique_ptr<net::MetricsEndpoint> endpoint_;
  std::string url_;
  prometheus::Counter* pushes_applied_ = nullptr;
  prometheus::Counter* pushes_rejected_ = nullptr;
  prometheus::Counter* pushes_refused_stale_ = nullptr;
  prometheus::Counter* malformed_ = nullptr;
  prometheus::Counter* pulls_ = nullptr;
  prometheus::Counter* sparse_pulls_ = nullptr;
  prometheus::Counter* bytes_in_ = nullptr;
  prometheus::Counter* bytes_out_ = nullptr;
  prometheus::Counter* apply_seconds_ = nullptr;
  prometheus::Counter* snapshots_ = nullptr;
  prometheus::Counter* publishes_ = nullptr;
  prometheus::Counter* published_keys_ = nullptr;
  prometheus::Counter* publish_keys_read_ = nullptr;
  prometheus::Counter* publish_seconds_ = nullptr;
  prometheus::Gauge* owed_norm_ = nullptr;
  prometheus::Gauge* version_ = nullptr;
  prometheus::Gauge* pending_pulls_ = nullptr;
  prometheus::Gauge* early_ = nullptr;
  prometheus::Gauge* live_workers_ = nullptr;
  prometheus::Gauge* min_clock_ = nullptr;
  prometheus::Histogram* staleness_ = nullptr;
  prometheus::Histogram* pull_wait_ = nullptr;
};

}  // namespace sps::server
