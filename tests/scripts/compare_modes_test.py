#!/usr/bin/python3
"""scripts/compare-modes on real jobs: bsp, asp and asp with a strict
staleness limit (asp/0) in one table, with the refused share; a bad mode
spec is a clear error.

usage: compare_modes_test.py BIN_DIR
"""
import csv
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def main():
    bin_dir = sys.argv[1]
    out = tempfile.mkdtemp(prefix="sps-compare-")
    try:
        cmd = ["/usr/bin/python3", os.path.join(ROOT, "scripts", "compare-modes"),
               os.path.join(ROOT, "config", "demo.yaml"), "--bin", bin_dir, "--target", "0.5",
               "--modes", "bsp", "asp", "asp/0"]
        for s in ["run.dir=" + out, "run.name=cmp", "run.progress=false", "cluster.num_workers=3",
                  "cluster.num_servers=1", "data.train_limit=2000", "data.test_limit=500", "training.steps=120",
                  "training.eval_every=20", "workers.slowdown=[1, 1, 3]"]:
            cmd += ["--set", s]
        r = subprocess.run(cmd, capture_output=True, text=True)
        print(r.stdout, r.stderr)
        assert r.returncode == 0, r.returncode
        rows = {row["mode"]: row for row in csv.DictReader(open(os.path.join(out, "cmp-compare.csv")))}
        assert list(rows) == ["bsp", "asp", "asp/0"], list(rows)
        assert int(rows["bsp"]["staleness_max"]) == 0, rows["bsp"]
        assert float(rows["asp"]["refused_percent"]) == 0.0, rows["asp"]
        # asp/0 applies only pushes computed on the current version: with
        # three workers and a straggler, some are refused.
        assert int(rows["asp/0"]["staleness_max"]) == 0, rows["asp/0"]
        assert float(rows["asp/0"]["refused_percent"]) > 0.0, rows["asp/0"]
        assert "refused" in r.stdout and "asp/0" in r.stdout, r.stdout
        for row in rows.values():
            assert float(row["final_test_accuracy"]) > 0.5, row
        bad = subprocess.run(cmd[:5] + ["--modes", "asp/x"], capture_output=True, text=True)
        assert bad.returncode != 0 and "unknown mode 'asp/x'" in bad.stderr, bad.stderr
        print("PASS")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
