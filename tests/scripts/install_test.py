#!/usr/bin/env python3
"""Installs sps into a fresh prefix, builds examples/custom_model against the
installed package (find_package(sps)), and trains its model with the
installed launcher: the path a user outside the source tree takes.

usage: install_test.py BUILD_DIR SOURCE_DIR
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-4000:], sep="\n")
        raise SystemExit(f"FAILED ({r.returncode}): {' '.join(cmd)}")
    return r


def check_docs_example(source):
    """docs/worker-api.md shows the example program as it is built here."""
    doc = open(os.path.join(source, "docs", "worker-api.md")).read()
    shown = doc.split("```cpp\n", 1)[1].split("```", 1)[0]
    program = open(os.path.join(source, "examples", "custom_model", "my_worker.cc")).read()
    assert shown.strip() in program, "docs/worker-api.md's example differs from examples/custom_model/my_worker.cc"


def main():
    build, source = sys.argv[1], sys.argv[2]
    check_docs_example(source)
    tmp = tempfile.mkdtemp(prefix="sps-install-")
    try:
        prefix = os.path.join(tmp, "prefix")
        run(["cmake", "--install", build, "--prefix", prefix])
        for f in ("include/sps/worker.h", "include/sps/model.h", "include/sps/dataset.h", "bin/sps-launch",
                  "bin/sps-worker", "bin/sps-server", "bin/sps-scheduler", "lib/cmake/sps/spsConfig.cmake"):
            assert os.path.exists(os.path.join(prefix, f)), f"not installed: {f}"
        # The installed headers stand alone: nothing from the source tree.
        for h in os.listdir(os.path.join(prefix, "include", "sps")):
            text = open(os.path.join(prefix, "include", "sps", h)).read()
            for line in text.splitlines():
                if line.startswith("#include \""):
                    assert line.startswith('#include "sps/'), f"{h} includes a private header: {line}"

        ex_build = os.path.join(tmp, "example")
        run(["cmake", "-S", os.path.join(source, "examples", "custom_model"), "-B", ex_build,
             f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release"])
        run(["cmake", "--build", ex_build])
        worker = os.path.join(ex_build, "my_worker")
        listed = run([worker, "--list-models"]).stdout
        assert "linear_svm" in listed and "mlp" in listed, listed

        # The installed launcher finds the installed binaries next to itself.
        runs = os.path.join(tmp, "runs")
        launch = os.path.join(prefix, "bin", "sps-launch")
        r = run([sys.executable, launch, os.path.join(source, "examples", "custom_model", "job.yaml"),
                 "--worker", worker, "--timeout", "240",
                 "--set", f"run.dir={runs}", "--set", "training.steps=300", "--set", "data.train_limit=10000",
                 "--set", "data.test_limit=2000", "--set", "run.progress_lines=3"])
        print(r.stdout[-3000:])
        summary = json.load(open(os.path.join(runs, "custom_model", "summary.json")))
        acc = summary["test_accuracy"]
        print(f"linear_svm through the installed package: test accuracy {acc:.4f}")
        assert acc > 0.70, f"test accuracy {acc} is below 0.70"
        # The Python binding, when built: installed where the installed launcher
        # finds it, loading the installed libsps.
        if os.path.isdir(os.path.join(build, "python")):
            site = os.path.join(prefix, "lib", "python3", "dist-packages")
            for f in ("__init__.py", "torch_model.py"):
                assert os.path.exists(os.path.join(site, "sps", f)), f"not installed: sps/{f}"
            r = run([sys.executable, launch, os.path.join(source, "examples", "python", "job.yaml"),
                     "--worker", os.path.join(source, "examples", "python", "logreg_worker.py"), "--timeout", "240",
                     "--set", f"run.dir={runs}", "--set", "training.steps=300", "--set", "run.progress_lines=3"])
            summary = json.load(open(os.path.join(runs, "python_logreg", "summary.json")))
            print(f"numpy_logreg through the installed binding: test accuracy {summary['test_accuracy']:.4f}")
            assert summary["test_accuracy"] > 0.70, summary
        # The stock worker refuses the user's model name with a clear message.
        r = subprocess.run([sys.executable, launch, os.path.join(source, "examples", "custom_model", "job.yaml"),
                            "--set", f"run.dir={runs}"], capture_output=True, text=True)
        assert r.returncode == 2 and "model.name: 'linear_svm' is not registered" in r.stderr, r.stderr
        print("PASS")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
