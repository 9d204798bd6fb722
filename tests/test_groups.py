"""gradproj.param_groups on a toy model and on a real (tiny) transformers LLaMA."""

import pytest
import torch
from torch import nn

import gradproj
from problems import TinyNet, train


def names_of(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_default_takes_linear_weights_except_head_and_embedding():
    model = TinyNet()
    regular, projected = gradproj.param_groups(model, rank=4)
    assert names_of(model, projected["params"]) == ["fc1.weight", "fc2.weight"]
    assert projected["rank"] == 4 and projected["update_proj_gap"] == 200 and projected["scale"] == 0.25
    assert "emb.weight" in names_of(model, regular["params"]) and "head.weight" in names_of(model, regular["params"])
    assert all(p.dim() >= 2 for p in projected["params"])
    assert len(regular["params"]) + len(projected["params"]) == len(list(model.parameters()))


def test_substring_and_regex_patterns_and_group_options():
    model = TinyNet()
    _, projected = gradproj.param_groups(model, target_modules=["fc1"], rank=3, projector="svd", lr=5e-3)
    assert names_of(model, projected["params"]) == ["fc1.weight"]
    assert projected["projector"] == "svd" and projected["lr"] == 5e-3
    _, projected = gradproj.param_groups(model, target_modules=r"fc\d", rank=3)
    assert names_of(model, projected["params"]) == ["fc1.weight", "fc2.weight"]
    _, projected = gradproj.param_groups(model, target_modules=["head"], rank=3)  # explicit: the head too
    assert names_of(model, projected["params"]) == ["head.weight"]


def test_no_match_is_a_clear_error():
    with pytest.raises(ValueError, match="matched no module"):
        gradproj.param_groups(TinyNet(), target_modules=["attn"])


def test_conv_by_name_and_never_one_dim():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))
    regular, projected = gradproj.param_groups(model, target_modules=["0", "1"], rank=2)
    assert names_of(model, projected["params"]) == ["0.weight"]  # BatchNorm weight is 1-D: regular


def test_llama_all_linear_and_attention_only():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    _, projected = gradproj.param_groups(model, "all-linear", rank=8)
    names = names_of(model, projected["params"])
    assert len(names) == 2 * 7 and not any("lm_head" in n or "embed" in n for n in names)
    _, projected = gradproj.param_groups(model, [r".*self_attn\.(q|k|v|o)_proj"], rank=8)
    assert len(projected["params"]) == 2 * 4
    opt = gradproj.GaLoreAdamW(gradproj.param_groups(model, rank=8, update_proj_gap=2), lr=1e-3)
    ids = torch.randint(0, 64, (2, 16))
    train(model, opt, 3, lambda m, _: m(input_ids=ids, labels=ids).loss)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert opt.state[q]["proj"].shape == (8, 32)
