"""The attention rows of a policy step, computed chunk by chunk at the chunks' arrival over the slots present then, are
bit-equal to the rows computed at the step (torch path): the property a streaming NAMM step (folding each chunk's rows
into its per-slot state as the chunk arrives, bench/streaming_feasibility.py) relies on."""

from __future__ import annotations

import pytest
import torch

from namm_transfer.runtime.attention_rows import attention_rows

B, H, HQ, D = 2, 2, 6, 16


@pytest.mark.parametrize("numerics", ["official", "bfloat16", "float32"])
@pytest.mark.parametrize("window", [None, 9])
def test_rows_at_arrival_equal_rows_at_the_step(numerics, window):
    torch.manual_seed(3)
    old, new, chunk = 11, 24, 8
    slots = old + new
    keys = torch.randn(B, H, slots, D).bfloat16()
    queries = torch.randn(B, HQ, new, D).bfloat16()
    kept = torch.stack([torch.randperm(30)[:old].sort().values for _ in range(B * H)]).view(B, H, old)  # evicted gaps
    arrival = torch.cat([kept, torch.arange(30, 30 + new).expand(B, H, new)], dim=2).int()
    attendable = torch.ones(B, H, slots, dtype=torch.bool)
    attendable[0, :, :3] = False  # left padding of row 0
    query_index = torch.arange(30, 30 + new)
    at_step = attention_rows(queries, keys, arrival, attendable, query_index, attendable[:, :, old:], D**-0.5,
                             numerics, chunk=5, sliding_window=window)
    for start in range(0, new, chunk):
        present = old + start + chunk  # the slots held when this chunk's queries arrived
        at_arrival = attention_rows(
            queries[:, :, start : start + chunk], keys[:, :, :present], arrival[:, :, :present],
            attendable[:, :, :present], query_index[start : start + chunk],
            attendable[:, :, old + start : old + start + chunk], D**-0.5, numerics, chunk=5, sliding_window=window,
        )
        assert torch.equal(at_arrival, at_step[:, :, start : start + chunk, :present])
        assert not at_step[:, :, start : start + chunk, present:].any()  # later slots are masked by causality
