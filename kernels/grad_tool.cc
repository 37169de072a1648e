// sps-grad: analyse gradient vectors offline with the same kernels the
// workers run.
//
//   sps-grad stats  grad.f32 [--json]
//   sps-grad select grad.f32 --method topk --ratio 0.001 --indices sel.u32 --values sel.f32 --json
//   sps-grad xi acc-w0-s500.f32 acc-w1-s500.f32 --updates update-w0-s500.f32 update-w1-s500.f32 --ratio 0.01
#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <limits>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "kernels/backend.h"
#include "kernels/grad_file.h"
#include "kernels/cpu_compressor.h"
#include "kernels/sparsify.h"

namespace {

using sps::kernels::Method;

int fail(const std::string& message) {
  std::cerr << "sps-grad: " << message << "\n";
  return 1;
}

int run_stats(const std::string& path, bool json) {
  auto x = sps::kernels::load_f32(path);
  if (!x.ok()) return fail(x.status().message());
  const auto s = sps::kernels::vector_stats(*x);
  nlohmann::json j = {{"file", path},
                      {"n", s.n},
                      {"non_finite", s.non_finite},
                      {"mean", s.mean},
                      {"std", s.stddev},
                      {"excess_kurtosis", s.excess_kurtosis},
                      {"max_abs", s.max_abs},
                      {"within_1_2_3_sigma", {s.within_sigma[0], s.within_sigma[1], s.within_sigma[2]}},
                      {"normal_within_1_2_3_sigma", {0.6827, 0.9545, 0.9973}},
                      {"ks_distance_to_normal", s.ks_distance},
                      {"abs_histogram", {{"bins", 32}, {"max", s.max_abs}, {"counts", s.abs_histogram}}}};
  if (json) {
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::cout << fmt::format(
      "{}: n = {}, mean = {:.4g}, std = {:.4g}, max |x| = {:.4g}, non-finite = {}\n"
      "shape: excess kurtosis {:.3f} (normal: 0), KS distance to a normal {:.4f}\n"
      "within 1/2/3 std: {:.3f} / {:.3f} / {:.3f} (normal: 0.683 / 0.954 / 0.997)\n",
      path, s.n, s.mean, s.stddev, s.max_abs, s.non_finite, s.excess_kurtosis, s.ks_distance, s.within_sigma[0],
      s.within_sigma[1], s.within_sigma[2]);
  uint64_t peak = 1;
  for (auto c : s.abs_histogram) peak = std::max(peak, c);
  for (size_t b = 0; b < s.abs_histogram.size(); ++b)
    std::cout << fmt::format("  |x| < {:9.3g}  {:>10}  {}\n", s.max_abs * double(b + 1) / 32.0, s.abs_histogram[b],
                             std::string(static_cast<size_t>(50.0 * double(s.abs_histogram[b]) / double(peak)), '#'));
  return 0;
}

// Alistarh et al.'s Assumption 1, measured: how far the average of the
// workers' top-k is from the top-k of their average, relative to the size of
// the step (the average of what this step added to each worker's acc).
struct XiOptions {
  std::vector<std::string> acc_paths, update_paths;
  double ratio = 0.01;
  int64_t k = 0;
  bool json = false;
};

int run_xi(const XiOptions& o) {
  if (o.acc_paths.size() < 2) return fail("xi: give the acc files of at least two workers (the same step)");
  if (o.update_paths.size() != o.acc_paths.size())
    return fail(fmt::format("xi: {} acc files but {} --updates files; give one update per worker, in the same order",
                            o.acc_paths.size(), o.update_paths.size()));
  std::vector<std::vector<float>> acc, update;
  for (const auto& [paths, out] : {std::pair{&o.acc_paths, &acc}, std::pair{&o.update_paths, &update}}) {
    for (const auto& path : *paths) {
      auto x = sps::kernels::load_f32(path);
      if (!x.ok()) return fail(x.status().message());
      if (!out->empty() && x->size() != out->front().size())
        return fail(fmt::format("xi: {} holds {} values, {} holds {}", path, x->size(), paths->front(),
                                out->front().size()));
      for (size_t i = 0; i < x->size(); ++i)
        if (!std::isfinite((*x)[i])) return fail(fmt::format("xi: {}: value {} at index {} is not finite", path,
                                                             (*x)[i], i));
      out->push_back(std::move(*x));
    }
  }
  const size_t n = acc.front().size();
  if (update.front().size() != n)
    return fail(fmt::format("xi: the acc files hold {} values, the update files {}", n, update.front().size()));
  const size_t k = o.k > 0 ? std::min<size_t>(static_cast<size_t>(o.k), n) : sps::kernels::k_from_ratio(o.ratio, n);
  const double workers = static_cast<double>(acc.size());
  // In double: the quantities compared are differences of nearly equal sums.
  std::vector<double> local(n, 0.0), mean_update(n, 0.0);
  std::vector<float> mean_acc(n, 0.0f);
  std::vector<double> mean_acc_d(n, 0.0);
  std::vector<uint32_t> union_count(n, 0);
  sps::kernels::SparseVector sel;
  sps::kernels::TopKScratch scratch;
  double compression_error = 0;  // mean over workers of |acc - TopK(acc)|^2 / |acc|^2
  for (size_t w = 0; w < acc.size(); ++w) {
    sps::kernels::topk_select(acc[w], k, sel, scratch);
    double total = 0, kept = 0;
    for (float v : acc[w]) total += double(v) * v;
    for (size_t i = 0; i < sel.indices.size(); ++i) {
      local[sel.indices[i]] += double(sel.values[i]) / workers;
      kept += double(sel.values[i]) * sel.values[i];
      union_count[sel.indices[i]] = 1;
    }
    compression_error += (total > 0 ? (total - kept) / total : 0.0) / workers;
    for (size_t j = 0; j < n; ++j) {
      mean_acc_d[j] += double(acc[w][j]) / workers;
      mean_update[j] += double(update[w][j]) / workers;
    }
  }
  for (size_t j = 0; j < n; ++j) mean_acc[j] = static_cast<float>(mean_acc_d[j]);
  sps::kernels::topk_select(mean_acc, k, sel, scratch);
  std::vector<double> global(n, 0.0);
  size_t covered = 0;  // entries of the global top-k that some worker selected
  for (size_t i = 0; i < sel.indices.size(); ++i) {
    global[sel.indices[i]] = mean_acc_d[sel.indices[i]];
    covered += union_count[sel.indices[i]];
  }
  double gap = 0, step = 0;
  size_t union_size = 0;
  for (size_t j = 0; j < n; ++j) {
    gap += (global[j] - local[j]) * (global[j] - local[j]);
    step += mean_update[j] * mean_update[j];
    union_size += union_count[j];
  }
  gap = std::sqrt(gap);
  step = std::sqrt(step);
  const double xi = step > 0 ? gap / step : std::numeric_limits<double>::infinity();
  nlohmann::json j = {{"workers", acc.size()},
                      {"n", n},
                      {"k", k},
                      {"xi", step > 0 ? nlohmann::json(xi) : nlohmann::json(nullptr)},
                      {"gap_norm", gap},
                      {"update_norm", step},
                      {"compression_error", compression_error},
                      {"compression_error_bound", 1.0 - double(k) / double(n)},
                      {"union_over_k", double(union_size) / double(k)},
                      {"global_topk_covered", k > 0 ? double(covered) / double(k) : 0.0}};
  if (o.json) {
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::cout << fmt::format(
      "{} workers, n = {}, k = {}\n"
      "xi = |TopK(mean acc) - mean TopK(acc)| / |mean update| = {:.4g} / {:.4g} = {:.4g}\n"
      "compression error |acc - TopK(acc)|^2 / |acc|^2: {:.4f} (mean over workers; bound 1 - k/n = {:.4f})\n"
      "the workers' selections cover {} entries ({:.2f} k) and {:.1f} % of the top-k of their mean\n",
      acc.size(), n, k, gap, step, xi, compression_error, 1.0 - double(k) / double(n), union_size,
      double(union_size) / double(k), 100.0 * double(covered) / double(k));
  return 0;
}

struct SelectOptions {
  std::string path, method = "topk", error_feedback = "none", backend = "cpu";
  std::string residual_in, residual_out, indices_out, values_out, hessian, value_format = "f32";
  double ratio = 0.01, lambda = 0, scale = 1, gamma = 0, momentum = 0, clip_norm = 0;
  int64_t k = 0, max_nnz = 0, repeat = 1, threads = 1, seed = 0, step = 0, qsgd_levels = 64, quant_bucket = 512;
  bool unbiased = false, json = false;
};

int run_select(const SelectOptions& o) {
  if (o.error_feedback == "hessian_diag" && o.hessian.empty())
    return fail("--error-feedback hessian_diag needs --hessian h.f32 (the Hessian diagonal) and --gamma");
  auto g = sps::kernels::load_f32(o.path);
  if (!g.ok()) return fail(g.status().message());
  const size_t n = g->size();
  sps::kernels::SelectionParams p;
  const std::vector<std::pair<std::string, Method>> methods = {{"dense", Method::kDense},
                                                               {"topk", Method::kTopK},
                                                               {"threshold", Method::kThreshold},
                                                               {"gaussiank", Method::kGaussianK},
                                                               {"randomk", Method::kRandomK},
                                                               {"sampled", Method::kSampled}};
  for (const auto& [name, m] : methods)
    if (name == o.method) p.method = m;
  p.k = o.k > 0 ? std::min<size_t>(n, static_cast<size_t>(o.k)) : sps::kernels::k_from_ratio(o.ratio, n);
  if (p.method == Method::kDense) p.k = n;
  p.lambda = static_cast<float>(o.lambda);
  p.max_nnz = static_cast<size_t>(o.max_nnz);
  p.randomk_unbiased = o.unbiased;
  p.seed = static_cast<uint64_t>(o.seed);
  if (p.method == Method::kThreshold && !(o.lambda > 0)) return fail("--method threshold needs --lambda > 0");
  sps::kernels::CompressorOptions options;
  options.selection = p;
  options.error_feedback = o.error_feedback == "ef"             ? sps::kernels::ErrorFeedbackMode::kEf
                           : o.error_feedback == "hessian_diag" ? sps::kernels::ErrorFeedbackMode::kHessianDiag
                                                                : sps::kernels::ErrorFeedbackMode::kNone;
  const std::vector<std::pair<std::string, sps::ValueFormat>> formats = {
      {"f32", sps::ValueFormat::kF32},   {"f16", sps::ValueFormat::kF16},   {"bf16", sps::ValueFormat::kBF16},
      {"int8", sps::ValueFormat::kInt8}, {"sign", sps::ValueFormat::kSign}, {"qsgd", sps::ValueFormat::kQsgd},
      {"onebit", sps::ValueFormat::kOneBit}};
  for (const auto& [name, f] : formats)
    if (name == o.value_format) options.values = f;
  options.qsgd_levels = static_cast<int>(o.qsgd_levels);
  options.quant_bucket = static_cast<size_t>(o.quant_bucket);
  options.momentum = static_cast<float>(o.momentum);
  options.clip_norm = static_cast<float>(o.clip_norm);
  options.threads = static_cast<int>(o.threads);
  const auto backend = o.backend == "cuda" ? sps::kernels::Backend::kCuda : sps::kernels::Backend::kCpu;
  auto made = sps::kernels::make_compressor(backend, n, options);
  if (!made.ok()) return fail(made.status().message());
  auto& c = **made;
  if (!o.hessian.empty()) {
    auto h = sps::kernels::load_f32(o.hessian);
    if (!h.ok()) return fail(h.status().message());
    auto clamped = c.set_hessian_diag(*h, static_cast<float>(o.gamma));
    if (!clamped.ok()) return fail(fmt::format("{}: {}", o.hessian, clamped.status().message()));
  }
  std::vector<float> residual;
  if (!o.residual_in.empty()) {
    auto r = sps::kernels::load_f32(o.residual_in);
    if (!r.ok()) return fail(r.status().message());
    if (r->size() != n) return fail(fmt::format("{} has {} values, the gradient {}", o.residual_in, r->size(), n));
    residual = std::move(r).value();
  }
  sps::kernels::SparseVector out;
  std::vector<double> seconds;
  for (int64_t rep = 0; rep < std::max<int64_t>(1, o.repeat); ++rep) {
    if (!residual.empty()) {
      if (auto s = c.set_residual(residual); !s.ok()) return fail(s.message());
    } else if (rep > 0) {
      const std::vector<float> zeros(n, 0.0f);
      (void)c.set_residual(zeros);
    }
    const auto t0 = std::chrono::steady_clock::now();
    const auto s = c.compress(*g, static_cast<float>(o.scale), out, static_cast<uint64_t>(o.step));
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (!s.ok()) return fail(fmt::format("{}: {}", o.path, s.message()));
  }
  std::sort(seconds.begin(), seconds.end());
  const double median = seconds[seconds.size() / 2];
  if (!o.indices_out.empty())
    if (auto s = sps::kernels::save_u32(o.indices_out, out.indices); !s.ok()) return fail(s.message());
  if (!o.values_out.empty())
    if (auto s = sps::kernels::save_f32(o.values_out, out.values); !s.ok()) return fail(s.message());
  if (!o.residual_out.empty()) {
    const std::vector<float> r = c.residual();
    if (auto s = sps::kernels::save_f32(o.residual_out, r); !s.ok()) return fail(s.message());
  }
  const double residual_norm = std::sqrt(c.residual_norm_sq());
  const auto& st = c.last_stats();
  nlohmann::json j = {{"method", o.method},        {"n", n},
                      {"k_requested", p.k},        {"nnz", out.size()},
                      {"threshold", st.threshold}, {"rounds", st.rounds}, {"fallback", st.fallback},
                      {"error_feedback", o.error_feedback}, {"residual_norm", residual_norm},
                      {"seconds", median},         {"repeat", seconds.size()},
                      {"backend", o.backend},      {"value_format", o.value_format}};
  if (sps::is_scaled(options.values)) j["value_scale"] = st.value_scale;
  if (options.values == sps::ValueFormat::kOneBit) j["value_negative_scale"] = st.value_negative_scale;
  if (o.json) {
    std::cout << j.dump() << "\n";
  } else {
    std::cout << fmt::format("{}: {} of n = {}: nnz {} (k = {}), threshold {:.6g}, residual norm {:.6g}, "
                             "{:.3f} ms (median of {})\n",
                             o.path, o.method, n, out.size(), p.k, st.threshold, residual_norm, median * 1e3,
                             seconds.size());
    if (options.values == sps::ValueFormat::kOneBit)
      std::cout << fmt::format("values onebit: scales +{:.6g} / -{:.6g}\n", st.value_scale, st.value_negative_scale);
    else if (sps::is_scaled(options.values))
      std::cout << fmt::format("values {}: scale {:.6g}\n", o.value_format, st.value_scale);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"sps-grad: gradient statistics and selection with the sps kernels, offline.\n"
               "Reads raw little-endian float32 files and .npy float32 arrays."};
  app.require_subcommand(1);
  std::string stats_path;
  bool stats_json = false;
  auto* stats = app.add_subcommand("stats", "mean, std, kurtosis, histogram of |x|, closeness to a normal shape");
  stats->add_option("file", stats_path, "gradient file (.f32 raw or .npy)")->required();
  stats->add_flag("--json", stats_json, "print one JSON object");

  SelectOptions o;
  auto* sel = app.add_subcommand("select", "run one selection step (with optional error feedback) and save it");
  sel->add_option("file", o.path, "gradient file (.f32 raw or .npy)")->required();
  sel->add_option("--method", o.method, "dense | topk | threshold | gaussiank | randomk | sampled")
      ->check(CLI::IsMember({"dense", "topk", "threshold", "gaussiank", "randomk", "sampled"}));
  sel->add_option("--ratio", o.ratio, "fraction to select: k = max(1, floor(ratio n)) (default 0.01)")
      ->check(CLI::Range(0.0, 1.0));
  sel->add_option("--k", o.k, "entries to select; overrides --ratio")->check(CLI::NonNegativeNumber);
  sel->add_option("--lambda", o.lambda, "threshold: select |acc| >= lambda")->check(CLI::NonNegativeNumber);
  sel->add_option("--max-nnz", o.max_nnz, "threshold: cap on entries (0 = none)")->check(CLI::NonNegativeNumber);
  sel->add_flag("--unbiased", o.unbiased, "randomk: scale values by n/k");
  sel->add_option("--seed", o.seed, "randomk seed (default 0)");
  sel->add_option("--step", o.step, "randomk step (default 0)");
  sel->add_option("--error-feedback", o.error_feedback, "none | ef | hessian_diag (default none)")
      ->check(CLI::IsMember({"none", "ef", "hessian_diag"}));
  sel->add_option("--scale", o.scale, "acc = residual + scale * grad (default 1)");
  sel->add_option("--residual", o.residual_in, "residual to start from (float32 file)");
  sel->add_option("--residual-out", o.residual_out, "write the new residual here");
  sel->add_option("--indices", o.indices_out, "write selected indices (uint32 LE, ascending)");
  sel->add_option("--values", o.values_out, "write selected values (float32 LE, index order)");
  sel->add_option("--backend", o.backend, "cpu | cuda (default cpu)")->check(CLI::IsMember({"cpu", "cuda"}));
  sel->add_option("--threads", o.threads, "compressor threads (default 1; 0 = all cores)")
      ->check(CLI::NonNegativeNumber);
  sel->add_option("--hessian", o.hessian, "hessian_diag: the Hessian diagonal (float32 file, n values)");
  sel->add_option("--gamma", o.gamma, "hessian_diag: step size; the residual is scaled by 1 - clamp(gamma h, 0, 1)");
  sel->add_option("--momentum", o.momentum, "DGC momentum correction factor (default 0 = off)")
      ->check(CLI::Range(0.0, 0.999999));
  sel->add_option("--clip-norm", o.clip_norm, "clip the gradient to this L2 norm first (default 0 = off)")
      ->check(CLI::NonNegativeNumber);
  sel->add_option("--value-format", o.value_format,
                  "f32 | f16 | bf16 | int8 | sign | qsgd | onebit: round sent values (error kept in the "
                  "residual); the scaled ones (int8, sign, qsgd, onebit) write what the receiver decodes as float32")
      ->check(CLI::IsMember({"f32", "f16", "bf16", "int8", "sign", "qsgd", "onebit"}));
  sel->add_option("--qsgd-levels", o.qsgd_levels, "qsgd: number of levels s (default 64)")->check(CLI::Range(1, 127));
  sel->add_option("--quant-bucket", o.quant_bucket,
                  "scaled values: one scale per this many consecutive selected values, 0 = one for all (default 512)")
      ->check(CLI::NonNegativeNumber);
  sel->add_option("--repeat", o.repeat, "time this many runs, report the median (default 1)")
      ->check(CLI::PositiveNumber);
  sel->add_flag("--json", o.json, "print one JSON object");

  XiOptions xo;
  auto* xi = app.add_subcommand(
      "xi", "Alistarh et al.'s xi for one step of several workers: |TopK(mean acc) - mean TopK(acc)| / |mean update| "
            "(the files run.dump_acc_steps writes)");
  xi->add_option("acc", xo.acc_paths, "each worker's acc at the step (acc-w<rank>-s<step>.f32)")->required();
  xi->add_option("--updates", xo.update_paths,
                 "each worker's update at the step, in the same order (update-w<rank>-s<step>.f32)")
      ->required();
  xi->add_option("--ratio", xo.ratio, "k = max(1, floor(ratio n)) per worker (default 0.01)")
      ->check(CLI::Range(0.0, 1.0));
  xi->add_option("--k", xo.k, "entries per worker; overrides --ratio")->check(CLI::NonNegativeNumber);
  xi->add_flag("--json", xo.json, "print one JSON object");
  CLI11_PARSE(app, argc, argv);
  if (stats->parsed()) return run_stats(stats_path, stats_json);
  if (xi->parsed()) return run_xi(xo);
  return run_select(o);
}
