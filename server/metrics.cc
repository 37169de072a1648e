#include "server/metrics.h"

#include <fstream>

#include <fmt/format.h>

#include "server/server.h"

namespace sps::server {

namespace {

prometheus::Counter& counter(prometheus::Registry& r, const std::string& name, const std::string& help,
                             const std::string& shard) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r).Add({{"shard", shard}});
}
prometheus::Gauge& gauge(prometheus::Registry& r, const std::string& name, const std::string& help,
                         const std::string& shard) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r).Add({{"shard", shard}});
}
// Counters only go up: add the difference to the stats' running total.
void set_total(prometheus::Counter& c, double total) {
  if (total > c.Value()) c.Increment(total - c.Value());
}

}  // namespace

Result<std::unique_ptr<ServerMetrics>> ServerMetrics::start(const config::Config& cfg, uint32_t rank) {
  std::unique_ptr<ServerMetrics> m(new ServerMetrics());
  auto& r = *m->registry_;
  const std::string s = std::to_string(rank);
  m->pushes_applied_ = &counter(r, "sps_server_pushes_applied_total", "Pushes applied to the shard", s);
  m->pushes_rejected_ =
      &counter(r, "sps_server_pushes_rejected_total", "Well-formed pushes the consistency policy refused", s);
  m->pushes_refused_stale_ = &counter(r, "sps_server_pushes_refused_stale_total",
                                      "Pushes refused as staler than consistency.max_push_staleness", s);
  m->malformed_ = &counter(r, "sps_server_malformed_messages_total", "Messages dropped because they failed validation", s);
  m->pulls_ = &counter(r, "sps_server_pulls_answered_total", "Pulls answered", s);
  m->sparse_pulls_ = &counter(r, "sps_server_sparse_pulls_total", "Pulls answered with only the changed keys", s);
  m->bytes_in_ = &counter(r, "sps_server_received_bytes_total", "Protocol bytes received on the data socket", s);
  m->bytes_out_ = &counter(r, "sps_server_sent_bytes_total", "Protocol bytes sent on the data socket", s);
  m->apply_seconds_ = &counter(r, "sps_server_apply_seconds_total", "Time spent applying pushes", s);
  m->snapshots_ = &counter(r, "sps_server_snapshots_total", "Snapshots of the shard written", s);
  m->publishes_ = &counter(r, "sps_server_publishes_total", "Compressed pulls: publishes of the pulled copy", s);
  m->published_keys_ = &counter(r, "sps_server_published_keys_total", "Compressed pulls: keys the publishes sent", s);
  m->publish_keys_read_ = &counter(r, "sps_server_publish_keys_read_total",
                                   "Compressed pulls: keys the publishes read (the shard, or the keys that may owe)", s);
  m->publish_seconds_ = &counter(r, "sps_server_publish_seconds_total", "Compressed pulls: time spent publishing", s);
  m->owed_norm_ = &gauge(r, "sps_server_downlink_owed_norm",
                         "Compressed pulls: ||x - x_hat|| after the last publish (what the workers' copy owes)", s);
  m->version_ = &gauge(r, "sps_server_version", "Shard version (updates applied)", s);
  m->pending_pulls_ = &gauge(r, "sps_server_pending_pulls", "Pulls waiting for the consistency policy (queue depth)", s);
  m->early_ = &gauge(r, "sps_server_early_messages", "Data messages queued before the shard was assigned", s);
  m->live_workers_ = &gauge(r, "sps_server_live_workers", "Workers the shard still waits for", s);
  m->min_clock_ = &gauge(r, "sps_server_min_worker_clock", "Smallest push clock among live workers", s);
  m->staleness_ = &prometheus::BuildHistogram()
                       .Name("sps_server_push_staleness")
                       .Help("Staleness of applied pushes, in shard versions")
                       .Register(r)
                       .Add({{"shard", s}}, prometheus::Histogram::BucketBoundaries{0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024});
  m->pull_wait_ = &prometheus::BuildHistogram()
                       .Name("sps_server_pull_wait_seconds")
                       .Help("Time a pull was held back by the consistency policy")
                       .Register(r)
                       .Add({{"shard", s}}, prometheus::Histogram::BucketBoundaries{1e-5, 1e-4, 1e-3, 0.01, 0.1, 1, 10});
  const int port = cfg.metrics.port == 0 ? 0 : cfg.metrics.port + 1 + static_cast<int>(rank);
  if (port > 65535) return invalid_argument(fmt::format("metrics.port: server {} would need port {}", rank, port));
  auto endpoint = net::MetricsEndpoint::start(cfg.metrics.bind_host, port, m->registry_);
  if (!endpoint.ok()) return endpoint.status();
  m->endpoint_ = std::move(endpoint).value();
  m->url_ = m->endpoint_->url();
  const std::string file = fmt::format("{}/metrics-server-{}.url", cfg.run_folder(), rank);
  std::ofstream(file) << m->url_ << "\n";
  return m;
}

void ServerMetrics::update(const ServerStats& stats, const ServerGauges& g) {
  set_total(*pushes_applied_, static_cast<double>(stats.pushes_applied));
  set_total(*pushes_rejected_, static_cast<double>(stats.pushes_rejected));
  set_total(*pushes_refused_stale_, static_cast<double>(stats.pushes_refused_stale));
  set_total(*malformed_, static_cast<double>(stats.malformed));
  set_total(*pulls_, static_cast<double>(stats.pulls_answered));
  set_total(*sparse_pulls_, static_cast<double>(stats.sparse_pulls));
  set_total(*bytes_in_, static_cast<double>(stats.bytes_in));
  set_total(*bytes_out_, static_cast<double>(stats.bytes_out));
  set_total(*apply_seconds_, stats.apply_seconds);
  set_total(*snapshots_, static_cast<double>(stats.snapshots));
  set_total(*publishes_, static_cast<double>(stats.publishes));
  set_total(*published_keys_, static_cast<double>(stats.published_keys));
  set_total(*publish_keys_read_, static_cast<double>(stats.publish_keys_read));
  set_total(*publish_seconds_, stats.publish_seconds);
  owed_norm_->Set(stats.owed_norm);
  version_->Set(static_cast<double>(g.version));
  pending_pulls_->Set(static_cast<double>(g.pending_pulls));
  early_->Set(static_cast<double>(g.early_messages));
  live_workers_->Set(g.live_workers);
  min_clock_->Set(static_cast<double>(g.min_clock));
}

}  // namespace sps::server
