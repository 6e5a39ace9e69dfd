"""The local tier: a node-disk directory, every file fsynced before it is renamed into place."""

from __future__ import annotations

import os

from .directory import DirectoryStorage


class LocalStorage(DirectoryStorage):
    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root, "local", durable=True, populate=True)
