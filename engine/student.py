"""The student: a pretrained backbone cut to its first N blocks plus a fresh linear head.

DistilBERT-style: with `student.model == 'teacher'` the student is the teacher's first `num_layers`
blocks (the remaining blocks' weights are dropped at load time), else any local HF folder or hub id.
The head reads the final hidden state (after the backbone's final norm) at each row's last real token:

* per-choice mode: `Linear(hidden, 1)` gives one score per row (= per choice); the scores of a
  question's rows are gathered into a `(B, C)` logit matrix, `-inf` where a question has no choice;
* letter mode: `Linear(hidden, max_choices)` on the question's single row, `-inf` beyond its choices.

Batches hold whole questions (all rows of a question together), right-padded with the tokenizer's pad
id; rows longer than `max_length` lose tokens from the left (the end holds the choice text).

Labels are a target matrix `(Q, C_max)` of probabilities per question (zeros beyond its choices).
`student_loss` mixes a soft (KL at temperature T, times T^2) or hard (CE on argmax) term on those
targets with CE on gold. Pure torch + transformers: no ray here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from engine.config import StudentConfig
from engine.sequences import Sequences

# ---------------------------------------------------------------------------------------------
# Model


def resolve_student_path(student: StudentConfig, teacher_dir: str) -> str:
    """The folder (or hub id) the student backbone loads from: the teacher's for `model == 'teacher'`."""
    return str(teacher_dir) if student.model == "teacher" else student.model


def load_backbone(path: str, num_layers: Optional[int] = None) -> nn.Module:
    """`AutoModel` (no LM head) in float32, keeping only the first `num_layers` blocks.

    Raises if `num_layers` exceeds the model's depth, or if any kept weight was not in the checkpoint
    (which would mean it was randomly initialised rather than pretrained).
    """
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    depth = getattr(config, "num_hidden_layers", None)
    if num_layers is not None:
        if depth is None:
            raise ValueError(f"student.num_layers: {path} has no num_hidden_layers; set num_layers to null")
        if num_layers > depth:
            raise ValueError(
                f"student.num_layers: {num_layers} > the {depth} blocks of {path}; use at most {depth} or null"
            )
        config.num_hidden_layers = num_layers
        # Some configs carry one entry per layer (e.g. `layer_types`); keep them consistent.
        for key in ("layer_types",):
            value = getattr(config, key, None)
            if isinstance(value, (list, tuple)) and len(value) == depth:
                setattr(config, key, type(value)(value[:num_layers]))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the dropped blocks are reported as "unexpected"
    try:
        model, info = AutoModel.from_pretrained(
            path,
            config=config,
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"student.model: {path} lacks pretrained weights for {missing[:5]} "
            f"({len(missing)} in all); the student would start from random weights there"
        )
    return model


class StudentModel(nn.Module):
    """Backbone + fresh linear head; `forward` returns `(B, C)` logits with `-inf` for absent choices."""

    def __init__(self, backbone: nn.Module, *, mode: str, max_choices: int):
        super().__init__()
        if mode not in ("letter", "per_choice"):
            raise ValueError(f"prompt.mode: must be 'letter' or 'per_choice', got {mode!r}")
        if max_choices < 1:
            raise ValueError("max_choices must be >= 1")
        self.backbone = backbone
        self.mode = mode
        self.max_choices = int(max_choices)
        hidden = int(backbone.config.hidden_size)
        self.head = nn.Linear(hidden, 1 if mode == "per_choice" else self.max_choices)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(
        cls, path: str, *, mode: str, max_choices: int, num_layers: Optional[int] = None
    ) -> StudentModel:
        return cls(load_backbone(str(path), num_layers), mode=mode, max_choices=max_choices)

    @classmethod
    def from_config(cls, student: StudentConfig, teacher_dir: str, *, mode: str, max_choices: int) -> StudentModel:
        path = resolve_student_path(student, teacher_dir)
        return cls.from_pretrained(path, mode=mode, max_choices=max_choices, num_layers=student.num_layers)

    @property
    def num_layers(self) -> int:
        return int(self.backbone.config.num_hidden_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        last_index: torch.Tensor,
        row_question: torch.Tensor,
        row_choice: torch.Tensor,
        n_choices: torch.Tensor,
    ) -> torch.Tensor:
        """Rows `(R, L)` of `B = len(n_choices)` questions -> logits `(B, n_choices.max())`."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state  # after the final norm
        state = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
        B = n_choices.shape[0]
        C = int(n_choices.max())
        present = torch.arange(C, device=state.device)[None, :] < n_choices[:, None]
        if self.mode == "per_choice":
            scores = self.head(state).squeeze(-1)
            flat = torch.full((B * C,), float("-inf"), dtype=scores.dtype, device=scores.device)
            flat = flat.index_put((row_question * C + row_choice,), scores)
            logits = flat.view(B, C)
        else:
            if C > self.max_choices:
                raise ValueError(f"a question has {C} choices but the letter head has {self.max_choices}")
            if state.shape[0] != B:
                raise ValueError(f"letter mode expects one row per question, got {state.shape[0]} rows for {B}")
            scores = self.head(state)[:, :C]
            logits = scores.new_zeros(B, C).index_copy(0, row_question, scores)
        return logits.masked_fill(~present, float("-inf"))


def unwrap(model: nn.Module) -> nn.Module:
    """The StudentModel inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    input_ids: torch.Tensor
    """(R, L) right-padded token ids of the rows of the batch's questions."""
    attention_mask: torch.Tensor
    """(R, L) 1 on real tokens."""
    last_index: torch.Tensor
    """(R,) position of each row's last real token."""
    row_question: torch.Tensor
    """(R,) question of each row, 0..B-1 within the batch."""
    row_choice: torch.Tensor
    """(R,) choice of each row (0 in letter mode)."""
    n_choices: torch.Tensor
    """(B,) choices per question."""
    targets: torch.Tensor
    """(B, C) target probabilities, C = n_choices.max()."""
    gold: torch.Tensor
    """(B,) gold answer index."""
    questions: np.ndarray
    """(B,) the questions' indices in the Sequences."""

    @property
    def size(self) -> int:
        return len(self.questions)

    def to(self, device) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)

    def model_inputs(self) -> dict:
        return dict(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            last_index=self.last_index,
            row_question=self.row_question,
            row_choice=self.row_choice,
            n_choices=self.n_choices,
        )


def question_rows(seqs: Sequences) -> list[np.ndarray]:
    """Row indices of each question, in choice order."""
    order = np.lexsort((seqs.row_choice, seqs.row_question))
    bounds = np.searchsorted(seqs.row_question[order], np.arange(seqs.n_questions + 1))
    return [order[bounds[q] : bounds[q + 1]] for q in range(seqs.n_questions)]


def collate(
    seqs: Sequences,
    questions: Sequence[int],
    *,
    rows_of: list[np.ndarray],
    targets: Optional[np.ndarray],
    pad_id: int,
    max_length: int,
) -> Batch:
    """One batch of whole questions; rows cut to their last `max_length` tokens and right-padded."""
    questions = np.asarray(questions, dtype=np.int64)
    rows = np.concatenate([rows_of[q] for q in questions])
    local_q = np.concatenate([np.full(len(rows_of[q]), i, dtype=np.int64) for i, q in enumerate(questions)])
    toks = [seqs.ids[r][-max_length:] for r in rows]
    lengths = np.asarray([len(t) for t in toks], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError("a row has no tokens")
    L = int(lengths.max())
    ids = np.full((len(rows), L), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), L), dtype=np.int64)
    for i, t in enumerate(toks):
        ids[i, : len(t)] = t
        mask[i, : len(t)] = 1
    n_choices = seqs.n_choices[questions].astype(np.int64)
    C = int(n_choices.max())
    if targets is None:
        tgt = np.zeros((len(questions), C), dtype=np.float32)
    else:
        tgt = np.zeros((len(questions), C), dtype=np.float32)
        width = min(C, targets.shape[1])
        tgt[:, :width] = targets[questions, :width]
        tgt[np.arange(C)[None, :] >= n_choices[:, None]] = 0.0
    return Batch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        last_index=torch.from_numpy(lengths - 1),
        row_question=torch.from_numpy(local_q),
        row_choice=torch.from_numpy(seqs.row_choice[rows].astype(np.int64)),
        n_choices=torch.from_numpy(n_choices),
        targets=torch.from_numpy(tgt),
        gold=torch.from_numpy(seqs.answer[questions].astype(np.int64)),
        questions=questions,
    )


def make_batches(
    seqs: Sequences,
    targets: Optional[np.ndarray],
    questions: np.ndarray,
    batch_size: int,
    pad_id: int,
    max_length: int,
    *,
    rng: Optional[np.random.Generator] = None,
    bucket: int = 50,
) -> list[Batch]:
    """Batches of `batch_size` whole questions, drawn from `questions`.

    With `rng`: shuffle, then sort by length within windows of `bucket` batches (so padding stays
    small), then shuffle the batch order. Without: sorted by length (for prediction).
    """
    questions = np.asarray(questions, dtype=np.int64)
    if targets is not None and targets.shape[0] != seqs.n_questions:
        raise ValueError(f"targets has {targets.shape[0]} rows for {seqs.n_questions} questions")
    rows_of = question_rows(seqs)
    row_len = np.minimum(seqs.lengths(), max_length)
    qlen = np.asarray([row_len[rows_of[q]].max() if len(rows_of[q]) else 0 for q in questions])
    if rng is None:
        order = questions[np.argsort(qlen, kind="stable")]
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        perm = rng.permutation(len(questions))
        window = batch_size * bucket
        groups = []
        for s in range(0, len(perm), window):
            chunk = perm[s : s + window]
            chunk = chunk[np.argsort(qlen[chunk], kind="stable")]
            groups += [questions[chunk[i : i + batch_size]] for i in range(0, len(chunk), batch_size)]
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return [collate(seqs, g, rows_of=rows_of, targets=targets, pad_id=pad_id, max_length=max_length) for g in groups]


def shard_questions(n_questions: int, rank: int, world_size: int, *, seed: int, epoch: int) -> np.ndarray:
    """This worker's questions for an epoch: a seeded permutation, padded by wrap-around to a multiple
    of `world_size` (so every worker runs the same number of steps), then strided by rank."""
    perm = np.random.default_rng([seed, epoch]).permutation(n_questions)
    if world_size > 1 and n_questions % world_size:
        perm = np.concatenate([perm, perm[: world_size - n_questions % world_size]])
    return perm[rank::world_size]


def one_hot(answer: np.ndarray, width: int) -> np.ndarray:
    """Gold as a target matrix."""
    out = np.zeros((len(answer), width), dtype=np.float32)
    out[np.arange(len(answer)), answer] = 1.0
    return out


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
    """AdamW; no decay on biases and norm weights (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
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


def _batch_loss(model: nn.Module, batch: Batch, device, *, soft: bool, temperature: float, alpha: float) -> torch.Tensor:
    inputs = batch.to(device)
    logits = model(**inputs.model_inputs())
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
) -> float:
    """One pass; returns the question-weighted mean loss."""
    model.train()
    total, count = 0.0, 0
    for batch in batches:
        loss = _batch_loss(model, batch, device, soft=soft, temperature=temperature, alpha=alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * batch.size
        count += batch.size
    return total / max(count, 1)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, batches: Iterable[Batch], *, soft: bool, temperature: float, alpha: float, device="cpu"
) -> float:
    """Question-weighted mean loss in eval mode, no grad."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss = _batch_loss(model, batch, device, soft=soft, temperature=temperature, alpha=alpha)
        total += float(loss) * batch.size
        count += batch.size
    model.train(was)
    return total / max(count, 1)


@torch.no_grad()
def predict(
    model: nn.Module,
    seqs: Sequences,
    *,
    batch_size: int,
    pad_id: int,
    max_length: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Probabilities `(Q, seqs.max_choices)` per question, zeros for absent choices (eval mode, no grad)."""
    model = unwrap(model)  # a DDP wrapper would run collectives in forward
    was = model.training
    model.eval()
    out = np.zeros((seqs.n_questions, seqs.max_choices), dtype=np.float32)
    try:
        for batch in make_batches(seqs, None, np.arange(seqs.n_questions), batch_size, pad_id, max_length):
            batch = batch.to(device)
            logits = model(**batch.model_inputs()).float()
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).cpu().numpy()
            out[batch.questions, : probs.shape[1]] = probs
    finally:
        model.train(was)
    return out


def accuracy(probs: np.ndarray, answer: np.ndarray) -> float:
    return float((probs.argmax(-1) == np.asarray(answer)).mean()) if len(answer) else float("nan")
