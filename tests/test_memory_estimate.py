"""The analytic memory estimator: hand-computed counts, real optimizers and models, and the GaLore paper."""

import json

import pytest
import torch

import gradproj
from gradproj import registry
from gradproj.memory_estimate import estimate_memory, llama_parameters
from gradproj.train.models import LlamaShape, build_model
from gradproj.train.optimizers import OPTIMIZERS, OptimizerChoice, build_optimizer
from problems import train

SMALL = LlamaShape(hidden=16, intermediate=40, heads=2, layers=2, vocab=50)


def test_hand_computed_counts_for_a_small_config():
    # parameters: embedding 50*16, per layer 2 norms (16) + q,k,v,o (16x16) + gate, up (40x16) + down (16x40),
    # final norm 16, head 50*16
    per_layer = 2 * 16 + 4 * 16 * 16 + 3 * 40 * 16
    n = 50 * 16 + 2 * per_layer + 16 + 50 * 16
    assert n == 7568
    e = estimate_memory(SMALL, "galore_adamw", rank=4, dtype="float32")
    assert e.n_params == n and e.weights == 4 * n and e.gradients == 4 * n
    # unprojected (embedding, head, 5 norms): Adam, two fp32 moments each
    unprojected = 2 * (50 * 16 + 50 * 16 + 5 * 16)
    # 16x16 (right): moments 2 * 16*4, basis 4*16; 40x16 (right): 2 * 40*4 + 4*16; 16x40 (left): 2 * 4*40 + 16*4
    projected_per_layer = 4 * (2 * 64 + 64) + 2 * (2 * 160 + 64) + (2 * 160 + 64)
    assert e.optimizer_states == 4 * (unprojected + 2 * projected_per_layer) == 28800
    assert e.optimizer_states_detail["basis"] == 4 * 2 * (7 * 64)
    assert e.activations == 0 and e.total == e.weights + e.gradients + e.optimizer_states
    # AdamW: two moments per parameter plus torch's 4-byte `step` tensor per parameter tensor
    a = estimate_memory(SMALL, "adamw", dtype="float32")
    assert a.optimizer_states == 2 * 4 * n + 4 * len(llama_parameters(SMALL))
    # per-layer updates keep only the largest gradient (the 50x16 embedding / head)
    assert estimate_memory(SMALL, "galore_adamw", rank=4, layerwise=True, dtype="float32").gradients == 4 * 800
    # Fira: one fp32 scalar per projected matrix; FRUGAL: as GaLore
    assert estimate_memory(SMALL, "fira_adamw", rank=4, dtype="float32").optimizer_states == 28800 + 4 * 14
    assert estimate_memory(SMALL, "frugal_adamw", rank=4, dtype="float32").optimizer_states == 28800
    # rank >= min(m, n) trains unprojected, exactly like AdamW's moments (gradproj's step is a Python int)
    assert estimate_memory(SMALL, "galore_adamw", rank=16, dtype="float32").optimizer_states == 2 * 4 * n


def test_modes_known_before_their_optimizers_exist():
    # 8-bit moments: one byte per element plus one fp32 scale per block of 256, for tensors of >= 4096
    # elements; smaller ones keep two fp32 moments
    one = estimate_memory(LlamaShape(128, 320, 2, 1, 50), "galore_adamw8bit", rank=64)
    two = estimate_memory(LlamaShape(128, 320, 2, 2, 50), "galore_adamw8bit", rank=64)
    q = 2 * (128 * 64 + 4 * 32)  # q, k, v, o: R is 128 x 64 = 8192 elements, 32 blocks
    mlp = 2 * (320 * 64 + 4 * 80)  # gate, up (R 320 x 64) and down (R 64 x 320): 80 blocks
    norms = 2 * 2 * 4 * 128  # two RMSNorm weights of 128 < 4096 elements: fp32 moments
    assert two.optimizer_states_detail["moments"] - one.optimizer_states_detail["moments"] == 4 * q + 3 * mlp + norms
    small1 = estimate_memory(LlamaShape(16, 40, 2, 1, 50), "galore_adamw8bit", rank=4)
    small2 = estimate_memory(LlamaShape(16, 40, 2, 2, 50), "galore_adamw8bit", rank=4)
    layer = 2 * 4 * (4 * 16 * 4 + 3 * 40 * 4 + 2 * 16)  # every tensor < 4096 elements: fp32
    assert small2.optimizer_states_detail["moments"] - small1.optimizer_states_detail["moments"] == layer
    # Adafactor on R: fp32 row and column factors plus one RMS scalar
    af1 = estimate_memory(LlamaShape(16, 40, 2, 1, 50), "galore_adafactor", rank=4)
    af2 = estimate_memory(LlamaShape(16, 40, 2, 2, 50), "galore_adafactor", rank=4)
    layer = 4 * 4 * (16 + 4 + 1) + 2 * 4 * (40 + 4 + 1) + 4 * (4 + 40 + 1) + 2 * 4 * (16 + 1)
    assert af2.optimizer_states_detail["moments"] - af1.optimizer_states_detail["moments"] == layer
    # DCT keeps r int32 indices per matrix, plus one shared 16x16 matrix (all right projections of width 16,
    # the left projection of down_proj is over its 16 rows)
    d = estimate_memory(SMALL, "galore_adamw", rank=4, projector="dct", dtype="float32")
    assert d.optimizer_states_detail["basis"] == 2 * 7 * 4 * 4
    assert d.optimizer_states_detail["shared"] == 4 * 16 * 16
    assert estimate_memory(SMALL, "galore_adamw", rank=4, projector="random").optimizer_states_detail["basis"] == 0
    # a layer sampler with 1 of 2 blocks active: one block's gradients and states
    s = estimate_memory(SMALL, "galore_adamw", rank=4, active_layers=1, dtype="float32")
    assert s.gradients == 4 * (7568 - per_layer_params())
    # FSDP shards divide the persistent parts
    full, half = estimate_memory(SMALL, "adamw"), estimate_memory(SMALL, "adamw", shards=2)
    assert half.weights == full.weights // 2 and half.optimizer_states == full.optimizer_states // 2


def per_layer_params():
    return 2 * 16 + 4 * 16 * 16 + 3 * 40 * 16


def _available(names):
    return [n for n in names if OPTIMIZERS[n].resolve() is not None]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", _available(list(OPTIMIZERS)))
def test_matches_real_model_and_optimizer(name, dtype):
    # hidden 64 makes 64x64 matrices exactly bitsandbytes' 8-bit threshold (4096 elements)
    shape = LlamaShape(hidden=64, intermediate=160, heads=4, layers=2, vocab=96)
    model = build_model(shape, shape.vocab, 16, dtype=getattr(torch, dtype))
    opt = build_optimizer(model, OptimizerChoice(name=name, rank=8, update_proj_gap=5), shape.hidden)
    x = torch.randint(0, shape.vocab, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    opt.step()
    est = estimate_memory(shape, name, rank=8, dtype=dtype)
    assert est.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert est.gradients == grads
    assert est.optimizer_states == gradproj.optimizer_state_bytes(opt)["total"]


def _saved_activation_bytes(model, x):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activations_match_what_llama_saves_for_backward(dtype):
    shape = LlamaShape(hidden=64, intermediate=176, heads=4, layers=2, vocab=128)
    model = build_model(shape, shape.vocab, 32, dtype=getattr(torch, dtype))
    x = torch.randint(0, shape.vocab, (3, 32))
    measured = _saved_activation_bytes(model, x)
    est = estimate_memory(shape, "adamw", dtype=dtype, batch_size=3, seq_len=32).activations
    assert est == pytest.approx(measured, rel=0.03)


# The GaLore paper (arXiv 2403.03507v2), all in GB (10^9 bytes), bf16, LLaMA vocabulary 32000.
# Its numbers are rounded estimates and measurements; the tolerances below are stated in docs/memory.md.
PAPER_TABLE2 = {  # total of weights + optimizer states: (full-rank Adam, GaLore, GaLore rank)
    "llama_60m": (0.36, 0.24, 128),
    "llama_130m": (0.76, 0.52, 256),
    "llama_350m": (2.06, 1.22, 256),
    "llama_1b": (7.80, 4.38, 512),
}


@pytest.mark.parametrize("model", list(PAPER_TABLE2))
def test_paper_table2_weights_plus_states(model):
    full, galore, rank = PAPER_TABLE2[model]
    a = estimate_memory(model, "adamw")
    g = estimate_memory(model, "galore_adamw", rank=rank)
    assert (a.weights + a.optimizer_states) / 1e9 == pytest.approx(full, rel=0.10)
    # the paper's GaLore estimate counts the low-rank moments but not the projection matrices
    moments_only = g.weights + g.optimizer_states - g.optimizer_states_detail["basis"]
    assert moments_only / 1e9 == pytest.approx(galore, rel=0.15)
    assert g.optimizer_states_detail["basis"] > 0


def test_paper_llama_7b_on_a_24gb_gpu():
    G = 1e9
    kw = dict(rank=1024, batch_size=1, seq_len=256)  # token batch 256, as in the paper's Fig. 1 and 4
    galore8 = estimate_memory("llama_7b", "galore_adamw8bit", layerwise=True, **kw)
    galore8_grads = estimate_memory("llama_7b", "galore_adamw8bit", layerwise=False, **kw)
    adam8 = estimate_memory("llama_7b", "adamw8bit", **kw)
    bf16 = estimate_memory("llama_7b", "adamw", **kw)
    # the headline: 8-bit GaLore with per-layer updates fits a 24 GB GPU; AdamW, 8-bit Adam and 8-bit GaLore
    # that keeps its gradients do not
    assert galore8.total < 24 * G
    assert min(bf16.total, adam8.total, galore8_grads.total) > 24 * G
    # Section 5.5: 22.0G measured for 8-bit GaLore; 37.92G (63.3 %) less than bf16 AdamW, 24.5G less than 8-bit Adam
    assert galore8.total / G == pytest.approx(22.0, rel=0.15)
    assert bf16.total / G == pytest.approx(22.0 + 37.92, rel=0.15)
    assert adam8.total / G == pytest.approx(22.0 + 24.5, rel=0.15)
    assert 1 - galore8.total / bf16.total == pytest.approx(0.633, abs=0.05)
    # abstract: 8-bit GaLore cuts optimizer memory by 82.5 % against the bf16 baseline
    assert 1 - galore8.optimizer_states / bf16.optimizer_states == pytest.approx(0.825, abs=0.05)
    # per-layer updates save the weight gradients: 13.5G
    assert (galore8_grads.gradients - galore8.gradients) / G == pytest.approx(13.5, rel=0.05)
    # Table 3 memory estimates (weights + optimizer states): 8-bit GaLore 18G, 8-bit Adam 26G
    assert (galore8.weights + galore8.optimizer_states) / G == pytest.approx(18, rel=0.15)
    assert (adam8.weights + adam8.optimizer_states) / G == pytest.approx(26, rel=0.15)


def test_cli_memory_json_and_table(capsys):
    from gradproj.train.cli import main

    argv = ["memory", "--model", "llama_7b", "--optimizer", "galore_adamw8bit", "--rank", "1024", "--layerwise",
            "--batch", "1", "--seq", "256", "--budget", "24GB"]
    assert main(argv + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    ref = estimate_memory("llama_7b", "galore_adamw8bit", rank=1024, layerwise=True, batch_size=1, seq_len=256)
    for key in ("weights", "gradients", "optimizer_states", "activations", "total"):
        assert isinstance(d[key], int) and d[key] == getattr(ref, key)
    assert d["total"] == d["weights"] + d["gradients"] + d["optimizer_states"] + d["activations"]
    assert d["fits"] is True and d["budget"] == 24 * 10**9 and d["units"] == "bytes"
    assert main(["memory", "--model", "llama_7b", "--optimizer", "adamw", "--budget", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "optimizer states" in out and "does NOT fit in 24GB" in out


def test_bad_estimator_input_is_rejected():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        estimate_memory("llama_60m", "sgd")
    with pytest.raises(ValueError, match="unknown model 'llama_2b'"):
        estimate_memory("llama_2b", "adamw")
    with pytest.raises(ValueError, match="rank = 0"):
        estimate_memory("llama_60m", "galore_adamw", rank=0)


# --------------------------------------------------------------------------- every axis, from its layout
GRADPROJ_OPTIMIZERS = [n for n, e in registry.OPTIMIZERS.items() if e.is_gradproj and e.resolve() is not None]
TINY_LLAMA = LlamaShape(hidden=64, intermediate=160, heads=4, layers=2, vocab=96)


def _measure(name, dtype, projector=None, proj_type="std", options=None, group=None):
    """A real optimizer's state bytes after one step on a small LLaMA."""
    model = build_model(TINY_LLAMA, TINY_LLAMA.vocab, 16, dtype=getattr(torch, dtype))
    choice = OptimizerChoice(name=name, rank=8, update_proj_gap=5, projector=projector, proj_type=proj_type,
                             group_options=dict(group or {}), optimizer_options=dict(options or {}))
    opt = build_optimizer(model, choice, TINY_LLAMA.hidden)
    x = torch.randint(0, TINY_LLAMA.vocab, (2, 16))
    train(model, opt, 1, lambda m, _: m(input_ids=x, labels=x).loss)
    return gradproj.optimizer_state_bytes(opt)


def test_every_inner_rule_and_residual_has_a_gradproj_optimizer_here():
    assert {registry.OPTIMIZERS[n].inner for n in GRADPROJ_OPTIMIZERS} == set(registry.INNER_RULES)
    assert {registry.OPTIMIZERS[n].residual for n in GRADPROJ_OPTIMIZERS} == set(registry.RESIDUALS)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.parametrize("projector", registry.projector_names())
@pytest.mark.parametrize("name", GRADPROJ_OPTIMIZERS)
def test_estimate_from_layouts_equals_measured_state_for_every_projector_and_inner_rule(name, projector, proj_type, dtype):
    residual = registry.OPTIMIZERS[name].residual
    if residual in ("fira", "apollo") and proj_type == "full":
        with pytest.raises(ValueError, match=f"residual='{residual}' needs a one-sided projection"):
            estimate_memory(TINY_LLAMA, name, rank=8, projector=projector, proj_type=proj_type)
        return
    # golore switches to random bases at step 100: the estimate counts its first, dense phase
    group = {"golore_switch_step": 100} if projector == "golore" else None
    measured = _measure(name, dtype, projector, proj_type, group=group)
    est = estimate_memory(TINY_LLAMA, name, rank=8, dtype=dtype, projector=projector, proj_type=proj_type)
    # `shared` holds the DCT matrices the projector caches outside the optimizer state
    assert est.optimizer_states - est.optimizer_states_detail["shared"] == measured["total"]
    assert est.optimizer_states_detail["basis"] == measured["basis"]


@pytest.mark.parametrize("state_dtype", [None, "float32", "bfloat16"])
@pytest.mark.parametrize("name", GRADPROJ_OPTIMIZERS)
def test_estimate_follows_state_dtype_and_layout_options(name, state_dtype):
    options = {"state_dtype": state_dtype} if state_dtype else {}
    if registry.OPTIMIZERS[name].inner == "adafactor":
        options["beta1"] = 0.9  # the optional first moment
    if registry.OPTIMIZERS[name].inner == "adam8bit":
        options["min_8bit_size"] = 500  # R of q/k/v/o (64 x 8) quantized too
    measured = _measure(name, "bfloat16", options=options)
    layout_options = {k: v for k, v in options.items() if k != "state_dtype"}
    est = estimate_memory(TINY_LLAMA, name, rank=8, dtype="bfloat16", state_dtype=state_dtype, options=layout_options)
    assert est.optimizer_states == measured["total"]


def test_layout_bytes_rules():
    from gradproj.state_layout import INT, Spec, layout_bytes

    layout = {
        "count": Spec(INT),
        "idx": Spec((5,), "index", bound=9),
        "codes": Spec((3, 4), "codes"),
        "scales": Spec((2,), requires=("codes",)),
        "norm": Spec(()),
        "moment": Spec((3, 4)),
    }
    assert layout_bytes(layout, torch.bfloat16, quantized=True) == 0 + 4 * 5 + 12 + 4 * 2 + 4 + 2 * 12
    assert layout_bytes(layout, "float32", quantized=False) == 0 + 4 * 5 + 4 * 12 + 0 + 4 + 4 * 12
    # an axis counted alone still sees the codes another axis lists
    assert layout_bytes({"scales": layout["scales"]}, "float32", quantized=True, context=layout) == 8


def test_aliases_and_every_registered_projector_are_accepted():
    assert estimate_memory(SMALL, "galore_8bit", rank=4).optimizer == "galore_adamw8bit"
    for projector in registry.projector_names():
        assert estimate_memory(SMALL, "galore_adamw", rank=4, projector=projector).n_projected == 14
    with pytest.raises(ValueError, match="projector = 'wavelet'"):
        estimate_memory(SMALL, "galore_adamw", projector="wavelet")
