"""Every optimizer × every registered projector × every step mode, with bad input in every option it declares.

The cases are generated, not listed: each option key the optimizer holds in its param groups (its own
options, the projection keys, and those of every registered projector and residual rule) is set to each
junk value, between two steps, on the projected group. Whatever the key, ``step()`` must then either

* raise ``ValueError`` / ``TypeError`` that names the param group and the key, with the weights and every
  optimizer-state tensor bit-identical to before the call, or
* accept the value (it is valid for that key) and keep the weights finite.

Gradient faults (NaN at a first refresh, a sparse gradient, a gradient of the wrong shape) are crossed the
same way. A new optimizer, projector or option is covered without new test code.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradproj
from gradproj.projectors import PROJECTORS
from problems import TinyNet, tiny_batch, tiny_loss, train
from test_reliability import assert_unchanged, frozen

OPTIMIZERS = {
    "galore_adamw": (gradproj.GaLoreAdamW, {}),
    "fira_adamw": (gradproj.FiraAdamW, {}),
    "frugal_adamw": (gradproj.FrugalAdamW, {}),
    "galore_adamw8bit": (gradproj.GaLoreAdamW8bit, {"min_8bit_size": 16}),
    "galore_adafactor": (gradproj.GaLoreAdafactor, {"relative_step": False, "lr": 1e-2}),
}
MODES = ["normal", "foreach", "layerwise"]
JUNK = [float("nan"), float("inf"), -1, "junk", None, [1, 2], True]
#: what each projector needs beyond rank / update_proj_gap / scale to be built at all
PROJECTOR_GROUP = {"golore": {"golore_switch_step": 2}}


def _build(opt_name, projector, mode):
    cls, kwargs = OPTIMIZERS[opt_name]
    model = TinyNet()
    group = {"projector": projector, **PROJECTOR_GROUP.get(projector, {})}
    groups = gradproj.param_groups(model, rank=4, update_proj_gap=2, scale=0.5, **group)
    kwargs = dict(kwargs)
    kwargs.setdefault("lr", 1e-2)
    if mode == "foreach":
        kwargs["foreach"] = True
    if mode == "layerwise":
        kwargs["layerwise"] = True
    return model, cls(groups, **kwargs)


def _cases():
    for opt_name in OPTIMIZERS:
        for projector in sorted(PROJECTORS):
            for mode in MODES:
                if mode == "foreach" and opt_name != "galore_adamw":
                    continue  # the batched step is GaLore-Adam's; other optimizers ignore the option
                yield pytest.param(opt_name, projector, mode, id=f"{opt_name}-{projector}-{mode}")


def _ok_error(err: BaseException, key: str | None) -> bool:
    text = str(err)
    return isinstance(err, (ValueError, TypeError)) and "param group" in text and (key is None or key in text)


@pytest.mark.parametrize("opt_name,projector,mode", list(_cases()))
def test_every_option_with_junk_raises_before_any_change_or_trains_finite(opt_name, projector, mode):
    model, opt = _build(opt_name, projector, mode)
    train(model, opt, 2)
    group = opt.param_groups[-1]
    keys = sorted(k for k in opt.engine.group_keys() if k in group and k != "params")
    assert {"rank", "scale", "lr", "weight_decay", "projector"} <= set(keys)
    tried = accepted = 0
    for key in keys:
        original = group[key]
        for junk in JUNK:
            if junk is None and original is None:
                continue
            tried += 1
            group[key] = junk
            before = frozen(model, opt)
            opt.zero_grad()
            try:
                tiny_loss(model, tiny_batch(2)).backward()
                opt.step()
            except Exception as err:  # noqa: BLE001 - the kind of error is what is checked
                assert _ok_error(err, key), (key, junk, repr(err))
                assert_unchanged(model, opt, before)  # per-layer mode too: options are checked at the first hook
                group[key] = original
                continue
            accepted += 1
            group[key] = original
            assert all(torch.isfinite(p).all() for p in model.parameters()), (key, junk)
            # an accepted value leaves the optimizer usable
            train(model, opt, 1, seed=3)
    assert tried > 0 and accepted < tried


GRADIENT_FAULTS = ["nan_first_refresh", "sparse", "wrong_shape"]


def _fault_cases():
    for case in _cases():
        opt_name, projector, mode = case.values
        for fault in GRADIENT_FAULTS:
            # per-layer mode steps parameters during backward; a basis that is not computed from the gradient
            # (identity) takes a NaN gradient as AdamW does
            if mode == "layerwise" or (fault == "nan_first_refresh" and not PROJECTORS[projector].refreshes):
                continue
            yield pytest.param(opt_name, projector, mode, fault, id=f"{case.id}-{fault}")


@pytest.mark.parametrize("opt_name,projector,mode,fault", list(_fault_cases()))
def test_gradient_faults_raise_before_any_change(opt_name, projector, mode, fault):
    model, opt = _build(opt_name, projector, mode)
    if fault != "nan_first_refresh":
        train(model, opt, 1, seed=0)
    opt.zero_grad()
    tiny_loss(model, tiny_batch(1)).backward()
    last = model.fc2.weight  # projected, and stepped after fc1 and the unprojected tensors of group 0
    if fault == "nan_first_refresh":
        last.grad[0, 0] = math.nan
    elif fault == "sparse":
        last.grad = last.grad.to_sparse()
    else:
        last.grad.set_(torch.zeros(3, 3))
    before = frozen(model, opt)
    with pytest.raises((ValueError, TypeError)) as info:
        opt.step()
    assert "param group 1, parameter 1" in str(info.value)
    assert_unchanged(model, opt, before)
