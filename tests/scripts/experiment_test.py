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
