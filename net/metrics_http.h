// MetricsEndpoint: serves a Prometheus registry as text over HTTP (GET
// /metrics) with Boost.Beast, on a thread of its own, and any JSON documents
// its owner publishes (the scheduler's GET /status).
//
// Threading: the endpoint's thread only calls registry->Collect(), which
// prometheus-cpp makes safe against the owner's thread updating counters,
// gauges and histograms at the same time, and reads published documents
// under a mutex. Bounded: requests over 8 KiB, or slower than 5 s, are
// dropped; at most 64 connections at once.
#pragma once

#include <memory>
#include <string>

#include <prometheus/registry.h>

#include "common/status.h"

namespace sps::net {

class MetricsEndpoint {
 public:
  // Binds host:port (0 = any free port) and starts serving; fails with the
  // address named when it cannot bind.
  static Result<std::unique_ptr<MetricsEndpoint>> start(const std::string& host, int port,
                                                        std::shared_ptr<prometheus::Registry> registry);
  ~MetricsEndpoint();  // stops serving and joins the thread
  MetricsEndpoint(const MetricsEndpoint&) = delete;
  MetricsEndpoint& operator=(const MetricsEndpoint&) = delete;

  // Serves `json` at GET `path` (e.g. "/status") from now on, replacing what
  // was published there before. Safe from any thread.
  void publish(const std::string& path, std::string json);

  int port() const;
  // "http://host:port/metrics"
  std::string url() const;

 private:
  struct Impl;
  explicit MetricsEndpoint(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace sps::net
