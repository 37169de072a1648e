// sps::worker_main: the command line of every worker program (sps-worker and
// user programs built on the public API).
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "common/process.h"
#include "config/cli.h"
#include "sps/worker.h"

namespace sps {

namespace {
std::string program_name(int argc, char** argv) {
  std::string program = argc > 0 ? argv[0] : "sps-worker";
  if (const auto slash = program.rfind('/'); slash != std::string::npos) program = program.substr(slash + 1);
  return program;
}
}  // namespace

WorkerCommandLine parse_worker_command_line(int argc, char** argv, const Registry& registry) {
  const std::string program = program_name(argc, argv);
  CLI::App app{program + ": one data-parallel worker of an sps job. Trains model.name on data.name (its\n"
               "partition), pushing compressed updates to the servers; connects to the scheduler at\n"
               "cluster.scheduler_host:cluster.scheduler_port. Usually started by sps-launch."};
  config::CliOptions opts;
  config::add_config_options(app, opts);
  int rank = -1;
  app.add_option("--rank", rank, "Ask the scheduler for this worker rank (default: any free rank)")
      ->check(CLI::NonNegativeNumber);
  bool list = false;
  app.add_flag("--list-models", list, "List the models and datasets this program has registered, then exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return {std::nullopt, app.exit(e)};
  }
  if (list) {
    std::cout << "models:";
    for (const auto& m : registry.model_names()) std::cout << " " << m;
    std::cout << "\ndatasets:";
    for (const auto& d : registry.dataset_names()) std::cout << " " << d;
    std::cout << std::endl;
    return {std::nullopt, 0};
  }
  config::Config cfg;
  if (!config::load_or_report(opts, cfg, program.c_str())) return {std::nullopt, 2};
  if (opts.print_config) {
    std::cout << config::to_json(cfg).dump(2) << std::endl;
    return {std::nullopt, 0};
  }
  if (!registry.has_model(cfg.model.name) || !registry.has_dataset(cfg.data.name)) {
    const bool model = !registry.has_model(cfg.model.name);
    std::cerr << program << ": config error: " << cfg.source << ": "
              << (model ? "model.name: no model '" + cfg.model.name : "data.name: no dataset '" + cfg.data.name)
              << "' is registered in this program (--list-models shows what is)\n";
    return {std::nullopt, 2};
  }
  if (cfg.cluster.scheduler_port == 0) {
    std::cerr << program << ": cluster.scheduler_port is 0; pass the scheduler's port with --set "
              << "cluster.scheduler_port=N (sps-launch does)\n";
    return {std::nullopt, 2};
  }
  spdlog::set_pattern("%H:%M:%S.%e %^%l%$ %v");
  spdlog::set_level(spdlog::level::from_str(cfg.run.log_level));
  if (cfg.cluster.keep_freed_memory) keep_freed_memory_for_reuse();
  return {WorkerOptions{.config_file = opts.config_path, .overrides = config::effective_overrides(opts), .rank = rank},
          0};
}

int worker_main(int argc, char** argv, const Registry& registry) {
  WorkerCommandLine command_line = parse_worker_command_line(argc, argv, registry);
  if (!command_line.options) return command_line.exit_code;
  install_stop_signal_handlers();
  try {
    Worker worker(std::move(*command_line.options));
    worker.run(registry);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << program_name(argc, argv) << ": " << e.what() << "\n";
    return stop_requested() ? 128 + stop_signal() : 1;
  }
}

}  // namespace sps
