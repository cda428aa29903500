"""asrbench.stats on hand cases with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from asrbench import stats


def test_paired_without_test_noise_is_the_one_sample_t_test() -> None:
    d = [0.012, 0.020, 0.005, 0.018, 0.010]
    res = stats.paired(d)
    ref = sps.ttest_1samp(d, 0.0)
    assert res.mean == pytest.approx(np.mean(d))
    assert res.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.df == pytest.approx(4)
    half = sps.t.ppf(0.975, 4) * np.std(d, ddof=1) / math.sqrt(5)
    assert (res.low, res.high) == pytest.approx((np.mean(d) - half, np.mean(d) + half))


def test_bootstrap_noise_widens_the_interval_by_satterthwaite() -> None:
    d = [1.0, 2.0, 3.0]  # s_d^2 / n = 1 / 3
    boot = np.array([-1.0, 1.0] * 50)  # sd = sqrt(100 / 99)
    res = stats.paired(d, boot)
    var_seeds, var_boot = 1 / 3, 100 / 99
    assert res.se == pytest.approx(math.sqrt(var_seeds + var_boot))
    assert res.df == pytest.approx(2 * ((var_seeds + var_boot) / var_seeds) ** 2)
    assert res.high - res.mean == pytest.approx(sps.t.ppf(0.975, res.df) * res.se)


def test_reference_p_value_tests_the_papers_margin() -> None:
    res = stats.paired([0.050, 0.052, 0.048, 0.051], reference=0.05)
    assert res.p < 1e-4 and res.p_ref > 0.5
    assert stats.paired([0.0, 0.001, -0.001], reference=0.05).p_ref < 0.01


def test_mde_matches_the_normal_approximation_for_many_seeds() -> None:
    se = 0.01
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert stats.mde(se, 10_000) == pytest.approx(z * se, rel=2e-3)
    # with 5 seeds the t distribution's tails make it larger: (t_.975,4 + t_.8,4) se is close
    assert stats.mde(se, 5) == pytest.approx((sps.t.ppf(0.975, 4) + sps.t.ppf(0.8, 4)) * se, rel=0.1)
    assert stats.mde(se, 5) > z * se


def test_seeds_for_an_mde_on_known_cases() -> None:
    # no test-set noise: a one-sample t test needs n = 10 for d = 1 at alpha 0.05, power 0.8 (Cohen's
    # tables; G*Power gives power 0.803 at n = 10 and 0.764 at n = 9)
    assert stats.seeds_for(0.01, sd_seeds=0.01, se_boot=0.0) == 10
    # the answer is the first n whose MDE reaches the target, found from the same function
    n = stats.seeds_for(0.02, sd_seeds=0.022, se_boot=0.0066)
    var = lambda k: 0.022 ** 2 / k  # noqa: E731
    at = lambda k: stats.mde(math.sqrt(var(k) + 0.0066 ** 2), k,  # noqa: E731
                             (k - 1) * ((var(k) + 0.0066 ** 2) / var(k)) ** 2)
    assert at(n) <= 0.02 < at(n - 1)
    # the test set's noise alone keeps the MDE above the target: no number of seeds reaches it
    floor = stats.mde_floor(0.0075)
    assert floor == pytest.approx((sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * 0.0075)
    assert floor > 0.02 and stats.seeds_for(0.02, sd_seeds=0.0, se_boot=0.0075) == math.inf
    assert stats.seeds_for(0.02, sd_seeds=0.05, se_boot=0.0, max_n=20) == math.inf  # beyond max_n
    assert math.isnan(stats.seeds_for(0.02, sd_seeds=math.nan, se_boot=0.005))  # one seed: unknown


def test_holm_on_a_textbook_case() -> None:
    # p = .01, .04, .03, .005 -> sorted .005 .01 .03 .04, times 4 3 2 1 -> .02 .03 .06 .06 (monotone)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = stats.holm([0.01, math.nan])
    assert out[0] == pytest.approx(0.01) and math.isnan(out[1])


@pytest.mark.parametrize("mean,p,p_ref,word", [
    (0.02, 0.001, math.nan, stats.AGREES),
    (-0.02, 0.001, math.nan, stats.DISAGREES),
    (0.01, 0.3, 0.001, stats.EXCLUDES),
    (0.01, 0.3, 0.4, stats.INCONCLUSIVE),
    (0.01, 0.001, 0.001, "agrees; excludes the paper's effect"),
])
def test_each_verdict_on_a_constructed_case(mean, p, p_ref, word) -> None:
    assert stats.verdict(mean, p, p_ref) == word


def test_verdicts_from_constructed_seed_differences() -> None:
    agree = stats.paired([0.03, 0.031, 0.029, 0.032, 0.028], reference=0.03)
    assert stats.verdict(agree.mean, agree.p, agree.p_ref) == stats.AGREES
    against = stats.paired([-0.03, -0.031, -0.029, -0.032, -0.028], reference=0.05)
    assert stats.verdict(against.mean, against.p, against.p_ref) == stats.DISAGREES
    small = stats.paired([0.001, -0.002, 0.002, -0.001, 0.0], reference=0.05)
    assert stats.verdict(small.mean, small.p, small.p_ref) == stats.EXCLUDES
    noisy = stats.paired([0.05, -0.04, 0.06, -0.05, 0.01], reference=0.02)
    assert stats.verdict(noisy.mean, noisy.p, noisy.p_ref) == stats.INCONCLUSIVE


def test_plateau_on_synthetic_curves() -> None:
    steps = list(range(100, 1300, 100))
    flat = [(s, 1.0 + 0.002 * (-1) ** i) for i, s in enumerate(steps)]
    falling = [(s, 2.0 - 0.0005 * s) for s in steps]
    noisy = [(s, 1.0 + 0.2 * (-1) ** i) for i, s in enumerate(steps)]
    assert stats.plateau(flat)["plateau"]
    res = stats.plateau(falling)
    assert not res["plateau"] and res["high"] < 0
    # the change over the last 6 points (steps 700..1200) is -0.25 against a mean of 1.525
    assert res["rel_change"] == pytest.approx(-0.25 / 1.525)
    assert not stats.plateau(noisy)["plateau"]  # flat on average, but its CI is too wide to show it
    assert not stats.plateau(flat[:4])["plateau"] and stats.plateau(flat[:4])["points"] == 4
    rising = [(s, 1.0 + 0.0001 * s) for s in steps]  # past its best: not still improving, so converged
    assert stats.plateau(rising)["plateau"] and stats.plateau(rising)["trend"] == "rising"
    assert stats.plateau(flat)["trend"] == "flat" and stats.plateau(falling)["trend"] == "falling"


def _scores(errors: list[int], counts: list[int], ids=None) -> stats.Scores:
    ids = ids or [f"u{i}" for i in range(len(errors))]
    return stats.Scores.from_table({"ids": ids, "wer_errors": errors, "wer_counts": counts})


def test_scores_rate_and_bootstrap_rows() -> None:
    sc = _scores([1, 0, 3], [4, 5, 6])
    assert sc.rate("wer") == pytest.approx(4 / 15)
    idx = np.array([[0, 0, 0], [2, 1, 2]])
    assert sc.rate("wer", idx) == pytest.approx([3 / 12, 6 / 17])
    # ids are put in one order, so runs that decoded in different orders pair up
    swapped = _scores([3, 1, 0], [6, 4, 5], ids=["u2", "u0", "u1"])
    assert swapped.ids == sc.ids and np.array_equal(swapped.errors["wer"], sc.errors["wer"])


def test_effect_pairs_by_seed_against_the_baseline() -> None:
    base = {0: _scores([10, 10], [50, 50]), 1: _scores([12, 8], [50, 50])}      # WER .2 and .2
    cell = {0: _scores([11, 11], [50, 50]), 1: _scores([13, 9], [50, 50])}      # WER .22 and .22
    other = {0: _scores([12, 12], [50, 50]), 1: _scores([15, 9], [50, 50])}     # .24 and .24
    idx = stats.bootstrap_indices(2, 200, seed=1)
    vs_base = stats.effect([cell], [None], base, "wer", idx)       # baseline minus cell: -10% both seeds
    assert vs_base.per_seed == pytest.approx((-0.1, -0.1))
    pair = stats.effect([cell], [other], base, "wer", idx)         # other - cell = +10 points both seeds
    assert pair.per_seed == pytest.approx((0.1, 0.1)) and pair.mean == pytest.approx(0.1)
    best = stats.effect([cell], [other, None], base, "wer", idx)   # the better of the two is the baseline
    assert best.per_seed == pytest.approx((-0.1, -0.1))
    assert pair.se_boot > 0  # seed 1's utterances differ, so a resample moves the difference


@pytest.mark.parametrize("sd_seeds,sd_test", [(1.0, 0.0), (1.0, 0.5), (0.3, 1.0)])
def test_the_interval_covers_a_null_difference_95_percent_of_the_time(sd_seeds, sd_test):
    """Simulated experiments with no true difference: 5 seeds whose differences share one test-set
    draw (sd_test) and differ by seed (sd_seeds); the bootstrap sees the test-set spread. The 95% CI
    should contain 0 in about 95% of them (Welch-Satterthwaite is approximate: 93-97.5%)."""
    rng = np.random.default_rng(7)
    reps, covered = 1000, 0
    for _ in range(reps):
        d = rng.normal(0, sd_test) + rng.normal(0, sd_seeds, size=5)
        boot = rng.normal(0, sd_test, size=200) if sd_test else None
        res = stats.paired(d, boot)
        covered += res.low <= 0 <= res.high
    assert 0.93 <= covered / reps <= 0.975


def test_unstratified_bootstrap_indices_are_unchanged() -> None:
    # bitwise the draw the committed reports were computed with
    expect = np.random.default_rng(5).integers(0, 7, size=(40, 7))
    assert np.array_equal(stats.bootstrap_indices(7, 40, seed=5), expect)
    assert np.array_equal(stats.bootstrap_indices(7, 40, seed=5, strata=None), expect)


def test_stratified_bootstrap_keeps_each_strata_count() -> None:
    ids = ["300-1-0", "302-1-0", "300-1-1", "305-2-0", "302-1-1", "300-1-2", "305-2-1", "309-3-0"]
    spk = stats.speakers(ids)
    assert spk == ["300", "302", "300", "305", "302", "300", "305", "309"]
    idx = stats.bootstrap_indices(len(ids), 500, seed=3, strata=spk)
    assert idx.shape == (500, 8)
    labels = np.array(spk)
    for s in set(spk):  # every row holds each speaker as often as the test set does, in the same columns
        assert (labels[idx] == s).sum(axis=1).tolist() == [spk.count(s)] * 500
        assert (labels[idx][:, labels == s] == s).all()
    # within a stratum the draw is with replacement over all its utterances
    assert set(idx[:, 0].tolist()) == {0, 2, 5} and (idx[:, 7] == 7).all()
    assert any(len(set(row[labels == "300"])) < 3 for row in idx)
    # deterministic given the seed, and another seed draws other rows
    assert np.array_equal(idx, stats.bootstrap_indices(len(ids), 500, seed=3, strata=spk))
    assert not np.array_equal(idx, stats.bootstrap_indices(len(ids), 500, seed=4, strata=spk))
    with pytest.raises(ValueError, match="one label per utterance"):
        stats.bootstrap_indices(len(ids), 10, strata=spk[:-1])


def test_stratified_bootstrap_leaves_out_the_speaker_mix_noise() -> None:
    """Two speakers, one erring on every word and one on none: the utterance resample moves the WER
    with the mix of speakers it draws; the per-speaker resample keeps the mix, so the WER stays put."""
    sc = _scores([5] * 10 + [0] * 10, [5] * 20, ids=[f"{1 + i // 10}-0-{i:02d}" for i in range(20)])
    plain = sc.rate("wer", stats.bootstrap_indices(20, 300, seed=0))
    strat = sc.rate("wer", stats.bootstrap_indices(20, 300, seed=0, strata=stats.speakers(sc.ids)))
    assert np.std(plain) > 0.05 and np.allclose(strat, 0.5)
