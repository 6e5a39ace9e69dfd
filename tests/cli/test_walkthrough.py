"""The operator's restore-after-node-loss walk-through (docs/operations.md), run exactly
as written: three daemons (real processes), trainers on each save, one node is lost
(daemon SIGKILLed, roots deleted) and replaced; the page's commands run in bash on the
replacement; the trainer's restore is then bit-exact from node memory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from daemons import knows, replicated, restore, save, state, wait_for
from states import assert_same_state

PAGE = Path(__file__).parents[2] / "docs" / "operations.md"
NODES = ["node-a", "node-b", "node-c"]


def walkthrough() -> str:
    text = PAGE.read_text()
    match = re.search(r"<!-- operator-walkthrough.*?-->\n```bash\n(.*?)```", text, re.S)
    assert match, f"{PAGE} has no operator walk-through block"
    return match.group(1)


def test_the_documented_walkthrough_restores_a_lost_node_from_its_peers(cluster, tmp_path):
    daemons = cluster(NODES)
    for rank, node in enumerate(NODES):
        save(daemons[node], rank, len(NODES), [1, 2])
    for node in NODES:
        wait_for(lambda n=node: replicated(daemons[n], "exp", 1, 2), what=f"{node} replicated")
    lost = daemons["node-b"]
    lost.lose_node()
    cluster.restart(lost)  # the replacement: same node id, empty roots

    others = {d.address for d in daemons.values()} - {lost.address}
    wait_for(lambda: knows(lost, others), what="the replacement's first look at its peers")

    config = tmp_path / "mtckpt.toml"
    config.write_text(f'[daemon]\nsocket = "{lost.socket}"\nmemory_root = "{lost.memory_root}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTCKPT_")}
    env["MTCKPT_CONFIG"] = str(config)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the `mtckpt` script
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "peer node-a" in out and "replica of node-b" in out, out + done.stderr  # ls
    assert "run exp step 2: ranks [1] ready in node memory" in out  # restore
    assert "memory   exp step 2: ok" in out  # verify

    step, restored = restore(lost, 1, len(NODES))
    assert step == 2
    assert_same_state(restored, state(2, 1))
