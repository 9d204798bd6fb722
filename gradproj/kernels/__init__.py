"""Kernels: the torch reference (CPU path and test oracle) and the Triton twins, chosen by ``impl``.

Every operation the optimizer calls is listed by :class:`~gradproj.kernels.protocol.KernelOps` (names:
:data:`OPS`) and has the same name and signature in :mod:`gradproj.kernels.reference` (pure torch) and
:mod:`gradproj.kernels.triton_ops` (Triton kernels around cuBLAS GEMMs); the optimizer calls them through
the module :func:`resolve` returns, so the readable core never changes with the backend.

Dispatch rules (``impl`` is a param-group option of every gradproj optimizer):

* ``"torch"``: always the reference.
* ``"auto"`` (default): Triton for CUDA tensors of a supported dtype (float32, bfloat16, float16) when
  triton is importable and the interpreter is off; the reference otherwise, silently.
* ``"triton"``: the Triton kernels — compiled for CUDA tensors, or under the Triton interpreter for CPU
  tensors when ``TRITON_INTERPRET=1`` (how the tests run them; slow). Anything else raises a
  ``ValueError`` that says why.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import torch

from . import reference
from .protocol import OPS, KernelOps

log = logging.getLogger("gradproj")
IMPLS = ("auto", "torch", "triton")
#: parameter dtypes the Triton kernels accept (they compute in float32 and round on store)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: per-parameter state key of the stochastic-rounding seed (a Python int)
SR_SEED = "sr_seed"


@functools.cache
def triton_import_error() -> str | None:
    """None when triton and the kernel modules import, else why not (cached: checked once per process)."""
    try:
        importlib.import_module("triton")
    except Exception as err:  # ImportError, or a broken install raising anything at import
        return (
            f"triton cannot be imported ({type(err).__name__}: {err}); install it with pip install 'gradproj[triton]'"
        )
    try:
        load_triton_ops()
    except Exception as err:  # e.g. a triton too old for the kernels' language features
        log.debug("gradproj: the Triton kernels cannot be defined", exc_info=True)
        return f"the Triton kernels cannot be defined with this triton ({type(err).__name__}: {err})"
    return None


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter (read now, as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def load_triton_ops() -> ModuleType:
    """The Triton operations module (imported on first use; defines kernels, compiles nothing)."""
    return importlib.import_module(".triton_ops", __name__)


def why_not_triton(tensor: torch.Tensor) -> str | None:
    """None when the Triton kernels can run on ``tensor``, else the reason they cannot."""
    err = triton_import_error()
    if err is not None:
        return err
    if tensor.dtype not in TRITON_DTYPES:
        return f"the Triton kernels take float32, bfloat16 or float16 tensors, not {tensor.dtype}"
    if tensor.is_cuda:
        return None
    if tensor.device.type != "cpu" or not interpreter_requested():
        return (
            f"the tensor is on {tensor.device.type}: the Triton kernels need a CUDA device, or "
            "TRITON_INTERPRET=1 in the environment to run under the Triton interpreter on the CPU (slow; for tests)"
        )
    if not load_triton_ops().INTERPRETED:
        return (
            "the Triton kernels were loaded compiled (TRITON_INTERPRET was not set when they were first used in "
            "this process), so they cannot run on CPU tensors; set TRITON_INTERPRET=1 before the first use"
        )
    return None


def resolve(impl: str, tensor: torch.Tensor) -> KernelOps:
    """Return the module of operations to use for ``tensor`` under ``impl`` (see the module doc)."""
    # reference's limit_norm_growth_ is typed for the dense S its own fira_residual returns, narrower than
    # the protocol's dense-or-ScaledResidual S: hence the ignores below
    if impl == "torch":
        return reference  # type: ignore[return-value]
    if impl == "auto":
        if (
            tensor.is_cuda
            and tensor.dtype in TRITON_DTYPES
            and not interpreter_requested()
            and triton_import_error() is None
        ):
            return load_triton_ops()
        return reference  # type: ignore[return-value]
    if impl == "triton":
        reason = why_not_triton(tensor)
        if reason is not None:
            raise ValueError(
                f"impl='triton' cannot run here: {reason}. Use impl='auto' (Triton where it can run, "
                "torch elsewhere) or impl='torch'"
            )
        return load_triton_ops()
    raise ValueError(f"unknown impl {impl!r}; use one of {', '.join(IMPLS)}")


def rounding_seed(state: dict, enabled: bool, dtype: torch.dtype) -> int | None:
    """The seed of this step's stochastic rounding of a parameter, or None to round to nearest.

    Stochastic rounding applies to bfloat16 weights only (``enabled`` is the group's
    ``stochastic_rounding``). A parameter draws a base seed from torch's global CPU generator at its
    first rounded step (so ``torch.manual_seed`` makes a run reproducible) and keeps it in its state
    under :data:`SR_SEED` as a Python int (so a resumed run continues bit for bit); step t uses the base
    seed mixed with t. Call after ``state["step"]`` has been incremented.
    """
    if not enabled or dtype != torch.bfloat16:
        return None
    base = state.get(SR_SEED)
    if base is None:
        base = state[SR_SEED] = int(torch.randint(0, 2**31 - 1, (), device="cpu"))
    return (base + state["step"] * 0x9E3779B1) % (2**31 - 1)


__all__ = [
    "IMPLS",
    "OPS",
    "SR_SEED",
    "TRITON_DTYPES",
    "KernelOps",
    "load_triton_ops",
    "reference",
    "resolve",
    "rounding_seed",
    "why_not_triton",
]
