"""Random faults in every tier, restore after each trial checked against the oracle of
:mod:`faults`: a short run by default, a soak of thousands of trials with ``-m slow``
(``MTCKPT_SOAK_TRIALS``, ``MTCKPT_SOAK_SEED``; the counts are printed for
docs/reliability.md)."""

import json
import os

import pytest
from faults import NAMED_ERROR, RESTORED, run_trials


@pytest.mark.parametrize(
    "backend", ["native", pytest.param("python", marks=pytest.mark.slow)], indirect=True
)  # the numpy twin gives the native bytes (tests/unit); its own fault run is in -m slow
def test_random_faults_never_give_wrong_data(tmp_path, moto, backend):
    counts = run_trials(tmp_path, trials=30, seed=1, moto=moto)
    assert counts[f"outcome: {RESTORED}"] + counts[f"outcome: {NAMED_ERROR}"] == 30
    assert counts[f"outcome: {RESTORED}"] > 0
    assert counts["trials with the object tier"] > 0
    assert any(key.startswith("fault: remote:") for key in counts)


@pytest.mark.slow
@pytest.mark.timeout(7200)  # 2,000 trials take about 40 minutes on 2 cores
def test_soak_random_faults(tmp_path, moto):
    trials = int(os.environ.get("MTCKPT_SOAK_TRIALS", "2000"))
    seed = int(os.environ.get("MTCKPT_SOAK_SEED", "2026"))
    counts = run_trials(tmp_path, trials=trials, seed=seed, moto=moto)
    print("fault soak counts:", json.dumps(dict(sorted(counts.items())), indent=1))
    assert counts[f"outcome: {RESTORED}"] + counts[f"outcome: {NAMED_ERROR}"] == trials
