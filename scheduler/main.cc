// sps-scheduler: the job's coordinator process.
#include <iostream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "common/process.h"
#include "common/snapshot.h"
#include "config/cli.h"
#include "scheduler/coordinator.h"

int main(int argc, char** argv) {
  CLI::App app{"sps-scheduler: registers servers and workers, assigns ranks and shards, runs barriers,\n"
               "watches heartbeats and ends the job. Writes <run>/scheduler.port and <run>/summary.json."};
  sps::config::CliOptions opts;
  sps::config::add_config_options(app, opts);
  bool print_resume_point = false;
  app.add_flag("--print-resume-point", print_resume_point,
               "Print the step --resume would start from as JSON and exit (status 3 when there is none)");
  CLI11_PARSE(app, argc, argv);
  sps::config::Config cfg;
  if (!sps::config::load_or_report(opts, cfg, "sps-scheduler")) return 2;
  if (print_resume_point) {
    // What sps-launch --max-restarts asks before a restart: resume, or start over.
    auto point = sps::find_resume_point(cfg.checkpoint_dir(), static_cast<uint32_t>(cfg.cluster.num_servers),
                                        static_cast<uint32_t>(cfg.cluster.num_workers));
    if (!point.ok()) {
      std::cerr << "sps-scheduler: no resume point: " << point.status().message() << "\n";
      return 3;
    }
    std::cout << nlohmann::json{{"step", point->step}, {"dir", cfg.checkpoint_dir()}, {"skipped", point->skipped}}.dump()
              << "\n";
    return 0;
  }
  if (opts.print_config) {
    for (const auto& w : sps::config::ineffective_keys(cfg)) std::cerr << "sps-scheduler: config warning: " << w << "\n";
    std::cout << sps::config::to_json(cfg).dump(2) << "\n";
    return 0;
  }
  spdlog::set_pattern("%H:%M:%S.%e %^%l%$ %v");
  spdlog::set_level(spdlog::level::from_str(cfg.run.log_level));
  for (const auto& w : sps::config::ineffective_keys(cfg)) spdlog::warn("scheduler: config: {}", w);
  if (cfg.checkpoint.resume) {
    // Fail before anyone registers; every node finds the same step.
    auto point = sps::find_resume_point(cfg.checkpoint_dir(), static_cast<uint32_t>(cfg.cluster.num_servers),
                                        static_cast<uint32_t>(cfg.cluster.num_workers));
    if (!point.ok()) {
      std::cerr << "sps-scheduler: cannot resume: " << point.status().message() << "\n";
      return 2;
    }
    for (const auto& s : point->skipped) spdlog::warn("scheduler: skipped a snapshot: {}", s);
    spdlog::info("scheduler: resuming the job from step {} ({})", point->step, cfg.checkpoint_dir());
  } else if (cfg.checkpoint.enabled()) {
    if (const size_t old = sps::remove_snapshots(cfg.checkpoint_dir()); old > 0)
      spdlog::warn("scheduler: removed {} snapshot step(s) of an earlier run from {} (a fresh start)", old,
                   cfg.checkpoint_dir());
  }
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
