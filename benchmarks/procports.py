"""The TCP ports a child process listens on, read from /proc (Linux).

For servers started as subprocesses with port 0 that do not report the port they got (``kvgate
serve``, ``kvgate extproc``): the ports its sockets listen on are found by matching the socket
inodes among its open files with the LISTEN rows of /proc/net/tcp and tcp6. Choosing a free
port beforehand instead can lose it to another process before the server binds it.
(``kvgate sim`` reports its ports itself: ``--ready-file``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

_LISTEN = "0A"


def listening_ports(pid: int) -> set[int]:
    """TCP ports that process ``pid`` has a listening socket on (empty if it is gone)."""
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == _LISTEN and f[9] in inodes:
                ports.add(int(f[1].rpartition(":")[2], 16))
    return ports


def wait_listening(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """The one port ``proc`` listens on, once it does (RuntimeError if it exits or takes too long)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        ports = listening_ports(proc.pid)
        if len(ports) == 1:
            return ports.pop()
        if len(ports) > 1:
            raise RuntimeError(f"{proc.args!r} listens on several ports: {sorted(ports)}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} did not listen within {timeout:.0f} s")


def sim_ports(proc: subprocess.Popen, ready_file: Path, timeout: float = 30.0) -> list[dict]:
    """What ``kvgate sim --ready-file ready_file`` bound, one dict per replica (``port``,
    ``kv_events_port``, ``replay_port``, ...), once it has written it."""
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"kvgate sim exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"kvgate sim did not start within {timeout:.0f} s")
        time.sleep(0.02)
    return list(json.loads(ready_file.read_text())["replicas"])
