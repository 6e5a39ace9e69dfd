"""Shared fixtures: tier directories on real tmpfs and disk, and both fast-path backends."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from mtckpt import _fastpath


@pytest.fixture
def shm_dir():
    """A fresh directory on tmpfs (/dev/shm), removed afterwards."""
    root = Path("/dev/shm")
    path = root / f"mtckpt-test-{uuid.uuid4().hex[:10]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["native", "python"])
def backend(request):
    """Run the test with the native extension, then with the pure-Python fallback."""
    previous = _fastpath.backend_name()
    _fastpath.select(request.param)
    yield request.param
    _fastpath.select(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """Tests run as one process of a world of one unless they start ranks themselves
    (tests/multiprocess set RANK / WORLD_SIZE in the processes they start)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
