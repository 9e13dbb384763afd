"""Stage artifacts: a folder of JSON + .npy files, written to `<dir>.partial` and committed by rename.

Each artifact records the resolved config, its hash, and the identity (the config fields that decide
its content). An existing artifact with the same identity is reused; one with another identity is
refused, never overwritten. Arrays are saved with `allow_pickle=False` and read the same way.

meta.json also records the sha256 of every file of the artifact and of its identity; `load` checks
them, so a file changed on disk or an identity edited by hand is one clear StoreError, not a wrong
result. Each writer builds under a name of its own (`<dir>.partial-<pid>-<random>`) and renames it into
place, so even two writers without the run lock cannot mix their files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from engine.store import StoreError, identity_diff, identity_hash

META = "meta.json"


_DIGESTS: dict[tuple[int, int, int, int], str] = {}  # (device, inode, size, mtime_ns) -> sha256, per process


def _sha256(path: Path) -> str:
    """sha256 of a file, remembered by inode: a backbone hard-linked into many student folders is read once."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def file_digests(folder: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` but meta.json."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): _sha256(f)
            for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != META)}


def check(path: str | Path, meta: dict) -> str | None:
    """What is wrong with a committed artifact (a file changed, missing or added; its identity edited),
    or None. Artifacts from before checksums were recorded pass on their identity alone."""
    recorded = meta.get("identity_hash")
    if recorded is not None and identity_hash(meta.get("identity", {})) != recorded:
        return "its identity in meta.json was edited (the hash no longer matches)"
    want = meta.get("files")
    if want is None:
        return None
    have = file_digests(path)
    for name in sorted(set(want) | set(have)):
        if name not in have:
            return f"file {name} is missing"
        if name not in want:
            return f"file {name} was added after it was written"
        if have[name] != want[name]:
            return f"file {name} changed on disk (sha256 differs from the one recorded)"
    return None


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
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"{path / META}: not valid JSON ({err}); delete {path} to rebuild it") from err
    problem = check(path, meta)
    if problem:
        raise StoreError(f"{path}: {problem}; the artifact is damaged: run `distill verify`, then delete it to rebuild it")
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
    """Commit an artifact: everything is written under a partial name of its own, then renamed into place.
    `folders` ({name: existing folder}) are linked (or copied) in as subfolders."""
    path = Path(path)
    if path.exists():
        raise StoreError(f"{path} exists; refusing to overwrite it. Delete it or use another out_dir")
    part = Path(f"{path}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # no other writer uses this name
    try:
        part.mkdir(parents=True)
        for name, arr in arrays.items():
            np.save(part / f"{name}.npy", np.asarray(arr), allow_pickle=False)
        for name, src in (folders or {}).items():
            link_tree(src, part / name)
        write_json(part / META, {**meta, "identity": identity, "identity_hash": identity_hash(identity),
                                 "files": file_digests(part)})
        os.replace(part, path)
    except OSError as err:
        shutil.rmtree(part, ignore_errors=True)
        if path.exists():
            raise StoreError(f"{path} was committed by another writer meanwhile; one writer per out_dir") from err
        raise
    return path


def verify(path: str | Path) -> tuple[bool, str]:
    """(ok, one-line verdict) for a committed artifact folder."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        return False, f"meta.json unreadable ({err})"
    problem = check(path, meta)
    if problem:
        return False, problem
    n = len(meta.get("files", {}))
    return True, (f"{n} files, every sha256 matches" if "files" in meta else "no checksums recorded (older artifact)")
