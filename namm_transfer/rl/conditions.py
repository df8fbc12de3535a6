"""The conditions a DT is evaluated under, and how each becomes a rollout.

* ``window``: the standard DT loop over the last K timesteps, no cache (what the DT was trained for);
* ``full``: the whole episode in the cache;
* ``namm``: the whole episode, a NAMM evicting every ``update_every`` tokens (it decides its own budget);
* ``<rule>@matched`` (rule = h2o, l2, recency, random): the NAMM's own budget on the same episodes: at every
  (policy step, layer) the mean number of slots the NAMM's live episodes kept there; past the NAMM's last step the
  layer keeps the same fraction of the tokens seen as at that last step;
* ``<rule>@window``: a cache of the window loop's size, 3K tokens per layer (it grows by ``update_every`` tokens
  between steps, like every evicting condition).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from namm_transfer.methods import namm_policy
from namm_transfer.namm.baselines import BASELINES, make_baseline
from namm_transfer.namm.budget import MatchedBudget
from namm_transfer.namm.checkpoint import NammWeights
from namm_transfer.namm.interface import EvictionPolicy
from namm_transfer.rl.rollout import BatchResult, RolloutSettings, cached_rollout, window_rollout
from namm_transfer.runtime.cache import CacheConfig

BASELINE_RULES = ("h2o", "l2", "recency", "random")
BUDGETS = ("matched", "window")


@dataclass(frozen=True)
class Condition:
    """One evaluation condition.

    Attributes:
        rule: ``window``, ``full``, ``namm`` or a baseline rule (:data:`BASELINE_RULES`).
        budget: None for window/full/namm; ``matched`` or ``window`` for a baseline.
    """

    rule: str
    budget: str | None = None

    def __post_init__(self) -> None:
        if self.rule in ("window", "full", "namm"):
            if self.budget is not None:
                raise ValueError(f"condition {self.rule!r} takes no budget")
        elif self.rule in BASELINE_RULES and self.rule in BASELINES:
            if self.budget not in BUDGETS:
                raise ValueError(f"condition {self.rule!r} needs a budget: {', '.join(BUDGETS)}")
        else:
            raise ValueError(f"unknown condition rule {self.rule!r}")

    @property
    def label(self) -> str:
        """``window``, ``namm``, ``h2o@matched`` ..."""
        return self.rule if self.budget is None else f"{self.rule}@{self.budget}"

    @classmethod
    def parse(cls, text: str) -> "Condition":
        """A condition from its label; a bad label raises ValueError listing the valid ones."""
        rule, _, budget = text.partition("@")
        try:
            return cls(rule, budget or None)
        except ValueError:
            raise ValueError(f"unknown condition {text!r}; valid: {', '.join(ALL_LABELS)}") from None


DEFAULT_CONDITIONS = tuple(
    [Condition("window"), Condition("full"), Condition("namm")]
    + [Condition(rule, budget) for budget in BUDGETS for rule in BASELINE_RULES]
)
ALL_LABELS = tuple(c.label for c in DEFAULT_CONDITIONS)


def policy_steps(max_episode_steps: int, update_every: int) -> int:
    """Most policy steps an episode can have: tokens fed (3 a timestep, less the last action) // period."""
    return (3 * max_episode_steps - 1) // update_every


def matched_budget(
    visible_by_step: dict[tuple[int, int], float], update_every: int, layers: list[int]
) -> MatchedBudget:
    """The NAMM's mean kept slots per (step, layer) (rounded, at least 1) as a :class:`MatchedBudget`; past a
    layer's last NAMM step it keeps that step's share of the tokens seen (a step ``s`` sees
    ``(s + 1) * update_every`` tokens)."""
    counts = {key: max(1, round(value)) for key, value in visible_by_step.items()}
    shares = {}
    for layer in layers:
        steps = [s for s, l in counts if l == layer]
        if not steps:
            raise ValueError(f"the NAMM run has no policy step for layer {layer}; episodes too short to match")
        last = max(steps)
        shares[layer] = min(1.0, counts[(last, layer)] / ((last + 1) * update_every))
    return MatchedBudget(counts, shares)


def baseline_policy(
    condition: Condition,
    *,
    num_steps: int,
    update_every: int,
    layers: list[int],
    context: int,
    namm_visible_by_step: dict[tuple[int, int], float] | None,
    seed: int,
) -> EvictionPolicy:
    """The eviction policy of a baseline condition.

    Args:
        num_steps: policy steps the longest episode can have (:func:`policy_steps`).
        update_every: tokens between policy steps.
        layers: the managed layers.
        context: K of the window loop (``window`` budget = 3K tokens).
        namm_visible_by_step: the NAMM's kept slots on the same episodes (``matched`` budget).
        seed: seed of the ``random`` rule.
    """
    if condition.budget == "matched":
        if namm_visible_by_step is None:
            raise ValueError(f"{condition.label} needs the NAMM's run on the same episodes")
        budget = matched_budget(namm_visible_by_step, update_every, layers)
    else:
        budget = MatchedBudget({(step, layer): 3 * context for step in range(num_steps) for layer in layers})
    options = {"seed": seed} if condition.rule == "random" else {}
    return make_baseline(condition.rule, budget, **options)


def run_condition(
    condition: Condition,
    model: nn.Module,
    seeds: list[int],
    settings: RolloutSettings,
    cache_config: CacheConfig,
    *,
    namm: NammWeights | None,
    namm_visible_by_step: dict[tuple[int, int], float] | None,
    seed: int,
) -> BatchResult:
    """One lockstep batch of episodes (env seeds ``seeds``) under ``condition``.

    Args:
        cache_config: its ``update_every`` is the period of every evicting condition.
        namm: the NAMM's weights (for ``namm``).
        namm_visible_by_step: the NAMM's kept slots on the same episodes (for ``@matched``).
        seed: seed of the ``random`` rule.
    """
    if condition.rule == "window":
        return window_rollout(model, seeds, settings)
    if condition.rule == "full":
        policy = None
    elif condition.rule == "namm":
        if namm is None:
            raise ValueError("condition 'namm' needs NAMM weights")
        policy = namm_policy(namm, next(model.parameters()).device)
    else:
        policy = baseline_policy(
            condition, num_steps=policy_steps(settings.max_episode_steps, cache_config.update_every),
            update_every=cache_config.update_every, layers=list(range(model.config.n_layer)),
            context=settings.context, namm_visible_by_step=namm_visible_by_step, seed=seed,
        )
    return cached_rollout(model, seeds, settings, policy, cache_config)
