"""examples/finetune_trainer.py end to end at tiny size: Trainer configured with transformers' GaLore arguments,
gradproj's optimizer through create_optimizer, checkpoint and exact resume."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_trainer.py"


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_trainer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adamw_layerwise"])
def test_trainer_checkpoint_and_resume_are_exact(tmp_path, optim):
    from safetensors.torch import load_file

    example = load_example()
    args = ["--steps", "4", "--save-steps", "2", "--batch-size", "2", "--seq-len", "32", "--max-bytes", "60000",
            "--rank", "8", "--update-proj-gap", "3", "--quiet", "--optim", optim]
    straight = tmp_path / "straight"
    metrics = example.main(["--out", str(straight), *args])
    assert metrics["eval_loss"] < 5.5  # below the uniform byte model's ln(256)

    # Trainer saved gradproj's state; it loads with weights_only=True and holds the low-rank moments
    opt_state = torch.load(straight / "checkpoint-2" / "optimizer.pt", weights_only=True)
    shapes = {tuple(s["exp_avg"].shape) for s in opt_state["state"].values()}
    assert (128, 8) in shapes and (8, 352) in shapes  # q/k/v/o and gate/up (right), down_proj (left)
    assert [g["rank"] for g in opt_state["param_groups"] if "rank" in g] == [8]

    # a run interrupted after step 2 and resumed from its checkpoint ends with the same weights
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    example.main(["--out", str(resumed), *args, "--resume"])
    a = load_file(straight / "checkpoint-4" / "model.safetensors")
    b = load_file(resumed / "checkpoint-4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and differs from the weights at the checkpoint it resumed from (it trained)
    c = load_file(straight / "checkpoint-2" / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)
