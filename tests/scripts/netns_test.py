#!/usr/bin/env python3
"""Multi-host tests in Linux network namespaces: four "hosts" (namespaces
h0-h3, addresses 10.77.0.1-4/24) joined by veth pairs to a bridge in a fifth
("switch") namespace, running the scheduler, servers and workers over real
TCP between real addresses:

  h0 10.77.0.1  scheduler, server 0       h2 10.77.0.3  workers 1, 2
  h1 10.77.0.2  server 1, worker 0        h3 10.77.0.4  worker 3

- a BSP job trains to exactly the model it trains on loopback, and every
  server advertises its own namespace's address although bound to 0.0.0.0;
- taking worker 3's link down mid-run (ip link set ... down) sends it down
  the dead-worker path: the job finishes without it and worker 3 exits;
- a bandwidth cap (tc tbf) on worker 3's link slows it by at least the
  transfer time of its bytes, and its logged per-step network time shows it;
  added latency (tc netem) likewise, where the kernel has netem.

Needs root (CAP_NET_ADMIN); skips, saying why, where namespaces cannot be
made. Usage: netns_test.py BIN_DIR"""
import atexit
import ctypes
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
IP = shutil.which("ip") or "/sbin/ip"
TC = shutil.which("tc") or "/sbin/tc"
PREFIX = f"sps{os.getpid()}"
SWITCH = f"{PREFIX}-sw"
HOSTS = [f"{PREFIX}-h{i}" for i in range(4)]
ADDRESS = [f"10.77.0.{i + 1}" for i in range(4)]
ROOT_LINK = f"{PREFIX}r"
PORT = 29400  # every namespace has its own ports, so a fixed one is free
# (role, rank) -> host index
PLACEMENT = {("scheduler", 0): 0, ("server", 0): 0, ("server", 1): 1, ("worker", 0): 1, ("worker", 1): 2,
             ("worker", 2): 2, ("worker", 3): 3}


def run(*argv, check=True):
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


def die_with_parent():
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)


def make_network():
    """The namespaces, veths and bridge; raises RuntimeError if the kernel refuses."""
    run(IP, "netns", "add", SWITCH)
    run(IP, "-n", SWITCH, "link", "add", "br0", "type", "bridge")
    run(IP, "-n", SWITCH, "link", "set", "br0", "up")
    for i, ns in enumerate(HOSTS):
        run(IP, "netns", "add", ns)
        run(IP, "-n", ns, "link", "set", "lo", "up")
        # Created straight into their namespaces, so no name touches the host's.
        run(IP, "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"port{i}", "netns", SWITCH)
        run(IP, "-n", ns, "addr", "add", f"{ADDRESS[i]}/24", "dev", "eth0")
        run(IP, "-n", ns, "link", "set", "eth0", "up")
        run(IP, "-n", SWITCH, "link", "set", f"port{i}", "master", "br0")
        run(IP, "-n", SWITCH, "link", "set", f"port{i}", "up")


def connect_this_host():
    """A veth from this (the root) namespace into the bridge, as 10.77.0.254,
    so that ssh and the launcher here reach the namespaced hosts."""
    run(IP, "link", "add", ROOT_LINK, "type", "veth", "peer", "name", "port9", "netns", SWITCH)
    run(IP, "addr", "add", "10.77.0.254/24", "dev", ROOT_LINK)
    run(IP, "link", "set", ROOT_LINK, "up")
    run(IP, "-n", SWITCH, "link", "set", "port9", "master", "br0")
    run(IP, "-n", SWITCH, "link", "set", "port9", "up")


def remove_network():
    run(IP, "link", "del", ROOT_LINK, check=False)
    for ns in HOSTS + [SWITCH]:
        run(IP, "netns", "del", ns, check=False)


class Job:
    """One job's processes; in the namespaces (netns=True) or on loopback."""

    def __init__(self, name, sets, netns=True):
        self.dir = tempfile.mkdtemp(prefix=f"sps-netns-{name}-")
        self.run_dir = os.path.join(self.dir, name)
        host = ADDRESS[0] if netns else "127.0.0.1"
        self.sets = ["data.train_limit=10000", "data.test_limit=2000", f"run.dir={self.dir}", f"run.name={name}",
                     f"cluster.scheduler_host={host}", f"cluster.scheduler_port={PORT if netns else 0}",
                     "cluster.bind_host=" + ("0.0.0.0" if netns else "127.0.0.1")] + list(sets)
        self.netns = netns
        self.procs = {}

    def start(self):
        order = sorted(PLACEMENT, key=lambda k: ("scheduler", "server", "worker").index(k[0]))
        port = PORT
        for role, rank in order:
            argv = [os.path.join(BIN, "sps-" + role)]
            if role != "scheduler":
                argv += ["--rank", str(rank)]
            argv += ["--config", DEMO]
            for s in self.sets:
                argv += ["--set", s]
            if role != "scheduler" and not self.netns:
                argv += ["--set", f"cluster.scheduler_port={port}"]
            if self.netns:
                argv = [IP, "netns", "exec", HOSTS[PLACEMENT[(role, rank)]]] + argv
            with open(os.path.join(self.dir, f"{role}-{rank}.out"), "w") as out:
                self.procs[(role, rank)] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                            preexec_fn=die_with_parent)
            if role == "scheduler" and not self.netns:
                port = self.wait_port()

    def wait_port(self):
        path = os.path.join(self.run_dir, "scheduler.port")
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with open(path) as f:
                    return int(f.read())
            except (OSError, ValueError):
                time.sleep(0.02)
        raise RuntimeError("the scheduler did not write its port")

    def wait(self, timeout):
        deadline = time.time() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill()
                return False
        return True

    def kill(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()

    def output(self, role, rank):
        with open(os.path.join(self.dir, f"{role}-{rank}.out")) as f:
            return f.read()

    def summary(self):
        with open(os.path.join(self.run_dir, "summary.json")) as f:
            return json.load(f)

    def steps(self, rank):
        path = os.path.join(self.run_dir, f"worker-{rank}.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [e for e in (json.loads(line) for line in f if line.strip()) if "step" in e and "loss" in e]

    def log(self, name):
        with open(os.path.join(self.run_dir, name)) as f:
            return [json.loads(line) for line in f if line.strip()]


def network_seconds(steps):
    """Per-step time a worker spent on the network: its push plus its wait for the pull."""
    return [e["push_s"] + e["pull_wait_s"] for e in steps]


class NetnsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise unittest.SkipTest("network namespaces need root (CAP_NET_ADMIN)")
        if not os.path.exists(IP):
            raise unittest.SkipTest("iproute2's ip is not installed")
        atexit.register(remove_network)
        try:
            make_network()
            connect_this_host()
        except RuntimeError as e:
            remove_network()
            raise unittest.SkipTest(f"cannot make network namespaces here: {e}")

    @classmethod
    def tearDownClass(cls):
        remove_network()

    def tearDown(self):
        # Links and qdiscs back to normal for the next test.
        run(IP, "-n", HOSTS[3], "link", "set", "eth0", "up", check=False)
        run(IP, "-n", SWITCH, "link", "set", "port3", "up", check=False)
        run(TC, "-n", HOSTS[3], "qdisc", "del", "dev", "eth0", "root", check=False)
        run(TC, "-n", SWITCH, "qdisc", "del", "dev", "port3", "root", check=False)

    def run_job(self, name, sets, netns=True, timeout=180):
        job = Job(name, sets, netns)
        job.start()
        self.assertTrue(job.wait(timeout), f"{name} did not finish in {timeout} s")
        self.assertEqual(job.procs[("scheduler", 0)].returncode, 0, job.output("scheduler", 0))
        return job

    def test_a_job_across_namespaces_trains_the_same_model_as_on_loopback(self):
        sets = ["training.steps=600"]
        across = self.run_job("across", sets)
        loopback = self.run_job("loopback", sets, netns=False)
        a, b = across.summary(), loopback.summary()
        # BSP is deterministic: the same float operations in the same order.
        self.assertEqual(a["test_accuracy"], b["test_accuracy"])
        self.assertEqual(a["train_loss"], b["train_loss"])
        self.assertGreater(a["test_accuracy"], 0.80)
        servers = {e["rank"]: e["endpoint"] for e in across.log("scheduler.jsonl")
                   if e.get("event") == "register" and e.get("role") == "server"}
        # Bound to 0.0.0.0; each advertises its own namespace's address.
        self.assertTrue(servers[0].startswith(f"tcp://{ADDRESS[0]}:"), servers)
        self.assertTrue(servers[1].startswith(f"tcp://{ADDRESS[1]}:"), servers)
        workers = {e["rank"]: e["host"] for e in across.log("scheduler.jsonl")
                   if e.get("event") == "register" and e.get("role") == "worker"}
        self.assertEqual(len(workers), 4)

    def test_the_ssh_launcher_runs_the_job_across_the_namespaces(self):
        sys.path.insert(0, HERE)
        from local_sshd import LocalSshd
        sshds = []
        try:
            # One sshd per namespaced host, on its own address, sharing one key pair.
            for i, ns in enumerate(HOSTS):
                sshd = LocalSshd([ADDRESS[i]], port=22, netns=ns, keys_from=sshds[0] if sshds else None)
                sshd.start()
                sshds.append(sshd)
            tmp = tempfile.mkdtemp(prefix="sps-netns-ssh-")
            hosts = os.path.join(tmp, "hosts.txt")
            with open(hosts, "w") as f:
                f.write(f"{ADDRESS[0]} scheduler server\n{ADDRESS[1]} server worker\n{ADDRESS[2]} worker:2\n"
                        f"{ADDRESS[3]} worker\n")
            sets = ["data.train_limit=10000", "data.test_limit=2000", "training.steps=600"]
            argv = [sys.executable, LAUNCH, DEMO, "--bin", BIN, "--hosts", hosts, "--ssh", sshds[0].ssh_command(),
                    "--set", f"run.dir={tmp}", "--set", "run.name=ssh"]
            for x in sets:
                argv += ["--set", x]
            r = subprocess.run(argv, capture_output=True, text=True, timeout=180)
            self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr)
            self.assertIn(f"[worker-0@{ADDRESS[1]}", r.stdout)
        finally:
            for sshd in reversed(sshds):
                sshd.stop()
        with open(os.path.join(tmp, "ssh", "summary.json")) as f:
            over_ssh = json.load(f)
        loopback = self.run_job("loopback_for_ssh", ["training.steps=600"], netns=False).summary()
        self.assertEqual(over_ssh["test_accuracy"], loopback["test_accuracy"])
        self.assertEqual(over_ssh["train_loss"], loopback["train_loss"])
        with open(os.path.join(tmp, "ssh", "scheduler.jsonl")) as f:
            servers = {e["rank"]: e["endpoint"] for e in map(json.loads, f)
                       if e.get("event") == "register" and e.get("role") == "server"}
        self.assertTrue(servers[0].startswith(f"tcp://{ADDRESS[0]}:"), servers)
        self.assertTrue(servers[1].startswith(f"tcp://{ADDRESS[1]}:"), servers)

    def test_cutting_a_workers_link_takes_the_dead_worker_path(self):
        job = Job("cut", ["training.steps=2500", "cluster.heartbeat_ms=200", "cluster.heartbeat_timeout_ms=4000",
                          "cluster.on_worker_loss=continue"])
        job.start()
        deadline = time.time() + 60
        while time.time() < deadline and len(job.steps(3)) < 200:
            time.sleep(0.05)
        self.assertGreaterEqual(len(job.steps(3)), 200, job.output("worker", 3))
        run(IP, "-n", HOSTS[3], "link", "set", "eth0", "down")
        cut_at = time.time()
        self.assertTrue(job.wait(120), "the job hung after a worker's link went down")
        self.assertEqual(job.procs[("scheduler", 0)].returncode, 0, job.output("scheduler", 0))
        s = job.summary()
        self.assertEqual(s.get("dead_workers"), [3], s)
        self.assertEqual(s["steps"], 2500)
        for rank in range(3):
            self.assertEqual(job.procs[("worker", rank)].returncode, 0, job.output("worker", rank))
        # Worker 3 noticed the silent scheduler on its own and gave up.
        self.assertNotEqual(job.procs[("worker", 3)].returncode, 0)
        self.assertIn("silent", job.output("worker", 3))
        self.assertLess(time.time() - cut_at, 60)
        dead = [(e["role"], e["rank"]) for e in job.log("scheduler.jsonl") if e.get("event") == "node_dead"]
        self.assertEqual(dead, [("worker", 3)])

    def slow_link_job(self, name, shape):
        """A dense BSP job with worker 3's link shaped both ways by `shape` (tc args)."""
        sets = ["training.steps=40", "compression.method=dense"]
        if shape:
            for ns, dev in ((HOSTS[3], "eth0"), (SWITCH, "port3")):
                r = run(TC, "-n", ns, "qdisc", "add", "dev", dev, "root", *shape, check=False)
                if r.returncode != 0:
                    self.skipTest(f"tc qdisc {shape[0]}: {r.stderr.strip()} (the kernel lacks it)")
        return self.run_job(name, sets)

    def test_a_bandwidth_cap_slows_the_worker_by_its_transfer_time(self):
        rate_bits = 4e6
        free = self.slow_link_job("uncapped", None)
        capped = self.slow_link_job("capped", ["tbf", "rate", "4mbit", "burst", "16kb", "latency", "500ms"])
        steps = capped.steps(3)[1:]  # step 0 waits for the initial dense pull of everyone
        self.assertEqual(len(steps), 39)
        # Each direction of the link carries a step's bytes at rate_bits at best.
        per_step = max(sum(e["bytes_pushed"] for e in steps), sum(e["bytes_pulled"] for e in steps)) / len(steps)
        bound = per_step * 8 / rate_bits
        net = network_seconds(steps)
        mean = sum(net) / len(net)
        free_net = network_seconds(free.steps(3)[1:])
        free_mean = sum(free_net) / len(free_net)
        print(f"\nbandwidth cap: {per_step / 1024:.1f} KiB/step each way at 4 Mbit/s needs {bound * 1e3:.1f} ms; "
              f"worker 3 logged {mean * 1e3:.1f} ms/step on the network (uncapped {free_mean * 1e3:.2f} ms)")
        self.assertGreater(per_step, 30000)  # dense: 7850 floats
        self.assertGreaterEqual(mean, 0.8 * bound)
        self.assertGreater(mean, 3 * free_mean)
        # And the job took at least as long as the link alone needs for those
        # steps (compute overlaps the transfers, so the times do not add up).
        free_s, capped_s = free.summary()["train_seconds"], capped.summary()["train_seconds"]
        print(f"training time: {free_s:.2f} s uncapped, {capped_s:.2f} s capped")
        self.assertGreater(capped_s, 39 * 0.8 * bound)
        self.assertGreater(capped_s, 1.5 * free_s)

    def test_added_latency_shows_in_the_network_time(self):
        delay = 0.025
        # Skips where the kernel has no netem (CONFIG_NET_SCH_NETEM); the
        # bandwidth test above still covers slow links there.
        steps = self.slow_link_job("delayed", ["netem", "delay", "25ms"]).steps(3)[1:]
        net = network_seconds(steps)
        # Push and pull each cross the link out and back: at least one round trip of 2 x delay per step.
        self.assertGreaterEqual(sum(net) / len(net), 2 * delay)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"] + sys.argv[2:])
