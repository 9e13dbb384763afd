"""The checkpoints' safetensors writer: the same bytes as safetensors' own, past the page cache or not."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import tensorfile


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype the writer lays out itself, a scalar, an empty tensor, a non-contiguous view and one
    tensor larger than the copy buffer (so the buffer is flushed mid-tensor)."""
    g = torch.Generator().manual_seed(0)
    out = {f"t{i:02d}": torch.randint(0, 100, (5, 3), generator=g).to(dt) for i, dt in enumerate(
        [torch.float64, torch.int64, torch.float32, torch.int32, torch.float16, torch.bfloat16, torch.int16,
         torch.int8, torch.uint8, torch.bool])}
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.empty(0, 4)
    out["strided"] = torch.randn(6, 4, generator=g).t()
    out["big"] = torch.randn(tensorfile.BUFFER_BYTES // 4 + 1234, generator=g)
    out["a.rows"] = torch.arange(7)
    return out


def test_direct_writer_writes_safetensors_own_bytes(tmp_path):
    ts = mixed_tensors()
    save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp_path / "lib.safetensors"))
    tensorfile.write_safetensors(ts, tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert set(back) == set(ts) and all(torch.equal(back[k], ts[k]) for k in ts)


def test_a_filesystem_that_refuses_o_direct_gets_the_same_file(tmp_path, monkeypatch):
    """tmpfs and some network mounts refuse O_DIRECT (EINVAL): the file is written the usual way, whole."""
    real_open = os.open

    def refusing_open(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(tensorfile.os, "open", refusing_open)
    ts = mixed_tensors()
    tensorfile.write_safetensors(ts, tmp_path / "ours.safetensors")
    save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp_path / "lib.safetensors"))
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


def test_a_refused_write_midway_leaves_a_whole_file_not_a_torn_one(tmp_path, monkeypatch):
    """EINVAL on a write (a block size the buffer's alignment does not meet) after the file was created:
    the partial file is replaced by a complete one."""
    real_write, calls = os.write, []

    def refusing_second_write(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(tensorfile.os, "O_DIRECT", 0, raising=False)  # the streaming path on any filesystem
    monkeypatch.setattr(tensorfile.os, "write", refusing_second_write)
    ts = mixed_tensors()
    tensorfile.write_safetensors(ts, tmp_path / "ours.safetensors")
    assert len(calls) == 2  # the streaming path ran and was refused midway
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(back[k], ts[k]) for k in ts)


def test_other_errors_and_shared_tensors_are_not_swallowed(tmp_path):
    with pytest.raises(OSError):
        tensorfile.write_safetensors({"a": torch.zeros(3)}, tmp_path / "no" / "such" / "dir.safetensors")
    w = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="share memory"):  # safetensors' own refusal, as before
        tensorfile.write_safetensors({"a": w, "b": w}, tmp_path / "shared.safetensors")


def test_a_short_write_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    """A write that stops short (a full disk) raises, and the part-written file is removed."""
    real_write = os.write
    monkeypatch.setattr(tensorfile.os, "O_DIRECT", 0, raising=False)  # the streaming path on any filesystem
    monkeypatch.setattr(tensorfile.os, "write", lambda fd, data: real_write(fd, data[: len(data) - 4096]))
    with pytest.raises(OSError, match="wrote"):
        tensorfile.write_safetensors(mixed_tensors(), tmp_path / "ours.safetensors")
    assert not (tmp_path / "ours.safetensors").exists()
