"""The Adapter protocol: what the runtime needs to know about a model family, and a registry by model type.

An adapter tells the evicting runtime (``namm_transfer.runtime``) four things about a model, and nothing else:

1. which module holds the attention layers whose KV cache is managed (:meth:`Adapter.decoder`): the decoder of a
   causal LM, only ``model.model.language_model`` of LLaVA-NeXT-Video (the vision tower is left alone), the GPT-2
   backbone of a Decision Transformer;
2. its geometry (:class:`ModelGeometry`): layers, query/KV heads, head dim, and which layers a policy manages
   (e.g. Gemma3's sliding-window layers are not);
3. how to route those layers' attention through the ``namm_evicting`` attention function and back
   (:meth:`Adapter.attach` returns the function that restores the model);
4. how to run one forward chunk from token ids *or* input embeddings, with explicit position ids and the cache
   (:meth:`Adapter.forward_chunk`). Nothing assumes token ids or RoPE: a video adapter feeds embeddings it built
   from frames, the Decision Transformer feeds (R, s, a) embeddings with all-zero position ids; the cache counts
   arrivals itself (``EvictingLayer.arrival``).

Adapters register under the ``model.config.model_type`` values they serve (:func:`register_adapter`) and are found
with :func:`adapter_for`.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from namm_transfer.runtime.attention import register_attention
from namm_transfer.runtime.cache import EvictingCache


@dataclass(frozen=True)
class ModelGeometry:
    """Shape facts of the managed decoder.

    Attributes:
        num_layers: attention layers of the decoder (= cache layers).
        num_q_heads: query heads per layer.
        num_kv_heads: key/value heads per layer (num_q_heads is a multiple of it: GQA).
        head_dim: size of one head.
        managed_layers: layers an eviction policy manages; the others keep their tokens.
    """

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    managed_layers: frozenset[int]

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_heads >= 1 and self.num_q_heads % self.num_kv_heads:
            problems.append(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads {self.num_kv_heads}")
        if not set(self.managed_layers) <= set(range(self.num_layers)):
            problems.append(f"managed_layers {sorted(self.managed_layers)} must lie in [0, {self.num_layers})")
        if problems:
            raise ValueError("invalid ModelGeometry: " + "; ".join(problems))


@runtime_checkable
class Adapter(Protocol):
    """What the runtime calls for one model family. Adapters hold no per-model state."""

    name: str

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module whose attention layers the evicting cache holds; nothing outside it is changed."""
        ...

    def geometry(self, model: nn.Module) -> ModelGeometry:
        """Layers, heads and managed layers of :meth:`decoder`."""
        ...

    def attach(self, model: nn.Module) -> Callable[[], None]:
        """Route the decoder's attention through ``namm_evicting``; return a function restoring the model."""
        ...

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
        """Feed one chunk through the model with ``cache``.

        Args:
            model: the full model.
            cache: the evicting cache of this batch of sequences.
            position_ids: (B, T) int64 positions the model uses (absolute, or zeros for a model without them).
            input_ids: (B, T) token ids, or None when ``inputs_embeds`` is given (exactly one of the two).
            inputs_embeds: (B, T, hidden) embeddings.
            last_only: compute the output of the last position only.

        Returns:
            (B, T, ...) or, with ``last_only``, (B, 1, ...) model outputs: logits for language models.
        """
        ...


_REGISTRY: dict[str, type] = {}
_BUILTIN_ADAPTER_MODULES = ("namm_transfer.adapters.causal_lm", "namm_transfer.adapters.decision_transformer",
                            "namm_transfer.adapters.llava_next_video")
"""Modules of the adapters shipped with the package; imported (so they register) on the first look-up."""


def register_adapter(*model_types: str) -> Callable[[type], type]:
    """Class decorator: register an adapter class for the given ``config.model_type`` values.

    Registering another class under a taken model type raises ValueError.
    """
    if not model_types:
        raise ValueError("register_adapter needs at least one model type")

    def decorate(cls: type) -> type:
        for model_type in model_types:
            taken = _REGISTRY.get(model_type)
            if taken is not None and taken is not cls:
                raise ValueError(f"model type {model_type!r} already has adapter {taken.__name__}")
            _REGISTRY[model_type] = cls
        return cls

    return decorate


def known_model_types() -> list[str]:
    """Model types that have an adapter (the shipped ones and any registered since), sorted."""
    for module_name in _BUILTIN_ADAPTER_MODULES:
        importlib.import_module(module_name)
    return sorted(_REGISTRY)


def adapter_for(model: nn.Module) -> Adapter:
    """A new adapter for ``model``, chosen by ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = known_model_types()
    if model_type not in _REGISTRY:
        raise ValueError(f"no adapter for model type {model_type!r}; known: {', '.join(known)}")
    return _REGISTRY[model_type]()


def attach_transformers_module(module: nn.Module) -> Callable[[], None]:
    """Switch a transformers ``PreTrainedModel`` (and the submodels sharing its config) to ``namm_evicting``.

    Registers the attention function first (explicitly, never at import). Returns the function that switches the
    module back to the implementation it had.
    """
    previous = module.config._attn_implementation
    module.set_attn_implementation(register_attention())
    return lambda: module.set_attn_implementation(previous)


def cache_argument(module: nn.Module) -> str:
    """Name of the forward argument that takes a ``Cache``: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (earlier 5.x)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
