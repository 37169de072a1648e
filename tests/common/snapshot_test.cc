// Snapshot files: round trip, every kind of damage refused with the file
// named, and the choice of the resume step in a checkpoint folder.
#include "common/snapshot.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace sps {
namespace {

namespace fs = std::filesystem;

std::string fresh_dir(const std::string& name) {
  const auto dir = fs::path(::testing::TempDir()) / ("sps-snap-" + std::to_string(getpid())) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void write_server(const std::string& dir, uint64_t step, uint32_t rank, float fill = 1.0f) {
  SnapshotWriter w;
  w.add_u64("step", step);
  w.add_f32("params", std::vector<float>(100, fill));
  ASSERT_TRUE(w.write_atomic(snapshot_path(dir, step, "server", rank)).ok());
}
void write_worker(const std::string& dir, uint64_t step, uint32_t rank) {
  SnapshotWriter w;
  w.add_u64("step", step);
  w.add_f32("residual", std::vector<float>(100, 0.5f));
  ASSERT_TRUE(w.write_atomic(snapshot_path(dir, step, "worker", rank)).ok());
}
// Flips one bit of the byte at `offset` from the end.
void flip_byte(const std::string& path, long offset_from_end) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(-offset_from_end, std::ios::end);
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x10);
  f.seekp(-offset_from_end, std::ios::end);
  f.write(&c, 1);
}

TEST(SnapshotTest, RoundTripsEverySectionKind) {
  const std::string dir = fresh_dir("roundtrip");
  SnapshotWriter w;
  w.add_u64("version", 12345678901234ULL);
  const std::vector<float> params = {1.5f, -0.0f, 3e-39f, 7.0f};
  w.add_f32("params", params);
  w.add_f32("empty", {});
  const std::vector<uint64_t> clocks = {1, 2, UINT64_MAX};
  w.add_u64s("clocks", clocks);
  const std::string path = dir + "/a/b/x.snap";
  ASSERT_TRUE(w.write_atomic(path).ok());
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  EXPECT_EQ(fs::file_size(path), w.bytes() + 16);  // magic, format, count
  auto s = Snapshot::read(path);
  ASSERT_TRUE(s.ok()) << s.status().to_string();
  EXPECT_EQ(*s->u64("version"), 12345678901234ULL);
  auto p = s->f32("params");
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(p->size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(std::bit_cast<uint32_t>((*p)[i]), std::bit_cast<uint32_t>(params[i]));
  EXPECT_TRUE(s->f32("empty")->empty());
  EXPECT_EQ(*s->u64s("clocks"), clocks);
  // A missing section or a wrong-sized one names the file and the section.
  auto missing = s->u64("nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("nope"), std::string::npos);
  EXPECT_NE(missing.status().message().find(path), std::string::npos);
  EXPECT_FALSE(s->u64("params").ok());
}

TEST(SnapshotTest, RewritingReplacesTheFileWhole) {
  const std::string dir = fresh_dir("rewrite");
  write_server(dir, 10, 0, 1.0f);
  write_server(dir, 10, 0, 2.0f);
  auto s = Snapshot::read(snapshot_path(dir, 10, "server", 0));
  ASSERT_TRUE(s.ok());
  EXPECT_EQ((*s->f32("params"))[99], 2.0f);
}

TEST(SnapshotTest, TruncatedCorruptedAndForeignFilesAreRefusedByName) {
  const std::string dir = fresh_dir("damage");
  write_server(dir, 10, 0);
  const std::string good = snapshot_path(dir, 10, "server", 0);
  const auto size = fs::file_size(good);
  for (const uintmax_t keep : {uintmax_t{0}, uintmax_t{10}, size / 2, size - 1}) {
    const std::string p = dir + "/trunc-" + std::to_string(keep) + ".snap";
    fs::copy_file(good, p);
    fs::resize_file(p, keep);
    auto s = Snapshot::read(p);
    ASSERT_FALSE(s.ok()) << "kept " << keep << " bytes";
    EXPECT_NE(s.status().message().find(p), std::string::npos) << s.status().message();
  }
  for (const long at : {1L, 5L, 200L, static_cast<long>(size) - 3}) {
    const std::string p = dir + "/flip-" + std::to_string(at) + ".snap";
    fs::copy_file(good, p);
    flip_byte(p, at);
    auto s = Snapshot::read(p);
    ASSERT_FALSE(s.ok()) << "flipped a bit " << at << " bytes from the end";
    EXPECT_NE(s.status().message().find(p), std::string::npos);
  }
  {
    const std::string p = dir + "/foreign.snap";
    std::ofstream(p) << "this is not a snapshot at all, just some text";
    auto s = Snapshot::read(p);
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.status().message().find("bad magic"), std::string::npos);
  }
  EXPECT_FALSE(Snapshot::read(dir + "/absent.snap").ok());
}

TEST(SnapshotTest, ResumePointIsTheNewestStepWithEveryServer) {
  const std::string dir = fresh_dir("resume");
  for (uint64_t step : {100, 200, 300}) {
    write_server(dir, step, 0);
    write_worker(dir, step, 0);
    write_worker(dir, step, 1);
  }
  write_server(dir, 100, 1);
  write_server(dir, 200, 1);
  // Step 300 lacks server 1 (it died first): 200 is the newest complete step.
  auto p = find_resume_point(dir, 2, 2);
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  EXPECT_EQ(p->step, 200u);
  ASSERT_EQ(p->skipped.size(), 1u);
  EXPECT_NE(p->skipped[0].find("server-1.snap is missing"), std::string::npos) << p->skipped[0];

  // A corrupted server file at 200 falls back to 100, naming the file.
  flip_byte(snapshot_path(dir, 200, "server", 1), 50);
  p = find_resume_point(dir, 2, 2);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->step, 100u);
  ASSERT_EQ(p->skipped.size(), 2u);
  EXPECT_NE(p->skipped[1].find("checksum"), std::string::npos) << p->skipped[1];

  // A missing worker file is allowed (that worker was dead); a damaged one is not.
  fs::remove(snapshot_path(dir, 100, "worker", 1));
  EXPECT_EQ(find_resume_point(dir, 2, 2)->step, 100u);
  fs::resize_file(snapshot_path(dir, 100, "worker", 0), 20);
  auto none = find_resume_point(dir, 2, 2);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("no complete snapshot"), std::string::npos);
  EXPECT_NE(none.status().message().find("worker-0.snap"), std::string::npos) << none.status().message();
  EXPECT_FALSE(find_resume_point(dir + "/nowhere", 1, 1).ok());
}

TEST(SnapshotTest, PruneKeepsTheNewestStepsOfOneProcess) {
  const std::string dir = fresh_dir("prune");
  for (uint64_t step = 1; step <= 5; ++step) {
    write_server(dir, step, 0);
    write_server(dir, step, 1);
  }
  prune_snapshots(dir, "server", 0, 2);
  for (uint64_t step = 1; step <= 5; ++step) {
    EXPECT_EQ(fs::exists(snapshot_path(dir, step, "server", 0)), step >= 4) << step;
    EXPECT_TRUE(fs::exists(snapshot_path(dir, step, "server", 1))) << "another process's file went";
  }
  prune_snapshots(dir, "server", 1, 2);
  EXPECT_FALSE(fs::exists(snapshot_step_dir(dir, 1))) << "an empty step folder stays";
  EXPECT_TRUE(fs::exists(snapshot_step_dir(dir, 5)));
  EXPECT_EQ(remove_snapshots(dir), 2u);
  EXPECT_FALSE(fs::exists(snapshot_step_dir(dir, 5)));
}

// In asp a fast worker writes snapshots for steps the servers (whose step
// is the slowest worker's) reach much later: a server keeps its own newest
// files, however many newer step folders the worker made.
TEST(SnapshotTest, PruneCountsOnlyTheProcessOwnFiles) {
  const std::string dir = fresh_dir("prune_own");
  for (uint64_t step : {100, 150, 200}) write_server(dir, step, 0);
  for (uint64_t step : {250, 300, 350, 400}) write_worker(dir, step, 0);
  prune_snapshots(dir, "server", 0, 2);
  EXPECT_FALSE(fs::exists(snapshot_path(dir, 100, "server", 0)));
  EXPECT_TRUE(fs::exists(snapshot_path(dir, 150, "server", 0)));
  EXPECT_TRUE(fs::exists(snapshot_path(dir, 200, "server", 0)));
  prune_snapshots(dir, "worker", 0, 2);
  EXPECT_FALSE(fs::exists(snapshot_step_dir(dir, 250)));
  EXPECT_TRUE(fs::exists(snapshot_path(dir, 350, "worker", 0)));
  EXPECT_TRUE(fs::exists(snapshot_path(dir, 200, "server", 0)));
}

}  // namespace
}  // namespace sps
