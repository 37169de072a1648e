"""Helpers the script-driven tests share: finding live processes by a token
on their command line, and a free loopback port."""
import os
import socket


def processes_mentioning(token, exclude=("launcher_test", "deploy_test", "netns_test"), with_command=False):
    """PIDs of live (non-zombie) processes whose command line contains token,
    other than this one and the test scripts themselves; with_command: as
    (pid, command line) pairs."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().split(")")[-1].split()[0]
        except OSError:
            continue
        if token in cmd and state != "Z" and not any(e in cmd for e in exclude):
            found.append((int(pid), cmd) if with_command else int(pid))
    return found


def free_port():
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
