// The public API's pieces that are not the training loop: Context, Registry,
// the Model and Dataset defaults.
#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "worker/context_access.h"
#include "worker/device_mirror.h"

namespace sps {

Model::~Model() = default;
Dataset::~Dataset() = default;

bool Model::hessian_diag(std::span<const float> /*params*/, const Batch& /*batch*/, std::span<float> /*out*/) {
  return false;
}

bool Model::hessian_vector(std::span<const float> /*params*/, const Batch& /*batch*/, std::span<const float> /*v*/,
                           std::span<float> /*out*/) {
  return false;
}

Evaluation Model::evaluate(std::span<const float> params, const Dataset& data) {
  // The gradient is scratch, in the model's memory.
  std::vector<float> host_grad;
  std::unique_ptr<worker::DeviceMirror> device_grad;
  std::span<float> grad;
  if (memory() == Memory::kCuda) {
    auto scratch = worker::make_device_scratch(params.size());
    if (!scratch.ok()) throw Error(scratch.status().message());
    device_grad = std::move(scratch).value();
    grad = device_grad->grad();
  } else {
    host_grad.resize(params.size());
    grad = host_grad;
  }
  std::vector<uint32_t> ids;
  Batch batch;
  double loss = 0;
  constexpr size_t kChunk = 256;
  for (size_t begin = 0; begin < data.size(); begin += kChunk) {
    const size_t end = std::min(data.size(), begin + kChunk);
    ids.resize(end - begin);
    for (size_t i = begin; i < end; ++i) ids[i - begin] = static_cast<uint32_t>(i);
    data.batch(ids, batch);
    loss += loss_and_gradient(params, batch, grad) * static_cast<double>(end - begin);
  }
  Evaluation e;
  e.examples = data.size();
  e.loss = e.examples > 0 ? loss / static_cast<double>(e.examples) : 0.0;
  e.accuracy = std::numeric_limits<double>::quiet_NaN();
  return e;
}

// --- Context -------------------------------------------------------------

struct Context::Impl {
  config::Config cfg;
  nlohmann::json json;
  mutable std::set<std::string> options_read;

  const nlohmann::json* find(const std::string& key) const {
    const nlohmann::json* node = &json;
    size_t start = 0;
    while (start <= key.size()) {
      const size_t dot = key.find('.', start);
      const std::string part = key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      if (!node->is_object() || !node->contains(part)) return nullptr;
      node = &(*node)[part];
      if (dot == std::string::npos) return node;
      start = dot + 1;
    }
    return nullptr;
  }
  const nlohmann::json& at(const std::string& key) const {
    const nlohmann::json* node = find(key);
    if (node == nullptr) throw Error(fmt::format("{}: the config has no key '{}' (see docs/config.md)", cfg.source, key));
    return *node;
  }
  [[noreturn]] void wrong_type(const std::string& key, const char* expected, const nlohmann::json& v) const {
    throw Error(fmt::format("{}: {}: expected {}, got {}", cfg.source, key, expected, v.dump()));
  }
  const std::string* option_text(const std::string& name) const {
    options_read.insert(name);
    const auto it = cfg.model.options.find(name);
    return it == cfg.model.options.end() ? nullptr : &it->second;
  }
};

Context::Context(std::shared_ptr<const Impl> impl, const Dataset* train) : impl_(std::move(impl)), train_(train) {}
Context::Context(const Context&) = default;
Context::~Context() = default;

int64_t Context::integer(const std::string& key) const {
  const auto& v = impl_->at(key);
  if (!v.is_number_integer()) impl_->wrong_type(key, "an integer", v);
  return v.get<int64_t>();
}
double Context::real(const std::string& key) const {
  const auto& v = impl_->at(key);
  if (!v.is_number()) impl_->wrong_type(key, "a number", v);
  return v.get<double>();
}
bool Context::boolean(const std::string& key) const {
  const auto& v = impl_->at(key);
  if (!v.is_boolean()) impl_->wrong_type(key, "true or false", v);
  return v.get<bool>();
}
std::string Context::string(const std::string& key) const {
  const auto& v = impl_->at(key);
  if (!v.is_string()) impl_->wrong_type(key, "a string", v);
  return v.get<std::string>();
}
std::vector<double> Context::reals(const std::string& key) const {
  const auto& v = impl_->at(key);
  if (!v.is_array()) impl_->wrong_type(key, "a list of numbers", v);
  std::vector<double> out;
  for (const auto& x : v) {
    if (!x.is_number()) impl_->wrong_type(key, "a list of numbers", v);
    out.push_back(x.get<double>());
  }
  return out;
}

int64_t Context::option(const std::string& name, int64_t fallback) const {
  const std::string* text = impl_->option_text(name);
  if (text == nullptr) return fallback;
  size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(*text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text->size())
    throw Error(fmt::format("{}: model.options.{}: expected an integer, got '{}'", impl_->cfg.source, name, *text));
  return v;
}
double Context::option(const std::string& name, double fallback) const {
  const std::string* text = impl_->option_text(name);
  if (text == nullptr) return fallback;
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(*text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text->size() || !std::isfinite(v))
    throw Error(fmt::format("{}: model.options.{}: expected a number, got '{}'", impl_->cfg.source, name, *text));
  return v;
}
std::string Context::option(const std::string& name, const std::string& fallback) const {
  const std::string* text = impl_->option_text(name);
  return text == nullptr ? fallback : *text;
}
std::vector<std::string> Context::unread_options() const {
  std::vector<std::string> out;
  for (const auto& [name, value] : impl_->cfg.model.options)
    if (impl_->options_read.count(name) == 0) out.push_back(name);
  return out;
}

Context ContextAccess::make(const config::Config& cfg, const Dataset* train) {
  auto impl = std::make_shared<Context::Impl>();
  impl->cfg = cfg;
  impl->json = config::to_json(cfg);
  return Context(std::move(impl), train);
}
const config::Config& ContextAccess::config(const Context& context) { return context.impl_->cfg; }

// --- Registry ------------------------------------------------------------

namespace {

void check_name(const std::string& what, const std::string& name) {
  const bool ok = !name.empty() && name[0] >= 'a' && name[0] <= 'z' &&
                  std::all_of(name.begin(), name.end(), [](char c) {
                    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
                  });
  if (!ok) throw Error(fmt::format("{} name '{}' is not a lower-case identifier ([a-z][a-z0-9_]*)", what, name));
}

template <class Map>
std::vector<std::string> keys_of(const Map& m) {
  std::vector<std::string> out;
  for (const auto& kv : m) out.push_back(kv.first);
  return out;
}

}  // namespace

Registry& Registry::add_model(const std::string& name, ModelFactory factory) {
  check_name("model", name);
  if (!factory) throw Error(fmt::format("model '{}': the factory is empty", name));
  if (!models_.emplace(name, std::move(factory)).second)
    throw Error(fmt::format("model '{}' is already registered", name));
  return *this;
}

Registry& Registry::add_dataset(const std::string& name, DatasetFactory factory) {
  check_name("dataset", name);
  if (!factory) throw Error(fmt::format("dataset '{}': the factory is empty", name));
  if (!datasets_.emplace(name, std::move(factory)).second)
    throw Error(fmt::format("dataset '{}' is already registered", name));
  return *this;
}

std::vector<std::string> Registry::model_names() const { return keys_of(models_); }
std::vector<std::string> Registry::dataset_names() const { return keys_of(datasets_); }

std::unique_ptr<Model> Registry::make_model(const std::string& name, const Context& context) const {
  const auto it = models_.find(name);
  if (it == models_.end())
    throw Error(fmt::format("{}: model.name: no model '{}' is registered in this worker program (registered: {})",
                            ContextAccess::config(context).source, name, fmt::join(model_names(), ", ")));
  auto model = it->second(context);
  if (!model) throw Error(fmt::format("model '{}': the factory returned no model", name));
  return model;
}

std::unique_ptr<Dataset> Registry::make_dataset(const std::string& name, const Context& context, Split split) const {
  const auto it = datasets_.find(name);
  if (it == datasets_.end())
    throw Error(fmt::format("{}: data.name: no dataset '{}' is registered in this worker program (registered: {})",
                            ContextAccess::config(context).source, name, fmt::join(dataset_names(), ", ")));
  auto data = it->second(context, split);
  if (!data) throw Error(fmt::format("dataset '{}': the factory returned no dataset", name));
  return data;
}

}  // namespace sps
