"""Every provider of the kernel operations against :class:`gradproj.kernels.protocol.KernelOps`.

The optimizer core calls its kernels through ``ctx.ops``: the torch reference, the Triton module, or the
FSDP2 wrapper ``ShardedOps`` around either. Each must provide every operation of the protocol, callable,
with the protocol's parameters (names, order, kinds and defaults), so an operation added to one provider
and not the others (or with another signature) fails here rather than at some user's first sharded or
Triton step.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import gradproj
from gradproj import kernels
from gradproj.distributed.sharding import ShardedOps
from gradproj.kernels import reference
from gradproj.kernels.protocol import OPS, KernelOps

ROOT = Path(gradproj.__file__).parent


def parameters(fn) -> list[tuple[str, object, object]]:
    """(name, kind, default) of each parameter, ``self`` of a protocol method left out."""
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [(p.name, p.kind, p.default) for p in params]


def providers():
    out = [("reference", reference)]
    if kernels.triton_import_error() is None:
        out.append(("triton", kernels.load_triton_ops()))
    # the sharded wrapper, without a process group (its methods and signatures do not depend on one)
    out.append(("sharded", ShardedOps(reference, None, None)))
    return out


def test_ops_lists_every_protocol_method_and_nothing_else():
    declared = [name for name, value in vars(KernelOps).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert list(OPS) == declared and kernels.OPS == OPS
    assert len(set(OPS)) == len(OPS)


@pytest.mark.parametrize("name,ops", providers(), ids=[n for n, _ in providers()])
def test_provider_has_every_operation_with_the_protocol_signature(name, ops):
    missing = [op for op in OPS if not callable(getattr(ops, op, None))]
    assert not missing, f"{name} lacks {missing}"
    assert isinstance(ops, KernelOps)
    for op in OPS:
        expected = parameters(getattr(KernelOps, op))
        assert parameters(getattr(ops, op)) == expected, f"{name}.{op}: signature differs from KernelOps.{op}"


def test_triton_module_provides_every_operation():
    """Named separately so that a machine without triton shows the skip (the parametrized test omits it)."""
    if kernels.triton_import_error() is not None:
        pytest.skip("triton not installed")
    ops = kernels.load_triton_ops()
    for op in OPS:
        assert parameters(getattr(ops, op)) == parameters(getattr(KernelOps, op)), op


def test_sharded_ops_defines_each_operation_itself():
    """ShardedOps must give each operation its distributed meaning; nothing may reach the wrapped module
    implicitly, and an unknown name raises with a message that says what to do."""
    for op in OPS:
        assert op in vars(ShardedOps), f"ShardedOps does not define {op}"
    with pytest.raises(AttributeError, match="no sharded form"):
        ShardedOps(reference, None, None).not_an_operation  # noqa: B018


def ops_calls_in_core() -> set[str]:
    """The attribute names the package calls on ``ctx.ops`` / ``plan.ops`` / a local ``ops`` (the core's
    spellings of the kernels module), found in the source."""
    names = set()
    for path in ROOT.rglob("*.py"):
        if path.parts[-2] == "kernels" or path.name == "sharding.py":
            continue  # the providers themselves
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if (isinstance(owner, ast.Attribute) and owner.attr == "ops") or (
                    isinstance(owner, ast.Name) and owner.id == "ops"
                ):
                    names.add(node.func.attr)
    return names


def test_every_operation_the_core_calls_is_in_the_protocol():
    called = ops_calls_in_core()
    assert {"adam_update", "apply_update", "fira_residual_factors", "norm_growth_divisor"} <= called  # the scan works
    assert called <= set(OPS), f"called through ops but not in KernelOps: {sorted(called - set(OPS))}"
