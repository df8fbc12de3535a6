"""Can a NAMM see the needle before the question arrives? A probe of its features (issue 8).

Every trained NAMM so far loses the needles that the full cache answers from (README "Keep-bias Pareto"): the
needle is evicted during the prefill, before the question that would make it salient. This script measures
whether the NAMM's input marks a needle at those steps at all, and whether a content cue would.

Data: the warm start's collected items (``python -m namm_transfer.evolve.warm_start --run-dir runs/ws-r ...``,
README "Teaching the NAMM recency"): 40 train-split items of 1,024 tokens over the five built-in tasks, depths
0.1-0.9, each with the spectrogram EMA of every (layer, KV head, slot) at every NAMM step of a full-cache pass of
SmolLM2 (period 256). Steps before the question: those that end at least 64 tokens (the protected prompt tail)
before the prompt's end, i.e. the steps at 256, 512 and 768 tokens. Needle tokens: the prompt tokens whose text
overlaps an occurrence of a reference answer before the question (the passkey's digits, the value of the asked
key, the variable names, the locker number). The first 4 slots (protected sink) are left out.

Scorers of a slot (higher = keep), each compared within a (layer, head, step) group, as eviction does:
``recency`` (minus the age), ``shipped_namm`` (the BAM score of ``weights/namm``), ``key_norm_low`` (minus the
key's L2 norm: the L2 baseline's rule), ``key_norm_high``, and out-of-fold probes trained on the other items
(5 folds by item, class-balanced logistic loss, one probe shared by all layers like the NAMM's scorer):
``probe_features`` (a 2-layer MLP on the NAMM's 25 features), ``probe_features_keynorm`` (the same plus the log
key norm), ``probe_features_layer`` (the features plus the layer, one-hot: a probe free to read each layer its own
way, which the NAMM is not) and ``probe_features_keynorm_layer`` (both additions). Per item: the group-mean AUC
(needle vs other slots) and the share of needle slots in the group's top 25%, averaged over groups; then the mean
over items with a bootstrap 95% interval, and each scorer minus recency, paired on items; and each scorer's AUC by
layer (mean over items). Run from the repository root (about 23 min with two threads):
``python docs/results/text-namm-training/needle_probe.py runs/ws-r/collected/t1024-p256-a24-float32 > OUT.json``.
"""

import json
import re
import sys
from pathlib import Path
from typing import Callable

import torch

from namm_transfer.evals.stats import mean_interval, paired_difference
from namm_transfer.evals.text_tasks import make_item, token_counter
from namm_transfer.evolve.feature_recorder import recorded_features
from namm_transfer.evolve.warm_start import collected_statistics, collected_steps
from namm_transfer.methods import cache_config_for
from namm_transfer.models import load_model
from namm_transfer.namm.checkpoint import load_namm
from namm_transfer.namm.features import NormalisationStats
from namm_transfer.namm.scorer import bam_scores
from namm_transfer.text_eval import TextGenerator

TASKS = ("passkey", "multikey_needle", "kv_retrieval", "variable_tracking", "two_hop")
ITEMS_PER_TASK = 8
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
LENGTH = 1024
SINK = 4
QUESTION_MARGIN = 64
KEEP_SHARE = 0.25
FOLDS = 5
TRAIN_ROWS = 200_000


def needle_tokens(tokenizer, ids: list[int], answers: list[str], before: int) -> torch.Tensor:
    """(L,) bool: tokens before index ``before`` whose decoded text overlaps an occurrence of an answer."""
    pieces = [tokenizer.decode([token]) for token in ids]
    lengths = torch.tensor([len(piece) for piece in pieces])
    ends = lengths.cumsum(0)
    starts = ends - lengths
    text = "".join(pieces)
    label = torch.zeros(len(ids), dtype=torch.bool)
    for answer in answers:
        for match in re.finditer(re.escape(answer), text):
            label |= (starts < match.end()) & (ends > match.start())
    label[before:] = False
    return label


@torch.no_grad()
def key_norms(model, ids: list[int]) -> list[torch.Tensor]:
    """Per layer, (H, L) L2 norm of every token's key (RoPE rotates pairs, so the norm is position-free)."""
    cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    return [layer.keys[0].float().norm(dim=-1) for layer in cache.layers]


def item_groups(payload: dict, labels: torch.Tensor, norms: list[torch.Tensor], stats, shipped, shipped_stats):
    """The pre-question (layer, head, step) groups of one item: features, label, scores; groups with a needle."""
    prompt_length = payload["prompt_length"]
    groups = []
    for record in collected_steps(payload):
        if record.tokens_seen > prompt_length - QUESTION_MARGIN:
            continue
        features = recorded_features(record, stats, shipped.config)  # (H, N, 25)
        shipped_features = recorded_features(record, shipped_stats, shipped.config)
        score = bam_scores(shipped_features[None], shipped.params, torch.zeros(1, dtype=torch.int64),
                           shipped.config, record.attendable[None])[0]
        for head in range(features.shape[0]):
            slots = record.attendable[head] & (record.arrival[head] >= SINK)
            arrival = record.arrival[head][slots]
            label = labels[arrival]
            if not label.any():
                continue
            norm = norms[record.layer][head][arrival]
            groups.append({
                "layer": record.layer, "label": label, "features": features[head][slots],
                "log_norm": norm.log()[:, None],
                "scores": {"recency": arrival.float(), "shipped_namm": score[head][slots],
                           "key_norm_low": -norm, "key_norm_high": norm},
            })
    return groups


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Mann-Whitney AUC of ``score`` separating ``label`` (ties broken by order, negligible for these scores)."""
    ranks = score.argsort().argsort().double() + 1
    positives = int(label.sum())
    negatives = label.numel() - positives
    return float((ranks[label].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def kept_share(score: torch.Tensor, label: torch.Tensor) -> float:
    """Share of needle slots among the top ``KEEP_SHARE`` of slots by ``score``."""
    keep = torch.zeros_like(label)
    keep[score.topk(max(1, int(KEEP_SHARE * label.numel()))).indices] = True
    return float((keep & label).sum() / label.sum())


def train_probe(inputs: torch.Tensor, labels: torch.Tensor, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A class-balanced 2-layer MLP: (n, D) inputs -> (n,) logits (inputs standardised inside)."""
    torch.manual_seed(seed)
    mean, std = inputs.mean(0), inputs.std(0) + 1e-6
    net = torch.nn.Sequential(torch.nn.Linear(inputs.shape[1], 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    weight = torch.where(labels, (~labels).sum() / labels.sum(), torch.tensor(1.0)).float()
    x, y = (inputs - mean) / std, labels.float()
    for _ in range(400):
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y, weight=weight)
        loss.backward()
        optimiser.step()
    return lambda z: net((z - mean) / std)[:, 0]


def probe_scores(groups_by_item: dict[str, list[dict]], name: str, inputs_of) -> None:
    """Add out-of-fold probe scores ``name`` to every group (folds by item; for training, negatives subsampled to
    20 per positive, then ``TRAIN_ROWS`` rows drawn at random)."""
    item_ids = sorted(groups_by_item)
    generator = torch.Generator().manual_seed(0)
    for fold in range(FOLDS):
        held = set(item_ids[fold::FOLDS])
        xs, ys = [], []
        for item_id in item_ids:
            if item_id in held:
                continue
            for group in groups_by_item[item_id]:
                negatives = (~group["label"]).nonzero()[:, 0]
                draw = torch.randperm(negatives.numel(), generator=generator)
                chosen = negatives[draw[:20 * int(group["label"].sum())]]
                rows = torch.cat([group["label"].nonzero()[:, 0], chosen])
                xs.append(inputs_of(group)[rows])
                ys.append(group["label"][rows])
        xs, ys = torch.cat(xs), torch.cat(ys)
        rows = torch.randperm(ys.numel(), generator=generator)[:TRAIN_ROWS]
        probe = train_probe(xs[rows], ys[rows], seed=fold)
        print(f"{name}: fold {fold + 1}/{FOLDS} trained on {rows.numel()} of {ys.numel()} rows", file=sys.stderr,
              flush=True)
        with torch.no_grad():
            for item_id in held:
                for group in groups_by_item[item_id]:
                    group["scores"][name] = probe(inputs_of(group))


def main(collected: Path) -> dict:
    loaded = load_model("smollm2", dtype="float32")
    shipped = load_namm("weights/namm")
    count = token_counter(loaded.tokenizer)
    shipped_stats = NormalisationStats(shipped.norm_mean, shipped.norm_var)
    generator = TextGenerator(loaded.model, loaded.tokenizer, cache_config_for(shipped.config))
    items = [make_item(task, seed, LENGTH, DEPTHS[seed % len(DEPTHS)], count, "train")
             for task in TASKS for seed in range(ITEMS_PER_TASK)]
    payloads = {item.item_id: torch.load(collected / f"{item.item_id}-w1.pt") for item in items}
    stats = collected_statistics(payloads.values(), shipped.config)  # as the warm start normalises
    groups_by_item: dict[str, list[dict]] = {}
    needles = {}
    for item in items:
        payload = payloads[item.item_id]
        ids = generator.encode(item.prompt)[0].tolist()
        if len(ids) != payload["prompt_length"]:
            raise SystemExit(f"{item.item_id}: {len(ids)} tokens, its collected file {payload['prompt_length']}")
        labels = needle_tokens(loaded.tokenizer, ids, item.answers, len(ids) - QUESTION_MARGIN)
        needles[item.item_id] = int(labels.sum())
        with torch.no_grad():
            groups_by_item[item.item_id] = item_groups(payload, labels, key_norms(loaded.model, ids), stats,
                                                       shipped, shipped_stats)
        print(f"{item.item_id}: {needles[item.item_id]} needle tokens, "
              f"{len(groups_by_item[item.item_id])} groups", file=sys.stderr, flush=True)
    probe_scores(groups_by_item, "probe_features", lambda g: g["features"])
    probe_scores(groups_by_item, "probe_features_keynorm", lambda g: torch.cat([g["features"], g["log_norm"]], 1))
    layers = 1 + max(g["layer"] for gs in groups_by_item.values() for g in gs)

    def layer_of(group: dict) -> torch.Tensor:  # (n, layers) one-hot layer of every slot of the group
        one_hot = torch.nn.functional.one_hot(torch.tensor(group["layer"]), layers).float()
        return one_hot.expand(group["label"].numel(), -1)

    probe_scores(groups_by_item, "probe_features_layer", lambda g: torch.cat([g["features"], layer_of(g)], 1))
    probe_scores(groups_by_item, "probe_features_keynorm_layer",
                 lambda g: torch.cat([g["features"], g["log_norm"], layer_of(g)], 1))
    scorers = list(next(g for gs in groups_by_item.values() for g in gs)["scores"])
    per_item = {metric: {name: {} for name in scorers} for metric in ("auc", "needle_kept_top25")}
    by_layer = {name: [[] for _ in range(layers)] for name in scorers}  # per layer, each item's mean group AUC
    for item_id, groups in groups_by_item.items():
        if not groups:
            continue
        for name in scorers:
            aucs = [auc(g["scores"][name], g["label"]) for g in groups]
            per_item["auc"][name][item_id] = sum(aucs) / len(groups)
            per_item["needle_kept_top25"][name][item_id] = (
                sum(kept_share(g["scores"][name], g["label"]) for g in groups) / len(groups))
            for layer in range(layers):
                in_layer = [value for value, g in zip(aucs, groups) if g["layer"] == layer]
                by_layer[name][layer].append(sum(in_layer) / len(in_layer))
    report = {"items_with_a_needle_before_the_question": len(per_item["auc"]["recency"]), "needle_tokens": needles,
              "keep_share": KEEP_SHARE, "metrics": {},
              "auc_by_layer": {name: [round(sum(v) / len(v), 3) for v in values] for name, values in by_layer.items()}}
    for metric, by_scorer in per_item.items():
        report["metrics"][metric] = {
            name: {"mean": mean_interval(list(values.values())),
                   "minus_recency": paired_difference(values, by_scorer["recency"]),
                   "by_task": {task: sum(v for k, v in values.items() if k.startswith(task + "-"))
                               / max(1, sum(1 for k in values if k.startswith(task + "-"))) for task in TASKS}}
            for name, values in by_scorer.items()}
    return report


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: needle_probe.py COLLECTED_DIR")
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
