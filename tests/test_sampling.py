"""Layerwise sampling (LISA / OwLore): outlier ratios, the sampler, and the optimizers that step it."""

import io
import math

import pytest
import torch
from torch import nn

import gradproj
from problems import TinyNet, tiny_batch, tiny_loss, train
from reference_algorithms import ReferenceGaLore

transformers = pytest.importorskip("transformers")

HIDDEN, INTER, LAYERS, VOCAB = 32, 48, 4, 64
BLOCK_NUMEL = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER  # q, k, v, o + gate, up, down


def tiny_llama(seed=0, layers=LAYERS):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=32, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def token_batch(seed, batch=2, seq=12):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def llama_loss(model, batch):
    """The causal-LM loss on ``token_batch(batch)``, on the model's device (a loss for problems.train)."""
    ids = token_batch(batch).to(model.device)
    return model(input_ids=ids, labels=ids).loss


def llama_train(model, opt, steps, seed, record):
    """problems.train on token batches, appending the sampler's active blocks to ``record`` after each step."""
    for s in range(steps):
        train(model, opt, 1, llama_loss, seed=seed + s)
        record.append(opt.sampler.active)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def block_flags(sampler):
    return [all(p.requires_grad for p in sampler.block_parameters(i)) for i in range(sampler.n_blocks)]


def checkpoint_then_continue(model, opt, steps=8):
    """A weights-only-loadable checkpoint of ``model`` and ``opt`` now, then ``steps`` more steps of the
    original run: (checkpoint, the active blocks of each of those steps, the weights after them)."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    expected_active = []
    llama_train(model, opt, steps, seed=100, record=expected_active)
    assert len({tuple(a) for a in expected_active}) > 1  # the sampler moved during the continuation
    buf.seek(0)
    return torch.load(buf, weights_only=True), expected_active, snapshot(model)


def continues_like(model2, opt2, expected_active, expected, steps=8):
    """The resumed ``model2`` / ``opt2`` take the same blocks and reach the same weights as the original run."""
    assert block_flags(opt2.sampler) == [i in opt2.sampler.active for i in range(LAYERS)]
    active = []
    llama_train(model2, opt2, steps, seed=100, record=active)
    assert active == expected_active
    assert all(torch.equal(v, expected[k]) for k, v in model2.state_dict().items())


# ------------------------------------------------------------------------------------------ outlier ratios
def plant(linear, count, value):
    """Set ``count`` entries of a Linear weight (spread over rows and columns) to ``value``."""
    with torch.no_grad():
        flat = linear.weight.view(-1)
        idx = torch.arange(count) * (flat.numel() // count)
        flat[idx] = value


def test_planted_outliers_get_the_highest_ratio():
    model = tiny_llama()
    layers = model.model.layers
    plant(layers[2].self_attn.k_proj, 20, 1.0)  # random init is N(0, 0.02): 1.0 is 50 sigma
    plant(layers[0].self_attn.q_proj, 5, 1.0)
    ratios = gradproj.outlier_ratios(model)  # weights only, M = 13
    # a Gaussian has no entry above 13 x its mean |w| (~10 sigma): exactly the planted entries are outliers
    expected = torch.tensor([5, 0, 20, 0], dtype=torch.float64) / BLOCK_NUMEL
    assert torch.equal(ratios, expected), ratios
    calibrated = gradproj.outlier_ratios(model, batches=[token_batch(0), token_batch(1)])
    assert int(calibrated.argmax()) == 2
    assert calibrated[2] > calibrated[0] > calibrated[1] and calibrated[0] > calibrated[3]


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.drop = nn.Dropout(0.5)  # must be off during calibration
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.down(self.drop(torch.relu(self.up(x))))


class Stack(nn.Module):
    def __init__(self, d=6, h=10, n=3):
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_calibrated_ratios_match_a_hand_computation():
    model = Stack().double().train()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 6, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 6, dtype=torch.float64),
               torch.randn(3, 6, generator=g, dtype=torch.float64),
               {"x": torch.randn(1, 4, 6, generator=g, dtype=torch.float64)}]
    M = 2.5
    # by hand: every token's input to every Linear, then sqrt(mean of squares) per feature
    inputs = {id(lin): [] for b in model.blocks for lin in (b.up, b.down)}
    for batch in batches:
        x = (batch["x"] if isinstance(batch, dict) else batch).reshape(-1, 6)
        for b in model.blocks:
            inputs[id(b.up)].append(x)
            hidden = torch.relu(x @ b.up.weight.T + b.up.bias)
            inputs[id(b.down)].append(hidden)
            x = x + hidden @ b.down.weight.T
    hand_norms = {k: torch.cat(v).pow(2).mean(0).sqrt() for k, v in inputs.items()}
    hand = []
    for b in model.blocks:
        scores = torch.cat([(lin.weight.abs() * hand_norms[id(lin)]).flatten() for lin in (b.up, b.down)])
        hand.append(float((scores > M * scores.mean()).double().mean()))
    hand = torch.tensor(hand, dtype=torch.float64)
    assert (hand > 0).all() and (hand < 1).all()

    linears = [lin for b in model.blocks for lin in (b.up, b.down)]
    norms = gradproj.sampling.input_feature_norms(model, linears, batches)
    for lin in linears:
        torch.testing.assert_close(norms[id(lin)], hand_norms[id(lin)], rtol=1e-12, atol=0)
    ratios = gradproj.outlier_ratios(model, blocks=model.blocks, batches=batches, M=M)
    assert torch.equal(ratios, hand), (ratios, hand)
    weights_only = gradproj.outlier_ratios(None, blocks=model.blocks, M=M)
    assert not torch.equal(weights_only, ratios)  # the feature norms matter


def test_outlier_ratios_leave_the_model_unchanged():
    model = tiny_llama()
    model.train()
    model.model.layers[1].eval()  # a mixed train/eval state must come back as it was
    model.model.embed_tokens.weight.requires_grad_(False)
    before = snapshot(model)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    gradproj.outlier_ratios(model, batches=[{"input_ids": token_batch(0)}, token_batch(1)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    stack = Stack()
    stack.blocks.append(Boom())
    with pytest.raises(RuntimeError, match="boom"):  # hooks and modes restored on error too
        gradproj.outlier_ratios(stack, blocks=stack.blocks[:3], batches=[torch.randn(2, 6)])
    assert not any(m._forward_hooks for m in stack.modules()) and stack.training


def test_outlier_ratio_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="M = 0 must be a positive number"):
        gradproj.outlier_ratios(model, M=0)
    with pytest.raises(ValueError, match="no decoder blocks at model.model.layers"):
        gradproj.outlier_ratios(TinyNet())
    with pytest.raises(ValueError, match="blocks is empty"):
        gradproj.outlier_ratios(model, blocks=[])
    with pytest.raises(ValueError, match="contains no nn.Linear"):
        gradproj.outlier_ratios(model, blocks=[model.model.norm])
    with pytest.raises(ValueError, match="no calibration batch ran"):
        gradproj.outlier_ratios(model, batches=[])
    with pytest.raises(ValueError, match="batches need the model"):
        gradproj.outlier_ratios(None, blocks=model.model.layers, batches=[token_batch(0)])
    stack = Stack()
    with pytest.raises(ValueError, match="received no input during calibration"):
        gradproj.outlier_ratios(stack, blocks=[Block(6, 10)], batches=[torch.randn(2, 6)])


# ---------------------------------------------------------------------------------------------- sampler
def test_sampler_flags_draw_schedule_and_own_generator():
    model = tiny_llama(layers=6)
    model.model.embed_tokens.weight.requires_grad_(False)  # outside the blocks: never touched
    outside = [(p, p.requires_grad) for n, p in model.named_parameters() if ".layers." not in n]
    global_rng = torch.get_rng_state()
    sampler = gradproj.LayerSampler(model.model.layers, n_active=2, interval=3, seed=7)
    # the draws are torch.multinomial without replacement on the sampler's own generator
    ref = torch.Generator().manual_seed(7)
    uniform = torch.full((6,), 1 / 6, dtype=torch.float64)
    expected = [sorted(torch.multinomial(uniform, 2, replacement=False, generator=ref).tolist())]
    seen = [sampler.active]
    for step in range(1, 13):
        switched = sampler.step()
        assert switched == (step % 3 == 0)
        if switched:
            expected.append(sorted(torch.multinomial(uniform, 2, replacement=False, generator=ref).tolist()))
            seen.append(sampler.active)
        assert sampler.active == sorted(sampler.active) and len(set(sampler.active)) == 2
        assert block_flags(sampler) == [i in sampler.active for i in range(6)]
        assert not any(p.requires_grad for i in range(6) if i not in sampler.active
                       for p in sampler.block_parameters(i))
    assert seen == expected and len({tuple(s) for s in seen}) > 1
    assert sampler.steps == 12
    assert all(p.requires_grad == flag for p, flag in outside)
    assert torch.equal(torch.get_rng_state(), global_rng)


def test_draw_frequencies_follow_the_probabilities():
    blocks = [nn.Linear(2, 2) for _ in range(4)]
    probs = torch.tensor([1.0, 2.0, 3.0, 4.0])
    sampler = gradproj.LayerSampler(blocks, n_active=1, interval=1, probs=probs)
    counts = torch.zeros(4)
    for _ in range(4000):
        sampler.step()
        counts[sampler.active[0]] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, probs / probs.sum(), atol=0.03), freq
    # zero weight: never drawn
    sampler = gradproj.LayerSampler(blocks, n_active=2, interval=1, probs=[0.0, 1.0, 1.0, 1.0])
    for _ in range(50):
        sampler.step()
        assert 0 not in sampler.active


def test_probs_owl_is_the_normalised_weights_only_ratio():
    model = tiny_llama()
    plant(model.model.layers[1].mlp.up_proj, 6, 1.0)
    plant(model.model.layers[3].self_attn.v_proj, 2, 1.0)
    sampler = gradproj.LayerSampler(model.model.layers, n_active=1, interval=5, probs="owl")
    torch.testing.assert_close(sampler.probs, torch.tensor([0, 0.75, 0, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="no block has a weight above 13 x its mean"):
        gradproj.LayerSampler(tiny_llama().model.layers, n_active=1, interval=5, probs="owl")


def test_sampler_argument_errors():
    layers = tiny_llama().model.layers
    cases = [
        (dict(n_active=5, interval=2), ValueError, "n_active = 5 must be an integer between 1 and the number of blocks"),
        (dict(n_active=0, interval=2), ValueError, "n_active = 0"),
        (dict(n_active=1, interval=0), ValueError, "interval = 0 must be a positive integer"),
        (dict(n_active=1, interval=-3), ValueError, "interval = -3"),
        (dict(n_active=1, interval=2.5), ValueError, "interval = 2.5"),
        (dict(n_active=1, interval=2, probs=[1.0, 2.0]), ValueError, r"shape \(2,\); it needs one weight per block"),
        (dict(n_active=1, interval=2, probs=[1.0, -1.0, 1.0, 1.0]), ValueError, "finite and non-negative"),
        (dict(n_active=1, interval=2, probs=[1.0, math.nan, 1.0, 1.0]), ValueError, "finite and non-negative"),
        (dict(n_active=1, interval=2, probs=[0.0] * 4), ValueError, "all zero"),
        (dict(n_active=3, interval=2, probs=[1.0, 1.0, 0.0, 0.0]), ValueError, "only 2 of the 4 blocks"),
        (dict(n_active=1, interval=2, probs="lisa"), ValueError, "probs = 'lisa'"),
        (dict(n_active=1, interval=2, probs=object()), TypeError, "probs must be"),
        (dict(n_active=1, interval=2, seed=1.5), TypeError, "seed = 1.5"),
    ]
    flags = [p.requires_grad for p in layers.parameters()]
    for kwargs, exc, message in cases:
        with pytest.raises(exc, match=message):
            gradproj.LayerSampler(layers, **kwargs)
    assert [p.requires_grad for p in layers.parameters()] == flags  # nothing touched
    with pytest.raises(ValueError, match="blocks is empty"):
        gradproj.LayerSampler([], n_active=1, interval=1)
    shared = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="share a parameter"):
        gradproj.LayerSampler([nn.Sequential(shared), nn.Sequential(shared)], n_active=1, interval=1)


# ------------------------------------------------------------------------------------ with an optimizer
def galore_groups(model):
    return gradproj.param_groups(model, rank=4, update_proj_gap=2, scale=0.5, trainable_only=False)


def test_every_block_active_is_exactly_no_sampler():
    torch.manual_seed(0)
    plain_model, sampled_model = tiny_llama(), tiny_llama()
    plain = gradproj.GaLoreAdamW(galore_groups(plain_model), lr=1e-2)
    sampler = gradproj.LayerSampler(sampled_model.model.layers, n_active=LAYERS, interval=2, seed=3)
    sampled = gradproj.GaLoreAdamW(galore_groups(sampled_model), lr=1e-2, sampler=sampler)
    for s in range(7):
        for model, opt in ((plain_model, plain), (sampled_model, sampled)):
            train(model, opt, 1, llama_loss, seed=s)
    assert sampler.steps == 7
    expected = snapshot(plain_model)
    assert all(torch.equal(v, expected[k]) for k, v in sampled_model.state_dict().items())
    pairs = zip(plain_model.parameters(), sampled_model.parameters())
    for p, q in pairs:
        assert plain.state[p].keys() == sampled.state[q].keys()
        assert all(torch.equal(v, sampled.state[q][k]) for k, v in plain.state[p].items() if torch.is_tensor(v))


def test_deactivated_blocks_hold_no_state_and_memory_stays_bounded():
    model = tiny_llama()
    sampler = gradproj.LayerSampler(model.model.layers, n_active=1, interval=2, seed=0)
    opt = gradproj.GaLoreAdamW(galore_groups(model), lr=1e-2, sampler=sampler)
    outside = [p for n, p in model.named_parameters() if ".layers." not in n]
    peak, visited = 0, set()
    for s in range(16):
        ids = token_batch(s)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        # set_to_none=False keeps zero grads of trainable params; deactivated blocks must have none left
        opt.zero_grad(set_to_none=False)
        visited.update(sampler.active)
        for i in range(LAYERS):
            for p in sampler.block_parameters(i):
                if i not in sampler.active:
                    assert p not in opt.state and p.grad is None and not p.requires_grad
        peak = max(peak, gradproj.optimizer_state_bytes(opt)["total"])
    assert len(visited) >= 3  # several blocks took turns
    # bound: one block's GaLore state (rank 4, right/left projection by shape) + AdamW state of the rest
    def galore_bytes(m, n, r=4):
        return 4 * ((r * n + 2 * m * r) if m >= n else (m * r + 2 * r * n))
    block = model.model.layers[0]
    one_block = sum(galore_bytes(*lin.weight.shape) for lin in gradproj.sampling.block_linears(block))
    one_block += sum(2 * 4 * p.numel() for p in block.parameters() if p.dim() == 1)
    always = sum(2 * 4 * p.numel() for p in outside)
    assert peak == one_block + always, (peak, one_block + always)


def three_blocks():
    """Three float64 ``nn.Linear`` blocks of different shapes, an identical copy of each for a reference, and
    ``loss(mods, which)``: a sum of independent terms, one per block in ``which``."""
    torch.manual_seed(0)
    shapes = [(12, 7), (7, 12), (9, 9)]
    blocks = nn.ModuleList(nn.Linear(n, m, bias=False).double() for m, n in shapes)
    ref_blocks = [nn.Linear(n, m, bias=False).double() for m, n in shapes]
    for a, b in zip(ref_blocks, blocks):
        a.weight.data.copy_(b.weight.data)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(20, n, generator=g, dtype=torch.float64), torch.randn(20, m, generator=g, dtype=torch.float64))
            for m, n in shapes]

    def loss(mods, which=range(3)):
        return sum(((torch.tanh(mods[i](data[i][0])) - data[i][1]) ** 2).mean() for i in which)

    return blocks, ref_blocks, loss


def test_reactivated_block_starts_fresh_like_the_reference():
    """Blocks step like a plain GaLore reference that is created when a block is drawn and dropped when it
    leaves: a fresh basis from the first gradient after the return, zero moments, bias correction from 1."""
    blocks, ref_blocks, loss = three_blocks()
    sampler = gradproj.LayerSampler(blocks, n_active=1, interval=3, seed=2)
    # the reference: exact SVD, every matrix refreshed at t % T == 0
    opt = gradproj.GaLoreAdamW([{"params": blocks.parameters(), "rank": 3, "update_proj_gap": 2, "scale": 0.5}],
                               lr=2e-2, sampler=sampler, projector="svd", refresh_stagger=False)
    refs = {}
    history = []
    for step in range(24):
        active = sampler.active
        history.append(active[0])
        for i in list(refs):
            if i not in active:
                del refs[i]
        for i in active:
            refs.setdefault(i, ReferenceGaLore([ref_blocks[i].weight], lr=2e-2, rank=3, gap=2, alpha=0.5))
        for mods in (blocks, ref_blocks):
            for mod in mods:
                mod.weight.grad = None
        loss(blocks).backward()
        opt.step()
        loss(ref_blocks, active).backward()
        for i in active:
            refs[i].step()
        for a, b in zip(blocks, ref_blocks):
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-10, atol=1e-12)
    returns = [i for k, i in enumerate(history) if k and i != history[k - 1] and i in history[:k]]
    assert returns, history  # a block left and came back


def test_layerwise_hooks_blocks_activated_after_construction():
    """Blocks that were frozen when the optimizer was built are hooked too: once drawn, their gradients are
    consumed during backward (none is left after it), and training equals normal mode bit for bit."""
    models = [tiny_llama(), tiny_llama()]
    opts = []
    for model, layerwise in zip(models, (False, True)):
        sampler = gradproj.LayerSampler(model.model.layers, n_active=1, interval=2, seed=1)
        opts.append(gradproj.GaLoreAdamW(galore_groups(model), lr=1e-2, sampler=sampler, layerwise=layerwise))
    sampler = opts[1].sampler
    frozen_at_start = set(range(LAYERS)) - set(sampler.active)
    trained_later = set()
    for s in range(10):
        for model, opt in zip(models, opts):
            ids = token_batch(s)
            model(input_ids=ids, labels=ids).loss.backward()
            if opt is opts[1]:
                assert all(p.grad is None for p in model.parameters()), s  # active blocks included
                trained_later.update(frozen_at_start & set(sampler.active))
            opt.step()
            opt.zero_grad()
        assert opts[0].sampler.active == sampler.active
    assert trained_later, "no block frozen at construction was drawn"
    expected = snapshot(models[0])
    assert all(torch.equal(v, expected[k]) for k, v in models[1].state_dict().items())
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert opts[0].state[p].keys() == opts[1].state[q].keys()
        assert all(torch.equal(v, opts[1].state[q][k]) for k, v in opts[0].state[p].items() if torch.is_tensor(v))


def test_frozen_block_params_must_be_in_the_optimizer():
    model = tiny_llama()
    sampler = gradproj.LayerSampler(model.model.layers, n_active=1, interval=2)
    groups = gradproj.param_groups(model, rank=4, update_proj_gap=2)  # trainable_only: frozen blocks left out
    with pytest.raises(ValueError, match=r"trainable_only=False"):
        gradproj.GaLoreAdamW(groups, sampler=sampler)
    opt = gradproj.GaLoreAdamW(galore_groups(model), sampler=sampler)
    with pytest.raises(ValueError, match="already drives another optimizer"):
        gradproj.GaLoreAdamW(galore_groups(model), sampler=sampler)
    assert opt.sampler is sampler


def test_resume_with_a_fresh_sampler_of_another_seed_is_bit_identical():
    calib = [{"input_ids": token_batch(50)}]
    model = tiny_llama()
    opt = gradproj.owlore(model, n_active=2, interval=3, rank=4, update_proj_gap=2, batches=calib, M=3, lr=1e-2)
    train(model, opt, 7, llama_loss)
    ckpt, expected_active, expected = checkpoint_then_continue(model, opt)
    assert ckpt["opt"]["gradproj"]["sampler"]["generator"].dtype == torch.uint8
    model2 = tiny_llama(seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2 = gradproj.owlore(model2, n_active=2, interval=3, rank=4, update_proj_gap=2, probs="uniform", seed=123,
                           lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.sampler.steps == 7 and torch.equal(opt2.sampler.probs, opt.sampler.probs)
    continues_like(model2, opt2, expected_active, expected)


def test_bad_sampler_checkpoint_raises_before_anything_loads():
    model = tiny_llama()
    opt = gradproj.owlore(model, n_active=2, interval=3, rank=4, probs="uniform", lr=1e-2)
    train(model, opt, 4, llama_loss)
    sd = opt.state_dict()
    model2 = tiny_llama()
    opt2 = gradproj.owlore(model2, n_active=1, interval=3, rank=4, probs="uniform", lr=1e-2)
    active = opt2.sampler.active
    with pytest.raises(ValueError, match="n_active = 2, this sampler 1"):
        opt2.load_state_dict(sd)
    assert len(opt2.state) == 0 and opt2.sampler.active == active and opt2.sampler.steps == 0


def test_owlore_on_a_small_llama():
    model = tiny_llama(layers=6)
    calib = [{"input_ids": token_batch(90, batch=4)}]
    opt = gradproj.owlore(model, n_active=2, interval=4, batches=calib, M=3, lr=1e-2)
    sampler = opt.sampler
    torch.testing.assert_close(sampler.probs.sum(), torch.tensor(1.0, dtype=torch.float64))
    ratios = gradproj.outlier_ratios(model, batches=calib, M=3)
    torch.testing.assert_close(sampler.probs, ratios / ratios.sum())
    projected = opt.param_groups[-1]
    assert projected["rank"] == HIDDEN // 4 and projected["update_proj_gap"] == 100 and projected["scale"] == 1.0
    assert len(projected["params"]) == 6 * 7  # every block Linear, frozen ones included
    assert opt.param_groups[0]["lr"] == 1e-2
    head, emb = model.lm_head.weight, model.model.embed_tokens.weight
    losses = []
    for s in range(12):
        before = snapshot(model)
        frozen = [i for i in range(6) if i not in sampler.active]
        ids = token_batch(s % 3)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
        for i in frozen:
            for n, p in model.model.layers[i].named_parameters():
                assert torch.equal(p, before[f"model.layers.{i}.{n}"])
        assert not torch.equal(head, before["lm_head.weight"]) and not torch.equal(emb, before["model.embed_tokens.weight"])
    assert losses[-1] < losses[0]


def test_owlore_errors_leave_the_model_as_it_was():
    model = tiny_llama()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="no block has outlier scores above M = 13"):
        gradproj.owlore(model, n_active=2, interval=3)  # random init: nothing above 13 x mean
    with pytest.raises(ValueError, match="n_active = 5"):
        gradproj.owlore(model, interval=3, probs="uniform")  # the recipe's 5 of 4 blocks
    with pytest.raises(TypeError, match="unexpected option"):
        gradproj.owlore(model, n_active=2, interval=3, probs="uniform", bogus=1)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_sampler_with_torch_adamw_frees_state_when_given_the_optimizer():
    model = TinyNet()
    sampler = gradproj.LayerSampler([model.fc1, model.fc2], n_active=1, interval=1, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(6):
        tiny_loss(model, tiny_batch(s)).backward()
        opt.step()
        sampler.step(opt)
        opt.zero_grad()
        off = model.fc2 if sampler.active == [0] else model.fc1
        assert all(p not in opt.state for p in off.parameters())


@pytest.mark.gpu
def test_owlore_on_cuda_matches_cpu_ratios_and_resumes():
    calib = [{"input_ids": token_batch(50)}]
    cpu_ratios = gradproj.outlier_ratios(tiny_llama(), batches=calib, M=3)
    model = tiny_llama().cuda()
    torch.testing.assert_close(gradproj.outlier_ratios(model, batches=calib, M=3), cpu_ratios, rtol=0, atol=2e-3)
    opt = gradproj.owlore(model, n_active=2, interval=2, rank=4, update_proj_gap=2, batches=calib, M=3, lr=1e-2)

    train(model, opt, 5, llama_loss)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 4, llama_loss, seed=100)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = tiny_llama(seed=3).cuda()
    model2.load_state_dict(ckpt["model"])
    opt2 = gradproj.owlore(model2, n_active=2, interval=2, rank=4, update_proj_gap=2, probs="uniform", seed=9,
                           lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, 4, llama_loss, seed=100)
    assert opt2.sampler.active == opt.sampler.active
    for (k, v), w in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, w), k
