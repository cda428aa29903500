"""Worker imbalance the samplers create, and what it does to a projected speedup.

A synchronous step waits for its slowest worker, and a worker's compute grows with the padded
frames of its batch (batch size x its longest utterance: the LSTM runs over the padding too).
:func:`sampler_frames` deals a corpus to N workers exactly as ``make_loader`` does for rank i
of N (DistributedSampler, then the random or the length-bucketed batch sampler) and returns
every worker's padded frames per step, without reading any audio; the cost model turns them into
the straggler factor s of a strategy's schedule (:func:`asrbench.cluster.cost.straggler_factor`).

Re-costing a speedup. A projected speedup S = N T_1 / (T_1 + T_c) (cost.speedup with the mean
worker's compute T_1 and communication T_c) becomes, with the slowest worker charged,
S' = N T_1 / (s T_1 + T_c) = N / (s + N / S - 1): the communication of S is kept and only the
compute is stretched (:func:`with_stragglers`).
"""
from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, DistributedSampler

from asrbench.cluster import cost
from asrbench.data.dataset import LengthBucketBatchSampler

SAMPLERS = ("random", "bucketed")


def sampler_frames(lengths: Sequence[int], nodes: int, batch_size: int, *, sampler: str = "random",
                   epochs: int = 1, seed: int = 0) -> list[list[int]]:
    """frames[t][i]: padded frames (batch x longest) of worker i at step t over `epochs` epochs."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
    lengths_t = torch.as_tensor(list(lengths), dtype=torch.long)
    per_rank = []
    for rank in range(nodes):
        dist = DistributedSampler(range(len(lengths_t)), num_replicas=nodes, rank=rank, shuffle=True, seed=seed,
                                  drop_last=True)
        batches = (LengthBucketBatchSampler(dist, lengths_t, batch_size, True) if sampler == "bucketed"
                   else BatchSampler(dist, batch_size, True))
        steps = []
        for epoch in range(epochs):
            batches.set_epoch(epoch) if sampler == "bucketed" else dist.set_epoch(epoch)
            steps += [len(b) * int(lengths_t[b].max()) for b in batches]
        per_rank.append(steps)
    return [list(step) for step in zip(*per_rank)]


def imbalance(frames: Sequence[Sequence[int]]) -> dict[str, float]:
    """Per step, the slowest worker over the mean: median, mean and 90th percentile of that ratio."""
    ratios = sorted(max(step) / (sum(step) / len(step)) for step in frames)
    return {"steps": len(ratios), "median": statistics.median(ratios), "mean": statistics.fmean(ratios),
            "p90": ratios[int(0.9 * (len(ratios) - 1))]}


def with_stragglers(speedup: float, nodes: int, factor: float) -> float:
    """S' = N / (s + N / S - 1): a speedup re-costed with the slowest worker's compute (module docstring)."""
    if not speedup > 0 or factor < 1:
        raise ValueError(f"Args `speedup` must be positive and `factor` >= 1 (got {speedup}, {factor})")
    return nodes / (factor + nodes / speedup - 1)


def strategy_factors(lengths: Sequence[int], nodes: int, batch_size: int, schedules: Mapping[str, Mapping[str, Any]],
                     *, sampler: str = "random", epochs: int = 1, seed: int = 0) -> dict[str, float]:
    """The straggler factor of each strategy's waiting (cost.waits of its stats) on one dealing."""
    frames = sampler_frames(lengths, nodes, batch_size, sampler=sampler, epochs=epochs, seed=seed)
    return {s: cost.straggler_factor(frames, *cost.waits(s, nodes, stats)) for s, stats in schedules.items()}
