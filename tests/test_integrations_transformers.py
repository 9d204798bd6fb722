"""gradproj.integrations.transformers.create_optimizer against transformers' own semantics, and a real Trainer."""

import shutil
import warnings

import pytest
import torch
from torch import nn

import gradproj
from gradproj.integrations.transformers import create_optimizer, parse_optim_args

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_optimizer import _parse_optim_args  # noqa: E402
from transformers.trainer_utils import check_target_module_exists  # noqa: E402

VOCAB, SEQ = 48, 16


def tiny_llama(tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


class Counting(torch.utils.data.Dataset):
    """Sequences start, start+1, ... (mod VOCAB): a pattern a tiny model learns in a few steps."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        x = (torch.arange(SEQ) + 3 * i) % VOCAB
        return {"input_ids": x, "labels": x}


def training_args(out, **kw):
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                lr_scheduler_type="linear", warmup_steps=1, save_strategy="steps", save_steps=3, logging_steps=1,
                report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
                optim="galore_adamw", optim_target_modules=["attn", "mlp"],
                optim_args="rank=4, update_proj_gap=2, scale=0.5")
    base.update(kw)
    return TrainingArguments(**base)


def names(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def projected_names(model, opt):
    return sorted(n for g in opt.param_groups if "rank" in g for n in names(model, g["params"]))


def transformers_selection(model, target):
    """transformers' _setup_low_rank_optimizer selection: nn.Linear modules check_target_module_exists accepts."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (target == "all-linear" or check_target_module_exists(target, name)):
            out.append(name + ".weight")
    return sorted(out)


@pytest.mark.parametrize("target", [["attn", "mlp"], ["q_proj", r".*\.1\.mlp\.down_proj"], r".*\.(k|v)_proj",
                                    ["model.layers.0.self_attn.o_proj"]])
def test_target_modules_match_exactly_as_transformers(tmp_path, target):
    model = tiny_llama()
    opt, _ = create_optimizer(model, training_args(tmp_path, optim_target_modules=target))
    assert projected_names(model, opt) == transformers_selection(model, target)


def test_all_linear_leaves_the_head_and_embeddings_out(tmp_path):
    model = tiny_llama()
    opt, _ = create_optimizer(model, training_args(tmp_path, optim_target_modules="all-linear"))
    expected = [n for n in transformers_selection(model, "all-linear") if n != "lm_head.weight"]
    assert projected_names(model, opt) == expected and len(expected) == 2 * 7


def test_a_tied_head_named_explicitly_raises(tmp_path):
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="embed_tokens"):
        create_optimizer(model, training_args(tmp_path, optim_target_modules=["lm_head", "q_proj"]))
    opt, _ = create_optimizer(model, training_args(tmp_path, optim_target_modules="all-linear"))
    assert "lm_head.weight" not in projected_names(model, opt)
    assert "model.embed_tokens.weight" not in projected_names(model, opt)


def test_an_untied_head_named_explicitly_is_projected_with_a_warning(tmp_path):
    model = tiny_llama()
    with pytest.warns(UserWarning, match="output head"):
        opt, _ = create_optimizer(model, training_args(tmp_path, optim_target_modules=["lm_head"]))
    assert projected_names(model, opt) == ["lm_head.weight"]


@pytest.mark.parametrize("text", ["rank=8,update_proj_gap=50", " rank = 8 , scale=0.5, proj_type=left", ""])
def test_optim_args_parse_as_transformers(text):
    assert parse_optim_args(text) == _parse_optim_args(text)


def test_training_arguments_are_honoured(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7,
                         learning_rate=3e-3, optim_args="rank=4, update_proj_gap=7, scale=0.5, proj_type=left")
    opt, sched = create_optimizer(model, args)
    assert type(opt) is gradproj.GaLoreAdamW
    decay = set(Trainer.get_decay_parameter_names(None, model))
    for group in opt.param_groups:
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7
        for n in names(model, group["params"]):  # weight decay exactly on the parameters Trainer decays
            assert group["weight_decay"] == (0.1 if n in decay else 0.0), n
    projected = [g for g in opt.param_groups if "rank" in g]
    assert projected and all((g["rank"], g["update_proj_gap"], g["scale"], g["proj_type"]) == (4, 7, 0.5, "left")
                             for g in projected)
    # the scheduler is transformers' own: linear with one warm-up step over max_steps=6 (lr 0 at step 0)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    opt.step()  # no gradients: changes nothing, but keeps torch's scheduler-order check quiet
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3)


def test_each_optim_name_builds_its_method(tmp_path):
    model = tiny_llama()
    opt, _ = create_optimizer(model, training_args(tmp_path, optim="galore_adafactor"))
    assert type(opt) is gradproj.GaLoreAdafactor
    assert all(g["relative_step"] is False and g["scale_parameter"] is False for g in opt.param_groups)
    opt, _ = create_optimizer(model, training_args(tmp_path, optim="apollo_adamw",
                                                   optim_args="rank=4, scale_type=tensor, proj=svd"))
    projected = [g for g in opt.param_groups if "rank" in g]
    assert type(opt) is gradproj.ApolloAdamW
    assert all(g["scale_type"] == "tensor" and g["projector"] == "svd" and g["scale"] == 1.0 for g in projected)
    opt, _ = create_optimizer(model, training_args(tmp_path, optim="galore_adamw_layerwise", max_grad_norm=0.5,
                                                   gradient_accumulation_steps=3))
    assert opt._layerwise is not None and opt._layerwise.accumulation_steps == 3
    assert all(g["max_grad_norm"] == 0.5 for g in opt.param_groups)
    opt, _ = create_optimizer(model, training_args(tmp_path, optim_args="rank=4, projector=dct, update_proj_gap=5"))
    assert all(g["projector"] == "dct" for g in opt.param_groups if "rank" in g)


def test_an_entry_that_selects_no_linear_is_ignored_with_a_warning(tmp_path):
    model = tiny_llama()
    with pytest.warns(UserWarning, match="'input_layernorm' selects no nn.Linear"):
        opt, _ = create_optimizer(model, training_args(tmp_path, optim_target_modules=["q_proj", "input_layernorm"]))
    assert projected_names(model, opt) == transformers_selection(model, ["q_proj"])


def test_bad_arguments_raise_before_anything_is_built(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="optim_target_modules is needed"):
        create_optimizer(model, training_args(tmp_path, optim_target_modules=None))
    with pytest.raises(ValueError, match="not a gradproj method"):
        create_optimizer(model, training_args(tmp_path, optim="adamw_torch"))
    with pytest.raises(ValueError, match="rank='x' must be a int"):
        create_optimizer(model, training_args(tmp_path, optim_args="rank=x"))
    with pytest.raises(ValueError, match="no nn.Linear"):
        create_optimizer(model, training_args(tmp_path, optim_target_modules=["nothing_here"]))
    with pytest.raises(TypeError, match="rnak"):  # an unknown group option: gradproj's schema names it
        create_optimizer(model, training_args(tmp_path, optim_args="rank=4, rnak=3"))


def run_trainer(out, model, args_kw, resume=False):
    args = training_args(out, **args_kw)
    trainer = Trainer(model=model, args=args, train_dataset=Counting(), optimizers=create_optimizer(model, args))
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer


def final_weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("optim,extra", [("galore_adamw", {}),
                                         ("galore_adamw_layerwise", {"gradient_accumulation_steps": 2}),
                                         ("galore_adafactor", {"learning_rate": 3e-2})])
def test_trainer_learns_checkpoints_and_resumes_bit_exactly(tmp_path, optim, extra):
    kw = {"optim": optim, **extra}
    straight = run_trainer(tmp_path / "a", tiny_llama(), kw)
    losses = [h["loss"] for h in straight.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2  # it learns (uniform loss ln 48 = 3.87)
    opt_state = torch.load(tmp_path / "a" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert any("rank" in g for g in opt_state["param_groups"])

    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = run_trainer(resumed_dir, tiny_llama(seed=1), kw, resume=True)  # other init: weights come from disk
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layerwise_with_fp16_fails_at_once(tmp_path):
    with pytest.raises(ValueError, match="bf16=True"):
        create_optimizer(tiny_llama(), TrainingArguments(output_dir=str(tmp_path), optim="galore_adamw_layerwise",
                                                         optim_target_modules=["attn"], fp16=True, use_cpu=True,
                                                         report_to=[]))


def test_trainer_with_optimizer_cls_and_constructor_rank_is_refused(tmp_path):
    """Trainer builds two weight-decay groups itself; a constructor-level rank would project embed_tokens and
    lm_head with them. The optimizer refuses and names the adapter."""
    model = tiny_llama()
    args = training_args(tmp_path, optim="adamw_torch", optim_target_modules=None, optim_args=None)
    trainer = Trainer(model=model, args=args, train_dataset=Counting(),
                      optimizer_cls_and_kwargs=(gradproj.GaLoreAdamW,
                                                {"rank": 4, "update_proj_gap": 2, "scale": 0.5, "lr": 1e-2}))
    with pytest.raises(ValueError, match="gradproj.integrations.transformers.create_optimizer"):
        trainer.train()
    assert model.model.embed_tokens.weight.grad is None  # refused before any step


def test_create_optimizer_emits_no_warning_for_a_plain_llama(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_optimizer(tiny_llama(), training_args(tmp_path))


def test_adafactor_schedule_recipe_matches_transformers_adafactor():
    """transformers' recipe Adafactor(lr=None, relative_step=True) + AdafactorSchedule: the schedule sets lr 0.0,
    then writes back the step size read through _get_lr. Unprojected, GaLoreAdafactor is transformers' Adafactor
    (weight decay 0), so the weights agree bit for bit and the reported lr to float32 rounding."""
    from transformers.optimization import Adafactor, AdafactorSchedule

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(12, 20)), nn.Parameter(torch.randn(20))]
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ours, ref = gradproj.GaLoreAdafactor(params, lr=0.0), Adafactor(ref_params, lr=None, relative_step=True)
    s_ours, s_ref = AdafactorSchedule(ours), AdafactorSchedule(ref)
    x = torch.randn(5, 12)
    for _ in range(4):
        for (w, b), opt, sched in ((params, ours, s_ours), (ref_params, ref, s_ref)):
            opt.zero_grad()
            (x @ w + b).tanh().sum().backward()
            opt.step()
            sched.step()
        # transformers multiplies in float32 tensors, gradproj in Python floats: one float32 rounding apart
        assert s_ours.get_last_lr()[0] == pytest.approx(float(s_ref.get_last_lr()[0]), rel=2**-23)
        assert s_ours.get_last_lr()[0] > 0
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))


def test_adafactor_schedule_with_projection_in_a_trainer(tmp_path):
    model = tiny_llama()
    opt = gradproj.GaLoreAdafactor(gradproj.param_groups(model, rank=4, update_proj_gap=2), lr=0)
    from transformers.optimization import AdafactorSchedule

    args = training_args(tmp_path, optim="adamw_torch", optim_target_modules=None, optim_args=None,
                         save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Counting(), optimizers=(opt, AdafactorSchedule(opt)))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"] and all(h["learning_rate"] > 0 for h in logs[1:])
    with pytest.raises(ValueError, match="cannot be combined with relative_step=True"):
        gradproj.GaLoreAdafactor(gradproj.param_groups(model, rank=4), lr=1e-3)  # a manual lr is still refused
