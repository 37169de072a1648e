#include "tests/integration/harness.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>

namespace sps::testing {

Process::Process(const std::vector<std::string>& argv, const std::string& log_path) {
  std::vector<char*> cargv;
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  pid_ = fork();
  if (pid_ == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test binary
    const int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
      close(fd);
    }
    execv(cargv[0], cargv.data());
    _exit(127);
  }
}

Process::~Process() {
  if (pid_ > 0 && !reaped_) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

Process::Process(Process&& o) noexcept : pid_(o.pid_), status_(o.status_), reaped_(o.reaped_) { o.pid_ = -1; }

Process& Process::operator=(Process&& o) noexcept {
  if (this != &o) {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    pid_ = o.pid_;
    status_ = o.status_;
    reaped_ = o.reaped_;
    o.pid_ = -1;
  }
  return *this;
}

bool Process::running() { return pid_ > 0 && !reaped_ && wait(0) == -1; }

void Process::send_signal(int sig) {
  if (pid_ > 0 && !reaped_) kill(pid_, sig);
}

int Process::wait(double timeout_s) {
  if (pid_ <= 0) return -1;
  if (reaped_) return status_;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (true) {
    int st = 0;
    const pid_t r = waitpid(pid_, &st, WNOHANG);
    if (r == pid_) {
      reaped_ = true;
      status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      return status_;
    }
    if (std::chrono::steady_clock::now() >= deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

std::vector<int> processes_mentioning(const std::string& token) {
  std::vector<int> found;
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const int pid = std::stoi(name);
    if (pid == getpid()) continue;
    std::string cmd = read_text("/proc/" + name + "/cmdline");
    std::replace(cmd.begin(), cmd.end(), '\0', ' ');
    const std::string stat = read_text("/proc/" + name + "/stat");
    const auto paren = stat.rfind(')');
    const bool zombie = paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] == 'Z';
    if (!zombie && cmd.find(token) != std::string::npos) found.push_back(pid);
  }
  return found;
}

std::string bin(const std::string& name) { return std::string(SPS_BIN_DIR) + "/" + name; }

std::string fresh_run_dir(const std::string& name) {
  const auto dir = std::filesystem::path(::testing::TempDir()) / ("sps-" + std::to_string(getpid())) / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

Job::Job(const std::string& name, int worker_count, int server_count, std::vector<std::string> extra,
         bool fresh_folder)
    : run_dir(fresh_folder ? fresh_run_dir(name)
                           : (std::filesystem::path(::testing::TempDir()) / ("sps-" + std::to_string(getpid())) / name)
                                 .string()),
      num_workers(worker_count),
      num_servers(server_count) {
  const auto parent = std::filesystem::path(run_dir).parent_path().string();
  sets = {"run.dir=" + parent,
          "run.name=" + name,
          "cluster.num_workers=" + std::to_string(worker_count),
          "cluster.num_servers=" + std::to_string(server_count),
          "run.progress=false",
          "cluster.startup_timeout_ms=30000"};
  sets.insert(sets.end(), extra.begin(), extra.end());
}

std::vector<std::string> Job::node_args() const {
  std::vector<std::string> a = {"--config", std::string(SPS_SOURCE_DIR) + "/config/demo.yaml"};
  for (const auto& s : sets) {
    a.push_back("--set");
    a.push_back(s);
  }
  return a;
}

bool Job::start_scheduler() {
  std::vector<std::string> argv = {bin("sps-scheduler")};
  std::filesystem::remove(path("scheduler.port"));  // a resumed job's folder has the old one
  const auto args = node_args();
  argv.insert(argv.end(), args.begin(), args.end());
  scheduler = Process(argv, path("scheduler.out"));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (port == 0) {
    std::ifstream f(path("scheduler.port"));
    if (f >> port) break;
    if (std::chrono::steady_clock::now() > deadline || !scheduler.running()) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

// argv for an sps-server or sps-worker with the job's config, the
// scheduler's port and `--rank`.
static std::vector<std::string> node_argv(const Job& job, const std::string& binary, int rank) {
  std::vector<std::string> v = {bin(binary), "--rank", std::to_string(rank)};
  const auto args = job.node_args();
  v.insert(v.end(), args.begin(), args.end());
  v.push_back("--set");
  v.push_back("cluster.scheduler_port=" + std::to_string(job.port));
  return v;
}

void Job::start_server(int rank) {
  servers.emplace_back(node_argv(*this, "sps-server", rank), path("server-" + std::to_string(rank) + ".out"));
}

void Job::start_worker(int rank) {
  workers.emplace_back(node_argv(*this, worker_program, rank), path("worker-" + std::to_string(rank) + ".out"));
}

bool Job::start() {
  if (!start_scheduler()) return false;
  for (int s = 0; s < num_servers; ++s) start_server(s);
  for (int w = 0; w < num_workers; ++w) start_worker(w);
  return true;
}

bool Job::wait_all(double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  auto left = [&] {
    return std::max(0.0, std::chrono::duration<double>(deadline - std::chrono::steady_clock::now()).count());
  };
  bool ok = scheduler.wait(left()) != -1;
  for (auto& p : servers) ok &= p.wait(left()) != -1;
  for (auto& p : workers) ok &= p.wait(left()) != -1;
  return ok;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  if (!f) return nullptr;
  return nlohmann::json::parse(f, nullptr, false);
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded()) out.push_back(std::move(j));
  }
  return out;
}

std::vector<float> read_f32(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

std::string server_endpoint(const Job& job, int rank) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    for (const auto& line : read_jsonl(job.path("server-" + std::to_string(rank) + ".jsonl")))
      if (line.value("event", "") == "assign") return line["endpoint"].get<std::string>();
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return "";
}

size_t wait_for_lines(const std::string& path, size_t lines, double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  size_t n = 0;
  while (true) {
    n = read_jsonl(path).size();
    if (n >= lines || std::chrono::steady_clock::now() > deadline) return n;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace sps::testing
