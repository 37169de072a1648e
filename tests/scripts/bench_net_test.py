#!/usr/bin/env python3
"""sps-bench-net end to end on small cases: every row carries the documented
fields, both sides moved bytes, and the per-case push size matches the index
coding asked for (delta varint pushes are smaller than raw ones)."""
import json
import os
import subprocess
import sys
import tempfile

BIN = sys.argv[1]


def run(tmp, name, extra):
    out = os.path.join(tmp, name + ".json")
    cmd = [os.path.join(BIN, "sps-bench-net"), "--n", "200000", "--density", "0.01,1", "--workers", "2",
           "--servers", "2", "--seconds", "0.6", "--warmup", "0.3", "--dir", os.path.join(tmp, name),
           "--json", out] + extra
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, f"sps-bench-net failed: {r.returncode}"
    with open(out) as f:
        return json.load(f)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(tmp, "auto", ["--modes", "push,push_pull"])
        assert len(rows) == 4, rows
        for r in rows:
            for key in ("n", "density", "workers", "servers", "mode", "sps_gbps", "bare_zmq_gbps", "ratio"):
                assert key in r, (key, r)
            assert r["sps_gbps"] > 0 and r["bare_zmq_gbps"] > 0, r
            assert abs(r["ratio"] - r["sps_gbps"] / r["bare_zmq_gbps"]) < 1e-9, r
            assert r["pushes_per_s"] > 0, r
        dense = [r for r in rows if r["density"] == 1][0]
        assert dense["push_bytes"] == 2 * 64 + 4 * 200000, dense  # two shards, f32, no index frame
        raw = run(tmp, "raw", ["--modes", "push", "--density", "0.01", "--index-coding", "raw"])
        auto_sparse = [r for r in rows if r["density"] == 0.01 and r["mode"] == "push"][0]
        # The same selection: 8 bytes per key raw, about 5.3 with varint keys.
        assert auto_sparse["push_bytes"] < raw[0]["push_bytes"] * 0.75, (raw[0], auto_sparse)
    # Bad input is refused with a message, not a crash.
    r = subprocess.run([os.path.join(BIN, "sps-bench-net"), "--density", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "density" in r.stderr, r.stderr
    print("bench_net_test: ok")


if __name__ == "__main__":
    main()
