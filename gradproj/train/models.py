"""Building a LLaMA model from a configuration of :mod:`gradproj.models` (the papers' table).

The shapes (``LlamaShape``, ``LLAMA_CONFIGS``, ``get_shape``) live in the core module
:mod:`gradproj.models` and are re-exported here; the models follow the GaLore / Fira pre-training
experiments (SiLU, RMSNorm eps 1e-6, init 0.02, untied input and output embeddings).
"""

from __future__ import annotations

import torch

from ..models import LLAMA_CONFIGS, MODEL_NAMES, LlamaShape, get_shape


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
    except ImportError as err:  # pragma: no cover - transformers is a dependency of gradproj
        raise ImportError("building LLaMA models needs transformers: pip install transformers") from err

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
    return model.to(device=device, dtype=dtype)  # type: ignore[call-arg]  # transformers' decorated to()


__all__ = ["LLAMA_CONFIGS", "MODEL_NAMES", "LlamaShape", "build_model", "get_shape"]
