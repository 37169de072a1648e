#!/usr/bin/env python3
"""Tests for scripts/sps-launch with the real binaries: a job runs to its
summary; Ctrl-C stops every process; a bad config fails before anything
starts. Usage: launcher_test.py BIN_DIR"""
import json
import os
import re
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

    def test_status_shows_every_workers_progress_while_the_job_runs(self):
        status = os.path.join(ROOT, "scripts", "sps-status")
        run = os.path.join(self.tmp, "watched")
        p = subprocess.Popen(self.launch("watched", "training.steps=100000", "cluster.num_workers=2",
                                         "consistency.mode=asp", "workers.delay_ms=[1, 20]",
                                         "checkpoint.interval=100"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            def current():
                r = subprocess.run([sys.executable, status, run, "--json"], capture_output=True, text=True,
                                   timeout=30)
                return r.returncode, (json.loads(r.stdout) if r.returncode == 0 else r.stderr)

            deadline = time.time() + 60
            while True:
                rc, s = current()
                # A rate needs 2 s of heartbeats.
                if rc == 0 and s["state"] == "training" and all(w.get("step", 0) > 50 and w.get("steps_per_second")
                                                                  for w in s["workers"]):
                    break
                self.assertLess(time.time(), deadline, f"no training status with steps: {s}")
                time.sleep(0.2)
            time.sleep(1.5)
            _, later = current()
            self.assertEqual([w["rank"] for w in later["workers"]], [0, 1])
            self.assertEqual([v["rank"] for v in later["servers"]], [0, 1])
            for before, after in zip(s["workers"], later["workers"]):
                self.assertGreater(after["step"], before["step"], "a worker's step did not move")
                self.assertGreater(after["bytes_pushed"], before["bytes_pushed"])
                self.assertGreater(after["last_batch_loss"], 0)
                self.assertLess(after["heard_seconds_ago"], 5)
            # Worker 1 is paced 20 ms a step (asp: nobody waits for it): it shows behind.
            self.assertLess(later["workers"][1]["step"], later["workers"][0]["step"], later)
            # Its rate is at most 50 steps/s, and it sets the time left: its
            # steps to go at that rate (within a window's change of rate).
            slow, fast = later["workers"][1], later["workers"][0]
            self.assertLess(slow["steps_per_second"], 51, slow)
            self.assertLess(slow["steps_per_second"], fast["steps_per_second"], later)
            expected = (100000 - slow["step"]) / slow["steps_per_second"]
            self.assertGreater(later["eta_seconds"], 0.5 * expected, later)
            self.assertLess(later["eta_seconds"], 2 * expected, later)
            self.assertGreater(later["servers"][0]["pushes_applied"], 0)
            r = subprocess.run([sys.executable, status, run], capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("sps job 'watched': training, step ", r.stdout)
            self.assertRegex(r.stdout, r"about (\d+ min \d\d s|\d+ h \d\d min) left")
            self.assertRegex(r.stdout, r"\n0 +live +\S+ +\d+ +\d+ +\d+\.\d +\d+\.\d{4} ")
            self.assertIn("server  state", r.stdout)
        finally:
            os.killpg(p.pid, signal.SIGINT)
            out, _ = p.communicate(timeout=60)
        # The launcher says where the job stopped (there is no summary.json).
        self.assertEqual(p.returncode, 130)
        self.assertFalse(os.path.exists(os.path.join(run, "summary.json")))
        self.assertIn("sps job 'watched' stopped (figures from the last heartbeats)", out)
        self.assertRegex(out, r"\nwhy +stopped by signal \d+\n")
        self.assertRegex(out, r"\nsteps \(per worker\) +\d+ to \d+ of 100000\n")
        # The newest *complete* snapshot (asked of sps-scheduler): the slow
        # worker has reached it, while the fast one has written step folders
        # beyond it.
        m = re.search(r"\nsteps \(per worker\) +(\d+) to \d+ of", out)
        c = re.search(r"\nsnapshots +newest complete at step (\d+00): the same command with --resume continues", out)
        self.assertIsNotNone(c, out)
        self.assertLessEqual(int(c.group(1)), int(m.group(1)), out)
        self.assertTrue(os.path.isdir(os.path.join(run, "checkpoints", f"step-{int(c.group(1)):012d}")), out)
        # Stopped: the last status says so, and so does the exit status.
        r = subprocess.run([sys.executable, status, run], capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 1, r.stdout)
        # Ctrl-C reaches every process at once: the job reads stopped, not
        # failed, even when the scheduler first hears of a server that stopped.
        self.assertIn("sps job 'watched': stopped", r.stdout)
        self.assertRegex(r.stdout, r"\nstopped: stopped by signal \d+")
        r = subprocess.run([sys.executable, status, os.path.join(self.tmp, "nothing")], capture_output=True,
                           text=True, timeout=30)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no scheduler has run there", r.stderr)

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

    def run_until_snapshot_then_kill(self, name, step, victim, sets, extra=()):
        """Starts a job; once every server has written the snapshot of `step`,
        SIGKILLs the process whose command line contains all of `victim`.
        Returns (status, output)."""
        p = subprocess.Popen(self.launch(name, *sets) + list(extra), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        folder = os.path.join(self.tmp, name, "checkpoints", f"step-{step:012d}")
        deadline = time.time() + 90
        while time.time() < deadline and not all(
                os.path.exists(os.path.join(folder, f"server-{r}.snap")) for r in (0, 1)):
            time.sleep(0.01)
        pids = [pid for pid, cmd in processes_mentioning(self.tmp, with_command=True)
                if all(v in cmd for v in victim)]
        self.assertEqual(len(pids), 1, pids)
        os.kill(pids[0], signal.SIGKILL)
        out, _ = p.communicate(timeout=180)
        return p.returncode, out

    def test_max_restarts_resumes_a_job_whose_server_was_killed(self):
        # BSP resumes bit for bit, so the restarted job must end with exactly
        # the parameters of one that was never interrupted.
        sets = ("training.steps=1500", "cluster.num_workers=2", "checkpoint.interval=100", "run.save_params=true")
        r = subprocess.run(self.launch("straight", *sets), capture_output=True, text=True, timeout=180)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        rc, out = self.run_until_snapshot_then_kill("restarted", 300, ("sps-server", "--rank 1"), sets,
                                                    ["--max-restarts", "2"])
        self.assertEqual(rc, 0, out)
        self.assertIn("server-1 was killed by SIGKILL: restarting the job (restart 1 of 2)", out)
        self.assertRegex(out, r"resuming from the snapshot of step [1-9]\d\d")
        with open(os.path.join(self.tmp, "restarted", "summary.json")) as f:
            s = json.load(f)
        self.assertEqual(s["steps"], 1500)
        self.assertEqual(len(s["restarts"]), 1, s)
        self.assertEqual(s["restarts"][0]["cause"], "server-1 was killed by SIGKILL")
        self.assertGreaterEqual(s["restarts"][0]["resumed_from"], 300)
        self.assertIn("restart                 server-1 was killed by SIGKILL after", out)
        with open(os.path.join(self.tmp, "straight", "params.f32"), "rb") as f:
            straight = f.read()
        with open(os.path.join(self.tmp, "restarted", "params.f32"), "rb") as f:
            self.assertTrue(f.read() == straight, "the restarted job's parameters differ from the straight run's")
        self.assertEqual(processes_mentioning(self.tmp), [])

    def test_a_crashed_worker_under_abort_restarts_the_job(self):
        sets = ("training.steps=1500", "cluster.num_workers=2", "checkpoint.interval=100",
                "cluster.on_worker_loss=abort")
        rc, out = self.run_until_snapshot_then_kill("worker_abort", 300, ("sps-worker", "--rank 1"), sets,
                                                    ["--max-restarts", "1"])
        self.assertEqual(rc, 0, out)
        self.assertIn("cluster.on_worker_loss is abort: stopping the job", out)
        self.assertIn("worker-1 was killed by SIGKILL: restarting the job (restart 1 of 1)", out)
        with open(os.path.join(self.tmp, "worker_abort", "summary.json")) as f:
            s = json.load(f)
        self.assertEqual((s["steps"], len(s["restarts"]), s.get("dead_workers", [])), (1500, 1, []), s)

    def test_replace_workers_starts_a_new_worker_in_a_dead_ones_place(self):
        # One replacement: the first kill is replaced, the second (the
        # replacement itself) leaves the job to go on without rank 1.
        name = "replaced"
        # Paced (3 ms a step, no CPU): the same length under a sanitizer.
        p = subprocess.Popen(self.launch(name, "training.steps=3000", "workers.delay_ms=[3, 3, 3, 3]") +
                             ["--replace-workers", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = os.path.join(self.tmp, name, "worker-1.jsonl")

        def lines():
            try:
                with open(log) as f:
                    return f.read().splitlines()
            except FileNotFoundError:
                return []

        def kill_worker_1():
            pids = [pid for pid, cmd in processes_mentioning(self.tmp, with_command=True)
                    if "sps-worker" in cmd and "--rank 1" in cmd]
            self.assertEqual(len(pids), 1, pids)
            os.kill(pids[0], signal.SIGKILL)

        deadline = time.time() + 90
        while time.time() < deadline and len(lines()) < 300:
            time.sleep(0.02)
        kill_worker_1()
        # The replacement joins, runs a while, and is killed in its turn.
        while time.time() < deadline and not any('"rejoin"' in line for line in lines()):
            time.sleep(0.02)
        joined_at = len(lines())
        while time.time() < deadline and len(lines()) < joined_at + 200:
            time.sleep(0.02)
        kill_worker_1()
        out, _ = p.communicate(timeout=180)
        self.assertEqual(p.returncode, 0, out)
        self.assertIn("worker-1 exited with status -9; a new worker takes its place once the scheduler has written "
                      "it off (replacement 1 of 1)", out)
        self.assertIn("worker 1: a new process in the place of the dead worker 1", out)
        self.assertIn("worker-1 exited with status -9; the scheduler decides whether the job goes on", out)
        self.assertIn("workers replaced        1 (from step ", out)
        # Both dead processes' traffic counts, from their last heartbeats.
        self.assertIn("from last heartbeat     worker 1 (x2) (died before the final report)", out)
        with open(os.path.join(self.tmp, name, "summary.json")) as f:
            s = json.load(f)
        self.assertEqual(s["dead_workers"], [1, 1], s)
        self.assertEqual([r["rank"] for r in s["rejoined_workers"]], [1], s)
        self.assertLess(0, s["rejoined_workers"][0]["step"])
        self.assertEqual(s["steps"], 3000)
        self.assertEqual(processes_mentioning(self.tmp), [])

    def test_replace_workers_needs_continue(self):
        r = subprocess.run(self.launch("replace_abort", "cluster.on_worker_loss=abort") + ["--replace-workers", "1"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 2)
        self.assertIn("--replace-workers needs cluster.on_worker_loss: continue", r.stderr)

    def test_replace_servers_starts_a_new_server_from_the_dead_ones_snapshot(self):
        # BSP: the job with a replaced server ends bit for bit as a straight run.
        sets = ("training.steps=1500", "cluster.num_workers=2", "checkpoint.interval=100", "run.save_params=true",
                "cluster.on_server_loss=replace", "workers.delay_ms=[2, 2]")
        r = subprocess.run(self.launch("straight", *sets), capture_output=True, text=True, timeout=180)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        rc, out = self.run_until_snapshot_then_kill("server_replaced", 300, ("sps-server", "--rank 1"), sets,
                                                    ["--replace-servers", "1"])
        self.assertEqual(rc, 0, out)
        self.assertIn("server-1 exited with status -9; a new server takes its place from its snapshot once the "
                      "scheduler has written it off (replacement 1 of 1)", out)
        self.assertRegex(out, r"servers replaced +1 \(from its snapshot of step [1-9]\d\d\)")
        with open(os.path.join(self.tmp, "server_replaced", "summary.json")) as f:
            s = json.load(f)
        self.assertEqual(s["steps"], 1500)
        self.assertEqual([r["rank"] for r in s["replaced_servers"]], [1], s)
        self.assertNotIn("restarts", s)
        with open(os.path.join(self.tmp, "straight", "params.f32"), "rb") as f:
            straight = f.read()
        with open(os.path.join(self.tmp, "server_replaced", "params.f32"), "rb") as f:
            self.assertTrue(f.read() == straight, "the job with a replaced server differs from the straight run")
        self.assertEqual(processes_mentioning(self.tmp), [])

    def test_replace_servers_needs_replace(self):
        r = subprocess.run(self.launch("replace_servers_abort") + ["--replace-servers", "1"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 2)
        self.assertIn("--replace-servers needs cluster.on_server_loss: replace", r.stderr)

    def test_without_restarts_left_the_job_fails_with_the_cause(self):
        sets = ("training.steps=100000000", "cluster.num_workers=2", "checkpoint.interval=100")
        rc, out = self.run_until_snapshot_then_kill("no_restart", 100, ("sps-server", "--rank 0"), sets)
        self.assertEqual(rc, 1, out)
        self.assertNotIn("restarting", out)
        self.assertIn("server-0 exited with status -9", out)
        self.assertEqual(processes_mentioning(self.tmp), [])

    def test_errors_the_job_reports_are_not_retried(self):
        # A worker that refuses its config fails the same way every time.
        r = subprocess.run(self.launch("deterministic", "model.name=mlp", "model.hidden=[8]", "training.steps=5",
                                       "compression.error_feedback=hessian_diag") + ["--max-restarts", "3"],
                           capture_output=True, text=True, timeout=120)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("hessian_diag", r.stdout + r.stderr)
        self.assertNotIn("restarting", r.stdout + r.stderr)

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
        r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sps-status"), "--help"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0)
        self.assertIn("--watch", r.stdout)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
