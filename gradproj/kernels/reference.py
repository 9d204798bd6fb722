"""Pure-torch reference implementations of the fused operations.

These are the CPU path and the test oracle of every accelerated kernel: a Triton kernel must compute the
same function as its twin here. Each function is written to read like the math in docs/algorithms.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..projectors.base import IdentityProjector, Projector, agree_across_ranks
from ..projectors.linalg import power_of_two_scale


@dataclass
class ScaledResidual:
    """A full-size residual term kept factored: ``S = D ⊙ φ · inv_k``.

    D has the weight's 2-D shape; φ is one factor per row (``axis=0``) or per column (``axis=1``) of D, or
    None; ``inv_k`` is a 1-element tensor (a norm-growth limiter's 1/k), or None. Fused paths read the
    factors where S is consumed instead of writing S out.
    """

    D: torch.Tensor
    phi: torch.Tensor | None = None
    axis: int = 0
    inv_k: torch.Tensor | None = None

    def factor(self, dtype: torch.dtype) -> torch.Tensor | None:
        """φ · inv_k shaped to broadcast against D, in ``dtype`` (None when both are absent)."""
        c = None
        if self.phi is not None:
            c = (self.phi[:, None] if self.axis == 0 else self.phi[None, :]).to(dtype)
        if self.inv_k is not None:
            k = self.inv_k.reshape(()).to(dtype)
            c = k if c is None else c * k
        return c

    def materialize(self) -> torch.Tensor:
        """The dense S, computed in the accumulation dtype and rounded once to D's dtype."""
        acc = accumulation_dtype(self.D)
        c = self.factor(acc)
        S = self.D.to(acc) if c is None else self.D.to(acc) * c
        return S.to(self.D.dtype)

    def divided(self, k: torch.Tensor) -> ScaledResidual:
        """S / k (k a 0-dim or 1-element tensor), still factored."""
        inv = 1.0 / k.reshape(1).float()
        return ScaledResidual(self.D, self.phi, self.axis, inv if self.inv_k is None else self.inv_k * inv)

    def add_to_(self, W: torch.Tensor, alpha: float) -> None:
        """``W += alpha · S`` in one pass (``addcmul_``), without writing S out."""
        c = self.factor(W.dtype)
        D = self.D if self.D.dtype == W.dtype else self.D.to(W.dtype)
        if c is None:
            W.add_(D, alpha=alpha)
        else:
            W.addcmul_(D, c, value=alpha)


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision tensors, the tensor's own dtype otherwise (float32 / float64)."""
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype


def adam_update_foreach(
    Rs: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    beta1: float,
    beta2: float,
    eps: float,
) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:  # torch 2.13's _foreach ops return tuples
    """:func:`adam_update` over lists of tensors with torch's multi-tensor ops (the batched ``foreach`` step):
    the same operations in the same order, so each tensor gets exactly the per-tensor result."""
    torch._foreach_lerp_(exp_avgs, Rs, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, Rs, Rs, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    return torch._foreach_div(exp_avgs, denom)


#: a step count at which torch's fused kernel's bias corrections are exactly 1 (β^t underflows to 0)
_NO_BIAS_CORRECTION = 1e30
_NO_BIAS_STEPS: dict[torch.device, torch.Tensor] = {}


def fused_adam_applies(R: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> bool:
    """Whether :func:`adam_update_fused` can run: torch's fused kernel reads its tensors as flat contiguous
    buffers of one floating dtype (a strided R would be read in the wrong order)."""
    return (
        R.dtype == exp_avg.dtype == exp_avg_sq.dtype
        and R.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
        and R.device.type in ("cpu", "cuda")
        and R.is_contiguous()
        and exp_avg.is_contiguous()
        and exp_avg_sq.is_contiguous()
        and R.shape == exp_avg.shape
    )


def adam_update_fused(
    Rs: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """:func:`adam_update` of each tensor in one pass over its memory: torch's fused Adam kernel
    (``torch._fused_adam_``) run on a zeroed buffer as its "parameter", with ``lr = -1`` and a step count
    at which both bias corrections are exactly 1, so the buffer receives ψ = m / (√v + eps) itself.

    The moments get :func:`adam_update`'s formulas (lerp, then ``β2·v + (1−β2)·R·R``, which the kernel may
    round once where the reference rounds twice); ψ is the reference's to within a few float roundings
    (< 4·eps·|ψ|, tests/test_fused_adam.py). ``adam_kernel="reference"`` keeps the reference's ops.
    Every tensor must pass :func:`fused_adam_applies`. ``out``: buffers shaped like the moments to write ψ
    into (overwritten; new ones when None).
    """
    if not Rs:
        return []
    device = Rs[0].device
    step = _NO_BIAS_STEPS.get(device)
    if step is None:
        step = _NO_BIAS_STEPS[device] = torch.tensor(_NO_BIAS_CORRECTION, dtype=torch.float32, device=device)
    if out is None:
        out = [torch.zeros_like(m) for m in exp_avgs]
    else:
        torch._foreach_zero_(out)
    torch._fused_adam_(
        out,
        list(Rs),
        list(exp_avgs),
        list(exp_avg_sqs),
        [],
        [step] * len(out),
        lr=-1.0,
        beta1=beta1,
        beta2=beta2,
        weight_decay=0.0,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )
    return out


def adam_update_fused_(
    Rs: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    beta1: float,
    beta2: float,
    eps: float,
) -> list[torch.Tensor]:
    """:func:`adam_update_fused` with ψ written over R itself: no buffer, and no pass to zero one.

    torch's fused AdamW kernel is run with R as both "parameter" and "gradient", ``lr = -1`` and
    ``weight_decay = -1``, so its decoupled decay multiplies the parameter by 1 − lr·wd = 0 before adding
    −lr·ψ: each element of R becomes 0·R + ψ = ψ, with the moments and ψ rounded exactly as in
    :func:`adam_update_fused` (the same kernel arithmetic; ±0 + ψ is exact). Where R is NaN or ±inf, ψ is NaN
    too (the moments take the non-finite value), so the result is ψ there as well. The kernel reads each
    element's gradient before it writes the parameter, which makes the aliasing safe; it is used on the CPU
    only (tests/test_fused_adam.py checks it against the buffered form bit for bit). Every R must be a tensor
    the caller owns (a fresh projection, not a gradient or a moment) and pass :func:`fused_adam_applies`.
    """
    if not Rs:
        return []
    device = Rs[0].device
    step = _NO_BIAS_STEPS.get(device)
    if step is None:
        step = _NO_BIAS_STEPS[device] = torch.tensor(_NO_BIAS_CORRECTION, dtype=torch.float32, device=device)
    Rs = list(Rs)
    torch._fused_adamw_(
        Rs,
        Rs,
        list(exp_avgs),
        list(exp_avg_sqs),
        [],
        [step] * len(Rs),
        lr=-1.0,
        beta1=beta1,
        beta2=beta2,
        weight_decay=-1.0,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )
    return Rs


def adam_update(
    R: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """Update the moments in place and return ψ = m / (sqrt(v) + eps), *without* bias correction.

    The bias correction is folded into the step size by the caller
    (``lr · sqrt(1 - β2^t) / (1 - β1^t)``), exactly as GaLore's reference does.
    """
    R = R.to(exp_avg.dtype)
    exp_avg.lerp_(R, 1.0 - beta1)  # = beta1 * m + (1 - beta1) * R, one pass
    exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    return torch.div(exp_avg, denom, out=denom)


def fira_scaled_residual(
    G: torch.Tensor,
    BR: torch.Tensor,
    psi: torch.Tensor,
    R: torch.Tensor,
    alpha: float,
    rank_axis: int,
) -> torch.Tensor:
    """Fira's norm-based scaling: ``S = (G - α·B(R)) · φ`` with φ = ‖ψ‖ / (‖R‖ + 1e-8) over the rank axis.

    ``rank_axis`` is 1 for a right projection (R is m x r: one factor per row of G) and 0 for a left
    projection (R is r x n: one factor per column). ψ is the un-bias-corrected Adam direction. The norms are
    overflow-safe (:func:`safe_norm`): after a gradient spike φ is small, never 0/0 or inf/inf.
    """
    phi = safe_norm(psi, rank_axis, keepdim=True) / (safe_norm(R, rank_axis, keepdim=True).to(psi.dtype) + 1e-8)
    S = G - alpha * BR.to(G.dtype)
    return S * phi.to(S.dtype)


def fira_residual_factors(
    G: torch.Tensor,
    R: torch.Tensor,
    psi: torch.Tensor,
    alpha: float,
    rank_axis: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fira's scaling factors φ and the norm ‖(G - α·B(R)) · φ‖, without materialising the residual.

    Valid for a basis whose back-projection B is an isometry with adjoint ``down`` (orthonormal P and
    R = down(G)). The norms of G, R and ψ along ``rank_axis`` (kept) are :func:`safe_norm` in the
    accumulation dtype of G; :func:`fira_factors_from_norms` does the rest. φ has G's shape with size 1
    along ``rank_axis``; both results are in :func:`accumulation_dtype`.
    """
    acc = accumulation_dtype(G)
    g_norm, r_norm, psi_norm = (safe_norm(x, rank_axis, keepdim=True, dtype=acc) for x in (G, R, psi))
    phi, weighted = fira_factors_from_norms(g_norm, r_norm, psi_norm, alpha)
    return phi, safe_norm(weighted)


def fira_factors_from_norms(
    g_norm: torch.Tensor,
    r_norm: torch.Tensor,
    psi_norm: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """φ = ‖ψ‖ / (‖R‖ + 1e-8) and the residual's norm per row (column) times φ, from the norms of G, R and ψ
    along the rank axis (the arguments are consumed: some are overwritten).

    Row by row (right projection; column by column for a left one) B(R)_i = R_i P, so
    ⟨G_i, B(R)_i⟩ = ‖R_i‖² = ‖B(R)_i‖² and::

        ‖G_i - α·B(R)_i‖² = ‖G_i‖² - (2α - α²)·‖R_i‖²

    The squares are taken of both norms divided by a power of two at most ‖G_i‖: the same bits as without
    the scaling, but no overflow when ‖G_i‖ exceeds ~1.8e19 in float32 (a gradient spike). The norm of the
    whole residual is the norm of the second result (:func:`fira_residual_factors`).
    """
    phi = psi_norm.div_(r_norm + 1e-8)
    s = power_of_two_scale(g_norm)
    residual_norm = g_norm.div_(s).square_().sub_(r_norm.div_(s).square_(), alpha=2.0 * alpha - alpha * alpha)
    residual_norm.clamp_(min=0.0).sqrt_().mul_(s)
    return phi, residual_norm.mul_(phi)


def safe_norm(
    x: torch.Tensor,
    dim: int | None = None,
    keepdim: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The Euclidean norm of ``x`` (along ``dim``, or of the whole tensor) in ``dtype`` (default
    :func:`accumulation_dtype`), finite whenever the norm itself is representable.

    ``torch.linalg.vector_norm`` sums squares, so in float32 one finite entry above ~1.8e19 (a gradient
    spike) makes it inf, and a ratio of two such norms NaN. Here the plain norm is kept wherever it is
    finite (the same bits as ``vector_norm``); where it overflowed it is recomputed from ``x`` divided by
    a power of two at most its largest magnitude (per slice along ``dim``). On the CPU the recomputation
    runs only when some norm overflowed (reading that flag costs nothing there); on other devices, and
    under ``torch.compile``, both are computed and selected on the device: no host synchronisation, but
    three more passes over ``x``. Entries so small that their squares underflow (below ~1e-19 in float32)
    count as in ``vector_norm``.
    """
    acc = dtype or accumulation_dtype(x)
    n = plain_norm(x, dim, keepdim, acc)
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isinf(n).any()):
        return n
    return torch.where(torch.isinf(n), scaled_norm(x, dim, keepdim, acc), n)


def plain_norm(x: torch.Tensor, dim: int | None, keepdim: bool, dtype: torch.dtype) -> torch.Tensor:
    """``vector_norm`` in ``dtype``: overflows with the squares (see :func:`safe_norm`).

    On CPU ``vector_norm`` along a strided dim is ~4x slower than squaring a copy and summing, so a strided
    dim takes the latter.
    """
    if dim is None or (x.is_contiguous() and dim in (-1, x.dim() - 1)):
        return torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim, dtype=dtype)
    return (x if x.dtype == dtype else x.to(dtype)).square().sum(dim, keepdim=keepdim).sqrt_()


def scaled_norm(x: torch.Tensor, dim: int | None, keepdim: bool, dtype: torch.dtype) -> torch.Tensor:
    """``s · ‖x / s‖`` with ``s`` the largest power of two at most max|x| of each slice: the scaled entries
    are below 2 in magnitude, so their squares cannot overflow. Inf and NaN entries give inf and NaN."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=dim, keepdim=True, dtype=dtype)  # max |x|, kept dims
    s = power_of_two_scale(amax)
    n = plain_norm(x / s.to(x.dtype), dim, keepdim, dtype)
    return n * (s if keepdim else s.reshape(()) if dim is None else s.squeeze(dim))


def axis_norms(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Norms of the rows (``axis=1``) or columns (``axis=0``) of a 2-D tensor, kept along ``axis``, in the
    accumulation dtype, overflow-safe: :func:`safe_norm` along ``axis`` (the Triton twin reads x once)."""
    return safe_norm(x, axis, keepdim=True)


def low_rank_norm(x: torch.Tensor) -> torch.Tensor:
    """The norm of a whole low-rank tensor (shaped like R), 0-dim, overflow-safe: :func:`safe_norm`.

    A separate operation from :func:`safe_norm` only for its layout: under FSDP2 R may be split by rows, by
    columns or replicated, unlike a full-size tensor (see :mod:`gradproj.kernels.protocol`)."""
    return safe_norm(x)


def norm_growth_divisor(norm: torch.Tensor, state: dict, key: str, gamma: float) -> torch.Tensor | None:
    """Fira's norm-growth limiter on a norm: the divisor k for this step, on the device (no host sync).

    With a previous norm N in ``state[key]``: k = max(‖S‖ / (N + 1e-8), γ) / γ and N ← ‖S‖ / k (the
    norm after limiting). Without one (the first step) N ← ‖S‖ and ``None`` is returned: never limited.

    ‖S‖ / k is stored as what it equals when the limiter acts, γ·(N + 1e-8), and as ‖S‖ when it does not,
    so a norm too large for the ratio (k = inf: S is scaled to 0 for this step) leaves a finite N rather
    than inf/inf = NaN, and the following steps are limited from there.
    """
    prev = state.get(key)
    if prev is None:
        state[key] = norm.detach().clone()
        return None
    bound = (prev + 1e-8) * gamma  # the largest norm allowed this step
    k = torch.clamp(norm / (prev + 1e-8), min=gamma) / gamma
    torch.where(k > 1.0, bound, norm, out=prev)
    return k


def limit_norm_growth_(S: torch.Tensor, state: dict, key: str, gamma: float) -> torch.Tensor:
    """The norm-growth limiter applied in place to ``S``: S ← S / k with k from :func:`norm_growth_divisor`."""
    k = norm_growth_divisor(safe_norm(S), state, key, gamma)
    if k is not None:
        S.div_(k.to(S.dtype))
    return S


def apply_weight_decay_(W: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay in full space, after the update: W -= lr · wd · W (the reference's form)."""
    if weight_decay != 0.0:
        W.add_(W, alpha=-lr * weight_decay)


def fira_residual(
    G: torch.Tensor,
    R: torch.Tensor,
    psi: torch.Tensor,
    projector,
    state: dict,
    alpha: float,
) -> torch.Tensor:
    """Fira's scaled residual for ``projector``: :func:`fira_scaled_residual` with ``B(R)`` computed here."""
    return fira_scaled_residual(G, projector.up(R, state), psi, R, alpha, projector.rank_axis())


def back_project(projector, U: torch.Tensor, state: dict, dtype: torch.dtype) -> torch.Tensor:
    """``B(U)``, with U cast to the weight's dtype first as the GEMM of :meth:`Projector.add_up_` does.

    The identity projector returns U itself (in its own dtype: nothing is gained by rounding it first).
    """
    if isinstance(projector, IdentityProjector):
        return U
    return projector.up(U.to(dtype), state)


def apply_update(
    W: torch.Tensor,
    projector,
    state: dict,
    U: torch.Tensor,
    S: torch.Tensor | ScaledResidual | None,
    step_size: float,
    scale: float,
    lr: float,
    weight_decay: float,
    seed: int | None = None,
    residual_step: float | None = None,
) -> None:
    """The weight update, in place: ``W -= step_size · scale · B(U) + s_res · S``, then ``W -= lr · wd · W``.

    The step sizes and ``lr`` are numbers, or 0-dim tensors (the compiled step passes tensors so that its graph
    does not depend on their values; U and S are then scaled before the GEMM and the adds).

    ``s_res`` is ``residual_step`` (FRUGAL's sign term moves by the plain lr), else ``step_size``. S may be
    dense or a :class:`ScaledResidual`. With ``seed=None`` the update is one GEMM into W (``addmm_``), one
    pass adding S and the decay, each rounded to W's dtype as it goes (round to nearest). With a seed
    (bfloat16 W only, see :func:`stochastic_round_to_bf16`) the same expression is evaluated in float32,
    in this order::

        w = float32(W);  w = w - step_size · (scale · float32(B(U)));  [w = w - s_res · float32(S)];  w = w - lr·wd · w

    and rounded to bfloat16 once, stochastically. The Triton epilogue evaluates the same expression.
    """
    s_res = step_size if residual_step is None else residual_step
    if isinstance(step_size, torch.Tensor):  # 0-dim tensors (compile=True: no guard on their values)
        projector.add_up_(W, U * (-step_size * scale), state, alpha=1.0)
        if S is not None:
            W.add_(((S.materialize() if isinstance(S, ScaledResidual) else S) * -s_res).to(W.dtype))
        if weight_decay != 0.0:
            W.add_(W * (-lr * weight_decay))
        return
    if seed is None:
        projector.add_up_(W, U, state, alpha=-step_size * scale)
        if isinstance(S, ScaledResidual):
            S.add_to_(W, -s_res)
        elif S is not None:
            W.add_(S.to(W.dtype), alpha=-s_res)
        apply_weight_decay_(W, lr, weight_decay)
        return
    if W.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding is defined for bfloat16 weights, not {W.dtype}")
    w = W.float()
    u = back_project(projector, U, state, W.dtype).float() * scale  # a new tensor: U is left as it is
    w.sub_(step_size * u)
    if S is not None:
        dense = (
            S.D.float() * S.factor(torch.float32)  # type: ignore[operator]  # Fira's S carries φ: never None
            if isinstance(S, ScaledResidual)
            else S.float()
        )
        w.sub_(s_res * dense)
    w.sub_(lr * weight_decay * w)
    W.copy_(stochastic_round_to_bf16(w, seed))


def apply_update_decay_in_gemm(
    W: torch.Tensor,
    projector,
    state: dict,
    U: torch.Tensor,
    step_size: float,
    scale: float,
    lr: float,
    weight_decay: float,
) -> bool:
    """:func:`apply_update` without residual or rounding seed, with the decay as the GEMM's beta: one ``addmm_``,
    ``W ← β·W + (−step_size·scale·β)·B(U)`` with β = 1 − lr·wd, one pass over W instead of two. Returns False
    (and changes nothing) where that form does not apply: no decay, or a back-projection other than one
    dense one-sided basis in W's dtype (a full or quantized basis, ``proj_dtype``, a projector's own add_up_).

    The same function as :func:`apply_update`, rounded differently (``adam_kernel="fused"``; the reference
    keeps the two passes): elementwise |Δ| ≤ (8u + 2γ_k)·(|W| + step_size·scale·(|P||U|)), u the unit roundoff
    of W's dtype and γ_k = k·u / (1 − k·u) for the rank k. Both forms equal (1 − lr·wd)·(W − a·B(U)),
    a = step_size·scale: the two-pass form rounds a·B(U), W − a·B(U), lr·wd·W₁ and W₁ − lr·wd·W₁ (four
    roundings, the third on a term lr·wd times smaller), the GEMM rounds β, a·β, β·W, the scaled product and
    their sum (five); each call sums B(U)'s k products in its own order (γ_k each). tests/test_fused_adam.py.
    """
    if weight_decay == 0.0:
        return False
    P = _gemm_basis(projector, state, W)
    if P is None:
        return False
    X = U if U.dtype == W.dtype else U.to(W.dtype)
    operands = (X, P) if projector.side == "right" else (P, X)
    if not decay_in_gemm_pays(W, *operands):
        return False
    beta = 1.0 - lr * weight_decay
    W.addmm_(*operands, beta=beta, alpha=-step_size * scale * beta)
    return True


#: (W's shape, the GEMM's inner size, dtype) -> whether ``addmm_`` with beta != 1 is faster than ``addmm_`` and
#: a separate decay pass on this CPU; measured once per process and shape (:func:`decay_in_gemm_pays`)
_DECAY_IN_GEMM: dict[tuple, bool] = {}
#: the folded form must be this much faster to be chosen (timing noise must not flip the choice)
DECAY_MARGIN = 0.95


def decay_in_gemm_pays(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether ``W.addmm_(A, B, beta=β)`` beats ``W.addmm_(A, B)`` followed by ``W.add_(W, alpha=β - 1)``.

    On the GPU the GEMM's epilogue scales W for free. On the CPU it depends on the BLAS and the shape: MKL
    on an Intel Xeon (AVX-512) ran beta != 1 about 10 % slower than beta = 1 for a 1376 x 512 weight, more
    than the separate pass costs, but came out ahead at 256 x 688. So the two forms are timed on a copy of
    W at the first update of each shape and dtype (three runs each, best of each) and the choice is cached
    for the process; like the left projection's layout (:func:`gradproj.projectors.base.left_layout`), two
    processes may choose differently and then differ by a few roundings (bounded in
    :func:`apply_update_decay_in_gemm`); the ranks of a distributed run all take rank 0's choice.
    """
    if W.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    key = (*W.shape, A.shape[1], W.dtype)
    pays = _DECAY_IN_GEMM.get(key)
    if pays is None:
        scratch = W.clone()
        best = {True: float("inf"), False: float("inf")}
        for _ in range(3):
            for folded in (True, False):
                start = time.perf_counter()
                if folded:  # a real GEMM (a BLAS may skip the product when alpha is 0) on the scratch copy
                    scratch.addmm_(A, B, beta=1.0 - 1e-4, alpha=1e-6)
                else:
                    scratch.addmm_(A, B, alpha=1e-6)
                    scratch.add_(scratch, alpha=-1e-4)
                best[folded] = min(best[folded], time.perf_counter() - start)
        pays = best[True] < DECAY_MARGIN * best[False]
        pays = _DECAY_IN_GEMM[key] = bool(agree_across_ranks(int(pays), W.device))  # replicas must round alike
    return pays


def decay_in_gemm_pays_for(p: torch.Tensor, projector) -> bool:
    """Whether :func:`apply_update_decay_in_gemm` can run for parameter ``p`` under ``projector`` (a dense
    one-sided basis in p's dtype, the default back-projection) and is the faster form for its shape
    (:func:`decay_in_gemm_pays`, timed here on stand-in operands of the step's shapes if not yet known)."""
    if type(projector).add_up_ is not Projector.add_up_ or projector.side not in ("left", "right"):
        return False
    group = getattr(projector, "group", None) or {}  # a subclass whose __init__ keeps no group: its defaults
    # an explicit low proj_dtype never folds; "auto" is checked per matrix at each update (_gemm_basis)
    if projector.gemm_dtype_for({}) not in (None, p.dtype) or group.get("basis_bits") is not None:
        return False
    m, n, r = projector.m, projector.n, projector.rank
    known = _DECAY_IN_GEMM.get((m, n, r, p.dtype))
    if known is not None and p.device.type == "cpu":
        return known
    # stand-ins shaped like the back-projection's operands (U and P, or P and U), no RNG draw
    A = torch.full((m, r), 0.5, dtype=p.dtype, device=p.device)
    B = torch.full((r, n), 0.5, dtype=p.dtype, device=p.device)
    return decay_in_gemm_pays(p.detach().reshape(m, n), A, B)


def _gemm_basis(projector, state: dict, W: torch.Tensor) -> torch.Tensor | None:
    """The dense one-sided basis that :meth:`Projector.add_up_` would multiply with in W's dtype, or None where
    the back-projection is anything else (a full or quantized basis, ``proj_dtype``, a projector's own add_up_)."""
    if type(projector).add_up_ is not Projector.add_up_ or projector.side not in ("left", "right"):
        return None
    if projector.gemm_dtype_for(state) not in (None, W.dtype):  # proj_dtype, or "auto"'s stored decision
        return None
    P = state.get("proj")
    return P if P is not None and P.dtype == W.dtype and W.dim() == 2 else None


def stochastic_round_to_bf16(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Round float32 ``x`` to bfloat16 stochastically: up (in magnitude) with probability equal to the
    fraction of a bfloat16 ulp that x lies above the value below it, so ``E[round(x)] = x``.

    Definition (shared with the Triton kernels): add a uniform random integer in [0, 2¹⁶) to the
    float32 bit pattern of x, then clear its low 16 bits. NaN stays NaN; values beyond the largest
    bfloat16 may round to ±inf. The random integers come from a ``torch.Generator`` seeded with
    ``seed`` on x's device (Triton draws them from Philox with the same seed: same distribution, not
    the same bits).
    """
    gen = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, device=x.device, dtype=torch.int32)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # -65536 == 0xFFFF0000 as int32
    rounded = bits.view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


def clip_by_norm(g: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """``g · min(1, max_norm / (‖g‖ + 1e-6))`` as a new tensor (``g`` itself when ``max_norm`` is None).

    The formula of ``torch.nn.utils.clip_grad_norm_`` applied to one tensor; the norm is taken in float32
    for half-precision tensors, and the coefficient stays on the device (no host synchronisation).
    """
    if max_norm is None:
        return g
    norm = torch.linalg.vector_norm(g, dtype=accumulation_dtype(g))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return g * coef.to(g.dtype)
