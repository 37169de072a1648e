#include "config/config.h"

#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <utility>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <yaml-cpp/yaml.h>

namespace sps::config {
namespace {

// One accepted key: how to set it from a YAML scalar and read it back.
struct Field {
  std::string path;
  // Sets the field from `node`; on failure returns a message without location.
  std::function<Status(const YAML::Node&, Config&)> set;
  std::function<nlohmann::json(const Config&)> get;
};

std::string scalar_text(const YAML::Node& n) {
  if (n.IsNull()) return "<empty>";
  if (!n.IsScalar()) return n.IsMap() ? "<a map>" : "<a list>";
  return "'" + n.Scalar() + "'";
}

template <class Ref>
Field integer_field(std::string path, Ref ref, int64_t lo, int64_t hi) {
  return {path,
          [=](const YAML::Node& n, Config& c) -> Status {
            int64_t v = 0;
            if (!n.IsScalar() || !YAML::convert<int64_t>::decode(n, v))
              return invalid_argument(fmt::format("expected an integer, got {}", scalar_text(n)));
            if (v < lo || v > hi) return out_of_range(fmt::format("{} is outside [{}, {}]", v, lo, hi));
            using T = std::remove_reference_t<decltype(ref(c))>;
            ref(c) = static_cast<T>(v);
            return {};
          },
          [=](const Config& c) { return nlohmann::json(ref(c)); }};
}

template <class Ref>
Field real_field(std::string path, Ref ref, double lo, double hi, bool lo_open) {
  return {path,
          [=](const YAML::Node& n, Config& c) -> Status {
            double v = 0;
            if (!n.IsScalar() || !YAML::convert<double>::decode(n, v) || !std::isfinite(v))
              return invalid_argument(fmt::format("expected a finite number, got {}", scalar_text(n)));
            if ((lo_open ? v <= lo : v < lo) || v > hi)
              return out_of_range(fmt::format("{} is outside {}{}, {}]", v, lo_open ? "(" : "[", lo, hi));
            ref(c) = v;
            return {};
          },
          [=](const Config& c) { return nlohmann::json(ref(c)); }};
}

template <class Ref>
Field bool_field(std::string path, Ref ref) {
  return {path,
          [=](const YAML::Node& n, Config& c) -> Status {
            bool v = false;
            if (!n.IsScalar() || !YAML::convert<bool>::decode(n, v))
              return invalid_argument(fmt::format("expected true or false, got {}", scalar_text(n)));
            ref(c) = v;
            return {};
          },
          [=](const Config& c) { return nlohmann::json(ref(c)); }};
}

// Whether `s` is well-formed UTF-8 (strings end up in JSON logs and
// summaries, whose writer refuses anything else).
bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t extra = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      extra = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      extra = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      extra = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + extra >= s.size()) return false;  // truncated sequence
    for (size_t k = 1; k <= extra; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
    if ((extra == 1 && cp < 0x80) || (extra == 2 && cp < 0x800) || (extra == 3 && cp < 0x10000) || cp > 0x10FFFF ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += extra + 1;
  }
  return true;
}

// A string; when `choices` is non-empty the value must be one of them.
template <class Ref>
Field string_field(std::string path, Ref ref, std::vector<std::string> choices = {}, bool allow_empty = false) {
  return {path,
          [=](const YAML::Node& n, Config& c) -> Status {
            if (allow_empty && n.IsNull()) {  // `key:` or --set key=
              ref(c).clear();
              return {};
            }
            if (!n.IsScalar()) return invalid_argument(fmt::format("expected a string, got {}", scalar_text(n)));
            const std::string& v = n.Scalar();
            if (v.empty() && !allow_empty) return invalid_argument("must not be empty");
            if (!valid_utf8(v)) return invalid_argument("is not valid UTF-8 text");
            if (!choices.empty() && std::find(choices.begin(), choices.end(), v) == choices.end())
              return invalid_argument(fmt::format("'{}' is not one of: {}", v, fmt::join(choices, ", ")));
            ref(c) = v;
            return {};
          },
          [=](const Config& c) { return nlohmann::json(ref(c)); }};
}

// A list of numbers, each in [lo, hi]: YAML `[1, 2]` or, from --set, "[1, 2]".
template <class Ref>
Field real_list_field(std::string path, Ref ref, double lo, double hi) {
  return {path,
          [=](const YAML::Node& n, Config& c) -> Status {
            if (n.IsNull()) {
              ref(c).clear();
              return {};
            }
            if (!n.IsSequence()) return invalid_argument(fmt::format("expected a list of numbers, got {}", scalar_text(n)));
            std::vector<double> out;
            for (size_t i = 0; i < n.size(); ++i) {
              double v = 0;
              if (!n[i].IsScalar() || !YAML::convert<double>::decode(n[i], v) || !std::isfinite(v))
                return invalid_argument(fmt::format("entry {}: expected a finite number, got {}", i, scalar_text(n[i])));
              if (v < lo || v > hi) return out_of_range(fmt::format("entry {}: {} is outside [{}, {}]", i, v, lo, hi));
              out.push_back(v);
            }
            ref(c) = std::move(out);
            return {};
          },
          [=](const Config& c) { return nlohmann::json(ref(c)); }};
}

// A name a registry looks up: a lower-case identifier.
template <class Ref>
Field identifier_field(std::string path, Ref ref) {
  return {path,
          [=](const YAML::Node& n, Config& c) -> Status {
            if (!n.IsScalar()) return invalid_argument(fmt::format("expected a name, got {}", scalar_text(n)));
            const std::string& v = n.Scalar();
            const bool ok = !v.empty() && v[0] >= 'a' && v[0] <= 'z' &&
                            std::all_of(v.begin(), v.end(), [](char ch) {
                              return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_';
                            });
            if (!ok) return invalid_argument(fmt::format("'{}' is not a name ([a-z][a-z0-9_]*)", v));
            ref(c) = v;
            return {};
          },
          [=](const Config& c) { return nlohmann::json(ref(c)); }};
}

// A list of integers, each in [lo, hi].
template <class Ref>
Field integer_list_field(std::string path, Ref ref, int64_t lo, int64_t hi) {
  return {path,
          [=](const YAML::Node& n, Config& c) -> Status {
            if (n.IsNull()) {
              ref(c).clear();
              return {};
            }
            if (!n.IsSequence()) return invalid_argument(fmt::format("expected a list of integers, got {}", scalar_text(n)));
            std::vector<int64_t> out;
            for (size_t i = 0; i < n.size(); ++i) {
              int64_t v = 0;
              if (!n[i].IsScalar() || !YAML::convert<int64_t>::decode(n[i], v))
                return invalid_argument(fmt::format("entry {}: expected an integer, got {}", i, scalar_text(n[i])));
              if (v < lo || v > hi) return out_of_range(fmt::format("entry {}: {} is outside [{}, {}]", i, v, lo, hi));
              out.push_back(v);
            }
            ref(c) = std::move(out);
            return {};
          },
          [=](const Config& c) { return nlohmann::json(ref(c)); }};
}

// A map of names to scalars, kept as text (the model that reads one parses
// it); `--set path.name=value` sets one entry.
template <class Ref>
Field options_field(std::string path, Ref ref) {
  return {path,
          [=](const YAML::Node& n, Config& c) -> Status {
            if (n.IsNull()) return {};
            if (!n.IsMap()) return invalid_argument(fmt::format("expected a map of name: value, got {}", scalar_text(n)));
            for (const auto& kv : n) {
              if (!kv.first.IsScalar() || kv.first.Scalar().empty())
                return invalid_argument("keys must be plain names");
              if (!kv.second.IsScalar())
                return invalid_argument(fmt::format("{}: expected a single value, got {}", kv.first.Scalar(),
                                                    scalar_text(kv.second)));
              if (!valid_utf8(kv.first.Scalar()) || !valid_utf8(kv.second.Scalar()))
                return invalid_argument("names and values must be valid UTF-8 text");
              ref(c)[kv.first.Scalar()] = kv.second.Scalar();
            }
            return {};
          },
          [=](const Config& c) {
            nlohmann::json j = nlohmann::json::object();
            for (const auto& [k, v] : ref(c)) j[k] = v;
            return j;
          }};
}

// An enum spelled by name in the YAML.
template <class E, class Ref>
Field enum_field(std::string path, Ref ref, std::vector<std::pair<std::string, E>> names) {
  return {path,
          [=](const YAML::Node& n, Config& c) -> Status {
            if (n.IsScalar()) {
              for (const auto& [name, value] : names) {
                if (n.Scalar() == name) {
                  ref(c) = value;
                  return {};
                }
              }
            }
            std::vector<std::string> all;
            for (const auto& p : names) all.push_back(p.first);
            return invalid_argument(fmt::format("{} is not one of: {}", scalar_text(n), fmt::join(all, ", ")));
          },
          [=](const Config& c) {
            for (const auto& [name, value] : names)
              if (ref(c) == value) return nlohmann::json(name);
            return nlohmann::json(nullptr);
          }};
}

#define SPS_REF(expr) [](auto& c) -> auto& { return c.expr; }

const std::vector<Field>& fields() {
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  static const std::vector<Field> kFields = {
      string_field("run.name", SPS_REF(run.name)),
      string_field("run.dir", SPS_REF(run.dir)),
      string_field("run.log_level", SPS_REF(run.log_level), {"debug", "info", "warn", "error"}),
      bool_field("run.progress", SPS_REF(run.progress)),
      integer_field("run.progress_lines", SPS_REF(run.progress_lines), 1, 1000),
      bool_field("run.save_params", SPS_REF(run.save_params)),
      integer_list_field("run.dump_acc_steps", SPS_REF(run.dump_acc_steps), 0, 1000000000),
      integer_field("run.log_residual_every", SPS_REF(run.log_residual_every), 0, 1000000000),

      string_field("cluster.scheduler_host", SPS_REF(cluster.scheduler_host)),
      integer_field("cluster.scheduler_port", SPS_REF(cluster.scheduler_port), 0, 65535),
      string_field("cluster.bind_host", SPS_REF(cluster.bind_host)),
      string_field("cluster.advertise_host", SPS_REF(cluster.advertise_host), {}, /*allow_empty=*/true),
      integer_field("cluster.port_min", SPS_REF(cluster.port_min), 0, 65535),
      integer_field("cluster.port_max", SPS_REF(cluster.port_max), 0, 65535),
      integer_field("cluster.connect_timeout_ms", SPS_REF(cluster.connect_timeout_ms), 100, 3600000),
      integer_field("cluster.num_servers", SPS_REF(cluster.num_servers), 1, 1024),
      integer_field("cluster.server_threads", SPS_REF(cluster.server_threads), 0, 256),
      bool_field("cluster.keep_freed_memory", SPS_REF(cluster.keep_freed_memory)),
      integer_field("cluster.num_workers", SPS_REF(cluster.num_workers), 1, 4096),
      integer_field("cluster.heartbeat_ms", SPS_REF(cluster.heartbeat_ms), 10, 60000),
      integer_field("cluster.heartbeat_timeout_ms", SPS_REF(cluster.heartbeat_timeout_ms), 100, 3600000),
      enum_field<WorkerLoss>("cluster.on_worker_loss", SPS_REF(cluster.on_worker_loss),
                             {{"continue", WorkerLoss::kContinue}, {"abort", WorkerLoss::kAbort}}),
      enum_field<ServerLoss>("cluster.on_server_loss", SPS_REF(cluster.on_server_loss),
                             {{"abort", ServerLoss::kAbort}, {"replace", ServerLoss::kReplace}}),
      integer_field("cluster.replay_buffer_mb", SPS_REF(cluster.replay_buffer_mb), 1, 1048576),
      integer_field("cluster.startup_timeout_ms", SPS_REF(cluster.startup_timeout_ms), 100, 3600000),
      real_field("cluster.link_mbps", SPS_REF(cluster.link_mbps), 0.0, 1e7, false),

      identifier_field("model.name", SPS_REF(model.name)),
      real_field("model.init_std", SPS_REF(model.init_std), 0.0, 10.0, false),
      string_field("model.device", SPS_REF(model.device), {"cpu", "cuda"}),
      integer_list_field("model.hidden", SPS_REF(model.hidden), 1, 1 << 20),
      options_field("model.options", SPS_REF(model.options)),

      identifier_field("data.name", SPS_REF(data.name)),
      string_field("data.path", SPS_REF(data.path)),
      integer_field("data.train_limit", SPS_REF(data.train_limit), 0, kInt32Max),
      integer_field("data.test_limit", SPS_REF(data.test_limit), 0, kInt32Max),
      integer_field("data.rows", SPS_REF(data.rows), 1, kInt32Max),
      integer_field("data.features", SPS_REF(data.features), 1, 1 << 24),
      real_field("data.condition", SPS_REF(data.condition), 1.0, 1e8, false),
      real_field("data.noise", SPS_REF(data.noise), 0.0, 1e3, false),
      bool_field("data.rotate", SPS_REF(data.rotate)),

      integer_field("training.steps", SPS_REF(training.steps), 1, 1000000000),
      integer_field("training.batch_size", SPS_REF(training.batch_size), 1, 1000000),
      real_field("training.lr", SPS_REF(training.lr), 0.0, 1e3, true),
      real_field("training.l2", SPS_REF(training.l2), 0.0, 1e3, false),
      integer_field("training.seed", SPS_REF(training.seed), 0, std::numeric_limits<int64_t>::max()),
      integer_field("training.eval_every", SPS_REF(training.eval_every), 0, 1000000000),

      enum_field<CompressionMethod>("compression.method", SPS_REF(compression.method),
                                    {{"dense", CompressionMethod::kDense},
                                     {"topk", CompressionMethod::kTopK},
                                     {"threshold", CompressionMethod::kThreshold},
                                     {"gaussiank", CompressionMethod::kGaussianK},
                                     {"randomk", CompressionMethod::kRandomK},
                                     {"sampled", CompressionMethod::kSampled}}),
      real_field("compression.ratio", SPS_REF(compression.ratio), 0.0, 1.0, true),
      integer_field("compression.k", SPS_REF(compression.k), 0, kInt32Max),
      real_field("compression.lambda", SPS_REF(compression.lambda), 0.0, 1e30, false),
      integer_field("compression.max_nnz", SPS_REF(compression.max_nnz), 0, kInt32Max),
      bool_field("compression.randomk_unbiased", SPS_REF(compression.randomk_unbiased)),
      enum_field<ErrorFeedback>("compression.error_feedback", SPS_REF(compression.error_feedback),
                                {{"none", ErrorFeedback::kNone}, {"ef", ErrorFeedback::kEf},
                                 {"hessian_diag", ErrorFeedback::kHessianDiag}, {"hessian", ErrorFeedback::kHessian}}),
      integer_field("compression.hessian_every", SPS_REF(compression.hessian_every), 1, kInt32Max),
      enum_field<CompressionScope>("compression.scope", SPS_REF(compression.scope),
                                   {{"global", CompressionScope::kGlobal}, {"per_tensor", CompressionScope::kPerTensor}}),
      enum_field<ValueFormatName>("compression.values", SPS_REF(compression.values),
                                  {{"f32", ValueFormatName::kF32}, {"f16", ValueFormatName::kF16},
                                   {"bf16", ValueFormatName::kBF16}, {"int8", ValueFormatName::kInt8},
                                   {"sign", ValueFormatName::kSign}, {"qsgd", ValueFormatName::kQsgd},
                                   {"onebit", ValueFormatName::kOneBit}}),
      integer_field("compression.qsgd_levels", SPS_REF(compression.qsgd_levels), 1, 127),
      integer_field("compression.quant_bucket", SPS_REF(compression.quant_bucket), 0, kInt32Max),
      enum_field<IndexCoding>("compression.index_coding", SPS_REF(compression.index_coding),
                              {{"auto", IndexCoding::kAuto}, {"raw", IndexCoding::kRaw},
                               {"delta_varint", IndexCoding::kDeltaVarint}, {"bitmap", IndexCoding::kBitmap}}),
      real_field("compression.momentum_correction", SPS_REF(compression.momentum_correction), 0.0, 1.0, false),
      real_field("compression.clip_norm", SPS_REF(compression.clip_norm), 0.0, 1e30, false),
      bool_field("compression.rescale_residual", SPS_REF(compression.rescale_residual)),
      integer_field("compression.warmup_steps", SPS_REF(compression.warmup_steps), 0, kInt32Max),
      real_field("compression.warmup_ratio", SPS_REF(compression.warmup_ratio), 0.0, 1.0, true),
      integer_field("compression.threads", SPS_REF(compression.threads), 0, 256),
      enum_field<BackendName>("compression.backend", SPS_REF(compression.backend),
                              {{"cpu", BackendName::kCpu}, {"cuda", BackendName::kCuda}}),
      enum_field<Scale>("compression.scale", SPS_REF(compression.scale), {{"lr", Scale::kLr}, {"1", Scale::kOne}}),

      enum_field<OptimizerName>("optimizer.name", SPS_REF(optimizer.name),
                                {{"sgd", OptimizerName::kSgd},
                                 {"adagrad", OptimizerName::kAdagrad},
                                 {"adam", OptimizerName::kAdam}}),
      real_field("optimizer.momentum", SPS_REF(optimizer.momentum), 0.0, 0.999999, false),
      real_field("optimizer.weight_decay", SPS_REF(optimizer.weight_decay), 0.0, 1.0, false),
      enum_field<LrSchedule>("optimizer.lr_schedule", SPS_REF(optimizer.lr_schedule),
                             {{"constant", LrSchedule::kConstant},
                              {"step", LrSchedule::kStep},
                              {"cosine", LrSchedule::kCosine}}),
      integer_field("optimizer.warmup_steps", SPS_REF(optimizer.warmup_steps), 0, 1000000000),
      integer_field("optimizer.step_every", SPS_REF(optimizer.step_every), 1, 1000000000),
      real_field("optimizer.step_gamma", SPS_REF(optimizer.step_gamma), 0.0, 1.0, true),
      real_field("optimizer.beta1", SPS_REF(optimizer.beta1), 0.0, 0.999999, false),
      real_field("optimizer.beta2", SPS_REF(optimizer.beta2), 0.0, 0.999999, false),
      real_field("optimizer.epsilon", SPS_REF(optimizer.epsilon), 0.0, 1.0, true),
      bool_field("optimizer.lazy", SPS_REF(optimizer.lazy)),

      enum_field<CompressionMethod>("downlink.method", SPS_REF(downlink.method),
                                    {{"dense", CompressionMethod::kDense},
                                     {"topk", CompressionMethod::kTopK},
                                     {"threshold", CompressionMethod::kThreshold},
                                     {"gaussiank", CompressionMethod::kGaussianK},
                                     {"randomk", CompressionMethod::kRandomK},
                                     {"sampled", CompressionMethod::kSampled}}),
      real_field("downlink.ratio", SPS_REF(downlink.ratio), 0.0, 1.0, true),
      integer_field("downlink.k", SPS_REF(downlink.k), 0, kInt32Max),
      real_field("downlink.lambda", SPS_REF(downlink.lambda), 0.0, 1e30, false),
      enum_field<ValueFormatName>(
          "downlink.values", SPS_REF(downlink.values),
          {{"f32", ValueFormatName::kF32}, {"f16", ValueFormatName::kF16}, {"bf16", ValueFormatName::kBF16}}),

      enum_field<ConsistencyMode>("consistency.mode", SPS_REF(consistency.mode),
                                  {{"bsp", ConsistencyMode::kBsp},
                                   {"ssp", ConsistencyMode::kSsp},
                                   {"asp", ConsistencyMode::kAsp}}),
      integer_field("consistency.staleness", SPS_REF(consistency.staleness), 0, 1000000),
      integer_field("consistency.max_push_staleness", SPS_REF(consistency.max_push_staleness), -1, 1000000),
      bool_field("consistency.sparse_pull", SPS_REF(consistency.sparse_pull)),

      real_list_field("workers.delay_ms", SPS_REF(workers.delay_ms), 0.0, 3.6e6),
      real_list_field("workers.slowdown", SPS_REF(workers.slowdown), 1.0, 1000.0),
      integer_field("workers.gradient_delay", SPS_REF(workers.gradient_delay), 0, 10000),

      integer_field("checkpoint.interval", SPS_REF(checkpoint.interval), 0, 1000000000),
      real_field("checkpoint.every_seconds", SPS_REF(checkpoint.every_seconds), 0.0, 1e7, false),
      string_field("checkpoint.dir", SPS_REF(checkpoint.dir), {}, /*allow_empty=*/true),
      integer_field("checkpoint.keep", SPS_REF(checkpoint.keep), 2, 1000),
      bool_field("checkpoint.workers", SPS_REF(checkpoint.workers)),
      bool_field("checkpoint.resume", SPS_REF(checkpoint.resume)),

      bool_field("metrics.enabled", SPS_REF(metrics.enabled)),
      string_field("metrics.bind_host", SPS_REF(metrics.bind_host)),
      integer_field("metrics.port", SPS_REF(metrics.port), 0, 65535),

      bool_field("security.curve", SPS_REF(security.curve)),
      string_field("security.key_file", SPS_REF(security.key_file), {}, /*allow_empty=*/true),
      string_field("security.server_key_file", SPS_REF(security.server_key_file), {}, /*allow_empty=*/true),
      string_field("security.allowed_keys_file", SPS_REF(security.allowed_keys_file), {}, /*allow_empty=*/true),
  };
  return kFields;
}
#undef SPS_REF

const Field* find_field(const std::string& path) {
  for (const auto& f : fields())
    if (f.path == path) return &f;
  return nullptr;
}

bool is_section(const std::string& prefix) {
  for (const auto& f : fields())
    if (f.path.rfind(prefix + ".", 0) == 0) return true;
  return false;
}

std::string where(const std::string& source, const YAML::Mark& mark) {
  if (mark.line < 0) return source;
  return fmt::format("{}:{}:{}", source, mark.line + 1, mark.column + 1);
}

Status apply_map(const YAML::Node& map, const std::string& prefix, const std::string& source, Config& c) {
  for (const auto& kv : map) {
    const YAML::Node& key = kv.first;
    const YAML::Node& value = kv.second;
    if (!key.IsScalar()) return invalid_argument(fmt::format("{}: keys must be plain names", where(source, key.Mark())));
    const std::string path = prefix.empty() ? key.Scalar() : prefix + "." + key.Scalar();
    if (const Field* f = find_field(path)) {
      Status s = f->set(value, c);
      if (!s.ok()) return Status(s.code(), fmt::format("{}: {}: {}", where(source, value.Mark()), path, s.message()));
      c.set_at[path] = where(source, key.Mark());
    } else if (is_section(path)) {
      if (value.IsNull()) continue;  // an empty section keeps its defaults
      if (!value.IsMap())
        return invalid_argument(fmt::format("{}: {}: expected a map of keys", where(source, value.Mark()), path));
      SPS_RETURN_IF_ERROR(apply_map(value, path, source, c));
    } else {
      return invalid_argument(fmt::format("{}: unknown key '{}' (see docs/config.md)", where(source, key.Mark()), path));
    }
  }
  return {};
}

Status apply_override(const std::string& text, Config& c) {
  const std::string where_text = "--set " + text;
  const auto eq = text.find('=');
  if (eq == std::string::npos || eq == 0)
    return invalid_argument(fmt::format("{}: expected key.path=value", where_text));
  const std::string path = text.substr(0, eq);
  if (path.rfind("model.options.", 0) == 0 && path.size() > 14) {
    if (!valid_utf8(text))
      return invalid_argument(fmt::format("--set {}: names and values must be valid UTF-8 text", path));
    c.model.options[path.substr(14)] = text.substr(eq + 1);
    return {};
  }
  const Field* f = find_field(path);
  if (f == nullptr) return invalid_argument(fmt::format("{}: unknown key '{}' (see docs/config.md)", where_text, path));
  YAML::Node value;
  try {
    value = YAML::Load(text.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    return invalid_argument(fmt::format("{}: {}: value does not parse: {}", where_text, path, e.msg));
  }
  Status s = f->set(value, c);
  if (!s.ok()) return Status(s.code(), fmt::format("{}: {}: {}", where_text, path, s.message()));
  c.set_at[path] = where_text;
  return {};
}

Status check_cross_keys(const Config& c) {
  if (c.run.name.find('/') != std::string::npos || c.run.name == "." || c.run.name == "..")
    return invalid_argument(fmt::format("{}: run.name: '{}' must be a plain folder name", c.source, c.run.name));
  if (c.security.curve && c.security.key_file.empty())
    return invalid_argument(fmt::format("{}: security.key_file: security.curve is on but no key file is named (make a "
                                        "key pair with sps-keygen NAME and set security.key_file: NAME.key)",
                                        c.source));
  if (c.cluster.heartbeat_timeout_ms <= c.cluster.heartbeat_ms)
    return invalid_argument(fmt::format("{}: cluster.heartbeat_timeout_ms ({}) must exceed cluster.heartbeat_ms ({})",
                                        c.source, c.cluster.heartbeat_timeout_ms, c.cluster.heartbeat_ms));
  if ((c.cluster.port_min == 0) != (c.cluster.port_max == 0) || c.cluster.port_max < c.cluster.port_min)
    return invalid_argument(fmt::format("{}: cluster.port_min/port_max: {}..{} is not a port range (set both, "
                                        "port_min <= port_max, or both 0 for any free port)",
                                        c.source, c.cluster.port_min, c.cluster.port_max));
  if (c.cluster.on_server_loss == ServerLoss::kReplace && !c.checkpoint.enabled()) {
    const auto it = c.set_at.find("cluster.on_server_loss");
    return invalid_argument(fmt::format("{}: cluster.on_server_loss: replace restores the dead server's shard from "
                                        "its newest snapshot, which needs checkpoint.interval > 0 or "
                                        "checkpoint.every_seconds > 0",
                                        it != c.set_at.end() ? it->second : c.source));
  }
  if (c.model.device == "cuda" && c.compression.backend != BackendName::kCuda)
    return invalid_argument(fmt::format("{}: model.device: cuda keeps the gradient on the GPU; it needs "
                                        "compression.backend: cuda",
                                        c.source));
  if (c.compression.method == CompressionMethod::kThreshold && !(c.compression.lambda > 0))
    return invalid_argument(fmt::format("{}: compression.lambda must be > 0 for method threshold", c.source));
  if (c.compression.momentum_correction >= 1.0)
    return invalid_argument(fmt::format("{}: compression.momentum_correction must be below 1 (got {})", c.source,
                                        c.compression.momentum_correction));
  if (c.compression.randomk_unbiased && c.compression.error_feedback != ErrorFeedback::kNone)
    return invalid_argument(fmt::format(
        "{}: compression.randomk_unbiased sends (n/k)-scaled values, which error feedback cannot account for; "
        "set compression.error_feedback: none",
        c.source));
  if (c.optimizer.name != OptimizerName::kSgd) {
    // Where the key was set (file:line), else the file.
    auto at = [&](const char* key) {
      const auto it = c.set_at.find(key);
      return it != c.set_at.end() ? it->second : c.source;
    };
    const char* name = to_string(c.optimizer.name);
    if (c.compression.scale != Scale::kOne)
      return invalid_argument(fmt::format("{}: optimizer.name: {} scales each gradient by its own history and applies "
                                          "training.lr itself; it needs gradient pushes: set compression.scale: 1",
                                          at("optimizer.name"), name));
    if (c.optimizer.momentum != 0.0)
      return invalid_argument(fmt::format("{}: optimizer.momentum is for sgd only, and optimizer.name is {}{}: set "
                                          "optimizer.momentum: 0",
                                          at("optimizer.momentum"), name,
                                          c.optimizer.name == OptimizerName::kAdam
                                              ? " (adam's own momentum is optimizer.beta1)"
                                              : ""));
  }
  if (c.downlink.method != CompressionMethod::kDense) {
    auto at = [&](const char* key) {
      const auto it = c.set_at.find(key);
      return it != c.set_at.end() ? it->second : c.source;
    };
    if (c.downlink.method == CompressionMethod::kThreshold && !(c.downlink.lambda > 0))
      return invalid_argument(
          fmt::format("{}: downlink.lambda must be > 0 for downlink.method threshold", at("downlink.method")));
    if (!c.consistency.sparse_pull)
      return invalid_argument(fmt::format("{}: downlink.method: {} sends each pull only the keys the server "
                                          "published since the worker's last one, which needs "
                                          "consistency.sparse_pull: true",
                                          at("downlink.method"), to_string(c.downlink.method)));
  }
  if (c.workers.delay_ms.size() > static_cast<size_t>(c.cluster.num_workers) ||
      c.workers.slowdown.size() > static_cast<size_t>(c.cluster.num_workers))
    return invalid_argument(fmt::format("{}: workers.delay_ms / workers.slowdown list more ranks than "
                                        "cluster.num_workers ({})",
                                        c.source, c.cluster.num_workers));
  return {};
}

Result<Config> load_node(const YAML::Node& root, const std::string& source, const std::vector<std::string>& overrides) {
  Config c;
  c.source = source;
  if (root.IsDefined() && !root.IsNull()) {
    if (!root.IsMap()) return invalid_argument(fmt::format("{}: the top level must be a map of sections", source));
    SPS_RETURN_IF_ERROR(apply_map(root, "", source, c));
  }
  for (const auto& o : overrides) SPS_RETURN_IF_ERROR(apply_override(o, c));
  SPS_RETURN_IF_ERROR(check_cross_keys(c));
  return c;
}

}  // namespace

Result<Config> load_from_string(const std::string& yaml, const std::string& source_name,
                                const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    return invalid_argument(fmt::format("{}: {}", where(source_name, e.mark), e.msg));
  }
  return load_node(root, source_name, overrides);
}

Result<Config> load(const std::string& path, const std::vector<std::string>& overrides) {
  if (path.empty()) return load_node(YAML::Node(), "<defaults>", overrides);
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    return unavailable(fmt::format("{}: cannot open the config file", path));
  } catch (const YAML::Exception& e) {
    return invalid_argument(fmt::format("{}: {}", where(path, e.mark), e.msg));
  }
  return load_node(root, path, overrides);
}

nlohmann::json to_json(const Config& c) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& f : fields()) {
    const auto dot = f.path.find('.');
    j[f.path.substr(0, dot)][f.path.substr(dot + 1)] = f.get(c);
  }
  return j;
}

std::vector<std::string> ineffective_keys(const Config& c) {
  const auto& cc = c.compression;
  using M = CompressionMethod;
  const bool uses_k = cc.method != M::kDense && cc.method != M::kThreshold;
  const bool scaled = cc.values == ValueFormatName::kInt8 || cc.values == ValueFormatName::kSign ||
                      cc.values == ValueFormatName::kQsgd || cc.values == ValueFormatName::kOneBit;
  const std::string method = fmt::format("compression.method is {}", to_string(cc.method));
  const std::string values = fmt::format("compression.values is {}", to_string(cc.values));
  const std::string optimizer = fmt::format("optimizer.name is {}", to_string(c.optimizer.name));
  const bool downlink_uses_k = c.downlink.method != M::kDense && c.downlink.method != M::kThreshold;
  const std::string downlink = fmt::format("downlink.method is {}", to_string(c.downlink.method));
  struct Rule {
    const char* key;
    bool effective;
    std::string why;  // when not
  };
  const Rule rules[] = {
      {"compression.ratio", uses_k && cc.k <= 0,
       uses_k ? "compression.k is set and takes its place" : method + " (topk, gaussiank, randomk and sampled use it)"},
      {"compression.k", uses_k, method + " (topk, gaussiank, randomk and sampled use it)"},
      {"compression.lambda", cc.method == M::kThreshold, method + " (only threshold uses it)"},
      {"compression.max_nnz", cc.method == M::kThreshold, method + " (only threshold uses it)"},
      {"compression.randomk_unbiased", cc.method == M::kRandomK, method + " (only randomk uses it)"},
      {"compression.hessian_every", cc.error_feedback == ErrorFeedback::kHessianDiag,
       fmt::format("compression.error_feedback is {} (only hessian_diag uses it)", to_string(cc.error_feedback))},
      {"compression.qsgd_levels", cc.values == ValueFormatName::kQsgd, values + " (only qsgd uses it)"},
      {"compression.quant_bucket", scaled, values + " (int8, sign, qsgd and onebit use it)"},
      {"compression.warmup_steps", uses_k && cc.k <= 0,
       uses_k ? "compression.k is set, which fixes k at every step" : method + " (the warm-up schedules k)"},
      {"compression.warmup_ratio", uses_k && cc.k <= 0 && cc.warmup_steps > 0,
       uses_k && cc.k <= 0 ? std::string("compression.warmup_steps is 0") : "there is no sparsity warm-up"},
      {"compression.rescale_residual",
       cc.scale == Scale::kLr && cc.error_feedback != ErrorFeedback::kNone,
       cc.scale == Scale::kLr ? "compression.error_feedback is none (there is no residual)"
                              : "compression.scale is 1 (the residual holds gradients; the servers apply the lr)"},
      {"cluster.replay_buffer_mb", c.cluster.on_server_loss == ServerLoss::kReplace,
       "cluster.on_server_loss is abort (only replace keeps pushes to resend)"},
      {"consistency.staleness", c.consistency.mode == ConsistencyMode::kSsp,
       fmt::format("consistency.mode is {} (only ssp uses it)", to_string(c.consistency.mode))},
      {"consistency.max_push_staleness", c.consistency.mode != ConsistencyMode::kBsp,
       "consistency.mode is bsp, where every push is fresh (ssp and asp use it)"},
      {"optimizer.step_every", c.optimizer.lr_schedule == LrSchedule::kStep,
       "optimizer.lr_schedule is not step (only step uses it)"},
      {"optimizer.step_gamma", c.optimizer.lr_schedule == LrSchedule::kStep,
       "optimizer.lr_schedule is not step (only step uses it)"},
      {"optimizer.beta1", c.optimizer.name == OptimizerName::kAdam, optimizer + " (only adam uses it)"},
      {"optimizer.beta2", c.optimizer.name == OptimizerName::kAdam, optimizer + " (only adam uses it)"},
      {"optimizer.lazy", c.optimizer.name == OptimizerName::kAdam, optimizer + " (only adam uses it)"},
      {"optimizer.epsilon", c.optimizer.name != OptimizerName::kSgd, optimizer + " (adagrad and adam use it)"},
      {"downlink.ratio", downlink_uses_k && c.downlink.k <= 0,
       downlink_uses_k ? "downlink.k is set and takes its place"
                       : downlink + " (topk, gaussiank, randomk and sampled use it)"},
      {"downlink.k", downlink_uses_k, downlink + " (topk, gaussiank, randomk and sampled use it)"},
      {"downlink.lambda", c.downlink.method == M::kThreshold, downlink + " (only threshold uses it)"},
      {"downlink.values", c.downlink.method != M::kDense, downlink + " (pulls carry the parameters exactly)"},
  };
  std::vector<std::string> out;
  for (const auto& r : rules) {
    const auto it = c.set_at.find(r.key);
    if (it == c.set_at.end() || r.effective) continue;
    out.push_back(fmt::format("{}: {} has no effect: {}", it->second, r.key, r.why));
  }
  return out;
}

double learning_rate(const Config& c, int64_t step) {
  const auto& o = c.optimizer;
  double lr = c.training.lr;
  switch (o.lr_schedule) {
    case LrSchedule::kConstant: break;
    case LrSchedule::kStep: lr *= std::pow(o.step_gamma, static_cast<double>(step / o.step_every)); break;
    case LrSchedule::kCosine: {
      const double progress = std::min(1.0, static_cast<double>(step) / static_cast<double>(c.training.steps));
      lr *= 0.5 * (1.0 + std::cos(3.141592653589793 * progress));
      break;
    }
  }
  if (o.warmup_steps > 0 && step < o.warmup_steps)
    lr *= static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  return lr;
}

std::vector<std::string> all_keys() {
  std::vector<std::string> keys;
  for (const auto& f : fields()) keys.push_back(f.path);
  return keys;
}

const char* to_string(CompressionMethod m) {
  switch (m) {
    case CompressionMethod::kDense: return "dense";
    case CompressionMethod::kTopK: return "topk";
    case CompressionMethod::kThreshold: return "threshold";
    case CompressionMethod::kGaussianK: return "gaussiank";
    case CompressionMethod::kRandomK: return "randomk";
    case CompressionMethod::kSampled: return "sampled";
  }
  return "?";
}
const char* to_string(ErrorFeedback e) {
  switch (e) {
    case ErrorFeedback::kNone: return "none";
    case ErrorFeedback::kEf: return "ef";
    case ErrorFeedback::kHessianDiag: return "hessian_diag";
    case ErrorFeedback::kHessian: return "hessian";
  }
  return "?";
}
const char* to_string(ValueFormatName v) {
  switch (v) {
    case ValueFormatName::kF32: return "f32";
    case ValueFormatName::kF16: return "f16";
    case ValueFormatName::kBF16: return "bf16";
    case ValueFormatName::kInt8: return "int8";
    case ValueFormatName::kSign: return "sign";
    case ValueFormatName::kQsgd: return "qsgd";
    case ValueFormatName::kOneBit: return "onebit";
  }
  return "?";
}
const char* to_string(OptimizerName n) {
  switch (n) {
    case OptimizerName::kSgd: return "sgd";
    case OptimizerName::kAdagrad: return "adagrad";
    case OptimizerName::kAdam: return "adam";
  }
  return "?";
}
const char* to_string(ConsistencyMode m) {
  switch (m) {
    case ConsistencyMode::kBsp: return "bsp";
    case ConsistencyMode::kSsp: return "ssp";
    case ConsistencyMode::kAsp: return "asp";
  }
  return "?";
}

std::string optimizer_name(const OptimizerConfig& o) {
  std::vector<std::string> extras;
  if (o.name == OptimizerName::kSgd && o.momentum > 0) extras.push_back(fmt::format("momentum {}", o.momentum));
  if (o.name == OptimizerName::kAdam && o.lazy) extras.push_back("lazy");
  if (o.weight_decay > 0) extras.push_back(fmt::format("weight decay {}", o.weight_decay));
  if (extras.empty()) return to_string(o.name);
  return fmt::format("{} ({})", to_string(o.name), fmt::join(extras, ", "));
}

std::string downlink_name(const DownlinkConfig& d) {
  const std::string values = d.values == ValueFormatName::kF32 ? "" : fmt::format(", {} values", to_string(d.values));
  switch (d.method) {
    case CompressionMethod::kDense: return "dense";
    case CompressionMethod::kThreshold: return fmt::format("threshold (lambda {}{})", d.lambda, values);
    default:
      if (d.k > 0) return fmt::format("{} (k {} per shard{})", to_string(d.method), d.k, values);
      return fmt::format("{} (ratio {}{})", to_string(d.method), d.ratio, values);
  }
}

std::string consistency_name(const ConsistencyConfig& c) {
  if (c.mode == ConsistencyMode::kSsp) return fmt::format("ssp({})", c.staleness);
  return to_string(c.mode);
}

}  // namespace sps::config
