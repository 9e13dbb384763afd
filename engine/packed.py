"""The teacher's 16-bit CPU matmuls with their weights laid out once for oneDNN, not at every call.

A bf16 `nn.Linear` on a CPU runs oneDNN's matmul, which first copies the weight into the blocked
layout its kernel reads, at every call: for the teacher's ~950-token batches that copy costs about a
tenth of the matmul. `pack_linears` does the copy once, with torch's own prepacking ops (the ones
torch.compile uses for CPU linears: `mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`), for
the decoder blocks' linears and the vocabulary projection. The products are the same kernel's, bit for
bit (each module is checked on a probe input before it is swapped). On the 2-core EPYC (avx512_bf16)
the prepacked bf16 matmul ran at 988-999 GFLOP/s where the plain one ran at 799-852, and the teacher's
bf16 forward took 0.85 of the unpacked one's time per-choice (0.81-0.96 over 9 alternating runs), 0.87
letter (`bench/results/cpu_forward.json`).

Float32 linears are left to MKL: oneDNN sums in another order there, so a float32 forward would move
(within rounding), and float32 forwards are what the lm-eval parity is measured on (though oneDNN ran
float32 at 496-502 GFLOP/s against MKL's 218 on that AMD machine). A packed model
stays on the CPU (its weights are opaque oneDNN tensors) and is for inference.
"""

from __future__ import annotations

import torch

DTYPES = (torch.bfloat16, torch.float16)
"""Weight dtypes that get packed."""


class PackedLinear(torch.nn.Module):
    """An `nn.Linear` whose weight is held in oneDNN's blocked layout (same outputs, no per-call copy)."""

    def __init__(self, linear: torch.nn.Linear, rows_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint),
                             persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _packed_or_none(linear: torch.nn.Module, rows_hint: int) -> PackedLinear | None:
    """`linear` packed, if it is a plain CPU `nn.Linear` in a 16-bit dtype that packing leaves bit-equal."""
    if type(linear) is not torch.nn.Linear or linear.weight.device.type != "cpu" or linear.weight.dtype not in DTYPES:
        return None
    w = linear.weight
    try:
        packed = PackedLinear(linear, rows_hint)
        probe = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0)).to(w.dtype)
        with torch.no_grad():
            same = torch.equal(packed(probe), linear(probe))
    except (RuntimeError, NotImplementedError):  # no oneDNN build, or no kernel for this dtype here
        return None
    return packed if same else None


def pack_linears(model, rows_hint: int = 1024) -> int:
    """Swap the decoder blocks' `nn.Linear`s and the output embedding of a CPU causal LM for
    `PackedLinear`s where they give the same outputs; returns how many were swapped. `rows_hint`: the
    rows a matmul is expected to have (the teacher's batches: about `extract.batch_size` x mean length)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    swapped = 0
    for block in getattr(model.get_decoder(), "layers", []):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                packed = _packed_or_none(child, rows_hint)
                if packed is not None:
                    setattr(parent, name, packed)
                    swapped += 1
    head = model.get_output_embeddings()
    packed = _packed_or_none(head, rows_hint // 2) if head is not None else None
    if packed is not None:
        model.set_output_embeddings(packed)
        swapped += 1
    return swapped
