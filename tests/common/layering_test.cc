// Dependencies point one way (ARCHITECTURE.md): checks every #include of
// every module against the allowed module set.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <string>

namespace {

TEST(LayeringTest, ModulesIncludeOnlyWhatTheyMayDependOn) {
  const std::map<std::string, std::set<std::string>> allowed = {
      {"common", {"common"}},
      {"protocol", {"common", "protocol"}},
      {"kernels", {"common", "kernels"}},
      {"config", {"common", "config"}},
      {"net", {"common", "protocol", "net"}},
      {"scheduler", {"common", "protocol", "config", "net", "scheduler"}},
      // Servers compress what they publish to pulls (downlink.*) with the same
      // sparsifiers the workers use; kernels/ is a leaf, so this adds no cycle.
      {"server", {"common", "protocol", "kernels", "config", "net", "scheduler", "server"}},
      {"worker", {"common", "protocol", "kernels", "config", "net", "worker"}},
  };
  const std::regex include_re(R"re(#include "([a-z_]+)/)re");
  const std::filesystem::path root = SPS_SOURCE_DIR;
  int checked = 0;
  for (const auto& [module, deps] : allowed) {
    for (const auto& entry : std::filesystem::recursive_directory_iterator(root / module)) {
      const auto ext = entry.path().extension();
      if (ext != ".h" && ext != ".cc" && ext != ".cu") continue;
      std::ifstream f(entry.path());
      std::string line;
      while (std::getline(f, line)) {
        std::smatch m;
        if (!std::regex_search(line, m, include_re)) continue;
        const std::string dep = m[1];
        if (dep == "sps") continue;  // generated build config
        ++checked;
        EXPECT_TRUE(deps.count(dep)) << entry.path() << " includes " << dep << "/, which " << module
                                     << "/ must not depend on";
      }
    }
  }
  EXPECT_GT(checked, 20);
}

}  // namespace
