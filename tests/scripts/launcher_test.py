#!/usr/bin/env python3
"""Tests for scripts/sps-launch with the real binaries: a job runs to its
summary; Ctrl-C stops every process; a bad config fails before anything
starts. Usage: launcher_test.py BIN_DIR"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "scripts", "sps-launch")
DEMO = os.path.join(ROOT, "config", "demo.yaml")
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "bin")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proc_util import processes_mentioning  # noqa: E402


class LauncherTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="sps-launch-")

    def launch(self, name, *sets):
        argv = [sys.executable, LAUNCH, DEMO, "--bin", BIN, "--set", f"run.dir={self.tmp}",
                "--set", f"run.name={name}", "--set", "data.train_limit=2000", "--set", "data.test_limit=500"]
        for s in sets:
            argv += ["--set", s]
        return argv

    def test_job_runs_and_prints_the_summary(self):
        r = subprocess.run(self.launch("ok", "training.steps=100", "cluster.num_workers=2"),
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("test accuracy", r.stdout)
        self.assertIn("[worker-0  ]", r.stdout)  # prefixed process output
        with open(os.path.join(self.tmp, "ok", "summary.json")) as f:
            s = json.load(f)
        for key in ("steps", "train_loss", "test_accuracy", "bytes_pushed", "bytes_pushed_dense_equivalent",
                    "bytes_pulled", "wall_seconds"):
            self.assertIn(key, s)
        self.assertEqual(s["steps"], 100)
        self.assertEqual(s["optimizer"], "sgd")
        self.assertIn("server optimizer        sgd", r.stdout)
        self.assertLess(s["bytes_pushed"] * 20, s["bytes_pushed_dense_equivalent"])
        self.assertEqual(processes_mentioning(self.tmp), [])

    def test_resume_flag_restarts_from_the_newest_snapshot(self):
        sets = ("training.steps=120", "cluster.num_workers=2", "checkpoint.interval=50")
        r = subprocess.run(self.launch("again", *sets), capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        ckpt = os.path.join(self.tmp, "again", "checkpoints")
        self.assertEqual(sorted(os.listdir(ckpt)), ["step-000000000050", "step-000000000100"])
        r = subprocess.run(self.launch("again", *sets) + ["--resume"], capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("resuming the job from step 100", r.stdout + r.stderr)
        with open(os.path.join(self.tmp, "again", "summary.json")) as f:
            self.assertEqual(json.load(f)["steps"], 120)
        # Nothing to resume from: a clear error before any worker starts.
        r = subprocess.run(self.launch("empty", *sets) + ["--resume"], capture_output=True, text=True, timeout=60)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("cannot resume", r.stdout + r.stderr)

    def test_ctrl_c_stops_every_process(self):
        name = "interrupted"
        p = subprocess.Popen(self.launch(name, "training.steps=100000000"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        log = os.path.join(self.tmp, name, "worker-0.jsonl")
        deadline = time.time() + 60
        while time.time() < deadline and not (os.path.exists(log) and os.path.getsize(log) > 2000):
            time.sleep(0.05)
        self.assertGreater(len(processes_mentioning(self.tmp)), 5)  # scheduler + 2 servers + 4 workers
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=30)
        self.assertEqual(p.returncode, 130, out)
        time.sleep(0.2)
        self.assertEqual(processes_mentioning(self.tmp), [], out)

    def test_killed_launcher_leaves_nothing_behind(self):
        name = "killed"
        p = subprocess.Popen(self.launch(name, "training.steps=100000000"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        log = os.path.join(self.tmp, name, "worker-0.jsonl")
        deadline = time.time() + 60
        while time.time() < deadline and not os.path.exists(log):
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        deadline = time.time() + 15
        while time.time() < deadline and processes_mentioning(self.tmp):
            time.sleep(0.1)
        self.assertEqual(processes_mentioning(self.tmp), [])

    def test_bad_config_fails_before_starting(self):
        r = subprocess.run(self.launch("bad", "training.lr=-1"), capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 2)
        self.assertIn("training.lr", r.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "bad")))

    def test_binaries_that_do_not_run_are_a_clear_error(self):
        empty = os.path.join(self.tmp, "bin")
        os.makedirs(empty)
        with open(os.path.join(empty, "sps-scheduler"), "w") as f:
            f.write("not a program\n")  # present, not executable
        argv = [a if a != BIN else empty for a in self.launch("nobin")]
        r = subprocess.run(argv + ["--worker", os.path.join(BIN, "sps-worker")], capture_output=True, text=True,
                           timeout=30)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn(f"cannot run {empty}/sps-scheduler: Permission denied", r.stderr)
        self.assertNotIn("Traceback", r.stderr)

    def test_help(self):
        r = subprocess.run([sys.executable, LAUNCH, "--help"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0)
        self.assertIn("--set", r.stdout)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
