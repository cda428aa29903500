"""Properties of the algorithm cores over random inputs (hypothesis): GTC's wire format and codec,
BMUF's filter, and the byte accounting. Exact where the float math allows, else within a bound
derived from the number of roundings."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from asrbench.strategies import gtc_codec
from asrbench.strategies.accounting import CommStats, all_gather_bytes, all_reduce_bytes, broadcast_bytes
from asrbench.strategies.bmuf import BlockMomentumFilter, OuterOptimizerFilter
from asrbench.strategies.gtc import MAX_BUCKET_NUMEL, NonFiniteGradientError, decode, encode, pack, unpack

SETTINGS = settings(max_examples=150, deadline=None)
EPS32 = torch.finfo(torch.float32).eps

indices = st.integers(0, 2**31 - 1)
finite32 = st.floats(-8.0, 8.0, allow_nan=False, allow_infinity=False, width=32)
taus = st.floats(2.0**-10, 4.0, allow_nan=False, width=32)


@st.composite
def gradient_sequences(draw, max_steps: int = 6, max_numel: int = 40) -> torch.Tensor:
    """(steps, numel) float32 gradients."""
    steps = draw(st.integers(1, max_steps))
    numel = draw(st.integers(1, max_numel))
    values = draw(st.lists(finite32, min_size=steps * numel, max_size=steps * numel))
    return torch.tensor(values, dtype=torch.float32).view(steps, numel)


def tau32(tau: float) -> float:
    """τ as the fp32 number the codec compares against and sends."""
    return float(torch.tensor(tau, dtype=torch.float32))


def sent_vector(before: torch.Tensor, tau: float) -> torch.Tensor:
    """The dense vector GTC should send for residual r = `before`: sign(r_i) τ where |r_i| >= τ, else 0."""
    t = tau32(tau)
    return torch.where(before.abs() >= t, torch.where(before < 0, -t, t), 0.0).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# GTC wire format
# ---------------------------------------------------------------------------------------------
@SETTINGS
@given(st.lists(st.tuples(indices, st.booleans()), max_size=64))
def test_pack_unpack_round_trips_any_31_bit_index_and_sign(elements):
    index = torch.tensor([i for i, _ in elements], dtype=torch.long)
    negative = torch.tensor([n for _, n in elements], dtype=torch.bool)
    words = pack(index, negative)
    assert words.dtype == torch.int32
    back_index, back_negative = unpack(words)
    assert torch.equal(back_index, index) and torch.equal(back_negative, negative)
    # The layout itself: bit 31 is the sign, bits 0-30 the index, read as a two's complement int32.
    expected = [((i | (int(n) << 31)) ^ 0x80000000) - 0x80000000 for i, n in elements]
    assert words.tolist() == expected


def test_a_bucket_over_the_31_bit_limit_is_refused_without_allocating_it():
    too_big = torch.empty(MAX_BUCKET_NUMEL + 1, device="meta")  # no storage behind a meta tensor
    with pytest.raises(ValueError, match="31 index bits.*bucket_cap_mb"):
        encode(too_big, too_big, 0.1)


@given(st.integers(1, 64))
@settings(max_examples=20, deadline=None)
def test_the_limit_is_inclusive_exactly_at_max_bucket_numel(limit):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gtc_codec, "MAX_BUCKET_NUMEL", limit)  # encode reads the limit where it lives
        words = encode(torch.zeros(limit), torch.ones(limit), 0.5)  # at the limit: fine, all sent
        assert sorted(unpack(words)[0].tolist()) == list(range(limit))
        with pytest.raises(ValueError, match="lower `bucket_cap_mb`"):
            encode(torch.zeros(limit + 1), torch.ones(limit + 1), 0.5)


# ---------------------------------------------------------------------------------------------
# GTC codec
# ---------------------------------------------------------------------------------------------
@SETTINGS
@given(gradient_sequences(), taus)
def test_residual_mass_is_conserved_sent_plus_residual_is_the_gradient_sum(grads, tau):
    steps, numel = grads.shape
    residual = torch.zeros(numel)
    sent = torch.zeros(numel, dtype=torch.float64)
    for g in grads:
        sent += decode(encode(residual, g.clone(), tau), None, numel, tau).double()
    total = grads.double().sum(0)
    # Each step rounds twice (r + g, r - q) on values bounded by the running sums.
    bound = 2 * steps * EPS32 * (grads.abs().double().sum(0) + steps * tau32(tau)) + 1e-12
    assert bool(((sent + residual.double() - total).abs() <= bound).all())


@SETTINGS
@given(gradient_sequences(), taus)
def test_exactly_the_elements_at_or_above_tau_are_sent_with_their_sign(grads, tau):
    numel = grads.shape[1]
    residual = torch.zeros(numel)
    for g in grads:
        before = residual + g  # step 1 as encode computes it, in fp32
        words = encode(residual, g.clone(), tau)
        index, negative = unpack(words)
        assert index.unique().numel() == index.numel() <= numel
        assert 0.0 <= words.numel() / numel <= 1.0  # density
        expected = sent_vector(before, tau)
        assert torch.equal(decode(words, None, numel, tau), expected)  # decode(encode) is the sent vector
        assert torch.equal(index.sort().values, torch.nonzero(expected).view(-1))
        assert bool((before[index].abs() >= tau32(tau)).all())  # |r| < τ is never sent
        assert torch.equal(negative, before[index] < 0)


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 30), taus, st.data())
def test_decode_of_padded_messages_is_the_mean_of_the_workers_sent_vectors(workers, numel, tau, data):
    messages, dense = [], []
    for _ in range(workers):
        g = torch.tensor(data.draw(st.lists(finite32, min_size=numel, max_size=numel)), dtype=torch.float32)
        dense.append(sent_vector(g, tau))
        messages.append(encode(torch.zeros(numel), g, tau))
    lengths = torch.tensor([m.numel() for m in messages])
    padded = torch.zeros(workers, int(lengths.max()), dtype=torch.int32)
    for w, m in enumerate(messages):
        padded[w, : m.numel()] = m
        padded[w, m.numel():] = 7  # garbage in the padding must be ignored
    from_padded = decode(padded, lengths, numel, tau)
    assert torch.equal(from_padded, decode(messages, None, numel, tau))  # the two input forms agree exactly
    mean = torch.stack(dense).double().mean(0)
    assert torch.allclose(from_padded.double(), mean, rtol=0, atol=4 * workers * EPS32 * tau32(tau))


@SETTINGS
@given(st.integers(1, 30), st.sampled_from([math.nan, math.inf, -math.inf]), st.data())
def test_any_non_finite_residual_is_refused(numel, bad, data):
    g = torch.tensor(data.draw(st.lists(finite32, min_size=numel, max_size=numel)), dtype=torch.float32)
    g[data.draw(st.integers(0, numel - 1))] = bad
    with pytest.raises(NonFiniteGradientError):
        encode(torch.zeros(numel), g, 0.5)


# ---------------------------------------------------------------------------------------------
# BMUF's block-momentum filter
# ---------------------------------------------------------------------------------------------
vectors = st.integers(1, 12).flatmap(lambda n: st.lists(st.lists(finite32, min_size=n, max_size=n),
                                                        min_size=2, max_size=6))
etas = st.floats(0.0, 0.95, allow_nan=False)
zetas = st.floats(0.1, 2.0, allow_nan=False)


def as_tensors(rows: list[list[float]]) -> list[torch.Tensor]:
    return [torch.tensor(r, dtype=torch.float32) for r in rows]


@SETTINGS
@given(vectors, st.booleans(), st.sampled_from(["paper", "cntk"]))
def test_without_momentum_and_unit_block_lr_the_next_start_is_the_mean(rows, nesterov, form):
    start, *means = as_tensors(rows)
    f = BlockMomentumFilter(start, block_momentum=0.0, block_lr=1.0, nesterov=nesterov, nesterov_form=form)
    for mean in means:
        previous = f.start.clone()
        out = f.update(mean)
        # S + (W̄ - S): two roundings on values bounded by |S| + |W̄|
        assert torch.allclose(out, mean, rtol=0, atol=float(2 * EPS32 * (previous.abs() + mean.abs()).max()))


@SETTINGS
@given(vectors, etas, zetas)
def test_classical_block_momentum_is_the_same_in_the_paper_and_cntk_forms(rows, eta, zeta):
    start, *means = as_tensors(rows)
    paper = BlockMomentumFilter(start, block_momentum=eta, block_lr=zeta, nesterov=False, nesterov_form="paper")
    cntk = BlockMomentumFilter(start, block_momentum=eta, block_lr=zeta, nesterov=False, nesterov_form="cntk")
    for mean in means:
        assert torch.equal(paper.update(mean), cntk.update(mean))
        assert torch.equal(paper.global_model, cntk.global_model) and torch.equal(paper.delta, cntk.delta)


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 20), etas, zetas, st.booleans(), st.data())
def test_constant_block_gradient_follows_the_closed_form(numel, blocks, eta, zeta, nesterov, data):
    """G(t) = G for every block: Δ_k = ζ G (1 - η^k) / (1 - η) and W_g(k) = W_g(0) + Σ_j Δ_j (paper form)."""
    G = torch.tensor(data.draw(st.lists(finite32, min_size=numel, max_size=numel)), dtype=torch.float32)
    start = torch.tensor(data.draw(st.lists(finite32, min_size=numel, max_size=numel)), dtype=torch.float32)
    f = BlockMomentumFilter(start, block_momentum=eta, block_lr=zeta, nesterov=nesterov, nesterov_form="paper")
    moved = torch.zeros(numel, dtype=torch.float64)
    G64 = G.double()
    for k in range(1, blocks + 1):
        f.update(f.start + G)  # the workers' mean is the start plus G
        delta_k = zeta * G64 * (1 - eta**k) / (1 - eta)
        moved += delta_k
        scale = float(zeta * G64.abs().max() / (1 - eta)) * k + float(start.abs().max())
        tol = 8 * k * EPS32 * scale + 1e-12
        assert torch.allclose(f.delta.double(), delta_k, rtol=0, atol=tol)
        assert torch.allclose((f.global_model.double() - start.double()), moved, rtol=0, atol=tol * k)
        expected_start = f.global_model + eta * f.delta if nesterov else f.global_model
        assert torch.allclose(f.start, expected_start, rtol=0, atol=4 * EPS32 * scale)


@SETTINGS
@given(vectors, st.floats(0.01, 0.95), zetas)  # torch's Nesterov SGD needs a momentum > 0
def test_paper_nesterov_form_is_outer_sgd_with_nesterov_momentum_on_the_pseudo_gradient(rows, eta, zeta):
    start, *means = as_tensors(rows)
    f = BlockMomentumFilter(start, block_momentum=eta, block_lr=zeta, nesterov=True, nesterov_form="paper")
    sgd = OuterOptimizerFilter(start, "sgd", {"lr": zeta, "momentum": eta, "nesterov": True})
    scale = float(torch.stack([start, *means]).abs().max()) * (1 + 2 * zeta / (1 - eta)) + 1e-6
    for t, mean in enumerate(means, 1):
        assert torch.allclose(f.update(mean), sgd.update(mean), rtol=0, atol=16 * t * EPS32 * scale)


# ---------------------------------------------------------------------------------------------
# Accounting (conventions of asrbench/strategies/accounting.py)
# ---------------------------------------------------------------------------------------------
sizes = st.integers(0, 10**9)
worlds = st.integers(1, 256)


@SETTINGS
@given(sizes, worlds)
def test_collective_bytes_are_non_negative_and_follow_the_ring_formulas(nbytes, world):
    sent, received, payload = all_reduce_bytes(nbytes, world)
    assert sent == received and 0 <= sent <= 2 * nbytes and payload == nbytes
    assert sent == 2 * (world - 1) / world * nbytes
    sent, received, payload = all_gather_bytes(nbytes, world)
    assert sent == received == (world - 1) * nbytes >= 0 and payload == nbytes


@SETTINGS
@given(sizes, worlds, st.data())
def test_a_broadcast_moves_the_tensor_once_per_link_and_has_one_source(nbytes, world, data):
    src = data.draw(st.integers(0, world - 1))
    per_rank = [broadcast_bytes(nbytes, world, rank, src) for rank in range(world)]
    assert all(s >= 0 and r >= 0 and p >= 0 for s, r, p in per_rank)
    assert sum(s for s, _, _ in per_rank) == sum(r for _, r, _ in per_rank) == (world - 1) * nbytes
    assert [p for _, _, p in per_rank] == [float(nbytes) if rank == src else 0.0 for rank in range(world)]


@SETTINGS
@given(st.integers(1, 10**7), st.integers(2, 256), st.data())
def test_gtc_step_bytes_beat_dense_exactly_when_the_message_is_small_enough(numel, world, data):
    """A GTC step as the hook records it (8-byte header and L_max 4-byte words gathered, a dense
    equivalent of 4 n bytes): wire bytes are at most sync SGD's iff 4 L_max + 8 <= 8 n / N, and the
    payload at most the gradient's iff 4 L_max + 8 <= 4 n, so density < 1/2 always compresses the
    payload (n >= 4) but not the wire: for N = 4 the header costs two words' worth."""
    lmax = data.draw(st.integers(0, numel))
    assume((4 * lmax + 8) * world != 8 * numel)  # an exact tie: the float 2 (N-1)/N may round either way
    stats = CommStats(world_size=world)
    stats.record_all_gather(torch.zeros(2, dtype=torch.int32))
    if lmax:
        stats.record_all_gather(4 * lmax)
    stats.record_dense(4 * numel)
    stats.record_elements(lmax, numel)
    stats.step()
    s = stats.per_step()
    assert all(v >= 0 for v in s.values())
    assert 0.0 <= s["density"] <= 1.0
    wire_gtc = (world - 1) * (8 + 4 * lmax)
    assert s["bytes_sent_per_worker_per_step"] == wire_gtc
    assert (s["dense_bytes_per_worker_per_step"] >= s["bytes_sent_per_worker_per_step"]) == \
        (4 * lmax + 8 <= 8 * numel / world)
    assert (s["payload_compression_ratio"] >= 1.0) == (4 * lmax + 8 <= 4 * numel)
    if numel >= 4 and lmax < numel / 2:
        assert s["payload_compression_ratio"] > 1.0


@SETTINGS
@given(st.lists(st.tuples(sizes, sizes, st.integers(0, 1000)), min_size=1, max_size=8), worlds)
def test_step_means_are_sums_over_steps_and_survive_a_checkpoint(steps, world):
    stats = CommStats(world_size=world)
    for reduced, gathered, elements in steps:
        stats.record_all_reduce(reduced)
        stats.record_all_gather(gathered)
        stats.record_dense(reduced)
        stats.record_elements(elements, 1000)
        stats.step()
    s = stats.per_step()
    n = len(steps)
    # the ring formulas written out: an all-reduce sends 2 (N-1)/N of its bytes, an all-gather (N-1) times them
    expected_sent = sum(2 * (world - 1) / world * r + (world - 1) * g for r, g, _ in steps) / n
    assert math.isclose(s["bytes_sent_per_worker_per_step"], expected_sent, rel_tol=1e-12, abs_tol=1e-9)
    assert s["steps"] == n and 0.0 <= s["density"] <= 1.0
    assert math.isclose(s["density"], sum(e for _, _, e in steps) / (1000 * n))  # elements sent of those held
    restored = CommStats(world_size=world)
    restored.load_state_dict(stats.state_dict())
    assert restored.per_step() == s


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       special=st.sampled_from([None, "nan", "inf", "-inf", "zero"]))
def test_one_pass_kernel_equals_the_eager_encoder(n: int, density: float, seed: int, special: str | None) -> None:
    from asrbench.strategies import gtc_kernel

    if gtc_kernel.load() is None:
        pytest.skip("the GTC CPU kernel cannot be built here (no compiler or ninja)")
    gen = torch.Generator().manual_seed(seed)
    grad = torch.rand(n, generator=gen).mul_(2).sub_(1)
    residual = torch.rand(n, generator=gen).sub_(0.5)
    if special == "zero":
        grad[0] = 0.0
        residual[0] = -0.0
    elif special:
        grad[int(torch.randint(0, n, (1,), generator=gen))] = float(special)
    tau = max(1.0 - density, 1e-6)
    r_eager, r_kernel = residual.clone(), residual.clone()
    try:
        eager = encode(r_eager, grad, tau, kernel=False)
    except NonFiniteGradientError:
        with pytest.raises(NonFiniteGradientError):
            encode(r_kernel, grad, tau)
        return
    fast = encode(r_kernel, grad, tau)
    assert torch.equal(fast, eager)  # same words in the same (ascending) order
    assert torch.equal(r_kernel, r_eager)  # bit-identical residuals
