// JsonlWriter: one JSON object per line, appended to a run-folder log file.
//
// Every process writes its events (steps, pushes, pulls, errors) through one
// writer; the experiment scripts and tests read the lines back. Not
// thread-safe: each process owns its writer on its one loop thread.
#pragma once

#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace sps {

class JsonlWriter {
 public:
  JsonlWriter() = default;  // a closed writer drops every line
  ~JsonlWriter();
  JsonlWriter(const JsonlWriter&) = delete;
  JsonlWriter& operator=(const JsonlWriter&) = delete;
  JsonlWriter(JsonlWriter&& other) noexcept;
  JsonlWriter& operator=(JsonlWriter&& other) noexcept;

  // Creates parent folders and truncates `path`, or appends to it (a
  // resumed run continues its logs).
  static Result<JsonlWriter> open(const std::string& path, bool append = false);

  // Adds "t" (seconds since the Unix epoch) and writes one line. Lines are
  // flushed so a killed process leaves complete lines behind.
  void write(nlohmann::json line);
  bool is_open() const { return file_ != nullptr; }
  const std::string& path() const { return path_; }

 private:
  std::FILE* file_ = nullptr;
  std::string path_;
};

}  // namespace sps
