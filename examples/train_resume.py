"""Train, get killed, resume: mtckpt's main job, with no server and no configuration.

A small MLP (numpy, Adam) learns a fixed teacher function. The trainer checkpoints every
step into node memory (tmpfs) and every 20 steps onto local disk. This script

1. starts the trainer and SIGKILLs it at a random step, possibly in the middle of a save,
2. starts it again: it restores the newest complete, verified checkpoint and trains on,
3. runs the same training uninterrupted in another directory,
4. checks that the resumed run ends bit-identical to the uninterrupted one.

    python examples/train_resume.py [--dir DIR] [--steps 300] [--seed 0]

Exit status 0 when the resumed run is bit-exact, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import mtckpt

FEATURES, HIDDEN, BATCH = 256, 1024, 128


class Batches:
    """An endless stream of training batches; its position is part of the checkpoint."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.teacher = (
            np.random.default_rng(12345).standard_normal((FEATURES, 1)).astype(np.float32)
        )
        self.served = 0

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        x = self.rng.standard_normal((BATCH, FEATURES), dtype=np.float32)
        y = np.tanh(x @ self.teacher) + 0.1 * np.sin(3 * x[:, :1])
        self.served += 1
        return x, y.astype(np.float32)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.served = state["served"]


def init_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.standard_normal((HIDDEN, 1)) / np.sqrt(HIDDEN)).astype(np.float32),
        "b2": np.zeros(1, np.float32),
    }


def train_step(params, moments, batch, t, lr=1e-3, betas=(0.9, 0.999), eps=1e-8) -> float:
    """One step of MSE regression with Adam; updates params and moments in place."""
    x, y = batch
    h = np.tanh(x @ params["w1"] + params["b1"])
    out = h @ params["w2"] + params["b2"]
    err = out - y
    loss = float(np.mean(err**2))
    d_out = (2.0 / len(x)) * err
    dh = (d_out @ params["w2"].T) * (1 - h**2)
    grads = {"w2": h.T @ d_out, "b2": d_out.sum(0), "w1": x.T @ dh, "b1": dh.sum(0)}
    for name, grad in grads.items():
        m, v = moments["m"][name], moments["v"][name]
        m *= betas[0]
        m += (1 - betas[0]) * grad
        v *= betas[1]
        v += (1 - betas[1]) * grad**2
        m_hat = m / (1 - betas[0] ** t)
        v_hat = v / (1 - betas[1] ** t)
        params[name] -= (lr * m_hat / (np.sqrt(v_hat) + eps)).astype(np.float32)
    return loss


def fingerprint(params: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(params[name].tobytes())
    return digest.hexdigest()[:16]


def trainer(args: argparse.Namespace) -> int:
    """The training process: restore if a checkpoint exists, then train and checkpoint."""
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="mtckpt: %(message)s")
    params = init_params(args.seed)
    moments = {k: {n: np.zeros_like(p) for n, p in params.items()} for k in ("m", "v")}
    batches = Batches(args.seed)
    state = {"model": params, "adam": moments, "data": batches, "step": 0}
    manager = mtckpt.CheckpointManager(
        "mlp",
        memory=mtckpt.MemoryTier(args.memory, every=1, keep=2),
        local=mtckpt.LocalTier(args.local, every=20, keep=2),
    )
    first = 1
    if manager.latest_step() is not None:
        step, _ = manager.restore(state)  # arrays filled in place, batches reloaded
        first = step + 1
        print(f"resumed from step {step} ({fingerprint(params)})", flush=True)
    for step in range(first, args.steps + 1):
        loss = train_step(params, moments, batches.next(), t=step)
        state["step"] = step
        manager.save(step, state)
        print(f"step {step} loss {loss:.9f}", flush=True)
    manager.close()
    print(f"final {fingerprint(params)}", flush=True)
    return 0


def launch(args: argparse.Namespace, memory: Path, local: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        args.script,
        "--trainer",
        "--memory",
        str(memory),
        "--local",
        str(local),
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
    ]
    env = {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)


def run_to_end(proc: subprocess.Popen, echo: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if not line.startswith("step ") or line.startswith(f"step {echo}"):
            print(f"   | {line.strip()}")
    if proc.wait() != 0:
        raise SystemExit(f"trainer failed with exit status {proc.returncode}")
    return lines


def demo(args: argparse.Namespace) -> int:
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mtckpt-demo-"))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else base
    memory = Path(tempfile.mkdtemp(prefix="mtckpt-demo-", dir=shm))
    kill_at = args.kill_at or random.Random(args.seed).randint(args.steps // 4, 3 * args.steps // 4)
    print(f"checkpoints: memory tier {memory}, local tier {base / 'local'}")
    try:
        print(f"1. training for {args.steps} steps; SIGKILL after step {kill_at}")
        proc = launch(args, memory, base / "local")
        for line in proc.stdout:
            if line.startswith(f"step {kill_at} "):
                time.sleep(random.uniform(0, 0.003))  # land inside the next save, sometimes
                proc.send_signal(signal.SIGKILL)
                print(f"   | {line.strip()}\n   | -- killed (SIGKILL) --")
                break
        proc.wait()

        print("2. restarting the trainer: it resumes from the newest good checkpoint")
        resumed = run_to_end(launch(args, memory, base / "local"), echo=str(args.steps))

        print("3. the same training without interruption, for reference")
        ref_memory = Path(tempfile.mkdtemp(prefix="mtckpt-demo-ref-", dir=shm))
        try:
            reference = run_to_end(
                launch(args, ref_memory, base / "reference"), echo=str(args.steps)
            )
        finally:
            shutil.rmtree(ref_memory, ignore_errors=True)

        resumed_step = int(next(line for line in resumed if line.startswith("resumed")).split()[3])
        same_final = resumed[-1] == reference[-1]
        after = [line for line in resumed if line.startswith("step ")]
        steps = [line for line in reference if line.startswith("step ")]
        same_losses = after == steps[resumed_step : resumed_step + len(after)]
        print(
            f"4. resumed at step {resumed_step} after the kill at step {kill_at}; "
            f"{len(after)} steps retrained"
        )
        print(f"   final parameters bit-identical to the uninterrupted run: {same_final}")
        print(f"   losses after the resume identical step by step: {same_losses}")
        return 0 if same_final and same_losses and resumed_step >= 1 else 1
    finally:
        shutil.rmtree(memory, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


def main(train=trainer, script: str = __file__, steps: int = 300, doc: str = __doc__) -> int:
    """The demo (or, with the hidden --trainer flag, the trainer ``train``) of ``script``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--dir", help="keep the local tier and reference run here")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-at", type=int, help="step after which to kill (default: random)")
    parser.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--local", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.script = script
    return train(args) if args.trainer else demo(args)


if __name__ == "__main__":
    sys.exit(main())
