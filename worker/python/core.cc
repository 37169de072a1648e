// sps._core, the compiled half of the Python binding (`import sps`;
// sps/__init__.py re-exports it): a model written in Python (numpy,
// PyTorch, anything that fills a float32 array) trains through sps, with
// sps's loop or a loop of its own. Built on libsps's public headers only,
// like any user program.
//
// Threads: every call that may wait on the network releases the GIL; the
// model's Python methods are called back with the GIL held. Arrays handed
// to the model are views of sps's buffers, valid during the call only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include <sps/worker.h>

namespace py = pybind11;

namespace {

// A float32 view of `data` without a copy (a None base keeps numpy from
// copying); read-only unless `writable`.
template <class T>
py::array view(const T* data, std::vector<py::ssize_t> shape, bool writable) {
  py::array a(py::dtype::of<T>(), std::move(shape), const_cast<T*>(data), py::none());
  if (!writable) a.attr("setflags")(py::arg("write") = false);
  return a;
}

// (x, y) of a batch: x as rows x cols, y the labels (int32) or targets (float32).
// Writable, though writing into them changes nothing sps keeps (the batch is
// rebuilt every step): torch.from_numpy warns about read-only arrays.
py::tuple batch_arrays(const sps::Batch& b) {
  py::array x = view(b.x.data(), {static_cast<py::ssize_t>(b.rows), static_cast<py::ssize_t>(b.cols)}, true);
  py::array y = b.labels.empty() ? view(b.targets.data(), {static_cast<py::ssize_t>(b.targets.size())}, true)
                                 : view(b.labels.data(), {static_cast<py::ssize_t>(b.labels.size())}, true);
  return py::make_tuple(x, y);
}

// A float32 array the caller hands sps to write into: checked, never converted
// (a converted copy would silently receive the values instead of `a`).
std::span<float> writable_floats(py::array a, size_t n, const char* what) {
  if (!a.dtype().is(py::dtype::of<float>()))
    throw py::type_error(std::string(what) + ": expected a float32 array, got dtype " +
                         std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(what) + ": the array must be C-contiguous");
  if (!a.writeable()) throw py::value_error(std::string(what) + ": the array is read-only");
  if (static_cast<size_t>(a.size()) != n)
    throw py::value_error(std::string(what) + ": expected " + std::to_string(n) + " values, got " +
                          std::to_string(a.size()));
  return {static_cast<float*>(a.mutable_data()), n};
}

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

// An exception from the model's Python code becomes an sps::Error naming the
// method (the worker reports it to the scheduler, so the job ends with it).
template <class F>
auto call_model(const char* method, F&& f) {
  py::gil_scoped_acquire gil;
  try {
    return f();
  } catch (py::error_already_set& e) {
    throw sps::Error(std::string("model.") + method + ": " + e.what());
  } catch (const std::exception& e) {  // a cast or a check of what the method returned
    throw sps::Error(std::string("model.") + method + ": " + e.what());
  }
}

// sps::Model over a Python object with `tensors` (a list of (name, shape)),
// `init(params, seed)`, `loss_and_gradient(params, x, y, grad) -> loss` and,
// optionally, `evaluate(params, x, y) -> (loss, accuracy)` and
// `hessian_diag(params, x, y, out)`.
class PythonModel final : public sps::Model {
 public:
  explicit PythonModel(py::object model) : model_(std::move(model)) {
    py::object tensors = model_.attr("tensors");
    if (PyCallable_Check(tensors.ptr())) tensors = tensors();
    for (auto item : tensors) {
      auto pair = item.cast<py::tuple>();
      if (pair.size() != 2) throw py::value_error("model.tensors: each entry must be (name, shape)");
      sps::TensorSpec t{pair[0].cast<std::string>(), {}};
      if (py::isinstance<py::int_>(pair[1])) {
        t.shape.push_back(pair[1].cast<size_t>());
      } else {
        t.shape = pair[1].cast<std::vector<size_t>>();
      }
      tensors_.push_back(std::move(t));
    }
    if (tensors_.empty()) throw py::value_error("model.tensors: the model declares no tensors");
    has_evaluate_ = py::hasattr(model_, "evaluate");
    has_hessian_diag_ = py::hasattr(model_, "hessian_diag");
  }
  ~PythonModel() override {
    py::gil_scoped_acquire gil;
    model_ = py::object();
  }

  std::vector<sps::TensorSpec> tensors() const override { return tensors_; }

  void init(std::span<float> params, uint64_t seed) override {
    call_model("init", [&] { model_.attr("init")(vector_view(params), seed); });
  }

  double loss_and_gradient(std::span<const float> params, const sps::Batch& batch, std::span<float> grad) override {
    // A model that rebinds `grad` instead of writing into it would push
    // whatever the buffer held; NaN marks it unwritten (checked below).
    std::fill(grad.begin(), grad.end(), std::numeric_limits<float>::quiet_NaN());
    const double loss = call_model("loss_and_gradient", [&] {
      py::tuple xy = batch_arrays(batch);
      return model_.attr("loss_and_gradient")(read_only(params), xy[0], xy[1], vector_view(grad)).cast<double>();
    });
    if (!grad.empty() && std::isnan(grad.front()) && std::isnan(grad.back()))
      throw sps::Error(
          "model.loss_and_gradient: the gradient is NaN at both ends: write it into `grad` in place "
          "(grad[:] = g, or numpy's out=grad); assigning to the name `grad` writes nothing");
    return loss;
  }

  sps::Evaluation evaluate(std::span<const float> params, const sps::Dataset& data) override {
    if (!has_evaluate_) return Model::evaluate(params, data);
    // Chunks of the dataset, so memory stays bounded; weighted by their size.
    constexpr size_t kChunk = 8192;
    sps::Evaluation total;
    double accuracy_sum = 0;
    std::vector<uint32_t> ids;
    sps::Batch batch;
    for (size_t begin = 0; begin < data.size(); begin += kChunk) {
      const size_t end = std::min(data.size(), begin + kChunk);
      ids.resize(end - begin);
      std::iota(ids.begin(), ids.end(), static_cast<uint32_t>(begin));
      data.batch(ids, batch);
      auto [loss, accuracy] = call_model("evaluate", [&] {
        py::tuple xy = batch_arrays(batch);
        py::tuple r = model_.attr("evaluate")(read_only(params), xy[0], xy[1]).cast<py::tuple>();
        if (r.size() != 2) throw py::value_error("must return (loss, accuracy)");
        const double acc = r[1].is_none() ? std::nan("") : r[1].cast<double>();
        return std::pair<double, double>(r[0].cast<double>(), acc);
      });
      total.loss += loss * static_cast<double>(ids.size());
      accuracy_sum += accuracy * static_cast<double>(ids.size());
      total.examples += ids.size();
    }
    if (total.examples > 0) {
      total.loss /= static_cast<double>(total.examples);
      total.accuracy = accuracy_sum / static_cast<double>(total.examples);
    }
    return total;
  }

  bool provides_hessian_diag() const override { return has_hessian_diag_; }
  bool hessian_diag(std::span<const float> params, const sps::Batch& batch, std::span<float> out) override {
    if (!has_hessian_diag_) return false;
    return call_model("hessian_diag", [&] {
      py::tuple xy = batch_arrays(batch);
      py::object r = model_.attr("hessian_diag")(read_only(params), xy[0], xy[1], vector_view(out));
      return r.is_none() || r.cast<bool>();
    });
  }

 private:
  static py::array vector_view(std::span<float> s) { return view(s.data(), {static_cast<py::ssize_t>(s.size())}, true); }
  static py::array read_only(std::span<const float> s) {
    return view(s.data(), {static_cast<py::ssize_t>(s.size())}, false);
  }

  py::object model_;
  std::vector<sps::TensorSpec> tensors_;
  bool has_evaluate_ = false;
  bool has_hessian_diag_ = false;
};

// A dataset held in memory, copied from numpy arrays.
class ArrayDataset final : public sps::Dataset {
 public:
  ArrayDataset(const FloatArray& x, const py::array& y, size_t classes) : classes_(classes) {
    if (x.ndim() != 2) throw py::value_error("Dataset: x must be 2-D (examples x features)");
    rows_ = static_cast<size_t>(x.shape(0));
    cols_ = static_cast<size_t>(x.shape(1));
    x_.assign(x.data(), x.data() + x.size());
    if (static_cast<size_t>(y.size()) != rows_ || y.ndim() != 1)
      throw py::value_error("Dataset: y must be 1-D with one entry per row of x (" + std::to_string(rows_) + ")");
    if (classes_ > 0) {
      auto labels = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(y);
      labels_.assign(labels.data(), labels.data() + labels.size());
      for (int32_t l : labels_)
        if (l < 0 || static_cast<size_t>(l) >= classes_)
          throw py::value_error("Dataset: label " + std::to_string(l) + " outside [0, " + std::to_string(classes_) +
                                ")");
    } else {
      auto targets = FloatArray::ensure(y);
      targets_.assign(targets.data(), targets.data() + targets.size());
    }
  }
  size_t size() const override { return rows_; }
  size_t features() const override { return cols_; }
  size_t classes() const override { return classes_; }
  void batch(std::span<const uint32_t> ids, sps::Batch& out) const override {
    out.rows = ids.size();
    out.cols = cols_;
    out.x.resize(ids.size() * cols_);
    out.labels.clear();
    out.targets.clear();
    for (size_t i = 0; i < ids.size(); ++i) {
      std::copy_n(x_.data() + size_t{ids[i]} * cols_, cols_, out.x.data() + i * cols_);
      if (classes_ > 0) {
        out.labels.push_back(labels_[ids[i]]);
      } else {
        out.targets.push_back(targets_[ids[i]]);
      }
    }
  }

 private:
  size_t rows_ = 0, cols_ = 0, classes_ = 0;
  std::vector<float> x_, targets_;
  std::vector<int32_t> labels_;
};

// Copies of a batch's arrays (they outlive the Batch).
py::tuple batch_copies(const sps::Batch& b) {
  py::array_t<float> x({static_cast<py::ssize_t>(b.rows), static_cast<py::ssize_t>(b.cols)});
  std::copy(b.x.begin(), b.x.end(), x.mutable_data());
  if (!b.labels.empty() || b.targets.empty()) {
    py::array_t<int32_t> y(static_cast<py::ssize_t>(b.labels.size()));
    std::copy(b.labels.begin(), b.labels.end(), y.mutable_data());
    return py::make_tuple(x, y);
  }
  py::array_t<float> y(static_cast<py::ssize_t>(b.targets.size()));
  std::copy(b.targets.begin(), b.targets.end(), y.mutable_data());
  return py::make_tuple(x, y);
}

std::vector<uint32_t> checked_ids(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ids,
                                  size_t size) {
  std::vector<uint32_t> out(static_cast<size_t>(ids.size()));
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t id = ids.data()[i];
    if (id < 0 || static_cast<size_t>(id) >= size)
      throw py::index_error("Dataset.batch: index " + std::to_string(id) + " outside [0, " + std::to_string(size) +
                            ")");
    out[i] = static_cast<uint32_t>(id);
  }
  return out;
}

py::dict result_dict(const sps::TrainResult& r) {
  py::dict d;
  d["steps"] = r.steps;
  d["last_batch_loss"] = r.last_batch_loss;
  d["train_loss"] = r.train.loss;
  d["train_accuracy"] = r.train.accuracy;
  d["test_loss"] = r.test.loss;
  d["test_accuracy"] = r.test.accuracy;
  d["bytes_pushed"] = r.bytes_pushed;
  d["bytes_pulled"] = r.bytes_pulled;
  d["wall_seconds"] = r.wall_seconds;
  return d;
}

sps::Split split_named(const std::string& name) {
  if (name == "train") return sps::Split::kTrain;
  if (name == "test") return sps::Split::kTest;
  throw py::value_error("split: expected 'train' or 'test', got '" + name + "'");
}

// A Worker with the Python objects it calls back (they must outlive it).
class PythonWorker {
 public:
  explicit PythonWorker(sps::WorkerOptions options) {
    py::gil_scoped_release release;
    worker_ = std::make_unique<sps::Worker>(std::move(options));
  }

  sps::Worker& worker() {
    if (!worker_) throw sps::Error("this Worker was closed");
    return *worker_;
  }

  void connect(py::object model) {
    model_ = std::make_unique<PythonModel>(std::move(model));
    num_params_ = sps::num_params(model_->tensors());
    py::gil_scoped_release release;
    worker().connect(*model_);
  }

  uint64_t pull(const py::array& params) {
    require_connected("pull");
    std::span<float> out = writable_floats(params, num_params_, "pull(params)");
    py::gil_scoped_release release;
    return worker().pull(out);
  }

  void push(const FloatArray& grad, double loss, std::optional<py::tuple> batch_xy) {
    require_connected("push");
    if (static_cast<size_t>(grad.size()) != num_params_)
      throw py::value_error("push(grad): expected " + std::to_string(num_params_) + " values, got " +
                            std::to_string(grad.size()));
    sps::Batch batch;
    if (batch_xy) batch = batch_from(*batch_xy);
    std::span<const float> g(grad.data(), num_params_);
    py::gil_scoped_release release;
    worker().push(g, loss, batch_xy ? &batch : nullptr);
  }

  py::dict train(py::object model, std::shared_ptr<sps::Dataset> train_set, std::shared_ptr<sps::Dataset> test_set) {
    if (!train_set) throw py::value_error("train: a training Dataset is required");
    model_ = std::make_unique<PythonModel>(std::move(model));
    num_params_ = sps::num_params(model_->tensors());
    sps::TrainResult r;
    {
      py::gil_scoped_release release;
      r = worker().train(*model_, *train_set, test_set.get());
    }
    return result_dict(r);
  }

  py::dict finish(std::shared_ptr<sps::Dataset> train_set, std::shared_ptr<sps::Dataset> test_set) {
    require_connected("finish");
    sps::TrainResult r;
    {
      py::gil_scoped_release release;
      r = worker().finish(train_set.get(), test_set.get());
    }
    return result_dict(r);
  }

  // Ends this worker's part at once (the scheduler is told it stopped).
  void close() {
    py::gil_scoped_release release;
    worker_.reset();
  }

  size_t num_params() const { return num_params_; }

 private:
  void require_connected(const char* what) const {
    if (!model_) throw sps::Error(std::string(what) + ": call connect(model) first");
  }
  static sps::Batch batch_from(const py::tuple& xy) {
    if (xy.size() != 2) throw py::value_error("push(batch=...): expected (x, y)");
    auto x = FloatArray::ensure(xy[0]);
    if (!x || x.ndim() != 2) throw py::value_error("push(batch=...): x must be a 2-D float array");
    sps::Batch b;
    b.rows = static_cast<size_t>(x.shape(0));
    b.cols = static_cast<size_t>(x.shape(1));
    b.x.assign(x.data(), x.data() + x.size());
    py::array y = py::array::ensure(xy[1]);
    if (py::isinstance<py::array_t<float>>(y) || py::isinstance<py::array_t<double>>(y)) {
      auto t = FloatArray::ensure(y);
      b.targets.assign(t.data(), t.data() + t.size());
    } else {
      auto l = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(y);
      b.labels.assign(l.data(), l.data() + l.size());
    }
    return b;
  }

  // Declared first: destroyed last, after the worker that refers to them.
  std::unique_ptr<PythonModel> model_;
  std::unique_ptr<sps::Worker> worker_;
  size_t num_params_ = 0;
};

// A registry naming what a Python program provides, for --list-models and the
// config check; its factories are never called (the program builds its own).
sps::Registry registry_naming(const std::vector<std::string>& models, const std::vector<std::string>& datasets) {
  sps::Registry r = sps::builtin_registry();
  for (const auto& m : models)
    if (!r.has_model(m))
      r.add_model(m, [m](const sps::Context&) -> std::unique_ptr<sps::Model> {
        throw sps::Error("model '" + m + "' is built by the Python program");
      });
  for (const auto& d : datasets)
    if (!r.has_dataset(d))
      r.add_dataset(d, [d](const sps::Context&, sps::Split) -> std::unique_ptr<sps::Dataset> {
        throw sps::Error("dataset '" + d + "' is built by the Python program");
      });
  return r;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "The compiled part of the sps package; use `import sps`.";
  m.attr("__version__") = SPS_PACKAGE_VERSION;
  py::register_exception<sps::Error>(m, "Error", PyExc_RuntimeError);

  py::class_<sps::WorkerOptions>(m, "WorkerOptions", "What a Worker is started with.")
      .def(py::init([](std::string config_file, std::vector<std::string> overrides, int rank) {
             return sps::WorkerOptions{std::move(config_file), std::move(overrides), rank};
           }),
           py::arg("config_file") = "", py::arg("overrides") = std::vector<std::string>{}, py::arg("rank") = -1)
      .def_readwrite("config_file", &sps::WorkerOptions::config_file)
      .def_readwrite("overrides", &sps::WorkerOptions::overrides)
      .def_readwrite("rank", &sps::WorkerOptions::rank)
      .def("__repr__", [](const sps::WorkerOptions& o) {
        return "WorkerOptions(config_file='" + o.config_file + "', " + std::to_string(o.overrides.size()) +
               " overrides, rank=" + std::to_string(o.rank) + ")";
      });

  m.def(
      "command_line",
      [](std::vector<std::string> argv, std::vector<std::string> models, std::vector<std::string> datasets) {
        const sps::Registry registry = registry_naming(models, datasets);
        std::vector<char*> args;
        for (auto& a : argv) args.push_back(a.data());
        args.push_back(nullptr);
        sps::WorkerCommandLine r =
            sps::parse_worker_command_line(static_cast<int>(argv.size()), args.data(), registry);
        if (!r.options) {
          PyErr_SetObject(PyExc_SystemExit, py::int_(r.exit_code).ptr());
          throw py::error_already_set();
        }
        return *r.options;
      },
      py::arg("argv"), py::arg("models") = std::vector<std::string>{},
      py::arg("datasets") = std::vector<std::string>{},
      "Parses a worker program's command line as every sps worker does (--config, --set, --rank, --resume,\n"
      "--print-config, --list-models, --help) and returns the WorkerOptions. `models` and `datasets` name what\n"
      "this program provides (besides the built-ins), for --list-models and the model.name/data.name check.\n"
      "Raises SystemExit after --help, --list-models, --print-config or a bad command line or config.");

  py::class_<sps::Dataset, std::shared_ptr<sps::Dataset>>(
      m, "Dataset",
      "Examples a worker samples its batches from: Dataset(x, y, classes=0) holds copies of numpy arrays\n"
      "(x: examples x features; y: int labels when classes > 0, float targets otherwise); Worker.dataset()\n"
      "gives the job's built-in data.name.")
      .def(py::init([](const FloatArray& x, const py::array& y, size_t classes) -> std::shared_ptr<sps::Dataset> {
             return std::make_shared<ArrayDataset>(x, y, classes);
           }),
           py::arg("x"), py::arg("y"), py::arg("classes") = 0)
      .def("__len__", &sps::Dataset::size)
      .def_property_readonly("features", &sps::Dataset::features)
      .def_property_readonly("classes", &sps::Dataset::classes)
      .def(
          "batch",
          [](const sps::Dataset& d, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ids) {
            const std::vector<uint32_t> checked = checked_ids(ids, d.size());
            sps::Batch b;
            d.batch(checked, b);
            return batch_copies(b);
          },
          py::arg("ids"), "(x, y) of the examples `ids`, as new arrays.")
      .def(
          "arrays",
          [](const sps::Dataset& d) {
            std::vector<uint32_t> ids(d.size());
            std::iota(ids.begin(), ids.end(), 0u);
            sps::Batch b;
            d.batch(ids, b);
            return batch_copies(b);
          },
          "(x, y) of every example, as new arrays.");

  py::class_<PythonWorker>(
      m, "Worker",
      "One worker of an sps job. Use it as a context manager (or call close()) so that a program that stops\n"
      "early tells the scheduler at once.\n\n"
      "  with sps.Worker(sps.command_line(sys.argv, models=['my_model'])) as w:\n"
      "      result = w.train(model, w.dataset('train'), w.dataset('test'))\n\n"
      "or a loop of your own: connect(model), then pull(params) / push(grad, loss) per step, then finish().\n"
      "A model is any object with `tensors` (a list of (name, shape)), `init(params, seed)` and\n"
      "`loss_and_gradient(params, x, y, grad) -> loss` (write the gradient into `grad`), and optionally\n"
      "`evaluate(params, x, y) -> (loss, accuracy)` and `hessian_diag(params, x, y, out)`.")
      .def(py::init<sps::WorkerOptions>(), py::arg("options"))
      .def(py::init([](std::string config_file, std::vector<std::string> overrides, int rank) {
             return std::make_unique<PythonWorker>(
                 sps::WorkerOptions{std::move(config_file), std::move(overrides), rank});
           }),
           py::arg("config_file") = "", py::arg("overrides") = std::vector<std::string>{}, py::arg("rank") = -1)
      .def("__enter__", [](PythonWorker& w) -> PythonWorker& { return w; }, py::return_value_policy::reference)
      .def("__exit__", [](PythonWorker& w, py::args) { w.close(); })
      .def("close", &PythonWorker::close, "Ends this worker's part now (the scheduler is told it stopped).")
      .def("connect", &PythonWorker::connect, py::arg("model"),
           "Registers with the scheduler; worker 0 writes model.init() into the servers; waits for every worker.")
      .def("pull", &PythonWorker::pull, py::arg("params"),
           "Writes the current parameters into `params` (a float32 array of num_params), waiting as the\n"
           "consistency mode requires; returns their version.")
      .def("push", &PythonWorker::push, py::arg("grad"), py::arg("loss"), py::arg("batch") = std::nullopt,
           "Error feedback, selection and push of one step's gradient. `batch` (x, y) is needed only for\n"
           "compression.error_feedback: hessian_diag.")
      .def("train", &PythonWorker::train, py::arg("model"), py::arg("train"), py::arg("test") = nullptr,
           "The whole loop: connect, training.steps x (pull, batch from this worker's partition,\n"
           "loss_and_gradient, push), finish. Returns the result as a dict.")
      .def("finish", &PythonWorker::finish, py::arg("train") = nullptr, py::arg("test") = nullptr,
           "Ends a loop of your own: worker 0 evaluates the final model on the datasets given; waits for the\n"
           "job to end. Returns the result as a dict.")
      .def(
          "dataset",
          [](PythonWorker& w, const std::string& split) -> std::shared_ptr<sps::Dataset> {
            const sps::Context context = w.worker().context();
            const sps::Registry registry = sps::builtin_registry();
            return registry.make_dataset(context.string("data.name"), context, split_named(split));
          },
          py::arg("split"), "The job's built-in dataset (data.name), split 'train' or 'test'.")
      .def_property_readonly("rank", [](PythonWorker& w) { return w.worker().rank(); })
      .def_property_readonly("num_workers", [](PythonWorker& w) { return w.worker().num_workers(); })
      .def_property_readonly("steps", [](PythonWorker& w) { return w.worker().steps(); })
      .def_property_readonly("step", [](PythonWorker& w) { return w.worker().step(); })
      .def_property_readonly("num_params", &PythonWorker::num_params)
      .def("integer", [](PythonWorker& w, const std::string& key) { return w.worker().context().integer(key); })
      .def("real", [](PythonWorker& w, const std::string& key) { return w.worker().context().real(key); })
      .def("boolean", [](PythonWorker& w, const std::string& key) { return w.worker().context().boolean(key); })
      .def("string", [](PythonWorker& w, const std::string& key) { return w.worker().context().string(key); })
      .def("reals", [](PythonWorker& w, const std::string& key) { return w.worker().context().reals(key); })
      .def(
          "option",
          [](PythonWorker& w, const std::string& name, const py::object& fallback) -> py::object {
            const sps::Context c = w.worker().context();
            if (py::isinstance<py::bool_>(fallback))
              throw py::type_error("option: a bool fallback is not supported; use 0 or 1");
            if (py::isinstance<py::int_>(fallback)) return py::int_(c.option(name, fallback.cast<int64_t>()));
            if (py::isinstance<py::float_>(fallback)) return py::float_(c.option(name, fallback.cast<double>()));
            if (py::isinstance<py::str>(fallback)) return py::str(c.option(name, fallback.cast<std::string>()));
            throw py::type_error("option: the fallback must be an int, a float or a str");
          },
          py::arg("name"), py::arg("fallback"),
          "model.options.<name> as the fallback's type (int, float or str), or the fallback when unset.");
}
