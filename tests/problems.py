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

    def loss_fn(ps, index=None):  # fixed data: train()'s micro-batch index is not used
        return sum(((torch.tanh(X @ W.T) - Y) ** 2).mean() for W, (X, Y) in zip(ps, data))

    return params, loss_fn


def clone_params(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


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
    logits = model(x)  # half precision is upcast to float32; float32 and float64 stay as they are
    return torch.nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y)


def batch_loss(model, batch):
    """TinyNet's loss on micro-batch number ``batch`` (:func:`tiny_batch`): train()'s default loss."""
    return tiny_loss(model, tiny_batch(batch))


def train(target, opt, steps, loss_fn=batch_loss, *, micro=1, scheduler=None, seed=0):
    """Run ``steps`` optimizer steps; return each step's loss (the mean over its micro-batches).

    One step: ``opt.zero_grad()``; for each of ``micro`` micro-batches ``loss_fn(target, i).backward()``,
    with ``i = seed + step * micro + j`` for the j-th micro-batch (so a run cut in two and resumed with
    ``seed`` = the micro-batches taken so far sees the same data); ``opt.step()``; ``scheduler.step()`` if
    given. ``target`` is what ``loss_fn`` takes: a model (the default loss is TinyNet's on :func:`tiny_batch`)
    or a list of parameters (the loss functions of fixed data, such as :func:`matrix_problem`'s, ignore
    ``i``). Gradients are left as the last step leaves them (consumed in per-layer mode, else the last
    backward's).
    """
    losses = []
    for s in range(steps):
        opt.zero_grad()
        total = 0.0
        for i in range(micro):
            loss = loss_fn(target, seed + s * micro + i)
            loss.backward()
            total += loss.item()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(total / micro)
    return losses


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


def float64_svd_projector() -> str:
    """Register (once) ``svd_fp64``: the ``svd`` projector's bases from an SVD taken in float64, each singular
    vector with its largest entry positive; return its name.

    For comparing two runs whose gradients differ by float64 rounding. ``svd`` decomposes ``G.float()``
    whatever the parameter dtype and keeps LAPACK's signs, which are not continuous in the matrix: a
    difference of one ulp can flip a singular vector (seen with gradients differing by 1e-15 relative,
    singular values well apart), and with moments kept across refreshes a flip at one refresh but not the
    next moves the weights by O(lr). Here the basis is a continuous function of G (save for exact ties).
    """
    import gradproj
    from gradproj.projectors import PROJECTORS, SVDProjector
    from gradproj.projectors.linalg import canonical_signs_

    if "svd_fp64" not in PROJECTORS:
        class Float64SVDProjector(SVDProjector):
            name = "svd_fp64"

            def compute_basis(self, G, state, step):
                U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
                r, dtype = self.rank, G.dtype
                left = canonical_signs_(U[:, :r].contiguous(), dim=0).to(dtype)
                right = canonical_signs_(Vh[:r].contiguous(), dim=1).to(dtype)
                if self.side == "right":
                    return {"proj": right}
                if self.side == "left":
                    return {"proj": left}
                return {"proj_left": left, "proj_right": right}

        gradproj.register_projector(Float64SVDProjector)
    return "svd_fp64"
