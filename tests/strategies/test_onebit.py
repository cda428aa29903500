"""1-bit SGD with error feedback (asrbench/strategies/onebit.py): the quantiser and the wire format
on hand cases, error feedback's telescoping sum, the simulated exchange against an independent
per-column reference, the real gloo workers against the simulated cluster, the bytes by hand and
the cost schedule against the alpha-beta formulas."""
from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from asrbench.cluster import cost
from asrbench.strategies import build_strategy, spec
from asrbench.strategies.onebit import (NonFiniteGradientError, OneBitExchange, OneBitState, column_index, decode,
                                        encode, pack_bits, pack_message, quantise, read_message, unpack_bits)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_utils, equivalence
from equivalence import NODES, STEPS, case, check_equal, module, real_runs, rel, simulated  # noqa: E402

CASES = {
    "onebit": case({"name": "onebit"}),
    "onebit_warmup": case({"name": "onebit", "warmup_steps": 3}),
    # ~250 elements per bucket: several buckets per step once DDP rebuilds them after step 1
    "onebit_buckets": case({"name": "onebit", "bucket_cap_mb": 0.001}),
}
NET = {"name": "toy", "latency_s": 1.0, "bandwidth_Bps": 10.0, "gpus_per_machine": 4,
       "intra_latency_s": 0.0, "intra_bandwidth_Bps": 100.0}  # as tests/cluster/test_cost.py
STATS = {"onebit_msg_bytes": 20.0, "onebit_decode_rate": 10.0, "dense_bytes_per_worker_per_step": 80.0}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------
# The quantiser and the wire format, by hand
# ---------------------------------------------------------------------------------------------
def test_quantiser_on_a_hand_made_matrix():
    # column 0: 3, 1 >= 0 (mean 2) and -2, -4 < 0 (mean -3); column 1: all >= 0 (0 counts as >= 0)
    x = torch.tensor([[3.0, 0.5], [1.0, 1.5], [-2.0, 2.5], [-4.0, 0.0]])
    bits, v1, v0 = quantise(x)
    assert bits.tolist() == [[True, True], [True, True], [False, True], [False, True]]
    assert v1.tolist() == [2.0, 1.125] and v0.tolist() == [-3.0, 0.0]  # an empty side gets 0
    q = torch.where(bits, v1, v0)
    assert (x - q).tolist() == [[1.0, -0.625], [-1.0, 0.375], [1.0, 1.375], [-1.0, -1.125]]


def test_all_positive_and_all_negative_columns_send_their_mean():
    col = torch.tensor([[1.0], [2.0], [4.0], [9.0]])
    for x, mean in ((col, 4.0), (-col, -4.0)):
        bits, v1, v0 = quantise(x)
        assert bits.view(-1).tolist() == [mean > 0] * 4  # one side only
        assert (v1.item(), v0.item()) == ((mean, 0.0) if mean > 0 else (0.0, mean))  # the other side is empty: 0
        e = x - torch.where(bits, v1, v0)
        assert e.sum().item() == 0.0 and e.view(-1).tolist() == [c - mean for c in x.view(-1).tolist()]


def test_encode_views_each_parameter_as_shape0_rows_and_a_vector_as_one_column():
    shapes = [torch.Size([2, 3]), torch.Size([3])]
    x = torch.tensor([1.0, -1.0, 2.0, 3.0, -5.0, 4.0,   # matrix [[1, -1, 2], [3, -5, 4]]: 3 columns of 2
                      -1.0, -2.0, 6.0])                  # vector: one column of 3
    bits, values = encode(x, shapes)
    assert bits.tolist() == [True, False, True, True, False, True, False, False, True]
    assert values.tolist() == [[2.0, 0.0, 3.0, 6.0], [0.0, -3.0, 0.0, -1.5]]
    assert column_index(shapes).tolist() == [0, 1, 2, 0, 1, 2, 3, 3, 3]
    q = decode(bits, values, column_index(shapes))
    assert q.tolist() == [2.0, -3.0, 3.0, 2.0, -3.0, 3.0, -1.5, -1.5, 6.0]


def test_bits_pack_eight_per_byte_little_end_first_and_round_trip():
    bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [0b00001101, 1]
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 1000, 2157):
        b = torch.rand(n, generator=gen) < 0.5
        packed = pack_bits(b)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
        assert packed.tolist() == np.packbits(b.numpy(), bitorder="little").tolist()  # an independent packer
        assert torch.equal(unpack_bits(packed, n), b)
    stacked = torch.rand(3, 21, generator=gen) < 0.5  # rows of workers pack as each row alone
    assert torch.equal(pack_bits(stacked), torch.stack([pack_bits(r) for r in stacked]))


def test_a_message_is_the_values_then_the_bits_and_reads_back():
    gen = torch.Generator().manual_seed(1)
    shapes = [torch.Size([5, 3]), torch.Size([4])]
    bits, values = encode(torch.randn(19, generator=gen), shapes)
    message = pack_message(bits, values)
    assert message.dtype == torch.uint8 and message.numel() == 8 * 4 + 3  # 2 fp32 x 4 columns + ceil(19 / 8)
    second = torch.cat([message, message])[message.numel():]  # as worker 1's row of a gather: at byte 35
    back_bits, back_values = read_message(second, 19, 4)
    assert torch.equal(back_bits, bits) and torch.equal(back_values, values)


# ---------------------------------------------------------------------------------------------
# Error feedback and the simulated exchange against an independent reference
# ---------------------------------------------------------------------------------------------
def test_error_feedback_telescopes_sum_of_q_plus_final_error_is_sum_of_gradients():
    gen = torch.Generator().manual_seed(2)
    shapes = [torch.Size([6, 4]), torch.Size([5])]
    column = column_index(shapes)
    e = torch.zeros(29, dtype=torch.float64)
    sent, grads = torch.zeros_like(e), torch.zeros_like(e)
    for _ in range(20):
        g = torch.randn(29, generator=gen, dtype=torch.float64)
        grads += g
        x = g + e
        bits, values = encode(x, shapes)
        q = decode(bits, values, column)
        e = x - q
        sent += q
    torch.testing.assert_close(sent + e, grads, rtol=0, atol=1e-12)
    assert e.abs().max() > 0.1  # the error carried something


def _reference_mean(x: torch.Tensor, shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """Seide's quantiser written out column by column (float64): each worker's q and the mean of them."""
    qs = []
    for row in x.double():
        pieces, offset = [], 0
        for shape in shapes:
            k = math.prod(shape)
            m = row[offset:offset + k].reshape(shape[0], -1).clone()
            for c in range(m.shape[1]):
                col = m[:, c].clone()
                pos, neg = col[col >= 0], col[col < 0]
                m[:, c] = torch.where(col >= 0, pos.mean() if pos.numel() else 0.0, neg.mean() if neg.numel() else 0.0)
            pieces.append(m.reshape(-1))
            offset += k
        qs.append(torch.cat(pieces))
    q = torch.stack(qs)
    return q, q.mean(0)


def test_simulated_exchange_equals_the_per_column_reference_and_conserves_the_gradient():
    shapes = [torch.Size([8, 3]), torch.Size([8]), torch.Size([2, 2, 2])]
    nodes, n, steps = 3, 40, 5
    state = OneBitState()
    exchange = OneBitExchange(state, nodes, shapes, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    error = torch.zeros(nodes, n, dtype=torch.float64)
    applied, total = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for step in range(steps):
        g = torch.randn(nodes, n, generator=gen)
        total += g.double().mean(0)
        q, mean = _reference_mean(g.double() + error, shapes)
        error = g.double() + error - q
        grads = g.clone()
        exchange.exchange(grads, step)
        assert torch.equal(grads, grads[:1].expand_as(grads))  # every worker applies the same mean
        torch.testing.assert_close(grads[0].double(), mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(exchange.error.double(), error, rtol=0, atol=1e-5)
        applied += grads[0].double()
    torch.testing.assert_close(applied + exchange.error.double().mean(0), total, rtol=0, atol=1e-5)
    assert state.iter == steps and state.comm_stats.steps == steps
    with pytest.raises(NonFiniteGradientError, match=r"step 5: NaN/inf in the gradient of worker\(s\) 1"):
        bad = torch.randn(nodes, n, generator=gen)
        bad[1, 7] = math.inf
        exchange.exchange(bad, 5)


def test_warm_up_steps_all_reduce_dense_and_leave_the_error_at_zero():
    shapes = [torch.Size([4, 2])]
    state = OneBitState(warmup_steps=2)
    exchange = OneBitExchange(state, 2, shapes, torch.device("cpu"))
    g = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8], [3.0, 2, 1, 0, -1, -2, -3, -4]])
    grads = g.clone()
    exchange.exchange(grads, 0)
    assert torch.equal(grads, g.mean(0).expand_as(g)) and not exchange.error.any()
    summary = state.comm_stats.per_step()
    assert summary["all_reduce_bytes_sent_per_worker_per_step"] == 2 * 1 / 2 * 32  # ring of 32 bytes among 2
    assert exchange.cost_stats()["onebit_dense_step_fraction"] == 1.0


def test_state_checks_its_warm_up_and_round_trips_through_state_dict_and_pickle():
    with pytest.raises(ValueError, match="Arg `warmup_steps`"):
        OneBitState(warmup_steps=-1)
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    state = OneBitState(warmup_steps=1, parameters=params)
    state.error_slices(params[1:], torch.device("cpu"))[0].copy_(torch.tensor([1.0, 2, 3, 4]))
    state.iter = 7
    again = pickle.loads(pickle.dumps(state))
    assert again.iter == 7 and again.warmup_steps == 1 and torch.equal(again.error, state.error)
    assert state.error[6:].tolist() == [1.0, 2, 3, 4]  # the canonical order: params[1] after params[0]'s 6
    other = OneBitState(parameters=[torch.nn.Parameter(torch.zeros(5))])
    with pytest.raises(ValueError, match="another model"):
        other.load_state_dict(state.state_dict())


def test_benchmark_codec_reports_timings_and_the_message_size():
    out = spec("onebit").benchmark_codec(10_000, 1, 0)
    assert out["codec_s"] > 0 and out["add_s"] > 0 and out["numel"] == 10_000
    assert out["message_bytes"] == 10_000 / 8 + 8 * 10  # a (1000, 10) matrix: 10 columns


# ---------------------------------------------------------------------------------------------
# Real gloo workers against the simulated cluster, and the bytes by hand
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    return real_runs(CASES)


def _hand_bytes() -> dict[str, float]:
    """Worker 0's bytes per step from the test model's parameter shapes, by hand."""
    shapes = [tuple(p.shape) for p in module().model.parameters()]
    assert shapes == [(64, 8), (64, 16), (64,), (64,), (29, 16), (29,)]
    elements = 64 * 8 + 64 * 16 + 64 + 64 + 29 * 16 + 29  # 2157
    columns = 8 + 16 + 1 + 1 + 16 + 1  # 43
    message = math.ceil(elements / 8) + 2 * 4 * columns  # 270 + 344 = 614 bytes
    return {"message": message, "sent": (NODES - 1) * message, "dense": 2 * (NODES - 1) / NODES * 4 * elements,
            "elements": elements}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["onebit", "onebit_warmup"])
def test_simulated_workers_equal_real_processes(real, name):
    sim = simulated(CASES[name])
    runs = [r[name] for r in real]
    check_equal(sim, runs, name)
    warm = CASES[name]["strategy"].get("warmup_steps", 0)
    # the same floats in the same order (the warm-up's sums too, in rank order): the hook's bits
    assert all(torch.equal(sim["per_step"][s, rank], runs[rank]["per_step"][s])
               for s in range(STEPS) for rank in range(NODES))
    hand, s = _hand_bytes(), sim["summary"]
    one_bit = STEPS - warm
    ring = 2 * (NODES - 1) / NODES * 4 * hand["elements"]
    assert s["all_gather_bytes_sent_per_worker_per_step"] == pytest.approx(hand["sent"] * one_bit / STEPS, rel=1e-12)
    assert s["all_reduce_bytes_sent_per_worker_per_step"] == pytest.approx(ring * warm / STEPS, rel=1e-12)
    assert s["dense_bytes_per_worker_per_step"] == pytest.approx(hand["dense"], rel=1e-12)
    assert s["density"] == 1.0 and s["elements_sent_per_step"] == hand["elements"]  # every element, at one bit
    if not warm:
        assert hand["message"] == 614 and s["compression_ratio"] == pytest.approx(12942 / 1842, rel=1e-12)
        assert s["payload_compression_ratio"] == pytest.approx(4 * 2157 / 614, rel=1e-12)
    stats = sim["cluster"].cost_stats()
    assert stats["onebit_msg_bytes"] == hand["message"] and stats["onebit_dense_step_fraction"] == warm / STEPS
    assert stats["onebit_decode_rate"] > 0


@pytest.mark.slow
def test_several_buckets_and_their_rebuild_leave_the_values_unchanged(real):
    """Columns are per parameter: DDP's split into buckets (rebuilt after step 1) changes no value,
    only the rounding of each bucket's bits up to whole bytes."""
    sim = simulated(CASES["onebit_buckets"])
    runs = [r["onebit_buckets"] for r in real]
    worst = max(rel(sim["per_step"][s, rank], runs[rank]["per_step"][s]) for s in range(STEPS) for rank in range(NODES))
    assert worst <= 1e-5, worst
    r0 = runs[0]["summary"]
    assert r0["collectives_per_step"] > 1.5  # several buckets, one all-gather each
    hand = _hand_bytes()
    assert hand["sent"] <= r0["all_gather_bytes_sent_per_worker_per_step"] < hand["sent"] + (NODES - 1) * r0[
        "collectives_per_step"]  # at most one byte of rounding per bucket
    assert r0["dense_bytes_per_worker_per_step"] == pytest.approx(hand["dense"], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The cost model, by hand
# ---------------------------------------------------------------------------------------------
def test_schedule_by_hand_against_the_alpha_beta_formulas():
    # 8 workers on two machines: the slow link, alpha = 1 s, B = 10 B/s
    parts = cost.comm_parts("onebit", STATS, 8, NET)
    assert close(parts["onebit_messages"], 7 * (1 + 20 / 10))  # ring all-gather (n-1)(alpha + m/B)
    assert close(parts["onebit_decode"], 8 * (80 / 4) / 10)  # 8 messages of 20 elements at 10 elements/s
    assert close(cost.step_time("onebit", 0.0, STATS, 8, NET)["comm_s"], 21 + 16)
    # 4 workers on one machine: alpha = 0, B = 100
    assert close(cost.step_time("onebit", 0.0, STATS, 4, NET)["comm_s"], 3 * 20 / 100 + 4 * 20 / 10)
    # a quarter of the steps in the dense warm-up: ring all-reduce 2 (n-1)(alpha + m/(n B)) = 28 s
    quarter = {**STATS, "onebit_dense_step_fraction": 0.25}
    assert close(cost.comm_parts("onebit", quarter, 8, NET)["onebit_dense_allreduce"], 0.25 * 2 * 7 * (1 + 80 / 80))
    assert close(cost.step_time("onebit", 0.0, quarter, 8, NET)["comm_s"], 0.75 * 37 + 0.25 * 28)
    assert cost.step_time("onebit", 0.0, STATS, 1, NET)["comm_s"] == 0.0


def test_schedule_errors_name_the_input():
    with pytest.raises(ValueError, match="onebit_msg_bytes"):
        cost.step_time("onebit", 1.0, {k: v for k, v in STATS.items() if k != "onebit_msg_bytes"}, 8, NET)
    with pytest.raises(ValueError, match="onebit_dense_step_fraction"):
        cost.step_time("onebit", 1.0, {**STATS, "onebit_dense_step_fraction": 1.5}, 8, NET)
    with pytest.raises(ValueError, match="onebit_decode_rate"):
        cost.step_time("onebit", 1.0, {**STATS, "onebit_decode_rate": 0.0}, 8, NET)


def test_build_refuses_a_hook_of_its_own_and_the_spec_holds_one_error_array():
    with pytest.raises(Exception, match="ddp_comm_hook"):
        build_strategy({"name": "onebit", "ddp_comm_hook": print}, nodes=2, timeout_s=30)
    assert spec("onebit").stacked_arrays({"name": "onebit"}, 4) == {"error feedback": 1}


# ---------------------------------------------------------------------------------------------
# The decode without an index, and a worker's own message decoded once
# ---------------------------------------------------------------------------------------------
def test_broadcast_expand_is_bitwise_the_indexed_decode():
    from asrbench.strategies.onebit import expand

    gen = torch.Generator().manual_seed(4)
    shapes = [torch.Size([7, 5]), torch.Size([3]), torch.Size([0, 4]), torch.Size([2, 3, 2]), torch.Size([1])]
    x = torch.randn(3, 35 + 3 + 12 + 1, generator=gen)
    bits, values = encode(x, shapes)  # three workers' rows at once
    column = column_index(shapes)
    for w in range(3):
        assert torch.equal(expand(bits[w], values[w], shapes), decode(bits[w], values[w], column))
    assert torch.equal(expand(bits, values, shapes), torch.stack([decode(bits[w], values[w], column) for w in range(3)]))


def test_a_worker_does_not_decode_its_own_message_and_gets_the_same_bits(monkeypatch):
    from asrbench.strategies import onebit

    shapes = [torch.Size([6, 4]), torch.Size([5])]
    c = onebit.OneBit()
    plan = c.plan(shapes)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 29, generator=gen)
    memory = torch.randn(3, 29, generator=gen)
    messages, q = c.encode(x, [memory[:, :24], memory[:, 24:]], plan, 3)
    unpacked = []
    real_unpack = onebit.unpack_bits
    monkeypatch.setattr(onebit, "unpack_bits", lambda *a: unpacked.append(1) or real_unpack(*a))
    every = c.decode(messages, plan, torch.empty(29), 3, 0)  # the simulated cluster: every message from its bytes
    assert len(unpacked) == 3
    for rank in range(3):  # as the hook on each rank: its own q from encode, the others' from their bytes
        unpacked.clear()
        mine = c.decode(messages, plan, torch.empty(29), 3, 0, own=(rank, q[rank:rank + 1]))
        assert len(unpacked) == 2 and torch.equal(mine, every)
