"""GTC (Strom 2015): the codec against its equations, the DDP hook in real gloo processes, and
the Lightning strategy (hook on CPU, training, checkpoint/resume of rank-local residuals,
failures that name the rank)."""
from __future__ import annotations

import logging
import math
import os
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_workers, run_workers_outcomes
from lightning_harness import RankProbe, TinyLSTM, fit_two_ranks, load_rank
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from asrbench.errors import CheckpointError
from asrbench.strategies.comm import CollectiveError
from asrbench.strategies.gtc import (CHECKPOINT_KEY, MAX_BUCKET_NUMEL, GTCState, GTCStrategy, NonFiniteGradientError,
                                     _flatnonzero, benchmark_codec, decode, encode, gtc_hook, pack, unpack)


# ---------------------------------------------------------------------------------------------
# Codec: pack/unpack, encode, decode against the equations (no processes)
# ---------------------------------------------------------------------------------------------
def test_pack_round_trips_the_largest_index_and_both_signs():
    index = torch.tensor([0, 1, 12345, MAX_BUCKET_NUMEL - 1, 0, MAX_BUCKET_NUMEL - 1])
    negative = torch.tensor([False, True, False, False, True, True])
    words = pack(index, negative)
    assert words.dtype == torch.int32 and words.element_size() == 4
    got_index, got_negative = unpack(words)
    assert torch.equal(got_index, index) and torch.equal(got_negative, negative)
    assert torch.equal(words < 0, negative)  # the sign bit is the int32's sign


def test_encode_follows_the_equations_on_a_hand_made_bucket():
    tau = 0.5
    residual = torch.tensor([0.0, 0.25, -0.125, 0.0625, 0.0, 1.0])
    grad = torch.tensor([0.625, 0.375, -0.5, 0.0, -0.5, 0.5])
    words = encode(residual, grad, tau)
    index, negative = unpack(words)
    # r + g = [0.625, 0.625, -0.625, 0.0625, -0.5, 1.5]: |r| >= tau at 0, 1, 2, 4 (exactly tau) and 5
    assert index.tolist() == [0, 1, 2, 4, 5]
    assert negative.tolist() == [False, False, True, True, False]
    # one quantum per element and step: 1.5 - 0.5 keeps 1.0 for later steps
    assert residual.tolist() == [0.125, 0.125, -0.125, 0.0625, 0.0, 1.0]


def test_decode_is_the_mean_of_the_messages_and_ignores_padding():
    tau, numel = 0.75, 6
    messages = [pack(torch.tensor([0, 3]), torch.tensor([False, True])),
                pack(torch.tensor([0, 5]), torch.tensor([False, False])),
                pack(torch.tensor([3]), torch.tensor([True]))]
    padded = torch.full((3, 2), int(pack(torch.tensor([1]), torch.tensor([False]))[0]), dtype=torch.int32)
    for w, m in enumerate(messages):
        padded[w, : m.numel()] = m
    expected = torch.tensor([2 * tau, 0, 0, -2 * tau, 0, tau]) / 3
    assert torch.equal(decode(padded, torch.tensor([2, 2, 1]), numel, tau), expected)
    assert torch.equal(decode(messages, None, numel, tau), expected)
    out = torch.full((numel,), 7.0)
    assert decode(messages, None, numel, tau, out) is out and torch.equal(out, expected)


def test_residual_conservation_sent_plus_residual_is_the_gradient_sum():
    gen = torch.Generator().manual_seed(0)
    tau, numel = 0.3, 5000
    residual, sent, total = torch.zeros(numel), torch.zeros(numel), torch.zeros(numel)
    for step in range(20):
        grad = torch.randn(numel, generator=gen) * (0.05 if step % 2 else 0.8)  # some |g| > 2 tau
        total += grad
        sent += decode([encode(residual, grad, tau)], None, numel, tau)
    assert 0 < int((sent != 0).sum()) < numel
    torch.testing.assert_close(sent + residual, total, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_is_abs_at_least_tau_including_the_edges(dtype):
    from asrbench.strategies.gtc import select

    tau = 0.3
    gen = torch.Generator().manual_seed(1)
    r = torch.cat([torch.randn(1000, generator=gen) * 0.3,
                   torch.tensor([tau, -tau, math.nextafter(tau, 0), -math.nextafter(tau, 0), 0.0, -0.0, 1e-40,
                                 3e38, -3e38, float("inf"), float("-inf"), float("nan")])]).to(dtype)
    tau_in_dtype = float(torch.tensor(tau, dtype=dtype))
    expected = (~(r.abs() < tau_in_dtype)).nonzero().view(-1)
    assert torch.equal(select(r, tau), expected)
    assert torch.equal(select(r, tau, torch.empty_like(r), torch.empty(r.numel(), dtype=torch.bool)), expected)


def test_non_finite_residual_is_always_selected_and_refused():
    for bad in (float("nan"), float("inf"), float("-inf")):
        grad = torch.tensor([0.0, bad, 0.0])
        with pytest.raises(NonFiniteGradientError, match="non-finite"):
            encode(torch.zeros(3), grad, 0.1)


def test_bucket_over_31_index_bits_is_refused():
    big = torch.empty(MAX_BUCKET_NUMEL + 1, device="meta")
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        encode(big, big, 0.1)


def test_decode_refuses_an_index_outside_the_bucket():
    with pytest.raises(ValueError, match="bucket"):
        decode([pack(torch.tensor([10]), torch.tensor([False]))], None, 10, 0.1)


@pytest.mark.parametrize("numel", [1, 7, 8, 1001, 4096 + 5])
def test_block_nonzero_matches_nonzero(numel):
    gen = torch.Generator().manual_seed(numel)
    mask = torch.rand(numel, generator=gen) < 0.05
    mask[-1] = True
    assert torch.equal(_flatnonzero(mask), mask.nonzero().view(-1))
    assert torch.equal(_flatnonzero(mask[1:]), mask[1:].nonzero().view(-1))  # unaligned view


@pytest.mark.parametrize("tau", [0.0, -1e-3, float("nan"), float("inf")])
def test_tau_must_be_positive(tau):
    with pytest.raises(ValueError, match="Arg `tau`"):
        GTCState(tau=tau)
    with pytest.raises(ValueError, match="Arg `tau`"):
        GTCStrategy(tau=tau)


@pytest.mark.parametrize("kwargs, named", [({"dense_warmup_steps": -1}, "dense_warmup_steps"),
                                           ({"dense_warmup_steps": 2.5}, "dense_warmup_steps"),
                                           ({"tau_units": "adam"}, "tau_units")])
def test_warm_up_and_units_are_checked(kwargs, named):
    with pytest.raises(ValueError, match=f"Arg `{named}`"):
        GTCState(**kwargs)


def test_rms_units_before_adam_froze_is_one_clear_error():
    state = GTCState(tau_units="rms", scale_of=lambda p: None)
    with pytest.raises(RuntimeError, match="freeze_variance_after <= strategy.dense_warmup_steps"):
        state.element_scale([torch.zeros(3)])
    assert GTCState().element_scale([torch.zeros(3)]) is None  # gradient units: no scale


def test_benchmark_codec_reports_both_timings(monkeypatch):
    out = benchmark_codec(numel=200_000, density=0.01, repeats=2)
    assert out["codec_s"] > 0 and out["add_s"] > 0
    assert 0.005 < out["density"] < 0.02
    # on a scripted clock: codec runs of 1, 6, 4 s, then adds of 1, 3, 2 s; the first of each only warms up
    ticks = iter([0, 1, 10, 16, 20, 24, 30, 31, 40, 43, 50, 52])
    monkeypatch.setattr("asrbench.strategies.gtc.time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    out = benchmark_codec(numel=1000, density=0.01, repeats=2)
    assert (out["codec_s"], out["add_s"], out["ratio"]) == (4, 2, 2.0)  # the best of the rest, and codec / add


# ---------------------------------------------------------------------------------------------
# State: residuals follow their parameters when DDP rebuilds buckets, and checkpoint by rank
# ---------------------------------------------------------------------------------------------
class FakeBucket:
    """The parts of dist.GradBucket the state reads."""

    def __init__(self, index: int, params: list[torch.Tensor]) -> None:
        self._index, self._params = index, params
        self._buffer = torch.zeros(sum(p.numel() for p in params))

    def index(self) -> int:
        return self._index

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def buffer(self) -> torch.Tensor:
        return self._buffer


def test_residuals_follow_their_parameters_through_a_bucket_rebuild_and_a_checkpoint():
    a, b, c = (nn.Parameter(torch.zeros(n)) for n in (3, 2, 4))
    state = GTCState(tau=1.0, parameters=[a, b, c])
    residual, _ = state.memory(FakeBucket(0, [a, b, c]))  # DDP's first buckets
    residual.copy_(torch.arange(9.0))  # a = 0 1 2, b = 3 4, c = 5 6 7 8
    r0, _ = state.memory(FakeBucket(0, [c, b]))  # rebuilt after the first step: new order and split
    r1, _ = state.memory(FakeBucket(1, [a]))
    assert r0.tolist() == [5, 6, 7, 8, 3, 4] and r1.tolist() == [0, 1, 2]
    assert torch.equal(state.canonical_residual(), torch.arange(9.0))
    saved = state.state_dict()
    fresh = GTCState(tau=1.0, parameters=[a, b, c])
    fresh.load_state_dict(saved)
    assert fresh.memory(FakeBucket(0, [b]))[0].tolist() == [3, 4]
    assert fresh.memory(FakeBucket(1, [a, c]))[0].tolist() == [0, 1, 2, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="another model"):
        GTCState(tau=1.0, parameters=[a]).load_state_dict(saved)
    state.dense_warmup_steps, state.tau_units, state.scale_of = 5, "rms", lambda p: torch.ones_like(p)
    copy = pickle.loads(pickle.dumps(state))  # as Lightning's spawn launcher ships the strategy
    assert copy.process_group is None and copy.tau == 1.0
    assert copy.dense_warmup_steps == 5 and copy.tau_units == "rms" and copy.scale_of is None  # rebound in the worker
    copy.bind_parameters([a, b, c])
    assert torch.equal(copy.canonical_residual(), torch.arange(9.0))


def test_checkpoint_of_another_world_size_is_refused(tmp_path: Path):
    path = tmp_path / "gtc.ckpt"
    torch.save({CHECKPOINT_KEY: {"world_size": 3, "ranks": {}}}, path)
    with pytest.raises(CheckpointError, match="3 workers but this run has 1"):
        GTCStrategy(tau=0.01).load_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# The DDP hook in real gloo processes
# ---------------------------------------------------------------------------------------------
def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 3))


def _batches(world: int, steps: int, per_worker: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(world * per_worker, 12, generator=gen), torch.randn(world * per_worker, 3, generator=gen))
            for _ in range(steps)]


def _train(model: nn.Module, batches, rank: int | None, world: int, lr: float = 0.1) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in batches:
        if rank is not None:  # this worker's share of the global batch
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _pass_through_sync_and_big_batch(rank: int, world: int) -> dict:
    batches = _batches(world, steps=5)
    sync = _train(DDP(_mlp()), batches, rank, world)
    gtc_model = DDP(_mlp(), gradient_as_bucket_view=True, bucket_cap_mb=0.01)
    gtc_model.register_comm_hook(GTCState(tau=1e-3, pass_through=True, parameters=gtc_model.parameters()), gtc_hook)
    gtc = _train(gtc_model, batches, rank, world)
    big = _train(_mlp(), batches, None, world)
    return {"sync": sync, "gtc": gtc, "big": big}


@pytest.mark.slow
def test_pass_through_equals_sync_equals_one_worker_with_n_times_the_batch():
    for out in run_workers(_pass_through_sync_and_big_batch, 2):
        for s, g, b in zip(out["sync"], out["gtc"], out["big"]):
            assert torch.equal(g, s)
            torch.testing.assert_close(s, b, rtol=0, atol=1e-6)


def _element_scale(p: torch.Tensor) -> torch.Tensor:
    """A per-element scale d that every rank knows (as Adam's frozen denominator is)."""
    return torch.linspace(0.25, 4.0, p.numel()).view_as(p)


def _gtc_against_simulation(rank: int, world: int, tau: float, dense_warmup_steps: int = 0,
                            tau_units: str = "gradient") -> dict:
    """DDP + gtc_hook (several buckets, rebuilt after step 0) vs the equations run for all workers here."""
    batches = _batches(world, steps=6)
    model = DDP(_mlp(), gradient_as_bucket_view=True, bucket_cap_mb=0.005)
    state = GTCState(tau=tau, parameters=model.parameters(), dense_warmup_steps=dense_warmup_steps,
                     tau_units=tau_units, scale_of=_element_scale)
    model.register_comm_hook(state, gtc_hook)
    got = _train(model, batches, rank, world)

    ref = _mlp()
    params = list(ref.parameters())
    residuals = [torch.zeros(sum(p.numel() for p in params)) for _ in range(world)]
    d = torch.cat([_element_scale(p).view(-1) for p in params]) if tau_units == "rms" else torch.ones(1)
    for step, (x, y) in enumerate(batches):
        messages, grads = [], []
        for w in range(world):
            ref.zero_grad()
            nn.functional.mse_loss(ref(x.chunk(world)[w]), y.chunk(world)[w]).backward()
            grads.append(torch.cat([p.grad.view(-1) for p in params]))
            if step >= dense_warmup_steps:
                messages.append(encode(residuals[w], grads[-1] / d, tau))
        if step < dense_warmup_steps:  # dense warm-up: the mean gradient, residuals untouched
            mean = torch.stack(grads).mean(0)
        else:  # each element's threshold is tau * d_i: GTC on g / d, the decoded mean times d
            mean = decode(messages, None, residuals[0].numel(), tau) * d
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(params) - 0.1 * mean, params)
    return {"got": got, "want": [p.detach() for p in params], "residual": state.canonical_residual(),
            "want_residual": residuals[rank], "hook_calls": state.hook_calls, "iter": state.iter,
            "stats": state.comm_stats.per_step()}


@pytest.mark.slow
@pytest.mark.parametrize("dense_warmup_steps, tau_units", [(0, "gradient"), (2, "gradient"), (2, "rms")])
def test_hook_equals_the_equations_for_every_worker_through_bucket_rebuilds(dense_warmup_steps, tau_units):
    outs = run_workers(_gtc_against_simulation, 2, 0.02, dense_warmup_steps, tau_units)
    for out in outs:
        for g, w in zip(out["got"], out["want"]):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        torch.testing.assert_close(out["residual"], out["want_residual"], rtol=0, atol=1e-6)
        assert out["iter"] == 6 and out["hook_calls"] > 6  # several buckets per step
        assert 0 < out["stats"]["density"] < 1  # compressed, not everything sent
        assert out["stats"]["compression_ratio"] > 1
        if dense_warmup_steps:  # the warm-up's all-reduces were counted
            assert out["stats"]["all_reduce_bytes_sent_per_worker_per_step"] > 0
    assert not torch.equal(outs[0]["residual"], outs[1]["residual"])  # rank-local


class LinearLoss(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(n))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return (c * self.theta).sum()


def _linear_loss_bound(rank: int, world: int, tau: float, lr: float, steps: int) -> dict:
    """L_w(θ) = <c_w, θ>: constant gradients c_w, so sync SGD is θ_t = θ_0 - η t mean_w c_w."""
    cs = [torch.empty(2000).uniform_(-tau, tau, generator=torch.Generator().manual_seed(w)) for w in range(world)]
    module = LinearLoss(2000)
    theta = module.theta
    model = DDP(module, gradient_as_bucket_view=True)
    state = GTCState(tau=tau, parameters=model.parameters())
    model.register_comm_hook(state, gtc_hook)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    worst = 0.0
    for t in range(1, steps + 1):
        opt.zero_grad()
        model(cs[rank]).backward()
        opt.step()
        sync = -lr * t * torch.stack(cs).mean(0)
        worst = max(worst, float((theta.detach() - sync).abs().max()))
    residuals = [torch.empty(2000) for _ in range(world)]
    dist.all_gather(residuals, state.canonical_residual())
    return {"worst": worst, "theta": theta.detach(), "sync": sync, "mean_residual": torch.stack(residuals).mean(0),
            "density": state.comm_stats.per_step()["density"]}


@pytest.mark.slow
def test_gtc_tracks_sync_within_eta_tau_when_gradients_are_within_tau():
    """|r| < τ stays true when |g| <= τ, so θ_gtc = θ_sync + η mean_w r_w lies within η τ of sync."""
    tau, lr = 0.01, 0.5
    out = run_workers(_linear_loss_bound, 2, tau, lr, 40)[0]
    assert out["worst"] < lr * tau
    torch.testing.assert_close(out["theta"], out["sync"] + lr * out["mean_residual"], rtol=0, atol=1e-6)
    assert 0.1 < out["density"] < 0.9


def _least_squares(rank: int, world: int, taus: list[float | None], lr: float, steps: int) -> dict:
    gen = torch.Generator().manual_seed(7)
    theta_star = torch.randn(16, generator=gen)
    xs = [torch.randn(64, 16, generator=gen) for _ in range(world)]
    x, y = xs[rank], xs[rank] @ theta_star
    errors = {}
    for tau in taus:
        module = nn.Linear(16, 1, bias=False)
        nn.init.zeros_(module.weight)
        model = DDP(module, gradient_as_bucket_view=True)
        if tau is not None:
            model.register_comm_hook(GTCState(tau=tau, parameters=model.parameters()), gtc_hook)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            (0.5 * (model(x).squeeze(1) - y).pow(2).mean()).backward()
            opt.step()
        errors[tau] = float((module.weight.detach().view(-1) - theta_star).norm())
    return errors


@pytest.mark.slow
def test_gtc_converges_to_the_sync_solution_within_a_bound_that_shrinks_with_tau():
    """Near the optimum |g| < τ, so GTC settles within about η τ sqrt(d) of it. (τ far below the
    gradients does not approach sync: one ±τ per element and step is sign-SGD with step η τ.)"""
    lr, d = 0.1, 16
    errors = run_workers(_least_squares, 2, [None, 1.0, 0.5], lr, 250)[0]
    assert errors[None] < 1e-4
    assert errors[0.5] < errors[1.0] < lr * 1.0 * math.sqrt(d)
    assert errors[0.5] < lr * 0.5 * math.sqrt(d)


def _lstm_density_and_warnings(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    lstm = nn.LSTM(20, 96, num_layers=2, batch_first=True)
    model = DDP(lstm, gradient_as_bucket_view=True)
    state = GTCState(tau=5e-6, max_density=0.001, density_warn_interval=3, parameters=model.parameters())
    model.register_comm_hook(state, gtc_hook)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("asrbench.strategies.gtc").addHandler(handler)
    torch.manual_seed(1 + rank)
    densities = []
    for _ in range(7):
        model.zero_grad()
        out, _ = model(torch.randn(4, 10, 20))
        out.pow(2).mean().backward()
        densities.append(state.comm_stats.last_step()["density"])
    numel = sum(p.numel() for p in lstm.parameters())
    return {"densities": densities, "numel": numel, "warned_at": [r.args[0] for r in records
                                                                    if r.levelno == logging.WARNING]}


@pytest.mark.slow
def test_realistic_model_is_compressed_and_density_warnings_are_rate_limited():
    out = run_workers(_lstm_density_and_warnings, 2)[0]
    assert out["numel"] > 100_000
    assert all(0 < d < 1 for d in out["densities"])  # elements sent < elements total, every step
    assert out["warned_at"] == [0, 3, 6]  # every step is over max_density; one warning per 3 steps


def _nan_on_rank1(rank: int, world: int) -> str:
    model = DDP(_mlp(), gradient_as_bucket_view=True)
    model.register_comm_hook(GTCState(tau=1e-2, parameters=model.parameters()), gtc_hook)
    for step in range(3):
        x = torch.randn(4, 12)
        if rank == 1 and step == 1:
            x[0, 0] = float("nan")
        try:
            model(x).sum().backward()
        except NonFiniteGradientError as err:
            return str(err)
    return "no error"


@pytest.mark.slow
def test_non_finite_gradient_on_one_rank_stops_every_rank_naming_step_and_rank():
    for message in run_workers(_nan_on_rank1, 2):
        assert "step 1" in message and "rank(s) 1" in message


# A failure is named within the process group's timeout, the wait for the peers' answers and an
# allowance for the failing step's own work, all counted from that step's start (process start-up,
# which a loaded machine can stretch at will, is outside the bound).
COLLECTIVE_TIMEOUT_S = 2.0  # the process group's: how long a collective waits for a hung peer
ANSWER_WAIT_S = 3.0  # asrbench.strategies.comm.collective_error's wait for every peer to answer
STEP_ALLOWANCE_S = 10.0  # rank 0's forward, backward, encode and store round trips on a loaded machine


def _peer_fails(rank: int, world: int, how: str) -> tuple[str, float]:
    """Rank 1 fails at step 2 as `how` says; rank 0 returns its error and the seconds from step 2's start."""
    model = DDP(_mlp(), gradient_as_bucket_view=True)
    model.register_comm_hook(GTCState(tau=1e-2, parameters=model.parameters()), gtc_hook)
    for step in range(4):
        t_step = time.monotonic()
        if rank == 1 and step == 2:
            if how == "raise":
                raise ValueError("injected failure")
            if how == "die":
                os._exit(3)
            time.sleep(COLLECTIVE_TIMEOUT_S + ANSWER_WAIT_S + 1)  # hang past rank 0's timeout and its wait
            return "slept", 0.0
        try:
            model(torch.randn(4, 12)).sum().backward()
        except CollectiveError as err:
            return str(err), time.monotonic() - t_step
    return "no error", 0.0


@pytest.mark.slow
@pytest.mark.parametrize("how, expected", [("raise", "rank 1 raised ValueError: injected failure"),
                                           ("die", "rank 1 did not answer"),
                                           ("hang", "rank 1 did not answer")])
def test_a_failed_dead_or_hung_worker_is_named_in_bounded_time(how, expected):
    # `timeout` only ends workers that never finish; the bound that matters is the one on `seconds`
    outcomes = run_workers_outcomes(_peer_fails, 2, how, timeout=120, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    assert outcomes[0].ok, outcomes[0].error
    message, seconds = outcomes[0].value
    assert seconds < COLLECTIVE_TIMEOUT_S + ANSWER_WAIT_S + STEP_ALLOWANCE_S
    assert outcomes[0].ok and expected in message and "step 2" in message
    if how == "die":
        assert outcomes[1].exitcode == 3


# ---------------------------------------------------------------------------------------------
# Lightning: GTCStrategy on CPU with 2 processes
# ---------------------------------------------------------------------------------------------
class Probe(RankProbe):
    """Writes each rank's view (residuals, losses, hook calls, parameters) under `out_dir`."""

    def __init__(self, out_dir: Path, tag: str, save_at_epoch: int | None = None) -> None:
        super().__init__(out_dir, tag, save_at_epoch)
        self.losses: list[float] = []

    def memory(self, trainer):
        return trainer.strategy.gtc_state.canonical_residual().cpu()

    def start(self, trainer):
        return {"residual": self.memory(trainer), "iter": trainer.strategy.gtc_state.iter}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def end(self, trainer, pl_module):
        state = trainer.strategy.gtc_state
        return {"params": [p.detach().clone() for p in pl_module.parameters()], "losses": self.losses,
                "hook_calls": state.hook_calls, "summary": trainer.strategy.comm_summary()}


STRATEGY_TIMEOUT_S = 20  # the Lightning runs' collective timeout
LAUNCH_ALLOWANCE_S = 60  # two forkserver workers setting up Lightning and training to the failing step


def _fit(tmp_path: Path, tag: str, *, epochs: int, ckpt: Path | None = None, save_at_epoch: int | None = None,
         fail_rank: int | None = None) -> pl.Trainer:
    strategy = GTCStrategy(tau=2e-3, start_method="forkserver", timeout=STRATEGY_TIMEOUT_S)
    return fit_two_ranks(tmp_path, strategy, Probe(tmp_path, tag, save_at_epoch), TinyLSTM(fail_rank),
                         epochs=epochs, ckpt=ckpt)


def _load(tmp_path: Path, tag: str, name: str, rank: int):
    return load_rank(tmp_path, tag, name, rank, weights_only=False)


@pytest.mark.slow
def test_lightning_gtc_trains_on_cpu_and_resumes_rank_local_residuals_exactly(tmp_path: Path):
    trainer = _fit(tmp_path, "full", epochs=3, save_at_epoch=0)
    assert 0 < float(trainer.callback_metrics["comm/density"]) < 1  # logged, and compressed
    ends = [_load(tmp_path, "full", "end", r) for r in range(2)]
    for end in ends:
        assert end["hook_calls"] >= 12  # the hook ran on CPU, every step (4 steps x 3 epochs)
        assert sum(end["losses"][-4:]) < sum(end["losses"][:4])  # the loss goes down
        assert end["summary"]["compression_ratio"] > 1 and end["summary"]["steps"] == 12
    saved = [_load(tmp_path, "full", "saved", r) for r in range(2)]
    assert saved[0].abs().sum() > 0 and not torch.equal(saved[0], saved[1])  # ranks saw different data
    entry = torch.load(tmp_path / "mid.ckpt", weights_only=True)[CHECKPOINT_KEY]
    assert entry["world_size"] == 2
    for r in range(2):
        assert torch.equal(entry["ranks"][r]["residual"], saved[r])

    _fit(tmp_path, "resumed", epochs=3, ckpt=tmp_path / "mid.ckpt")
    for r in range(2):
        start = _load(tmp_path, "resumed", "start", r)
        assert torch.equal(start["residual"], saved[r]) and start["iter"] == 4
        resumed = _load(tmp_path, "resumed", "end", r)
        for a, b in zip(resumed["params"], ends[r]["params"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_lightning_worker_that_raises_stops_the_run_naming_the_rank(tmp_path: Path):
    t0 = time.monotonic()
    with pytest.raises(Exception, match="injected failure on rank 1") as info:
        _fit(tmp_path, "fail", epochs=1, fail_rank=1)
    assert "Process 1 terminated" in str(info.value)  # the launcher names the rank (one node: local = global)
    assert time.monotonic() - t0 < STRATEGY_TIMEOUT_S + ANSWER_WAIT_S + LAUNCH_ALLOWANCE_S


def test_the_kernel_build_is_keyed_by_the_cpu():
    from asrbench.strategies import gtc_kernel

    intel = "processor : 0\nmodel name : Intel Xeon\nflags : fpu sse avx2 avx512f\n\nprocessor : 1\nmodel name : Intel Xeon\n"
    amd = "processor : 0\nmodel name : AMD EPYC\nflags : fpu sse avx2\n"
    assert gtc_kernel.cpu_key(intel) != gtc_kernel.cpu_key(amd)
    assert gtc_kernel.cpu_key(intel) == gtc_kernel.cpu_key(intel.replace("avx2 avx512f", "avx512f avx2"))
    assert gtc_kernel.cpu_key(intel) != gtc_kernel.cpu_key(intel.replace(" avx512f", ""))  # fewer instructions
    assert len(gtc_kernel.cpu_key()) == 10
