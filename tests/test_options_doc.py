"""docs/options.md holds the table generated from the option declarations, so the two cannot drift apart."""

from pathlib import Path

from gradproj.options import BEGIN, END, options_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "options.md"


def test_options_page_is_the_generated_table(monkeypatch):
    from gradproj.projectors import PROJECTORS

    for name, cls in list(PROJECTORS.items()):  # left out: bases other tests register (svd_fp64, tests/problems.py)
        if not cls.__module__.startswith("gradproj."):
            monkeypatch.delitem(PROJECTORS, name)
    text = DOC.read_text()
    assert BEGIN in text and END in text
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == options_table().strip(), (
        "docs/options.md is out of date: regenerate its table with gradproj.options.options_table()"
    )


def test_every_registered_axis_and_option_is_in_the_table():
    from gradproj.inner import INNER_RULES
    from gradproj.optimizers.engine import OPTIMIZER_OPTIONS, PROJECTION_OPTIONS
    from gradproj.projectors import PROJECTORS
    from gradproj.residual import RESIDUALS

    table = options_table()
    for option in (*OPTIMIZER_OPTIONS, *PROJECTION_OPTIONS):
        assert f"| `{option.name}` |" in table
    for kind, registry in (("inner", INNER_RULES), ("projector", PROJECTORS), ("residual", RESIDUALS)):
        for name, cls in registry.items():
            for option in cls.options:
                assert f"| `{option.name}` | " in table and f"{kind}=`{name}`" in table, (kind, name, option.name)
