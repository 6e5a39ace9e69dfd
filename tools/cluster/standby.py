"""A warm spare: a process of a spare node that is already running, its interpreter
started and its modules imported, until the supervisor gives it a place in the job. This
is what a pool of hot spare nodes gives a job (GKE's hot spares, nvidia-resiliency-ext's
spare ranks): the replacement for a lost node attaches instead of starting.

``python standby.py --assignment FILE --preload torch,mtckpt -- worker.py ARGS...`` (or
``-- -m mtckpt daemon ...``) imports the modules named, then waits for FILE: a JSON object
of environment variables (the rank's generation), which it adds to its environment, with
``CLUSTER_WARM_SINCE`` (when it was ready), before running the command as ``python``
would have. Until then it runs at the lowest CPU priority: a real spare node's processes
take nothing from the job's nodes, here they share their cores. Like a running process, it
holds an S3 client connected to the job's endpoint (``CLUSTER_S3_OPTIONS``)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

POLL = 0.02  # seconds between looks for the assignment
SPARE_NICE = 19
HERE = Path(__file__).resolve()


class AssignmentTimeout(TimeoutError):
    """No assignment came for this spare within its bound."""


class Spare:
    """The supervisor's handle on one warm spare: started when made (``wrap`` puts it in
    its node's namespace), given its place with ``assign`` (after which ``proc`` runs the
    command)."""

    def __init__(self, command: list[str], *, preload: str, env: dict, assignment: Path,
                 wrap, **popen) -> None:  # fmt: skip
        self.assignment = assignment
        assignment.unlink(missing_ok=True)
        self.ready_file = ready_file(assignment)
        self.ready_file.unlink(missing_ok=True)
        full = [sys.executable, str(HERE), "--assignment", str(assignment),
                "--preload", preload, "--", *command]  # fmt: skip
        self.proc = subprocess.Popen(wrap(*full), env=env, **popen)

    @property
    def ready(self) -> bool:
        """Whether its modules are imported (it waits for its assignment)."""
        return self.ready_file.exists()

    def assign(self, env: dict[str, str]) -> subprocess.Popen:
        pending = self.assignment.with_suffix(".tmp")
        pending.write_text(json.dumps(env))
        pending.rename(self.assignment)
        return self.proc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def ready_file(assignment: Path) -> Path:
    return assignment.with_suffix(".ready")


def wait_for(path: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssignmentTimeout(f"spare {os.getpid()}: no assignment at {path} within "
                                    f"{timeout:.0f} s")  # fmt: skip
        time.sleep(POLL)
    return json.loads(path.read_text())


def connect_object_store() -> None:
    """The S3 client a spare node's running processes hold: made (botocore's models loaded,
    0.15 s of CPU) and connected, where the job's processes will find it (fsspec keeps one
    filesystem per process and options: the node's config file has the same)."""
    options = os.environ.get("CLUSTER_S3_OPTIONS")
    if options:
        import fsspec

        fs, _ = fsspec.core.url_to_fs("s3://", **json.loads(options))
        fs.ls("")  # the buckets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assignment", type=Path, required=True)
    parser.add_argument("--preload", default="", help="comma list of modules to import")
    parser.add_argument("--timeout", type=float, default=24 * 3600.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    os.nice(SPARE_NICE)  # on other machines in a real cluster: here it yields to the job
    for name in filter(None, args.preload.split(",")):
        importlib.import_module(name)
    connect_object_store()
    warm_since = time.time()
    ready_file(args.assignment).touch()
    os.environ.update(wait_for(args.assignment, args.timeout))
    os.setpriority(os.PRIO_PROCESS, 0, 0)  # in the job now (the harness runs as root)
    os.environ["CLUSTER_WARM_SINCE"] = str(warm_since)
    if command[0] == "-m":
        sys.argv = [command[1], *command[2:]]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        sys.path.insert(0, str(Path(command[0]).resolve().parent))
        runpy.run_path(command[0], run_name="__main__")


if __name__ == "__main__":
    main()
