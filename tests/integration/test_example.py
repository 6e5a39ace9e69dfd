"""The README's main job: train, SIGKILL, resume, compare with an uninterrupted run."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_resume.py"


def test_example_resumes_bit_exact_after_sigkill(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "60", "--kill-at", "25", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "killed (SIGKILL)" in out
    assert "mtckpt: restored step 2" in out and "from the memory tier" in out
    assert "bit-identical to the uninterrupted run: True" in out
    assert "identical step by step: True" in out
    resumed = int(out.split("resumed at step ")[1].split()[0])
    assert 20 <= resumed < 60  # about where it was killed; never a restart from scratch
    assert sorted(
        p.name for p in (tmp_path / "local" / "mlp").iterdir() if p.name.startswith("step")
    ) == [
        "step-000000000040",
        "step-000000000060",
    ]


def test_jax_example_resumes_bit_exact_on_its_mesh_after_sigkill(tmp_path):
    example = EXAMPLE.with_name("train_resume_jax.py")
    result = subprocess.run(
        [sys.executable, str(example), "--steps", "60", "--kill-at", "20", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "killed (SIGKILL)" in out
    assert "from the memory tier" in out
    assert "bit-identical to the uninterrupted run: True" in out
    assert "identical step by step: True" in out
    resumed = int(out.split("resumed at step ")[1].split()[0])
    assert 15 <= resumed < 60
    steps = sorted(p.name for p in (tmp_path / "local" / "mlp-jax").iterdir())
    assert steps == ["step-000000000040", "step-000000000060"]
