#include "common/snapshot.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>

namespace sps {

// Payloads are stored as the host's bytes; the format is little-endian.
static_assert(std::endian::native == std::endian::little, "snapshot files assume a little-endian host");

namespace {

constexpr char kMagic[8] = {'S', 'P', 'S', 'S', 'N', 'A', 'P', '1'};
constexpr uint32_t kFormat = 1;
constexpr size_t kMaxNameBytes = 256;

void put_raw(std::vector<std::byte>& out, const void* p, size_t n) {
  const auto* b = static_cast<const std::byte*>(p);
  out.insert(out.end(), b, b + n);
}
template <class T>
void put(std::vector<std::byte>& out, T v) {
  put_raw(out, &v, sizeof v);
}
template <class T>
T get(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// zlib's crc32 takes 32-bit lengths: feed it in chunks.
uint32_t crc_of(const std::byte* p, size_t n, uint32_t crc = 0) {
  uLong c = crc;
  while (n > 0) {
    const auto chunk = static_cast<uInt>(std::min<size_t>(n, 1u << 30));
    c = crc32(c, reinterpret_cast<const Bytef*>(p), chunk);
    p += chunk;
    n -= chunk;
  }
  return static_cast<uint32_t>(c);
}

Status write_all(int fd, const std::byte* p, size_t n, const std::string& path) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return unavailable(fmt::format("writing {}: {}", path, std::strerror(errno)));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return {};
}

}  // namespace

void SnapshotWriter::add_bytes(const std::string& name, std::span<const std::byte> bytes) {
  put<uint32_t>(body_, static_cast<uint32_t>(name.size()));
  put_raw(body_, name.data(), name.size());
  put<uint64_t>(body_, bytes.size());
  put_raw(body_, bytes.data(), bytes.size());
  ++sections_;
}
void SnapshotWriter::add_u64(const std::string& name, uint64_t v) { add_bytes(name, std::as_bytes(std::span(&v, 1))); }
void SnapshotWriter::add_f32(const std::string& name, std::span<const float> v) { add_bytes(name, std::as_bytes(v)); }
void SnapshotWriter::add_u64s(const std::string& name, std::span<const uint64_t> v) {
  add_bytes(name, std::as_bytes(v));
}

Status SnapshotWriter::write_atomic(const std::string& path) const {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path folder = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(folder, ec);
  if (ec) return unavailable(fmt::format("cannot create {}: {}", folder.string(), ec.message()));
  std::vector<std::byte> head;
  put_raw(head, kMagic, sizeof kMagic);
  put<uint32_t>(head, kFormat);
  put<uint32_t>(head, sections_);
  const uint32_t crc = crc_of(body_.data(), body_.size(), crc_of(head.data(), head.size()));
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return unavailable(fmt::format("cannot create {}: {}", tmp, std::strerror(errno)));
  Status s = write_all(fd, head.data(), head.size(), tmp);
  if (s.ok()) s = write_all(fd, body_.data(), body_.size(), tmp);
  if (s.ok()) s = write_all(fd, reinterpret_cast<const std::byte*>(&crc), sizeof crc, tmp);
  if (s.ok() && ::fsync(fd) != 0) s = unavailable(fmt::format("fsync {}: {}", tmp, std::strerror(errno)));
  ::close(fd);
  if (s.ok() && ::rename(tmp.c_str(), path.c_str()) != 0)
    s = unavailable(fmt::format("cannot rename {} to {}: {}", tmp, path, std::strerror(errno)));
  if (!s.ok()) {
    ::unlink(tmp.c_str());
    return s;
  }
  // The rename is durable only once the folder entry is.
  const int dir_fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
  return {};
}

Result<Snapshot> Snapshot::read(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return unavailable(fmt::format("cannot open snapshot {}", path));
  const auto size = static_cast<size_t>(f.tellg());
  std::vector<std::byte> bytes(size);
  f.seekg(0);
  f.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  if (!f) return unavailable(fmt::format("cannot read snapshot {}", path));
  return parse(std::move(bytes), path);
}

std::vector<std::string> Snapshot::section_names() const {
  std::vector<std::string> names;
  for (const auto& [name, where] : sections_) names.push_back(name);
  return names;
}

Result<Snapshot> Snapshot::parse(std::vector<std::byte> contents, const std::string& path) {
  Snapshot s;
  s.path_ = path;
  s.data_ = std::move(contents);
  const size_t size = s.data_.size();
  constexpr size_t kHead = sizeof kMagic + 8;
  if (size < kHead + 4) return malformed(fmt::format("snapshot {} is truncated ({} bytes)", path, size));
  if (std::memcmp(s.data_.data(), kMagic, sizeof kMagic) != 0)
    return malformed(fmt::format("{} is not an sps snapshot (bad magic)", path));
  const auto format = get<uint32_t>(s.data_.data() + 8);
  if (format != kFormat) return malformed(fmt::format("snapshot {} has format {}, expected {}", path, format, kFormat));
  const size_t body_end = size - 4;
  const auto stored_crc = get<uint32_t>(s.data_.data() + body_end);
  if (crc_of(s.data_.data(), body_end) != stored_crc)
    return malformed(fmt::format("snapshot {} is corrupted or truncated (checksum mismatch)", path));
  const auto count = get<uint32_t>(s.data_.data() + 12);
  size_t pos = kHead;
  for (uint32_t i = 0; i < count; ++i) {
    if (body_end - pos < 4) return malformed(fmt::format("snapshot {}: section {} runs past the end", path, i));
    const auto name_len = get<uint32_t>(s.data_.data() + pos);
    pos += 4;
    if (name_len > kMaxNameBytes || body_end - pos < name_len + 8)
      return malformed(fmt::format("snapshot {}: section {} runs past the end", path, i));
    std::string name(reinterpret_cast<const char*>(s.data_.data() + pos), name_len);
    pos += name_len;
    const auto bytes = get<uint64_t>(s.data_.data() + pos);
    pos += 8;
    if (bytes > body_end - pos) return malformed(fmt::format("snapshot {}: section '{}' runs past the end", path, name));
    if (!s.sections_.emplace(name, std::make_pair(pos, static_cast<size_t>(bytes))).second)
      return malformed(fmt::format("snapshot {}: section '{}' appears twice", path, name));
    pos += bytes;
  }
  if (pos != body_end) return malformed(fmt::format("snapshot {}: {} stray bytes after the sections", path, body_end - pos));
  return s;
}

Result<std::span<const std::byte>> Snapshot::section(const std::string& name) const {
  const auto it = sections_.find(name);
  if (it == sections_.end()) return malformed(fmt::format("snapshot {} has no section '{}'", path_, name));
  return std::span<const std::byte>(data_.data() + it->second.first, it->second.second);
}

Result<uint64_t> Snapshot::u64(const std::string& name) const {
  auto b = section(name);
  if (!b.ok()) return b.status();
  if (b->size() != 8) return malformed(fmt::format("snapshot {}: section '{}' is not one u64", path_, name));
  return get<uint64_t>(b->data());
}

Result<std::vector<float>> Snapshot::f32(const std::string& name) const {
  auto b = section(name);
  if (!b.ok()) return b.status();
  if (b->size() % 4 != 0) return malformed(fmt::format("snapshot {}: section '{}' is not float32s", path_, name));
  std::vector<float> v(b->size() / 4);
  if (!v.empty()) std::memcpy(v.data(), b->data(), b->size());
  return v;
}

Result<std::vector<uint64_t>> Snapshot::u64s(const std::string& name) const {
  auto b = section(name);
  if (!b.ok()) return b.status();
  if (b->size() % 8 != 0) return malformed(fmt::format("snapshot {}: section '{}' is not u64s", path_, name));
  std::vector<uint64_t> v(b->size() / 8);
  if (!v.empty()) std::memcpy(v.data(), b->data(), b->size());
  return v;
}

// ---- checkpoint folder ------------------------------------------------------

std::string snapshot_step_dir(const std::string& dir, uint64_t step) { return fmt::format("{}/step-{:012}", dir, step); }

std::string snapshot_path(const std::string& dir, uint64_t step, const std::string& role, uint32_t rank) {
  return fmt::format("{}/{}-{}.snap", snapshot_step_dir(dir, step), role, rank);
}

namespace {

// Steps with a folder in `dir`, newest first.
std::vector<uint64_t> steps_in(const std::string& dir) {
  namespace fs = std::filesystem;
  std::vector<uint64_t> steps;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (!e.is_directory() || name.size() != 17 || name.rfind("step-", 0) != 0) continue;
    if (!std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
    steps.push_back(std::stoull(name.substr(5)));
  }
  std::sort(steps.rbegin(), steps.rend());
  return steps;
}

}  // namespace

Result<ResumePoint> find_resume_point(const std::string& dir, uint32_t servers, uint32_t workers) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    return failed_precondition(fmt::format("no checkpoint folder {} (checkpoint.dir); nothing to resume from", dir));
  ResumePoint point;
  for (const uint64_t step : steps_in(dir)) {
    bool complete = true;
    for (uint32_t r = 0; r < servers && complete; ++r) {
      const std::string p = snapshot_path(dir, step, "server", r);
      if (!fs::exists(p, ec)) {
        point.skipped.push_back(fmt::format("step {}: {} is missing", step, p));
        complete = false;
      } else if (auto s = Snapshot::read(p); !s.ok()) {
        point.skipped.push_back(fmt::format("step {}: {}", step, s.status().message()));
        complete = false;
      }
    }
    for (uint32_t r = 0; r < workers && complete; ++r) {
      const std::string p = snapshot_path(dir, step, "worker", r);
      if (!fs::exists(p, ec)) continue;  // the worker was dead by then
      if (auto s = Snapshot::read(p); !s.ok()) {
        point.skipped.push_back(fmt::format("step {}: {}", step, s.status().message()));
        complete = false;
      }
    }
    if (complete) {
      point.step = step;
      return point;
    }
  }
  std::string why = fmt::format("no complete snapshot for {} server(s) in {}", servers, dir);
  for (const auto& s : point.skipped) why += "\n  " + s;
  return failed_precondition(why);
}

Result<Snapshot> newest_snapshot_of(const std::string& dir, const std::string& role, uint32_t rank,
                                    std::vector<std::string>& skipped) {
  namespace fs = std::filesystem;
  std::error_code ec;
  for (const uint64_t step : steps_in(dir)) {
    const std::string p = snapshot_path(dir, step, role, rank);
    if (!fs::exists(p, ec)) continue;
    auto s = Snapshot::read(p);
    if (s.ok()) return s;
    skipped.push_back(fmt::format("step {}: {}", step, s.status().message()));
  }
  std::string why = fmt::format("no readable snapshot of {} {} in {} (checkpoint.dir)", role, rank, dir);
  for (const auto& s : skipped) why += "\n  " + s;
  return failed_precondition(why);
}

size_t remove_snapshots(const std::string& dir) {
  namespace fs = std::filesystem;
  size_t removed = 0;
  std::error_code ec;
  for (const uint64_t step : steps_in(dir)) removed += fs::remove_all(snapshot_step_dir(dir, step), ec) > 0 ? 1 : 0;
  return removed;
}

void prune_snapshots(const std::string& dir, const std::string& role, uint32_t rank, int keep) {
  namespace fs = std::filesystem;
  std::error_code ec;
  // Counted over this process's own files: other processes' newer step
  // folders (a fast asp worker's) must not push its only snapshots out.
  size_t kept = 0;
  for (const uint64_t step : steps_in(dir)) {
    const std::string path = snapshot_path(dir, step, role, rank);
    if (!fs::exists(path, ec) || ++kept <= static_cast<size_t>(std::max(keep, 1))) continue;
    fs::remove(path, ec);
    fs::remove(snapshot_step_dir(dir, step), ec);  // only succeeds once empty
  }
}

}  // namespace sps
