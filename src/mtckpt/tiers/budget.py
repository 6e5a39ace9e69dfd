"""What a node's memory tier holds, by kind, and its budget.

The memory tier is a tmpfs directory: its files are the node's memory. The budget caps
them all: the steps the trainers saved (with the daemon's kept sync steps, hard links to
the same pages), the trainers' spare slots, the replicas the daemon keeps for peers, the
parities of its coded group, its spare replica and parity files, and the data files of
expired steps that a sender still holds (in ``.held`` until it lets go). When a save would
exceed it, the memory tier gives way in this order: spare slots and files are dropped,
the daemon refuses peers' new replicas and parity pieces (keeping room for its node's next
step), and last the save is skipped with a logged reason and a metric; training never
fails for it.
"""

from __future__ import annotations

import os
from pathlib import Path

KINDS = ("steps", "slots", "replicas", "spares", "parity", "held", "other")
HELD_DIR = ".held"  # expired data files a reader still holds (tiers/memory.py)
_TOP = {".replicas": "replicas", ".replicas-free": "spares", ".parity": "parity",
        ".parity-free": "spares", ".kept": "steps", HELD_DIR: "held"}  # fmt: skip
_LAST = {".kept": 1, HELD_DIR: 2}  # second names of files counted under their first


def usage(root: str | os.PathLike) -> dict[str, int]:
    """Bytes of memory the files under ``root`` take, by kind (a file with several links
    once; bytes allocated, not the files' lengths)."""
    totals = dict.fromkeys(KINDS, 0)
    seen: set[int] = set()
    root = Path(root)
    try:
        tops = sorted(os.scandir(root), key=lambda e: _LAST.get(e.name, 0))
    except FileNotFoundError:
        return totals
    for top in tops:
        if top.is_file(follow_symlinks=False):
            _add(totals, seen, top, "other")
        elif top.is_dir(follow_symlinks=False):
            kind = _TOP.get(top.name)
            if kind is not None:
                _walk(Path(top.path), totals, seen, kind)
                continue
            for entry in entries(Path(top.path)):  # a run: its steps and its slots
                kind = "slots" if entry.name == ".slots" else "steps"
                if entry.is_dir(follow_symlinks=False):
                    _walk(Path(entry.path), totals, seen, kind)
                else:
                    _add(totals, seen, entry, "other")
    return totals


def total(held: dict[str, int]) -> int:
    return sum(held.values())


def describe(held: dict[str, int]) -> str:
    """``own steps 1.0 GiB, spare slots 0 B, ...``: the kinds that hold anything."""
    names = {"steps": "steps", "slots": "spare slots", "replicas": "replicas for peers",
             "spares": "spare replica and parity files", "parity": "parity for the group",
             "held": "expired steps still being sent", "other": "other files"}  # fmt: skip
    parts = [f"{names[k]} {human_size(v)}" for k, v in held.items() if v]
    return ", ".join(parts) or "nothing"


def human_size(n: float) -> str:
    """``1.5 MiB``: bytes as the messages, logs and the CLI show them."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def entries(directory: Path) -> list[os.DirEntry]:
    """What ``directory`` holds; nothing where it is missing."""
    try:
        return list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _walk(directory: Path, totals: dict[str, int], seen: set[int], kind: str) -> None:
    for entry in entries(directory):
        if entry.is_dir(follow_symlinks=False):
            _walk(Path(entry.path), totals, seen, kind)
        else:
            _add(totals, seen, entry, kind)


def _add(totals: dict[str, int], seen: set[int], entry: os.DirEntry, kind: str) -> None:
    try:
        stat = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.st_ino in seen:
        return
    seen.add(stat.st_ino)
    totals[kind] += stat.st_blocks * 512
