"""Safetensors files written past the page cache: the training checkpoints' writer.

A student's checkpoint (its weights and optimizer state, a few hundred MB for the default) is written
every epoch while the training loop waits. Written the usual way, each byte first goes into fresh
page-cache pages, and the kernel's cost of finding those pages, not the disk, decides how long the loop
waits. On a 2-core VM that hands memory the guest freed back to its host, that cost swings with the
machine's state: alone, the default student's 178 MB checkpoint took 0.06-0.41 s through
`safetensors.torch.save_file` and a steady 0.12-0.17 s through this writer (`bench/tensorfile.py`, two
runs); inside training, where the loop's own memory churns, the checkpoint held the loop 0.45-0.90 s an
epoch through `save_file` and 0.10-0.14 s through this writer, in alternating runs of `bench/student.py`
(`bench/results/student_xeon/checkpoint_writer_ab.json`). The file is byte for byte what
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
import functools
import json
import mmap
import os
import struct
from pathlib import Path

ALIGN = 4096
"""Offsets and lengths of `O_DIRECT` writes are multiples of this (the largest usual logical block)."""
BUFFER_BYTES = 8 << 20

_buffer: mmap.mmap | None = None


@functools.cache
def _dtype_order() -> dict:
    """torch dtype -> (its place in `save_file`'s layout, its safetensors name), read from safetensors
    itself: one one-element tensor per dtype it knows, laid out by `save_file`, in the order of their
    offsets. A dtype torch cannot make here is left out (its tensors go to `save_file`)."""
    import torch
    from safetensors import torch as st

    probe = {}
    for name, dtype in getattr(st, "_TYPES", {}).items():
        try:
            probe[name] = torch.zeros(1, dtype=dtype)
        except (RuntimeError, TypeError):
            continue
    raw = st.save(probe)
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    laid = sorted(probe, key=lambda name: header[name]["data_offsets"][0])
    return {probe[name].dtype: (i, name) for i, name in enumerate(laid)}


def _layout(tensors: dict) -> tuple[bytes, list, int] | None:
    """safetensors' own layout: tensors in the order `save_file` writes them (by dtype, `_dtype_order`,
    then by name), the JSON header padded with spaces to 8 bytes. None if `save_file` must decide (a
    dtype it has no name for, a tensor sharing memory with another)."""
    order, seen = _dtype_order(), set()
    items = []
    for k, t in tensors.items():
        if t.dtype not in order:
            return None
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                return None
            seen.add(ptr)
        items.append((k, t))
    items.sort(key=lambda kv: (order[kv[1].dtype][0], kv[0]))
    header, off = {}, 0
    for k, t in items:
        n = t.numel() * t.element_size()
        header[k] = {"dtype": order[t.dtype][1], "shape": list(t.shape), "data_offsets": [off, off + n]}
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
                    _write_all(fd, buf)
                    fill = 0

        put(memoryview(head))
        for _, t in items:
            t = t.detach().cpu().contiguous().reshape(-1)
            put(memoryview(t.view(torch.uint8).numpy()))
        if fill:
            pad = -fill % ALIGN
            buf[fill:fill + pad] = bytes(pad)
            _write_all(fd, buf[:fill + pad])
        os.ftruncate(fd, total)
    finally:
        os.close(fd)


def _write_all(fd: int, block: memoryview) -> None:
    """One aligned block; a short write (no room left, say) is an error, never a silently torn file."""
    n = os.write(fd, block)
    if n != len(block):
        raise OSError(errno.EIO, f"wrote {n} of {len(block)} bytes")


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
            path.unlink(missing_ok=True)  # no part-written file is left behind
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            # refused by the filesystem: written the usual way below
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
