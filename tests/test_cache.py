"""EvictingCache and the evicting attention on synthetic tensors: arrival bookkeeping, the policy schedule (lazy at a
chunk's end, inside a chunk that crosses a period boundary), gathers, padding, byte accounting, the recomputed
attention rows and the forward attention against dense references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from namm_transfer.namm.budget import RetentionRecord
from namm_transfer.namm.interface import KeepDecision, StepRequirements
from namm_transfer.runtime.attention import evicting_attention, namm_attention_forward
from namm_transfer.runtime.cache import CacheConfig, EvictingCache
from namm_transfer.runtime.layer import active_layer_for, visibility_mask

B, H, HQ, D = 2, 2, 4, 8
SCALE = D**-0.5


class Module(torch.nn.Module):
    """The attributes transformers' sdpa attention reads from an attention module."""

    is_causal = True
    num_key_value_groups = HQ // H


def feed(cache: EvictingCache, layer: int, n: int, window: int | None = None, batch: int = B) -> torch.Tensor:
    """Append n random tokens to ``layer`` and attend with n random queries through the registered attention function,
    as a model layer would. Returns (B, Hq, n, D)."""
    keys, values = cache.update(torch.randn(batch, H, n, D), torch.randn(batch, H, n, D), layer)
    query = torch.randn(batch, HQ, n, D)
    out, _ = namm_attention_forward(Module(), query, keys, values, None, scaling=SCALE, sliding_window=window)
    return out.transpose(1, 2)


def dense_visible(token_index, valid, query_index, window=None):
    """Reference visibility built element by element from the rule's definition."""
    b, h, n = token_index.shape
    out = torch.zeros(b, h, len(query_index), n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for qi, q in enumerate(query_index.tolist()):
                for j in range(n):
                    t = int(token_index[bi, hi, j])
                    out[bi, hi, qi, j] = t <= q and bool(valid[bi, hi, j]) and (window is None or t > q - window)
    return out


class DropOddPolicy:
    """Keeps slots with an even arrival index plus the newest (same set for every row and head)."""

    name = "drop_odd"

    def __init__(self):
        self.views = []

    def begin(self, batch_size, num_layers):
        self.views.clear()

    def step(self, view):
        self.views.append(view)
        keep = (view.arrival[0, 0] % 2 == 0).clone()
        keep[-1] = True
        idx = keep.nonzero().flatten()
        return KeepDecision(idx.expand(view.batch_size, view.num_heads, -1).clone())


class HeadwisePolicy:
    """Head h keeps the slots with arrival index % (h + 2) != 1, plus the newest: ragged sets across heads, padded
    to a common count with the lowest unchosen slots."""

    name = "headwise"

    def begin(self, batch_size, num_layers):
        pass

    def step(self, view):
        b, h, n = view.arrival.shape
        want = torch.stack([(view.arrival[:, i] % (i + 2)) != 1 for i in range(h)], dim=1)
        want[..., -1] = True
        k = int(want.sum(-1).max())
        rank = (~want).long() * n + torch.arange(n)
        chosen = rank.argsort(dim=-1)[..., :k]
        return KeepDecision(chosen.sort(dim=-1).values)


class ConstantPolicy:
    """Returns a fixed, possibly malformed, decision."""

    name = "constant"

    def __init__(self, indices, visible=None):
        self.indices, self.visible = indices, visible

    def begin(self, batch_size, num_layers):
        pass

    def step(self, view):
        return KeepDecision(self.indices, self.visible)


class Declaring(DropOddPolicy):
    """DropOddPolicy declaring its period and numerics, as a NAMM does."""

    requirements = StepRequirements(update_every=6, attention_numerics="official")


def test_cache_config_validation_and_settled_schedule():
    assert (EvictingCache(None, 1).update_every, EvictingCache(None, 1).numerics) == (512, "bfloat16")
    declared = EvictingCache(Declaring(), 1)
    assert (declared.update_every, declared.numerics) == (6, "official")  # the policy's declaration is read
    overridden = EvictingCache(Declaring(), 1, config=CacheConfig(update_every=4, attention_dtype="float32"))
    assert (overridden.update_every, overridden.numerics) == (4, "float32")  # an explicit config overrides it
    assert EvictingCache(DropOddPolicy(), 1, config=CacheConfig(update_every=4)).update_every == 4
    with pytest.raises(ValueError, match="update_every must be None or >= 1"):
        CacheConfig(update_every=0)
    with pytest.raises(ValueError, match="attention_dtype"):
        CacheConfig(attention_dtype="float16")
    with pytest.raises(ValueError, match="attention_chunk"):
        CacheConfig(attention_chunk=0)
    with pytest.raises(ValueError, match="layers_per_step"):
        CacheConfig(layers_per_step=0)
    with pytest.raises(ValueError, match="managed_layers"):
        EvictingCache(None, 2, {2})


def test_update_tracks_arrivals_lengths_and_exact_bytes():
    torch.manual_seed(0)
    cache = EvictingCache(None, 2)
    for n in (5, 3):
        for layer in range(2):
            feed(cache, layer, n)
    layer = cache.layers[0]
    assert cache.get_seq_length() == 8
    assert torch.equal(layer.arrival, torch.arange(8).expand(B, H, 8))
    assert layer.attendable.all()
    assert cache.kept_per_layer() == [8, 8]
    assert cache.kv_bytes() == 2 * (2 * B * H * 8 * D * 4)
    assert cache.kv_bytes_peak == cache.kv_bytes()
    assert cache.get_mask_sizes(3, 0) == (11, 0)
    assert layer.queries is None and layer.pending == 0  # no policy: no buffer, no steps


def test_step_runs_lazily_at_the_next_update_and_gathers():
    torch.manual_seed(0)
    policy = DropOddPolicy()
    cache = EvictingCache(policy, 1, config=CacheConfig(update_every=4))
    feed(cache, 0, 4)
    assert cache.retention == [] and cache.layers[0].pending == 4
    keys_before = cache.layers[0].keys.clone()
    feed(cache, 0, 1)  # the due step runs before this token is appended
    view = policy.views[0]
    assert (view.step, view.n_new, view.num_slots, view.layer) == (0, 4, 4, 0)
    assert cache.retention == [RetentionRecord(step=0, layer=0, slots_before=4, kept=3, tokens_seen=4)]
    layer = cache.layers[0]
    assert torch.equal(layer.arrival[0, 0], torch.tensor([0, 2, 3, 4]))
    assert torch.equal(layer.keys[:, :, :3], keys_before[:, :, [0, 2, 3]])
    feed(cache, 0, 3)
    cache.flush()
    assert [v.n_new for v in policy.views] == [4, 4] and policy.views[1].step == 1
    assert torch.equal(layer.arrival[0, 0], torch.tensor([0, 2, 4, 6, 7]))
    assert layer.pending == 0 and layer.queries is None


def test_a_chunk_crossing_period_boundaries_steps_at_each_boundary():
    """generate's one-shot prefill: 10 tokens with a period of 4 give steps at 4 and 8 tokens with 4 queries each;
    the tokens past a boundary are attended after the step, over the pruned cache."""
    torch.manual_seed(0)
    policy = DropOddPolicy()
    cache = EvictingCache(policy, 1, config=CacheConfig(update_every=4))
    out = feed(cache, 0, 10)
    assert out.shape == (B, HQ, 10, D) and torch.isfinite(out).all()
    assert [v.n_new for v in policy.views] == [4, 4]
    assert [v.arrival[0, 0].tolist() for v in policy.views] == [[0, 1, 2, 3], [0, 2, 3, 4, 5, 6, 7]]
    assert cache.retention == [RetentionRecord(0, 0, 4, 3, 4), RetentionRecord(1, 0, 7, 5, 8)]
    layer = cache.layers[0]
    assert layer.arrival[0, 0].tolist() == [0, 2, 4, 6, 7, 8, 9] and layer.pending == 2 and layer.incoming is None
    assert layer.queries.shape == (B, HQ, 2, D)


def test_segments_after_a_boundary_attend_over_the_pruned_cache():
    """The output of a crossing chunk equals feeding the same tokens in chunks cut at the boundary."""
    torch.manual_seed(5)
    k, v, q = torch.randn(B, H, 7, D), torch.randn(B, H, 7, D), torch.randn(B, HQ, 7, D)
    outputs = []
    for cuts in ([(0, 7)], [(0, 4), (4, 7)]):
        cache = EvictingCache(DropOddPolicy(), 1, config=CacheConfig(update_every=4))
        parts = []
        for a, b in cuts:
            keys, values = cache.update(k[:, :, a:b], v[:, :, a:b], 0)
            out, _ = namm_attention_forward(Module(), q[:, :, a:b], keys, values, None, scaling=SCALE)
            parts.append(out)
        outputs.append(torch.cat(parts, dim=1))
        assert cache.retention == [RetentionRecord(0, 0, 4, 3, 4)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=0)


def test_queries_of_a_segment_are_held_without_the_rest_of_their_chunk():
    """After a boundary inside a chunk, the query buffer holds the later segment's queries only (a copy), not a view
    keeping the whole chunk's queries alive; policy_bytes counts storage, so such spare capacity would show."""
    k, v, q = torch.randn(B, H, 7, D), torch.randn(B, H, 7, D), torch.randn(B, HQ, 7, D)
    cache = EvictingCache(DropOddPolicy(), 1, config=CacheConfig(update_every=4))
    keys, values = cache.update(k, v, 0)
    namm_attention_forward(Module(), q, keys, values, None, scaling=SCALE)
    queries = cache.layers[0].queries
    torch.testing.assert_close(queries, q[:, :, 4:], atol=0, rtol=0)
    assert queries.untyped_storage().nbytes() == B * HQ * 3 * D * 4
    assert cache.bytes_by_class()["queries"] == B * HQ * 3 * D * 4


class Stateful(DropOddPolicy):
    """DropOddPolicy reporting 100 bytes of per-sequence state."""

    def state_bytes(self):
        return 100


class Blind(DropOddPolicy):
    """DropOddPolicy declaring that it never reads attention."""

    requirements = StepRequirements(reads_attention=False)


def test_policy_bytes_count_every_byte_the_method_adds():
    """policy_bytes: validity (1 byte), int32 arrival indices (4 bytes) per slot and head, buffered queries, tokens
    held back at a boundary and the policy's own state; K/V stay in kv_bytes (issue 6, item 7)."""
    torch.manual_seed(0)
    cache = EvictingCache(Stateful(), 1, config=CacheConfig(update_every=4))
    feed(cache, 0, 3)
    slots = B * H * 3
    assert cache.kv_bytes() == 2 * slots * D * 4
    assert cache.policy_bytes() == slots * (1 + 4) + B * HQ * 3 * D * 4 + 100
    assert cache.layers[0].arrival.dtype == torch.int32
    feed(cache, 0, 1)
    cache.flush()  # step at 4: keeps 0, 2, 3; the query buffer is emptied
    assert cache.policy_bytes() == B * H * 3 * (1 + 4) + 100
    assert cache.policy_bytes_peak == B * H * 4 * (1 + 4) + B * HQ * 4 * D * 4 + 100
    assert cache.total_bytes_peak == 2 * B * H * 4 * D * 4 + cache.policy_bytes_peak
    cache.update(torch.randn(B, H, 6, D), torch.randn(B, H, 6, D), 0)  # 4 appended up to 8, 2 held back
    held = 2 * B * H * 6 * D * 4  # the 2 held tokens are slices of the 6-token chunk: its whole storage is held
    assert cache.policy_bytes() == B * H * 7 * (1 + 4) + held + 100  # (no attention ran, so no queries yet)
    with pytest.raises(ValueError, match="before its attention admitted the last one"):
        cache.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), 0)
    blind = EvictingCache(Blind(), 1, config=CacheConfig(update_every=4))
    feed(blind, 0, 3)
    assert blind.layers[0].queries is None and blind.policy_bytes() == slots * (1 + 4)  # nothing buffered


class Classified(DropOddPolicy):
    """DropOddPolicy reporting its state in two classes."""

    def state_bytes_by_class(self):
        return {"ema": 30, "tail": 70}


def test_bytes_by_class_split_the_total_and_its_peak():
    """bytes_by_class names every byte (K/V, validity, arrival, queries, held-back tokens, policy state by the
    policy's own classes); its classes sum to kv + policy bytes, and the split at the total's peak sums to the peak."""
    torch.manual_seed(0)
    cache = EvictingCache(Classified(), 1, config=CacheConfig(update_every=4))
    feed(cache, 0, 3)
    slots = B * H * 3
    assert cache.bytes_by_class() == {
        "kv": 2 * slots * D * 4, "attendable": slots, "arrival": 4 * slots, "queries": B * HQ * 3 * D * 4,
        "incoming": 0, "ema": 30, "tail": 70,
    }
    assert cache.policy_bytes() == sum(cache.bytes_by_class().values()) - cache.kv_bytes()
    feed(cache, 0, 1)
    cache.flush()
    peak = cache.total_bytes_peak_by_class
    assert sum(peak.values()) == cache.total_bytes_peak and peak["queries"] == B * HQ * 4 * D * 4
    assert cache.bytes_by_class()["queries"] == 0
    assert EvictingCache(Stateful(), 1).bytes_by_class()["policy_state"] == 100
    assert EvictingCache(None, 1).bytes_by_class()["policy_state"] == 0


def test_begin_marks_left_padding_invalid_and_validates():
    policy = DropOddPolicy()
    cache = EvictingCache(policy, 1, config=CacheConfig(update_every=4))
    cache.begin(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    feed(cache, 0, 3)
    feed(cache, 0, 3)
    layer = cache.layers[0]  # the second chunk crossed the boundary at 4 tokens: slot 1 was evicted there
    assert layer.arrival[0, 0].tolist() == [0, 2, 3, 4, 5]
    assert layer.attendable[0, :, 0].eq(False).all() and layer.attendable[0, :, 1:].all() and layer.attendable[1].all()
    cache.flush()
    assert torch.equal(policy.views[0].prompt_length, torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="left-padded"):
        cache.begin(torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="prompt_length must be >= 0"):
        cache.begin(prompt_length=-1)
    with pytest.raises(ValueError, match="no token"):
        cache.begin(torch.tensor([[0, 0], [1, 1]]))
    with pytest.raises(ValueError, match="2-D"):
        cache.begin(torch.ones(1, 1, 3))
    cache.begin(torch.ones(3, 4))
    with pytest.raises(ValueError, match="declared 3 rows"):
        feed(cache, 0, 2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_recent_attention_matches_a_dense_reference(dtype):
    """Padding, a prior eviction that differs per head, and causality inside the recent block."""
    torch.manual_seed(1)
    seen = []

    class Capture(HeadwisePolicy):
        def step(self, view):
            seen.append((view, cache.layers[view.layer].queries.clone(), view.attention()))
            return super().step(view)

    cache = EvictingCache(Capture(), 1, config=CacheConfig(update_every=6, attention_dtype=dtype, attention_chunk=4))
    cache.begin(torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8]))
    feed(cache, 0, 6)
    feed(cache, 0, 6)
    cache.flush()
    view, queries, got = seen[1]  # second step: cache pruned per head, padding present
    n_new, n = view.n_new, view.num_slots
    visible = dense_visible(view.arrival, view.attendable, torch.arange(12 - n_new, 12))
    visible &= view.attendable[:, :, n - n_new :, None]  # padding queries see nothing
    # reference: per query head softmax over visible slots, rounded, averaged per KV head in that dtype
    logits = torch.einsum("bhqd,bhnd->bhqn", queries, view.keys.repeat_interleave(HQ // H, dim=1)) * SCALE
    mask = visible.repeat_interleave(HQ // H, dim=1)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0) * mask
    torch_dtype = getattr(torch, dtype)
    ref = probs.to(torch_dtype).view(B, H, HQ // H, n_new, n).mean(dim=2).float()
    assert got.shape == (B, H, n_new, n) and got.dtype == getattr(torch, dtype)
    torch.testing.assert_close(got.float(), ref, atol=1e-6 if dtype == "float32" else 8e-3, rtol=0)
    assert (got[~visible] == 0).all()
    row_sums = got.float().sum(-1)
    real_rows = view.attendable[:, :, n - n_new :]
    torch.testing.assert_close(row_sums[real_rows], torch.ones(int(real_rows.sum())), atol=2e-2, rtol=0)
    assert (row_sums[~real_rows] == 0).all()


@pytest.mark.parametrize(
    "padded, window, q_len",
    [(True, 8, 3), (False, None, 3), (False, None, 1)],
    ids=["padding-and-window", "fast-path-chunk", "fast-path-one-query"],
)
def test_evicting_attention_matches_dense_reference_on_a_ragged_cache(padded, window, q_len):
    torch.manual_seed(2)
    cache = EvictingCache(HeadwisePolicy(), 1, config=CacheConfig(update_every=6))
    cache.begin(torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7]) if padded else None)
    feed(cache, 0, 6)
    feed(cache, 0, 1)  # step 0 runs here (ragged per head)
    layer = cache.layers[0]
    assert not torch.equal(layer.arrival[:, 0], layer.arrival[:, 1]) and layer.has_invalid == padded
    keys, values = cache.update(torch.randn(B, H, q_len, D), torch.randn(B, H, q_len, D), 0)
    query = torch.randn(B, HQ, q_len, D)
    got = evicting_attention(layer, query, keys, values, SCALE, sliding_window=window)
    query_index = torch.arange(7, 7 + q_len)
    visible = dense_visible(layer.arrival, layer.attendable, query_index, window=window)
    for b in range(B):
        for hq in range(HQ):
            h = hq // (HQ // H)
            for i in range(q_len):
                sel = visible[b, h, i]
                weights = torch.softmax((keys[b, h, sel] @ query[b, hq, i]) * SCALE, dim=0)
                torch.testing.assert_close(got[b, hq, i], weights @ values[b, h, sel], atol=1e-5, rtol=0)
    torch.testing.assert_close(visibility_mask(layer.arrival, layer.attendable, query_index, window), visible)


def test_padding_query_rows_are_zero_and_finite():
    cache = EvictingCache(None, 1)
    cache.begin(torch.tensor([[0, 0, 1], [1, 1, 1]]))
    out = feed(cache, 0, 3)
    assert torch.isfinite(out).all()
    assert (out[0, :, :2] == 0).all() and (out[0, :, 2] != 0).any()


@pytest.mark.parametrize(
    "indices, message",
    [
        (torch.tensor([[[1, 0]] * H] * B), "strictly ascending"),
        (torch.tensor([[[0, 9]] * H] * B), "strictly ascending"),
        (torch.zeros(B, H, 0, dtype=torch.long), "keeps 0 slots"),
        (torch.zeros(B, 1, 2, dtype=torch.long), "must be int64 of shape"),
        (torch.zeros(B, H, 2), "must be int64 of shape"),
        ((torch.tensor([[[0, 1]] * H] * B), torch.ones(B, H, 3, dtype=torch.bool)), "visible must be bool of shape"),
        ((torch.tensor([[[0, 1]] * H] * B), torch.ones(B, H, 2)), "visible must be bool of shape"),
    ],
)
def test_malformed_decisions_raise(indices, message):
    policy = ConstantPolicy(*indices) if isinstance(indices, tuple) else ConstantPolicy(indices)
    cache = EvictingCache(policy, 1, config=CacheConfig(update_every=4))
    feed(cache, 0, 4)
    with pytest.raises(ValueError, match=message):
        cache.flush()


def test_slots_kept_invisible_are_masked_like_padding():
    """KeepDecision.visible: a row padded to the batch's count keeps slots that are never attended."""
    torch.manual_seed(4)
    visible = torch.ones(B, H, 4, dtype=torch.bool)
    visible[0, :, 1] = False  # row 0 keeps slot 1 only to align its count
    cache = EvictingCache(ConstantPolicy(torch.arange(4).expand(B, H, 4).clone(), visible), 1,
                          config=CacheConfig(update_every=4))
    feed(cache, 0, 4)
    cache.flush()
    layer = cache.layers[0]
    assert torch.equal(layer.attendable, visible) and layer.has_invalid
    layer.values[0, :, 1] = 1.0e6  # poison the invisible slot
    keys, values = cache.update(torch.randn(B, H, 2, D), torch.randn(B, H, 2, D), 0)
    query = torch.randn(B, HQ, 2, D)
    got = evicting_attention(layer, query, keys, values, SCALE)
    visible_slots = dense_visible(layer.arrival, layer.attendable, torch.arange(4, 6))
    for b in range(B):
        for hq in range(HQ):
            for i in range(2):
                sel = visible_slots[b, hq // (HQ // H), i]
                weights = torch.softmax((keys[b, hq // (HQ // H), sel] @ query[b, hq, i]) * SCALE, dim=0)
                torch.testing.assert_close(got[b, hq, i], weights @ values[b, hq // (HQ // H), sel], atol=1e-5, rtol=0)


def test_step_without_recorded_queries_says_to_attach():
    cache = EvictingCache(DropOddPolicy(), 1, config=CacheConfig(update_every=2))
    cache.update(torch.randn(B, H, 2, D), torch.randn(B, H, 2, D), 0)  # no evicting_attention call
    with pytest.raises(ValueError, match="attach the model's adapter"):
        cache.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), 0)


def test_unmanaged_sliding_layer_is_never_stepped_and_holds_its_window():
    policy = DropOddPolicy()
    cache = EvictingCache(policy, 2, managed_layers={0}, config=CacheConfig(update_every=3))
    for _ in range(4):
        feed(cache, 0, 3)
        feed(cache, 1, 3, window=4)
    unmanaged = cache.layers[1]
    assert {r.layer for r in cache.retention} == {0} and unmanaged.queries is None
    # before the last chunk it was trimmed to window - 1 = 3 old tokens (6, 7, 8), then the chunk 9..11 arrived
    assert torch.equal(unmanaged.arrival, torch.arange(6, 12).expand(B, H, 6))


def test_active_layer_marker_and_sdpa_fallback():
    torch.manual_seed(3)
    cache = EvictingCache(None, 1)
    keys, values = cache.update(torch.randn(1, H, 4, D), torch.randn(1, H, 4, D), 0)
    assert active_layer_for(keys) is cache.layers[0]
    assert active_layer_for(keys.clone()) is None
    query = torch.randn(1, HQ, 4, D)
    other_k, other_v = torch.randn(1, H, 4, D), torch.randn(1, H, 4, D)
    got, _ = namm_attention_forward(Module(), query, other_k, other_v, None, scaling=SCALE)
    ref = F.scaled_dot_product_attention(
        query, other_k.repeat_interleave(2, 1), other_v.repeat_interleave(2, 1), is_causal=True, scale=SCALE
    )
    torch.testing.assert_close(got, ref.transpose(1, 2))
    with pytest.raises(ValueError, match="inference only"):
        namm_attention_forward(Module(), query, keys, values, None, dropout=0.1, scaling=SCALE)


def test_beam_search_operations_are_refused():
    cache = EvictingCache(None, 1)
    for call in (lambda: cache.reorder_cache(torch.tensor([0])), lambda: cache.crop(-1),
                 lambda: cache.batch_repeat_interleave(2), lambda: cache.batch_select_indices(torch.tensor([0]))):
        with pytest.raises(ValueError, match="does not support"):
            call()
