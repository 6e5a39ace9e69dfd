"""The README's main jobs: train, SIGKILL, resume, compare with an uninterrupted run."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, directory: Path, steps: int, kill_at: int) -> str:
    """Run an example's demo; its output, once checked that the resumed run is bit-exact."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--steps", str(steps), "--kill-at", str(kill_at),
         "--dir", str(directory)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "killed (SIGKILL)" in out
    assert "from the memory tier" in out
    assert "bit-identical to the uninterrupted run: True" in out
    assert "identical step by step: True" in out
    resumed = int(out.split("resumed at step ")[1].split()[0])
    assert kill_at - 5 <= resumed < steps  # about where it was killed; never from scratch
    return out


def local_steps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("step"))


def test_example_resumes_bit_exact_after_sigkill(tmp_path):
    out = run_example("train_resume.py", tmp_path, steps=60, kill_at=25)
    assert "mtckpt: restored step 2" in out
    assert local_steps(tmp_path / "local" / "mlp") == ["step-000000000040", "step-000000000060"]


def test_jax_example_resumes_bit_exact_on_its_mesh_after_sigkill(tmp_path):
    run_example("train_resume_jax.py", tmp_path, steps=60, kill_at=20)
    assert local_steps(tmp_path / "local" / "mlp-jax") == [
        "step-000000000040",
        "step-000000000060",
    ]
