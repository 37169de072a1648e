// Test harness for integration tests: real sps processes on loopback, each
// with its output in a file, killed if a test ends while they still run.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace sps::testing {

class Process {
 public:
  Process() = default;
  // Starts argv[0] with its stdout+stderr appended to `log_path`.
  Process(const std::vector<std::string>& argv, const std::string& log_path);
  ~Process();
  Process(Process&& o) noexcept;
  Process& operator=(Process&& o) noexcept;
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  bool running();
  void send_signal(int sig);
  // Waits up to timeout_s; returns the exit status (128+sig when killed by
  // a signal) or -1 on timeout (the process keeps running).
  int wait(double timeout_s);
  int exit_status() const { return status_; }

 private:
  pid_t pid_ = -1;
  int status_ = -1;
  bool reaped_ = false;
};

// One job: a scheduler, S servers and W workers started from the demo-style
// config plus `sets`, in a fresh run folder under the test temp dir.
struct Job {
  // `fresh_folder` false keeps what an earlier job of the same name left
  // (a resumed job).
  Job(const std::string& name, int workers, int servers, std::vector<std::string> sets, bool fresh_folder = true);
  // Starts every process; false when the scheduler never wrote its port.
  bool start();
  // The pieces of start(), for tests that play a role themselves.
  bool start_scheduler();
  void start_server(int rank);
  void start_worker(int rank);
  // Waits for every process; true when all exited within timeout_s.
  bool wait_all(double timeout_s);
  std::vector<std::string> node_args() const;
  std::string path(const std::string& file) const { return run_dir + "/" + file; }

  std::string run_dir;
  std::vector<std::string> sets;
  int num_workers;
  int num_servers;
  int port = 0;
  // The worker program start_worker() runs (in the build's bin folder).
  std::string worker_program = "sps-worker";
  Process scheduler;
  std::vector<Process> servers;
  std::vector<Process> workers;
};

std::string fresh_run_dir(const std::string& name);
nlohmann::json read_json(const std::string& path);
std::vector<nlohmann::json> read_jsonl(const std::string& path);
std::vector<float> read_f32(const std::string& path);
std::string read_text(const std::string& path);
// Waits until `path` has at least `lines` lines (or timeout); returns the count.
size_t wait_for_lines(const std::string& path, size_t lines, double timeout_s);
std::string bin(const std::string& name);
// The data endpoint server `rank` of `job` logged at its assignment ("" if
// it did not within 30 s).
std::string server_endpoint(const Job& job, int rank);
// PIDs of live (non-zombie) processes whose command line contains `token`
// (e.g. a run folder), excluding this test process.
std::vector<int> processes_mentioning(const std::string& token);

}  // namespace sps::testing
