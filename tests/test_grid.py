"""Every projector x inner rule x residual rule (x one- or two-sided projection), enumerated from the
registries so that a newly registered axis joins the grid by itself.

Each combination either is refused when the param group is built, by a ValueError that names the group,
or trains: three steps (crossing the refresh at t = 2) leave finite weights and a finite loss that does
not blow up. A combination may not be accepted at construction and then fail in the step.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradproj
from gradproj.inner import INNER_RULES
from gradproj.projectors import PROJECTORS
from gradproj.residual import RESIDUALS
from problems import matrix_problem, train

PROJ_TYPES = ("std", "full")  # one-sided (a left and a right matrix below) and two-sided
#: options, for whichever axis declares them, that make its distinctive path run in a 3-step test: the 8-bit rule
#: keeps tensors smaller than min_8bit_size in float32, GoLore needs its switch to the random phase set (at the
#: refresh of t = 2)
AT_TEST_SIZE = {"min_8bit_size": 0, "golore_switch_step": 2}
BASELINE = {"projector": "svd", "inner": "adam", "residual": "none", "proj_type": "std"}
LR = 1e-2
STEPS = 3


def group_options(projector, inner, residual):
    """The group options of a combination beyond the axes' names: the inner rule's defaults with the lr they
    accept (a rule whose own step-size schedule refuses an external lr, Adafactor's relative step, gets
    lr=None), and the AT_TEST_SIZE options of the axes that declare them."""
    rule = INNER_RULES[inner]
    options = {**rule.defaults, "lr": LR}
    try:
        rule().validate_lr({**options, "state_dtype": None}, "probe")
    except ValueError:
        options["lr"] = None
    for cls in (rule, PROJECTORS[projector], RESIDUALS[residual]):
        options.update({o.name: AT_TEST_SIZE[o.name] for o in cls.options if o.name in AT_TEST_SIZE})
    return options


def build(projector, inner, residual, proj_type):
    if inner == "adam8bit":
        pytest.importorskip("bitsandbytes")
    params, loss_fn = matrix_problem([(12, 8), (8, 12)], seed=0)  # a left and a right projection at std
    group = {"params": params, "rank": 2, "update_proj_gap": 2, "scale": 1.0, "projector": projector,
             "inner": inner, "residual": residual, "proj_type": proj_type,
             **group_options(projector, inner, residual)}
    return params, loss_fn, lambda: gradproj.GaLoreAdamW([group], lr=LR)


def check_trains(params, loss_fn, opt):
    start = [p.detach().clone() for p in params]
    losses = train(params, opt, STEPS, loss_fn)
    final = loss_fn(params).item()
    assert all(math.isfinite(x) for x in [*losses, final]), losses
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, w) for p, w in zip(params, start)), "nothing trained"
    # decreasing, or at least bounded: three steps of size ~lr cannot do more than nudge the loss
    assert final < losses[0] or max(losses[1:] + [final]) < 1.5 * losses[0], (losses, final)


GRID = [
    pytest.param(projector, inner, residual, proj_type, id=f"{projector}-{inner}-{residual}-{proj_type}")
    for projector in sorted(PROJECTORS)
    for inner in sorted(INNER_RULES)
    for residual in sorted(RESIDUALS)
    for proj_type in PROJ_TYPES
]


@pytest.mark.parametrize("projector,inner,residual,proj_type", GRID)
def test_combination_is_refused_clearly_or_trains(projector, inner, residual, proj_type):
    params, loss_fn, make = build(projector, inner, residual, proj_type)
    try:
        opt = make()
    except ValueError as err:
        assert str(err).startswith("param group 0"), err
        return
    check_trains(params, loss_fn, opt)


AXES = [
    pytest.param(axis, value, id=f"{axis}={value}")
    for axis, values in (("projector", PROJECTORS), ("inner", INNER_RULES), ("residual", RESIDUALS),
                         ("proj_type", PROJ_TYPES))
    for value in sorted(values)
]


@pytest.mark.parametrize("axis,value", AXES)
def test_every_axis_value_trains_with_the_baseline(axis, value):
    """So that the grid cannot pass by refusing everything: each projector, inner rule, residual rule and
    side, with GaLore's choices on the other axes, is accepted and trains."""
    params, loss_fn, make = build(**{**BASELINE, axis: value})
    check_trains(params, loss_fn, make())
