"""``gradproj compare``'s protocol: each optimizer at its best lr of a grid, one embeddings/head lr for all,
several seeds with their spread, a subspace refresh inside the run, every spec validated before training."""

import csv
import json
import math

import pytest
import torch

from gradproj.train import compare as compare_mod
from gradproj.train.cli import main
from gradproj.train.compare import compare, lr_grid_values, validate_specs
from gradproj.train.loop import RunResult, TrainConfig
from gradproj.train.models import build_model
from gradproj.train.optimizers import OptimizerChoice, build_optimizer

TINY = ["--model", "tiny", "--batch", "2", "--seq", "32", "--max-bytes", "200000", "--eval-every", "2",
        "--eval-batches", "2", "--rank", "8", "--quiet"]


def test_lr_grid_is_the_1_3_10_ladder_around_the_default():
    assert lr_grid_values(1e-2, 3) == [3e-3, 1e-2, 3e-2]
    assert lr_grid_values(1e-3, 1) == [1e-3]
    assert lr_grid_values(1e-3, 2) == [1e-3, 3e-3]
    assert lr_grid_values(1e-3, 5) == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert lr_grid_values(3e-3, 3) == [1e-3, 3e-3, 1e-2]
    assert lr_grid_values(2e-3, 3) == [1e-3, 2e-3, 3e-3]  # off the ladder: kept, neighbours on it


# ------------------------------------------------------------------------------- the protocol, fake runs
#: the loss a fake run ends with: a parabola in log10(lr) around each optimizer's best lr, plus per-seed noise
BEST_LR = {"adamw": 3e-3, "galore_adamw": 1e-2, "fira_adamw": 1e-3}
BASE = {"adamw": 2.30, "galore_adamw": 2.00, "fira_adamw": 2.02}
NOISE = {"adamw": [0.01, -0.01, 0.0], "galore_adamw": [0.02, -0.02, 0.0], "fira_adamw": [0.05, -0.05, 0.0]}


def fake_loss(name, lr, seed):
    return BASE[name] + 0.1 * math.log10(lr / BEST_LR[name]) ** 2 + NOISE[name][seed]


@pytest.fixture
def fake_train(monkeypatch):
    calls = []

    def run(config, **kwargs):
        opt = config.optimizer
        calls.append((opt.name, opt.lr, config.seed, opt.embed_lr, opt.update_proj_gap))
        loss = fake_loss(opt.name, opt.lr, config.seed)
        history = [{"step": s, "loss": loss + 1.0 / s} for s in range(1, config.steps + 1)]
        history[-1]["val_loss"] = loss
        return RunResult(config=config.to_dict(), steps_done=config.steps, final_train_loss=loss + 0.1,
                         final_val_loss=loss, final_val_ppl=math.exp(loss), mean_step_time_s=0.01, tokens_per_s=1e4,
                         optimizer_state_bytes=1000 if opt.name == "adamw" else 400, optimizer_state_parts={},
                         peak_memory_bytes=2**20, peak_memory_kind="peak RSS", n_params=10, history=history)

    monkeypatch.setattr(compare_mod, "train", run)
    return calls


def test_each_optimizer_at_its_best_lr_with_the_seed_spread(fake_train, tmp_path):
    specs = ["adamw", "galore_adamw", "fira_adamw:lr=[1e-3,3e-2]"]
    result = compare(TrainConfig(steps=200), specs, tmp_path, seeds=[0, 1, 2], progress=False)
    tried = {(n, lr, s) for n, lr, s, _, _ in fake_train}
    assert tried == ({("adamw", lr, s) for lr in (3e-4, 1e-3, 3e-3) for s in range(3)}
                     | {("galore_adamw", lr, s) for lr in (3e-3, 1e-2, 3e-2) for s in range(3)}
                     | {("fira_adamw", lr, s) for lr in (1e-3, 3e-2) for s in range(3)})
    assert len(fake_train) == len(tried)
    # every run: the same embeddings/head lr; the refresh gap a quarter of the steps
    assert {(e, t) for *_, e, t in fake_train} == {(1e-2, 50)}
    rows = {r["optimizer"]: r for r in result.rows}
    assert [r["optimizer"] for r in result.rows] == specs
    for spec, name, lrs in (("adamw", "adamw", (3e-4, 1e-3, 3e-3)), ("galore_adamw", "galore_adamw", (3e-3, 1e-2, 3e-2)),
                            ("fira_adamw:lr=[1e-3,3e-2]", "fira_adamw", (1e-3, 3e-2))):
        means = {lr: sum(fake_loss(name, lr, s) for s in range(3)) / 3 for lr in lrs}
        best = min(means, key=means.get)
        r = rows[spec]
        assert r["lr"] == best == BEST_LR[name]
        seeds = [fake_loss(name, best, s) for s in range(3)]
        assert r["final_val_loss"] == pytest.approx(sum(seeds) / 3)
        assert r["val_loss_spread"] == pytest.approx((max(seeds) - min(seeds)) / 2)
    assert rows["adamw"]["lr_source"] == "grid" and rows["fira_adamw:lr=[1e-3,3e-2]"]["lr_source"] == "spec"
    assert rows["adamw"]["lr_at_grid_edge"] and not rows["galore_adamw"]["lr_at_grid_edge"]
    # galore is best; adamw's seeds (2.29..2.31) lie above galore's (1.98..2.02): resolved; fira's overlap
    assert rows["galore_adamw"]["beyond_seed_spread"] == "best"
    assert rows["adamw"]["beyond_seed_spread"] == "yes"
    assert rows["fira_adamw:lr=[1e-3,3e-2]"]["beyond_seed_spread"] == "no"
    assert rows["adamw"]["vs_best"] == pytest.approx(0.30)
    md = result.markdown
    assert "+0.3000 (beyond seed spread)" in md and "+0.0200 (within seed spread)" in md
    assert "T = 50 steps (4 bases per matrix" in md and "lr 0.01 for every optimizer" in md
    assert "adamw: the best lr is at the edge" in md and "galore_adamw: the best" not in md
    assert (tmp_path / "results.md").read_text() == md
    with open(tmp_path / "runs.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(tried)
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_one_seed_resolves_nothing(fake_train):
    result = compare(TrainConfig(steps=8), ["adamw", "galore_adamw"], seeds=[1], lr_grid=1, embed_lr=None,
                     progress=False)
    assert {(n, lr, e, t) for n, lr, _, e, t in fake_train} == {("adamw", 1e-3, None, 2), ("galore_adamw", 1e-2, None, 2)}
    assert [r["beyond_seed_spread"] for r in result.rows] == ["one seed", "best"]
    assert "(one seed)" in result.markdown and "(beyond seed spread)" not in result.markdown
    assert "no embed lr split" in result.markdown


def test_refresh_gap_given_by_the_user_or_a_spec_wins():
    config = TrainConfig(steps=40)
    methods, protocol = validate_specs(config, ["galore_adamw", "fira_adamw:update_proj_gap=7"])
    assert protocol.update_proj_gap == 10 and [m.choice.update_proj_gap for m in methods] == [10, 7]
    methods, _ = validate_specs(config, ["galore_adamw", "fira_adamw:update_proj_gap=7"], update_proj_gap=3)
    assert [m.choice.update_proj_gap for m in methods] == [3, 7]
    methods, _ = validate_specs(TrainConfig(steps=3), ["galore_adamw"])
    assert methods[0].choice.update_proj_gap == 1
    # --lr applies to every optimizer: no grid
    methods, _ = validate_specs(TrainConfig(optimizer=OptimizerChoice(lr=5e-3)), ["adamw", "galore_adamw:lr=1e-2"])
    assert [(m.lrs, m.lr_source) for m in methods] == [([5e-3], "--lr"), ([1e-2], "spec")]


@pytest.mark.parametrize(
    "specs,kwargs,message",
    [
        (["adamw", "sgd_nesterov"], {}, "unknown optimizer 'sgd_nesterov'"),
        (["adamw", "galore_adamw:ranks=4"], {}, "unknown key 'ranks'"),
        (["adamw", "adamw"], {}, "optimizer specs repeat"),
        (["adamw:lr=[1e-3,-1e-3]"], {}, r"lr = \[0.001, -0.001\]; give positive numbers"),
        (["adamw:lr=0"], {}, "lr = 0; give positive numbers"),
        (["galore_adamw:projector=wavelet"], {}, "unknown projector 'wavelet'"),
        (["galore_adamw:rank=0"], {}, "rank = 0 must be a positive integer"),
        (["galore_adamw:embed_lr=-1"], {}, "embed_lr = -1 must be a positive number"),
        (["adamw"], {"seeds": [0, 0]}, "seeds = \\[0, 0\\] repeat"),
        (["adamw"], {"seeds": []}, "give one or more integers"),
        (["adamw"], {"lr_grid": 0}, "lr_grid = 0 must be a positive integer"),
        (["adamw"], {"embed_lr": -1e-2}, "embed_lr = -0.01 must be a positive number"),
        (["adamw"], {"update_proj_gap": 0}, "update_proj_gap = 0 must be a positive integer"),
        ([], {}, "at least one optimizer"),
    ],
)
def test_every_spec_is_checked_before_anything_trains(specs, kwargs, message, monkeypatch, tmp_path):
    def refuse(*args, **kw):
        raise AssertionError("a run started before every spec was checked")

    monkeypatch.setattr(compare_mod, "train", refuse)
    with pytest.raises(ValueError, match=message):
        compare(TrainConfig(steps=4), specs, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_full_rank_optimizers_get_the_projected_methods_lr_split():
    """With embed_lr, AdamW trains exactly the parameters GaLore leaves unprojected at embed_lr and GaLore's
    projected matrices at its lr: Adam's first step moves every coordinate with a gradient by lr·|g|/(|g|+eps),
    i.e. by its group's lr to a relative 1e-6 for |g| >> eps, so the largest move per tensor is its lr."""
    model = build_model("tiny", 64, 16, seed=0)
    galore = build_optimizer(model, OptimizerChoice("galore_adamw", lr=3e-3, embed_lr=1e-2, rank=4), 128)
    adamw = build_optimizer(model, OptimizerChoice("adamw", lr=1e-3, embed_lr=1e-2), 128)
    split = {frozenset(map(id, g["params"])): ("rank" in g) for g in galore.param_groups}
    assert {frozenset(map(id, g["params"])) for g in adamw.param_groups} == set(split)
    for g in galore.param_groups:
        assert g["lr"] == (3e-3 if "rank" in g else 1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    adamw.step()
    matrices = next(ids_ for ids_, projected in split.items() if projected)
    for p, old in zip(model.parameters(), before):
        moved = (p.detach() - old).abs().max().item()
        assert moved == pytest.approx(1e-3 if id(p) in matrices else 1e-2, rel=1e-3), p.shape
    plain = build_optimizer(model, OptimizerChoice("adamw", lr=1e-3), 128)
    assert [g["lr"] for g in plain.param_groups] == [1e-3]


def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    specs = ["adamw", "galore_adamw:lr=1e-2"]
    argv = ["compare", "--optimizers", *specs, *TINY, "--steps", "4", "--lr-grid", "2", "--seeds", "0", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "results.md").read_text() in printed
    with open(out / "runs.csv") as fh:
        runs = [(r["optimizer"], float(r["lr"]), int(r["seed"])) for r in csv.DictReader(fh)]
    assert sorted(runs) == sorted([("adamw", lr, s) for lr in (1e-3, 3e-3) for s in (0, 1)]
                                  + [("galore_adamw:lr=1e-2", 1e-2, s) for s in (0, 1)])
    firsts = {}
    for name, lr, seed in runs:
        run = compare_mod.run_dir(out, name, lr, seed)
        config = json.loads((run / "config.json").read_text())
        assert config["seed"] == seed and config["optimizer"]["embed_lr"] == 1e-2
        if name.startswith("galore"):
            assert config["optimizer"]["update_proj_gap"] == 1  # a quarter of 4 steps
        with open(run / "metrics.jsonl") as fh:
            firsts.setdefault(seed, set()).add(json.loads(fh.readline())["loss"])
    # per seed, every optimizer and lr starts from the same model on the same batch; the seeds differ
    assert all(len(v) == 1 for v in firsts.values()) and firsts[0] != firsts[1]
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["optimizer"] for r in rows] == specs
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_puts_the_legend_outside_and_focuses_on_the_end_of_training():
    from gradproj.train.compare_plots import plot_comparison

    names = ["adamw", "galore_adamw", "fira_adamw"]
    ends = {"adamw": 2.3, "galore_adamw": 2.0, "fira_adamw": 2.05}
    curves, rows = {}, []
    for i, name in enumerate(names):  # a loss falling from 5.5 to its end value, two seeds
        runs = []
        for seed in (0, 1):
            end = ends[name] + 0.01 * seed
            history = [{"step": s, "loss": end + 3.5 * math.exp(-s / 10)} for s in range(1, 201)]
            for r in history[49::50]:
                r["val_loss"] = r["loss"] + 0.05
            runs.append(history)
        curves[name] = runs
        seeds = [ends[name] + 0.05, ends[name] + 0.06]
        rows.append({"optimizer": name, "final_val_loss": sum(seeds) / 2, "val_loss_seeds": seeds, "lr": 1e-2})
    fig = plot_comparison(rows, curves)
    bars, lines = fig.axes
    fig.canvas.draw()
    legend = lines.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == names  # one entry per optimizer
    assert legend.get_window_extent().x0 >= lines.get_window_extent().x1  # outside the plot
    lo, hi = lines.get_ylim()
    # the range holds the curves from a quarter of the run on (loss(50) = end + 3.5 e^-5 < end + 0.03)...
    assert lo <= min(ends.values()) and hi >= max(ends.values()) + 0.06
    assert hi < 2.5  # ...and not the early losses (5.5 at the start), which would squash the end gaps
    left, right = bars.get_xlim()
    assert 1.9 < left < min(ends.values()) + 0.05 and right > max(ends.values()) + 0.06  # bars start near the best


def test_compare_defaults_keep_a_quick_look_quick(monkeypatch):
    """Without flags: 100 steps per run (each optimizer trains lrs x seeds times), 3 lrs, seeds 0 and 1,
    embeddings/head at 1e-2, a new subspace every 25 steps."""
    from gradproj.train import cli

    seen = {}

    def fake_compare(config, specs, out, **kwargs):
        seen.update(kwargs, steps=config.steps)
        raise ValueError("stop here")

    monkeypatch.setattr(compare_mod, "compare", fake_compare)
    with pytest.raises(SystemExit):
        cli.main(["compare", "--optimizers", "adamw", "--quiet"])
    assert seen["steps"] == 100 and seen["seeds"] == [0, 1] and seen["lr_grid"] == 3 and seen["embed_lr"] == 1e-2
    assert seen["update_proj_gap"] is None  # not given: validate_specs takes a quarter of the steps
    methods, protocol = validate_specs(TrainConfig(steps=seen["steps"]), ["galore_adamw"])
    assert protocol.update_proj_gap == 25 and methods[0].lrs == [3e-3, 1e-2, 3e-2]
