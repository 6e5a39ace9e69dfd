"""The cluster tests drive tools/cluster (importable from the repository root) and need
root, iproute2, torch and grpc: each test is skipped, saying why, where one is missing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.cluster.network import can_make_namespaces  # noqa: E402


def _why_not() -> str | None:
    for module in ("torch", "grpc"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    why = can_make_namespaces()
    return None if why is None else f"network namespaces: {why}"


WHY_NOT = _why_not()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if WHY_NOT is not None:
        pytest.skip(WHY_NOT)
