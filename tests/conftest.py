"""Shared fixtures: the shared benchmark data and a tiny random Llama with a tokenizer trained here.

The tiny model has head_dim 64 (vLLM's CPU attention rejects smaller) and is saved as safetensors,
so transformers and vLLM both load it from a local folder. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"expected the shared data at {SHARED_DATA}"
    return SHARED_DATA


def build_tiny_model(out: Path, *, layers: int = 4, hidden: int = 128, seed: int = 0) -> Path:
    """Train a small byte-level BPE tokenizer on ARC text and save a random Llama beside it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = arc_texts()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        head_dim=64,
        max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def arc_texts() -> list[str]:
    texts = []
    with open(SHARED_DATA / "arc_easy" / "train.jsonl") as f:
        for line in f:
            row = json.loads(line)
            texts.append(row["question"] + " " + " ".join(row["choices"]))
    return texts


def build_tiny_bert(out: Path, *, layers: int = 2, hidden: int = 64, vocab: int = 600, seed: int = 0) -> Path:
    """A random BERT-style encoder with its own WordPiece vocabulary (uncased, [CLS]/[SEP] pairs with
    segment ids), trained here on ARC text: a student whose tokenizer differs from the teacher's."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(arc_texts(), trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(fast), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=256, pad_token_id=fast.pad_token_id)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def ctrl_c_reaches_the_child() -> None:
    """`preexec_fn` for a child the test stops with SIGINT: a shell starts background jobs (`cmd &`,
    nohup) with SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt
    handler, so the Ctrl-C would never arrive. A foreground run (CI) is unaffected."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


EXTRACT_CHUNK_ROWS = 8  # many chunks on the tiny config: room to kill a run between two of them


def distill(*args: str, **popen) -> subprocess.CompletedProcess:
    """Run the `distill` CLI in a fresh interpreter (its own local Ray)."""
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, **popen)


def extract_args(tiny_model: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "configs/tiny.yaml", f"teacher.model={tiny_model}", f"out_dir={out}",
            f"extract.chunk_rows={EXTRACT_CHUNK_ROWS}",
            f"ray.temp_dir=/tmp/pkd-{zlib.crc32(str(out).encode()):08x}", *extra]  # AF_UNIX paths are short


@pytest.fixture(scope="session")
def extract_reference(tmp_path_factory, tiny_model) -> Path:
    """An uninterrupted extraction of the tiny config: what every resumed or faulted run must equal."""
    out = tmp_path_factory.mktemp("extract-ref") / "run"
    res = distill(*extract_args(tiny_model, out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out / "activations.zarr"


def assert_same_store(got: Path, want: Path) -> None:
    """Every array of every split equal, element by element."""
    import numpy as np
    import zarr

    a, b = zarr.open_group(str(got), mode="r"), zarr.open_group(str(want), mode="r")
    assert sorted(n for n, _ in a.groups()) == sorted(n for n, _ in b.groups())
    for name, g in b.groups():
        assert sorted(g.array_keys()) == sorted(a[name].array_keys())
        for key in g.array_keys():
            np.testing.assert_array_equal(a[name][key][:], g[key][:], err_msg=f"{name}/{key}")
