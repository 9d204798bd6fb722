"""The residual axis: FRUGAL against a reference written from its spec, the norm-growth limiters (Fira's and the
group option ``norm_growth_limit``) under a gradient spike, and Fira's factored path against its direct path."""

import math

import pytest
import torch
from torch import nn

import gradproj
from problems import TinyNet, clone_params, direct_svd_projector, matrix_problem, tiny_batch, tiny_loss, train
from reference_algorithms import ReferenceGaLore

SHAPES = [(48, 20), (20, 48), (33, 33)]
F64 = dict(rtol=1e-9, atol=1e-11)


class ReferenceFrugal:
    """FRUGAL (arXiv 2411.07837, docs/algorithms.md, FRUGAL) with GaLore's SVD subspace, written from the spec:

    R = project(G); Adam on R (moments reset whenever the subspace is recomputed after the first step);
    W -= s · α · B(ψ) + lr · sign(G − B(R)), s = lr · √(1−β2^τ)/(1−β1^τ) with τ the steps since the reset;
    W -= lr · wd · W.
    """

    def __init__(self, params, rank, gap, alpha, proj_type="std", betas=(0.9, 0.999), eps=1e-6, wd=0.0):
        self.params = list(params)
        self.g = ReferenceGaLore([], lr=0.0, rank=rank, gap=gap, alpha=alpha, proj_type=proj_type)
        self.gap, self.alpha, self.b1, self.b2, self.eps, self.wd = gap, alpha, betas[0], betas[1], eps, wd
        self.state = [dict(t=0, t0=0) for _ in self.params]

    @torch.no_grad()
    def step(self, lr):
        g = self.g
        for W, st in zip(self.params, self.state):
            G = W.grad
            side = g.side(W)
            if st["t"] % self.gap == 0:
                st["P"] = g.basis(G, side)
                if st["t"] > 0:  # a new subspace: FRUGAL starts Adam afresh
                    st.pop("m"), st.pop("v")
                    st["t0"] = st["t"]
            R = g.project(G, st["P"], side)
            if "m" not in st:
                st["m"], st["v"] = torch.zeros_like(R), torch.zeros_like(R)
            st["m"] = self.b1 * st["m"] + (1 - self.b1) * R
            st["v"] = self.b2 * st["v"] + (1 - self.b2) * R * R
            psi = st["m"] / (st["v"].sqrt() + self.eps)
            st["t"] += 1
            tau = st["t"] - st["t0"]
            s = lr * math.sqrt(1 - self.b2**tau) / (1 - self.b1**tau)
            W -= s * self.alpha * g.back(psi, st["P"], side) + lr * torch.sign(G - g.back(R, st["P"], side))
            W -= lr * self.wd * W


def lr_at(step):  # a schedule, so that lr and Adam's step size differ in more than the bias correction
    return 2e-2 * (0.5 + 0.5 * math.cos(math.pi * step / 30))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("proj_type", ["std", "left", "right", "full"])
def test_frugal_matches_reference_across_subspace_switches(proj_type, alpha):
    params, loss_fn = matrix_problem(SHAPES, seed=11, dtype=torch.float64)
    ref_params = clone_params(params)
    # the reference: exact SVD, every matrix switching subspace at t % T == 0
    ours = gradproj.FrugalAdamW([{"params": params, "rank": 6, "update_proj_gap": 7, "scale": alpha,
                                  "proj_type": proj_type}], lr=lr_at(0), weight_decay=0.05, projector="svd",
                                refresh_stagger=False)
    ref = ReferenceFrugal(ref_params, rank=6, gap=7, alpha=alpha, proj_type=proj_type, wd=0.05)
    for step in range(25):  # switches at t = 7, 14, 21
        for group in ours.param_groups:
            group["lr"] = lr_at(step)
        for ps in (params, ref_params):
            for p in ps:
                p.grad = None
            loss_fn(ps).backward()
        ours.step()
        ref.step(lr_at(step))
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_frugal_residual_option_on_galore_equals_preset():
    """``residual="frugal"`` + ``moments_on_refresh="reset"`` on any optimizer is the preset."""
    params, loss_fn = matrix_problem([(30, 12)], seed=12, dtype=torch.float64)
    other = clone_params(params)
    group = {"rank": 3, "update_proj_gap": 4, "scale": 1.0}
    a = gradproj.FrugalAdamW([{"params": params, **group}], lr=1e-2)
    b = gradproj.GaLoreAdamW([{"params": other, **group, "residual": "frugal", "moments_on_refresh": "reset"}], lr=1e-2)
    assert a.param_groups[0]["moments_on_refresh"] == "reset"
    for _ in range(10):
        for ps, opt in ((params, a), (other, b)):
            train(ps, opt, 1, loss_fn)
    assert torch.equal(params[0], other[0])


def test_frugal_state_is_galores_and_every_update_is_full_rank():
    torch.manual_seed(0)
    model_g, model_f = TinyNet(), TinyNet()
    galore = gradproj.GaLoreAdamW(gradproj.param_groups(model_g, rank=4), lr=1e-3)
    frugal = gradproj.FrugalAdamW(gradproj.param_groups(model_f, rank=4, scale=1.0), lr=1e-3)
    before = model_f.fc1.weight.detach().clone()
    for model, opt in ((model_g, galore), (model_f, frugal)):
        train(model, opt, 1)
    assert gradproj.optimizer_state_bytes(frugal) == gradproj.optimizer_state_bytes(galore)
    delta = (model_f.fc1.weight - before).double()
    assert torch.linalg.matrix_rank(delta) == min(delta.shape)  # rank 4 subspace + sign of the rest


# ------------------------------------------------------------------------------------------ the limiters
def spike_run(make_opt, steps=300, spike=10.0, shape=(24, 16)):
    """Constant gradient A for ``steps`` steps (Adam reaches its steady state with β2 = 0.99), then ``spike``·A.

    Returns the parameter, the optimizer and the list of applied updates W_{t-1} − W_t.
    """
    g = torch.Generator().manual_seed(3)
    A = torch.randn(shape, generator=g, dtype=torch.float64)
    W = nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
    opt = make_opt(W)
    deltas = []
    for t in range(steps + 1):
        W.grad = A * (spike if t == steps else 1.0)
        before = W.detach().clone()
        opt.step()
        deltas.append(before - W.detach())
    return W, opt, deltas


LR, BETAS = 1e-3, (0.9, 0.99)


def adam_step_size(t):  # the reference's folded bias correction, t = 1, 2, ...
    return LR * math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)


def direction_norms(deltas):
    return [float(d.norm()) / adam_step_size(t + 1) for t, d in enumerate(deltas)]


@pytest.mark.parametrize("gamma", [1.01, 1.1])
@pytest.mark.parametrize("projected", [True, False], ids=["galore", "unprojected"])
def test_norm_growth_limit_caps_a_spike_at_exactly_gamma(projected, gamma):
    group = {"rank": 4, "update_proj_gap": 1000, "scale": 0.5} if projected else {}

    def make(limit):
        return lambda W: gradproj.GaLoreAdamW([{"params": [W], **group}], lr=LR, betas=BETAS, norm_growth_limit=limit)

    _, opt, limited = spike_run(make(gamma))
    _, _, free = spike_run(make(None))
    lim, unl = direction_norms(limited), direction_norms(free)
    assert unl[-1] / unl[-2] > 1.3  # the spike would grow the update by ~1.35x
    # projected: the limiter measures ‖α·B(U)‖ as α‖U‖, exact to the float32 SVD basis' orthonormality
    assert math.isclose(lim[-1] / lim[-2], gamma, rel_tol=1e-6 if projected else 1e-9)
    # before the spike the limiter had long stopped acting: the same updates as without it
    torch.testing.assert_close(limited[-2], free[-2], **F64)
    assert "update_norm" in opt.state[opt.param_groups[0]["params"][0]]


@pytest.mark.parametrize("projector", ["svd", "svd_direct"], ids=["factored", "direct"])
def test_fira_limiter_caps_the_residual_spike_at_exactly_gamma(projector):
    """The applied residual S_t = ΔW_t / s_t − α·B(ψ_t) grows by exactly limiter_gamma at a ×10 spike."""
    alpha, gamma = 0.5, 1.01
    direct_svd_projector()

    def make(limit):
        return lambda W: gradproj.FiraAdamW([{"params": [W], "rank": 4, "update_proj_gap": 1000, "alpha": alpha,
                                              "limiter_gamma": limit, "projector": projector}], lr=LR, betas=BETAS)

    def run(limit):
        g = torch.Generator().manual_seed(3)
        A = torch.randn(24, 16, generator=g, dtype=torch.float64)
        W = nn.Parameter(torch.randn(24, 16, generator=g, dtype=torch.float64))
        opt = make(limit)(W)
        norms = []
        for t in range(301):
            W.grad = A * (10.0 if t == 300 else 1.0)
            before = W.detach().clone()
            opt.step()
            st = opt.state[W]
            psi = st["exp_avg"] / (st["exp_avg_sq"].sqrt() + 1e-6)
            S = (before - W.detach()) / adam_step_size(t + 1) - alpha * psi @ st["proj"]  # 24 x 16: right side
            norms.append(float(S.norm()))
        return norms, opt.state[W]

    lim, state = run(gamma)
    unl, _ = run(None)
    assert unl[-1] / unl[-2] > 1.3
    # the factored path takes ‖S‖ from row norms, exact to the float32 SVD basis' orthonormality
    tol = 1e-6 if projector == "svd" else 1e-9
    assert math.isclose(lim[-1] / lim[-2], gamma, rel_tol=tol)
    assert math.isclose(lim[-2], unl[-2], rel_tol=tol)  # inactive before the spike
    assert math.isclose(float(state["residual_norm"]), lim[-1], rel_tol=tol)


def test_huge_limit_never_acts_and_is_bit_identical():
    """k = max(ratio, γ)/γ is exactly 1 while the norm grows less than γ: a huge γ changes no bit."""
    model_a, model_b = TinyNet(), TinyNet()
    # adam_kernel="reference": with the limiter the unprojected tensors leave torch's fused AdamW kernel for the
    # per-parameter step, whose ψ may differ from that kernel's in the last bit
    a = gradproj.FiraAdamW(gradproj.param_groups(model_a, rank=4, update_proj_gap=3), lr=1e-2, adam_kernel="reference")
    b = gradproj.FiraAdamW(gradproj.param_groups(model_b, rank=4, update_proj_gap=3), lr=1e-2, norm_growth_limit=1e30,
                           adam_kernel="reference")
    for s in range(8):
        for model, opt in ((model_a, a), (model_b, b)):
            train(model, opt, 1, seed=s)
    for (name, x), y in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(x, y), name
    assert all("update_norm" in b.state[p] for p in model_b.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cls,limit", [(gradproj.FiraAdamW, None), (gradproj.FiraAdamW, 1.01),
                                       (gradproj.GaLoreAdamW, 1.01), (gradproj.FrugalAdamW, 1.01)])
def test_factored_path_equals_direct_path(cls, limit, dtype):
    """Orthonormal bases take the fast path (no materialised B(R), S, or update); it computes the same step."""
    params, loss_fn = matrix_problem(SHAPES, seed=13, dtype=dtype)
    other = clone_params(params)
    group = {"rank": 5, "update_proj_gap": 6, "scale": 0.25}
    fast = cls([{"params": params, **group, "projector": "svd"}], lr=1e-2, norm_growth_limit=limit)  # as direct's
    direct = cls([{"params": other, **group, "projector": direct_svd_projector()}], lr=1e-2, norm_growth_limit=limit)
    for _ in range(15):
        for ps, opt in ((params, fast), (other, direct)):
            train(ps, opt, 1, loss_fn)
    tol = dict(rtol=1e-4, atol=3e-5)  # the factored norms are exact to the float32 basis' orthonormality
    for a, b in zip(params, other):
        torch.testing.assert_close(a, b, **tol)


def test_half_precision_fira_takes_the_direct_path():
    """In bf16 the factored norm would be too coarse, so both projectors compute bit for bit the same step."""
    params, loss_fn = matrix_problem([(40, 24)], seed=14, dtype=torch.bfloat16)
    other = clone_params(params)
    group = {"rank": 4, "update_proj_gap": 5, "alpha": 1.0}
    fast = gradproj.FiraAdamW([{"params": params, **group, "projector": "svd"}], lr=1e-2)  # the basis of direct's
    direct = gradproj.FiraAdamW([{"params": other, **group, "projector": direct_svd_projector()}], lr=1e-2)
    for _ in range(6):
        for ps, opt in ((params, fast), (other, direct)):
            train(ps, opt, 1, loss_fn)
    assert torch.equal(params[0], other[0])


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad,error,message", [
    (0.5, ValueError, "norm_growth_limit = 0.5 must be >= 1"),
    (-1, ValueError, "norm_growth_limit = -1 must be >= 1"),
    ("1.01", TypeError, "norm_growth_limit = '1.01' must be a number"),
    (True, TypeError, "norm_growth_limit = True must be a number"),
])
@pytest.mark.parametrize("projected", [True, False])
def test_bad_norm_growth_limit_is_rejected(bad, error, message, projected):
    W = nn.Parameter(torch.randn(8, 8))
    group = {"rank": 2, "update_proj_gap": 5, "scale": 1.0} if projected else {}
    with pytest.raises(error, match=message) as info:
        gradproj.GaLoreAdamW([{"params": [W], **group, "norm_growth_limit": bad}])
    assert "param group 0" in str(info.value)
    with pytest.raises(error, match=message):
        gradproj.FrugalAdamW([W], norm_growth_limit=bad)


def test_bad_limit_set_between_steps_changes_nothing():
    W = nn.Parameter(torch.randn(8, 6))
    opt = gradproj.GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": 5, "scale": 1.0}], lr=1e-2,
                               norm_growth_limit=1.01)
    W.grad = torch.randn(8, 6)
    opt.step()
    before, norm = W.detach().clone(), opt.state[W]["update_norm"].clone()
    opt.param_groups[0]["norm_growth_limit"] = 0.9
    with pytest.raises(ValueError, match="norm_growth_limit = 0.9"):
        opt.step()
    assert torch.equal(W, before) and torch.equal(opt.state[W]["update_norm"], norm)
    assert opt.state[W]["step"] == 1


def test_bad_fira_limiter_gamma_and_unknown_residual():
    W = nn.Parameter(torch.randn(8, 8))
    group = {"params": [W], "rank": 2, "update_proj_gap": 5, "alpha": 1.0}
    with pytest.raises(ValueError, match="param group 0: limiter_gamma = 0.5 must be >= 1"):
        gradproj.FiraAdamW([{**group, "limiter_gamma": 0.5}])
    with pytest.raises(TypeError, match="param group 0: limiter_gamma = 'x' must be a number"):
        gradproj.FiraAdamW([{**group, "limiter_gamma": "x"}])
    with pytest.raises(ValueError, match="unknown residual 'signsgd'.*frugal"):
        gradproj.GaLoreAdamW([{"params": [W], "rank": 2, "update_proj_gap": 5, "scale": 1.0, "residual": "signsgd"}])


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [gradproj.FiraAdamW, gradproj.FrugalAdamW, gradproj.GaLoreAdamW])
def test_residuals_and_limiter_never_synchronise_with_the_host(cls):
    model = TinyNet().cuda()
    opt = cls(gradproj.param_groups(model, rank=4, update_proj_gap=100), lr=1e-3, norm_growth_limit=1.01)
    for s in range(2):  # the first step creates state; the second is the steady-state path
        opt.zero_grad()
        x, y = tiny_batch(s)
        tiny_loss(model, (x.cuda(), y.cuda())).backward()
        if s == 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
