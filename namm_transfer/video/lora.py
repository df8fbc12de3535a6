"""Low-rank adapters on the embedded video model's language model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", §4.1): ``y = W x + (alpha / r) B A x`` with ``W`` frozen, ``A`` (r, in) drawn N(0, 1/in) and
``B`` (out, r) zero, so a fresh adapter leaves the model unchanged.

Why the embedded model needs them: the frozen SmolLM2-135M does not answer the built-in multiple-choice questions
even when the video is replaced by an exact text description of its needles (12 held-out questions per kind: colour
2, shape 4, count 2, order 2 right, chance 3; it answers "A" almost always; ``docs/results/video-training/``), nor
does it answer in the options' words (0 of 36 colour, shape and count questions: it writes a sentence instead), so
no vision tower can lift it to the accuracy the video table needs. LLaVA's second stage fine-tunes the language model
(Liu et al. 2023, §4.2); a rank-8 adapter on the attention projections does it here in a few MB.

Training wraps the target ``nn.Linear`` modules in :class:`LoraLinear` (:func:`attach_lora`); inference merges each
adapter into its weight and puts the plain ``nn.Linear`` back (:func:`merge_lora`), so the runtime and the NAMM see
an ordinary Llama attention. The adapter tensors are stored with the vision parts under
``<module path>.lora_a`` / ``.lora_b`` (:data:`LORA_SUFFIXES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LORA_SUFFIXES = (".lora_a", ".lora_b")
"""State-dict suffixes of the adapter tensors."""


@dataclass(frozen=True)
class LoraConfig:
    """Adapters on the language model.

    Attributes:
        rank: adapter rank r (0: no adapters).
        alpha: scale numerator; the update is multiplied by alpha / rank.
        targets: names of the ``nn.Linear`` modules adapted in every decoder layer (Llama naming).
    """

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        problems = []
        if self.rank < 0:
            problems.append(f"rank must be >= 0, got {self.rank}")
        if not self.alpha > 0:
            problems.append(f"alpha must be positive, got {self.alpha}")
        if self.rank and not self.targets:
            problems.append("targets must name at least one module")
        if problems:
            raise ValueError("invalid LoraConfig: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: the wrapped layer, weight (out, in).
        rank: r.
        scale: alpha / r.
        generator: draws ``lora_a`` (N(0, 1/in)); ``lora_b`` starts at zero.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = scale
        out_features, in_features = base.weight.shape
        self.lora_a = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        return self.base(x) + self.scale * ((x @ self.lora_a.T.to(x.dtype)) @ self.lora_b.T.to(x.dtype))

    def merged(self) -> nn.Linear:
        """The base layer with ``scale * B @ A`` added to its weight (in place)."""
        with torch.no_grad():
            delta = self.scale * (self.lora_b.float() @ self.lora_a.float())
            self.base.weight.add_(delta.to(self.base.weight.dtype))
        return self.base


def attach_lora(language_model: nn.Module, config: LoraConfig, seed: int = 0) -> list[LoraLinear]:
    """Wrap every target ``nn.Linear`` of ``language_model`` in a :class:`LoraLinear` (in module order, seeded);
    returns the wrappers (none when ``config.rank`` is 0)."""
    if not config.rank:
        return []
    generator = torch.Generator().manual_seed(seed)
    targets = [(name, module) for name, module in language_model.named_modules()
               if name.rsplit(".", 1)[-1] in config.targets and isinstance(module, nn.Linear)]
    if not targets:
        raise ValueError(f"the language model has no nn.Linear named {', '.join(config.targets)}")
    wrappers = []
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = language_model.get_submodule(parent_name) if parent_name else language_model
        wrapper = LoraLinear(module, config.rank, config.scale, generator).to(module.weight.device)
        setattr(parent, child, wrapper)
        wrappers.append(wrapper)
    return wrappers


def merge_lora(language_model: nn.Module) -> int:
    """Replace every :class:`LoraLinear` in ``language_model`` by its merged ``nn.Linear``; returns how many."""
    wrapped = [(name, module) for name, module in language_model.named_modules() if isinstance(module, LoraLinear)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = language_model.get_submodule(parent_name) if parent_name else language_model
        setattr(parent, child, module.merged())
    return len(wrapped)


def lora_parameters(language_model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every wrapper), in module order."""
    return [p for m in language_model.modules() if isinstance(m, LoraLinear) for p in (m.lora_a, m.lora_b)]
