#!/usr/bin/env python3
"""Runs an example job with its own worker program through sps-launch and
checks the final test accuracy.

usage: example_job_test.py BIN_DIR CONFIG WORKER_PROGRAM MIN_ACCURACY [--set KEY=VALUE ...]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH = os.path.join(HERE, "..", "..", "scripts", "sps-launch")


def main():
    bin_dir, config, worker, min_acc = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    extra = sys.argv[5:]
    runs = tempfile.mkdtemp(prefix="sps-example-")
    try:
        cmd = [sys.executable, LAUNCH, config, "--bin", bin_dir, "--worker", worker, "--timeout", "300",
               "--set", f"run.dir={runs}"] + extra
        print("+", " ".join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        print(r.stdout[-3000:], r.stderr[-3000:], sep="\n")
        assert r.returncode == 0, f"the job failed ({r.returncode})"
        name = next(os.scandir(runs)).name
        summary = json.load(open(os.path.join(runs, name, "summary.json")))
        acc = summary["test_accuracy"]
        print(f"test accuracy {acc:.4f} (at least {min_acc} expected)")
        assert acc >= min_acc, f"test accuracy {acc} < {min_acc}"
        print("PASS")
    finally:
        shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
