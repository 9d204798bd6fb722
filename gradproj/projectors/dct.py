"""SVD-free DCT basis (Modoranu et al. 2025, "SVD-Free Low-Rank Adaptive Gradient Optimization"), docs/bases.md.

One orthonormal DCT-II matrix per dimension d, built once and shared by every layer with that dimension
(cached per size, device and dtype). A refresh transforms the gradient into DCT coordinates,
S = G·Q (right) or Qᵀ·G (left) with Q = Cᵀ (C's rows are the basis functions), scores each column (row)
of S by its ℓ1 norm (or ℓ2), keeps the r best, and reads R straight out of S: the refresh step needs no
second product. The per-parameter state is the r indices (int32); no float basis is stored.
"""

from __future__ import annotations

import math
import threading

import torch

from ..options import Option, choice
from ..state_layout import Spec
from .change import BasisChange
from .linalg import unit_scaled
from .regenerated import RegeneratedBasis

DCT_NORMS = ("l1", "l2")
DCT_IMPLS = ("auto", "matmul", "fft")
#: with ``dct_impl="auto"``, transforms of at least this length use the FFT on the CPU (measured faster:
#: docs/benchmarks.md); CUDA keeps the GEMM, which tensor cores run at full rate
FFT_MIN_LENGTH_CPU = 512

_CACHE: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
_LOCK = threading.Lock()


def dct_matrix(d: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II matrix C (d x d): ``C[k, i] = sqrt(2/d) · c_k · cos(π (2i + 1) k / (2d))`` with
    c_0 = 1/√2, else 1; row k is the k-th basis function, C Cᵀ = I. Built once in float64 and cached per
    (d, device, dtype): every layer with that dimension shares the one matrix."""
    device = torch.device(device)
    key = (d, device, dtype)
    C = _CACHE.get(key)
    if C is None:
        with _LOCK:
            C = _CACHE.get(key)
            if C is None:
                k = torch.arange(d, dtype=torch.float64)[:, None]
                i = torch.arange(d, dtype=torch.float64)[None, :]
                C64 = torch.cos(math.pi * (2 * i + 1) * k / (2 * d)) * math.sqrt(2.0 / d)
                C64[0] /= math.sqrt(2.0)
                C = C64.to(device=device, dtype=dtype).contiguous()
                _CACHE[key] = C
    return C


def clear_dct_cache() -> None:
    """Free every cached DCT matrix."""
    with _LOCK:
        _CACHE.clear()


def dct_fft(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` by one real FFT (Makhoul 1980), O(d log d) per vector; the
    same numbers as multiplying by :func:`dct_matrix` (up to rounding). Computed in float32 (float64 for
    float64 input); returns that dtype, contiguous along ``dim`` moved last and back.

    With v = (x_0, x_2, x_4, ..., x_5, x_3, x_1) and V = FFT(v), the unnormalised DCT-II is
    X_k = Re(V_k e^{-iπk/2d}); for the upper half, V_{d-k} = conj(V_k) gives X_{d-k} = -Im(V_k e^{-iπk/2d}),
    so one real FFT of half the spectrum gives every coefficient.
    """
    work = x.double() if x.dtype == torch.float64 else x.float()
    work = work.movedim(dim, -1)
    d = work.shape[-1]
    half = (d + 1) // 2
    v = torch.empty(work.shape, dtype=work.dtype, device=work.device)
    v[..., :half] = work[..., ::2]
    v[..., half:] = work[..., 1::2].flip(-1)
    Vr = torch.fft.rfft(v, dim=-1)  # d // 2 + 1 coefficients
    nr = Vr.shape[-1]
    k = torch.arange(nr, dtype=work.dtype, device=work.device)
    scale = torch.full_like(k, math.sqrt(2.0 / d))
    scale[0] = math.sqrt(1.0 / d)
    cos, sin = torch.cos(math.pi * k / (2 * d)) * scale, torch.sin(math.pi * k / (2 * d)) * scale
    re, im = Vr.real, Vr.imag
    X = torch.empty(work.shape, dtype=work.dtype, device=work.device)
    torch.mul(re, cos, out=X[..., :nr]).addcmul_(im, sin)  # Re(V_k e^{-iθ}) = re·cos θ + im·sin θ
    if d > nr:  # X_{d-k} = -Im(V_k e^{-iθ}) = re·sin θ - im·cos θ  for k = 1 .. d - nr
        j = slice(1, d - nr + 1)
        upper = torch.mul(re[..., j], sin[j]).addcmul_(im[..., j], cos[j], value=-1.0)
        X[..., nr:] = upper.flip(-1)
    return X.movedim(-1, dim)


def _identity(G: torch.Tensor) -> tuple:
    return (G.device, G.data_ptr(), tuple(G.shape), G.stride(), G.dtype, G._version)


class DCTProjector(RegeneratedBasis):
    """Columns (rows) of a shared orthonormal DCT-II matrix, chosen by the ℓ1 norm of S = G·Q.

    Group options: ``dct_norm`` (``"l1"`` default, or ``"l2"``: which norm scores the DCT coefficients) and
    ``dct_impl`` (``"auto"``, ``"matmul"``, ``"fft"``: how S is computed at a refresh). State:
    ``proj_idx`` (r int32 indices; ``proj_idx_left`` / ``proj_idx_right`` for ``full``), in decreasing
    order of score, so position j of the low-rank state is the j-th strongest DCT direction.
    """

    name = "dct"
    orthonormal = True  # an isometry whose adjoint is down(): Fira's factored path applies
    options = (
        Option("dct_norm", "l1", "which norm scores the DCT coefficients at a refresh", choice(*DCT_NORMS)),
        Option(
            "dct_impl",
            "auto",
            "how S = G·Q is computed at a refresh (`'auto'`: FFT on the CPU for long rows)",
            choice(*DCT_IMPLS),
        ),
    )
    basis_keys = ("proj_idx", "proj_idx_left", "proj_idx_right")

    #: R computed at the refresh from S, handed to the next down() of the same gradient (identified by its
    #: memory, layout and version: the optimizer may compute the first basis from another view of it)
    _pending: tuple[tuple, torch.Tensor] | None = None

    def state_layout(self):
        r = (self.rank,)
        if self.side == "full":
            return {
                "proj_idx_left": Spec(r, "index", self.m, ("proj_idx_right",)),
                "proj_idx_right": Spec(r, "index", self.n, ("proj_idx_left",)),
            }
        return {"proj_idx": Spec(r, "index", self.n if self.side == "right" else self.m)}

    # ---------------------------------------------------------------------------------------- refresh
    def has_basis(self, state):
        return ("proj_idx" if self.side != "full" else "proj_idx_left") in state

    def _use_fft(self, d: int, device: torch.device) -> bool:
        impl = self.group["dct_impl"]
        if impl == "auto":
            return device.type == "cpu" and d >= FFT_MIN_LENGTH_CPU
        return impl == "fft"

    def _transform(self, G: torch.Tensor, dim: int) -> torch.Tensor:
        """DCT coefficients of G along ``dim`` (1: each row, S = G Cᵀ; 0: each column, S = C G)."""
        d = G.shape[dim]
        if self._use_fft(d, G.device):
            return dct_fft(G, dim=dim).to(G.dtype)
        C = dct_matrix(d, G.device, G.dtype)
        return G @ C.t() if dim == 1 else C @ G

    def _select(self, S: torch.Tensor, dim: int) -> torch.Tensor:
        """Indices of the ``rank`` columns (dim=1) or rows (dim=0) of S with the largest norms, best first."""
        other = 0 if dim == 1 else 1
        A = unit_scaled(S)  # exact rescaling: same order, but squares and sums of a large gradient stay finite
        scores = A.abs().sum(other) if self.group["dct_norm"] == "l1" else A.square().sum(other)
        return torch.topk(scores, self.rank, sorted=True).indices.to(torch.int32)

    def compute_basis(self, G, state, step):
        if self.side == "right":
            S = self._transform(G, 1)
            idx = self._select(S, 1)
            self._pending = (_identity(G), S[:, idx.long()])
            return {"proj_idx": idx}
        if self.side == "left":
            S = self._transform(G, 0)
            idx = self._select(S, 0)
            self._pending = (_identity(G), S[idx.long()])
            return {"proj_idx": idx}
        S = self._transform(self._transform(G, 0), 1)
        left, right = self._select(S, 0), self._select(S, 1)
        self._pending = (_identity(G), S[left.long()][:, right.long()])
        return {"proj_idx_left": left, "proj_idx_right": right}

    # ------------------------------------------------------------------------------------ projections
    def dense(self, state, like):
        """The selected basis functions, gathered from the shared matrix in ``like``'s dtype and device."""

        def rows(d: int, key: str) -> torch.Tensor:
            return dct_matrix(d, like.device, like.dtype).index_select(0, state[key].to(like.device).long())

        if self.side == "right":
            return None, rows(self.n, "proj_idx")
        if self.side == "left":
            return rows(self.m, "proj_idx").t(), None
        return rows(self.m, "proj_idx_left").t(), rows(self.n, "proj_idx_right")

    def basis_change(self, state):
        """Exact: new coordinate i is old coordinate j when both select the same DCT function (a partial
        permutation; coordinates new to the subspace start from zero)."""
        if self.previous is None:
            return super().basis_change(state)
        keys = {"left": "proj_idx_left", "right": "proj_idx_right"} if self.side == "full" else {self.side: "proj_idx"}
        return BasisChange.between_indices(
            {side: self.previous[k] for side, k in keys.items()}, {side: state[k] for side, k in keys.items()}
        )

    def down(self, G, state):
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == _identity(G):
            return pending[1]  # read out of S at the refresh: no second product
        return super().down(G, state)
