"""The schema of param-group options: every option is declared once, with its default, check and doc.

The optimizer declares its own options (:data:`OPTIMIZER_OPTIONS`) and the projection keys
(:data:`PROJECTION_OPTIONS`); each projector, inner rule and residual rule declares the options it reads in
its ``options`` class attribute. When a group is added (and before every step) the optimizer writes the
defaults of the options the group uses into it, checks every value, and refuses keys that no axis declares
(:func:`gradproj.validation.refuse_unknown`, with a close-match suggestion). :func:`options_table` renders
the whole schema as the options table of ``docs/options.md``; a test keeps that page equal to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from .validation import check_bool, check_number, is_number

#: ``Option.default`` of a key that is not written into groups: its absence means something (``rank``)
ABSENT: Any = type("ABSENT", (), {"__repr__": lambda self: "(absent)"})()

Check = Callable[[Any, str, str], None]  # (value, option name, where) -> None or raises ValueError


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    doc: str
    check: Check | None = None


# ---------------------------------------------------------------------------------------------- checks
def number(**bounds: Any) -> Check:
    """A finite number within ``bounds`` (the keywords of :func:`gradproj.validation.check_number`)."""

    def check(value: Any, name: str, where: str) -> None:
        check_number(value, name, where, **bounds)

    return check


def boolean(value: Any, name: str, where: str) -> None:
    check_bool(value, name, where)


def choice(*values: Any, allow_none: bool = False) -> Check:
    def check(value: Any, name: str, where: str) -> None:
        if value is None and allow_none:
            return
        if not isinstance(value, (str, bool, type(None))) or value not in values:
            options = ", ".join(repr(v) for v in values) + (", None" if allow_none else "")
            raise ValueError(f"{where}: {name} = {value!r}; use one of {options}")

    return check


def pair(first: Check, second: Check, what: str) -> Check:
    """A tuple or list of two values, each checked (``what`` says what the pair is)."""

    def check(value: Any, name: str, where: str) -> None:
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise ValueError(f"{where}: {name} = {value!r} must be a pair ({what})")
        first(value[0], f"{name}[0]", where)
        second(value[1], f"{name}[1]", where)

    return check


def unit_interval(value: Any, name: str, where: str) -> None:
    """A number in [0, 1) (a moment's decay)."""
    if not (is_number(value) and 0.0 <= float(value) < 1.0):
        raise ValueError(f"{where}: {name} = {value!r} must be in [0, 1)")


# ------------------------------------------------------------------------------------- declaring axes
class Configurable:
    """Mixin of every axis: ``options`` declares the group keys it reads; ``defaults`` is derived from it.

    A subclass that still declares only ``defaults`` (a dict) gets options without checks from it.
    """

    options: ClassVar[tuple[Option, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "options" in cls.__dict__:
            cls.defaults = {o.name: o.default for o in cls.options if o.default is not ABSENT}
        elif "defaults" in cls.__dict__:
            cls.options = tuple(Option(k, v, "") for k, v in cls.defaults.items())

    @classmethod
    def apply_options(cls, group: dict, where: str) -> None:
        """Write the defaults of the options missing from ``group`` and check every value."""
        for option in cls.options:
            if option.name not in group:
                if option.default is ABSENT:
                    continue
                group[option.name] = option.default
            if option.check is not None:
                option.check(group[option.name], option.name, where)


def option_names(classes: Iterable[type]) -> set[str]:
    return {o.name for cls in classes for o in getattr(cls, "options", ())}


# ------------------------------------------------------------------------------------------ the table
def _default_text(value: Any) -> str:
    return "(absent)" if value is ABSENT else f"`{value!r}`"


def options_table() -> str:
    """The Markdown table of every option: the optimizer's, then each registered axis's (docs/options.md)."""
    from .inner import INNER_RULES
    from .optimizers.engine import OPTIMIZER_OPTIONS, PROJECTION_OPTIONS
    from .projectors import PROJECTORS
    from .residual import RESIDUALS

    lines = ["| option | default | who reads it | meaning |", "|---|---|---|---|"]

    def rows(options: Iterable[Option], who: str) -> None:
        for o in options:
            lines.append(f"| `{o.name}` | {_default_text(o.default)} | {who} | {o.doc} |")

    rows(OPTIMIZER_OPTIONS, "every optimizer")
    rows(PROJECTION_OPTIONS, "projected groups")
    for kind, registry in (("inner", INNER_RULES), ("projector", PROJECTORS), ("residual", RESIDUALS)):
        for name in sorted(registry):
            cls = registry[name]
            own = [o for o in cls.options if not any(o in base.__dict__.get("options", ()) for base in cls.__mro__[1:])]
            rows(own, f"{kind}=`{name}`")
    return "\n".join(lines) + "\n"
