"""The gradproj command end to end at tiny sizes: train, resume, compare, errors, and the data pipeline."""

import csv
import json
import math

import pytest
import torch

from gradproj.train import data as data_mod
from gradproj.train.cli import main
from gradproj.train.loop import TIMING_KEYS, TrainConfig, latest_checkpoint
from gradproj.train.optimizers import OPTIMIZERS

TINY = ["--model", "tiny", "--batch", "2", "--seq", "32", "--max-bytes", "200000", "--eval-every", "3",
        "--eval-batches", "2", "--rank", "8", "--update-proj-gap", "3", "--quiet"]


def read_metrics(path):
    with open(path / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def final_weights(out):
    return torch.load(latest_checkpoint(out), weights_only=True)["model"]


def test_train_writes_metrics_plot_config_and_loadable_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "optimizer state:" in printed and "peak memory:" in printed and "val ppl" in printed

    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and r["tokens"] == r["step"] * 2 * 32 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]  # a byte model starts at ~ln(256) = 5.5
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in records if "val_loss" in r)

    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert config.steps == 6 and config.optimizer.name == "galore_adamw" and config.optimizer.rank == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_state_bytes"] > 0 and summary["peak_memory_bytes"] > 0

    ckpt = torch.load(latest_checkpoint(out), weights_only=True)
    assert ckpt["step"] == 6 and set(ckpt) >= {"model", "optimizer", "scheduler", "rng", "config"}
    assert ckpt["optimizer"]["state"] and isinstance(ckpt["rng"]["torch"], torch.Tensor)


# torch's AdamW and every gradproj optimizer available here, so new ones are covered as they land
@pytest.mark.parametrize(
    "name", [n for n, s in OPTIMIZERS.items() if (n == "adamw" or s.target.startswith("gradproj:")) and s.resolve()]
)
def test_resume_continues_exactly(tmp_path, name):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*TINY, "--optimizer", name, "--steps", "6"]  # refreshes at steps 1 and 4 (gap 3)
    assert main(["train", *common, "--out", str(straight)]) == 0
    assert main(["train", *common, "--stop-at", "3", "--out", str(split)]) == 0
    assert [r["step"] for r in read_metrics(split)][-1] == 3
    assert main(["train", "--resume", str(split), "--quiet"]) == 0
    assert without_timing(read_metrics(split)) == without_timing(read_metrics(straight))
    a, b = final_weights(straight), final_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_to_the_floor(schedule):
    config = TrainConfig(steps=100, warmup=0.1, min_lr_ratio=0.1, schedule=schedule)
    f = [config.lr_factor(s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[99] == pytest.approx(0.1)
    quarter = 0.5 * (1 + math.cos(math.pi / 4)) if schedule == "cosine" else 0.75  # a quarter into the decay
    assert config.lr_factor(10 + 89 / 4) == pytest.approx(0.1 + 0.9 * quarter)
    assert TrainConfig(steps=100, warmup=5, schedule="constant").lr_factor(50) == 1.0


def test_resume_refuses_to_change_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out)]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["train", "--resume", str(out), "--lr", "0.1", "--optimizer", "adamw", "--vocab-size", "300"])
    assert exc.value.code == 2
    # the flags as the user typed them, in one message
    assert "--vocab-size, --lr, --optimizer cannot change" in capsys.readouterr().err
    # a new run into the directory of an earlier one would mix two runs' checkpoints
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, "--steps", "2", "--out", str(out)])
    assert exc.value.code == 2 and "--resume" in capsys.readouterr().err


def test_compare_writes_table_csv_and_one_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    specs = ["adamw:lr=3e-3", "galore_adamw", "fira_adamw:scale=0.5"]
    one_run = ["--lr-grid", "1", "--seeds", "0"]  # each optimizer's default lr, one seed (tests/test_compare.py: more)
    assert main(["compare", "--optimizers", *specs, *TINY, *one_run, "--steps", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["optimizer"] for r in rows] == specs
    for r in rows:
        assert float(r["final_train_loss"]) > 0 and float(r["final_val_loss"]) > 0
        assert float(r["final_val_ppl"]) == pytest.approx(math.exp(float(r["final_val_loss"])), rel=1e-6)
        assert int(r["optimizer_state_bytes"]) > 0 and float(r["step_time_ms"]) > 0
    state = {r["optimizer"]: int(r["optimizer_state_bytes"]) for r in rows}
    assert state["galore_adamw"] < state["adamw:lr=3e-3"]
    assert state["fira_adamw:scale=0.5"] - state["galore_adamw"] == 4 * 7 * 4  # one fp32 norm per matrix
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 1 + len(specs) and "| galore_adamw |" in md and md in printed + md
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # the same model init, data and batches: the first step's loss is identical across optimizers
    firsts = {read_metrics(out / d / f"lr_{lr}" / "seed_0")[0]["loss"]
              for d, lr in (("adamw_lr=3e-3", "0.003"), ("galore_adamw", "0.01"), ("fira_adamw_scale=0.5", "0.01"))}
    assert len(firsts) == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--optimizer", "sgd_nesterov"], "unknown optimizer 'sgd_nesterov'"),
        (["--projector", "wavelet"], "unknown projector 'wavelet'"),
        (["--model", "llama_2b"], "unknown model 'llama_2b'"),
        (["--group-option", "limiter_gamma=0.5", "--optimizer", "fira_adamw"], "limiter_gamma = 0.5 must be >= 1"),
        (["--optimizer-option", "impl=cuda_magic"], "impl = 'cuda_magic'"),
        (["--stop-at", "9"], "stop_at = 9 must be in [1, steps = 2]"),
    ],
)
def test_bad_input_exits_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, "--steps", "2", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--layerwise"],
        ["--layerwise", "--grad-accum", "2"],
        ["--sampler", "uniform", "--active-layers", "1", "--sample-interval", "2"],
        ["--optimizer", "frugal_adamw"],
        ["--projector", "randomized_svd"],
        ["--projector", "dct"],
        ["--projector", "random"],
    ],
)
def test_flags_of_every_part_train(argv, tmp_path):
    assert main(["train", *TINY, "--steps", "2", *argv, "--out", str(tmp_path / "run")]) == 0
    assert len(read_metrics(tmp_path / "run")) == 2


def test_layerwise_takes_grad_accum_and_refuses_global_clipping(capsys):
    from gradproj.train.models import build_model
    from gradproj.train.optimizers import OptimizerChoice, build_optimizer

    model = build_model("tiny", 256, 32)
    opt = build_optimizer(model, OptimizerChoice(layerwise=True), 128, accumulation_steps=3)
    assert opt._layerwise.accumulation_steps == 3  # the hooks accumulate --grad-accum backward passes
    with pytest.raises(SystemExit):
        main(["train", *TINY, "--steps", "2", "--layerwise", "--clip", "1.0"])
    assert "--optimizer-option max_grad_norm=VALUE" in capsys.readouterr().err


def test_python_dash_m_gradproj_runs(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "gradproj", "memory", "--model", "llama_60m", "--optimizer", "galore_adamw", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["optimizer_states"] > 0


# ----------------------------------------------------------------------------------------- data pipeline
def test_stdlib_corpus_is_sorted_and_excludes_site_packages():
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = data_mod.stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(rel) > 100 and rel == sorted(rel)
    assert "os.py" in rel and not any("site-packages" in r for r in rel)
    assert data_mod.stdlib_files() == files


def test_split_is_interleaved_and_deterministic():
    tokens = torch.arange(40_000) % 251
    train, val = data_mod.split_stream(tokens, 0.1, seq_len=32)
    block = 40_000 // 20
    # every 10th block is validation
    assert len(val) == 2 * block and torch.equal(val[:block], tokens[9 * block : 10 * block])
    assert len(train) + len(val) == len(tokens)
    again = data_mod.split_stream(tokens, 0.1, seq_len=32)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    with pytest.raises(ValueError, match="too few"):
        data_mod.split_stream(tokens[:500], 0.1, seq_len=128)


def test_batches_depend_only_on_seed_and_step_and_shard_by_rank():
    tokens = torch.arange(10_000)
    one = data_mod.BatchStream(tokens, 4, 16, seed=3)
    assert torch.equal(one.batch(7), data_mod.BatchStream(tokens, 4, 16, seed=3).batch(7))
    assert not torch.equal(one.batch(7), one.batch(8))
    both = data_mod.BatchStream(tokens, 8, 16, seed=3).batch(7)
    ranks = [data_mod.BatchStream(tokens, 4, 16, seed=3, rank=r, world_size=2).batch(7) for r in (0, 1)]
    assert torch.equal(torch.cat(ranks), both)


def test_local_text_and_jsonl_data(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 2000)
    with open(tmp_path / "b.jsonl", "w") as fh:
        for i in range(500):
            fh.write(json.dumps({"body": f"record {i} " * 5}) + "\n")
    d = data_mod.load_data([str(tmp_path)], seq_len=16, text_key="body", val_fraction=0.1)
    text = data_mod.ByteTokenizer().decode(torch.cat([d.train, d.val]).tolist())
    assert "hello world" in text and "record 499" in text
    with pytest.raises(ValueError, match="expected an object with a 'text' field"):
        data_mod.load_data([str(tmp_path / "b.jsonl")], seq_len=16)
    with pytest.raises(ValueError, match="no such file"):
        data_mod.load_data([str(tmp_path / "missing.txt")], seq_len=16)


def test_bpe_tokenizer_is_saved_and_reused(tmp_path):
    path = tmp_path / "tokenizer.json"
    a = data_mod.load_data(None, seq_len=32, tokenizer="bpe", vocab_size=300, max_bytes=100_000, tokenizer_path=path)
    assert path.exists() and a.vocab_size == 300
    b = data_mod.load_data(None, seq_len=32, tokenizer="bpe", vocab_size=300, max_bytes=100_000, tokenizer_path=path)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    raw = data_mod.load_data(None, seq_len=32, max_bytes=100_000)
    assert len(raw.train) + len(raw.val) <= 100_000 + 200  # the bytes plus one separator per document
    assert len(a.train) + len(a.val) < 0.8 * (len(raw.train) + len(raw.val))  # merges compress the stream


def test_datasets_name_without_network_fails_clearly():
    # the tests run with HF_DATASETS_OFFLINE=1 (conftest): the dataset cannot be fetched
    with pytest.raises(ValueError, match="could not load the dataset.*local text / jsonl files"):
        data_mod.load_data(["hf:gradproj-no-such/dataset"], seq_len=16)


def test_recipe_defaults_per_optimizer():
    """GaLore's recipe (lr 1e-2, scale 0.25) and FRUGAL's (AdamW's lr 1e-3, no extra scale); flags override."""
    from gradproj.train.models import build_model
    from gradproj.train.optimizers import OptimizerChoice, build_optimizer

    model = build_model("tiny", 256, 32)

    def projected(choice):
        opt = build_optimizer(model, choice, 128)
        (group,) = [g for g in opt.param_groups if "rank" in g]
        return group["lr"], group["scale"]

    assert projected(OptimizerChoice(name="galore_adamw")) == (1e-2, 0.25)
    assert projected(OptimizerChoice(name="frugal_adamw")) == (1e-3, 1.0)
    assert projected(OptimizerChoice(name="frugal_adamw", lr=3e-3, scale=0.5)) == (3e-3, 0.5)
