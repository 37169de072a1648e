// sps-scheduler: the job's coordinator process.
#include <iostream>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "common/process.h"
#include "config/cli.h"
#include "scheduler/coordinator.h"

int main(int argc, char** argv) {
  CLI::App app{"sps-scheduler: registers servers and workers, assigns ranks and shards, runs barriers,\n"
               "watches heartbeats and ends the job. Writes <run>/scheduler.port and <run>/summary.json."};
  sps::config::CliOptions opts;
  sps::config::add_config_options(app, opts);
  CLI11_PARSE(app, argc, argv);
  sps::config::Config cfg;
  if (!sps::config::load_or_report(opts, cfg, "sps-scheduler")) return 2;
  if (opts.print_config) {
    std::cout << sps::config::to_json(cfg).dump(2) << "\n";
    return 0;
  }
  spdlog::set_pattern("%H:%M:%S.%e %^%l%$ %v");
  spdlog::set_level(spdlog::level::from_str(cfg.run.log_level));
  sps::install_stop_signal_handlers();
  try {
    zmq::context_t ctx(1);
    sps::scheduler::Coordinator coordinator(cfg, ctx);
    return coordinator.run();
  } catch (const std::exception& e) {
    std::cerr << "sps-scheduler: " << e.what() << "\n";
    return 1;
  }
}
