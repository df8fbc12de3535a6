"""Bootstrap intervals and paired differences (evals/stats.py), and the RL summary's use of them."""

import numpy as np
import pytest

from namm_transfer.evals.control import ENVS
from namm_transfer.evals.stats import bootstrap_mean_interval, mean_interval, paired_difference
from namm_transfer.rl.summary import paired_difference as rl_paired_difference


def test_mean_interval_holds_the_mean_and_the_bootstrap_interval():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    result = mean_interval(values)
    assert result["mean"] == pytest.approx(np.mean(values))
    assert result["ci95"] == list(bootstrap_mean_interval(values))
    assert result["ci95"][0] < result["mean"] < result["ci95"][1]
    assert mean_interval([3.0]) == {"mean": 3.0, "ci95": [3.0, 3.0]}
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval([])


def test_paired_difference_pairs_by_item_and_ignores_unshared_items():
    a = {"x": 1.0, "y": 0.5, "z": 0.0, "only-a": 9.0}
    b = {"z": 1.0, "y": 0.5, "x": 0.0, "only-b": -9.0}
    result = paired_difference(a, b)
    assert result["items"] == 3 and result["mean"] == pytest.approx(0.0)
    assert result["ci95"] == list(bootstrap_mean_interval([1.0, 0.0, -1.0]))
    constant = paired_difference({"x": 2.0, "y": 3.0}, {"x": 1.0, "y": 2.0})
    assert constant == {"items": 2, "mean": 1.0, "ci95": [1.0, 1.0]}  # a paired shift has no spread
    assert paired_difference({"x": 1.0}, {"y": 1.0}) is None


def test_rl_paired_difference_is_the_shared_one_on_d4rl_scores():
    env = ENVS["hopper"]
    a = [{"item_id": "s0", "episode_return": 1000.0}, {"item_id": "s1", "episode_return": 2000.0}]
    b = [{"item_id": "s1", "episode_return": 1500.0}, {"item_id": "s0", "episode_return": 1200.0}]
    result = rl_paired_difference(a, b, env)
    expected = env.d4rl_normalized(np.array([1000.0, 2000.0])) - env.d4rl_normalized(np.array([1200.0, 1500.0]))
    assert result["episodes"] == 2 and result["mean"] == pytest.approx(expected.mean())
    assert rl_paired_difference(a, [{"item_id": "s9", "episode_return": 1.0}], env) is None
