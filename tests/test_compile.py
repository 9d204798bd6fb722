"""compile=True: the per-step math runs as torch.compile(fullgraph=True) graphs, equal to the eager step,
with no graph break and no recompile across steps, refreshes, moment resets and LR-scheduler changes.

Most tests use dynamo's ``aot_eager`` backend: graph capture, guards and recompiles are decided by dynamo
before any backend runs, so they are the same as under inductor, without minutes of C++ compilation on a
2-core CPU. One test runs inductor on a single small matrix (one graph)."""

import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import gradproj
from gradproj.inner import StepContext
from gradproj.optimizers import compiled
from gradproj.optimizers.compiled import CompileFallbackWarning
from distributed_utils import run_distributed
from problems import TinyNet, matrix_problem, train

AOT = {"backend": "aot_eager"}
# float32: the compiled tail scales the low-rank ψ before the back-projection GEMM where the eager step passes
# the scale as the GEMM's alpha; rounding differences of ~1e-7 in the weights, which the next SVD turns into
# ~3e-6 in a basis vector and Adam's normalisation may amplify slightly in the moments
TOL = dict(rtol=1e-5, atol=2e-6)
STATE_TOL = dict(rtol=1e-4, atol=2e-5)


def problem(compile_, cls, moments="keep"):
    """A right- (24x10) and a left-projected (10x24) matrix, and an unprojected one: three graphs."""
    params, loss_fn = matrix_problem([(24, 10), (10, 24), (12, 7)], seed=0)
    groups = [{"params": params[:2], "rank": 3, "update_proj_gap": 3, "scale": 0.5, "moments_on_refresh": moments},
              {"params": params[2:]}]
    # TOL is derived for the SVD's bases, and the comments count refreshes at t % 3 == 0 (no stagger)
    opt = cls(groups, lr=1e-2, weight_decay=0.1, compile=compile_, projector="svd", refresh_stagger=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # a new lr every step
    return params, loss_fn, opt, sched


def run(params, loss_fn, opt, sched, steps):
    train(params, opt, steps, loss_fn, scheduler=sched)


@pytest.mark.parametrize("cls,moments", [(gradproj.GaLoreAdamW, "reset"), (gradproj.FiraAdamW, "keep")],
                         ids=["galore-reset", "fira-keep"])
def test_compiled_step_equals_eager_without_breaks_or_recompiles(cls, moments):
    torch._dynamo.reset()
    counters.clear()
    compiled, eager = problem(AOT, cls, moments), problem(False, cls, moments)
    run(*compiled, 2)  # step 1 creates the state eagerly; step 2 compiles one graph per shape / layout
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3, graphs
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile now raises
        run(*compiled, 7)  # refreshes at t = 3, 6 (with "reset", the step after each runs eagerly)
    run(*eager, 9)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]
    for p, q in zip(compiled[0], eager[0]):
        torch.testing.assert_close(p, q, **TOL)
        for key, value in eager[2].state[q].items():
            ours = compiled[2].state[p][key]
            if torch.is_tensor(value):
                torch.testing.assert_close(ours, value, **STATE_TOL, msg=lambda m: f"{key}: {m}")
            else:
                assert ours == value, key


def test_compiled_run_resumes_bit_for_bit():
    """A compiled run checkpointed (weights-only load) and resumed by a fresh compiled optimizer equals the
    uninterrupted compiled run exactly."""
    import io

    params, loss_fn, opt, sched = problem(AOT, gradproj.FiraAdamW)
    run(params, loss_fn, opt, sched, 4)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    run(params, loss_fn, opt, sched, 4)  # crosses the refresh at t = 6

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    params2, loss_fn2, opt2, sched2 = problem(AOT, gradproj.FiraAdamW)
    with torch.no_grad():
        for p, saved in zip(params2, ckpt["params"]):
            p.copy_(saved)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    run(params2, loss_fn2, opt2, sched2, 4)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_step_with_inductor(device):
    """The default backend (inductor: C++ on CPU, Triton on CUDA): a right-projected matrix with Fira, one graph."""
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(48, 10, generator=g) * torch.logspace(0, -2, 10)).to(device)  # decaying spectrum
    Y = torch.randn(48, 24, generator=g).to(device)
    W0 = (torch.randn(24, 10, generator=g) / 10**0.5).to(device)
    params, ref_params = [torch.nn.Parameter(W0.clone())], [torch.nn.Parameter(W0.clone())]

    def loss_fn(ps, index=None):
        return ((torch.tanh(X @ ps[0].T) - Y) ** 2).mean()

    group = {"rank": 3, "update_proj_gap": 4, "scale": 0.5}
    opt = gradproj.FiraAdamW([{"params": params, **group}], lr=1e-2, weight_decay=0.05, compile=True)
    ref = gradproj.FiraAdamW([{"params": ref_params, **group}], lr=1e-2, weight_decay=0.05)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.9) for o in (opt, ref)]
    run(params, loss_fn, opt, scheds[0], 2)  # creates the state, then compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(params, loss_fn, opt, scheds[0], 7)  # refreshes at t = 4, 8
    run(ref_params, loss_fn, ref, scheds[1], 9)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert counters["inductor"]  # it did go through inductor
    torch.testing.assert_close(params[0], ref_params[0], **TOL)


def test_compile_option_is_validated():
    model = TinyNet()
    with pytest.raises(ValueError, match="compile = 'yes'"):
        gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4), compile="yes")
    with pytest.raises(ValueError, match="fullgraph"):
        gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4), compile={"fullgraph": False})
    with pytest.raises(ValueError, match="takes no argument 'dynamc'"):  # not a silent fallback at the first step
        gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=4), compile={"dynamc": True})

    from gradproj.inner import Adam

    class Other(Adam):
        name = "other"

    class OtherOpt(gradproj.GaLoreAdamW):
        inner_rule = Other

    with pytest.raises(ValueError, match="compile=True supports the inner rule"):
        OtherOpt(gradproj.param_groups(model, rank=4), compile=True)
    OtherOpt(gradproj.param_groups(model, rank=4))  # fine without compile


def _fsdp_body(rank, world):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    models, opts = [], []
    for compile_ in (AOT, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 40, bias=False), torch.nn.Tanh(),
                                    torch.nn.Linear(40, 16, bias=False))  # right- and left-projected
        fully_shard(model)
        models.append(model)
        opts.append(gradproj.FiraAdamW(gradproj.param_groups(model, rank=4, update_proj_gap=3), lr=1e-2,
                                       compile=compile_))  # Fira: the limiter's all-reduce is in the graph

    def loss(model, _):
        return ((model(x) - y) ** 2).mean()

    train(models[0], opts[0], 2, loss)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        train(models[0], opts[0], 5, loss)
    train(models[1], opts[1], 7, loss)
    assert graphs == 2 and counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p.full_tensor(), q.full_tensor(), **TOL)
    assert dist.get_world_size() == 2


def test_compiled_step_under_fsdp():
    """The compiled tail runs on the local rows of FSDP2 parameters, the limiter's all-reduce inside the graph."""
    run_distributed(_fsdp_body)


# --------------------------------------------------------------------------------- recompiles and fallback
WIDTHS = [8 + 2 * i for i in range(11)]  # 10 Linear layers, every one of a different shape


def mlp(compile_, cls=gradproj.GaLoreAdamW, widths=WIDTHS, seed=0):
    """Linear layers of the given widths (rank 4, refresh every 2 steps), weights and biases in two groups, and
    the squared error on a fixed batch (a loss for problems.train)."""
    torch.manual_seed(seed)
    layers = [m for a, b in zip(widths, widths[1:]) for m in (torch.nn.Linear(a, b), torch.nn.Tanh())]
    model = torch.nn.Sequential(*layers[:-1])
    opt = cls(gradproj.param_groups(model, rank=4, update_proj_gap=2), lr=1e-2, weight_decay=0.1, compile=compile_)
    g = torch.Generator().manual_seed(seed + 100)
    x, y = torch.randn(16, widths[0], generator=g), torch.randn(16, widths[-1], generator=g)
    return model, opt, lambda m, _: ((m(x) - y) ** 2).mean()


def assert_matches_eager(ours, eager, steps):
    """Weights and moments of a compiled run against the eager run. The compiled tail scales ψ before the
    back-projection GEMM and its kernels may fuse (hence round) differently: each step changes a weight by a few
    float32 roundings of the update (unit roundoff 6e-8), and the next step's gradient and SVD basis inherit the
    difference, so the weights may drift apart by a few ulps per step: rtol = 2e-6 per step (measured on CPU:
    1.7e-6 after 3 steps with aot_eager, 2.5e-6 with inductor), atol for weights near zero ~ the rounding of an
    lr-sized (1e-2) update. The moments are compared relative to their largest entry."""
    (model, opt), (ref_model, ref_opt) = ours, eager
    rtol = 2e-6 * steps
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-8 * steps)
        for key in ("exp_avg", "exp_avg_sq"):
            u, v = opt.state[p][key], ref_opt.state[q][key]
            torch.testing.assert_close(u, v, rtol=rtol, atol=rtol * v.abs().max().item(), msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("compile_", [
    AOT,
    {"dynamic": True, **AOT},
    pytest.param(True, marks=pytest.mark.slow),
    pytest.param({"dynamic": True}, marks=pytest.mark.slow),
], ids=["aot_eager", "aot_eager-dynamic", "inductor", "inductor-dynamic"])
def test_distinct_width_mlp_compiles_without_fallback(compile_):
    """10 layers of distinct widths: once hit the recompile limit at step 2 (one graph per shape, the weight's sizes
    kept static as a Parameter's), now two graphs per layout (the first shape, then a shape-generic one; one with
    dynamic=True), no fallback, and equal to eager."""
    torch._dynamo.reset()
    counters.clear()
    steps = 3
    model, opt, loss = mlp(compile_)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # a fallback fails the test
        train(model, opt, 2, loss)  # state created eagerly; every graph compiled
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == (2 if isinstance(compile_, dict) and compile_.get("dynamic") else 4), graphs
        with torch._dynamo.config.patch(error_on_recompile=True):
            train(model, opt, steps - 2, loss)  # a refresh (t = 2), then the compiled step: no recompile
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    ref_model, ref_opt, ref_loss = mlp(False)
    train(ref_model, ref_opt, steps, ref_loss)
    assert_matches_eager((model, opt), (ref_model, ref_opt), steps)


def test_two_compiled_optimizers_in_one_process():
    """Each optimizer compiles its own graphs: two of them, stepped in turn, never evict or exhaust each other's,
    even with dynamo's recompile limit at 2 (the old module-wide compiled function needed 4 graphs per model)."""
    torch._dynamo.reset()
    counters.clear()
    runs = [mlp(AOT, seed=0), mlp(AOT, gradproj.FiraAdamW, widths=WIDTHS[::-1], seed=1)]  # left projections
    refs = [mlp(False, seed=0), mlp(False, gradproj.FiraAdamW, widths=WIDTHS[::-1], seed=1)]
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        for _ in range(3):
            for model, opt, loss in runs:
                train(model, opt, 1, loss)
    for (model, opt, _), (ref_model, ref_opt, ref_loss) in zip(runs, refs):
        train(ref_model, ref_opt, 3, ref_loss)
        assert_matches_eager((model, opt), (ref_model, ref_opt), 3)
    # at most 2 per layout and model; fewer when the second optimizer starts from the sizes dynamo learnt were
    # dynamic (automatic dynamic shapes remember them per function, across optimizers)
    assert counters["stats"]["unique_graphs"] <= 8


def independent_problem(compile_, params=None, **group):
    """Matrices with a loss term each: a parameter's trajectory does not depend on how the others were stepped,
    so a parameter stepped eagerly can be compared bit for bit with a purely eager run."""
    fresh, loss_fn = matrix_problem([(24, 10), (20, 12), (10, 24), (12, 7)], seed=0)
    params = fresh if params is None else params
    groups = [{"params": params[:3], "rank": 3, "update_proj_gap": 3, "scale": 0.5, **group}, {"params": params[3:]}]
    return params, loss_fn, gradproj.FiraAdamW(groups, lr=1e-2, weight_decay=0.1, compile=compile_)


def assert_bitwise_equal(params, opt, ref_params, ref_opt):
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value) if torch.is_tensor(value) else opt.state[p][key] == value, key


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """Every compiled call raises what dynamo raises: one warning, then the eager step, bit for bit."""

    def broken(options):
        def fn(*args):
            raise torch._dynamo.exc.InternalTorchDynamoError("forced failure")
        return fn

    monkeypatch.setattr(compiled, "_compile", broken)
    params, loss_fn, opt = independent_problem(AOT)
    ref_params, ref_loss_fn, ref = independent_problem(False)
    with pytest.warns(CompileFallbackWarning, match="falls back to eager.*InternalTorchDynamoError: forced") as rec:
        train(params, opt, 5, loss_fn)  # crosses the refresh at t = 3
    assert len([w for w in rec if w.category is CompileFallbackWarning]) == 1  # one cause, one warning
    train(ref_params, ref, 5, ref_loss_fn)
    assert_bitwise_equal(params, opt, ref_params, ref)


def test_unknown_backend_falls_back_to_eager():
    params, loss_fn, opt = independent_problem({"backend": "no-such-backend"})
    ref_params, ref_loss_fn, ref = independent_problem(False)
    with pytest.warns(CompileFallbackWarning, match="InvalidBackend"):
        train(params, opt, 2, loss_fn)
    train(ref_params, ref, 2, ref_loss_fn)
    assert_bitwise_equal(params, opt, ref_params, ref)


def test_failure_at_a_graphs_first_run_leaves_nothing_half_applied():
    """A backend whose graph writes the weight and the moments, then fails (as a kernel compiled lazily at its first
    launch could): the first run of a new graph works on copies, so the eager step starts from untouched tensors."""

    def fails_after_writing(gm, example_inputs):
        def run(*args):
            gm(*args)  # dynamo's graph, with the in-place updates of W and the moments
            raise RuntimeError("kernel failed at its first launch")
        return run

    params, loss_fn, opt = independent_problem({"backend": fails_after_writing})
    ref_params, ref_loss_fn, ref = independent_problem(False)
    with pytest.warns(CompileFallbackWarning, match="kernel failed at its first launch"):
        train(params, opt, 3, loss_fn)
    train(ref_params, ref, 3, ref_loss_fn)
    assert_bitwise_equal(params, opt, ref_params, ref)


def tail_arguments(shape=(6,)):
    """The arguments of the compiled tail for one unprojected parameter, after its first (eager) step."""
    p = torch.nn.Parameter(torch.randn(shape))
    opt = gradproj.GaLoreAdamW([p], lr=1e-2, weight_decay=0.1)
    p.grad = torch.randn(shape)
    opt.step()
    group, state = opt.param_groups[0], opt.state[p]
    plan = opt.engine.plan(p, group)
    ctx = StepContext(step=2, ops=plan.ops, state_dtype=p.dtype, param=p, scale=1.0)
    scalars = [torch.tensor(v) for v in (1e-2, 1e-2, 1e-2)]
    return p.detach(), (p.grad, p.grad, state, *scalars, plan.projector, plan.residual, group, ctx, 0.9, 0.999, 1e-6,
                        0.1)


def test_compile_errors_are_raised_before_the_graph_runs():
    """What the fallback of a graph that already ran relies on: a failing backend and the recompile limit raise
    before anything is written (the version counters of the weight and the moments are unchanged)."""

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler")

    W, args = tail_arguments()
    state = args[2]
    before = [t.clone() for t in (W, state["exp_avg"], state["exp_avg_sq"])]
    versions = [t._version for t in (W, state["exp_avg"], state["exp_avg_sq"])]
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
        compiled._compile({"backend": failing_backend})(W, *args)

    fn = compiled._compile({**AOT, "dynamic": False})
    W2, args2 = tail_arguments((5,))
    fn(W2, *args2)  # one graph
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(Exception) as err:
        fn(W, *args)  # a second shape: over the limit
    assert compiled._is_recompile_limit(err.value) and compiled._is_compile_error(err.value)
    for t, saved, version in zip((W, state["exp_avg"], state["exp_avg_sq"]), before, versions):
        assert torch.equal(t, saved) and t._version == version


def test_recompile_limit_falls_back_for_that_shape_only():
    """With static shapes and room for one graph per layout, the first matrix of each layout compiles and the
    others step eagerly, bit for bit, after one warning that says what to do."""
    torch._dynamo.reset()
    params, loss_fn, opt = independent_problem({**AOT, "dynamic": False}, projector="svd")
    ref_params, ref_loss_fn, ref = independent_problem(False, projector="svd")
    with torch._dynamo.config.patch(recompile_limit=1), \
            pytest.warns(CompileFallbackWarning, match=r"recompile limit.*compile=\{'dynamic': True\}") as rec:
        train(params, opt, 4, loss_fn)
    assert len([w for w in rec if w.category is CompileFallbackWarning]) == 1
    train(ref_params, ref, 4, ref_loss_fn)
    # (24, 10) and (20, 12) share a layout (right projections): the second falls back; the left-projected
    # (10, 24) and the unprojected (12, 7) are alone in theirs and compile
    assert_bitwise_equal(params[1:2], opt, ref_params[1:2], ref)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **TOL)


def test_failure_of_a_graph_that_ran_before():
    """Graphs that already ran must recompile when an option they read changes (here eps); with no room left for
    another graph the step falls back to eager, bit for bit, from weights and state that the failed call left
    untouched."""
    torch._dynamo.reset()
    params, loss_fn, opt = independent_problem({**AOT, "dynamic": False})
    train(params, opt, 2, loss_fn)  # the second step compiles and runs every graph
    snapshot = ([p.detach().clone() for p in params], {p: {k: v.clone() if torch.is_tensor(v) else v
                                                         for k, v in opt.state[p].items()} for p in params})
    ref_params = [torch.nn.Parameter(w) for w in snapshot[0]]
    _, _, ref = independent_problem(False, params=ref_params)
    for p, q in zip(params, ref_params):
        ref.state[q] = snapshot[1][p]
    for o in (opt, ref):
        for group in o.param_groups:
            group["eps"] = 1e-7
    with torch._dynamo.config.patch(recompile_limit=1), \
            pytest.warns(CompileFallbackWarning, match="recompile limit"):
        train(params, opt, 1, loss_fn)
    regions = compiled._BOOKS[opt.engine].regions.values()
    assert all(region.eager and region.eager <= region.ran for region in regions)  # failed where they had run
    train(ref_params, ref, 1, loss_fn)
    assert_bitwise_equal(params, opt, ref_params, ref)


def test_errors_after_a_graph_started_writing_are_raised():
    """An error of a graph that already ran (out of memory, say) is raised as the eager step would raise it; a
    compiler error after the graph wrote (impossible for dynamo, forced here) is raised too, not papered over."""
    params, loss_fn = matrix_problem([(12, 7)], seed=0)
    opt = gradproj.GaLoreAdamW(params, lr=1e-2, compile=AOT)
    train(params, opt, 2, loss_fn)
    (region,) = compiled._BOOKS[opt.engine].regions.values()

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("out of memory")

    region.fn = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        train(params, opt, 1, loss_fn)

    def writes_then_fails(W, G, R, state, *rest):
        state["exp_avg"].mul_(0.5)
        raise torch._dynamo.exc.InternalTorchDynamoError("failed after writing")

    region.fn = writes_then_fails
    with pytest.raises(RuntimeError, match="cannot fall back to eager"):
        train(params, opt, 1, loss_fn)
