// sps-worker: one data-parallel worker process.
#include <iostream>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "common/process.h"
#include "config/cli.h"
#include "worker/worker.h"

int main(int argc, char** argv) {
  CLI::App app{"sps-worker: trains the configured model on its partition of the data, pushing compressed\n"
               "updates to the servers. Connects to the scheduler at cluster.scheduler_host:cluster.scheduler_port."};
  sps::config::CliOptions opts;
  sps::config::add_config_options(app, opts);
  int rank = -1;
  app.add_option("--rank", rank, "Ask the scheduler for this worker rank (default: any free rank)")
      ->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);
  sps::config::Config cfg;
  if (!sps::config::load_or_report(opts, cfg, "sps-worker")) return 2;
  if (opts.print_config) {
    std::cout << sps::config::to_json(cfg).dump(2) << "\n";
    return 0;
  }
  if (cfg.cluster.scheduler_port == 0) {
    std::cerr << "sps-worker: cluster.scheduler_port is 0; pass the scheduler's port with --set "
                 "cluster.scheduler_port=N\n";
    return 2;
  }
  spdlog::set_pattern("%H:%M:%S.%e %^%l%$ %v");
  spdlog::set_level(spdlog::level::from_str(cfg.run.log_level));
  sps::install_stop_signal_handlers();
  try {
    zmq::context_t ctx(1);
    sps::worker::Worker worker(cfg, rank);
    const sps::Status s = worker.train(ctx);
    if (!s.ok()) {
      std::cerr << "sps-worker: " << s.to_string() << "\n";
      return sps::stop_requested() ? 128 + sps::stop_signal() : 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "sps-worker: " << e.what() << "\n";
    return 1;
  }
}
