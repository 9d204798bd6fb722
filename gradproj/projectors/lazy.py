"""Q-GaLore's layer-wise lazy refresh (Zhang et al., arXiv 2407.08296), the group option ``refresh="lazy"``.

Each matrix keeps a queue of the cosine similarities between the first basis vector of consecutive refreshes
(the first row of a right basis, the first column of a left one). Once the queue holds ``lazy_queue_size``
values and their mean is at least ``lazy_cos_threshold``, the matrix's gap is multiplied by
``lazy_gap_factor`` (``int(gap · γ)``), and the matrix is then refreshed when ``t % gap == 0`` with its own
gap (with ``refresh_stagger``, when ``(t - offset) % gap == 0``: the matrix keeps its phase,
:mod:`gradproj.projectors.schedule`). As in the reference package (q-galore-torch 1.0,
``GaLoreProjector.project``):

* the first refresh only records the vector; the queue grows from the second refresh on;
* the queue is never cleared: it is a sliding window of the last ``lazy_queue_size`` similarities, so a
  matrix whose subspace stays stable doubles its gap at every refresh after the window filled;
* the similarity is signed (a sign flip of the first singular vector counts as dissimilar);
* the gap is an int that only grows.

State per matrix (all declared in :func:`layout`, checked on load, bit-exact on resume): ``lazy_queue``, a
float32 tensor of ``lazy_queue_size`` slots (oldest first), ``lazy_count``, how many slots are filled, and
``lazy_gap``, the matrix's current gap. A refresh that keeps the previous basis (a NaN gradient, a failed
decomposition) records nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..options import Option, choice, number
from ..state_layout import Spec, scalar_int

QUEUE_KEY, COUNT_KEY, GAP_KEY = "lazy_queue", "lazy_count", "lazy_gap"
KEYS = (QUEUE_KEY, COUNT_KEY, GAP_KEY)

OPTIONS = (
    Option(
        "refresh",
        "fixed",
        "when bases are refreshed: `'fixed'` (every `update_proj_gap` steps) or `'lazy'` (Q-GaLore: each "
        "matrix multiplies its own gap by `lazy_gap_factor` once its subspace is stable)",
        choice("fixed", "lazy"),
    ),
    Option(
        "lazy_queue_size",
        5,
        "`refresh='lazy'`: how many cosine similarities of consecutive first basis vectors are averaged",
        number(integer=True, minimum=1),
    ),
    Option(
        "lazy_cos_threshold",
        0.4,
        "`refresh='lazy'`: the gap grows when the mean similarity of a full queue is at least this",
        number(minimum=-1.0, maximum=1.0),
    ),
    Option(
        "lazy_gap_factor",
        2,
        "`refresh='lazy'`: γ, the gap becomes `int(gap · γ)` when it grows",
        number(minimum=1.0),
    ),
)


def enabled(group: dict) -> bool:
    return group.get("refresh", "fixed") == "lazy"


def layout(group: dict) -> dict[str, Spec]:
    """The state keys of the lazy rule (empty unless ``refresh="lazy"``)."""
    if not enabled(group):
        return {}
    size = int(group["lazy_queue_size"])
    return {
        QUEUE_KEY: Spec((size,), requires=(COUNT_KEY, GAP_KEY)),
        COUNT_KEY: scalar_int(),
        GAP_KEY: scalar_int(),
    }


def first_vectors(bases: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The first basis vector of each side of ``bases`` (``Projector.basis_matrices``), cloned and flattened."""
    vectors = []
    if "left" in bases:
        vectors.append(bases["left"][:, :1].clone().flatten())
    if "right" in bases:
        vectors.append(bases["right"][:1, :].clone().flatten())
    return vectors


def record(state: dict, group: dict, gap: int, previous: list[torch.Tensor] | None, new: list[Any]) -> None:
    """After a refresh that replaced the basis: push the similarity of ``previous`` and ``new`` first vectors
    into the queue and grow the gap when the queue is full and its mean reaches the threshold.

    ``gap``: the group's ``update_proj_gap``, the matrix's gap until the first refresh stores its own.
    """
    size = int(group["lazy_queue_size"])
    if GAP_KEY not in state:
        device = new[0].device if new else "cpu"
        state[QUEUE_KEY] = torch.zeros(size, dtype=torch.float32, device=device)
        state[COUNT_KEY] = 0
        state[GAP_KEY] = int(gap)
    if not previous:
        return
    # signed cosine, in the basis dtype, as the reference computes it; for `full`, the mean over both sides
    sims = [F.cosine_similarity(a, b, dim=0).item() for a, b in zip(previous, new)]
    sim = sims[0] if len(sims) == 1 else float(torch.tensor(sum(sims) / len(sims), dtype=torch.float32))
    count = state[COUNT_KEY]
    queue = state[QUEUE_KEY].tolist()[:count]
    if count == size:
        queue.pop(0)
    queue.append(sim)
    state[COUNT_KEY] = len(queue)
    state[QUEUE_KEY].copy_(torch.tensor(queue + [0.0] * (size - len(queue)), dtype=torch.float32))
    # the reference's test: a Python sum of the queue, oldest first, divided by the queue size
    if len(queue) == size and sum(queue) / size >= float(group["lazy_cos_threshold"]):
        state[GAP_KEY] = int(state[GAP_KEY] * group["lazy_gap_factor"])
