"""Stage artifacts: a folder of JSON + .npy files, written to `<dir>.partial` and committed by rename.

Each artifact records the resolved config, its hash, and the identity (the config fields that decide
its content). An existing artifact with the same identity is reused; one with another identity is
refused, never overwritten. Arrays are saved with `allow_pickle=False` and read the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from engine.store import StoreError, identity_diff

META = "meta.json"


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")
    os.replace(tmp, path)


def load(path: str | Path, identity: dict) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(meta, arrays) of a committed artifact made under `identity`; None if there is none.

    Raises StoreError, naming the differing field, when the artifact was made under another config.
    """
    path = Path(path)
    if not (path / META).is_file():
        return None
    meta = json.loads((path / META).read_text())
    diff = identity_diff(meta.get("identity", {}), identity)
    if diff:
        raise StoreError(f"{path} was made under a different config ({diff}); use another out_dir or delete it")
    arrays = {p.stem: np.load(p, allow_pickle=False) for p in sorted(path.glob("*.npy"))}
    return meta, arrays


def link_tree(src: str | Path, dst: str | Path) -> None:
    """Copy a folder as hard links where the filesystem allows (no bytes copied), else as plain copies."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def save(path: str | Path, identity: dict, meta: dict, arrays: dict[str, np.ndarray],
         folders: dict[str, str | Path] | None = None) -> Path:
    """Commit an artifact: everything is written under `<path>.partial`, then renamed into place.
    `folders` ({name: existing folder}) are linked (or copied) in as subfolders."""
    path = Path(path)
    if path.exists():
        raise StoreError(f"{path} exists; refusing to overwrite it. Delete it or use another out_dir")
    part = Path(str(path) + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    for name, arr in arrays.items():
        np.save(part / f"{name}.npy", np.asarray(arr), allow_pickle=False)
    for name, src in (folders or {}).items():
        link_tree(src, part / name)
    write_json(part / META, {**meta, "identity": identity})
    os.replace(part, path)
    return path
