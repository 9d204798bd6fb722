"""compile=True: the per-step math runs as torch.compile(fullgraph=True) graphs, equal to the eager step,
with no graph break and no recompile across steps, refreshes, moment resets and LR-scheduler changes.

Most tests use dynamo's ``aot_eager`` backend: graph capture, guards and recompiles are decided by dynamo
before any backend runs, so they are the same as under inductor, without minutes of C++ compilation on a
2-core CPU. One test runs inductor on a single small matrix (one graph)."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import gradproj
from distributed_utils import run_distributed
from problems import TinyNet, matrix_problem

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
    opt = cls(groups, lr=1e-2, weight_decay=0.1, compile=compile_)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # a new lr every step
    return params, loss_fn, opt, sched


def run(params, loss_fn, opt, sched, steps):
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss_fn(params).backward()
        opt.step()
        sched.step()


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

    def loss_fn(ps):
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
        gradproj.GaLoreAdamW(gradproj.param_groups(model), compile="yes")
    with pytest.raises(ValueError, match="fullgraph"):
        gradproj.GaLoreAdamW(gradproj.param_groups(model), compile={"fullgraph": False})

    from gradproj.inner import Adam

    class Other(Adam):
        name = "other"

    class OtherOpt(gradproj.GaLoreAdamW):
        inner_rule = Other

    with pytest.raises(ValueError, match="compile=True supports the inner rule"):
        OtherOpt(gradproj.param_groups(model), compile=True)
    OtherOpt(gradproj.param_groups(model))  # fine without compile


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

    def train(i, steps):
        for _ in range(steps):
            opts[i].zero_grad()
            ((models[i](x) - y) ** 2).mean().backward()
            opts[i].step()

    train(0, 2)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        train(0, 5)
    train(1, 7)
    assert graphs == 2 and counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p.full_tensor(), q.full_tensor(), **TOL)
    assert dist.get_world_size() == 2


def test_compiled_step_under_fsdp():
    """The compiled tail runs on the local rows of FSDP2 parameters, the limiter's all-reduce inside the graph."""
    run_distributed(_fsdp_body)
