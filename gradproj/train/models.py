"""LLaMA configurations by name (the papers' table) and building a model from one.

The shapes are those of the GaLore / Fira pre-training experiments (SiLU, RMSNorm eps 1e-6, init 0.02,
untied input and output embeddings). The papers use a 32000-token vocabulary; ``gradproj train`` takes the
vocabulary size from its tokenizer instead (256 for the default byte-level tokenizer), while
:mod:`gradproj.memory_estimate` uses 32000 unless told otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch


@dataclass(frozen=True)
class LlamaShape:
    """The numbers that determine a LLaMA model's parameter and activation sizes."""

    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int = 32000

    def with_vocab(self, vocab: int) -> "LlamaShape":
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


def get_shape(name: str) -> LlamaShape:
    try:
        return LLAMA_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(LLAMA_CONFIGS)}") from None


def build_model(
    name: str | LlamaShape,
    vocab_size: int,
    max_seq_len: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """A freshly initialised ``transformers.LlamaForCausalLM`` of configuration ``name`` (or a shape).

    Initialisation draws from the global torch RNG after ``torch.manual_seed(seed)``, so the same
    arguments give the same weights.
    """
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as err:  # pragma: no cover - transformers is part of the [hf] extra
        raise ImportError("building LLaMA models needs transformers: pip install 'gradproj[hf]'") from err

    shape = get_shape(name) if isinstance(name, str) else name
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        num_hidden_layers=shape.layers,
        max_position_embeddings=max_seq_len,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype)
