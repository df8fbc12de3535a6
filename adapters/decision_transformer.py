"""Adapter for ``transformers.DecisionTransformerModel`` (Chen et al. 2021, "Decision Transformer: Reinforcement
Learning via Sequence Modeling"): cached incremental inference over a whole episode.

A DT reads the sequence R_1, s_1, a_1, R_2, s_2, a_2, ... (return-to-go, state, action per timestep; three tokens a
timestep). Each token is its modality's linear embedding plus a learned embedding of its timestep, then
``embed_ln``; the GPT-2 backbone (``model.encoder``) gets all-zero position ids, so time lives only in the
embeddings and eviction cannot break positions (field-notes.md §5). The action a_t is read from the output at the
s_t token (``predict_action``).

Incremental inference feeds each new token once, through an :class:`~namm_transfer.runtime.cache.EvictingCache`
on the backbone: the adapter redoes the embedding exactly as ``DecisionTransformerModel.forward`` does for those
tokens, so with a full cache the actions equal the model's own forward over the whole episode.

Token order is fixed, so a cached slot's arrival index says what it holds: arrival ``i`` is of type
``i % 3`` (:data:`TOKEN_TYPES`: return, state, action) at timestep ``i // 3`` (:func:`token_type`,
:func:`token_timestep`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from namm_transfer.adapters.base import ModelGeometry, attach_transformers_module, cache_argument, register_adapter
from namm_transfer.runtime.cache import EvictingCache

TOKEN_TYPES = ("return", "state", "action")
"""What the token at arrival index ``i`` holds: ``TOKEN_TYPES[i % 3]``."""


def token_type(arrival: torch.Tensor) -> torch.Tensor:
    """Type code (0 return, 1 state, 2 action) of the tokens with arrival indices ``arrival`` (any shape)."""
    return arrival % 3


def token_timestep(arrival: torch.Tensor) -> torch.Tensor:
    """Episode timestep (0-based) of the tokens with arrival indices ``arrival`` (any shape)."""
    return torch.div(arrival, 3, rounding_mode="floor")


@register_adapter("decision_transformer")
class DecisionTransformerAdapter:
    """A ``DecisionTransformerModel``; the managed decoder is its GPT-2 backbone ``model.encoder`` (every layer)."""

    name = "decision_transformer"

    def decoder(self, model: nn.Module) -> nn.Module:
        encoder = getattr(model, "encoder", None)
        if encoder is None or not hasattr(encoder, "h"):
            raise ValueError(f"{type(model).__name__} is not a DecisionTransformerModel with a GPT-2 .encoder")
        return encoder

    def geometry(self, model: nn.Module) -> ModelGeometry:
        config = self.decoder(model).config
        return ModelGeometry(
            num_layers=config.n_layer,
            num_q_heads=config.n_head,
            num_kv_heads=config.n_head,
            head_dim=config.hidden_size // config.n_head,
            managed_layers=frozenset(range(config.n_layer)),
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
        """Backbone hidden states (B, T, hidden) of the embedded tokens ``inputs_embeds`` (B, T, hidden), or
        (B, 1, hidden) with ``last_only``. A DT has no token ids: ``input_ids`` must be None."""
        if input_ids is not None or inputs_embeds is None:
            raise ValueError("a Decision Transformer is fed embeddings (inputs_embeds), not token ids")
        encoder = self.decoder(model)
        hidden = encoder(
            inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=True, **{cache_argument(encoder): cache}
        ).last_hidden_state
        return hidden[:, -1:] if last_only else hidden

    @staticmethod
    def embed(
        model: nn.Module,
        kind: int,
        values: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Embeddings (B, 1, hidden) of one token per row, as ``DecisionTransformerModel.forward`` makes them.

        Args:
            model: the DT.
            kind: 0 return-to-go (``values`` (B, 1), already scaled), 1 state (``values`` (B, state_dim), already
                normalised), 2 action (``values`` (B, act_dim)).
            timesteps: (B,) int64 timestep of the token.
        """
        layer = (model.embed_return, model.embed_state, model.embed_action)[kind]
        embedded = layer(values) + model.embed_timestep(timesteps)
        return model.embed_ln(embedded)[:, None]
