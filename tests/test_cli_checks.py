"""The gradproj command for a new user: its packages, checks before any work, interruption and resume,
what config.json / summary.json hold, the memory command's input, and a quiet bitsandbytes."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradproj.train import loop
from gradproj.train.cli import main, parse_size
from gradproj.train.loop import TIMING_KEYS, TrainConfig, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--batch", "2", "--seq", "32", "--max-bytes", "200000", "--eval-every", "3",
        "--eval-batches", "2", "--rank", "8", "--update-proj-gap", "3", "--quiet"]
HEAVY = ("transformers", "matplotlib", "bitsandbytes", "datasets", "tokenizers", "triton")


def run_python(code: str, *, hide: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which the packages ``hide`` cannot be imported or found
    (``sys.modules[name] = None``: import raises ModuleNotFoundError and ``importlib.util.find_spec`` returns
    None, as for a package that is not installed)."""
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in hide)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def cli(argv: list[str], *, hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run_python(f"from gradproj.train.cli import main\nsys.exit(main({argv!r}))", hide=hide)


def read_metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture
def no_work(monkeypatch):
    """Make reading data or building the real model fail the test: checks must come before both."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before every check passed")

    monkeypatch.setattr(loop, "load_data", forbidden)
    monkeypatch.setattr(loop, "build_model", forbidden)


# ------------------------------------------------------------------------------- 1. packages and files
def test_import_gradproj_loads_torch_only():
    proc = run_python(f"import gradproj\nprint([m for m in {HEAVY!r} if m in sys.modules])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_command_needs_are_core_dependencies():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert {"torch", "transformers", "tokenizers", "matplotlib", "tqdm", "numpy"} <= core
    assert not core & {"bitsandbytes", "triton"}  # optional: CUDA-leaning, listed by `gradproj list`


def test_missing_transformers_is_refused_before_anything_is_read(tmp_path):
    out = tmp_path / "run"
    proc = cli(["train", *TINY, "--steps", "2", "--out", str(out)], hide=("transformers",))
    assert proc.returncode == 2
    assert "transformers (the LLaMA model)" in proc.stderr and "pip install transformers" in proc.stderr
    assert "data:" not in proc.stderr and not out.exists()


def test_without_matplotlib_no_message_names_the_missing_plot(tmp_path):
    out = tmp_path / "run"
    proc = cli(["train", *TINY, "--steps", "2", "--out", str(out)], hide=("matplotlib",))
    assert proc.returncode == 0, proc.stderr
    assert "no loss plot will be written" in proc.stderr  # said before training
    assert not (out / "loss.png").exists()
    (wrote,) = [line for line in proc.stdout.splitlines() if line.startswith("wrote ")]
    listed = wrote.split(": ", 1)[1].split(", ")
    assert "loss.png" not in listed
    assert all((out / name.rstrip("/")).exists() for name in listed)
    assert {"metrics.jsonl", "config.json", "summary.json", "checkpoints/"} <= set(listed)


def test_list_says_what_is_missing_and_train_refuses_it(tmp_path):
    proc = cli(["list"], hide=("bitsandbytes",))
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert "needs bitsandbytes" in lines["adamw8bit"] and "needs bitsandbytes" in lines["galore_adamw8bit"]
    assert "available" in lines["galore_adamw"] and "NOT installed" in lines["bitsandbytes"]
    proc = cli(["train", *TINY, "--optimizer", "galore_adamw8bit", "--out", str(tmp_path / "r")], hide=("bitsandbytes",))
    assert proc.returncode == 2 and "needs bitsandbytes" in proc.stderr and not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------- 2. checks before work
def test_stand_in_model_has_the_real_parameters():
    from gradproj.models import get_shape
    from gradproj.train.models import build_model
    from gradproj.train.optimizers import StandInModel

    real = build_model("tiny", 256, 32)
    stand_in = StandInModel(get_shape("tiny"), 256)
    assert [(n, p.shape) for n, p in stand_in.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
    assert all(p.is_meta for p in stand_in.parameters())


def test_compare_refuses_a_typo_in_the_second_spec_before_the_first_run(tmp_path, no_work, capsys):
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--optimizers", "galore_adamw", "galor_adamw", *TINY, "--steps", "2", "--out", str(out)])
    assert exc.value.code == 2
    assert "--optimizers 'galor_adamw': unknown optimizer 'galor_adamw'" in capsys.readouterr().err
    assert not out.exists()


def test_compare_names_the_spec_whose_option_is_bad(tmp_path, no_work, capsys):
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--optimizers", "adamw", "fira_adamw:rank=0", *TINY, "--steps", "2", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--optimizers 'fira_adamw:rank=0'" in err and "rank = 0 must be a positive integer" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--optimizer", "sgd"], "unknown optimizer 'sgd'"),
        (["--group-option", "limiter_gama=1.1"], "--optimizer galore_adamw: "),  # an unknown group key
        (["--optimizer-option", "betas=(0.9,)"], "--optimizer galore_adamw: "),
        (["--sampler", "owl"], "--sampler owl"),
        (["--keep-inactive-state"], "no sampler is set; add --sampler uniform"),
        (["--rank", "129"], "rank = 129 exceeds min(m, n) = 128"),
        (["--tokenizer", "byte", "--vocab-size", "300"], "the byte tokenizer's vocabulary is 256"),
        (["--device", "cpu", "--optimizer-option", "impl=triton"], "impl='triton' cannot run here"),
    ],
)
def test_train_checks_everything_before_reading_data(argv, message, tmp_path, no_work, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' Triton interpreter would run on CPU
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, "--steps", "2", *argv, "--out", str(out)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------- 3. resume and interruption
def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "3", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "nothing to train" in printed
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    summary = json.loads(before["summary.json"])
    assert f"{summary['tokens_per_s']:,.0f} tokens/s" in printed  # the saved numbers, not a no-op's


def test_summary_times_every_invocation_of_a_resumed_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--stop-at", "2", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    times = {r["step"]: r["step_time_s"] for r in read_metrics(out)}
    # the first step of each invocation (1 and 3) is left out of the mean (warm-up, first subspace)
    expected = (times[2] + times[4]) / 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_step_time_s"] == pytest.approx(expected, rel=1e-12)
    assert summary["tokens_per_s"] == pytest.approx(2 * 32 / expected, rel=1e-12)


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_is_exact(tmp_path):
    split, straight = tmp_path / "split", tmp_path / "straight"
    # the same CPU thread count in both processes: another count sums the matmuls in another order
    args = [*TINY, "--steps", "30", "--eval-every", "10", "--threads", str(torch.get_num_threads())]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradproj", "train", *args, "--out", str(split)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (split / "metrics.jsonl").exists() and len(read_metrics(split)) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    step = read_metrics(split)[-1]["step"]
    assert 2 <= step < 30
    assert latest_checkpoint(split).name == f"step_{step:07d}.pt"  # saved at the step boundary it stopped at
    assert f"continue with: gradproj train --resume {split}" in stderr

    assert main(["train", "--resume", str(split), "--quiet"]) == 0
    assert main(["train", *args, "--out", str(straight)]) == 0
    assert without_timing(read_metrics(split)) == without_timing(read_metrics(straight))
    a = torch.load(latest_checkpoint(straight), weights_only=True)["model"]
    b = torch.load(latest_checkpoint(split), weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



def test_compare_refuses_keep_inactive_state_without_a_sampler(tmp_path, no_work, capsys):
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--optimizers", "adamw:keep_inactive_state=True", *TINY, "--steps", "2", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--optimizers 'adamw:keep_inactive_state=True'" in err and "no sampler is set" in err
    assert not out.exists()


def test_keep_inactive_state_holds_the_state_of_blocks_drawn_before_and_resumes_exactly(tmp_path):
    from gradproj.train.models import build_model

    names = [n for n, _ in build_model("tiny", 256, 32).named_parameters()]
    per_block = sum(n.startswith("model.layers.0.") for n in names)
    outside = sum(".layers." not in n for n in names)  # embeddings, final norm, head: always trained
    sampled = [*TINY, "--steps", "6", "--sampler", "uniform", "--active-layers", "1", "--sample-interval", "1",
               "--threads", str(torch.get_num_threads())]
    held = {}
    for keep in (False, True):
        out = tmp_path / f"keep{keep}"
        assert main(["train", *sampled, *(["--keep-inactive-state"] if keep else []), "--out", str(out)]) == 0
        assert json.loads((out / "config.json").read_text())["optimizer"]["keep_inactive_state"] is keep
        ckpt = torch.load(latest_checkpoint(out), weights_only=True)
        assert ckpt["optimizer"]["gradproj"]["sampler"]["keep_inactive_state"] is keep
        in_blocks = len(ckpt["optimizer"]["state"]) - outside
        assert in_blocks % per_block == 0
        held[keep] = (in_blocks // per_block, json.loads((out / "summary.json").read_text())["optimizer_state_bytes"])
    assert held[False][0] <= 1  # freed at each switch: at most the one active block
    assert held[True][0] > 1  # blocks drawn before and deactivated kept theirs
    assert held[True][1] > held[False][1]
    # stopped and resumed, the kept state comes back from the checkpoint: the same losses and weights
    split = tmp_path / "split"
    assert main(["train", *sampled, "--keep-inactive-state", "--stop-at", "3", "--out", str(split)]) == 0
    assert main(["train", "--resume", str(split), "--quiet"]) == 0
    straight = tmp_path / "keepTrue"
    assert without_timing(read_metrics(split)) == without_timing(read_metrics(straight))
    a = torch.load(latest_checkpoint(straight), weights_only=True)["model"]
    b = torch.load(latest_checkpoint(split), weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def test_sigterm_asks_for_a_stop_and_a_second_signal_stops_at_once():
    with loop._StopOnSignal(True) as stop:
        with pytest.raises(KeyboardInterrupt):  # before the first step (reading data): at once
            os.kill(os.getpid(), signal.SIGTERM)
        assert not stop.requested
        stop.armed = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler it replaced is back


# ------------------------------------------------------------------------------- 4. what the files say
def test_config_json_holds_the_resolved_values(tmp_path, caplog):
    galore, adamw = tmp_path / "galore", tmp_path / "adamw"
    assert main(["train", *TINY[:-5], "--quiet", "--steps", "1", "--out", str(galore)]) == 0  # no --rank
    saved = json.loads((galore / "config.json").read_text())
    assert saved["vocab_size"] == 256  # the byte tokenizer's
    assert (saved["optimizer"]["lr"], saved["optimizer"]["rank"], saved["optimizer"]["scale"]) == (1e-2, 128 // 4, 0.25)
    caplog.clear()
    assert main(["train", *TINY, "--steps", "1", "--optimizer", "adamw", "--out", str(adamw)]) == 0
    opt = json.loads((adamw / "config.json").read_text())["optimizer"]
    assert (opt["lr"], opt["rank"], opt["scale"]) == (1e-3, None, None)  # it does not project: --rank 8 unused
    said = [r.getMessage() for r in caplog.records if "does not project" in r.getMessage()]
    assert said == ["gradproj: adamw does not project gradients; ignoring --rank"]  # once, before the run


def test_config_json_holds_the_bpe_vocabulary_trained(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "1", "--tokenizer", "bpe", "--vocab-size", "300", "--out", str(out)]) == 0
    trained = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == trained


def test_a_config_of_an_earlier_version_still_resumes():
    old = {**TrainConfig().to_dict(), "vocab_size": 4096}  # the BPE default stored beside the byte tokenizer
    config = TrainConfig.from_dict(old)
    config.validate()
    assert config.vocab_size == 256


def test_memory_refuses_a_rank_no_matrix_has(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["memory", "--model", "llama_7b", "--optimizer", "galore_adamw", "--rank", "99999"])
    assert exc.value.code == 2 and "--rank 99999 exceeds 4096" in capsys.readouterr().err
    assert main(["memory", "--model", "llama_7b", "--optimizer", "galore_adamw", "--rank", "4096"]) == 0


def test_memory_budget_needs_a_unit(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["memory", "--budget", "24"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'24' has no unit" in err and "GB" in err and "GiB" in err
    assert parse_size("24GB") == 24 * 10**9 and parse_size("80 GiB") == 80 * 2**30 and parse_size("1.5tb") == 1.5e12
    with pytest.raises(Exception, match="unknown unit"):
        parse_size("24 GX")


def test_memory_with_shards_says_per_device(capsys):
    assert main(["memory", "--model", "llama_1b", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(["memory", "--model", "llama_1b", "--shards", "4", "--json"]) == 0
    four = json.loads(capsys.readouterr().out)
    assert four["per_device"] is True and one["per_device"] is False
    assert four["weights"] == -(-one["weights"] // 4)
    assert main(["memory", "--model", "llama_1b", "--shards", "4", "--budget", "24GB"]) == 0
    printed = capsys.readouterr().out
    assert "each of the 4 devices holds 1/4" in printed and "per device" in printed.splitlines()[-1]


# ---------------------------------------------------------------------------------- 5. bitsandbytes
def test_list_does_not_import_bitsandbytes():
    proc = run_python("from gradproj.train.cli import main\nmain(['list'])\nprint('bnb' if 'bitsandbytes' in sys.modules else '-')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "-"
    assert proc.stderr == ""


# bitsandbytes logs its warnings only on CPUs with AVX512-BF16 (it then tries to fetch an optional kernel)
@pytest.mark.parametrize("name", ["galore_adamw8bit", "adamw8bit"])  # imported by the inner rule / the registry
def test_an_8bit_run_is_quiet(tmp_path, name):
    proc = cli(["train", *TINY, "--steps", "1", "--optimizer", name, "--out", str(tmp_path / "r")])
    assert proc.returncode == 0, proc.stderr
    assert "Failed to load" not in proc.stderr and "kernels-community" not in proc.stderr


def test_quiet_bnb_import_passes_errors_and_keeps_the_rest_at_debug(caplog):
    from gradproj.inner.adam8bit import quiet_bnb_import

    caplog.set_level(logging.DEBUG)
    with quiet_bnb_import():
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("optional kernel missing")
        logging.getLogger("kernels.hub").error("real failure")
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert ("gradproj", logging.DEBUG, "bitsandbytes.backends.cpu.ops: optional kernel missing") in records
    assert ("kernels.hub", logging.ERROR, "real failure") in records
    assert not any(r.levelno == logging.WARNING for r in caplog.records)
    assert logging.getLogger("bitsandbytes").propagate and not logging.getLogger("bitsandbytes").handlers
