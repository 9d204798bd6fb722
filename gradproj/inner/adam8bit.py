"""Adam inside the subspace with 8-bit blockwise-quantized moments (GaLore-AdamW8bit's inner rule).

The moments are stored the way bitsandbytes' 8-bit blockwise optimizers store them: the flattened tensor
is cut into blocks of 256 values; each block keeps one fp32 scale (its absolute maximum) and one uint8
code per value, an index into a 256-entry *dynamic* map (a floating-point-like code with more resolution
near zero). The first moment uses the signed map, the second moment, which is never negative, the
unsigned map.

One update: dequantize m and v to fp32, run the same Adam step as :class:`gradproj.inner.Adam` on them
(the direction is computed from the fresh fp32 moments), then quantize them back into the stored codes and
scales. This runs over chunks of 2^17 values (whole blocks, which are independent), so the fp32
transients stay small however large the tensor; the direction is returned in R's dtype. Tensors with
fewer than ``min_8bit_size`` elements (4096, as bitsandbytes) keep fp32 moments: their blocks would cost
more in scales and rounding than they save.

Quantization on the CPU. bitsandbytes' CPU quantizer (>= 0.50) scales a block by t = x · (1/absmax),
maps t to one of 65536 uniform bins over [-1, 1] (``trunc((t + 1)·0.5·65535 + 0.5)``) and looks the bin
up in a table of the code nearest to the bin's centre. :class:`LutQuantizer` reproduces that in a few
vectorized torch passes over m and v together (block maxima, one scaling, the bin arithmetic, one
gather), with the same float operations in the same order, so the codes and scales are bit for bit
bitsandbytes' (checked against the installed bitsandbytes once per process before first use, on every
bin where the table changes and its neighbours, for both maps; tests/test_adam8bit_quantizer.py). It is
the default on the CPU; bitsandbytes' own calls run instead with ``adam_kernel="reference"``, on other
devices, when the check fails (another bitsandbytes whose quantizer rounds differently), and for a chunk
whose block maxima are not finite normal numbers. Dequantization is ``code[c] · absmax`` either way.

The compiled update. Once the process has updated ~5·10^8 8-bit values this way, the CPU update of an fp32
R runs as one compiled pass instead (:mod:`gradproj.inner.adam8bit_fused`: dequantize, the same Adam
arithmetic as torch's fused kernel, block maxima and the same quantizer, block by block in C++ built through
inductor's C++ backend, on torch's threads; checked against :class:`LutQuantizer` on every bin edge before
use). For an unprojected tensor it also steps the weight (:meth:`Adam8bit.step_weight`), so no ψ of the
tensor's size is made. Blocks from one whose maximum is not a finite normal number are left untouched by it
and run the path above. The build (a few seconds, once per process) waits for those values so that tests
and short runs never pay for it; a build that fails leaves the eager path.

Speed on the CPU (docs/benchmarks.md, one thread, the same rounds): the 8-bit regular step of LLaMA block
matrices measured 1.21x (llama_20m) / 1.08x (llama_60m) the fp32 step with the compiled update, against
1.93x / 1.53x with the eager update (about fifteen torch passes per chunk, four of them table gathers). The
whole model (embedding and head with 8-bit moments, where the fp32 optimizer runs torch's fused AdamW)
measured 1.48x / 1.33x. bitsandbytes' fused 8-bit update (``optimizer_update_8bit_blockwise``, which
galore-torch calls) is torch ops around the same quantize calls on the CPU, and places eps and weight decay
differently from GaLore.

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
from ..options import Option, choice, number
from ..state_layout import Spec
from . import adam8bit_fused
from .adam import ADAM_KERNELS, BETAS, EPS, Adam, fused
from .base import StepContext

#: values per quantization block (bitsandbytes' blockwise optimizers use 256)
BLOCK_SIZE = 256
#: values dequantized, updated and requantized at a time (a multiple of BLOCK_SIZE): bounds the fp32
#: transients of a large tensor (an embedding) to a few MiB instead of several copies of the tensor, and keeps
#: the vectorized quantizer's passes in the cache (2^17 was ~10 % faster than 2^20 on a 32000 x 256 embedding)
CHUNK_SIZE = 1 << 17
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


#: bitsandbytes' CPU quantizer bins a scaled value t in [-1, 1] into this many uniform bins
LUT_BINS = 65536
#: smallest normal float32: a block maximum below it (and above 0) has no finite float32 reciprocal
_MIN_NORMAL = torch.finfo(torch.float32).tiny


def _bin_table(code: torch.Tensor) -> torch.Tensor:
    """uint8 code of each of the LUT_BINS bins, as bitsandbytes builds it: bin i stands for
    fl(-1 + fl(2i / 65535)) and gets the number of midpoints fl(0.5·(code[j] + code[j+1])) below it."""
    mids = (code[:-1] + code[1:]) * 0.5
    centres = torch.arange(LUT_BINS, dtype=torch.float32, device=code.device).mul_(2.0).div_(LUT_BINS - 1).sub_(1.0)
    return torch.searchsorted(mids, centres).to(torch.uint8)


def _bins(t: torch.Tensor) -> torch.Tensor:
    """In place on fp32 ``t`` (scaled values): the float bin position fl(fl(fl(t + 1)·32767.5) + 0.5), whose
    truncation is bitsandbytes' bin index trunc(fl(fl(fl(t + 1)·0.5)·65535) + 0.5). fl(a·0.5) is exact, so
    fl(fl(a·0.5)·65535) = fl(a·32767.5). bitsandbytes clamps t to [-1, 1] first; here |t| ≤ 1 + 2^-23
    (|x| ≤ absmax, one rounding of 1/absmax and one of the product), and the two t beyond ±1 give the bins
    of ±1 unclamped: fl(2 + 2^-23) = 2 (a tie, to even), and t = -1 - 2^-23 gives 0.496, bin 0."""
    return t.add_(1.0).mul_((LUT_BINS - 1) * 0.5).add_(0.5)


class Workspace:
    """fp32 moments W (2, padded: m, v), scaled values T (2, padded) and bin indices idx (int32), padded to
    whole blocks, with the views of them one update uses."""

    def __init__(self, n: int, device: torch.device):
        padded = num_blocks(n) * BLOCK_SIZE
        self.W = torch.empty(2, padded, dtype=torch.float32, device=device)
        self.T = torch.empty(2, padded, dtype=torch.float32, device=device)
        self.idx = torch.empty(2, padded, dtype=torch.int32, device=device)
        self.Wb, self.Tb = self.W.view(2, -1, BLOCK_SIZE), self.T.view(2, -1, BLOCK_SIZE)
        self.w = (self.W[0, :n], self.W[1, :n])
        self.wb = (self.Wb[0], self.Wb[1])
        self.i = (self.idx[0, :n], self.idx[1, :n])
        self.pad = self.W[:, n:] if padded > n else None


class LutQuantizer:
    """bitsandbytes' CPU blockwise quantizer (>= 0.50), vectorized; see the module docstring."""

    def __init__(self, device: torch.device):
        self.maps = torch.stack([dynamic_map(True, device), dynamic_map(False, device)])  # m's, v's
        self.tables = [_bin_table(self.maps[0]), _bin_table(self.maps[1])]

    def dequantize(self, ws: Workspace, codes, absmax) -> None:
        """m and v (``codes``: flat uint8; ``absmax``: their block scales) into ``ws.w`` as code[c]·absmax;
        the padding lanes (beyond n up to whole blocks) are set to 0, which leaves the block maxima unchanged."""
        for k in (0, 1):
            ws.i[k].copy_(codes[k])
            torch.index_select(self.maps[k], 0, ws.i[k], out=ws.w[k])
        if ws.pad is not None:
            ws.pad.zero_()
        for k in (0, 1):
            ws.wb[k].mul_(absmax[k].unsqueeze(1))

    def quantize(self, ws: Workspace, codes, absmax) -> bool:
        """Quantize ``ws.w`` (m, v; zero padding lanes) into the flat uint8 ``codes`` and the scales
        ``absmax``. Returns False, changing nothing, when a block maximum is not a finite normal number
        (NaN, inf or subnormal): bitsandbytes' own quantizer then decides what those blocks store."""
        torch.abs(ws.Wb, out=ws.Tb)
        amax = ws.Tb.amax(dim=2)
        lo, hi = torch.aminmax(amax)
        lo_, hi_ = float(lo), float(hi)
        if not (hi_ <= 3.4028234663852886e38):  # NaN fails this test too
            return False
        zero = lo_ == 0.0
        # the smallest non-zero maximum (lo, unless a block is all zeros) must be normal
        if 0.0 < (float(torch.where(amax > 0, amax, hi).amin()) if zero else lo_) < _MIN_NORMAL:
            return False
        inv = torch.reciprocal(amax)  # IEEE 1/x, as bitsandbytes' 1.0f / absmax
        if zero:  # all-zero blocks: bitsandbytes stores code 0; scale 0 keeps their bins finite meanwhile
            empty = amax == 0
            inv.masked_fill_(empty, 0.0)
        torch.mul(ws.Wb, inv.unsqueeze(2), out=ws.Tb)
        ws.idx.copy_(_bins(ws.T))  # float -> int32 truncates toward zero, as bitsandbytes' cast
        for k in (0, 1):
            torch.index_select(self.tables[k], 0, ws.i[k], out=codes[k])
            absmax[k].copy_(amax[k])
            if zero:
                self._zero_blocks(codes[k], empty[k])
        return True

    @staticmethod
    def _zero_blocks(codes: torch.Tensor, empty: torch.Tensor) -> None:
        full = codes.numel() // BLOCK_SIZE
        if full:
            codes[: full * BLOCK_SIZE].view(full, BLOCK_SIZE).masked_fill_(empty[:full].unsqueeze(1), 0)
        if empty.numel() > full and bool(empty[full]):
            codes[full * BLOCK_SIZE :].zero_()


_LUT: dict[str, LutQuantizer | None] = {}


def lut_quantizer(device: torch.device) -> LutQuantizer | None:
    """The vectorized quantizer for CPU ``device`` when it reproduces the installed bitsandbytes (checked
    once per process), else None."""
    key = str(device)
    if key not in _LUT:
        q = LutQuantizer(device)
        try:
            same = reproduces_bitsandbytes(q)
        except (RuntimeError, NotImplementedError):  # no CPU quantizer: its own calls raise the user's error
            same = False
        if not same:
            logging.getLogger("gradproj").debug(
                "8-bit moments: the installed bitsandbytes quantizes differently from its >= 0.50 CPU quantizer; "
                "its own quantize_blockwise runs"
            )
        _LUT[key] = q if same else None
    return _LUT[key]


def boundary_values(table: torch.Tensor, signed: bool, steps: int = 64) -> torch.Tensor:
    """Scaled values t around every bin edge where ``table`` changes code, the extremes ±1 with their float32
    neighbours, and 0. The bin of t is a function of a = fl(t + 1), which lies on a grid of 2^-24 (2^-23
    above 1): around each edge, ``steps`` grid points of a each side, as t = a - 1 (exact), and the t halfway
    between grid points (where t + 1 rounds to either, ties to even) with their float32 neighbours. Away from
    the edges neighbouring bins share a code, so two quantizers that agree here agree on every t."""
    device = table.device
    edges = (table[1:] != table[:-1]).nonzero().flatten() + 1
    a = (edges.double() - 0.5) / ((LUT_BINS - 1) * 0.5)  # where fl(a·32767.5) + 0.5 reaches the edge
    grid = torch.where(a < 1.0, 2.0**-24, 2.0**-23)
    k = torch.arange(-steps, steps + 1, dtype=torch.float64, device=device)
    a = (torch.round(a / grid).unsqueeze(1) + k) * grid.unsqueeze(1)
    t = (a - 1.0).float().flatten()
    half = (a - 1.0 + grid.unsqueeze(1) / 2).float().flatten()
    around = [torch.nextafter(half, torch.full_like(half, s)) for s in (-2.0, 2.0)]
    one = torch.tensor([1.0], device=device)
    ends = torch.cat([one, torch.nextafter(one, 2 * one), torch.nextafter(one, 0 * one), 0 * one])
    near = torch.cat([t, half, *around, ends, -ends])
    near = near[near.abs() <= 1.0 + 2.0**-23]
    return near if signed else near[near >= 0]


def reproduces_bitsandbytes(q: LutQuantizer) -> bool:
    """Whether ``q`` gives bitsandbytes' codes and scales on every bin edge of both maps, at block maxima 1
    (t = x exactly) and 3 (t rounded through a reciprocal), the latter ending in a partial block."""
    F = bnb_functional()
    for signed in (True, False):
        t = boundary_values(q.tables[0 if signed else 1], signed)
        for scale, cut in ((1.0, 0), (3.0, 100)):
            x = _blocks_with_max(t, scale)[: -cut or None]
            ref_codes, ref_state = F.quantize_blockwise(x, code=dynamic_map(signed, x.device), blocksize=BLOCK_SIZE)
            codes, absmax = quantize_lut(q, x, signed)
            if not (torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)):
                return False
    return True


def _blocks_with_max(t: torch.Tensor, scale: float) -> torch.Tensor:
    """Blocks of 255 values ``t·scale`` each led by ``scale``, so every block's maximum is ``scale``."""
    per = BLOCK_SIZE - 1
    t = torch.cat([t, torch.zeros((-t.numel()) % per, device=t.device)]).view(-1, per)
    head = torch.ones(t.shape[0], 1, device=t.device)
    return (torch.cat([head, t], 1) * scale).flatten()


def quantize_lut(q: LutQuantizer, x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of fp32 ``x`` by ``q`` alone (one moment; the other row of the pass gets zeros)."""
    n = x.numel()
    ws = Workspace(n, x.device)
    ws.W.zero_()
    k = 0 if signed else 1
    ws.w[k].copy_(x)
    codes = [torch.empty(n, dtype=torch.uint8, device=x.device) for _ in range(2)]
    absmax = [torch.empty(num_blocks(n), dtype=torch.float32, device=x.device) for _ in range(2)]
    if not q.quantize(ws, codes, absmax):
        raise ValueError("x: block maxima must be finite normal numbers or 0")
    return codes[k], absmax[k]


#: adam_kernel as the 8-bit rule reads it: it also picks the quantizer on the CPU
ADAM_KERNEL_8BIT = Option(
    "adam_kernel",
    "fused",
    "`fused`: torch's fused Adam arithmetic (ψ within a few roundings of the reference's) and, on the CPU, a "
    "replica of bitsandbytes' quantizer (the same codes, bit for bit), compiled into one pass on torch's threads "
    "(which also steps unprojected weights) once the process has updated ~5e8 8-bit values; `reference`: "
    "galore-torch's Adam ops and bitsandbytes' own quantizer calls",
    choice(*ADAM_KERNELS),
)


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
        ADAM_KERNEL_8BIT,
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
        if state["exp_avg"].dtype != torch.uint8:  # a small tensor: fp32 moments
            return super().update(R, state, group, ctx)
        U = torch.empty(R.shape, dtype=R.dtype, device=R.device)
        one_pass = fused(group, ctx.ops)
        lut = self._lut(R, group)
        compiled = (
            adam8bit_fused.for_update(R.numel()) if lut is not None and one_pass and R.dtype == torch.float32 else None
        )
        self._update_8bit(R, U, state, group, ctx, compiled, None)
        return U, self.step_size(group, state, ctx)

    def step_weight(self, W, R, state, group, ctx: StepContext) -> bool:
        """The compiled CPU update with the weight's step folded in, block by block: ψ never exists as a tensor
        and W is read and written once (a fresh ψ of an embedding's size costs more than the kernel, in page
        faults and two more passes over W). The weight gets the engine's own operations (torch's ``add_``
        with alpha, each a fused multiply-add: ``W += −step·ψ``, then ``W += −lr·wd·W``), so W is what
        :meth:`update` and the engine's weight update give, up to where a multiply-add is fused or not (the
        same function; tests/test_adam8bit_compiled.py). Applies where the compiled update is built and runs:
        8-bit moments, ``adam_kernel="fused"``, float32 W and R of one shape on the CPU."""
        if (
            W.dtype != torch.float32
            or R.dtype != torch.float32
            or W.device.type != "cpu"
            or W.shape != R.shape
            or not (W.is_contiguous() and R.is_contiguous())
            or not fused(group, ctx.ops)
        ):
            return False
        compiled = adam8bit_fused.current()  # only a kernel built already (the eager path counts towards it)
        if compiled is None or self._lut(R, group) is None:
            return False
        if "exp_avg" in state:
            if state["exp_avg"].dtype != torch.uint8:  # a small tensor's fp32 moments: update()
                return False
        elif R.numel() < group["min_8bit_size"]:
            return False
        else:
            self._init_state(R, state, group)
        step = self.step_size(group, state, ctx)
        decay = -self.decay_lr(group, state) * group["weight_decay"]
        self._update_8bit(R, W, state, group, ctx, compiled, (-step * ctx.scale, decay))
        return True

    @staticmethod
    def _lut(R: torch.Tensor, group: dict) -> LutQuantizer | None:
        if R.device.type != "cpu" or group.get("adam_kernel", "fused") == "reference":
            return None
        return lut_quantizer(R.device)

    def _update_8bit(self, R, out, state, group, ctx: StepContext, compiled, weight_step) -> None:
        """The update of R with 8-bit moments: ψ into ``out`` (``weight_step=None``), or ``out`` is the weight,
        stepped by ``(alpha, decay)`` as :meth:`adam8bit_fused.FusedUpdate.update` says. The compiled update
        runs first where given; what it leaves (in each of its threads' ranges, the blocks from the first one
        whose maxima are not finite normal numbers) runs the eager update, a chunk at a time."""
        (beta1, beta2), eps = group["betas"], group["eps"]
        # R is contiguous (dense_down, or a weight's gradient): views
        flat = (R.reshape(-1), out.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1))
        m_absmax, v_absmax = state[EXP_AVG_ABSMAX], state[EXP_AVG_SQ_ABSMAX]
        n = R.numel()
        if compiled is None:
            left = [(0, n)]
        else:
            r, o, m_codes, v_codes = flat
            left = compiled.update(r, o, (m_codes, v_codes), (m_absmax, v_absmax), beta1, beta2, eps, weight_step)
            if not left:
                return
        one_pass = fused(group, ctx.ops)
        lut = self._lut(R, group)
        chunks = [(a, min(a + CHUNK_SIZE, stop)) for start, stop in left for a in range(start, stop, CHUNK_SIZE)]
        for start, stop in chunks:  # each starts at a block boundary
            if start == 0 and stop == n:  # one chunk: the tensors themselves (fewer views per step)
                r, o, m_codes, v_codes = flat
                scales = (m_absmax, v_absmax)
            else:
                values = slice(start, stop)
                blocks = slice(start // BLOCK_SIZE, num_blocks(stop))
                r, o, m_codes, v_codes = (t[values] for t in flat)
                scales = (m_absmax[blocks], v_absmax[blocks])
            u = o if weight_step is None else torch.empty_like(r)
            if lut is not None:
                # kept for reuse on the eager path's own chunk lengths; what the compiled update left (from a
                # block that is not finite normal) has lengths of its own, whose buffers are not kept
                ws = self._workspace(r.numel(), R.device) if compiled is None else Workspace(r.numel(), R.device)
                lut.dequantize(ws, (m_codes, v_codes), scales)
                m32, v32 = ws.w
            else:
                m32 = dequantize(m_codes, scales[0], signed=True)
                v32 = dequantize(v_codes, scales[1], signed=False)
            r32 = r.to(torch.float32)
            if one_pass and u.dtype == torch.float32 and reference.fused_adam_applies(r32, m32, v32):
                reference.adam_update_fused([r32], [m32], [v32], beta1, beta2, eps, out=[u])  # ψ straight into u
            else:
                u.copy_(ctx.ops.adam_update(r, m32, v32, beta1, beta2, eps))
            if lut is None or not lut.quantize(ws, (m_codes, v_codes), scales):
                quantize_(m32, m_codes, scales[0], signed=True)
                quantize_(v32, v_codes, scales[1], signed=False)
            if weight_step is not None:  # the engine's weight update (kernels.reference.apply_update), on this chunk
                alpha, decay = weight_step
                o.add_(u, alpha=alpha)
                if decay != 0.0:
                    o.add_(o, alpha=decay)

    def _workspace(self, n: int, device: torch.device) -> Workspace:
        """This rule's buffers for a chunk of ``n`` values, kept for reuse across parameters and steps (a warm
        buffer spares the page faults of a fresh one and the views' setup): 24 bytes a value, at most 3 MiB
        per chunk length, one length per distinct tensor size (and its last chunk)."""
        return self._reused(("workspace", n, device), lambda: Workspace(n, device))

    def _reused(self, key: tuple, make):
        """The buffers this rule keeps under ``key`` across parameters and steps, made by ``make()`` at first use."""
        buffers = self.__dict__.setdefault("_buffers", {})
        if key not in buffers:
            buffers[key] = make()
        return buffers[key]

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
