"""A trainer inside the mtckpt image, for tests/integration/test_container_image.py; it runs
with the image's Python and mtckpt, configured as the manifests configure the trainer
(MTCKPT_CONFIG: the ConfigMap's mtckpt.toml; RANK / WORLD_SIZE; one rank per node).

    container_trainer.py save STEP...     save this rank's state of each step
    container_trainer.py replicated STEP  exit 0 once this node's shards of STEP are on peers
    container_trainer.py restore          restore the newest step; print it, the tier and
                                          whether every array is bit-exact, as JSON
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np

import mtckpt
from mtckpt import config
from mtckpt.daemon.config import load_daemon
from mtckpt.daemon.rpc import Client


def state(step: int, rank: int) -> dict:
    rng = np.random.default_rng(step * 100 + rank)
    return {
        "w": rng.standard_normal((512, 1024), dtype=np.float32),  # 2 MiB
        "b": rng.integers(-1000, 1000, 4097, dtype=np.int64),
        "step": step,
    }


def replicated(step: int, run: str) -> bool:
    daemon = load_daemon()
    with open(daemon["token_file"]) as file:
        token = file.read().strip()
    with Client(f"unix://{daemon['socket']}", token=token) as client:
        replication = client.status().replication
    states = [r for r in replication if (r.shard.run, r.shard.step) == (run, step)]
    return bool(states) and all(set(r.targets) <= set(r.stored) and not r.error for r in states)


class Tiers(logging.Handler):
    """The tier each restore says it read from."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("restored step"):
            self.seen.append(message.split(" from the ")[1].split()[0])


def main() -> int:
    mode, args = sys.argv[1], [int(a) for a in sys.argv[2:]]
    if mode == "replicated":
        return 0 if replicated(args[0], config.load()["run"]) else 1
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")  # one rank per node (container)
    rank = int(os.environ["RANK"])
    if mode == "save":
        with mtckpt.CheckpointManager.from_config() as mgr:
            for step in args:
                mgr.save(step, state(step, rank)).wait()
        return 0
    tiers = Tiers()
    logging.getLogger("mtckpt").addHandler(tiers)
    logging.getLogger("mtckpt").setLevel(logging.INFO)
    with mtckpt.CheckpointManager.from_config() as mgr:
        step, restored = mgr.restore()
    expected = state(step, rank)
    exact = all(np.array_equal(np.asarray(restored[k]), v) for k, v in expected.items())
    print(json.dumps({"step": step, "tier": tiers.seen[-1] if tiers.seen else None,
                      "bit_exact": exact and restored.keys() == expected.keys()}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
