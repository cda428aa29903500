from __future__ import annotations

import io

import pytest
import torch

from asrbench.strategies.accounting import (CommStats, all_gather_bytes, all_reduce_bytes, broadcast_bytes)


def test_ring_all_reduce_sends_2_n_minus_1_over_n():
    assert all_reduce_bytes(1000, 4) == (1500.0, 1500.0, 1000.0)
    assert all_reduce_bytes(1000, 2) == (1000.0, 1000.0, 1000.0)
    assert all_reduce_bytes(1000, 1) == (0.0, 0.0, 1000.0)


def test_all_gather_forwards_every_other_contribution():
    assert all_gather_bytes(100, 4) == (300.0, 300.0, 100.0)


def test_broadcast_ring_positions_move_the_tensor_once_per_link():
    per_rank = [broadcast_bytes(100, 4, rank, src=2) for rank in range(4)]
    assert per_rank[2] == (100.0, 0.0, 100.0)  # the source
    assert per_rank[1] == (0.0, 100.0, 0.0)  # last in the ring 2 -> 3 -> 0 -> 1
    assert sum(s for s, _, _ in per_rank) == sum(r for _, r, _ in per_rank) == 300.0


def test_per_step_means_and_compression_ratio_of_one_gather_per_step():
    stats = CommStats(world_size=4, rank=0)
    grad_bytes = 4000
    for sent_words in (10, 30):
        stats.record_all_gather(torch.zeros(sent_words, dtype=torch.int32))
        stats.record_dense(grad_bytes)
        stats.record_elements(sent_words, 1000)
        stats.step()
    s = stats.per_step()
    assert s["steps"] == 2
    assert s["bytes_sent_per_worker_per_step"] == 3 * 4 * 20  # (N-1) * 4 B * mean 20 words
    assert s["payload_bytes_per_worker_per_step"] == 4 * 20
    assert s["dense_bytes_per_worker_per_step"] == 1.5 * grad_bytes
    assert s["compression_ratio"] == pytest.approx(1.5 * grad_bytes / 240)
    assert s["payload_compression_ratio"] == pytest.approx(grad_bytes / 80)
    assert s["density"] == pytest.approx(40 / 2000)
    assert s["elements_sent_per_step"] == 20
    assert stats.last_step()["bytes_sent_per_worker_per_step"] == 3 * 4 * 30


def test_dense_all_reduce_has_ratio_one():
    stats = CommStats(world_size=3)
    stats.record_all_reduce(torch.zeros(7))
    stats.record_dense(28)
    stats.step()
    assert stats.per_step()["compression_ratio"] == pytest.approx(1.0)


def test_state_dict_round_trips_through_weights_only_load():
    stats = CommStats(world_size=2)
    stats.record_all_reduce(400)
    stats.record_dense(400)
    stats.step()
    buf = io.BytesIO()
    torch.save(stats.state_dict(), buf)
    buf.seek(0)
    other = CommStats(world_size=2)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.per_step() == stats.per_step()


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        CommStats(2).record("scatter", 1, 1)
