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


def test_a_wheel_builds_without_a_c_compiler_and_ships_py_typed(tmp_path):
    """The extension is optional: with no working compiler the wheel is built without it
    (setuptools says so) and still holds the package and its type marker."""
    import shutil
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    tree = tmp_path / "tree"
    shutil.copytree(root / "native", tree / "native")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, tree / name)
    shutil.copytree(root / "src", tree / "src",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))  # fmt: skip
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"}
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(tree)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("mtckpt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mtckpt/py.typed" in names and "mtckpt/_fallback.py" in names
    assert not [n for n in names if n.startswith("mtckpt/_native") and n.endswith(".so")]
