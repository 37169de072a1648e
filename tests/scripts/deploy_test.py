#!/usr/bin/env python3
"""The three cluster launch modes of scripts/sps-launch, each with real
processes started through the real tool:

  --hosts  over a real sshd started by the test (hosts 127.0.0.1-3: three
           addresses, so every process binds 0.0.0.0 and advertises its own)
  --mpi    under Debian's Open MPI: mpirun --oversubscribe -n 7
  --slurm  under a real single-node Slurm (slurmctld + slurmd + munged)
           started by the test: srun -n 7

Each part skips, saying why, only where its daemon or tool cannot run.
Usage: deploy_test.py BIN_DIR"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LAUNCH = os.path.join(ROOT, "scripts", "sps-launch")
DEMO = os.path.join(ROOT, "config", "demo.yaml")
BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "bin"))
sys.path.insert(0, HERE)
from local_sshd import LocalSshd  # noqa: E402
from proc_util import free_port, processes_mentioning  # noqa: E402

SMALL = ["data.train_limit=2000", "data.test_limit=500", "training.steps=200"]


def sps_processes(token):
    """The sps binaries among them (not the ssh clients and remote shells)."""
    found = []
    for pid in processes_mentioning(token):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0].decode()).startswith("sps-"):
            found.append((pid, b" ".join(argv).decode(errors="replace")))
    return found


def sets(*pairs):
    out = []
    for p in pairs:
        out += ["--set", p]
    return out


def run_and_kill_worker(test, argv, env, run_dir, rank=2):
    """Starts a long job through a cluster tool, SIGKILLs one worker mid-run and
    checks that the job completes without it (cluster.on_worker_loss: continue)
    and that the tool itself reports success."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = os.path.join(run_dir, f"worker-{rank}.jsonl")
    deadline = time.time() + 90
    while time.time() < deadline and not (os.path.exists(log) and os.path.getsize(log) > 20000):
        time.sleep(0.05)
    token = f"run.dir={os.path.dirname(run_dir)} "
    victims = [pid for pid, cmd in sps_processes(token) if f"--rank {rank} " in cmd and "sps-worker" in cmd]
    test.assertEqual(len(victims), 1, sps_processes(token))
    os.kill(victims[0], signal.SIGKILL)
    out, _ = p.communicate(timeout=180)
    test.assertEqual(p.returncode, 0, out[-3000:])
    test.assertIn(f"worker-{rank}@", out)
    test.assertIn("cluster.on_worker_loss is continue", out)
    s = read_summary(run_dir)
    test.assertEqual(s.get("dead_workers"), [rank], s)
    return s


def read_summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


class SshLaunchTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.sshd = LocalSshd(["127.0.0.1", "127.0.0.2", "127.0.0.3"])
        cls.sshd.start()

    @classmethod
    def tearDownClass(cls):
        cls.sshd.stop()

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="sps-deploy-")
        self.hosts = os.path.join(self.tmp, "hosts.txt")
        with open(self.hosts, "w") as f:
            f.write("# three hosts on three loopback addresses\n"
                    "127.0.0.1  scheduler server\n"
                    "127.0.0.2  server worker:2\n"
                    "127.0.0.3  slots=2\n")

    def launch(self, name, *extra, hosts=None):
        return ([sys.executable, LAUNCH, DEMO, "--bin", BIN, "--hosts", hosts or self.hosts,
                 "--ssh", self.sshd.ssh_command()] + sets(f"run.dir={self.tmp}", f"run.name={name}", *SMALL) +
                sets(*extra))

    def test_job_over_ssh_trains_and_servers_advertise_their_host(self):
        r = subprocess.run(self.launch("ssh_ok"), capture_output=True, text=True, timeout=180)
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr)
        self.assertIn("test accuracy", r.stdout)
        self.assertIn("[server-1@127.0.0.2", r.stdout)  # host/role prefixes
        s = read_summary(os.path.join(self.tmp, "ssh_ok"))
        self.assertEqual(s["steps"], 200)
        self.assertGreater(s["test_accuracy"], 0.75)
        endpoints = {}
        with open(os.path.join(self.tmp, "ssh_ok", "scheduler.jsonl")) as f:
            for line in f:
                e = json.loads(line)
                if e.get("event") == "register" and e.get("role") == "server":
                    endpoints[e["rank"]] = e["endpoint"]
        # Bound to 0.0.0.0 on every host; each advertises its own address.
        self.assertTrue(endpoints[0].startswith("tcp://127.0.0.1:"), endpoints)
        self.assertTrue(endpoints[1].startswith("tcp://127.0.0.2:"), endpoints)

    def test_python_workers_over_ssh_find_the_binding(self):
        if not os.path.isdir(os.path.join(BIN, "..", "python", "sps")):
            self.skipTest("sps was built without its Python binding (SPS_PYTHON)")
        example = os.path.join(ROOT, "examples", "python", "logreg_worker.py")
        r = subprocess.run(self.launch("ssh_python", "model.name=numpy_logreg") + ["--worker", example],
                           capture_output=True, text=True, timeout=180, env=dict(os.environ, PYTHONPATH=""))
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr)
        self.assertIn("numpy_logreg (sps loop): 200 steps", r.stdout)
        self.assertGreater(read_summary(os.path.join(self.tmp, "ssh_python"))["test_accuracy"], 0.70)

    def wait_running(self, name):
        log = os.path.join(self.tmp, name, "worker-0.jsonl")
        deadline = time.time() + 60
        while time.time() < deadline and not (os.path.exists(log) and os.path.getsize(log) > 2000):
            time.sleep(0.05)
        self.assertTrue(os.path.exists(log), "the job never started")

    def test_ctrl_c_stops_every_remote_process(self):
        name = "ssh_interrupted"
        p = subprocess.Popen(self.launch(name, "training.steps=100000000"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        token = f"sps-launch-{name}-{p.pid}.json"  # every remote process's --config
        self.wait_running(name)
        self.assertEqual(len(sps_processes(token)), 7)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
        self.assertEqual(p.returncode, 130, out[-2000:])
        deadline = time.time() + 10
        while time.time() < deadline and processes_mentioning(token):
            time.sleep(0.1)
        self.assertEqual(processes_mentioning(token), [], out[-2000:])

    def test_killed_launcher_leaves_nothing_on_any_host(self):
        name = "ssh_killed"
        p = subprocess.Popen(self.launch(name, "training.steps=100000000"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        token = f"sps-launch-{name}-{p.pid}.json"
        self.wait_running(name)
        self.assertEqual(len(sps_processes(token)), 7)
        p.send_signal(signal.SIGKILL)
        p.wait()
        deadline = time.time() + 15
        while time.time() < deadline and processes_mentioning(token):
            time.sleep(0.1)
        self.assertEqual(processes_mentioning(token), [])
        # A killed launcher cannot remove the config it copied to the hosts
        # (all of them this machine here); the test does.
        try:
            os.remove(os.path.join("/tmp", token))
        except FileNotFoundError:
            pass

    def test_a_failed_server_stops_the_job_on_every_host(self):
        name = "ssh_server_dies"
        p = subprocess.Popen(self.launch(name, "training.steps=100000000"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        token = f"sps-launch-{name}-{p.pid}.json"
        self.wait_running(name)
        out = self.kill_server_1(p, token, timeout=60)
        self.assertEqual(p.returncode, 1, out[-2000:])
        self.assertIn("server-1@127.0.0.2 exited with status", out)

    def kill_server_1(self, p, token, timeout):
        """SIGKILLs server 1 of the launcher p's job; returns the launcher's
        output once it has exited and no process of the job is left."""
        victims = [pid for pid, cmd in sps_processes(token) if "sps-server --rank 1 " in cmd]
        self.assertEqual(len(victims), 1)
        os.kill(victims[0], signal.SIGKILL)
        out, _ = p.communicate(timeout=timeout)
        deadline = time.time() + 10
        while time.time() < deadline and processes_mentioning(token):
            time.sleep(0.1)
        self.assertEqual(processes_mentioning(token), [], out[-2000:])
        return out

    def test_max_restarts_resumes_after_a_server_is_killed_on_its_host(self):
        # The resume point is asked over ssh on the scheduler's host; the
        # killed server's ssh session ends with 128 + SIGKILL.
        name = "ssh_restart"
        p = subprocess.Popen(self.launch(name, "training.steps=1500", "checkpoint.interval=100") +
                             ["--max-restarts", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        token = f"sps-launch-{name}-{p.pid}.json"
        folder = os.path.join(self.tmp, name, "checkpoints", "step-000000000200")
        deadline = time.time() + 90
        while time.time() < deadline and not all(
                os.path.exists(os.path.join(folder, f"server-{r}.snap")) for r in (0, 1)):
            time.sleep(0.01)
        out = self.kill_server_1(p, token, timeout=180)
        self.assertEqual(p.returncode, 0, out[-3000:])
        self.assertIn("server-1@127.0.0.2 was killed by SIGKILL: restarting the job (restart 1 of 1)", out)
        s = read_summary(os.path.join(self.tmp, name))
        self.assertEqual(s["steps"], 1500)
        self.assertGreaterEqual(s["restarts"][0]["resumed_from"], 200, s)

    def test_replace_workers_starts_the_replacement_on_the_dead_workers_host(self):
        name = "ssh_replace"
        p = subprocess.Popen(self.launch(name, "training.steps=8000") + ["--replace-workers", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        token = f"sps-launch-{name}-{p.pid}.json"
        self.wait_running(name)
        victims = [pid for pid, cmd in sps_processes(token) if "--rank 3 " in cmd and "sps-worker" in cmd]
        self.assertEqual(len(victims), 1)
        os.kill(victims[0], signal.SIGKILL)
        out, _ = p.communicate(timeout=180)
        self.assertEqual(p.returncode, 0, out[-3000:])
        self.assertIn("worker-3@127.0.0.3 exited with status 137; a new worker takes its place", out)
        # The replacement runs where worker 3 ran (its output has that host's prefix).
        self.assertRegex(out, r"\[worker-3@127\.0\.0\.3 *\] .*a new process in the place of the dead worker 3")
        s = read_summary(os.path.join(self.tmp, name))
        self.assertEqual([r["rank"] for r in s["rejoined_workers"]], [3], s)
        self.assertEqual(s["steps"], 8000)
        deadline = time.time() + 10
        while time.time() < deadline and processes_mentioning(token):
            time.sleep(0.1)
        self.assertEqual(processes_mentioning(token), [])

    def test_replace_servers_starts_the_replacement_on_the_dead_servers_host(self):
        name = "ssh_replace_server"
        p = subprocess.Popen(self.launch(name, "training.steps=1500", "checkpoint.interval=100",
                                         "cluster.on_server_loss=replace") + ["--replace-servers", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        token = f"sps-launch-{name}-{p.pid}.json"
        folder = os.path.join(self.tmp, name, "checkpoints", "step-000000000200")
        deadline = time.time() + 90
        while time.time() < deadline and not os.path.exists(os.path.join(folder, "server-1.snap")):
            time.sleep(0.01)
        victims = [pid for pid, cmd in sps_processes(token) if "sps-server --rank 1 " in cmd]
        self.assertEqual(len(victims), 1)
        os.kill(victims[0], signal.SIGKILL)
        out, _ = p.communicate(timeout=180)
        self.assertEqual(p.returncode, 0, out[-3000:])
        self.assertIn("server-1@127.0.0.2 exited with status 137; a new server takes its place", out)
        # The replacement runs where server 1 ran (its output has that host's prefix).
        self.assertRegex(out, r"\[server-1@127\.0\.0\.2 *\] .*took the dead server's place from ")
        s = read_summary(os.path.join(self.tmp, name))
        self.assertEqual([r["rank"] for r in s["replaced_servers"]], [1], s)
        self.assertEqual(s["steps"], 1500)
        deadline = time.time() + 10
        while time.time() < deadline and processes_mentioning(token):
            time.sleep(0.1)
        self.assertEqual(processes_mentioning(token), [])

    def test_an_unreachable_host_fails_before_anything_starts(self):
        bad = os.path.join(self.tmp, "bad_hosts.txt")
        with open(bad, "w") as f:
            f.write("127.0.0.1 scheduler server:2\n127.0.0.9 slots=4\n")  # sshd does not listen on .9
        t0 = time.time()
        r = subprocess.run(self.launch("ssh_unreachable", hosts=bad), capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("cannot reach '127.0.0.9' over ssh", r.stderr)
        self.assertLess(time.time() - t0, 30)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "ssh_unreachable", "scheduler.jsonl")))

    def test_hosts_file_mistakes_name_the_line(self):
        cases = [("127.0.0.1 scheduler gpu\n", "hosts.txt:1: 'gpu' is not a role"),
                 ("127.0.0.1 scheduler\n127.0.0.2 worker:9\n", "hosts.txt:2: 'worker:9' places more workers"),
                 ("127.0.0.1 scheduler server:2 worker:1\n", "3 processes have no host (worker-1, worker-2"),
                 ("127.0.0.1 slots=0\n", "hosts.txt:1: 'slots=0'"),
                 ("127.0.0.1 scheduler\nno-such-host.invalid slots=6\n",
                  "cannot resolve host 'no-such-host.invalid'")]
        for text, message in cases:
            path = os.path.join(self.tmp, "hosts.txt")
            with open(path, "w") as f:
                f.write(text)
            r = subprocess.run(self.launch("bad_hosts", hosts=path) + ["--dry-run"], capture_output=True, text=True,
                               timeout=60)
            self.assertEqual(r.returncode, 2, text + r.stdout + r.stderr)
            self.assertIn(message, r.stderr, text)
        # The example hosts file places the demo job.
        r = subprocess.run(self.launch("example", hosts=os.path.join(ROOT, "examples", "cluster", "hosts.txt")) +
                           ["--dry-run"], capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(len(r.stdout.splitlines()), 8, r.stdout)
        # One line without roles takes every process.
        with open(path, "w") as f:
            f.write("127.0.0.5\n")
        r = subprocess.run(self.launch("one_host", hosts=path) + ["--dry-run"], capture_output=True, text=True,
                           timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.count("@127.0.0.5"), 7, r.stdout)


class MpiLaunchTest(unittest.TestCase):
    def test_mpirun_starts_one_process_per_rank(self):
        if not shutil.which("mpirun"):
            self.skipTest("mpirun (Open MPI, Debian's openmpi-bin) is not installed")
        tmp = tempfile.mkdtemp(prefix="sps-mpi-")
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMPI_MCA_rmaps_base_oversubscribe="1")
        argv = (["mpirun", "--oversubscribe", "-n", "7", sys.executable, LAUNCH, DEMO, "--bin", BIN, "--mpi"] +
                sets(f"run.dir={tmp}", "run.name=mpi", f"cluster.scheduler_port={free_port()}", *SMALL))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-2000:])
        self.assertIn("test accuracy", r.stdout)
        for name in ("scheduler-0@", "server-1@", "worker-0@"):
            self.assertIn(f"[{name}", r.stdout)
        self.assertEqual(read_summary(os.path.join(tmp, "mpi"))["steps"], 200)
        # A worker killed mid-run: its rank exits 0 (so mpirun does not end
        # the job), and the job completes without it.
        mpi_argv = (["mpirun", "--oversubscribe", "-n", "7", sys.executable, LAUNCH, DEMO, "--bin", BIN, "--mpi"] +
                    sets(f"run.dir={tmp}", "run.name=mpi_loss", f"cluster.scheduler_port={free_port()}",
                         "data.train_limit=2000", "data.test_limit=500", "training.steps=4000",
                         "cluster.heartbeat_ms=200", "cluster.heartbeat_timeout_ms=4000"))
        s = run_and_kill_worker(self, mpi_argv, env, os.path.join(tmp, "mpi_loss"))
        self.assertEqual(s["steps"], 4000)
        # A task count that does not match the config is refused by rank 0.
        argv[argv.index("7")] = "5"
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("started 5 tasks, but the job has 7 processes", r.stdout + r.stderr)


class SlurmLaunchTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            from local_slurm import LocalSlurm, SlurmUnavailable
        except ImportError as e:
            raise unittest.SkipTest(f"local_slurm: {e}")
        if not shutil.which("slurmctld") or not shutil.which("srun"):
            raise unittest.SkipTest("Slurm (Debian's slurm-wlm) is not installed")
        cls.slurm = LocalSlurm(cpus=8)
        try:
            cls.slurm.start()
        except SlurmUnavailable as e:
            cls.slurm.stop()
            raise unittest.SkipTest(f"a single-node Slurm could not be started: {e}")

    @classmethod
    def tearDownClass(cls):
        cls.slurm.stop()

    def test_srun_starts_one_process_per_task(self):
        tmp = tempfile.mkdtemp(prefix="sps-slurm-")
        argv = (["srun", "-N", "1", "-n", "7", "--overcommit", "--kill-on-bad-exit=1", sys.executable, LAUNCH, DEMO,
                 "--bin", BIN, "--slurm"] + sets(f"run.dir={tmp}", "run.name=slurm", *SMALL))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=self.slurm.env())
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-2000:])
        self.assertIn("test accuracy", r.stdout)
        for name in ("scheduler-0@", "server-1@", "worker-0@"):
            self.assertIn(f"[{name}", r.stdout)
        s = read_summary(os.path.join(tmp, "slurm"))
        self.assertEqual(s["steps"], 200)
        # The scheduler's host came from SLURM_NODELIST, the port from the job id.
        with open(os.path.join(tmp, "slurm", "scheduler.jsonl")) as f:
            start = json.loads(f.readline())
        self.assertNotEqual(start["config"]["cluster"]["scheduler_host"], "127.0.0.1")
        self.assertGreaterEqual(start["config"]["cluster"]["scheduler_port"], 20000)

    def test_the_example_batch_script_runs_the_job(self):
        tmp = tempfile.mkdtemp(prefix="sps-sbatch-")
        out = os.path.join(tmp, "job.out")
        argv = (["sbatch", "--wait", "-N", "1", "-n", "7", "--overcommit", f"--chdir={ROOT}", f"--output={out}",
                 os.path.join(ROOT, "examples", "cluster", "sps.sbatch"), DEMO, "--bin", BIN] +
                sets(f"run.dir={tmp}", "run.name=sbatch", *SMALL))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=self.slurm.env())
        with open(out) as f:
            log = f.read()
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr + log[-3000:])
        self.assertIn("test accuracy", log)
        self.assertEqual(read_summary(os.path.join(tmp, "sbatch"))["steps"], 200)

    def test_a_dead_worker_does_not_end_the_srun_job(self):
        tmp = tempfile.mkdtemp(prefix="sps-slurm-")
        argv = (["srun", "-N", "1", "-n", "7", "--overcommit", "--kill-on-bad-exit=1", sys.executable, LAUNCH, DEMO,
                 "--bin", BIN, "--slurm"] +
                sets(f"run.dir={tmp}", "run.name=slurm_loss", "data.train_limit=2000", "data.test_limit=500",
                     "training.steps=4000", "cluster.heartbeat_ms=200", "cluster.heartbeat_timeout_ms=4000"))
        s = run_and_kill_worker(self, argv, self.slurm.env(), os.path.join(tmp, "slurm_loss"))
        self.assertEqual(s["steps"], 4000)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"] + sys.argv[2:])
