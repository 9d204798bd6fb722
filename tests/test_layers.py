"""The layering contract of docs/architecture.md ("Layers"), checked on the source: which gradproj modules
may import which at module level (what runs on import; imports inside functions and under
``if TYPE_CHECKING:`` are free).

Layers, bottom to top; a module imports only from its own layer or below:

    0  state_layout, validation                           plain definitions
    1  projectors, inner, residual, kernels               the axes
    2  models, registry, memory, memory_estimate, sampling the core's services
    3  optimizers, gradproj (the package root)             the optimizers and the public API
    4  distributed, integrations                           torchrun, FSDP2, per-GPU estimate; Trainer adapter
    5  train, __main__                                     the gradproj command

and no two top-level units import each other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gradproj"

LAYERS = {
    "state_layout": 0, "validation": 0, "options": 0,
    "projectors": 1, "inner": 1, "residual": 1, "kernels": 1,
    "models": 2, "registry": 2, "memory": 2, "memory_estimate": 2, "sampling": 2,
    "optimizers": 3, "": 3,
    "distributed": 4, "integrations": 4,
    "train": 5, "__main__": 5,
}
AXES = ("projectors", "inner", "residual", "kernels", "state_layout", "validation", "options")
ABOVE_THE_CORE = ("train", "distributed")
#: imports that break the contract, each with the reason it is still there (none today; an entry must be a
#: real import, so the list can only shrink)
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = ("gradproj", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def unit(name: str) -> str:
    """The top-level unit of a module: ``projectors`` for gradproj.projectors.svd, ``""`` for the root."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_nodes(body: list[ast.stmt]):
    """Statements executed when the module is imported: not in functions, not under TYPE_CHECKING."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and _type_checking(node.test):
            yield from _import_time_nodes(node.orelse)
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                stmts = [c for c in children if isinstance(c, ast.stmt)]
                handlers = [c for c in children if isinstance(c, ast.ExceptHandler)]
                yield from _import_time_nodes(stmts)
                for h in handlers:
                    yield from _import_time_nodes(h.body)


def module_imports(name: str) -> set[str]:
    """The gradproj modules ``name`` imports at module level (relative imports resolved)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if is_package(name) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _import_time_nodes(tree.body):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "gradproj")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "gradproj":
                continue
            for alias in node.names:  # `from . import kernels` imports the module gradproj.kernels
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    return {m for m in out if m in MODULES or m == "gradproj"}


IMPORTS = {name: module_imports(name) for name in MODULES}
EDGES = {(a, b) for a, targets in IMPORTS.items() for b in targets}


def test_every_module_has_a_layer():
    missing = sorted({unit(m) for m in MODULES} - set(LAYERS))
    assert not missing, f"place these in LAYERS (and in docs/architecture.md, Layers): {missing}"


def test_imports_point_down_the_layers():
    up = sorted((a, b) for a, b in EDGES - KNOWN_EXCEPTIONS if LAYERS[unit(b)] > LAYERS[unit(a)])
    assert not up, "module-level imports of a higher layer:\n" + "\n".join(f"  {a} -> {b}" for a, b in up)


def test_train_and_distributed_are_above_the_core():
    bad = sorted((a, b) for a, b in EDGES - KNOWN_EXCEPTIONS
                 if unit(b) in ABOVE_THE_CORE and unit(a) not in (*ABOVE_THE_CORE, "__main__")
                 and not (unit(a) == "distributed" and unit(b) == "train"))
    assert not bad, "core modules importing the command or distributed layers:\n" + "\n".join(
        f"  {a} -> {b}" for a, b in bad)
    assert not any(unit(a) == "distributed" and unit(b) == "train" for a, b in EDGES)


@pytest.mark.parametrize("axis", AXES)
def test_axes_import_no_optimizers_train_distributed_or_sampling(axis):
    bad = sorted((a, b) for a, b in EDGES if unit(a) == axis
                 and unit(b) in ("optimizers", "train", "distributed", "sampling", "registry", ""))
    assert not bad, "\n".join(f"{a} -> {b}" for a, b in bad)


def test_sampling_does_not_import_the_optimizers():
    assert not [(a, b) for a, b in EDGES if unit(a) == "sampling" and unit(b) == "optimizers"]


def test_no_import_cycles_between_subpackages():
    graph: dict[str, set[str]] = {}
    for a, b in EDGES:
        if unit(a) != unit(b):
            graph.setdefault(unit(a), set()).add(unit(b))
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles between subpackages: {cycles}"


def test_known_exceptions_are_still_real():
    # an exception whose import is gone must leave the list, so the contract only tightens
    assert KNOWN_EXCEPTIONS <= EDGES


def test_the_walker_sees_what_it_must():
    # relative imports are resolved, function-level and TYPE_CHECKING imports are not counted
    assert "gradproj.models" in IMPORTS["gradproj.memory_estimate"]
    assert "gradproj.kernels" in IMPORTS["gradproj.optimizers.base"]  # `from .. import kernels`
    assert "gradproj.optimizers.compiled" in IMPORTS["gradproj.optimizers.engine"]  # `from . import compiled`
    assert not any(m.startswith("gradproj.optimizers") for m in IMPORTS["gradproj.sampling.owlore"])
    assert "gradproj.train.loop" not in IMPORTS["gradproj.train.cli"]  # imported inside cmd_train
