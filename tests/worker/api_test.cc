// The public API's non-network pieces: registry, context, defaults, and the
// errors a user sees for mistakes.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include "sps/worker.h"
#include "worker/context_access.h"
#include "worker/least_squares.h"

namespace sps {
namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

TEST(RegistryTest, BuiltinsAreRegisteredByName) {
  const Registry r = builtin_registry();
  EXPECT_EQ(r.model_names(), (std::vector<std::string>{"least_squares", "logreg", "mlp"}));
  EXPECT_EQ(r.dataset_names(), (std::vector<std::string>{"fashion_mnist", "least_squares"}));
}

TEST(RegistryTest, BadAndDuplicateNamesAreRefused) {
  Registry r;
  auto factory = [](const Context&) -> std::unique_ptr<Model> { return nullptr; };
  r.add_model("my_model", factory);
  EXPECT_NE(error_of([&] { r.add_model("my_model", factory); }).find("already registered"), std::string::npos);
  EXPECT_NE(error_of([&] { r.add_model("My-Model", factory); }).find("not a lower-case identifier"),
            std::string::npos);
  EXPECT_NE(error_of([&] { r.add_model("x", nullptr); }).find("factory is empty"), std::string::npos);
  // A factory returning nothing is an error, not a crash later.
  auto cfg = config::load("", {});
  ASSERT_TRUE(cfg.ok());
  const Context c = ContextAccess::make(*cfg);
  EXPECT_NE(error_of([&] { r.make_model("my_model", c); }).find("returned no model"), std::string::npos);
}

TEST(RegistryTest, UnknownNamesListWhatIsThere) {
  const Registry r = builtin_registry();
  auto cfg = config::load("", {});
  ASSERT_TRUE(cfg.ok());
  const Context c = ContextAccess::make(*cfg);
  const std::string e = error_of([&] { r.make_model("resnet", c); });
  EXPECT_NE(e.find("model.name: no model 'resnet'"), std::string::npos) << e;
  EXPECT_NE(e.find("least_squares, logreg, mlp"), std::string::npos) << e;
  EXPECT_NE(error_of([&] { r.make_dataset("imagenet", c, Split::kTrain); }).find("data.name"), std::string::npos);
  // logreg needs class labels.
  const auto data = r.make_dataset("least_squares", c, Split::kTrain);
  const std::string classifier = error_of([&] { r.make_model("logreg", ContextAccess::make(*cfg, data.get())); });
  EXPECT_NE(classifier.find("classifier"), std::string::npos) << classifier;
}

TEST(ContextTest, ReadsKeysAndOptionsWithErrorsThatNameThem) {
  auto cfg = config::load_from_string("model:\n  options:\n    width: 64\n    rate: 0.5\n    word: abc\n", "job.yaml",
                                      {"training.lr=0.25", "model.options.depth=3"});
  ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
  const Context c = ContextAccess::make(*cfg);
  EXPECT_EQ(c.real("training.lr"), 0.25);
  EXPECT_EQ(c.integer("training.batch_size"), 32);
  EXPECT_EQ(c.string("model.name"), "logreg");
  EXPECT_EQ(c.reals("model.hidden"), (std::vector<double>{512, 256}));
  EXPECT_TRUE(c.boolean("run.progress"));
  EXPECT_EQ(c.option("width", int64_t{1}), 64);
  EXPECT_EQ(c.option("depth", int64_t{1}), 3);
  EXPECT_EQ(c.option("rate", 0.1), 0.5);
  EXPECT_EQ(c.option("missing", 7.0), 7.0);
  EXPECT_EQ(c.unread_options(), (std::vector<std::string>{"word"}));
  EXPECT_NE(error_of([&] { c.option("word", int64_t{0}); }).find("job.yaml: model.options.word: expected an integer"),
            std::string::npos);
  EXPECT_NE(error_of([&] { c.integer("training.lr"); }).find("training.lr: expected an integer"), std::string::npos);
  EXPECT_NE(error_of([&] { c.real("training.nope"); }).find("no key 'training.nope'"), std::string::npos);
}

TEST(ModelTest, DefaultEvaluateIsTheMeanLossAndNoAccuracy) {
  worker::LeastSquaresData data(1000, 5, 10.0, 0.5, 1, Split::kTest);
  worker::LeastSquares m(5);
  std::vector<float> w(5, 0.1f), g(5);
  // The base-class evaluate, not an override.
  const Evaluation e = m.Model::evaluate(w, data);
  std::vector<uint32_t> all(1000);
  for (uint32_t i = 0; i < 1000; ++i) all[i] = i;
  Batch b;
  data.batch(all, b);
  EXPECT_EQ(e.examples, 1000u);
  EXPECT_NEAR(e.loss, m.loss_and_gradient(w, b, g), 1e-6);
  EXPECT_TRUE(std::isnan(e.accuracy));
}

TEST(WorkerTest, BadConfigsAndMisuseAreClearErrors) {
  const std::string path = ::testing::TempDir() + "/bad_job.yaml";
  std::ofstream(path) << "training:\n  lr: fast\n";
  const std::string e = error_of([&] { Worker w({.config_file = path}); });
  EXPECT_NE(e.find(path + ":2:7: training.lr"), std::string::npos) << e;

  Worker w({.overrides = {"model.name=least_squares", "data.name=least_squares"}});
  std::vector<float> buf(10);
  EXPECT_NE(error_of([&] { w.pull(buf); }).find("call connect(model) first"), std::string::npos);
  worker::LeastSquares m(10);
  // No scheduler port: the message says how to get one.
  EXPECT_NE(error_of([&] { w.connect(m); }).find("cluster.scheduler_port is 0"), std::string::npos);
}

}  // namespace
}  // namespace sps
