"""Pieces shared by the Triton kernels: float32 → storage-dtype rounding, and the launch device guard.

Kernels compute in float32 and round once when they store. For a bfloat16 destination the rounding is
done here on the float32 bit pattern, so that what is stored does not depend on how the backend
converts: round-to-nearest-even emulated exactly (the Triton interpreter's float32 → bfloat16 store
truncates; a GPU rounds to nearest, and gets the same bits), or stochastic rounding as defined by
:func:`gradproj.kernels.reference.stochastic_round_to_bf16`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def bf16_nearest(x):
    """float32 → float32 holding the nearest (ties to even) bfloat16 value; NaN passes through."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)


@triton.jit
def bf16_stochastic(x, seed, offsets):
    """float32 → float32 holding a bfloat16 value: ``bits(x) + uniform[0, 2¹⁶)``, low 16 bits cleared.

    ``offsets`` (a unique integer per element) and ``seed`` index the Philox stream.
    """
    noise = tl.randint(seed, offsets) & 0xFFFF
    bits = (x.to(tl.uint32, bitcast=True) + noise.to(tl.uint32)) & 0xFFFF0000
    return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)


@triton.jit
def store_rounded(ptrs, x, mask):
    """Store float32 ``x`` to ``ptrs`` in their element type, rounding to nearest (exactly, see above)."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        x = bf16_nearest(x)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


#: launch options of every kernel: 4 warps; multiply-adds fused into FMAs (Triton's long-standing default,
#: stated so that Triton >= 3.9 does not warn about a default that will change)
LAUNCH = {"num_warps": 4, "enable_fp_fusion": True}


def device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU (Triton launches on the current device), a no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def interpreting_at_import() -> bool:
    """Whether ``triton.jit`` in this process builds interpreted kernels (TRITON_INTERPRET set now)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # triton < 3.4 reads the variable directly
        import os

        return os.environ.get("TRITON_INTERPRET", "0") == "1"
