"""INT8 / INT4 storage of dense bases (Q-GaLore's quantized projection matrices), group option ``basis_bits``.

A dense basis (``proj``, or ``proj_left`` / ``proj_right``) of a group with ``basis_bits`` set is kept as
codes plus per-group scales instead of a matrix in the parameter's dtype, and is dequantized for each GEMM
(``down`` / ``up`` / ``add_up_``). The matrix is flattened in its row-major order and cut into groups of
:data:`GROUP_SIZE` = 256 consecutive entries (the last one may be shorter); each group gets one float32
scale s = absmax / q_max with q_max = 2^(b-1) − 1 (127 for INT8, 7 for INT4), and each entry the code
q = round(x / s) in [−q_max, q_max] (symmetric, round to nearest). Dequantized, x̂ = q·s, so

    |x − x̂| <= s / 2 = absmax(group) / (2^(b-1) − 1) / 2        for every entry,

and an entry equal to its group's absmax is exact. Storage, for a basis of N entries:

    INT8: N bytes (int8 codes, ``<key>_codes``)      + 4·⌈N/256⌉ bytes (float32 scales, ``<key>_scales``)
    INT4: ⌈N/2⌉ bytes (two codes per uint8: entry 2i in the low nibble, 2i+1 in the high one, each
          stored as q + 8 in [1, 15])               + 4·⌈N/256⌉ bytes

that is 1.016 (INT8) and 0.516 (INT4) bytes per entry, against 4 for float32 and 2 for bfloat16.

Q-GaLore (q-galore-torch 1.0, ``GaLoreProjector._quantize``) quantizes the projection matrix differently in
the details: asymmetric min-max quantization per group of ``quant_group_size`` entries along the flattened
matrix (scale = (max − min) / (2^b − 1), an integer zero point), one uint8 per code even at 4 bits, and
scales and zero points kept in the basis dtype; its error bound is (max − min) / (2^b − 1) / 2 per entry.
Symmetric absmax is used here because an orthonormal basis's entries are centred on zero (so the
asymmetric code range buys almost nothing), it needs no zero points, and the float32 scales keep the
bound above exact for bfloat16 parameters too.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..options import Option
from ..state_layout import Spec

#: entries per quantization group (one scale each), along the flattened basis
GROUP_SIZE = 256
#: the supported widths
BITS = (8, 4)
CODES, SCALES = "_codes", "_scales"
#: the dense basis keys a quantized basis replaces, and the keys that replace them
DENSE_KEYS = ("proj", "proj_left", "proj_right")
QUANTIZED_KEYS = tuple(k + suffix for k in DENSE_KEYS for suffix in (CODES, SCALES))


def check_bits(value: Any, name: str, where: str) -> None:
    """None, 8 or 4 (an int: a bool or 8.0 is refused)."""
    if value is not None and not (type(value) is int and value in BITS):
        raise ValueError(f"{where}: {name} = {value!r}; use 8 (INT8), 4 (INT4) or None (the parameter's dtype)")


BASIS_BITS_OPTION = Option(
    "basis_bits",
    None,
    "store the dense basis as INT8 (`8`) or packed INT4 (`4`) codes with one float32 absmax scale per 256 "
    "entries, dequantized for each GEMM (Q-GaLore); `None` keeps it in the parameter's dtype",
    check_bits,
)


def q_max(bits: int) -> int:
    """The largest code magnitude: 127 (INT8), 7 (INT4)."""
    return 2 ** (bits - 1) - 1


def n_groups(numel: int) -> int:
    return math.ceil(numel / GROUP_SIZE)


def n_codes(numel: int, bits: int) -> int:
    """Elements of the codes tensor: one int8 per entry, or one uint8 per two entries."""
    return numel if bits == 8 else math.ceil(numel / 2)


#: the dtype of the codes tensor, by width
CODES_DTYPE = {8: "int8", 4: "uint8"}


def codes_dtype(bits: int) -> torch.dtype:
    return getattr(torch, CODES_DTYPE[bits])


def bits_of(codes: torch.Tensor) -> int:
    """The width of stored codes, read from their dtype (so a state dict says what it holds)."""
    return 8 if codes.dtype == torch.int8 else 4


def layout(key: str, shape: tuple[int, int], bits: int, requires: tuple[str, ...] = ()) -> dict[str, Spec]:
    """The state entries of the basis ``key`` of ``shape`` stored at ``bits``; ``requires``: other keys that
    must come with them (the other side of a ``full`` projection)."""
    numel = math.prod(shape)
    codes, scales = key + CODES, key + SCALES
    return {
        codes: Spec((n_codes(numel, bits),), "codes", requires=(scales, *requires), dtype=CODES_DTYPE[bits]),
        scales: Spec((n_groups(numel),), requires=(codes,), dtype="float32"),
    }


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``x`` (any shape, flattened row-major): see the module docstring."""
    if bits not in BITS:
        raise ValueError(f"basis_bits = {bits!r}; use one of {', '.join(map(str, BITS))}")
    flat = x.detach().reshape(-1).float()
    numel, groups = flat.numel(), n_groups(flat.numel())
    padded = torch.nn.functional.pad(flat, (0, groups * GROUP_SIZE - numel)).view(groups, GROUP_SIZE)
    scales = padded.abs().amax(dim=1) / q_max(bits)
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: codes 0, scale 0
    q = torch.round(padded / divisor[:, None]).clamp_(-q_max(bits), q_max(bits)).view(-1)[:numel]
    if bits == 8:
        return q.to(torch.int8), scales
    nib = (q + 8).to(torch.uint8)
    if numel % 2:
        nib = torch.cat([nib, nib.new_full((1,), 8)])  # the unused high nibble of the last byte: code 0
    return nib[0::2] | (nib[1::2] << 4), scales


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The basis of ``shape`` that ``codes`` and ``scales`` hold, as a new contiguous tensor of ``dtype``."""
    numel = math.prod(shape)
    if bits_of(codes) == 8:
        q = codes.float()
    else:
        q = torch.stack(((codes & 0xF), (codes >> 4)), dim=-1).view(-1)[:numel].float().sub_(8)
    groups = scales.numel()
    q = torch.nn.functional.pad(q, (0, groups * GROUP_SIZE - numel)).view(groups, GROUP_SIZE)
    return q.mul_(scales.float()[:, None]).view(-1)[:numel].view(shape).to(dtype)


def quantize_bases(bases: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """``bases`` (what ``compute_basis`` returns) with each dense basis replaced by its codes and scales."""
    out: dict[str, torch.Tensor] = {}
    for key, value in bases.items():
        if key in DENSE_KEYS:
            out[key + CODES], out[key + SCALES] = quantize(value, bits)
        else:
            out[key] = value
    return out
