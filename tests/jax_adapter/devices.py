"""Processes with their own number of JAX CPU devices (fixed when jax starts)."""

import os
import subprocess
import sys
from pathlib import Path

DEVICES_FLAG = "--xla_force_host_platform_device_count"
HERE = Path(__file__).resolve().parent


def run_with_devices(devices: int, *args: str, timeout: float = 180) -> list[str]:
    """Run ``tests/jax_adapter/device_worker.py ARGS`` in a process with ``devices`` CPU devices;
    its stdout lines (fails with its stderr if it fails)."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"{DEVICES_FLAG}={devices}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
    )  # a work tree's src too
    done = subprocess.run(
        [sys.executable, str(HERE / "device_worker.py"), *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()
