"""gradproj.param_groups on a toy model and on a real (tiny) transformers LLaMA."""

import warnings

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


class PlainLM(nn.Module):
    """A language model without get_output_embeddings: its head is found by its name."""

    def __init__(self, head_name="lm_head", vocab=30, dim=12, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        setattr(self, head_name, nn.Linear(dim, vocab, bias=False))
        if tie:
            getattr(self, head_name).weight = self.embed.weight
        self.head_name = head_name

    def forward(self, tokens):
        return getattr(self, self.head_name)(torch.tanh(self.body(self.embed(tokens))))


@pytest.mark.parametrize("head_name", ["lm_head", "output", "classifier", "score", "embed_out"])
def test_head_found_by_name_without_get_output_embeddings(head_name):
    model = PlainLM(head_name)
    assert not hasattr(model, "get_output_embeddings")
    for target in (None, "all-linear"):
        _, projected = gradproj.param_groups(model, target, rank=2)
        assert names_of(model, projected["params"]) == ["body.weight"]


def test_head_of_a_sequential_found_by_the_vocabulary():
    model = nn.Sequential(nn.Embedding(30, 12), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 30))
    _, projected = gradproj.param_groups(model, rank=2)
    assert names_of(model, projected["params"]) == ["1.weight"]  # "3" maps to the 30-token vocabulary


def test_tied_head_is_never_projected_unless_forced():
    model = PlainLM(tie=True)
    assert model.lm_head.weight is model.embed.weight
    _, projected = gradproj.param_groups(model, rank=2)
    assert names_of(model, projected["params"]) == ["body.weight"]
    with pytest.raises(ValueError, match=r"lm_head \(its weight is embed's, tied\).*project_embeddings=True"):
        gradproj.param_groups(model, ["lm_head", "body"], rank=2)
    with pytest.raises(ValueError, match="selects embedding weights: emb. "):
        gradproj.param_groups(TinyNet(), ["emb"], rank=2)
    _, projected = gradproj.param_groups(model, ["lm_head"], rank=2, project_embeddings=True)
    assert [id(p) for p in projected["params"]] == [id(model.embed.weight)]


def test_matrices_the_rank_covers_give_one_warning_and_train_full_rank():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ids = torch.randint(0, 64, (2, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = gradproj.param_groups(model, rank=8, update_proj_gap=2)
        opt = gradproj.GaLoreAdamW(groups, lr=1e-3)
        train(model, opt, 2, lambda m, _: m(input_ids=ids, labels=ids).loss)
    ours = [str(w.message) for w in caught if "gradproj" in str(w.message)]
    assert len(ours) == 1 and "28 selected weight matrices have min(m, n) <= rank=8" in ours[0], ours
    assert len(groups) == 1 and "rank" not in groups[0]  # all LoRA matrices: full-rank, no projection keys
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert "exp_avg" in opt.state[lora_a] and opt.state[lora_a]["exp_avg"].shape == lora_a.shape


def test_small_matrices_keep_the_group_options():
    model = TinyNet()
    with pytest.warns(UserWarning, match="2 selected weight matrices have min"):
        groups = gradproj.param_groups(model, rank=16, lr=5e-3)  # fc1, fc2: 40 x 16 -> min 16 <= 16
    assert [sorted(k for k in g if k != "params") for g in groups] == [[], ["lr"]]
    assert names_of(model, groups[1]["params"]) == ["fc1.weight", "fc2.weight"] and groups[1]["lr"] == 5e-3


def test_constructor_rank_with_param_groups_is_refused():
    W = nn.Parameter(torch.randn(12, 8))
    with pytest.raises(ValueError, match=r"param groups \[0\].*gradproj.param_groups"):
        gradproj.GaLoreAdamW([{"params": [W]}], rank=4, update_proj_gap=2, scale=1.0)
    opt = gradproj.GaLoreAdamW([W], rank=4, update_proj_gap=2, scale=1.0)  # a plain list: the caller chose them
    W.grad = torch.randn_like(W)
    opt.step()
    assert opt.state[W]["exp_avg"].shape == (12, 4)  # projected: rank 4 on the 8-wide side
