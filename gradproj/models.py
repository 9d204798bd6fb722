"""LLaMA configurations by name: the shapes of the GaLore / Fira pre-training experiments.

Only numbers live here (no model is built), so the memory estimators can size a configuration without
transformers; :func:`gradproj.train.models.build_model` builds a ``LlamaForCausalLM`` from a shape. The
papers use a 32000-token vocabulary; ``gradproj train`` takes the vocabulary size from its tokenizer
instead (256 for the default byte-level tokenizer), while :mod:`gradproj.memory_estimate` uses 32000
unless told otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class LlamaShape:
    """The numbers that determine a LLaMA model's parameter and activation sizes."""

    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int = 32000

    def with_vocab(self, vocab: int) -> LlamaShape:
        return replace(self, vocab=vocab)

    def as_dict(self) -> dict:
        return asdict(self)


#: the GaLore paper's configurations, plus ``tiny``: the default of ``gradproj train``, small enough to train visibly on
#: two CPU cores in about a minute (the llama_9m block shapes over a byte vocabulary).
LLAMA_CONFIGS: dict[str, LlamaShape] = {
    "tiny": LlamaShape(128, 352, 4, 4, vocab=256),
    "llama_9m": LlamaShape(128, 352, 4, 4),
    "llama_20m": LlamaShape(256, 688, 4, 4),
    "llama_35m": LlamaShape(384, 1024, 8, 6),
    "llama_60m": LlamaShape(512, 1376, 8, 8),
    "llama_130m": LlamaShape(768, 2048, 12, 12),
    "llama_350m": LlamaShape(1024, 2736, 16, 24),
    "llama_1b": LlamaShape(2048, 5461, 32, 24),
    "llama_7b": LlamaShape(4096, 11008, 32, 32),
}

#: the configuration names, in table order
MODEL_NAMES: tuple[str, ...] = tuple(LLAMA_CONFIGS)


def get_shape(name: str) -> LlamaShape:
    try:
        return LLAMA_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(LLAMA_CONFIGS)}") from None


__all__ = ["LLAMA_CONFIGS", "MODEL_NAMES", "LlamaShape", "get_shape"]
