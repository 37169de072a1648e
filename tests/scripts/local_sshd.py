"""A private sshd for tests: its own host and user keys in a temp folder,
listening on given addresses (optionally inside a network namespace), with
an ssh command line that logs in without prompts.

    with LocalSshd(["127.0.0.1", "127.0.0.2"]) as sshd:
        subprocess.run(sshd.ssh_command().split() + ["127.0.0.2", "true"])

Several instances can share one key pair (keys_from=first), so that one ssh
command reaches all of them. start() raises unittest.SkipTest, with sshd's
log as the reason, where sshd cannot run."""
import os
import shutil
import subprocess
import tempfile
import time
import unittest

from proc_util import free_port


class LocalSshd:
    def __init__(self, addresses, port=None, netns=None, keys_from=None):
        self.addresses = list(addresses)
        self.port = port or free_port()
        self.netns = netns
        self.dir = tempfile.mkdtemp(prefix="sps-sshd-")
        self.keys = keys_from.keys if keys_from else self.dir
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout=10.0):
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd) or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
            raise unittest.SkipTest("openssh-server/openssh-client are not installed (scripts/setup installs them)")
        if self.keys == self.dir:
            for name in ("host", "user"):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(self.dir, name)],
                               check=True)
            shutil.copy(os.path.join(self.dir, "user.pub"), os.path.join(self.dir, "authorized_keys"))
        conf = os.path.join(self.dir, "sshd_config")
        with open(conf, "w") as f:
            f.write(f"Port {self.port}\n")
            for a in self.addresses:
                f.write(f"ListenAddress {a}\n")
            f.write(f"HostKey {self.keys}/host\nAuthorizedKeysFile {self.keys}/authorized_keys\n"
                    f"PidFile {self.dir}/sshd.pid\nStrictModes no\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n")
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation folder
        argv = [sshd, "-D", "-e", "-f", conf]
        if self.netns:
            argv = [shutil.which("ip") or "/sbin/ip", "netns", "exec", self.netns] + argv
        log = open(os.path.join(self.dir, "sshd.log"), "w")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run(self.ssh_command().split() + [self.addresses[0], "true"], capture_output=True)
            if r.returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        with open(os.path.join(self.dir, "sshd.log")) as f:
            reason = f.read()[-500:].strip()
        self.stop()
        raise unittest.SkipTest(f"a private sshd could not be started: {reason or 'no log'}")

    def ssh_command(self):
        return (f"ssh -p {self.port} -i {self.keys}/user -o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Instances sharing our keys are stopped before us (tests stop in reverse order).
        shutil.rmtree(self.dir, ignore_errors=True)
