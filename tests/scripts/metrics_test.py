#!/usr/bin/env python3
"""The /metrics endpoints of a real job, read with a real HTTP client (curl):
Prometheus text that parses, counters that move while the job trains, a
dead worker and its replacement visible in the scheduler's gauges, its /status
read by sps-status, 404/405 for other requests,
and a clear error when the configured port is taken.
Usage: metrics_test.py BIN_DIR"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "scripts", "sps-launch")
STATUS = os.path.join(ROOT, "scripts", "sps-status")
DEMO = os.path.join(ROOT, "config", "demo.yaml")
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "bin")
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')


def curl(url, *extra):
    """(status code, body) of one request."""
    r = subprocess.run(["curl", "-sS", "-m", "5", "-w", "\n%{http_code}", *extra, url],
                       capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise AssertionError(f"curl {url} failed: {r.stderr}")
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


def parse(text):
    """Prometheus text format -> {'name{labels}': value}; fails on any bad line."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            if line.startswith("#"):
                assert line.startswith("# HELP ") or line.startswith("# TYPE "), line
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def wait_for(path, timeout):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)
    with open(path) as f:
        return f.read().strip()


class MetricsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="sps-metrics-")

    def launch(self, name, *sets):
        argv = [sys.executable, LAUNCH, DEMO, "--bin", BIN, "--set", f"run.dir={self.tmp}",
                "--set", f"run.name={name}", "--set", "data.train_limit=2000", "--set", "data.test_limit=500",
                "--set", "metrics.enabled=true", "--set", "cluster.num_workers=2",
                # 4 s: a loaded sanitizer run has stalled a healthy process's
                # heartbeat past 1 s, and a false death ends the job.
                "--set", "cluster.heartbeat_ms=100", "--set", "cluster.heartbeat_timeout_ms=4000"]
        for s in sets:
            argv += ["--set", s]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def test_endpoints_serve_live_job_state(self):
        # downlink.ratio 0.1: a budget above what a round changes, so the
        # owed keys stay few and the publishes read only them.
        job = self.launch("live", "training.steps=1000000", "workers.delay_ms=[2, 2]", "downlink.method=topk",
                          "downlink.ratio=0.1")
        try:
            run = os.path.join(self.tmp, "live")
            server_url = wait_for(os.path.join(run, "metrics-server-0.url"), 30)
            sched_url = wait_for(os.path.join(run, "metrics-scheduler.url"), 30)
            self.assertRegex(server_url, r"^http://127\.0\.0\.1:\d+/metrics$")
            key = 'sps_server_pushes_applied_total{shard="0"}'
            # The endpoint is up before training starts (under a sanitizer on
            # a loaded machine, seconds before): scrape until pushes show.
            deadline = time.time() + 60
            while True:
                code, body = curl(server_url)
                self.assertEqual(code, 200)
                first = parse(body)
                if first.get(key, 0) > 0 or time.time() > deadline:
                    break
                time.sleep(0.2)
            self.assertIn("# TYPE sps_server_pushes_applied_total counter", body)
            self.assertIn("# TYPE sps_server_push_staleness histogram", body)
            time.sleep(1.0)
            second = parse(curl(server_url)[1])
            self.assertGreater(first[key], 0)
            self.assertGreater(second[key], first[key], "pushes did not move between two scrapes")
            self.assertGreater(second['sps_server_received_bytes_total{shard="0"}'], 0)
            self.assertEqual(second['sps_server_live_workers{shard="0"}'], 2)
            self.assertEqual(second['sps_server_malformed_messages_total{shard="0"}'], 0)
            # Compressed pulls: one publish per version the pulls needed, k keys each.
            publishes = second['sps_server_publishes_total{shard="0"}']
            self.assertGreater(publishes, first['sps_server_publishes_total{shard="0"}'])
            self.assertGreater(second['sps_server_published_keys_total{shard="0"}'], publishes)
            self.assertIn('sps_server_downlink_owed_norm{shard="0"}', second)
            # Under sparse SGD updates a publish reads only the keys that may
            # owe, not the whole shard (3,925 of the demo's 7,850 keys).
            read = second['sps_server_publish_keys_read_total{shard="0"}']
            self.assertGreater(read, 0)
            self.assertLess(read, publishes * 3925 / 8)
            self.assertEqual(second['sps_server_push_staleness_bucket{shard="0",le="0"}'],
                             second['sps_server_push_staleness_count{shard="0"}'], "bsp pushes are never stale")
            self.assertIn('sps_server_version{shard="1"}', parse(curl(wait_for(
                os.path.join(run, "metrics-server-1.url"), 5))[1]))

            sched = parse(curl(sched_url)[1])
            self.assertEqual(sched['sps_scheduler_nodes{role="worker",state="live"}'], 2)
            self.assertEqual(sched['sps_scheduler_nodes{role="server",state="live"}'], 2)
            self.assertEqual(sched["sps_scheduler_job_running"], 1)
            # Each worker's progress, from its heartbeats: steps and bytes move,
            # and the loss is a real number.
            # Scraped until both moved: a loaded sanitizer run can stall a
            # heartbeat for a second.
            deadline = time.time() + 15
            while True:
                time.sleep(0.3)
                later = parse(curl(sched_url)[1])
                if all(later[f'sps_worker_step{{rank="{r}"}}'] > sched[f'sps_worker_step{{rank="{r}"}}']
                       for r in ("0", "1")) or time.time() > deadline:
                    break
            for rank in ("0", "1"):
                step = f'sps_worker_step{{rank="{rank}"}}'
                pushed = f'sps_worker_pushed_bytes_total{{rank="{rank}"}}'
                self.assertGreater(later[step], sched[step], "a worker's step did not move between scrapes")
                self.assertGreater(later[pushed], sched[pushed])
                self.assertGreater(later[f'sps_worker_pulled_bytes_total{{rank="{rank}"}}'], 0)
                self.assertGreater(later[f'sps_worker_pushed_values_total{{rank="{rank}"}}'], 0)
                loss = later[f'sps_worker_last_batch_loss{{rank="{rank}"}}']
                self.assertTrue(0 < loss < 100, loss)
            self.assertIn("# TYPE sps_worker_pushed_bytes_total counter", curl(sched_url)[1])

            # The scheduler's /status: status.json over HTTP, for sps-status on another host.
            code, body = curl(sched_url.replace("/metrics", "/status"))
            self.assertEqual(code, 200)
            remote = json.loads(body)
            self.assertEqual(remote["state"], "training")
            self.assertEqual([w["rank"] for w in remote["workers"]], [0, 1])
            self.assertGreater(remote["workers"][0]["step"], 0)
            self.assertLess(abs(remote["written_at"] - time.time()), 5)
            r = subprocess.run([sys.executable, STATUS, sched_url], capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("sps job 'live': training, step ", r.stdout)
            self.assertRegex(r.stdout, r"\n1 +live +\S+ +\d+ +\d+ ")

            # Other paths and methods are refused; HEAD has no body.
            self.assertEqual(curl(server_url.replace("/metrics", "/nope"))[0], 404)
            self.assertEqual(curl(server_url, "-X", "POST")[0], 405)
            code, body = curl(server_url, "-I")
            self.assertEqual(code, 200)

            # A killed worker shows up as dead within the heartbeat timeout.
            pids = subprocess.run(["pgrep", "-f", f"sps-worker.*run.name=live.*--rank 1|sps-worker --rank 1 .*run.name=live"],
                                  capture_output=True, text=True).stdout.split()
            self.assertEqual(len(pids), 1, pids)
            with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
                worker_argv = [a.decode() for a in f.read().split(b"\0") if a]
            pushed_before_kill = parse(curl(sched_url)[1])['sps_worker_pushed_bytes_total{rank="1"}']
            os.kill(int(pids[0]), signal.SIGKILL)
            deadline = time.time() + 10
            while True:
                sched = parse(curl(sched_url)[1])
                if sched['sps_scheduler_nodes{role="worker",state="dead"}'] == 1:
                    break
                self.assertLess(time.time(), deadline, "the dead worker never showed in the metrics")
                time.sleep(0.2)
            self.assertEqual(sched['sps_scheduler_nodes{role="worker",state="live"}'], 1)
            deadline = time.time() + 10
            while parse(curl(server_url)[1])['sps_server_live_workers{shard="0"}'] != 1:
                self.assertLess(time.time(), deadline, "the server never dropped the dead worker")
                time.sleep(0.2)
            self.assertEqual(sched["sps_scheduler_workers_replaced_total"], 0)
            self.assertEqual(sched["sps_scheduler_servers_replaced_total"], 0)
            # The same command again: a new process takes worker 1's place.
            replacement = subprocess.Popen(worker_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.time() + 30
                while True:
                    sched = parse(curl(sched_url)[1])
                    live = parse(curl(server_url)[1])['sps_server_live_workers{shard="0"}']
                    if sched["sps_scheduler_workers_replaced_total"] == 1 and live == 2:
                        break
                    self.assertLess(time.time(), deadline, "the replacement never showed in the metrics")
                    time.sleep(0.2)
                self.assertEqual(sched['sps_scheduler_nodes{role="worker",state="live"}'], 2)
                self.assertEqual(sched['sps_scheduler_nodes{role="worker",state="dead"}'], 1)
                # Rank 1's byte counter adds the replacement to the dead process:
                # it never goes back, and grows once the replacement pushes.
                key = 'sps_worker_pushed_bytes_total{rank="1"}'
                self.assertGreaterEqual(sched[key], pushed_before_kill)
                deadline = time.time() + 10
                while parse(curl(sched_url)[1])[key] <= sched[key]:
                    self.assertLess(time.time(), deadline, "the replacement's pushes never showed under rank 1")
                    time.sleep(0.2)
            finally:
                replacement.kill()
                replacement.wait()
        finally:
            os.killpg(job.pid, signal.SIGINT)
            job.communicate(timeout=30)
        # Ctrl-C: the job reads "stopped"; the scheduler no longer answers.
        r = subprocess.run([sys.executable, STATUS, sched_url], capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
        self.assertIn("the scheduler is gone", r.stderr)
        r = subprocess.run([sys.executable, STATUS, run], capture_output=True, text=True, timeout=30)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("sps job 'live': stopped", r.stdout)
        self.assertIn("\nstopped: stopped by signal", r.stdout)

    def test_taken_port_is_a_clear_error(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            job = self.launch("taken", "training.steps=50", f"metrics.port={port}")
            out, _ = job.communicate(timeout=60)
        self.assertNotEqual(job.returncode, 0)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", out)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
