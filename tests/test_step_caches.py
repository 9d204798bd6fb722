"""What the step derives once and reuses: plans and projectors per group version, the moments' buffers."""

from __future__ import annotations

import torch

import gradproj
from problems import matrix_problem, train


def test_plan_is_reused_until_the_group_changes():
    params, loss_fn = matrix_problem([(20, 12), (12, 20)], seed=0)
    group = {"params": params, "rank": 3, "update_proj_gap": 3, "scale": 0.5, "projector": "randomized_svd"}
    opt = gradproj.GaLoreAdamW([group], lr=1e-2)
    train(params, opt, 2, loss_fn)
    g, eng = opt.param_groups[0], opt.engine
    first, again = eng.plan(params[0], g), eng.plan(params[0], g)
    assert first is not again and first.projector is again.projector  # a copy per step, one projector
    assert first.projector.group["rsvd_oversample"] == 8
    g["rsvd_oversample"] = 2
    train(params, opt, 1, loss_fn)  # the step validates the changed group: a new version
    changed = eng.plan(params[0], g)
    assert changed.projector is not first.projector and changed.projector.group["rsvd_oversample"] == 2
    g["lr"] = 5e-3  # lr is not part of the plan
    train(params, opt, 1, loss_fn)
    assert eng.plan(params[0], g).projector is changed.projector


def test_projectors_that_keep_state_between_steps_are_not_reused():
    params, loss_fn = matrix_problem([(20, 12)], seed=1)
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": 3, "update_proj_gap": 3, "scale": 0.5,
                                 "projector": "random"}], lr=1e-2)
    train(params, opt, 2, loss_fn)
    g = opt.param_groups[0]
    assert opt.engine.plan(params[0], g).projector is not opt.engine.plan(params[0], g).projector


def test_project_rule_does_not_keep_the_old_basis_between_refreshes():
    """moments_on_refresh="project" snapshots the old basis at a refresh; a reused projector must not hold it
    (one more basis per matrix) once the refresh is done."""
    params, loss_fn = matrix_problem([(20, 12)], seed=2)
    opt = gradproj.GaLoreAdamW([{"params": params, "rank": 3, "update_proj_gap": 2, "scale": 0.5,
                                 "moments_on_refresh": "project"}], lr=1e-2)
    train(params, opt, 4, loss_fn)  # refreshes at t = 0 and 2
    assert opt.engine.plan(params[0], opt.param_groups[0]).projector.previous is None
    assert torch.isfinite(params[0]).all()
