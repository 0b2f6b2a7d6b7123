"""What the multi-process tests share: a free port, the CLI in a subprocess on N CPU processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.conftest import REPO


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def cli(*args: str, devices: int, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "PL_DISABLE_FORK": "1"}
    strategy = ["--trainer.strategy", "ddp"] if devices > 1 else []
    cmd = [sys.executable, "-m", "lightning_ood", *args, "--trainer.accelerator", "cpu", "--trainer.devices",
           str(devices), *strategy, "--trainer.enable_progress_bar", "false"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
