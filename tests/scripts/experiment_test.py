#!/usr/bin/python3
"""scripts/sps-experiment on a two-point sweep: real jobs, summary.csv with
one row per point, the PNGs, and a second invocation that reuses the results
(resumable) instead of running again.

usage: experiment_test.py BIN_DIR
"""
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def main():
    bin_dir = sys.argv[1]
    results = tempfile.mkdtemp(prefix="sps-exp-")
    try:
        cmd = ["/usr/bin/python3", os.path.join(ROOT, "scripts", "sps-experiment"),
               os.path.join(HERE, "tiny_experiment.yaml"), "--results", results, "--bin", bin_dir]
        r = subprocess.run(cmd, capture_output=True, text=True)
        print(r.stdout, r.stderr)
        assert r.returncode == 0, r.returncode
        assert "[1/2]" in r.stdout and "[2/2]" in r.stdout, "no progress line per run"
        rows = list(csv.DictReader(open(os.path.join(results, "tiny", "summary.csv"))))
        assert [row["label"] for row in rows] == ["dense", "topk"], rows
        for row in rows:
            assert float(row["test_accuracy"]) > 0.5, row
            assert int(row["steps"]) == 60
        dense, topk = rows
        assert float(topk["compression_factor"]) > 10 * float(dense["compression_factor"]), rows
        assert float(dense["bytes_to_target"]) > float(topk["bytes_to_target"]) > 0, rows
        # xi (sps-grad xi on every worker's dumped acc and update) for the top-k run only.
        k, n = 78, 7850  # top-k 1 % of softmax regression
        for step in (0, 40):
            assert dense[f"xi_s{step}"] == "" and 0 < float(topk[f"xi_s{step}"]) < 100, rows
            assert 0 < float(topk[f"compression_error_s{step}"]) <= 1 - k / n, rows
        run_dir = os.path.join(results, "tiny", "runs", topk["id"])
        acc = {s: np.fromfile(os.path.join(run_dir, f"acc-w1-s{s}.f32"), np.float32) for s in (0, 40)}
        upd = {s: np.fromfile(os.path.join(run_dir, f"update-w1-s{s}.f32"), np.float32) for s in (0, 40)}
        assert acc[0].size == n and np.array_equal(acc[0], upd[0]), "step 0 starts from an empty residual"
        assert not np.array_equal(acc[40], upd[40]), "at step 40 acc holds a residual besides the update"
        # Without error feedback acc is the whole scaled gradient, not just what was sent.
        runs = os.path.join(results, "noef")
        r4 = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "scripts", "sps-launch"),
                             os.path.join(ROOT, "config", "demo.yaml"), "--bin", bin_dir, "--set", f"run.dir={runs}",
                             "--set", "cluster.num_workers=2", "--set", "cluster.num_servers=1",
                             "--set", "data.train_limit=2000", "--set", "data.test_limit=500",
                             "--set", "training.steps=10", "--set", "compression.error_feedback=none",
                             "--set", "run.dump_acc_steps=[3]"], capture_output=True, text=True)
        assert r4.returncode == 0, r4.stdout + r4.stderr
        acc3 = np.fromfile(os.path.join(runs, "demo", "acc-w0-s3.f32"), np.float32)
        upd3 = np.fromfile(os.path.join(runs, "demo", "update-w0-s3.f32"), np.float32)
        assert np.count_nonzero(acc3) > 10 * k and np.array_equal(acc3, upd3), np.count_nonzero(acc3)
        pngs = sorted(f for f in os.listdir(os.path.join(results, "tiny")) if f.endswith(".png"))
        assert len(pngs) == 5, pngs
        for p in pngs:
            with open(os.path.join(results, "tiny", p), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n", p
        # Resumable: the second run finds both points and runs nothing.
        t0 = time.time()
        r2 = subprocess.run(cmd, capture_output=True, text=True)
        assert r2.returncode == 0 and r2.stdout.count("cached") == 2, r2.stdout
        print(f"second invocation: {time.time() - t0:.1f} s, both points cached")
        # A bad experiment file is a clear error.
        bad = os.path.join(results, "bad.yaml")
        open(bad, "w").write("name: bad\nbase: nowhere.yaml\nmatrix: {}\n")
        r3 = subprocess.run(cmd[:2] + [bad, "--results", results], capture_output=True, text=True)
        assert r3.returncode == 2 and "base:" in r3.stderr and "does not exist" in r3.stderr, r3.stderr
        print("PASS")
    finally:
        shutil.rmtree(results, ignore_errors=True)


if __name__ == "__main__":
    main()
