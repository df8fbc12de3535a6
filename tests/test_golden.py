"""Token-for-token agreement with the official NAMM on recorded steps (tests/data/golden/README.md).

Two parameter vectors, one layer, 2 KV heads x 2 query heads, 3 consecutive NAMM steps of 512 new
queries with state carried between steps: the kept absolute positions must equal the official ones.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.features import NormalisationStats
from namm_transfer.namm.interface import LayerView
from namm_transfer.namm.policy import NammPolicy
from namm_transfer.runtime.attention_rows import query_head_mean

GOLDEN = Path(__file__).resolve().parent / "data" / "golden" / "official-steps-seed11.npz"


@pytest.fixture(scope="module")
def golden():
    assert GOLDEN.exists(), f"golden file {GOLDEN} is missing: the core cannot be checked against the official code"
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("vector", [0, 1])
def test_kept_positions_match_official(golden, vector):
    config = NammConfig()
    kv_heads, groups, n_new = int(golden["kv_heads"]), int(golden["groups"]), int(golden["n_new"])
    assert int(golden["layers"]) == 1
    stats = NormalisationStats(torch.from_numpy(golden["norm_mean"]), torch.from_numpy(golden["norm_var"]))
    policy = NammPolicy(config, torch.from_numpy(golden[f"theta_{vector}"]), stats)
    policy.begin(batch_size=1, num_layers=1)

    kept = torch.empty(1, kv_heads, 0, dtype=torch.int64)
    for step in range(int(golden["steps"])):
        bits = torch.from_numpy(golden[f"v{vector}_s{step}_l0_attn_bf16"])
        attention = bits.view(torch.bfloat16).unsqueeze(0)  # (1, kv_heads * groups, 512, N)
        assert attention.shape[1] == kv_heads * groups
        averaged = query_head_mean(attention, kv_heads, config.attention_dtype)  # the runtime's own GQA mean
        new = torch.arange(n_new * step, n_new * (step + 1)).expand(1, kv_heads, n_new)
        token_index = torch.cat([kept, new], dim=-1)
        assert token_index.shape[-1] == attention.shape[-1]
        view = LayerView(
            layer=0,
            step=step,
            arrival=token_index,
            attendable=torch.ones_like(token_index, dtype=torch.bool),
            n_new=n_new,
            keys=torch.zeros(1, kv_heads, token_index.shape[-1], 1),
            attention_fn=lambda averaged=averaged: averaged,
        )
        decision = policy.step(view)
        kept = token_index.gather(-1, decision.indices)
        expected = golden[f"v{vector}_s{step}_l0_kept_positions"]
        assert kept.shape[-1] == expected.shape[-1], f"step {step}: K {kept.shape[-1]} != {expected.shape[-1]}"
        np.testing.assert_array_equal(kept[0].numpy(), expected, err_msg=f"vector {vector}, step {step}")
