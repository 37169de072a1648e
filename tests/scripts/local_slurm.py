#!/usr/bin/env python3
"""A real, throw-away single-node Slurm cluster for tests (Debian 12's slurm-wlm 22.05).

Runs slurmctld and slurmd in the foreground as root, with every config,
state, log and pid file in one temp directory and free high ports, so it
neither needs nor touches a system-wide Slurm. The node advertises `cpus`
CPUs whatever the machine has, so `srun -n 7` runs 7 tasks on a 2-core box.

    with LocalSlurm(cpus=8) as slurm:
        subprocess.run(["srun", "-n", "7", "hostname"], env=slurm.env())

Run this file to self-test it.
"""
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

SBIN = "/usr/sbin"
# auth/none (still shipped in 22.05) needs no munged and no key; where the
# plugin is missing, fall back to a private munged. LOCAL_SLURM_AUTH=munge forces it.
AUTH_NONE_PLUGINS = ["/usr/lib/*/slurm-wlm/auth_none.so", "/usr/lib*/slurm/auth_none.so",
                     "/usr/local/lib*/slurm/auth_none.so"]


class SlurmUnavailable(Exception):
    """The cluster could not be started; str() is a one-line reason, then log tails."""


def _free_port():
    # The kernel picks an unused port; nothing else should grab it in the few
    # ms before the daemon binds it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path, lines):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class LocalSlurm:
    def __init__(self, cpus=8, workdir=None):
        self.cpus = cpus
        self._workdir = workdir
        self.dir = None
        self.conf = None
        self.node = socket.gethostname().split(".")[0]  # the name slurmd looks itself up by
        self.procs = {}  # daemon name -> Popen, in start order
        self.auth = os.environ.get("LOCAL_SLURM_AUTH") or (
            "none" if any(glob.glob(p) for p in AUTH_NONE_PLUGINS) else "munge")

    def _spawn(self, name, argv):
        with open(os.path.join(self.dir, name + ".out"), "wb") as out:
            # Own session, so stop() can SIGKILL the daemon and all it forked.
            self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def _start_munged(self):
        # munged insists its socket directory is searchable by everyone.
        os.chmod(self.dir, 0o755)
        key = os.path.join(self.dir, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o400), "wb") as f:
            f.write(os.urandom(1024))
        sock = os.path.join(self.dir, "munge.sock")
        self._spawn("munged", [f"{SBIN}/munged", "-F", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={self.dir}/munged.pid", f"--log-file={self.dir}/munged.log",
                               f"--seed-file={self.dir}/munged.seed"])
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise self._failure("munged did not start")
            time.sleep(0.05)
        return f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={sock}\n"

    def _write_config(self, auth):
        d = self.dir
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        self.conf = os.path.join(d, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write(f"""\
ClusterName=localtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
MailProg=/bin/true
{auth}StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
# No usable cgroups in a container: track and kill tasks by process group.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Reject a request bigger than the node at once instead of queueing it forever.
EnforcePartLimits=ALL
# Believe the CPUs/RealMemory below rather than the real hardware.
SlurmdParameters=config_overrides
# Quick teardown of killed steps (SIGKILL 1 s after SIGTERM) and finished jobs.
KillWait=1
MinJobAge=2
NodeName={self.node} NodeHostname={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _failure(self, reason):
        """Build the exception (with each daemon's log tail) and clean up."""
        tails = "".join(f"--- {n} ---\n{_tail(os.path.join(self.dir, n + '.log'), 15)}"
                        f"{_tail(os.path.join(self.dir, n + '.out'), 5)}" for n in self.procs)
        self.stop()
        return SlurmUnavailable(f"{reason}\n{tails}")

    def start(self, timeout=30.0):
        needed = [f"{SBIN}/slurmctld", f"{SBIN}/slurmd"] + ([f"{SBIN}/munged"] if self.auth == "munge" else [])
        for exe in needed:
            if not os.access(exe, os.X_OK):
                raise SlurmUnavailable(f"{exe} is not installed")
        for exe in ("srun", "sinfo", "scontrol"):
            if shutil.which(exe) is None:
                raise SlurmUnavailable(f"{exe} is not on PATH")
        if self._workdir:
            os.makedirs(self._workdir, exist_ok=True)
        self.dir = self._workdir or tempfile.mkdtemp(prefix="local-slurm-")
        try:
            self._launch(time.monotonic() + timeout, timeout)
        except SlurmUnavailable:
            raise  # _failure() has cleaned up
        except BaseException:  # e.g. Ctrl-C: leave nothing running
            self.stop()
            raise

    def _launch(self, deadline, timeout):
        self._write_config(self._start_munged() if self.auth == "munge" else
                           "AuthType=auth/none\nCredType=cred/none\n")
        # -D: stay in the foreground (we own the process); -c: start from no
        # saved state (matters when a workdir is reused); -i: tolerate that.
        self._spawn("slurmctld", [f"{SBIN}/slurmctld", "-D", "-c", "-i", "-f", self.conf])
        self._spawn("slurmd", [f"{SBIN}/slurmd", "-D", "-f", self.conf, "-N", self.node])
        state = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise self._failure(f"{name} exited with status {p.returncode}")
            try:
                r = subprocess.run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%t"], env=self.env(),
                                   capture_output=True, text=True, timeout=10)
            except subprocess.TimeoutExpired:
                continue
            state = (r.stdout + r.stderr).strip()
            if r.returncode == 0 and state == "idle":
                return
            time.sleep(0.2)
        raise self._failure(f"node {self.node} not idle after {timeout:g} s (last sinfo: {state!r})")

    def env(self):
        # Drop inherited SLURM_* (e.g. when the test itself runs inside a job).
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = self.conf or "(LocalSlurm not started)"
        return env

    def _kill_steps(self):
        """SIGKILL this cluster's slurmstepds and their tasks. They daemonize out
        of slurmd's session, so find them by the socket each keeps in our
        SlurmdSpoolDir, then kill everything in their sessions."""
        spool = os.path.join(self.dir, "spool") + "/"
        try:
            with open("/proc/net/unix") as f:
                socks = {f"socket:[{w[6]}]" for w in map(str.split, f) if len(w) > 7 and w[7].startswith(spool)}
        except OSError:
            return
        sids = set()
        for pid in filter(str.isdigit, os.listdir("/proc")) if socks else ():
            try:
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") in socks for fd in os.listdir(f"/proc/{pid}/fd")):
                    sids.add(os.getsid(int(pid)))
            except OSError:
                continue
        sids.discard(os.getsid(0))
        for pid in filter(str.isdigit, os.listdir("/proc")) if sids else ():
            try:
                if os.getsid(int(pid)) in sids:
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                continue

    def stop(self):
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            # Cancel jobs the Slurm way first, so their sruns are told and exit,
            # and give the steps a moment to end.
            try:
                subprocess.run(["scancel", "--quiet", "-w", self.node], env=self.env(),
                               capture_output=True, timeout=10)
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline and subprocess.run(
                        ["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True, timeout=5).stdout.strip():
                    time.sleep(0.1)
            except subprocess.TimeoutExpired:
                pass
        if self.dir:
            # A step still there (e.g. retrying to reach a gone srun) would hold
            # up slurmd's shutdown for seconds.
            self._kill_steps()
        # slurmd first (it reports to slurmctld on the way out), munged last.
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:  # a hung daemon, or anything left in its session
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        self.procs = {}
        if self.dir:
            self._kill_steps()  # any step launched meanwhile
            if not self._workdir:
                shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def _live_processes(token):
    """(pid, cmdline) of non-zombie processes whose command line contains token."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token in cmd and state != "Z" and int(pid) != os.getpid():
            found.append((int(pid), cmd))
    return found


if __name__ == "__main__":
    t0 = time.monotonic()
    slurm = LocalSlurm(cpus=8)
    with slurm:
        workdir = slurm.dir
        print(f"start() took {time.monotonic() - t0:.2f} s (auth/{slurm.auth}, node {slurm.node})")
        r = subprocess.run(["srun", "-N", "1", "-n", "7", "--overcommit", "bash", "-c",
                            "echo $SLURM_PROCID $SLURM_NTASKS $SLURM_NODELIST"],
                           env=slurm.env(), capture_output=True, text=True, timeout=60)
        print(r.stdout + r.stderr, end="")
        ids = sorted(int(line.split()[0]) for line in r.stdout.splitlines())
        assert r.returncode == 0 and ids == list(range(7)), (r.returncode, ids)
        r = subprocess.run(["srun", "-n", "1", "bash", "-c", "exit 1"], env=slurm.env(),
                           capture_output=True, text=True, timeout=60)
        print(f"task exiting 1: srun status {r.returncode}: {r.stderr.strip()}")
        assert r.returncode == 1
    slurm.stop()  # a second stop() is harmless
    # Every daemon has workdir on its command line; slurmstepd is not ours only
    # if a system Slurm runs here too.
    left = _live_processes(workdir) + _live_processes("slurmstepd")
    assert not left and not os.path.exists(workdir), (left, workdir)
    print(f"stopped: no daemons left, {workdir} removed; total {time.monotonic() - t0:.2f} s")
