"""The examples for accelerate, Lightning and PEFT at tiny size: each trains (loss falls), checkpoints, and a run
resumed from its checkpoint ends with the same weights as the uninterrupted run, bit for bit."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--max-bytes", "40000", "--batch-size", "2", "--seq-len", "32", "--rank", "8", "--update-proj-gap", "3"]


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def resume_from(tmp_path, checkpoint):
    """A fresh output directory holding only ``checkpoint`` of the straight run (so the resumed run starts there)."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    src = tmp_path / "straight" / checkpoint
    (shutil.copytree if src.is_dir() else shutil.copy)(src, resumed / checkpoint)
    return resumed


@pytest.mark.parametrize("mode", [[], ["--layerwise", "--grad-accum", "2"]], ids=["normal", "layerwise"])
def test_accelerate_example(tmp_path, mode):
    pytest.importorskip("accelerate")
    example = load_example("finetune_accelerate")
    args = [*TINY, "--steps", "6", "--save-every", "3", "--lr", "3e-3", *mode]
    straight = example.main(["--out", str(tmp_path / "straight"), *args])
    assert sum(straight["losses"][-2:]) < sum(straight["losses"][:2])
    resumed = example.main(["--out", str(resume_from(tmp_path, "step-3")), *args, "--resume"])
    assert len(resumed["losses"]) == 3
    assert_same_weights(straight["model"], resumed["model"])


@pytest.mark.parametrize("mode", [[], ["--layerwise", "--grad-accum", "2"]], ids=["normal", "layerwise"])
def test_lightning_example(tmp_path, mode):
    pytest.importorskip("lightning")
    example = load_example("finetune_lightning")
    args = [*TINY, "--steps", "6", "--save-every", "3", "--lr", "3e-3", *mode]
    straight = example.main(["--out", str(tmp_path / "straight"), *args])
    micro = 2 if mode else 1
    assert len(straight["losses"]) == 6 * micro
    assert sum(straight["losses"][-2:]) < sum(straight["losses"][:2])
    first = [c for c in straight["checkpoints"] if "step=3" in c]
    assert first, straight["checkpoints"]
    resumed = example.main(["--out", str(resume_from(tmp_path, first[0])), *args, "--resume"])
    assert len(resumed["losses"]) == 3 * micro  # only the second epoch ran
    assert_same_weights(straight["model"], resumed["model"])


def test_peft_example(tmp_path):
    pytest.importorskip("peft")
    example = load_example("finetune_peft")
    args = [*TINY, "--steps", "6", "--save-every", "3", "--lr", "3e-3", "--lora-rank", "4"]
    straight = example.main(["--out", str(tmp_path / "straight"), *args])
    assert sum(straight["losses"][-2:]) < sum(straight["losses"][:2])
    model = straight["model"]
    named = {id(p): n for n, p in model.named_parameters()}
    regular, projected = straight["groups"]
    # GaLore on the 4 x 3 MLP weights (gate, up, down per block), Adam on LoRA's A and B of q and v, nothing frozen
    assert len(projected["params"]) == 4 * 3 and all(".mlp." in named[id(p)] for p in projected["params"])
    assert len(regular["params"]) == 4 * 2 * 2 and all("lora_" in named[id(p)] for p in regular["params"])
    resumed = example.main(["--out", str(resume_from(tmp_path, "step-3.pt")), *args, "--resume"])
    assert len(resumed["losses"]) == 3
    assert_same_weights(straight["model"], resumed["model"])
