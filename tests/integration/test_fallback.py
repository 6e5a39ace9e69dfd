"""A process where the C extension cannot be imported: a warning, and checkpoints still work."""

import os
import subprocess
import sys


def test_without_the_extension_a_process_warns_and_still_checkpoints(tmp_path, shm_dir):
    script = f"""
import sys, warnings
sys.modules["mtckpt._native"] = None  # as if the C extension had not been built
import numpy as np, mtckpt
with mtckpt.CheckpointManager("x", mtckpt.MemoryTier({str(shm_dir)!r}),
                              mtckpt.LocalTier({str(tmp_path)!r})) as mgr:
    mgr.save(1, {{"w": np.arange(100000.0)}}).wait()
    step, state = mgr.restore()
assert step == 1 and np.array_equal(state["w"], np.arange(100000.0))
print(mtckpt.checksum.backend)
"""
    env = {**os.environ, "MTCKPT_NATIVE": "auto"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "python"
    assert "RuntimeWarning" in result.stderr and "slower" in result.stderr
