#!/usr/bin/python3
"""The Python binding (`import sps`) end to end: in-process checks, then real
jobs (scheduler, server and Python workers over loopback, started by
sps-launch) with the example's numpy model in sps's loop and in its own, a
model that raises, one that forgets to write its gradient, the PyTorch
CNN against the same network through the C++ API, and the servers' Adam,
AdamW and Adagrad against torch.optim's.

usage: python_binding_test.py BIN_DIR
"""
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
LAUNCH = os.path.join(ROOT, "scripts", "sps-launch")
EXAMPLE = os.path.join(ROOT, "examples", "python", "logreg_worker.py")
JOB = os.path.join(ROOT, "examples", "python", "job.yaml")
TEST_WORKER = os.path.join(HERE, "python_test_worker.py")
SHORT = ["--set", "training.steps=400", "--set", "run.progress_lines=2"]


def launch(bin_dir, runs, worker, sets, timeout=120):
    cmd = [sys.executable, LAUNCH, JOB, "--bin", bin_dir, "--worker", worker, "--timeout", str(timeout),
           "--set", f"run.dir={runs}"] + sets
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    out = r.stdout + r.stderr
    print(out[-2500:], flush=True)
    return r.returncode, out, time.time() - start


def summary(runs):
    with open(os.path.join(runs, "python_logreg", "summary.json")) as f:
        return json.load(f)


def in_process(bin_dir):
    sys.path.insert(0, os.path.join(bin_dir, "..", "python"))
    import numpy as np
    import sps
    assert sps.__version__.count(".") == 2, sps.__version__
    d = sps.Dataset(np.arange(6.0).reshape(3, 2), np.array([1, 0, 1]), classes=2)
    assert (len(d), d.features, d.classes) == (3, 2, 2)
    x, y = d.batch([2, 0])
    assert x.dtype == np.float32 and x.tolist() == [[4.0, 5.0], [0.0, 1.0]] and y.tolist() == [1, 1], (x, y)
    for bad, words in ((lambda: sps.Dataset(np.zeros((3, 2)), np.array([0, 2, 1]), classes=2), "label 2"),
                       (lambda: sps.Dataset(np.zeros((3, 2)), np.zeros(2), classes=0), "one entry per row"),
                       (lambda: sps.Dataset(np.zeros(3), np.zeros(3)), "2-D")):
        try:
            bad()
            raise AssertionError(f"no error for a bad dataset ({words})")
        except ValueError as e:
            assert words in str(e), e
    try:
        sps.Worker(os.path.join(ROOT, "config", "demo.yaml"), ["training.lr=fast"])
        raise AssertionError("a bad override was accepted")
    except sps.Error as e:
        assert "training.lr" in str(e) and "fast" in str(e), e
    w = sps.Worker(os.path.join(ROOT, "config", "demo.yaml"), ["model.options.width=12"])
    assert w.steps == 3000 and w.integer("training.batch_size") == 64 and w.string("data.name") == "fashion_mnist"
    assert w.option("width", 5) == 12 and w.option("depth", 2.5) == 2.5
    try:
        w.pull(np.zeros(3, np.float32))
        raise AssertionError("pull before connect was accepted")
    except sps.Error as e:
        assert "connect" in str(e), e
    w.close()
    # The example's Hessian diagonal against central differences of its gradient.
    sys.path.insert(0, os.path.dirname(EXAMPLE))
    from logreg_worker import SoftmaxRegression
    rng = np.random.default_rng(3)
    model = SoftmaxRegression(5, 3, 0.01)
    params = rng.normal(0, 0.5, 18)
    x, y = rng.normal(0, 1, (7, 5)), rng.integers(0, 3, 7)
    diag = np.empty(18)
    model.hessian_diag(params, x, y, diag)
    for j in range(18):
        h, g_plus, g_minus = 1e-4, np.empty(18), np.empty(18)
        model.loss_and_gradient(params + h * np.eye(18)[j], x, y, g_plus)
        model.loss_and_gradient(params - h * np.eye(18)[j], x, y, g_minus)
        assert abs((g_plus[j] - g_minus[j]) / (2 * h) - diag[j]) < 1e-6, (j, diag[j])
    stubs_name_everything(sps)
    print("in-process checks passed", flush=True)


def stubs_name_everything(sps):
    """The type stubs (sps/_core.pyi, next to the module, with py.typed)
    name every public attribute of sps._core and of its classes."""
    import ast
    package = os.path.dirname(sps.__file__)
    assert os.path.exists(os.path.join(package, "py.typed")), "no py.typed marker"
    with open(os.path.join(package, "_core.pyi")) as f:
        tree = ast.parse(f.read())
    stubbed = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            stubbed[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)} | \
                                 {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
        elif isinstance(node, ast.FunctionDef):
            stubbed[node.name] = set()
        elif isinstance(node, ast.AnnAssign):
            stubbed[node.target.id] = set()
    core = sps._core
    missing = []
    for name in dir(core):
        if name.startswith("_") and name != "__version__":
            continue
        if name not in stubbed:
            missing.append(name)
            continue
        obj = getattr(core, name)
        if isinstance(obj, type) and not issubclass(obj, BaseException):
            for attr in dir(obj):
                if (not attr.startswith("_") or attr in ("__init__", "__len__", "__enter__", "__exit__")) \
                        and attr not in stubbed[name] and attr not in dir(object):
                    missing.append(f"{name}.{attr}")
    assert not missing, f"sps/_core.pyi does not name: {', '.join(missing)}"


def step_losses(path):
    with open(path) as f:
        return [(l["step"], l["loss"]) for l in map(json.loads, f) if "step" in l and "loss" in l]


def torch_same_as_cpp(bin_dir, runs):
    """The PyTorch CNN through sps.TorchModel trains exactly as the same
    network through the C++ sps::TorchModel: the same loss at every step."""
    cpp = os.path.join(bin_dir, "sps-torch-cnn-worker")
    has_torch = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0
    if not os.path.exists(cpp) or not has_torch:
        print(f"SKIP torch: {'no ' + cpp if not os.path.exists(cpp) else 'no python3-torch'}")
        return
    job = os.path.join(ROOT, "examples", "torch_cnn", "job.yaml")
    losses = {}
    for worker in (cpp, os.path.join(ROOT, "examples", "python", "torch_cnn_worker.py")):
        out_dir = os.path.join(runs, os.path.basename(worker))
        cmd = [sys.executable, LAUNCH, job, "--bin", bin_dir, "--worker", worker, "--timeout", "200",
               "--set", f"run.dir={out_dir}", "--set", "training.steps=150", "--set", "data.train_limit=10000",
               "--set", "data.test_limit=1000", "--set", "run.progress_lines=2"]
        print("+", " ".join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        losses[worker] = [step_losses(os.path.join(out_dir, "torch_cnn", f"worker-{w}.jsonl")) for w in range(2)]
    a, b = losses.values()
    for w in range(2):
        assert len(a[w]) == 150 and a[w] == b[w], f"worker {w}: C++ {a[w][:3]}... Python {b[w][:3]}..."
    assert a[0][-1][1] < 0.8 * a[0][0][1], f"the CNN did not learn: {a[0][0]} -> {a[0][-1]}"
    print(f"torch: the Python and C++ workers' losses agree at all 150 steps of both workers "
          f"({a[0][0][1]:.4f} -> {a[0][-1][1]:.4f})", flush=True)


def optimizers_same_as_torch(bin_dir, runs):
    """The servers' Adam, AdamW and Adagrad against torch.optim's, one dense
    worker over two shards: the same parameters after every step."""
    if subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode != 0:
        print("SKIP optimizers: no python3-torch")
        return
    worker = os.path.join(HERE, "python_optimizer_worker.py")
    common = ["--set", "cluster.num_workers=1", "--set", "cluster.num_servers=2", "--set", "model.name=torch_mlp",
              "--set", "compression.method=dense", "--set", "compression.error_feedback=none",
              "--set", "compression.scale=1", "--set", "training.steps=100", "--set", "training.batch_size=32",
              "--set", "data.train_limit=5000", "--set", "data.test_limit=500", "--set", "run.name=optimizer"]
    for rule, sets in (("Adam", ["optimizer.name=adam", "training.lr=0.01"]),
                       ("AdamW", ["optimizer.name=adam", "training.lr=0.01", "optimizer.weight_decay=0.1",
                                  "optimizer.beta1=0.8"]),
                       ("Adagrad", ["optimizer.name=adagrad", "training.lr=0.05", "optimizer.epsilon=1e-10"])):
        extra = [a for s in sets for a in ("--set", s)]
        rc, out, _ = launch(bin_dir, runs, worker, common + extra)
        assert rc == 0 and f"optimizer matches torch.optim.{rule}: 100 steps" in out, f"{rule}: rc {rc}"


def main():
    bin_dir = os.path.abspath(sys.argv[1])
    in_process(bin_dir)
    env = dict(os.environ, PYTHONPATH=os.path.join(bin_dir, "..", "python"))
    listed = subprocess.run([EXAMPLE, "--list-models"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0 and "numpy_logreg" in listed.stdout and "fashion_mnist" in listed.stdout, listed
    usage = subprocess.run([EXAMPLE, "--help"], capture_output=True, text=True, env=env)
    assert usage.returncode == 0 and "--config" in usage.stdout, usage

    runs = tempfile.mkdtemp(prefix="sps-python-")
    try:
        # The own-loop runs start the script through an interpreter (--worker 'python3 script').
        for loop, feedback in (("sps", "ef"), ("own", "ef"), ("sps", "hessian_diag"), ("own", "hessian_diag")):
            worker = EXAMPLE if loop == "sps" else f"{sys.executable} {EXAMPLE}"
            rc, out, _ = launch(bin_dir, runs, worker, SHORT + ["--set", f"model.options.loop={loop}",
                                                                "--set", f"compression.error_feedback={feedback}"])
            assert rc == 0, f"the {loop}-loop job failed ({rc})"
            s = summary(runs)
            assert s["steps"] == 400 and s["test_accuracy"] >= 0.78, s
            assert s["bytes_pushed"] * 20 < s["bytes_pushed_dense_equivalent"], s  # top-k 1 %: sparse pushes
            assert f"numpy_logreg ({loop} loop): 400 steps" in out, "worker 0 did not report"

        rc, out, _ = launch(bin_dir, runs, TEST_WORKER, ["--set", "training.steps=60", "--set", "data.train_limit=2000"])
        assert rc == 0 and "checks passed: 60 steps" in out, f"the checks worker failed ({rc})"

        # A Python loop of its own resumes from the newest snapshot (worker.step).
        resume = ["--set", "training.steps=120", "--set", "checkpoint.interval=50",
                  "--set", "model.options.loop=own", "--set", "run.name=python_resume"]
        rc, out, _ = launch(bin_dir, runs, EXAMPLE, resume)
        assert rc == 0, f"the job to resume failed ({rc})"
        rc, out, _ = launch(bin_dir, runs, EXAMPLE, resume + ["--resume"])
        assert rc == 0 and "resuming the job from step 100" in out, f"the resumed job failed ({rc})"
        with open(os.path.join(runs, "python_resume", "summary.json")) as f:
            assert json.load(f)["steps"] == 120
        with open(os.path.join(runs, "python_resume", "worker-0.jsonl")) as f:
            steps = [l["step"] for l in map(json.loads, f) if "step" in l and "loss" in l]
        assert steps[-20:] == list(range(100, 120)), steps[-25:]

        rc, out, _ = launch(bin_dir, runs, "no-such-interpreter script.py", [])
        assert rc == 2 and "the worker program no-such-interpreter does not exist" in out, rc

        # A worker that fails before it registers stops the job at once (not
        # after the scheduler's registration timeout).
        rc, out, seconds = launch(bin_dir, runs, EXAMPLE, ["--set", "model.options.loop=neither"])
        assert rc != 0 and seconds < 30, (rc, seconds)
        assert "model.options.loop: expected 'sps' or 'own', got 'neither'" in out and "before training started" in out

        # A Python exception in the model ends the job at once, and says where it came from.
        rc, out, seconds = launch(bin_dir, runs, TEST_WORKER, ["--set", "model.options.mode=raise"])
        assert rc != 0 and seconds < 30, (rc, seconds)
        for words in ("model.loss_and_gradient", "ValueError", "the model gave up at its third batch"):
            assert words in out, f"the failure does not mention '{words}'"

        # A gradient assigned instead of written is refused, not pushed as garbage.
        rc, out, seconds = launch(bin_dir, runs, TEST_WORKER, ["--set", "model.options.mode=rebind"])
        assert rc != 0 and seconds < 30, (rc, seconds)
        assert "write it into `grad` in place" in out, "the failure does not say how to return the gradient"
        # A sweep of Python workers through sps-experiment (worker: a path).
        results = os.path.join(runs, "results")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sps-experiment"),
                            os.path.join(HERE, "tiny_python_experiment.yaml"), "--results", results, "--bin", bin_dir],
                           capture_output=True, text=True)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        with open(os.path.join(results, "tiny_python", "summary.csv")) as f:
            rows = list(csv.DictReader(f))
        assert sorted(row["label"] for row in rows) == ["own loop", "sps loop"], rows
        assert all(float(row["test_accuracy"]) > 0.65 for row in rows), rows

        torch_same_as_cpp(bin_dir, runs)
        optimizers_same_as_torch(bin_dir, runs)
        print("PASS")
    finally:
        shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
