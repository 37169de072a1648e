#include "common/jsonl.h"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <utility>

#include <fmt/format.h>

namespace sps {

JsonlWriter::~JsonlWriter() {
  if (file_ != nullptr) std::fclose(file_);
}

JsonlWriter::JsonlWriter(JsonlWriter&& other) noexcept
    : file_(std::exchange(other.file_, nullptr)), path_(std::move(other.path_)) {}

JsonlWriter& JsonlWriter::operator=(JsonlWriter&& other) noexcept {
  if (this != &other) {
    if (file_ != nullptr) std::fclose(file_);
    file_ = std::exchange(other.file_, nullptr);
    path_ = std::move(other.path_);
  }
  return *this;
}

Result<JsonlWriter> JsonlWriter::open(const std::string& path, bool append) {
  std::error_code ec;
  const auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  if (ec) return unavailable(fmt::format("cannot create folder {}: {}", parent.string(), ec.message()));
  JsonlWriter w;
  w.file_ = std::fopen(path.c_str(), append ? "a" : "w");
  if (w.file_ == nullptr) return unavailable(fmt::format("cannot open {}: {}", path, std::strerror(errno)));
  w.path_ = path;
  return w;
}

void JsonlWriter::write(nlohmann::json line) {
  if (file_ == nullptr) return;
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  line["t"] = std::chrono::duration<double>(now).count();
  const std::string s = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::fwrite(s.data(), 1, s.size(), file_);
  std::fputc('\n', file_);
  std::fflush(file_);
}

}  // namespace sps
