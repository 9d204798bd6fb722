"""``gradproj train`` under torchrun: DDP and FSDP2 (2 CPU processes, gloo) against one process.

N processes with ``--batch B`` draw the same windows as one process with ``--batch N*B`` (see
``BatchStream``), so the losses and the trained weights must match the single-process run up to the
rounding of sums taken in another order (the gradient all-reduce / reduce-scatter). The runs cross basis
refreshes (``--update-proj-gap 3``), and the FSDP2 run is stopped and resumed from its
``torch.distributed.checkpoint`` directory on the way.

The comparison runs in float64, with a float64 SVD whose vectors have canonical signs (``svd_fp64``, see
tests/problems.py). With float32 and the plain ``svd`` projector no tolerance is right: LAPACK's choice of
singular-vector signs is not continuous in the matrix, so the last-bit difference of the two gradient sums
flips a basis vector at some refresh on some CPUs (an AVX-512 Xeon here, not AVX2 EPYCs); with the moments
kept across refreshes that moved a weight matrix by ~0.5 % and the step-5 loss by 1.5e-4, as much as a real
bug would. (LAPACK flips them even for float64 gradients 1e-15 apart, hence the canonical signs.)
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from distributed_utils import run_distributed
from gradproj.train import loop
from gradproj.train.cli import main
from problems import float64_svd_projector

ARGS = ["--model", "tiny", "--seq", "32", "--max-bytes", "200000", "--eval-every", "3", "--eval-batches", "2",
        "--rank", "8", "--update-proj-gap", "3", "--steps", "5", "--quiet", "--device", "cpu", "--threads", "1",
        "--save-every", "2", "--projector", "svd_fp64",
        # every matrix refreshed at t % T == 0: tests/test_cli_project_backward.py counts the refresh steps
        "--group-option", "refresh_stagger=false"]

# Losses: transformers evaluates the LLaMA loss in float32 (it upcasts the logits with .float(), which for a
# float64 model rounds them down): per-token terms that are the same float32 numbers in both runs, averaged
# over the 4 x 31 tokens of a step in one process, over 2 x 31 per rank (then over the ranks, in float64)
# under torchrun. Summing n positive float32 terms errs by at most (n - 1) u relative (u = 2^-24, recursive
# summation's worst case), so the two means differ by at most (123 + 61) u + a few u = 1.1e-5: rtol 2e-5.
# Measured 1.1e-7. A gradient summed instead of averaged over the ranks moves a loss by 7e-4, a missing
# gradient reduction by 8e-2.
LOSS_TOL = dict(rtol=2e-5, atol=0.0)
# Weights (relative Frobenius error per tensor). Float64 rounding of the differently ordered sums alone leaves
# < 1e-14 (measured 2e-15 under AVX-512, 7e-15 with ATEN_CPU_CAPABILITY=avx2). But transformers' LLaMA also
# computes in float32 (RMSNorm; the loss): the float64 values cast there agree in both runs to ~1e-16, so an
# element rounds to a different float32 only rarely (~4e-8 per element, measured on the gradients; over the
# ~1e6 such casts of a run, a few percent of runs meet one). One such one-ulp difference moved the weights by
# at most 6e-8 (28 random placements in the RMSNorm outputs; most in rarely seen embedding rows, which Adam's
# normalisation amplifies), the bases following continuously. So WEIGHT_RTOL 1e-6. A gradient summed instead
# of averaged over the ranks moves the weights by 1e-2, a missing gradient reduction by 0.4.
WEIGHT_RTOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def float64_training():
    """Train in float64: the trainer has no float64 --dtype, so its ``float32`` builds float64 models in this
    module (forked workers inherit the patch; ``_body`` repeats it for spawned ones)."""
    float64_svd_projector()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(loop.DTYPES, "float32", torch.float64)
        yield


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return [r["loss"] for r in rows], [r["val_loss"] for r in rows if "val_loss" in r]


def _body(rank, world, argv_runs):
    float64_svd_projector()
    loop.DTYPES["float32"] = torch.float64
    for argv in argv_runs:
        assert main(argv) == 0


def _assert_weights_close(got, ref):
    """Per tensor, float64 and relative Frobenius error below WEIGHT_RTOL."""
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype == torch.float64, (k, got[k].dtype, ref[k].dtype)
        err = float((got[k] - ref[k]).norm() / ref[k].norm())
        assert err < WEIGHT_RTOL, (k, err)


def _final_weights(out, step=5):
    path = os.path.join(out, "checkpoints", f"step_{step:07d}.pt")
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, float64_training):
    out = str(tmp_path_factory.mktemp("single") / "run")
    assert main(["train", *ARGS, "--batch", "4", "--out", out]) == 0
    return out


def test_ddp_matches_one_process(single, tmp_path):
    out = str(tmp_path / "ddp")
    run_distributed(_body, [["train", *ARGS, "--batch", "2", "--out", out]], torchrun_env=True)
    ref_train, ref_val = _losses(single)
    train, val = _losses(out)
    assert len(train) == 5 and len(val) == len(ref_val) == 2
    torch.testing.assert_close(torch.tensor(train), torch.tensor(ref_train), **LOSS_TOL)
    torch.testing.assert_close(torch.tensor(val), torch.tensor(ref_val), **LOSS_TOL)
    _assert_weights_close(_final_weights(out), _final_weights(single))  # DDP: one replicated .pt by rank 0
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert summary["config"]["parallel"] == "auto"


def test_fsdp_stop_resume_matches_one_process(single, tmp_path):
    out = str(tmp_path / "fsdp")
    # svd_fp64, like every projector but "svd", refreshes a sharded parameter from the gathered gradient: the
    # SVD one process takes (the Gram path of "svd" is compared with its own reference in test_fsdp.py)
    run_distributed(_body, [["train", *ARGS, "--batch", "2", "--fsdp", "--out", out, "--stop-at", "3"]],
                    torchrun_env=True)
    run_distributed(_body, [["train", "--resume", out, "--quiet", "--threads", "1"]], torchrun_env=True)  # new job
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts == ["step_0000004", "step_0000005"]  # DCP directories; --keep-checkpoints 2 removed older
    assert os.path.isfile(os.path.join(out, "checkpoints", "step_0000005", "extra.pt"))
    ref_train, ref_val = _losses(single)
    train, val = _losses(out)  # steps 1-3 from the first invocation, 4-5 after the resume
    assert len(train) == 5
    torch.testing.assert_close(torch.tensor(train), torch.tensor(ref_train), **LOSS_TOL)
    torch.testing.assert_close(torch.tensor(val), torch.tensor(ref_val), **LOSS_TOL)

    # the sharded checkpoint also loads in one process (DCP reshards): same weights as the reference
    from gradproj.train.loop import DTYPES, TrainConfig, load_config
    from gradproj.train.models import build_model
    from gradproj.train.optimizers import build_optimizer
    from gradproj.train.runtime import LocalRuntime

    cfg: TrainConfig = load_config(out)
    ref = _final_weights(single)
    vocab = ref["model.embed_tokens.weight"].shape[0]
    model = build_model(cfg.model, vocab, cfg.seq_len, seed=123, dtype=DTYPES[cfg.dtype])
    opt = build_optimizer(model, cfg.optimizer, 64)
    extra = LocalRuntime("cpu").load_checkpoint(os.path.join(out, "checkpoints", "step_0000005"), model, opt)
    assert extra["step"] == 5
    _assert_weights_close(model.state_dict(), ref)


def test_distributed_modes_refuse_what_they_cannot_do(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:  # no torchrun environment
        main(["train", *ARGS, "--fsdp"])
    assert exc.value.code == 2 and "torchrun --nproc-per-node 2 -m gradproj train --fsdp" in capsys.readouterr().err

    def refused(rank, world, flag):
        with pytest.raises(SystemExit):
            main(["train", *ARGS, "--batch", "2", *flag])

    run_distributed(refused, ["--layerwise"], torchrun_env=True)
    run_distributed(refused, ["--sampler", "uniform"], torchrun_env=True)
