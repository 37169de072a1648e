// Typed job configuration: YAML file + `--set key.path=value` overrides ->
// validated structs. Every key, its meaning, unit, default and valid range is
// listed in docs/config.md (a test checks the two agree).
//
// Errors name the source and key: "config/demo.yaml:12:3: training.lr: ...",
// or "--set training.lr=abc: ...". Unknown keys, wrong types and values out
// of range are all errors; nothing is silently ignored.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace sps::config {

struct RunConfig {
  // Run folder name: logs and summary go to <dir>/<name>/. Default: "run".
  std::string name = "run";
  // Parent folder of run folders. Default: "runs".
  std::string dir = "runs";
  // debug | info | warn | error. Default: info.
  std::string log_level = "info";
  // Print progress lines (worker 0). Default: true.
  bool progress = true;
  // Progress lines per run (evenly spaced). Default: 10. Range [1, 1000].
  int progress_lines = 10;
  // Worker 0 writes the final parameters to <run>/params.f32. Default: false.
  bool save_params = false;
  // Workers log the residual norm |acc - sent| every N steps (0 = never; a
  // pass over the model each time). Default: 0.
  int64_t log_residual_every = 0;
  // Steps after which every worker writes its accumulated vector acc
  // (residual + gradient step, before selection) to
  // <run>/acc-w<rank>-s<step>.f32, for offline analysis (sps-grad). Default: [].
  std::vector<int64_t> dump_acc_steps;
};

enum class WorkerLoss { kContinue, kAbort };
enum class ServerLoss { kAbort, kReplace };

struct ClusterConfig {
  // Scheduler host (address workers and servers connect to). Default: 127.0.0.1.
  std::string scheduler_host = "127.0.0.1";
  // Scheduler TCP port; 0 = pick a free port and write it to
  // <run>/scheduler.port. Default: 0. Range [0, 65535].
  int scheduler_port = 0;
  // Address servers and the scheduler bind to (0.0.0.0: every interface).
  // Default: 127.0.0.1.
  std::string bind_host = "127.0.0.1";
  // Address a server tells workers to connect to; "" = bind_host, or, when
  // that is 0.0.0.0, this host's address on the route to the scheduler.
  // Default: "".
  std::string advertise_host;
  // Ports servers (and a scheduler with scheduler_port 0) bind to: the first
  // free one in [port_min, port_max]; 0 and 0 = any free port. Default: 0, 0.
  int port_min = 0;
  int port_max = 0;
  // How long a server or worker keeps trying to reach the scheduler (and a
  // worker each server) before it fails with a message naming the address,
  // ms. Default: 30000. Range [100, 3600000].
  int connect_timeout_ms = 30000;
  // Number of server processes (shards). Default: 1. Range [1, 1024].
  int num_servers = 1;
  // Threads each server applies updates with (0 = all cores). Default: 1.
  // Range [0, 256].
  int server_threads = 1;
  // Servers and workers keep the memory they free for reuse (the C
  // allocator never returns it to the kernel), so large messages do not
  // fault in fresh pages. Default: true.
  bool keep_freed_memory = true;
  // Number of worker processes. Default: 1. Range [1, 4096].
  int num_workers = 1;
  // Milliseconds between heartbeats. Default: 500. Range [10, 60000].
  int heartbeat_ms = 500;
  // Silence after which a node is declared dead, ms. Default: 10000. Range [100, 3600000].
  int heartbeat_timeout_ms = 10000;
  // continue: the job goes on without a dead worker; abort: it ends with an error.
  WorkerLoss on_worker_loss = WorkerLoss::kContinue;
  // abort: a dead server ends the job with an error. replace: the job waits
  // (cluster.startup_timeout_ms) for a new server process to take the dead
  // one's place; it loads the dead server's newest snapshot and the workers
  // send it again every push since (needs checkpoint.interval or every_seconds).
  // Default: abort.
  ServerLoss on_server_loss = ServerLoss::kAbort;
  // on_server_loss: replace: the most memory each worker keeps its pushes
  // since a server's last snapshot in, MiB; past it a server replacement
  // before the next snapshot fails the job. Default: 1024. Range [1, 1048576].
  int replay_buffer_mb = 1024;
  // How long to wait for every node to register, ms. Default: 60000. Range [100, 3600000].
  int startup_timeout_ms = 60000;
  // Emulated link rate between each worker and the servers, Mbit/s per
  // direction (0 = off): a worker waits bytes * 8 / rate after each push and
  // pull. For studying slow links on one machine. Default: 0.
  double link_mbps = 0.0;
};

struct ModelConfig {
  // A model registered with the worker: built-ins logreg, least_squares,
  // mlp, or a name a user program registers. Default: logreg.
  std::string name = "logreg";
  // Scale of the random initial weights (normal, stddev); 0 = the model's
  // own default. Default: 0. Range [0, 10].
  double init_std = 0.0;
  // cpu | cuda: where the model computes (cuda: the built-in mlp on cuBLAS;
  // needs compression.backend: cuda). Default: cpu.
  std::string device = "cpu";
  // mlp: widths of the hidden layers. Default: [512, 256].
  std::vector<int64_t> hidden = {512, 256};
  // Free-form settings for user models (model.options.<name>: scalar).
  std::map<std::string, std::string> options;
};

struct DataConfig {
  // A dataset registered with the worker: built-ins fashion_mnist,
  // least_squares (synthetic), or a user-registered name. Default: fashion_mnist.
  std::string name = "fashion_mnist";
  // Folder with the IDX files. Default: /usr/share/datasets/fashion-mnist.
  std::string path = "/usr/share/datasets/fashion-mnist";
  // Use only the first N training examples (0 = all). Default: 0.
  int train_limit = 0;
  // Use only the first N test examples (0 = all). Default: 0.
  int test_limit = 0;
  // least_squares: examples in the training set (the test set has a quarter as many). Default: 4096.
  int rows = 4096;
  // least_squares: features per example. Default: 100.
  int features = 100;
  // least_squares: condition number of the feature covariance. Default: 100. Range [1, 1e8].
  double condition = 100.0;
  // least_squares: standard deviation of the label noise. Default: 0. Range [0, 1e3].
  double noise = 0.0;
  // least_squares: rotate the features by a random orthogonal matrix, so the
  // Hessian is dense instead of diagonal (same eigenvalues). Default: false.
  bool rotate = false;
};

struct TrainingConfig {
  // Steps (pushes) per worker. Default: 500. Range [1, 1e9].
  int64_t steps = 500;
  // Examples per worker per step. Default: 32. Range [1, 1e6].
  int batch_size = 32;
  // Learning rate (step size). Default: 0.1. Range (0, 1e3].
  double lr = 0.1;
  // L2 regularisation coefficient. Default: 0. Range [0, 1e3].
  double l2 = 0.0;
  // Seed for initialisation and data order. Default: 1.
  int64_t seed = 1;
  // Worker 0 evaluates test accuracy every N steps on the parameters it
  // pulled (0 = only at the end). Default: 0.
  int64_t eval_every = 0;
};

enum class CompressionMethod { kDense, kTopK, kThreshold, kGaussianK, kRandomK, kSampled };
enum class ErrorFeedback { kNone, kEf, kHessianDiag, kHessian };
enum class CompressionScope { kGlobal, kPerTensor };
enum class ValueFormatName { kF32, kF16, kBF16, kInt8, kSign, kQsgd, kOneBit };
enum class IndexCoding { kAuto, kRaw, kDeltaVarint, kBitmap };
enum class BackendName { kCpu, kCuda };
enum class Scale { kLr, kOne };
struct CompressionConfig {
  // dense | topk. Default: topk.
  CompressionMethod method = CompressionMethod::kTopK;
  // Fraction of entries sent per step (topk). Default: 0.01. Range (0, 1].
  double ratio = 0.01;
  // Entries sent per step; overrides ratio when > 0. Default: 0.
  int64_t k = 0;
  // threshold: send every entry with |acc| >= lambda (units of acc: see scale). Default: 0.
  double lambda = 0.0;
  // threshold: at most this many entries per step, the largest (0 = no cap). Default: 0.
  int64_t max_nnz = 0;
  // randomk: send (n/k) * acc[S] (unbiased; requires error_feedback: none). Default: false.
  bool randomk_unbiased = false;
  // none | ef | hessian_diag. Default: ef.
  ErrorFeedback error_feedback = ErrorFeedback::kEf;
  // hessian_diag: refresh the model's Hessian-diagonal estimate every this many steps. Default: 10.
  int64_t hessian_every = 10;
  // global (one k over the flat model) | per_tensor (each tensor its own k). Default: global.
  CompressionScope scope = CompressionScope::kGlobal;
  // Wire format of sent values: f32 | f16 | bf16 | int8 | sign | qsgd | onebit (the scaled ones
  // send a scale per bucket plus a level per value, onebit two scales and a sign; rounding error
  // stays in the residual). Default: f32.
  ValueFormatName values = ValueFormatName::kF32;
  // values: qsgd: the number of levels s. Default: 64. Range 1..127.
  int64_t qsgd_levels = 64;
  // Scaled values: one scale per this many consecutive selected values (0 = one per selection). Default: 512.
  int64_t quant_bucket = 512;
  // Wire coding of sparse keys: auto (smallest per message) | raw | delta_varint | bitmap. Default: auto.
  IndexCoding index_coding = IndexCoding::kAuto;
  // DGC momentum correction with masking on the worker (0 = off). Default: 0.
  double momentum_correction = 0.0;
  // Local gradient clipping to this L2 norm before accumulation (0 = off). Default: 0.
  double clip_norm = 0.0;
  // scale: lr with error feedback: when lr(t) differs from lr(t-1), multiply
  // the residual by lr(t)/lr(t-1) first, so what is owed is sent at the new
  // lr (ALGORITHMS.md §6). Default: false.
  bool rescale_residual = false;
  // Sparsity warm-up: the ratio falls exponentially from warmup_ratio to ratio over these steps. Default: 0.
  int64_t warmup_steps = 0;
  // Ratio at step 0 of the warm-up. Default: 0.25.
  double warmup_ratio = 0.25;
  // Compressor threads per worker (0 = all cores). Default: 1.
  int64_t threads = 1;
  // cpu | cuda: where the worker runs the compressor. Default: cpu.
  BackendName backend = BackendName::kCpu;
  // lr: the worker scales gradients by lr before compression (server adds);
  // 1: the worker compresses raw gradients, the server multiplies by lr. Default: lr.
  Scale scale = Scale::kLr;
};

enum class LrSchedule { kConstant, kStep, kCosine };
enum class OptimizerName { kSgd, kAdagrad, kAdam };
struct OptimizerConfig {
  // sgd | adagrad | adam: the rule the servers apply to the averaged push.
  // adagrad and adam need gradient pushes (compression.scale: 1). Default: sgd.
  OptimizerName name = OptimizerName::kSgd;
  // Momentum coefficient, applied on the servers after aggregation (never
  // inside the residual). 0 = plain SGD. Default: 0. Range [0, 1).
  double momentum = 0.0;
  // Decoupled weight decay applied densely by the servers each update. Default: 0. Range [0, 1].
  double weight_decay = 0.0;
  // constant | step | cosine. Default: constant.
  LrSchedule lr_schedule = LrSchedule::kConstant;
  // Linear warm-up from lr/warmup_steps to lr over the first steps. Default: 0.
  int64_t warmup_steps = 0;
  // step schedule: multiply the lr by step_gamma every step_every steps. Default: 1000.
  int64_t step_every = 1000;
  // Default: 0.1. Range (0, 1].
  double step_gamma = 0.1;
  // adam: decay rates of the first and second moment. Defaults: 0.9, 0.999. Range [0, 1).
  double beta1 = 0.9;
  double beta2 = 0.999;
  // adagrad, adam: added to the root of the second moment. Default: 1e-8. Range (0, 1].
  double epsilon = 1e-8;
  // adam: keys whose averaged gradient is exactly zero (not pushed) keep
  // their moments and value, so updates stay sparse. Default: false (every
  // key's moments decay every update, as in dense Adam).
  bool lazy = false;
};

// Compressed pulls (bidirectional compression): each server keeps, next to
// its parameters x, the copy x_hat the workers pull, and moves x_hat toward
// x by a compressed step when a pull needs a newer version:
// S = select(x - x_hat), x_hat[S] = x[S]. What is not sent stays owed in
// x - x_hat (error feedback on the server), so nothing is lost, only late.
struct DownlinkConfig {
  // dense (pulls carry x exactly) | topk | threshold | gaussiank | sampled | randomk. Default: dense.
  CompressionMethod method = CompressionMethod::kDense;
  // Fraction of each shard's keys sent per publish. Default: 0.01. Range (0, 1].
  double ratio = 0.01;
  // Keys per shard per publish; overrides ratio when > 0. Default: 0.
  int64_t k = 0;
  // threshold: publish every key with |x - x_hat| >= lambda. Default: 0.
  double lambda = 0.0;
  // Wire format of published values: f32 | f16 | bf16. The published copy
  // holds the rounded values, so what rounding loses stays owed. Default: f32.
  ValueFormatName values = ValueFormatName::kF32;
};

enum class ConsistencyMode { kBsp, kSsp, kAsp };
struct ConsistencyConfig {
  // bsp | ssp | asp. Default: bsp.
  ConsistencyMode mode = ConsistencyMode::kBsp;
  // SSP bound s: a pull at clock c waits until every live worker has clock
  // >= c - s. Default: 0. Range [0, 1e6].
  int staleness = 0;
  // Strict staleness (ssp, asp): a shard refuses, and counts, a push whose
  // staleness (versions applied since the worker's pull) exceeds this; the
  // worker puts the refused values back into its residual. -1 = off.
  // Default: -1. Range [-1, 1e6].
  int max_push_staleness = -1;
  // Answer pulls with only the keys changed since the worker's last pull
  // when that is smaller than the dense slice. Default: true.
  bool sparse_pull = true;
};

struct WorkersConfig {
  // Extra milliseconds each worker sleeps per step, by rank (missing = 0).
  std::vector<double> delay_ms;
  // Per-rank slowdown factor >= 1: a worker with factor f sleeps (f - 1) x
  // its own step time (compute + selection + sending) every step. Default: [].
  std::vector<double> slowdown;
  // Constant gradient delay d: every worker computes step k's gradient on
  // the parameters it pulled at step max(0, k - d) (a ring of d + 1 pulled
  // copies), the delayed-gradient model of the step-size analyses, exactly.
  // Host models only. Default: 0. Range [0, 10000].
  int gradient_delay = 0;
};

struct CheckpointConfig {
  // Snapshot every N worker steps: servers write their shard, workers their
  // residual (0 = off). Default: 0. Range [0, 1e9].
  int64_t interval = 0;
  // Also snapshot about every S seconds of training: the scheduler names a
  // step every live worker has yet to reach (0 = off). Default: 0. Range [0, 1e7].
  double every_seconds = 0;
  // Snapshots are on (by steps, by time, or both).
  bool enabled() const { return interval > 0 || every_seconds > 0; }
  // Folder of the snapshots; "" = <run folder>/checkpoints. Multi-host jobs
  // need a folder every host sees at the same path. Default: "".
  std::string dir;
  // Newest step folders kept. Default: 3. Range [2, 1000].
  int keep = 3;
  // Workers snapshot their residuals (error feedback survives a restart). Default: true.
  bool workers = true;
  // Start from the newest complete snapshot instead of step 0 (the --resume
  // flag of every binary and of sps-launch sets it). Default: false.
  bool resume = false;
};

struct MetricsConfig {
  // The scheduler and every server serve GET /metrics (Prometheus text
  // format) over HTTP. Default: false.
  bool enabled = false;
  // Address the metrics endpoints bind to. Default: 127.0.0.1.
  std::string bind_host = "127.0.0.1";
  // 0: any free port (each process writes its URL to
  // <run>/metrics-<role>.url); P: the scheduler on P, server r on P + 1 + r.
  // Default: 0. Range [0, 65535].
  int port = 0;
};

struct SecurityConfig {
  // Authenticate and encrypt every connection with ZeroMQ CURVE; servers
  // and the scheduler refuse peers whose key is not allowed. Default: false.
  bool curve = false;
  // This process's key pair (sps-keygen NAME writes NAME.key and NAME.pub).
  // Required when curve is on. Default: "".
  std::string key_file;
  // Public key of the scheduler and the servers; "" = the public half of
  // key_file (one key pair for the whole job). Default: "".
  std::string server_key_file;
  // Client public keys the scheduler and servers admit, one per line; "" =
  // only the public half of key_file. Default: "".
  std::string allowed_keys_file;
};

struct Config {
  RunConfig run;
  ClusterConfig cluster;
  ModelConfig model;
  DataConfig data;
  TrainingConfig training;
  CompressionConfig compression;
  OptimizerConfig optimizer;
  DownlinkConfig downlink;
  ConsistencyConfig consistency;
  WorkersConfig workers;
  CheckpointConfig checkpoint;
  MetricsConfig metrics;
  SecurityConfig security;

  // Where the config came from (file path, or "<defaults>").
  std::string source = "<defaults>";
  // Every key given explicitly, and where: "file:line:column" or "--set key=value".
  std::map<std::string, std::string> set_at;

  std::string run_folder() const { return run.dir + "/" + run.name; }
  std::string checkpoint_dir() const { return checkpoint.dir.empty() ? run_folder() + "/checkpoints" : checkpoint.dir; }
};

// Loads `path` (empty = defaults only), then applies each "key.path=value"
// override in order, then checks cross-key rules.
Result<Config> load(const std::string& path, const std::vector<std::string>& overrides = {});
// Parses YAML text (for tests); `source_name` is used in error messages.
Result<Config> load_from_string(const std::string& yaml, const std::string& source_name,
                                const std::vector<std::string>& overrides = {});

// One message per key that the config sets explicitly but that the rest of
// it makes ineffective (compression.qsgd_levels without values: qsgd,
// consistency.staleness outside ssp, ...), naming where the key was set and
// why it does nothing. Such a config still loads; sps-scheduler logs these
// as warnings when it starts (on stderr with --print-config).
std::vector<std::string> ineffective_keys(const Config& c);

// The learning rate at worker step t (0-based) under the configured schedule
// and warm-up; the same function on workers and servers.
double learning_rate(const Config& c, int64_t step);

// The effective configuration as JSON (every key), for logs and launchers.
nlohmann::json to_json(const Config& c);
// Every key path the loader accepts, in documentation order.
std::vector<std::string> all_keys();

const char* to_string(CompressionMethod m);
const char* to_string(ErrorFeedback e);
const char* to_string(ConsistencyMode m);
const char* to_string(OptimizerName n);
// "sgd", "sgd (momentum 0.9)", "adam (lazy)", "adam (weight decay 0.01)", ...
std::string optimizer_name(const OptimizerConfig& o);
// "dense", or the method and its budget: "topk (ratio 0.01)", "threshold (lambda 0.001)".
std::string downlink_name(const DownlinkConfig& d);
const char* to_string(ValueFormatName v);
// "bsp", "ssp(4)", "ssp(0)", "asp".
std::string consistency_name(const ConsistencyConfig& c);

}  // namespace sps::config
