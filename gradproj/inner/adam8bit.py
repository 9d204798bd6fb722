"""Adam inside the subspace with 8-bit blockwise-quantized moments (GaLore-AdamW8bit's inner rule).

The moments are stored the way bitsandbytes' 8-bit blockwise optimizers store them: the flattened tensor
is cut into blocks of 256 values; each block keeps one fp32 scale (its absolute maximum) and one uint8
code per value, an index into a 256-entry *dynamic* map (a floating-point-like code with more resolution
near zero). The first moment uses the signed map, the second moment, which is never negative, the
unsigned map. Quantization and dequantization are bitsandbytes' functional ops
(``bitsandbytes.functional.quantize_blockwise`` / ``dequantize_blockwise``), which run on CPU and CUDA.

One update: dequantize m and v to fp32, run the same Adam step as :class:`gradproj.inner.Adam` on them
(the direction is computed from the fresh fp32 moments), then quantize them back into the stored codes and
scales. This runs over chunks of 2^20 values (whole blocks, which are independent), so the fp32
transients stay small however large the tensor; the direction is returned in R's dtype. Tensors with
fewer than ``min_8bit_size`` elements (4096, as bitsandbytes) keep fp32 moments: their blocks would cost
more in scales and rounding than they save.

The two code maps are a fixed function of bitsandbytes (``create_dynamic_map``); they are rebuilt once per
device and cached here, never stored in the optimizer state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys

import torch

from ..kernels import reference
from ..options import Option, number
from ..state_layout import Spec
from .adam import ADAM_KERNEL, BETAS, EPS, Adam, fused
from .base import StepContext

#: values per quantization block (bitsandbytes' blockwise optimizers use 256)
BLOCK_SIZE = 256
#: values dequantized, updated and requantized at a time (a multiple of BLOCK_SIZE): bounds the fp32
#: transients of a large tensor (an embedding) to a few MiB instead of several copies of the tensor
CHUNK_SIZE = 1 << 20
#: state keys of the block scales (fp32, one per block)
EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX = "exp_avg_absmax", "exp_avg_sq_absmax"

_MAPS: dict[tuple[str, bool], torch.Tensor] = {}


class _ToDebug(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            logging.getLogger().handle(record)  # real errors reach the application's handlers as before
        else:
            logging.getLogger("gradproj").debug("%s: %s", record.name, record.getMessage())


@contextlib.contextmanager
def quiet_bnb_import():
    """Import bitsandbytes inside this: the warnings it (and the ``kernels`` package it loads) logs at import
    about optional CPU kernels it could not fetch go to gradproj's debug log; errors pass through."""
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    saved = [(lg, lg.propagate) for lg in loggers]
    handler = _ToDebug()
    for lg in loggers:
        lg.propagate = False
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg, propagate in saved:
            lg.removeHandler(handler)
            lg.propagate = propagate


def bnb_functional():
    """``bitsandbytes.functional`` (imported on first use, quietly), or an ImportError that says how to install it."""
    loaded = sys.modules.get("bitsandbytes.functional")
    if loaded is not None:
        return loaded
    try:
        with quiet_bnb_import():
            import bitsandbytes.functional as F
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "8-bit optimizer state needs bitsandbytes >= 0.45 (its blockwise quantization runs on CPU and CUDA): "
            "pip install 'gradproj[bnb]'"
        ) from err
    return F


def dynamic_map(signed: bool, device: torch.device) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic code map (signed for m, unsigned for v) on ``device``, built once."""
    key = (str(device), signed)
    if key not in _MAPS:
        _MAPS[key] = bnb_functional().create_dynamic_map(signed=signed).to(device)
    return _MAPS[key]


def num_blocks(numel: int) -> int:
    return math.ceil(numel / BLOCK_SIZE)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values of a blockwise-quantized tensor (a new tensor shaped like ``codes``)."""
    F = bnb_functional()
    return F.dequantize_blockwise(codes, absmax=absmax, code=dynamic_map(signed, codes.device), blocksize=BLOCK_SIZE)


def quantize_(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> None:
    """Quantize fp32 ``x`` into ``codes`` (uint8, x's shape) and ``absmax`` (fp32, one per block), in place."""
    F = bnb_functional()
    F.quantize_blockwise(x, code=dynamic_map(signed, x.device), absmax=absmax, out=codes, blocksize=BLOCK_SIZE)


class Adam8bit(Adam):
    """Adam with 8-bit blockwise-quantized moments; same update and step size as :class:`Adam`.

    State: ``exp_avg`` / ``exp_avg_sq`` (uint8 codes shaped like R) and ``exp_avg_absmax`` /
    ``exp_avg_sq_absmax`` (fp32, ceil(numel / 256) each); or fp32 ``exp_avg`` / ``exp_avg_sq`` for tensors
    smaller than ``min_8bit_size``. The representation is chosen when the state is created and kept.
    """

    name = "adam8bit"
    options = (
        BETAS,
        EPS,
        ADAM_KERNEL,
        Option(
            "min_8bit_size",
            4096,
            "moments of tensors with fewer elements stay fp32 (as bitsandbytes)",
            number(integer=True, minimum=0),
        ),
    )
    state_keys = ("exp_avg", "exp_avg_sq", EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX)
    state_parts = {EXP_AVG_ABSMAX: "scales", EXP_AVG_SQ_ABSMAX: "scales"}
    # Quantization blocks run across rows and columns of R, so a block of R's rows (FSDP) would get other
    # blocks than the whole matrix, and quantized codes cannot be rotated into a new basis: neither is offered.
    shardable = ()
    batched = False  # quantized moments
    state_transforms = None

    def state_layout(self, shape, group):
        blocks = (num_blocks(math.prod(shape)),)
        return {
            "exp_avg": Spec(shape, "codes", requires=("exp_avg_sq",)),
            "exp_avg_sq": Spec(shape, "codes", requires=("exp_avg",)),
            EXP_AVG_ABSMAX: Spec(blocks, requires=("exp_avg", EXP_AVG_SQ_ABSMAX)),
            EXP_AVG_SQ_ABSMAX: Spec(blocks, requires=("exp_avg_sq", EXP_AVG_ABSMAX)),
        }

    def update(self, R, state, group, ctx: StepContext):
        if "exp_avg" not in state:
            self._init_state(R, state, group)
        (beta1, beta2), eps = group["betas"], group["eps"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if m.dtype != torch.uint8:  # a small tensor: fp32 moments
            return super().update(R, state, group, ctx)
        U = torch.empty(R.shape, dtype=R.dtype, device=R.device)
        flat = (R.reshape(-1), U.view(-1), m.view(-1), v.view(-1))  # R is contiguous (dense_down): views
        one_pass = fused(group, ctx.ops)
        m_absmax, v_absmax = state[EXP_AVG_ABSMAX], state[EXP_AVG_SQ_ABSMAX]
        for start in range(0, R.numel(), CHUNK_SIZE):
            values = slice(start, start + CHUNK_SIZE)
            blocks = slice(start // BLOCK_SIZE, (start + CHUNK_SIZE) // BLOCK_SIZE)
            r, u, m_codes, v_codes = (t[values] for t in flat)
            m32 = dequantize(m_codes, m_absmax[blocks], signed=True)
            v32 = dequantize(v_codes, v_absmax[blocks], signed=False)
            r32 = r.to(torch.float32)
            if one_pass and u.dtype == torch.float32 and reference.fused_adam_applies(r32, m32, v32):
                reference.adam_update_fused([r32], [m32], [v32], beta1, beta2, eps, out=[u])  # ψ straight into U
            else:
                u.copy_(ctx.ops.adam_update(r, m32, v32, beta1, beta2, eps))
            quantize_(m32, m_codes, m_absmax[blocks], signed=True)
            quantize_(v32, v_codes, v_absmax[blocks], signed=False)
        return U, self.step_size(group, state, ctx)

    @staticmethod
    def _init_state(R: torch.Tensor, state: dict, group: dict) -> None:
        if R.numel() < group["min_8bit_size"]:
            state["exp_avg"] = torch.zeros(R.shape, dtype=torch.float32, device=R.device)
            state["exp_avg_sq"] = torch.zeros(R.shape, dtype=torch.float32, device=R.device)
            return
        bnb_functional()  # fail before any state exists when bitsandbytes is missing
        blocks = num_blocks(R.numel())
        # all-zero scales decode to zero whatever the codes: the moments start at 0
        state["exp_avg"] = torch.zeros(R.shape, dtype=torch.uint8, device=R.device)
        state["exp_avg_sq"] = torch.zeros(R.shape, dtype=torch.uint8, device=R.device)
        state[EXP_AVG_ABSMAX] = torch.zeros(blocks, dtype=torch.float32, device=R.device)
        state[EXP_AVG_SQ_ABSMAX] = torch.zeros(blocks, dtype=torch.float32, device=R.device)
