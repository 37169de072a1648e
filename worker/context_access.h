// Internal: builds a public sps::Context over a loaded config, and reads the
// config back out of one (the runtime and the tests' reference trainer).
#pragma once

#include "config/config.h"
#include "sps/worker.h"

namespace sps {

struct ContextAccess {
  static Context make(const config::Config& cfg, const Dataset* train = nullptr);
  static const config::Config& config(const Context& context);
};

}  // namespace sps
