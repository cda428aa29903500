"""Statistics that decide an accuracy claim: paired differences over seeds with test-set noise,
Holm's correction over the claims tested, the minimum detectable effect, and plateau checks.

The design these functions serve (asrbench reproduce): every seed has one warm start from which
its baseline and every distributed run continue, and every run is scored on the same test
utterances. A comparison of two cells (or of a cell with the baseline) is therefore paired twice:

* by seed: d_s = effect of seed s, computed from runs that share seed s's warm start;
* by utterance: the test-set noise of the mean difference is the spread of d̄ when the test
  utterances are resampled with replacement, the same resample for every run (a paired bootstrap,
  Bisani & Ney, ICASSP 2004).

The standard error combines both, se² = s_d² / n + se_boot², and its degrees of freedom follow
Welch-Satterthwaite with the bootstrap term taken as exact (df = (n - 1) (se² / (s_d² / n))²).
Seed-to-seed spread already holds the model x utterance part of the test noise, so adding the
bootstrap term is conservative. Distributions come from scipy; Holm's step-down correction and the
power calculation from statsmodels.

Symbols: n seeds, d_s the per-seed paired difference (points of relative error), alpha the
family-wise error rate, MDE the smallest true difference found with 80% power at level alpha.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Scores:
    """Per-utterance error counts of one run on one split, in one fixed utterance order.

    `errors[m]` and `counts[m]` are arrays over utterances for metric m (``wer``: word edits and
    reference words; ``cer``: character edits and reference characters; ``fer``: wrong and scored
    frames). The corpus rate of m is sum(errors) / sum(counts), as jiwer computes it.
    """

    ids: tuple[str, ...]
    errors: Mapping[str, np.ndarray]
    counts: Mapping[str, np.ndarray]

    def rate(self, metric: str, index: np.ndarray | None = None) -> np.ndarray | float:
        """The corpus rate of `metric`; with `index` (B x U utterance indices), one rate per row."""
        e, c = self.errors[metric], self.counts[metric]
        if index is None:
            return float(e.sum() / c.sum()) if c.sum() else math.nan
        return e[index].sum(axis=1) / np.maximum(c[index].sum(axis=1), 1)

    @classmethod
    def from_table(cls, table: Mapping[str, Sequence[float]]) -> Scores:
        """From the dict a run writes (``ids`` and ``<metric>_errors`` / ``<metric>_counts`` lists)."""
        ids = tuple(table["ids"])
        metrics = [k[:-len("_errors")] for k in table if k.endswith("_errors") and f"{k[:-7]}_counts" in table]
        order = np.argsort(np.array(ids, dtype=object))
        return cls(tuple(ids[i] for i in order),
                   {m: np.asarray(table[f"{m}_errors"], dtype=float)[order] for m in metrics},
                   {m: np.asarray(table[f"{m}_counts"], dtype=float)[order] for m in metrics})


def bootstrap_indices(n_utterances: int, resamples: int = 1000, seed: int = 0,
                      strata: Sequence[str] | None = None) -> np.ndarray:
    """`resamples` x `n_utterances` indices drawn with replacement: one paired resample per row
    (Bisani & Ney, ICASSP 2004), the same rows for every run compared.

    With `strata` (one group label per utterance, e.g. its speaker: :func:`speakers`), a stratified
    bootstrap: every row draws, within each stratum, as many utterances as the stratum holds, with
    replacement; column j draws from utterance j's stratum. Why: the speaker is the main source of
    correlation between a test set's utterances (one hard voice errs on all its sentences), and with
    few speakers (6 in test_seen) an utterance resample also resamples how much each speaker weighs,
    a variation no rerun on this test set shows. A per-speaker resample keeps each speaker's weight
    and measures the noise of the utterances within the speakers tested: it reads "on these
    speakers" and is usually narrower; it does not estimate how a new set of speakers would read,
    which needs more speakers than a resample of 6 can stand in for. Without `strata`, the
    indices are the plain utterance resample's, unchanged for a given seed."""
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n_utterances, size=(resamples, n_utterances))
    if len(strata) != n_utterances:
        raise ValueError(f"Arg `strata` must hold one label per utterance: {len(strata)} labels, "
                         f"{n_utterances} utterances")
    _, group = np.unique(np.asarray(strata, dtype=object), return_inverse=True)
    members = np.argsort(group, kind="stable")           # utterances grouped by stratum, in order
    sizes = np.bincount(group)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    within = rng.integers(0, sizes[group], size=(resamples, n_utterances))  # column j: 0 <= k < |stratum of j|
    return members[starts[group] + within]


def speakers(ids: Sequence[str]) -> list[str]:
    """The speaker of each utterance id: its first `-` field (LibriSpeech's `<speaker>-<chapter>-<n>`)."""
    return [u.split("-", 1)[0] for u in ids]


@dataclass(frozen=True)
class Paired:
    """A paired difference over seeds: its mean, standard errors, CI and p-values."""

    n: int                    # seeds
    mean: float               # d̄
    sd_seeds: float           # s_d, the sample sd of d_s over seeds
    se_boot: float            # test-set noise of d̄ (paired bootstrap over utterances)
    se: float                 # sqrt(s_d² / n + se_boot²)
    df: float                 # Welch-Satterthwaite degrees of freedom
    low: float                # 95% CI
    high: float
    p: float                  # two-sided p of H0: difference = 0
    p_ref: float              # two-sided p of H0: difference = `reference` (nan when none)
    mde: float                # smallest |difference| detected with 80% power at ALPHA
    per_seed: tuple[float, ...]

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"per_seed": list(self.per_seed)}


def paired(per_seed: Sequence[float], boot_means: np.ndarray | None = None, reference: float | None = None,
           alpha: float = ALPHA, power: float = POWER) -> Paired:
    """Mean, CI, p-values and MDE of per-seed differences `per_seed` (one value per seed).

    `boot_means` holds d̄ recomputed on each bootstrap resample of the test utterances; its sd is
    the test-set noise. `reference` is a second null value (e.g. the paper's margin) for `p_ref`.
    """
    d = np.asarray(per_seed, dtype=float)
    n = len(d)
    if n == 0:
        raise ValueError("Arg `per_seed` must hold at least one seed's difference")
    mean = float(d.mean())
    var_seeds = float(d.var(ddof=1)) / n if n > 1 else math.nan
    se_boot = float(np.std(boot_means, ddof=1)) if boot_means is not None and len(boot_means) > 1 else 0.0
    if math.isnan(var_seeds):
        se, df = se_boot, math.inf
    else:
        se = math.sqrt(var_seeds + se_boot ** 2)
        df = (n - 1) * (se ** 2 / var_seeds) ** 2 if var_seeds > 0 else math.inf
    if not se > 0:
        nan = math.nan
        return Paired(n, mean, math.sqrt(var_seeds * n) if n > 1 else nan, se_boot, se, df, nan, nan, nan, nan, nan,
                      tuple(d))
    dist = sps.t(df) if math.isfinite(df) else sps.norm()
    half = float(dist.ppf(1 - alpha / 2)) * se
    p = float(2 * dist.sf(abs(mean) / se))
    p_ref = float(2 * dist.sf(abs(mean - reference) / se)) if reference is not None else math.nan
    return Paired(n, mean, math.sqrt(var_seeds * n) if n > 1 else math.nan, se_boot, se, df, mean - half,
                  mean + half, p, p_ref, mde(se, n, df, alpha, power), tuple(d))


def mde(se: float, n: int, df: float | None = None, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true difference a two-sided test at `alpha` finds with `power`, given the
    standard error `se` of the mean of `n` paired differences (statsmodels' t-test power; the
    effect size it solves for is in units of se sqrt(n))."""
    if not se > 0 or n < 2:
        return math.nan
    nobs = n if df is None or not math.isfinite(df) else df + 1
    if nobs > 1e4:
        return float((sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) * se)
    d = TTestPower().solve_power(effect_size=None, nobs=nobs, alpha=alpha, power=power, alternative="two-sided")
    return float(np.asarray(d, dtype=float).ravel()[0]) * se * math.sqrt(nobs)


def mde_floor(se_boot: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The MDE with infinitely many seeds on the same test set: (z_(1-alpha/2) + z_power) se_boot."""
    return float((sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) * se_boot)


def seeds_for(target: float, sd_seeds: float, se_boot: float, alpha: float = ALPHA, power: float = POWER,
              max_n: int = 100) -> float:
    """The fewest seeds at which a paired comparison's MDE (:func:`mde`, at `alpha`) reaches `target`,
    if its seed-to-seed spread `sd_seeds` and the test set's noise `se_boot` stay as measured (the same
    test set): a projection for planning the next experiment, not a measurement.

    Returns ``math.inf`` when `max_n` seeds do not reach it, at once when the test set's noise alone
    keeps the MDE above `target` (at infinitely many seeds the MDE is (z_(1-alpha/2) + z_power) se_boot:
    a larger test set is the lever then), and NaN when a spread is unknown (one seed)."""
    if any(math.isnan(v) for v in (target, sd_seeds, se_boot)):
        return math.nan
    if mde_floor(se_boot, alpha, power) >= target:
        return math.inf

    def mde_at(n: int) -> float:
        var = sd_seeds ** 2 / n
        se = math.sqrt(var + se_boot ** 2)
        return mde(se, n, (n - 1) * (se ** 2 / var) ** 2 if var > 0 else math.inf, alpha, power)

    if mde_at(max_n) > target:
        return math.inf
    lo, hi = 2, max_n  # the MDE falls with n: the first n at which it is <= target
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if mde_at(mid) <= target else (mid + 1, hi)
    return lo


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> list[float]:
    """Holm's step-down adjusted p-values (statsmodels); NaN entries are left out and stay NaN."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=alpha, method="holm")[1]
    return out.tolist()


AGREES, DISAGREES, EXCLUDES, INCONCLUSIVE = "agrees", "disagrees", "excludes the paper's effect", "inconclusive"


def verdict(mean: float, p_adj: float, p_ref_adj: float = math.nan, alpha: float = ALPHA) -> str:
    """A claim's verdict from its difference (positive = the paper's order) and Holm-adjusted p-values.

    agrees / disagrees: the difference is non-zero after correction, in / against the paper's
    order; excludes the paper's effect: not decided against 0, but the paper's margin is rejected
    after correction; inconclusive: neither. An agreeing or disagreeing claim whose paper margin is
    also rejected says so ("agrees; smaller than the paper's")."""
    if math.isnan(mean) or math.isnan(p_adj):
        return "not measured"
    ref_rejected = not math.isnan(p_ref_adj) and p_ref_adj < alpha
    if p_adj < alpha:
        word = AGREES if mean > 0 else DISAGREES
        return f"{word}; excludes the paper's effect" if ref_rejected and word == AGREES else word
    return EXCLUDES if ref_rejected else INCONCLUSIVE


# ------------------------------------------------------------------------------------------------
# Plateaus
# ------------------------------------------------------------------------------------------------
def plateau(curve: Sequence[tuple[int, float]], points: int = 6, tolerance: float = 0.02,
            alpha: float = ALPHA) -> dict:
    """Has a dev curve stopped improving? A least-squares line through its last `points` points
    (scipy.stats.linregress) predicts a change over that window, relative to the window's mean,
    with a (1 - alpha) CI. The run ends on a plateau when the CI excludes a fall of `tolerance` or
    more (low >= -tolerance: it is shown not to be still falling; a rising curve is past its best,
    which counts). `trend` says which: flat (the CI within ±tolerance), rising (not flat, but not
    falling) or falling (the CI reaches below -tolerance: still improving, or too noisy to tell).
    A curve with fewer points is not judged."""
    pts = list(curve)[-points:]
    if points < 3:
        raise ValueError(f"Arg `points` must be at least 3, got {points}")
    if len(pts) < points:
        return {"plateau": False, "points": len(pts), "rel_change": math.nan, "low": math.nan, "high": math.nan,
                "trend": "too few points", "reason": f"{len(pts)} dev points, {points} needed"}
    x = np.array([p[0] for p in pts], dtype=float)
    y = np.array([p[1] for p in pts], dtype=float)
    fit = sps.linregress(x, y)
    span, level = float(x[-1] - x[0]), float(abs(y.mean()))
    t = float(sps.t(len(pts) - 2).ppf(1 - alpha / 2))
    change = fit.slope * span / level
    half = t * fit.stderr * span / level
    low, high = change - half, change + half
    ok = bool(low >= -tolerance)
    trend = "falling" if not ok else "flat" if high <= tolerance else "rising"
    return {"plateau": ok, "points": len(pts), "from_step": int(x[0]), "to_step": int(x[-1]),
            "rel_change": float(change), "low": float(low), "high": float(high), "tolerance": tolerance,
            "trend": trend}


# ------------------------------------------------------------------------------------------------
# Effects from per-utterance scores
# ------------------------------------------------------------------------------------------------
RunScores = Mapping[int, Scores]  # seed -> one run's scores on the scored split


def relative(cell: Scores, base: Scores, metric: str, index: np.ndarray | None = None):
    """(rate(cell) - rate(base)) / rate(base): the paper's relative error change (per resample with `index`)."""
    b = base.rate(metric, index)
    return (cell.rate(metric, index) - b) / b


def effect(lower: Sequence[RunScores | None], higher: Sequence[RunScores | None], baseline: RunScores, metric: str,
           index: np.ndarray, reference: float | None = None,
           combine: Callable[[np.ndarray], np.ndarray] | None = None,
           controls: tuple[Sequence[RunScores | None], Sequence[RunScores | None]] | None = None) -> Paired:
    """Paired difference, in relative error, of `higher` minus `lower` (positive: `lower` is better).

    Each side is a list of cells (seed -> Scores); None stands for the baseline itself (relative
    change 0). With several cells on a side, `combine` reduces them per seed and resample (the
    higher side takes the best, np.min over cells, by default). `controls` (one list per side,
    aligned with its cells) reads every cell against a control instead of against the baseline
    alone: rel(cell) - rel(control) per seed and resample (None: no control), e.g. each strategy
    against sync SGD at its own worker count. Seeds are those every cell and control has.
    """
    ctrl_lower, ctrl_higher = controls or ([None] * len(lower), [None] * len(higher))
    if len(ctrl_lower) != len(lower) or len(ctrl_higher) != len(higher):
        raise ValueError("Arg `controls` must hold one entry per cell of each side")
    cells = [c for c in (*lower, *higher, *ctrl_lower, *ctrl_higher) if c is not None]
    seeds = sorted(set(baseline).intersection(*[set(c) for c in cells]))
    if not seeds:
        raise ValueError("no seed has every cell of this comparison")
    combine = combine or (lambda a: a.min(axis=0))

    def rel(c: RunScores | None, s: int, idx: np.ndarray | None):
        if c is None:
            return np.zeros(len(idx)) if idx is not None else 0.0
        return relative(c[s], baseline[s], metric, idx)

    def side(group: Sequence[RunScores | None], ctrl: Sequence[RunScores | None], s: int, idx: np.ndarray | None):
        vals = [rel(c, s, idx) - rel(k, s, idx) for c, k in zip(group, ctrl)]
        return combine(np.asarray(vals, dtype=float))

    per_seed = [float(side(higher, ctrl_higher, s, None) - side(lower, ctrl_lower, s, None)) for s in seeds]
    boot = np.mean([side(higher, ctrl_higher, s, index) - side(lower, ctrl_lower, s, index) for s in seeds], axis=0)
    return paired(per_seed, boot, reference)
