// sps-server: one shard of the parameter vector.
#include <iostream>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "common/process.h"
#include "config/cli.h"
#include "server/server.h"

int main(int argc, char** argv) {
  CLI::App app{"sps-server: owns one shard of the parameters, applies pushes and answers pulls.\n"
               "Connects to the scheduler at cluster.scheduler_host:cluster.scheduler_port."};
  sps::config::CliOptions opts;
  sps::config::add_config_options(app, opts);
  int rank = -1;
  app.add_option("--rank", rank, "Ask the scheduler for this shard rank (default: any free rank)")
      ->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);
  sps::config::Config cfg;
  if (!sps::config::load_or_report(opts, cfg, "sps-server")) return 2;
  if (opts.print_config) {
    std::cout << sps::config::to_json(cfg).dump(2) << "\n";
    return 0;
  }
  if (cfg.cluster.scheduler_port == 0) {
    std::cerr << "sps-server: cluster.scheduler_port is 0; pass the scheduler's port, e.g. --set "
                 "cluster.scheduler_port=$(cat runs/<name>/scheduler.port)\n";
    return 2;
  }
  spdlog::set_pattern("%H:%M:%S.%e %^%l%$ %v");
  spdlog::set_level(spdlog::level::from_str(cfg.run.log_level));
  sps::install_stop_signal_handlers();
  if (cfg.cluster.keep_freed_memory) sps::keep_freed_memory_for_reuse();
  try {
    zmq::context_t ctx(1);
    sps::server::Server server(cfg, ctx, rank);
    return server.run();
  } catch (const std::exception& e) {
    std::cerr << "sps-server: " << e.what() << "\n";
    return 1;
  }
}
