"""Top-k sparsification with error feedback (Aji & Heafield 2017; Lin et al. 2018): the codec against
hand cases and its equations, the bytes and the cost schedule by hand, and the simulated cluster
against real gloo processes (and against sync SGD at density 1)."""
from __future__ import annotations

import inspect
import math
import pickle
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from asrbench.cluster import cost
from asrbench.strategies import build_strategy, spec
from asrbench.strategies.topk import (TopKState, TopKStrategy, StackedTopK, benchmark_codec, compress, decode,
                                      k_of, pack, unpack)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_utils, equivalence
from equivalence import NODES, STEPS, case, check_equal, module, real_runs, rel, simulated  # noqa: E402

CONF = Path(__file__).resolve().parents[2] / "conf" / "strategy"
DENSITY = 0.1  # this model sends ~10 % of each tensor: compressed, yet enough to train
CASES = {
    "topk": case({"name": "topk", "density": DENSITY}),
    "topk_warmup": case({"name": "topk", "density": DENSITY, "warmup_steps": 6}),
    # ~1 KB buckets: this model's 2157 parameters in several buckets, rebuilt after the first step
    "topk_buckets": case({"name": "topk", "density": DENSITY, "bucket_cap_mb": 0.001}),
    "topk_d1": case({"name": "topk", "density": 1.0}),
    "sync": case({"name": "sync"}),
}


# ---------------------------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("numel, density, k", [(100, 0.07, 7), (30, 0.1, 3), (10, 0.01, 1), (1000, 0.0015, 2),
                                               (3, 0.5, 2), (5, 1.0, 5), (1, 0.001, 1)])
def test_k_is_the_ceiling_of_density_times_elements_and_at_least_one(numel, density, k):
    assert k_of(numel, density) == k


def test_selection_on_a_hand_case():
    # two workers, two tensors (4 and 6 elements), k = (2, 2)
    r = torch.tensor([[0.5, -1.0, 0.0, 0.2, 0.5, -3.0, 1.0, 0.2, -2.0, 0.1],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    g = torch.tensor([[0.1, 0.0, 0.0, -2.0, 0.0, 0.0, 1.5, 0.0, 0.0, 0.0],
                      [1.0, 2.0, 3.0, 4.0, -6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    # r + g: worker 0 [0.6, -1, 0, -1.8 | 0.5, -3, 2.5, 0.2, -2, 0.1], worker 1 [1, 2, 3, 4 | -6, 5, 4, 3, 2, 1]
    columns = lambda x: [x[:, :4], x[:, 4:]]  # noqa: E731
    values, index = compress(columns(r), columns(g), [2, 2], [0, 4])
    assert values.shape == index.shape == (2, 4)
    sent = [dict(zip(index[w].tolist(), values[w].tolist())) for w in range(2)]
    assert sent[0] == {3: pytest.approx(-1.8), 1: -1.0, 5: -3.0, 6: 2.5}
    assert sent[1] == {3: 4.0, 2: 3.0, 4: -6.0, 5: 5.0}
    assert torch.allclose(r, torch.tensor([[0.6, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.2, -2.0, 0.1],
                                           [1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 4.0, 3.0, 2.0, 1.0]]))


def test_each_tensor_sends_its_k_largest_residual_magnitudes():
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (7,), (3, 3, 3), (1,)]
    sizes = [math.prod(s) for s in shapes]
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    workers, n = 3, sum(sizes)
    r = torch.randn(workers, n, generator=gen)
    g = torch.randn(workers, n, generator=gen)
    expected = r + g
    cols = lambda x: [x[:, a:a + m] for a, m in zip(offsets, sizes)]  # noqa: E731
    ks = [2, 1, 3, 1]  # ceil(0.1 m) by hand for m = 20, 7, 27, 1
    assert [k_of(m, 0.1) for m in sizes] == ks
    values, index = compress(cols(r), cols(g), ks, offsets)
    for w in range(workers):
        for a, m, k in zip(offsets, sizes, ks):
            mine = index[w][(index[w] >= a) & (index[w] < a + m)]
            assert mine.numel() == k  # k_t per tensor
            # independent path: a full sort of this tensor's |r + g|
            top = set((expected[w, a:a + m].abs().argsort(descending=True)[:k] + a).tolist())
            assert set(mine.tolist()) == top
        assert torch.equal(values[w], expected[w, index[w]])
        assert torch.all(r[w, index[w]] == 0)
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[index[w]] = False
        assert torch.equal(r[w, untouched], expected[w, untouched])


def test_error_feedback_sent_plus_residual_is_the_sum_of_gradients():
    gen = torch.Generator().manual_seed(1)
    n, steps = 50, 20
    r = torch.zeros(1, n)
    applied = torch.zeros(n, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(steps):
        g = torch.randn(1, n, generator=gen)
        total += g[0].double()
        values, index = compress([r], [g], [3], [0])
        applied.index_add_(0, index[0], values[0].double())
    assert torch.allclose(applied + r[0].double(), total, atol=1e-5)
    assert (applied != 0).sum() > 3  # many elements were sent over the steps, not only one step's k


def test_decode_is_the_mean_of_the_messages_in_rank_order():
    values = torch.tensor([[1.0, 2.0], [4.0, -2.0], [0.5, 8.0]])
    index = torch.tensor([[0, 3], [3, 1], [4, 0]])
    out = torch.full((5,), 7.0)
    decode(values, index, out, 4)  # N = 4, one worker's message all zeros is implied by the divisor
    assert torch.equal(out, torch.tensor([9.0, -2.0, 0.0, 6.0, 0.5]) / 4)


def test_pack_unpack_round_trip_of_three_gathered_messages():
    values = [torch.tensor([[1.5, -0.0, float("inf")]]), torch.tensor([[-2.25, 3.0, 1e-30]]),
              torch.tensor([[0.0, 5.0, -7.0]])]
    indices = [torch.tensor([[0, 2**31 - 1, 5]]), torch.tensor([[1, 2, 3]]), torch.tensor([[9, 8, 7]])]
    messages = [pack(v, i) for v, i in zip(values, indices)]
    assert all(m.dtype == torch.int32 and m.numel() == 6 for m in messages)  # 8 bytes per element
    got_values, got_index = unpack(torch.cat(messages), 3)
    assert torch.equal(got_values, torch.cat(values)) and torch.equal(got_index, torch.cat(indices))
    assert got_index.dtype == torch.int64


def test_state_checks_its_arguments_and_round_trips():
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="Arg `density`"):
            TopKState(density=bad)
    with pytest.raises(ValueError, match="Arg `warmup_steps`"):
        TopKState(warmup_steps=-1)
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    state = TopKState(density=0.5, parameters=params)
    state.memory(params[1]).add_(torch.arange(4.0))  # a view of r: written through
    state.iter = 7
    saved = pickle.loads(pickle.dumps(state)).state_dict()
    restored = TopKState(density=0.5)
    restored.load_state_dict(saved)
    restored.bind_parameters(params)
    assert restored.iter == 7 and torch.equal(restored.memory(params[1]), torch.arange(4.0).view(1, 4))
    with pytest.raises(ValueError, match="another model"):
        restored.bind_parameters(params[:1])


def test_config_keys_are_exactly_init_keywords_and_knobs():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "topk.yaml"))
    assert cfg.pop("name") == "topk"
    assert set(cfg) <= set(inspect.signature(TopKStrategy.__init__).parameters)
    assert set(cfg) == set(spec("topk").knobs)
    assert TopKStrategy(**cfg).topk_state.density == cfg["density"]


def test_benchmark_codec_runs_and_sends_the_density():
    out = spec("topk").benchmark_codec(10_000, 2, 0, density=0.01)
    assert out["density"] == 0.01 and out["codec_s"] > 0 and out["ratio"] > 0
    assert spec("topk").codec_label({"density": 0.001}) == "0.1%"
    assert benchmark_codec(1000, 1, 0, 0.5)["density"] == 0.5


# ---------------------------------------------------------------------------------------------
# Bytes and the cost schedule by hand
# ---------------------------------------------------------------------------------------------
def test_bytes_per_worker_per_step_by_hand():
    # N = 4, tensors of 10 and 30 elements, d = 0.1: k = 1 + 3 = 4 elements, 32 bytes per message
    state = TopKState(density=0.1, warmup_steps=1)
    ex = StackedTopK(state, 4, [torch.Size([10]), torch.Size([5, 6])], torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        ex.exchange(torch.randn(4, 40, generator=gen), step)
    s = state.comm_stats.per_step()
    assert s["steps"] == 3 and state.iter == 3
    dense = 2 * 3 / 4 * 160  # ring all-reduce of 40 fp32: 240 B, the warm-up step and every step's dense figure
    gather = 3 * 32  # (N - 1) x 8 B x 4 elements, each compressed step
    assert s["bytes_sent_per_worker_per_step"] == pytest.approx((dense + 2 * gather) / 3)
    assert s["all_gather_bytes_sent_per_worker_per_step"] == pytest.approx(2 * gather / 3)
    assert s["all_reduce_bytes_sent_per_worker_per_step"] == pytest.approx(dense / 3)
    assert s["dense_bytes_per_worker_per_step"] == pytest.approx(dense)
    assert s["payload_bytes_per_worker_per_step"] == pytest.approx((160 + 2 * 32) / 3)
    assert s["density"] == pytest.approx((40 + 4 + 4) / 120)
    c = ex.cost_stats()
    assert c["topk_msg_bytes"] == 32 and c["elements_sent_per_step"] == 4
    assert c["topk_dense_step_fraction"] == pytest.approx(1 / 3) and c["decode_rate"] > 0


# Toy network as tests/cluster/test_cost.py: 4 workers per machine, free fast links inside, 1 s latency between
NET = {"name": "toy", "latency_s": 1.0, "bandwidth_Bps": 10.0, "gpus_per_machine": 4,
       "intra_latency_s": 0.0, "intra_bandwidth_Bps": 100.0}
STATS = {"topk_msg_bytes": 40.0, "elements_sent_per_step": 5.0, "decode_rate": 10.0,
         "topk_dense_step_fraction": 0.0, "dense_bytes_per_worker_per_step": 80.0}


def test_cost_schedule_by_hand():
    parts = cost.comm_parts("topk", STATS, 8, NET)
    assert parts["topk_messages"] == pytest.approx(7 * (1 + 40 / 10))  # ring all-gather (n-1)(alpha + m / B)
    assert parts["topk_decode"] == pytest.approx(8 * 5 / 10)  # n e / r
    assert "topk_dense_allreduce" not in parts
    quarter = {**STATS, "topk_dense_step_fraction": 0.25}
    parts = cost.comm_parts("topk", quarter, 8, NET)
    # 3/4 of (35 + 4) s, 1/4 of the dense ring 2 (n-1)(alpha + m / (n B)) = 14 x (1 + 1) = 28 s
    assert sum(parts.values()) == pytest.approx(0.75 * 39 + 0.25 * 28)
    one_machine = cost.comm_parts("topk", STATS, 4, NET)  # intra links: alpha 0, 100 B/s
    assert one_machine["topk_messages"] == pytest.approx(3 * 40 / 100)
    assert cost.comm_parts("topk", STATS, 1, NET) == {}
    with pytest.raises(ValueError, match="topk_dense_step_fraction"):
        cost.comm_parts("topk", {**STATS, "topk_dense_step_fraction": 1.5}, 8, NET)
    with pytest.raises(ValueError, match="decode_rate"):
        cost.comm_parts("topk", {**STATS, "decode_rate": 0.0}, 8, NET)


# ---------------------------------------------------------------------------------------------
# The simulated cluster against real gloo processes
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    return real_runs(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["topk", "topk_warmup", "topk_buckets"])
def test_simulated_workers_equal_real_processes(real, name):
    sim = simulated(CASES[name])
    runs = [r[name] for r in real]
    check_equal(sim, runs, name)
    sizes = [p.numel() for p in module().model.parameters()]
    sent = sum(-(-m // 10) for m in sizes)  # ceil(m / 10) per tensor, integer arithmetic
    s = sim["summary"]
    warm = 6 if name == "topk_warmup" else 0
    assert s["density"] == pytest.approx((warm + (STEPS - warm) * sent / sum(sizes)) / STEPS)
    assert sim["cluster"].cost_stats()["topk_dense_step_fraction"] == warm / STEPS
    buckets = runs[0]["summary"]["collectives_per_step"]  # one all_gather per DDP bucket
    assert buckets > 2 if name == "topk_buckets" else buckets == 1
    if not warm:  # the same topk and scatter-adds in the same order: the hook's bits
        assert all(torch.equal(sim["per_step"][s, rank], runs[rank]["per_step"][s])
                   for s in range(STEPS) for rank in range(NODES))


@pytest.mark.slow
def test_topk_at_density_one_is_sync(real):
    sim, sync = simulated(CASES["topk_d1"]), simulated(CASES["sync"])
    worst = max(rel(sim["per_step"][s, 0], sync["per_step"][s, 0]) for s in range(STEPS))
    assert worst <= 1e-5
    assert sim["summary"]["density"] == 1.0
    for rank in range(NODES):
        real_topk, real_sync = real[rank]["topk_d1"]["per_step"], real[rank]["sync"]["per_step"]
        assert max(rel(real_topk[s], real_sync[s]) for s in range(STEPS)) <= 1e-5
    check_equal(sim, [r["topk_d1"] for r in real], "topk_d1")


def test_the_strategy_builds_from_the_config():
    strategy = build_strategy({"name": "topk", "density": 0.05, "warmup_steps": 2}, nodes=2, timeout_s=30)
    assert type(strategy) is TopKStrategy and strategy.topk_state.density == 0.05
    assert strategy.topk_state.warmup_steps == 2
    assert spec("topk").stacked_arrays({}, 4) == {"residuals": 1}
