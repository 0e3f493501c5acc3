"""Launch a test worker script on 2 CPU processes (torchrun, gloo), as the multi-process tests do."""

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port free now: fixed ports collide when two pytest-xdist workers launch at once
    (a module-scoped fixture runs once per worker)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(script: Path, *args: str) -> None:
    """`python -m torch.distributed.run --nproc_per_node 2 script *args` on a free port, with one
    thread per process and the hub offline; asserts it exits 0 (its stderr's tail is the
    message)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
