"""`distill verify OUT_DIR`: check every store and artifact under a run directory, one verdict each.

Stores (`*.zarr`, and `*.zarr.partial` still being built) are checked for layout, identity, completeness
and every chunk's checksum; artifacts (folders with a `meta.json`) for every file's sha256 and their
identity. `kept` summarises the same scan in one line: what an interrupted run leaves to resume from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine import artifacts, store


@dataclass
class Verdict:
    path: Path
    kind: str  # "store" | "partial store" | "artifact"
    ok: bool
    detail: str


def scan(out_dir: str | Path) -> list[tuple[Path, str]]:
    """(path, kind) of every store and artifact under `out_dir`, outermost first; nothing inside a
    store or an artifact is listed again, and `.partial-*`/`.init-*` leftovers of a dead writer are skipped."""
    found: list[tuple[Path, str]] = []

    def walk(d: Path) -> None:
        for p in sorted(d.iterdir()):
            if not p.is_dir() or ".partial-" in p.name or ".init-" in p.name:
                continue
            if p.name.endswith(".zarr"):
                found.append((p, "store"))
            elif p.name.endswith(".zarr.partial"):
                found.append((p, "partial store"))
            elif (p / artifacts.META).is_file():
                found.append((p, "artifact"))
            else:
                walk(p)

    root = Path(out_dir)
    if root.is_dir():
        walk(root)
    return found


def verify(out_dir: str | Path) -> list[Verdict]:
    out = []
    for path, kind in scan(out_dir):
        if kind == "artifact":
            ok, detail = artifacts.verify(path)
        else:
            ok, detail = store.verify_store(path)
        out.append(Verdict(path, kind, ok, detail))
    return out


def kept(out_dir: str | Path) -> str:
    """One line: what is on disk under `out_dir` for a rerun to reuse (no checksum is read)."""
    parts = []
    for path, kind in scan(out_dir):
        if kind == "partial store":
            try:
                root = store.open_store(path, allow_incomplete=True)
                masks = [g["done"][:] for _, g in root.groups()]
                parts.append(f"{path} ({sum(int(m.sum()) for m in masks)}/{sum(len(m) for m in masks)} chunks done)")
            except Exception:  # noqa: BLE001 - a summary must never fail
                parts.append(f"{path} (unreadable)")
        elif kind == "store":
            parts.append(f"{path} (complete)")
    n_art = sum(kind == "artifact" for _, kind in scan(out_dir))
    if n_art:
        parts.append(f"{n_art} committed artifact{'s' * (n_art != 1)}")
    return "; ".join(parts) if parts else "nothing yet"
