"""FSDP2 (DTensor parameters sharded on dim 0): parity with one process, sharded state, distributed checkpoints.

TinyNet under FSDP2 on 2 ranks holds every kind of parameter: fc1.weight 40x16 (right projection: basis
replicated, moments split by rows), fc2.weight 16x40 (left projection: basis split by rows, moments by
columns), the embedding and the head (unprojected 2-D, uneven 12/11-row shards), biases and a norm.
Each rank trains on its half of every batch; the single-process reference on the whole batch.
"""

import pytest
import torch

import gradproj
from gradproj.distributed import estimate
from distributed_utils import rank_share, run_distributed
from optim_table import OPTIMIZERS
from problems import TinyNet, tiny_batch, tiny_loss, train

pytest.importorskip("torch.distributed.fsdp")

RANK, GAP, STEPS = 4, 3, 7  # refreshes at t = 0, 3, 6: two refreshes replace a basis with moments kept
WORLD = 2  # run_distributed's processes

# The parity test (test_fsdp_matches_one_process_across_refreshes) runs in float64, because a float32
# comparison across refreshes has no valid tolerance: the float32 gradient sums of the two runs differ in
# their last bits, and LAPACK's eigenvector / singular-vector signs are not continuous in the matrix, so some
# refresh flips a vector in one run only (on some CPUs: an AVX-512 Xeon here, not AVX2 EPYCs); with the
# moments kept that moves the weights by ~1e-2, as much as a real bug. In float64 the two runs' gradients
# differ by ~1e-16 relative, and the bases, which gradproj computes in float32 whatever the dtype (SVD of
# G.float(), eigh of the float32 Gram matrix), get bitwise the same input: a float32 element rounds
# differently only if it lies within that difference of a rounding boundary (measured: 2e-3 expected such
# elements over the 57600 basis inputs of the test, so about one CPU in 500 would meet one). What is left is
# float64 rounding carried through 7 Adam steps: measured <= 3.2e-15 of each tensor's largest entry (AVX-512
# and AVX2 alike). EXACT = 1e-10 of it leaves 3e4 for growth, yet fails on a float32 step in the path (an
# R all-reduced in float32: 2e-7) and by far on a missing all-reduce (of the Gram matrix: 0.1; of Fira's
# limiter norm: 2e-2).
EXACT = 1e-10
# fira_gram_reset compares two different float32 bases: eigh of the float32 Gram matrix against the SVD of
# G. Their vectors differ (Davis-Kahan, with backward errors ~u‖GᵀG‖ and ~u‖G‖, u = 6e-8) by up to
# ~u·σ₁²/min|σᵢ² − σⱼ²|: 1.4e-6 to 3.9e-6 at this test's three refreshes (measured 7e-7; the reset moments
# make their signs irrelevant). A step moves W by lr = 1e-2 times a direction built from the basis whose
# entries are O(1) (Adam-normalised; Fira's residual scaled by φ = ‖ψ‖/‖R‖ to the same order), so
# |ΔW| <~ 7 steps x 1e-2 x a few x 4e-6 ~ 1e-6 (measured 4.2e-7): atol 1e-5. A basis from an unreduced Gram
# matrix moves W by 2.5e-2.
GRAM_VS_SVD = dict(rtol=0.0, atol=1e-5)
# float32, no refresh (no basis is recomputed, so no sign choice): the one-process continuation of the
# sharded checkpoint over 2 steps against the sharded one. The gradient sums (whole batch vs two halves)
# differ by rounding, ~1e-7 relative; measured max |ΔW| 6e-8. A wrongly resharded state moves W by ~lr = 1e-2.
TOL = dict(rtol=1e-4, atol=2e-5)


def assert_float64_close(got, ref, what):
    """``got`` equals the float64 ``ref`` to EXACT times ref's largest magnitude (integer tensors: exactly)."""
    got, ref = got.detach(), ref.detach()
    if not ref.is_floating_point():
        assert torch.equal(got, ref), what
        return
    assert got.dtype == ref.dtype == torch.float64, (what, got.dtype, ref.dtype)
    torch.testing.assert_close(got, ref, rtol=0.0, atol=EXACT * float(ref.abs().max()), msg=lambda m: f"{what}: {m}")


def test_gram_basis_is_the_svd_basis_up_to_sign():
    """One process: the top eigenvectors of GᵀG are Vh[:r] of the SVD up to sign, for a decaying spectrum."""
    from gradproj.distributed.sharding import gram_top_eigenvectors

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(60, 20, generator=g))
    V, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    G = U @ torch.diag(torch.logspace(0, -3, 20)) @ V.T
    P = gram_top_eigenvectors(G.T @ G, 6)
    Vh = torch.linalg.svd(G, full_matrices=False).Vh[:6]
    signs = (P * Vh).sum(1).sign()
    torch.testing.assert_close(P, signs[:, None] * Vh, rtol=0, atol=1e-4)
    torch.testing.assert_close(P @ P.T, torch.eye(6), rtol=0, atol=1e-5)


def fsdp_model(dtype=torch.float32):
    from torch.distributed.fsdp import fully_shard

    model = TinyNet().to(dtype)
    fully_shard(model)
    return model


def make_opt(cls, model, group=None, **kwargs):
    # the cases test svd's sharded refresh paths (gram / gather) against a single process refreshing every
    # matrix at t % T == 0, unless a case sets another basis or stagger
    group = {"projector": "svd", "refresh_stagger": False, **(group or {})}
    groups = gradproj.param_groups(model, rank=RANK, update_proj_gap=GAP, scale=0.5, **group)
    return cls(groups, lr=1e-2, **kwargs)


def register_gram_reference():
    """A plain single-process projector that picks its right basis the way the sharded Gram path does: the
    top eigenvectors (torch.linalg.eigh) of GᵀG summed from the float32 Gram matrices of the row blocks the
    ranks hold (FSDP2 splits rows as torch.chunk does). For two ranks that sum is one float32 addition, which
    commutes, so the matrix is bitwise the all-reduced one whenever the float32 blocks are: eigh then returns
    the same vectors with the same signs. (Its signs are not a continuous function of the matrix: GᵀG formed
    in one product differs in the last bits and can flip a vector.) The left and full sides use the SVD, as
    that path does. Orthonormal like the sharded basis, so Fira takes the same (factored) path in both runs
    (the factored form equals the direct one only to the float32 accuracy of the basis)."""
    from gradproj.projectors import SVDProjector, register_projector

    class GramReference(SVDProjector):
        name = "gram_reference"

        def compute_basis(self, G, state, step):
            if self.side != "right":
                return super().compute_basis(G, state, step)
            A0, A1 = (B.float().T @ B.float() for B in G.chunk(WORLD))
            _, vecs = torch.linalg.eigh(A0 + A1)
            return {"proj": vecs[:, -self.rank:].flip(-1).T.to(G.dtype).contiguous()}

    register_projector(GramReference)


# The single-process projectors are orthonormal like the sharded ones, so Fira takes its factored path in both
# runs (tests/test_residual.py checks the factored form against the direct one).
CASES = [  # name, optimizer, projected-group keys, constructor options, single-process projector
    ("galore_gather", gradproj.GaLoreAdamW, {"sharded_refresh": "gather"}, {}, "svd"),
    ("fira_gather", gradproj.FiraAdamW, {"sharded_refresh": "gather"}, {}, "svd"),
    ("galore_full_wd", gradproj.GaLoreAdamW, {"proj_type": "full"}, {"weight_decay": 0.1}, "svd"),
    ("galore_gram", gradproj.GaLoreAdamW, {}, {}, "gram_reference"),
    # the refreshes spread over the gap: the ranks store and follow the single process's offsets
    ("galore_gram_stagger", gradproj.GaLoreAdamW, {"refresh_stagger": True}, {}, "gram_reference"),
    ("fira_gram", gradproj.FiraAdamW, {}, {}, "gram_reference"),
    # moments restarted at every refresh: Adam's sign-equivariance makes the Gram basis give the SVD's
    # trajectory (the weights, to the float32 accuracy of the two bases: GRAM_VS_SVD; bases and moments
    # may differ in the signs of basis vectors)
    ("fira_gram_reset", gradproj.FiraAdamW, {"moments_on_refresh": "reset"}, {}, "svd"),
]


def _parity_body(rank, world):
    assert world == WORLD
    register_gram_reference()
    for name, cls, group, kwargs, ref_projector in CASES:
        model = fsdp_model(torch.float64)
        opt = make_opt(cls, model, group, **kwargs)
        train(model, opt, STEPS, rank_share(tiny_loss))
        ref = TinyNet().double()
        ref_group = {k: v for k, v in group.items() if k != "sharded_refresh"}
        ref_opt = make_opt(cls, ref, {**ref_group, "projector": ref_projector}, **kwargs)
        train(ref, ref_opt, STEPS)
        for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
            if name.endswith("_reset"):
                torch.testing.assert_close(p.full_tensor(), q, **GRAM_VS_SVD, msg=lambda m: f"{name} {pname}: {m}")
                continue
            assert_float64_close(p.full_tensor(), q, f"{name} {pname}")
            for key, value in ref_opt.state[q].items():
                ours = opt.state[p][key]
                if torch.is_tensor(value):
                    assert_float64_close(ours.full_tensor(), value, f"{name} {pname} state {key}")
                else:
                    assert ours == value, (name, pname, key)
        assert gradproj.distributed.replicated_state_mismatches(opt) == [], name

    # every optimizer / basis of the generic table, on right projections (which any projector supports under
    # FSDP) with bases computed from the gathered gradient: the sharded run equals the single-process one
    for spec in OPTIMIZERS:
        if "rows" not in spec.cls.inner_rule.shardable:
            continue  # inner rules that cannot run on a block of rows are refused (same test as above)
        group = {**spec.group, "proj_type": "right", "sharded_refresh": "gather"}
        ref_group = group
        model, ref = fsdp_model(torch.float64), TinyNet().double()
        opt, ref_opt = (spec.cls(gradproj.param_groups(m, rank=RANK, update_proj_gap=GAP, scale=0.5, **g),
                                 lr=1e-2, **spec.kwargs) for m, g in ((model, group), (ref, ref_group)))
        train(model, opt, STEPS, rank_share(tiny_loss))
        train(ref, ref_opt, STEPS)
        for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
            assert_float64_close(p.full_tensor(), q, f"{spec.id} {pname}")
        assert gradproj.distributed.replicated_state_mismatches(opt) == [], spec.id


def test_fsdp_matches_one_process_across_refreshes():
    """GaLore, Fira and the two-sided projection with weight decay, sharded over 2 ranks: weights and every
    piece of state (moments, bases, limiter norms, step counts) equal the single-process run after 7 steps
    crossing two refreshes with the moments kept, in float64 (to EXACT; see there). ``sharded_refresh=
    "gather"`` runs the exact SVD; the default Gram path is compared with a single process taking the same
    eigenvector basis. Every row of the generic optimizer table (tests/optim_table.py: each basis, each
    optimizer) is compared on right projections."""
    run_distributed(_parity_body)


# ------------------------------------------------------------------ whole-matrix reductions, in float64
# The sharded forms of the kernel operations that reduce over the whole matrix (the norm_growth_limit
# limiter's norm, Fira's factored norms) against one process, in float64, so the bound can be tight.
# The runs differ only by rounding (bases from the gathered gradient: the same SVD), u = 2⁻⁵³:
# * gradients: one mean over 64 tokens against the average of two 32-token means; sums of at most 2⁷
#   terms, so within 2⁷·u of the sums of absolute values (Higham's γₙ bound);
# * norms combined over ranks (√(a² + b²) of the ranks' partial norms against one sum): a few u;
# * the bases are float64 SVDs (register_svd64: the "svd" projector decomposes in float32, so its bases are
#   float32-accurate, and a gradient entry that rounds to float32 differently in the two runs would move them
#   by ~1e-7). The SVD is backward stable: a basis vector moves by the gradient's perturbation times the
#   relative gap σ₁ / min_{i<=r} (σᵢ − σᵢ₊₁), at most ~100 (< 2⁷) at the refreshes of this problem, so 2¹⁴·u;
# * Adam's ψ = m / (√v + eps) and Fira's φ are ratios: relative errors pass through, not amplified;
# * 7 steps: each adds its own error to the propagated ones (lr = 1e-2 keeps the map near the identity): 2³.
# Everything compared has magnitude of order 1 (weights, moments, norms), so 2¹⁷·u ≈ 1.5e-11 absolute and
# relative; the float32 TOL above is 1e-4. A CPU with other SIMD widths sums in another order: still rounding.
U64 = 2.0**-53
TOL64 = dict(rtol=2**17 * U64, atol=2**17 * U64)


def register_svd64() -> tuple[str, str]:
    """Register (once) an exact SVD basis decomposed in float64, and its twin that does not declare itself
    orthonormal (so Fira and the limiter take their direct paths); return their names."""
    from gradproj.projectors import PROJECTORS, SVDProjector, register_projector

    if "svd64" not in PROJECTORS:
        class SVD64(SVDProjector):
            name = "svd64"

            def compute_basis(self, G, state, step):
                U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
                left, right = U[:, : self.rank].to(G.dtype), Vh[: self.rank].to(G.dtype)
                if self.side == "full":
                    return {"proj_left": left.contiguous(), "proj_right": right.contiguous()}
                return {"proj": (right if self.side == "right" else left).contiguous()}

        register_projector(SVD64)
        register_projector(type("SVD64Direct", (SVD64,), {"name": "svd64_direct", "orthonormal": False}))
    return "svd64", "svd64_direct"


def loss64(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)  # no cast to float32 (tiny_loss casts)


def batch_loss64(model, i):
    return loss64(model, tiny_batch(i))


def _reductions_body(rank, world):
    from torch.distributed.fsdp import fully_shard

    from gradproj.distributed.sharding import ShardedOps

    calls = {"fira_residual_factors": 0, "fira_residual": 0, "low_rank_norm": 0, "safe_norm": 0}
    for op in calls:  # count which sharded operations the step takes (this process is a forked child)
        def counted(self, *args, _op=op, _fn=getattr(ShardedOps, op), **kwargs):
            calls[_op] += 1
            return _fn(self, *args, **kwargs)
        setattr(ShardedOps, op, counted)

    svd64, direct = register_svd64()
    limit = {"norm_growth_limit": 1.01}
    # name, optimizer, projected-group keys, constructor options, the sharded operations that must have run
    # (fc1 is 40x16, fc2 16x40: "std" projects fc1 on the right (R split by rows) and fc2 on the left (R split
    # by columns); "full" keeps R replicated; the unprojected tensors' R is split by rows)
    cases = [
        ("limit_std", gradproj.GaLoreAdamW, {}, limit, {"low_rank_norm"}),
        ("limit_left", gradproj.GaLoreAdamW, {"proj_type": "left"}, limit, {"low_rank_norm"}),
        ("limit_full", gradproj.GaLoreAdamW, {"proj_type": "full"}, limit, {"low_rank_norm"}),
        ("limit_direct", gradproj.GaLoreAdamW, {"projector": direct}, limit, {"safe_norm"}),
        ("fira_std", gradproj.FiraAdamW, {}, {}, {"fira_residual_factors"}),
        ("fira_right", gradproj.FiraAdamW, {"proj_type": "right"}, {}, {"fira_residual_factors"}),
        ("fira_left", gradproj.FiraAdamW, {"proj_type": "left"}, {}, {"fira_residual_factors"}),
        ("fira_limited", gradproj.FiraAdamW, {}, limit, {"fira_residual_factors", "safe_norm"}),
        ("fira_direct_limited", gradproj.FiraAdamW, {"projector": direct}, limit, {"fira_residual", "safe_norm"}),
    ]
    cases = [(n, c, {"projector": svd64, **g}, k, e) for n, c, g, k, e in cases]
    for name, cls, group, kwargs, expected_calls in cases:
        for op in calls:
            calls[op] = 0
        model, ref = TinyNet().double(), TinyNet().double()
        fully_shard(model)
        opt, ref_opt = (cls(gradproj.param_groups(m, rank=RANK, update_proj_gap=GAP, scale=0.5, **group, **extra),
                            lr=1e-2, **kwargs)
                        for m, extra in ((model, {"sharded_refresh": "gather"}), (ref, {})))
        train(model, opt, STEPS, rank_share(loss64))
        train(ref, ref_opt, STEPS, batch_loss64)
        ran = {op for op, n in calls.items() if n}
        assert expected_calls <= ran, (name, calls)
        if "fira_residual_factors" in expected_calls:
            assert calls["fira_residual"] == 0, (name, calls)  # the factored path only: S never materialised
        for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.full_tensor(), q, **TOL64, msg=lambda m: f"{name} {pname}: {m}")
            assert set(opt.state[p]) == set(ref_opt.state[q]), (name, pname)
            for key, value in ref_opt.state[q].items():
                ours = opt.state[p][key]
                if torch.is_tensor(value):
                    torch.testing.assert_close(ours.full_tensor(), value, **TOL64,
                                               msg=lambda m: f"{name} {pname} state {key}: {m}")
                else:
                    assert ours == value, (name, pname, key)
        assert gradproj.distributed.replicated_state_mismatches(opt) == [], name


def test_fsdp_whole_matrix_reductions_match_one_process_in_float64():
    """norm_growth_limit (on right, left, two-sided and unprojected parameters, with its low-rank shortcut and
    with the dense direction of a basis not declared orthonormal) and Fira's factored path (right and
    column-split left projections, with and without norm_growth_limit on top) under FSDP2 on 2 ranks equal
    one process in float64 to a bound derived from the rounding (above): weights and every piece of state,
    the limiter norms replicated bit for bit. The factored path is checked to be the one that ran."""
    run_distributed(_reductions_body, timeout=300)


def _state_body(rank, world, ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import Replicate, Shard

    model = fsdp_model()
    opt = make_opt(gradproj.FiraAdamW, model)
    train(model, opt, 4, rank_share(tiny_loss))

    # --- layout of the state: DTensors placed as documented, with the expected local shapes
    st = {name: opt.state[p] for name, p in model.named_parameters()}
    rows = {"emb": (12, 11)[rank], "head": (12, 11)[rank], "fc1": 20, "fc2": 8}
    expected = {
        ("fc1.weight", "proj"): ((Replicate(),), (RANK, 16)),  # right: r x n basis on every rank
        ("fc1.weight", "exp_avg"): ((Shard(0),), (rows["fc1"], RANK)),  # R = G Pᵀ keeps G's rows
        ("fc1.weight", "exp_avg_sq"): ((Shard(0),), (rows["fc1"], RANK)),
        ("fc1.weight", "residual_norm"): ((Replicate(),), ()),
        ("fc2.weight", "proj"): ((Shard(0),), (rows["fc2"], RANK)),  # left: U's rows follow W's rows
        ("fc2.weight", "exp_avg"): ((Shard(1),), (RANK, 20)),  # R = Σ Pᵢᵀ Gᵢ, reduce-scattered by columns
        ("fc2.weight", "residual_norm"): ((Replicate(),), ()),
        ("emb.weight", "exp_avg"): ((Shard(0),), (rows["emb"], 16)),
        ("head.weight", "exp_avg_sq"): ((Shard(0),), (rows["head"], 16)),
        ("fc1.bias", "exp_avg"): ((Shard(0),), (20,)),
    }
    for (pname, key), (placements, local_shape) in expected.items():
        value = st[pname][key]
        assert tuple(value.placements) == placements, (pname, key, value.placements)
        assert tuple(value.to_local().shape) == local_shape, (pname, key, value.to_local().shape)
    assert st["fc1.weight"]["step"] == 4
    # the bytes this rank holds: the analytic count of the layout above (float32)
    b = gradproj.optimizer_state_bytes(opt)
    moments = 2 * 4 * (rows["fc1"] * RANK + RANK * 20 + rows["emb"] * 16 + rows["head"] * 16
                       + 20 + 8 + 8 + 8)  # fc1.bias, fc2.bias and the norm's two vectors, 16 rows each
    assert b["moments"] == moments, (b, moments)
    assert b["basis"] == 4 * (RANK * 16 + rows["fc2"] * RANK)
    tensors = [(tuple(p.shape), n in ("fc1.weight", "fc2.weight")) for n, p in model.named_parameters()]
    est = estimate.per_gpu_memory(tensors, "fira", "fsdp", world, rank=RANK, gpu=rank, weight_bytes=4,
                                  grad_bytes=4, state_bytes=4)
    assert est["optimizer_states"] == b["total"]
    assert est["weights"] == 4 * sum(p.to_local().numel() for p in model.parameters())

    # --- distributed checkpoint round trip: resume == uninterrupted, bit for bit
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=ckpt_dir)
    train(model, opt, 2, rank_share(tiny_loss), seed=4)
    two_steps = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(two_steps, f"{ckpt_dir}.after2.pt")
    train(model, opt, 2, rank_share(tiny_loss), seed=6)  # the refresh at t = 6
    expected_weights = {n: p.full_tensor() for n, p in model.named_parameters()}

    model2 = fsdp_model()
    opt2 = make_opt(gradproj.FiraAdamW, model2)
    state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    assert opt2.state[dict(model2.named_parameters())["fc1.weight"]]["step"] == 4
    train(model2, opt2, 4, rank_share(tiny_loss), seed=4)
    for n, p in model2.named_parameters():
        assert torch.equal(p.full_tensor(), expected_weights[n]), n


def test_fsdp_state_is_sharded_and_round_trips_through_dcp(tmp_path):
    """Moments of right projections and unprojected tensors are Shard(0) DTensors with the parameter's local
    rows, bases of left projections too; the rest is replicated; the bytes per rank are the analytic count.
    get/set_optimizer_state_dict + torch.distributed.checkpoint save and load it, and the resumed run equals
    the uninterrupted one bit for bit (across a refresh). The same checkpoint resumes in one process without
    FSDP (DCP gathers the shards), matching the sharded continuation to float tolerance."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    ckpt = str(tmp_path / "ckpt")
    run_distributed(_state_body, ckpt)

    model = TinyNet(seed=1)
    opt = make_opt(gradproj.FiraAdamW, model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert opt.state[model.fc2.weight]["exp_avg"].shape == (RANK, 40)  # the two column blocks, joined
    train(model, opt, 2, seed=4)  # before the next refresh: the Gram path's basis is still the loaded one
    expected = torch.load(f"{ckpt}.after2.pt", weights_only=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, expected[n], **TOL, msg=lambda m: f"{n}: {m}")


def _errors_body(rank, world):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from gradproj.inner import Adam

    # a parameter sharded on dim 1 (tensor parallelism's layout) is refused with a clear message
    mesh = fsdp_model().fc1.weight.device_mesh
    w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, [Shard(1)]))
    opt = gradproj.GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 2, "scale": 1.0}])
    w.grad = distribute_tensor(torch.randn(8, 6), mesh, [Shard(1)])
    with pytest.raises(ValueError, match=r"param group 0, parameter 0 .*Shard\(0\)"):
        opt.step()

    # an inner rule that cannot run on a block of R refuses row-split R; a left projection falls back to a
    # replicated R (all-reduced) for it
    class Coupled(Adam):
        shardable = ()

    class CoupledOpt(gradproj.GaLoreAdamW):
        inner_rule = Coupled

    model = fsdp_model()
    before = model.fc2.weight.full_tensor()
    groups = [{"params": [model.fc1.weight], "rank": 2, "update_proj_gap": 2, "scale": 1.0},
              {"params": [model.fc2.weight], "rank": 2, "update_proj_gap": 2, "scale": 1.0}]
    opt = CoupledOpt(groups)
    tiny_loss(model, tiny_batch(0)).backward()
    with pytest.raises(ValueError, match="cannot run on a block of rows"):
        opt.step()
    assert torch.equal(model.fc2.weight.full_tensor(), before)  # nothing was updated
    opt.param_groups[0]["proj_type"] = "left"  # fc1 now projected on the left too: R replicated, allowed
    opt.step()
    assert not torch.equal(model.fc2.weight.full_tensor(), before)
    moment = opt.state[model.fc2.weight]["exp_avg"]
    assert tuple(moment.placements) == (Replicate(),) and moment.to_local().shape == (2, 40)

    # a bad sharded_refresh (an option of the svd basis) is refused by the group validation
    with pytest.raises(ValueError, match="sharded_refresh"):
        gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=2, projector="svd", sharded_refresh="allgather"))


def test_fsdp_refuses_layouts_and_rules_it_cannot_shard():
    run_distributed(_errors_body)
