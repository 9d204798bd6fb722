"""Small deterministic training problems shared by the tests."""

from __future__ import annotations

import math

import torch
from torch import nn


def matrix_problem(shapes, seed=0, dtype=torch.float32, batch=None):
    """One weight per shape and a nonlinear least-squares loss whose gradients have a decaying spectrum.

    Returns ``(params, loss_fn)``; ``loss_fn(params)`` evaluates the loss for any list of same-shaped params.
    """
    g = torch.Generator().manual_seed(seed)
    params, data = [], []
    for m, n in shapes:
        b = batch or 2 * max(m, n)
        W = (torch.randn(m, n, generator=g) / math.sqrt(n)).to(dtype)
        decay = torch.logspace(0, -2, n)  # input features of decaying scale -> decaying gradient spectrum
        X = (torch.randn(b, n, generator=g) * decay).to(dtype)
        Y = torch.randn(b, m, generator=g).to(dtype) * 0.5
        params.append(nn.Parameter(W))
        data.append((X, Y))

    def loss_fn(ps):
        return sum(((torch.tanh(X @ W.T) - Y) ** 2).mean() for W, (X, Y) in zip(ps, data))

    return params, loss_fn


def clone_params(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def run(opt, params, loss_fn, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


class TinyNet(nn.Module):
    """Embedding, two Linears with bias, a norm and an output head: every kind of tensor a LM has."""

    def __init__(self, vocab=23, dim=16, hidden=40, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        return self.head(self.norm(h))


def tiny_batch(seed=0, vocab=23, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n,), generator=g)
    return x, (x * 7 + 3) % vocab


def tiny_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).float(), y)


def direct_svd_projector() -> str:
    """Register (once) an exact-SVD projector that does not declare its basis orthonormal; return its name.

    Residual rules and the norm-growth limiter then take their direct path (materialising B(R) and S), the
    readable form the factored fast path is checked against.
    """
    import gradproj
    from gradproj.projectors import PROJECTORS, SVDProjector

    if "svd_direct" not in PROJECTORS:
        gradproj.register_projector(type("DirectSVDProjector", (SVDProjector,), {"name": "svd_direct", "orthonormal": False}))
    return "svd_direct"
