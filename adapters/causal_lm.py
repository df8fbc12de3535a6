"""Adapter for Hugging Face decoder-only causal LMs: Llama (SmolLM2 is a Llama), Mistral, Qwen2, Qwen3 and the
Gemma3 text model.

The decoder is ``model.model``. A policy manages the full-attention layers only: those whose ``config.layer_types``
entry is ``"full_attention"`` (Gemma3, Qwen2, Qwen3) or, for configs without ``layer_types``, every layer when
``config.sliding_window`` is unset (Llama) and none when it is set (Mistral applies its window to every layer).
Sliding-window layers are left unmanaged: their window is applied by the ``namm_evicting`` attention mask and the cache
drops the tokens that fell out of it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from namm_transfer.adapters.base import (
    ModelGeometry,
    attach_transformers_module,
    cache_argument,
    register_adapter,
)
from namm_transfer.runtime.cache import EvictingCache


@register_adapter("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
class CausalLMAdapter:
    """A ``*ForCausalLM`` whose decoder is ``model.model`` with ``.layers``."""

    name = "causal_lm"

    def decoder(self, model: nn.Module) -> nn.Module:
        decoder = getattr(model, "model", None)
        if decoder is None or not hasattr(decoder, "layers"):
            raise ValueError(f"{type(model).__name__} is not a causal LM with a decoder at .model.layers")
        return decoder

    def geometry(self, model: nn.Module) -> ModelGeometry:
        config = self.decoder(model).config
        num_layers = config.num_hidden_layers
        num_q_heads = config.num_attention_heads
        layer_types = getattr(config, "layer_types", None)
        if layer_types is None:
            sliding = getattr(config, "sliding_window", None) is not None
            layer_types = ["sliding_attention" if sliding else "full_attention"] * num_layers
        managed = frozenset(i for i, kind in enumerate(layer_types[:num_layers]) if kind == "full_attention")
        return ModelGeometry(
            num_layers=num_layers,
            num_q_heads=num_q_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_q_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_q_heads,
            managed_layers=managed,
        )

    def attach(self, model: nn.Module) -> Callable[[], None]:
        return attach_transformers_module(self.decoder(model))

    def forward_chunk(
        self,
        model: nn.Module,
        cache: EvictingCache,
        *,
        position_ids: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with ``last_only``."""
        outputs = model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
            **{cache_argument(model): cache},
        )
        return outputs.logits
