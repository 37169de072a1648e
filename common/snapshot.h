// Snapshots: checksummed, atomically written state files, and the layout of
// a job's checkpoint folder (which step every process can resume from).
//
// File format (all little-endian; docs/reliability.md):
//   "SPSSNAP1"  u32 format (1)  u32 sections
//   per section: u32 name bytes, name, u64 payload bytes, payload
//   u32 CRC-32 (zlib) of every byte before it
// A file is written to "<path>.tmp", fsync'd, renamed over <path>, and the
// folder fsync'd: a crash leaves either the old file or the new one, never a
// torn one. Reading checks sizes against the file and the checksum before a
// single section is handed out; a truncated or corrupted file is refused
// with a message that names it.
//
// Folder layout: <dir>/step-<12 digits>/{server-<rank>,worker-<rank>}.snap.
// A step is complete when every server file is there and valid and no
// worker file present is invalid (a worker that was dead by then has none
// and starts with an empty residual).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace sps {

class SnapshotWriter {
 public:
  void add_bytes(const std::string& name, std::span<const std::byte> bytes);
  void add_u64(const std::string& name, uint64_t v);
  void add_f32(const std::string& name, std::span<const float> v);
  void add_u64s(const std::string& name, std::span<const uint64_t> v);
  // Writes the file atomically (tmp + fsync + rename + fsync of the folder),
  // creating the folder when needed.
  Status write_atomic(const std::string& path) const;
  size_t bytes() const { return body_.size() + 4; }

 private:
  std::vector<std::byte> body_;  // sections, encoded
  uint32_t sections_ = 0;
};

class Snapshot {
 public:
  // Reads and validates a whole file (size, structure, checksum).
  static Result<Snapshot> read(const std::string& path);
  // The same on bytes already in memory; `name` stands for the file in messages.
  static Result<Snapshot> parse(std::vector<std::byte> bytes, const std::string& name);
  std::vector<std::string> section_names() const;
  bool has(const std::string& name) const { return sections_.count(name) != 0; }
  // Typed sections; a missing section or a payload of the wrong size fails
  // with a message naming the file and the section.
  Result<uint64_t> u64(const std::string& name) const;
  Result<std::vector<float>> f32(const std::string& name) const;
  Result<std::vector<uint64_t>> u64s(const std::string& name) const;
  const std::string& path() const { return path_; }

 private:
  Result<std::span<const std::byte>> section(const std::string& name) const;
  std::string path_;
  std::vector<std::byte> data_;
  std::map<std::string, std::pair<size_t, size_t>> sections_;  // name -> (offset, size)
};

// ---- checkpoint folder ------------------------------------------------------

std::string snapshot_step_dir(const std::string& dir, uint64_t step);
std::string snapshot_path(const std::string& dir, uint64_t step, const std::string& role, uint32_t rank);

// The newest complete step in `dir` for a job of `servers` x `workers`.
// Incomplete or damaged steps are skipped; every file refused on the way is
// described in `skipped` (one line each). Fails when no step is complete.
struct ResumePoint {
  uint64_t step = 0;
  std::vector<std::string> skipped;
};
Result<ResumePoint> find_resume_point(const std::string& dir, uint32_t servers, uint32_t workers);

// The newest readable file of one process (role, rank) in `dir`, whatever
// the other processes wrote: what a server replacing a dead one restores.
// Files refused on the way are described in `skipped`. Fails when none is readable.
Result<Snapshot> newest_snapshot_of(const std::string& dir, const std::string& role, uint32_t rank,
                                    std::vector<std::string>& skipped);

// Deletes every step folder in `dir` (a fresh run in a folder that holds an
// earlier run's snapshots must not resume from them later); returns how many.
size_t remove_snapshots(const std::string& dir);

// Deletes this process's files (role, rank) but its newest `keep` (counted
// over its own files: other processes' newer step folders do not count),
// and step folders left empty.
void prune_snapshots(const std::string& dir, const std::string& role, uint32_t rank, int keep);

}  // namespace sps
