"""gradproj.registry: the one table of names the command, the estimators and the tests read."""

import json

import pytest

import gradproj
from gradproj import inner, projectors, registry, residual
from gradproj.memory_estimate import estimate_memory
from gradproj.state_layout import Spec
from gradproj.train import optimizers as train_optimizers
from gradproj.train.cli import main
from optim_table import OPTIMIZERS as TEST_TABLE

GRADPROJ = [name for name, entry in registry.OPTIMIZERS.items() if entry.is_gradproj]


def test_the_axes_tables_are_the_registry_tables():
    assert registry.INNER_RULES is inner.INNER_RULES
    assert registry.PROJECTORS is projectors.PROJECTORS
    assert registry.RESIDUALS is residual.RESIDUALS
    assert registry.register_projector is projectors.register_projector is gradproj.register_projector
    assert registry.register_inner is inner.register_inner_rule
    assert registry.inner_names() == ["adafactor", "adam", "adam8bit"]
    assert {"svd", "eigh", "randomized_svd", "dct", "random", "golore", "identity"} <= set(registry.projector_names())
    assert set(registry.residual_names()) >= {"none", "fira", "frugal"}
    for name, cls in registry.INNER_RULES.items():
        assert cls.name == name


@pytest.mark.parametrize("name", GRADPROJ)
def test_gradproj_entries_state_the_rules_of_their_class(name):
    entry = registry.OPTIMIZERS[name]
    cls = entry.resolve()
    assert cls is not None and issubclass(cls, gradproj.ProjectedOptimizer)
    assert cls.inner_rule is registry.get_inner(entry.inner)
    assert cls.default_residual == entry.residual


def test_the_command_reads_the_registry():
    assert train_optimizers.OPTIMIZERS is registry.OPTIMIZERS
    assert train_optimizers.get_spec("galore_8bit") is registry.OPTIMIZERS["galore_adamw8bit"]
    assert train_optimizers.available_projectors() == registry.projector_names()


def test_every_registered_gradproj_optimizer_is_in_the_generic_test_table():
    assert set(GRADPROJ) <= {spec.optimizer for spec in TEST_TABLE}
    for spec in TEST_TABLE:
        assert spec.cls is registry.get_optimizer(spec.optimizer).resolve()


def test_aliases_map_to_one_canonical_name():
    assert registry.OPTIMIZER_ALIASES == {"galore": "galore_adamw", "fira": "fira_adamw",
                                          "galore_8bit": "galore_adamw8bit"}
    for alias, name in registry.OPTIMIZER_ALIASES.items():
        assert registry.canonical_optimizer(alias) == name
        assert registry.get_optimizer(alias) is registry.OPTIMIZERS[name]
        assert alias in registry.OPTIMIZERS[name].aliases
    assert registry.optimizer_names() == list(registry.OPTIMIZERS)
    assert set(registry.optimizer_names(aliases=True)) == set(registry.OPTIMIZERS) | set(registry.OPTIMIZER_ALIASES)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        registry.get_optimizer("sgd")


def test_registering_an_optimizer_reaches_the_command_and_the_estimator(capsys):
    entry = registry.OptimizerEntry("gradproj:FiraAdamW", 5e-3, residual="fira", aliases=("my_fira_alias",),
                                    help="a test entry")
    try:
        registry.register_optimizer("my_fira", entry)
        assert registry.OPTIMIZERS["my_fira"].name == "my_fira"
        est = estimate_memory("llama_60m", "my_fira_alias", rank=128)
        assert est.optimizer == "my_fira"
        assert est.optimizer_states == estimate_memory("llama_60m", "fira_adamw", rank=128).optimizer_states
        assert train_optimizers.get_spec("my_fira").lr == 5e-3
        assert main(["list"]) == 0
        assert "my_fira" in capsys.readouterr().out
        with pytest.raises(ValueError, match="already registered"):
            registry.register_optimizer("other", registry.OptimizerEntry("gradproj:GaLoreAdamW", 1e-2,
                                                                         aliases=("galore",)))
        with pytest.raises(ValueError, match="unknown inner rule 'lion'"):
            registry.register_optimizer("lion", registry.OptimizerEntry("x:Lion", 1e-4, inner="lion"))
    finally:
        registry.OPTIMIZERS.pop("my_fira", None)
        registry.OPTIMIZER_ALIASES.pop("my_fira_alias", None)
    assert "other" not in registry.OPTIMIZERS and "lion" not in registry.OPTIMIZERS


def test_list_prints_every_registered_name(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*registry.OPTIMIZERS, *registry.OPTIMIZER_ALIASES, *registry.PROJECTORS, *registry.INNER_RULES,
                 *registry.RESIDUALS]:
        assert name in out, name


def test_memory_command_takes_every_registered_name(capsys):
    assert main(["memory", "--model", "llama_60m", "--optimizer", "galore_8bit", "--projector", "eigh", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["optimizer"] == "galore_adamw8bit" and d["settings"]["projector"] == "eigh"
    with pytest.raises(SystemExit):
        main(["memory", "--optimizer", "sgd"])
    assert "invalid choice: 'sgd'" in capsys.readouterr().err


def test_external_entries_describe_their_own_state():
    # torch's AdamW keeps a float32 step tensor per parameter; transformers' Adafactor float32 statistics
    assert registry.OPTIMIZERS["adamw"].extra_state == {"step": Spec(())}
    assert registry.OPTIMIZERS["adafactor"].state_dtype == "float32"
    assert not any(registry.OPTIMIZERS[n].projected for n in ("adamw", "adamw8bit", "adafactor"))
