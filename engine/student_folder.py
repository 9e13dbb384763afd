"""A trained student as a model folder: written by `save_student`, read back by `load_student`.

    config.json, model.safetensors   the backbone as a plain transformers model (`AutoModel`, or
                                     `AutoModelForCausalLM` when the student scores with its LM head)
    tokenizer files                  the student's own tokenizer
    head.safetensors                 the trained head (a `fresh` scoring head: 'head')
    student.json                     how it reads and scores questions, and where it came from

`predict_examples` scores new questions with a loaded student. Weights are read from safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.heads import scoring_head
from engine.models import ModelError
from engine.modes import prompt_mode
from engine.student import (
    InputSpec,
    StudentModel,
    encode_examples,
    load_backbone,
    load_config,
    load_tokenizer,
    predict,
    unwrap,
)
from engine.tasks import Example

STUDENT_FILE = "student.json"
HEAD_FILE = "head.safetensors"
FORMAT = 1


class StudentError(ValueError):
    """A student folder, its tokenizer or its input rows are wrong; the message names what and the fix."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary: a folder's tokenizer must be the one it trained with."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def save_student(out: str | Path, model: StudentModel, tokenizer, spec: InputSpec, meta: dict, *,
                 backbone_dir: str | Path | None = None) -> Path:
    """Write a loadable student folder, atomically (a temporary folder renamed into place).

    The backbone is a plain HF model folder (`save_pretrained`, safetensors); `backbone_dir`, a folder
    that already holds this exact backbone (a frozen one, shared by many heads), is hard-linked instead.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise StudentError(f"{out} exists; refusing to overwrite a student folder")
    model = unwrap(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        if backbone_dir is not None:
            shutil.rmtree(tmp)
            from engine.artifacts import link_tree  # here, not at import: loading a student needs no zarr

            link_tree(backbone_dir, tmp)
        else:
            model.backbone.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model.head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(tmp / HEAD_FILE))
        info = {
            "format": FORMAT, "input": spec.to_dict(), "mode": model.mode, "pooling": model.pooling,
            "scoring": model.scoring, "max_choices": model.max_choices,
            "letter_ids": [int(x) for x in getattr(model, "letter_ids", torch.zeros(0)).tolist()],
            "tokenizer": tokenizer_fingerprint(tokenizer), **meta,
        }
        (tmp / STUDENT_FILE).write_text(json.dumps(info, indent=2, default=float) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_student_info(path: str | Path) -> dict:
    """`student.json` of a student folder, after checking the folder holds what loading needs."""
    path = Path(path)
    if not path.is_dir():
        raise StudentError(f"{path}: no such student folder; pass the folder a run wrote under <out_dir>/students/")
    if not (path / STUDENT_FILE).is_file():
        raise StudentError(f"{path}: not a student folder (no {STUDENT_FILE}); pass a folder written by `distill train`")
    info = json.loads((path / STUDENT_FILE).read_text())
    if info.get("format") != FORMAT:
        raise StudentError(f"{path / STUDENT_FILE}: format {info.get('format')!r}, this engine reads {FORMAT}")
    fresh = scoring_head(info["scoring"]).fresh  # a fresh head is saved apart
    if not list(path.glob("*.safetensors")) or (fresh and not [
            p for p in path.glob("*.safetensors") if p.name != HEAD_FILE]):
        raise StudentError(f"{path}: the student's weights are missing (no model*.safetensors); copy the whole folder")
    if fresh and not (path / HEAD_FILE).is_file():
        raise StudentError(f"{path}: the student's head is missing ({HEAD_FILE}); copy the whole folder")
    return info


def load_student(path: str | Path, *, trust_remote_code: bool = False) -> tuple[StudentModel, Any, dict]:
    """(model in eval mode, its tokenizer, its student.json) from a folder `save_student` wrote."""
    from safetensors.torch import load_file

    path = Path(path)
    info = read_student_info(path)
    try:
        config = load_config(str(path), trust_remote_code=trust_remote_code, field_name=str(path))
        tokenizer = load_tokenizer(str(path), config, trust_remote_code=trust_remote_code, field_name=str(path))
        backbone = load_backbone(str(path), scoring=info["scoring"], config=config, trust_remote_code=trust_remote_code)
    except ModelError as err:
        raise StudentError(str(err)) from err
    if tokenizer_fingerprint(tokenizer) != info["tokenizer"]:
        raise StudentError(f"{path}: its tokenizer is not the one the student was trained with (vocabulary hash "
                           f"{tokenizer_fingerprint(tokenizer)}, student.json says {info['tokenizer']}); restore the "
                           "folder's own tokenizer files")
    model = StudentModel(backbone, mode=info["mode"], max_choices=info["max_choices"], pooling=info["pooling"],
                         scoring=info["scoring"], letter_ids=np.asarray(info.get("letter_ids") or [], np.int64))
    if model.head is not None:
        model.head.load_state_dict(load_file(str(path / HEAD_FILE)))
    return model.eval(), tokenizer, info


def predict_examples(model: StudentModel, tokenizer, info: dict, examples: Sequence[Example], *, batch_size: int = 16,
                     device: torch.device | str = "cpu", dtype: str | None = None) -> np.ndarray:
    """(Q, max choices) probabilities a loaded student gives each question's choices. `dtype`: its compute
    dtype, by default the one it was trained and tested in (student.json `dtype`), so `predict`
    reproduces its reported test accuracy."""
    spec = InputSpec(**info["input"])
    if prompt_mode(spec.mode).has_letter_labels:
        too_many = [ex.id for ex in examples if len(ex.choices) > model.max_choices]
        if too_many:
            raise StudentError(f"question {too_many[0]!r} has more choices than the student's letter head "
                               f"({model.max_choices}); such questions need a per-choice student")
    seqs = encode_examples(examples, tokenizer, spec)
    dtype = dtype or info.get("dtype") or "float32"
    return predict(model.to(device), seqs, batch_size=batch_size, pad_id=tokenizer.pad_token_id, device=device,
                   dtype=dtype)
