// Shared command-line handling for every sps binary: --config FILE,
// repeatable --set key.path=value, and --print-config (effective config as
// JSON, then exit). Each binary adds its own flags on top.
#pragma once

#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "config/config.h"

namespace sps::config {

struct CliOptions {
  std::string config_path;
  std::vector<std::string> overrides;
  bool print_config = false;
  bool resume = false;
};

inline void add_config_options(CLI::App& app, CliOptions& o) {
  app.add_option("-c,--config", o.config_path, "Job config (YAML); see docs/config.md")->check(CLI::ExistingFile);
  app.add_option("--set", o.overrides, "Override a config key: --set training.lr=0.05 (repeatable)")
      ->allow_extra_args(false);
  app.add_flag("--print-config", o.print_config, "Print the effective config as JSON and exit");
  app.add_flag("--resume", o.resume,
               "Start from the newest complete snapshot in checkpoint.dir (sets checkpoint.resume=true)");
}

// The --set overrides plus what other flags imply (--resume).
inline std::vector<std::string> effective_overrides(const CliOptions& o) {
  std::vector<std::string> overrides = o.overrides;
  if (o.resume) overrides.push_back("checkpoint.resume=true");
  return overrides;
}

// Loads the config; prints the error and returns nullopt-like false on failure.
inline bool load_or_report(const CliOptions& o, Config& out, const char* program) {
  auto r = load(o.config_path, effective_overrides(o));
  if (!r.ok()) {
    std::cerr << program << ": config error: " << r.status().message() << "\n";
    return false;
  }
  out = std::move(r).value();
  return true;
}

}  // namespace sps::config
