"""Artifact identities, derived from what each config field declares it decides.

Every leaf field of `engine.config.Config` carries, in its dataclass field metadata, the artifacts it
decides (`decides("store")`), or says why it decides none (`decides_nothing(why)`, `runtime(why)`).
`check_declared` refuses a field without a declaration; `engine.config` runs it on import, so a new
field cannot be left out of (or slip into) an identity unnoticed.

Artifacts build on each other: a probe sweep reads the store, a student the probe sweep's labels, the
vLLM baseline the store. A field enters the identity of the artifacts it decides and of every artifact
built on them: `decides("store")` names the store, every probe sweep, baseline and student made from it.

    store     <out>/activations.zarr               checked against the store's recorded identity
    probe     <out>/probes-<hash>/                 store + probe fields
    baseline  <out>/baseline-<hash>/               store + baseline fields (+ the probe's identity in
                                                   letter mode with baseline.formats: the brittleness
                                                   table scores the chosen probe too)
    student   <out>/students/<source>-<hash>/      probe + student fields + the label source

How a field enters (all read from its metadata, never special-cased here):
  key           the identity key; by default 'section.name' ('seed' at the top), or, in a section
                declared `section(nest=True)`, the entry 'name' of one dict under the section's name.
                Fields sharing a key enter as one list, in field order ('data.splits').
  omit_default  fields added after artifacts existed enter only when not at their default, so every
                artifact made before keeps its identity (an empty string counts as a null default).
  unless        ... and enter at their default too when this sibling field is not at its own default.
  value         a function of the whole config giving the value that enters (teacher.dtype 'auto'
                enters as what it picks on this machine, never as 'auto').

The hashes of these identities name existing folders and are checked against existing stores:
tests/test_identity.py freezes them, so a change here that renames an artifact fails there.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Optional

from engine.modes import MODES

META = "probe_kd.identity"
"""The field-metadata key of a leaf field's `Decides`."""
SECTION = "probe_kd.section"
"""The field-metadata key of a section field's `Section`."""

BUILT_ON: dict[str, tuple[str, ...]] = {"store": (), "probe": ("store",), "baseline": ("store",), "student": ("probe",)}
"""Artifact -> the artifacts it is made from (their identities are part of its identity)."""
ARTIFACTS = tuple(BUILT_ON)


def _closure(artifact: str) -> frozenset[str]:
    """`artifact` and every artifact it is built on, transitively."""
    out = {artifact}
    for parent in BUILT_ON[artifact]:
        out |= _closure(parent)
    return frozenset(out)


@dataclass(frozen=True)
class Decides:
    """What one config field decides, and how it enters an identity (see the module docstring)."""

    artifacts: tuple[str, ...]
    why: str = ""
    """Why a field decides nothing (required then)."""
    runtime: bool = False
    """Decides nothing because it says where or how robustly a stage runs (workers, CPUs, retries)."""
    key: Optional[str] = None
    omit_default: bool = False
    unless: Optional[str] = None
    value: Optional[Callable[[Any], Any]] = None


@dataclass(frozen=True)
class Section:
    """How a section's fields enter: one key each ('data.source'), or one dict under its name (`nest`)."""

    nest: bool = False


def decides(*artifacts: str, key: Optional[str] = None, omit_default: bool = False, unless: Optional[str] = None,
            value: Optional[Callable[[Any], Any]] = None) -> dict:
    """Field metadata: the field decides `artifacts` (the lowest ones; those built on them follow)."""
    return {META: Decides(tuple(artifacts), key=key, omit_default=omit_default or unless is not None,
                          unless=unless, value=value)}


def decides_nothing(why: str) -> dict:
    """Field metadata: the field enters no identity, because `why`."""
    return {META: Decides((), why=why)}


def runtime(why: str) -> dict:
    """Field metadata: a resource or robustness setting (where and how a stage runs, not what it makes)."""
    return {META: Decides((), why=why, runtime=True)}


def section(*, nest: bool = False) -> dict:
    """Field metadata of a section (a field whose type is a config dataclass)."""
    return {SECTION: Section(nest)}


def _is_section(f: dataclasses.Field, hints: dict) -> bool:
    return dataclasses.is_dataclass(hints[f.name])


def check_declared(cls: type, prefix: str = "") -> None:
    """Raise TypeError naming every field of `cls` (and of its sections) that declares nothing, or
    declares something malformed. A new field must say what it decides before the config imports."""
    problems = _problems(cls, prefix)
    if problems:
        raise TypeError("config fields must declare the artifacts they decide (engine/identity.py):\n  "
                        + "\n  ".join(problems))


def _problems(cls: type, prefix: str) -> list[str]:
    hints, out = typing.get_type_hints(cls), []
    names = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if _is_section(f, hints):
            if not isinstance(f.metadata.get(SECTION), Section):
                out.append(f"{name}: a section; give it field(..., metadata=section()) or section(nest=True)")
            out += _problems(hints[f.name], name + ".")
            continue
        d = f.metadata.get(META)
        if not isinstance(d, Decides):
            out.append(f"{name}: declares nothing; give it field(default=..., metadata=decides('store'|'probe'|"
                       f"'baseline'|'student')) or metadata=decides_nothing('why') / runtime('why')")
            continue
        bad = [a for a in d.artifacts if a not in BUILT_ON]
        if bad:
            out.append(f"{name}: decides unknown artifacts {bad}; use some of {ARTIFACTS}")
        if not d.artifacts and not d.why.strip():
            out.append(f"{name}: decides nothing; say why (decides_nothing('...'))")
        if d.artifacts and d.why:
            out.append(f"{name}: decides {d.artifacts} yet says why it decides nothing")
        if d.unless is not None and (d.unless not in names or d.unless == f.name):
            out.append(f"{name}: unless={d.unless!r} is not another field of its section")
        if d.omit_default and f.default is dataclasses.MISSING:
            out.append(f"{name}: omit_default needs a plain default")
    return out


@cache
def _fields(cls: type, prefix: str = "", nest: Optional[str] = None) -> tuple:
    """(dotted name, Field, Decides, the dict it nests in or None) of every leaf field of `cls`."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if _is_section(f, hints):
            sec = f.metadata[SECTION]
            out += _fields(hints[f.name], f"{prefix}{f.name}.", f"{prefix}{f.name}" if sec.nest else None)
        else:
            out.append((f"{prefix}{f.name}", f, f.metadata[META], nest))
    return tuple(out)


def _enters(d: Decides, artifact: str) -> bool:
    return any(a in _closure(artifact) for a in d.artifacts)


def identity_fields(cls: type, artifact: str) -> tuple[str, ...]:
    """The dotted names of the fields of `cls` (a config dataclass; `Config` for all) that enter
    `artifact`'s identity (some only when not at their default)."""
    _known(artifact)
    return tuple(name for name, _, d, _ in _fields(cls) if _enters(d, artifact))


def deciding_fields(cls: type, artifact: str) -> tuple[str, ...]:
    """The names of the fields of the section `cls` (e.g. `StudentConfig`) that decide `artifact`, i.e.
    enter its identity. `deciding_fields(StudentConfig, 'student')`: what decides what a student learns."""
    return tuple(f.name for f in dataclasses.fields(cls)
                 if isinstance(f.metadata.get(META), Decides) and _enters(f.metadata[META], artifact))


def runtime_fields(cls: type) -> tuple[str, ...]:
    """The names of the fields of the section `cls` declared `runtime(...)`."""
    return tuple(f.name for f in dataclasses.fields(cls)
                 if isinstance(f.metadata.get(META), Decides) and f.metadata[META].runtime)


def _known(artifact: str) -> None:
    if artifact not in BUILT_ON:
        raise ValueError(f"{artifact!r} is not an artifact; use one of {ARTIFACTS}")


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _at_default(owner: Any, name: str) -> bool:
    f = next(g for g in dataclasses.fields(owner) if g.name == name)
    value = getattr(owner, name)
    return value == f.default or (f.default is None and value == "")


def fields_identity(cfg: Any, artifact: str) -> dict:
    """The generic builder: every field that decides `artifact` (directly or through an artifact it is
    built on), entered as its metadata says. No rule about any particular field lives here."""
    _known(artifact)
    fields = _fields(type(cfg))
    shared = Counter(d.key for _, _, d, _ in fields if d.key is not None)
    ident: dict = {}
    for name, f, d, nest in fields:
        if not _enters(d, artifact):
            continue
        owner = cfg
        for part in name.split(".")[:-1]:
            owner = getattr(owner, part)
        if d.omit_default and _at_default(owner, f.name) and (d.unless is None or _at_default(owner, d.unless)):
            continue
        value = _json(d.value(cfg) if d.value else getattr(owner, f.name))
        if d.key is not None and shared[d.key] > 1:
            ident.setdefault(d.key, []).append(value)
        elif d.key is not None:
            ident[d.key] = value
        elif nest is not None:
            ident.setdefault(nest, {})[f.name] = value
        else:
            ident[name] = value
    return ident


def scores_probe(cfg: Any) -> bool:
    """The baseline's brittleness table scores the chosen probe too (a mode with letter labels, and answer
    formats to ask): the baseline then holds the probe sweep's identity under 'probe'."""
    return MODES[cfg.prompt.mode].has_letter_labels and bool(cfg.baseline.formats)


def identity(cfg: Any, artifact: str, source: Optional[str] = None) -> dict:
    """The identity of one artifact of `cfg`: 'store', 'probe', 'baseline', or 'student' (give the label
    `source` it learns from). Its `config_hash` names the artifact's folder; a store checks it on open."""
    ident = fields_identity(cfg, artifact)
    if artifact == "baseline" and scores_probe(cfg):
        ident["probe"] = identity(cfg, "probe")
    if artifact == "student":
        if source is None:
            raise ValueError("a student's identity needs its label source")
        ident["source"] = source
    elif source is not None:
        raise ValueError(f"only a student has a label source, not a {artifact}")
    return ident
