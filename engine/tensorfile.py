"""Safetensors files written past the page cache: the training checkpoints' writer.

A student's checkpoint (its weights and optimizer state, a few hundred MB for the default) is written
every epoch while the training loop waits. Written the usual way, each byte first goes into fresh
page-cache pages, and the kernel's cost of finding those pages, not the disk, decides how long the loop
waits. On a 2-core VM that hands memory the guest freed back to its host, the default student's 178 MB
checkpoint took 0.29 s through `safetensors.torch.save_file` and 0.13 s through this writer
(`bench/tensorfile.py`), and inside a training run, where the loop's own memory churns too, the epoch's
checkpoint hold fell from 0.5-2.8 s to 0.12-0.15 s (`bench/student.py`). The file is byte for byte what
`save_file` writes (the same header, the same order), so `safetensors.torch.load_file` reads it as ever.

How: the header and the tensors' bytes are copied through one page-aligned buffer kept for the process
(8 MiB, so it is not faulted in again each time) and written with `O_DIRECT`, in aligned blocks; the last
block is padded and the file cut back to its length. Where `O_DIRECT` is not there (macOS, Windows) or
the filesystem refuses it (tmpfs, some network mounts), the file is written by `save_file` instead. A
dtype that safetensors has no name for, or two tensors sharing memory, also go to `save_file`, which
raises its own error for them.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from pathlib import Path

ALIGN = 4096
"""Offsets and lengths of `O_DIRECT` writes are multiples of this (the largest usual logical block)."""
BUFFER_BYTES = 8 << 20
ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
"""The order `save_file` (safetensors 0.8) lays dtypes out in, ties broken by name; others go to it."""

_buffer: mmap.mmap | None = None


def _dtype_names() -> dict:
    import torch
    from safetensors import torch as st

    names = {v: k for k, v in getattr(st, "_TYPES", {}).items()} or {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
        torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
    return {d: n for d, n in names.items() if n in ORDER}


def _layout(tensors: dict) -> tuple[bytes, list, int] | None:
    """safetensors' own layout: tensors in the order `save_file` writes them (`ORDER`, then by name), the
    JSON header padded with spaces to 8 bytes. None if `save_file` must decide (an unknown
    dtype, a tensor sharing memory with another)."""
    names, seen = _dtype_names(), set()
    items = []
    for k, t in tensors.items():
        if t.dtype not in names:
            return None
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                return None
            seen.add(ptr)
        items.append((k, t))
    items.sort(key=lambda kv: (ORDER.index(names[kv[1].dtype]), kv[0]))
    header, off = {}, 0
    for k, t in items:
        n = t.numel() * t.element_size()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, items, off


def _direct_write(path: Path, head: bytes, items: list, total: int) -> None:
    """Stream `head` and the tensors' bytes through the aligned buffer into an `O_DIRECT` file."""
    import torch

    global _buffer
    if _buffer is None:
        _buffer = mmap.mmap(-1, BUFFER_BYTES)  # anonymous: page-aligned
    buf, fill = memoryview(_buffer), 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        def put(data: memoryview) -> None:
            nonlocal fill
            while len(data):
                k = min(len(data), len(buf) - fill)
                buf[fill:fill + k] = data[:k]
                fill, data = fill + k, data[k:]
                if fill == len(buf):
                    os.write(fd, buf)
                    fill = 0

        put(memoryview(head))
        for _, t in items:
            t = t.detach().cpu().contiguous().reshape(-1)
            put(memoryview(t.view(torch.uint8).numpy()))
        if fill:
            pad = -fill % ALIGN
            buf[fill:fill + pad] = bytes(pad)
            os.write(fd, buf[:fill + pad])
        os.ftruncate(fd, total)
    finally:
        os.close(fd)


def write_safetensors(tensors: dict, path: str | Path) -> None:
    """Write `tensors` (name -> torch tensor, contiguous or not) to the safetensors file `path`, past the
    page cache where the OS and filesystem allow it, else through `safetensors.torch.save_file`; the
    same bytes either way."""
    from safetensors.torch import save_file

    path = Path(path)
    layout = _layout(tensors) if hasattr(os, "O_DIRECT") else None
    if layout is not None:
        head, items, n = layout
        try:
            _direct_write(path, head, items, len(head) + n)
            return
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            path.unlink(missing_ok=True)  # refused by the filesystem: write it the usual way
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
