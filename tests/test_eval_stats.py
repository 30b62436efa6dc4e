"""Tests for abscot_jax.eval.stats against hand-computed values and independent computations."""

import itertools
import math

import numpy as np
import pytest

from abscot_jax.eval.stats import bootstrap_ci, distinct_count, length_histogram, pass_at_1, token_entropy


def test_bootstrap_constant_scores():
    assert bootstrap_ci([1, 1, 1, 1]) == (1.0, 1.0, 1.0)
    assert bootstrap_ci(np.zeros((5, 3))) == (0.0, 0.0, 0.0)


def test_bootstrap_matches_exact_enumeration():
    # [0, 1, 3]: all 27 resamples are equally likely; the exact CDF of their mean is
    # 0:1/27, 1/3:4/27, ..., 2:23/27, 7/3:26/27, 3:1. The 10% and 90% quantiles fall
    # inside the steps at 1/3 and 7/3; the 2.5% and 97.5% ones inside those at 0 and 3.
    values = [0, 1, 3]
    means = sorted(sum(c) / 3 for c in itertools.product(values, repeat=3))
    assert len(means) == 27
    mean, low, high = bootstrap_ci(values, confidence=0.8, n_resamples=20000)
    assert mean == pytest.approx(4 / 3)
    assert (low, high) == (pytest.approx(1 / 3), pytest.approx(7 / 3))
    assert (low, high) == (pytest.approx(means[2]), pytest.approx(means[24]))  # ranks 10%, 90%
    _, low, high = bootstrap_ci(values, confidence=0.95, n_resamples=20000)
    assert (low, high) == (0.0, 3.0)


def test_bootstrap_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    values = (rng.random(120) < 0.4).astype(float)
    mean, low, high = bootstrap_ci(values, n_resamples=20000, seed=3)
    ref = scipy_stats.bootstrap(
        (values,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95, random_state=4
    ).confidence_interval
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(ref.low, abs=0.01)
    assert high == pytest.approx(ref.high, abs=0.01)


def test_bootstrap_2d_resamples_problems_not_samples():
    # Perfectly correlated samples: each problem is solved by all 4 samples or by none.
    # Resampling rows must give the CI of 50 problems, not of 200 independent samples.
    rng = np.random.default_rng(0)
    rows = (rng.random(50) < 0.5).astype(float)
    scores = np.repeat(rows[:, None], 4, axis=1)
    m2, lo2, hi2 = bootstrap_ci(scores, seed=5)
    m1, lo1, hi1 = bootstrap_ci(rows, seed=5)
    assert (m2, lo2, hi2) == (m1, lo1, hi1)
    _, lo_flat, hi_flat = bootstrap_ci(scores.reshape(-1), seed=5)
    assert (hi2 - lo2) > 1.6 * (hi_flat - lo_flat)  # about 2x = sqrt(4) wider


def test_bootstrap_2d_statistic_is_mean_over_entries():
    scores = np.array([[1, 0, 0], [1, 1, 1], [0, 0, 1], [1, 1, 0]])
    mean, low, high = bootstrap_ci(scores)
    assert mean == pytest.approx(7 / 12)
    assert low <= mean <= high


def test_bootstrap_seed_reproducible():
    values = np.random.default_rng(0).random(30)  # continuous, so quantiles differ by seed
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def test_bootstrap_coverage_near_nominal():
    # Bernoulli(p) scores on 200 problems, 300 independent draws: the 95% interval should
    # contain p about 95% of the time (sd of the estimate ~1.3 points).
    p, n, trials = 0.3, 200, 300
    rng = np.random.default_rng(123)
    hits = 0
    for t in range(trials):
        values = (rng.random(n) < p).astype(float)
        _, low, high = bootstrap_ci(values, n_resamples=1000, seed=t)
        hits += low <= p <= high
    assert 0.91 <= hits / trials <= 0.98


@pytest.mark.parametrize("bad", [[], np.zeros((0, 3)), np.zeros((2, 2, 2)), [0.0, float("nan")]])
def test_bootstrap_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        bootstrap_ci(bad)


def test_bootstrap_rejects_bad_confidence():
    with pytest.raises(ValueError):
        bootstrap_ci([0, 1], confidence=1.0)


def test_pass_at_1_hand_computed():
    scores = np.array([[1, 0], [1, 1], [0, 0], [1, 0]])
    mean, sd = pass_at_1(scores)
    # column accuracies 3/4 and 1/4: mean 1/2, sample sd sqrt(2 * 0.25^2 / 1)
    assert mean == pytest.approx(0.5)
    assert sd == pytest.approx(math.sqrt(0.125))


def test_pass_at_1_three_columns():
    scores = np.array([[1, 1, 0], [0, 1, 0], [1, 1, 1], [0, 1, 0], [0, 1, 0]])
    mean, sd = pass_at_1(scores)
    # column accuracies 0.4, 1.0, 0.2 -> mean 8/15, sd via ddof=1
    assert mean == pytest.approx(8 / 15)
    assert sd == pytest.approx(np.std([0.4, 1.0, 0.2], ddof=1))


def test_pass_at_1_single_column_has_undefined_sd():
    mean, sd = pass_at_1([1, 0, 1, 1])
    assert mean == pytest.approx(0.75)
    assert math.isnan(sd)


def test_token_entropy_hand_computed():
    assert token_entropy([[0, 1], [1, 0]], vocab_size=4) == pytest.approx(math.log(2))
    assert token_entropy([[3, 3, 3]], vocab_size=4) == 0.0
    # uniform over the 64 abstract tokens: ln 64 = 4.1589 nats (the toy run's ceiling)
    assert token_entropy([list(range(64))], vocab_size=64) == pytest.approx(math.log(64))
    # pooled counts {0: 2, 1: 1, 2: 1}: -(1/2 ln 1/2 + 2 * 1/4 ln 1/4) = 1.5 ln 2
    assert token_entropy([[0], [0, 1], [2], []], vocab_size=3) == pytest.approx(1.5 * math.log(2))


def test_token_entropy_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    traces = [rng.integers(0, 10, size=rng.integers(0, 30)).tolist() for _ in range(40)]
    counts = np.bincount(np.concatenate([np.asarray(t, dtype=int) for t in traces]), minlength=10)
    assert token_entropy(traces, vocab_size=10) == pytest.approx(scipy_stats.entropy(counts))


def test_token_entropy_edge_cases():
    assert math.isnan(token_entropy([], vocab_size=4))
    assert math.isnan(token_entropy([[], []], vocab_size=4))
    with pytest.raises(ValueError):
        token_entropy([[0, 4]], vocab_size=4)
    with pytest.raises(ValueError):
        token_entropy([[-1]], vocab_size=4)


def test_distinct_count():
    assert distinct_count([[1, 2], [1, 2], [2, 1], [], []]) == 3
    assert distinct_count([np.array([5, 6]), [5, 6], (5, 6)]) == 1
    assert distinct_count([]) == 0


def test_length_histogram_edges():
    h = length_histogram([1, 2, 2, 3, 10], bins=[0, 2, 4, 11])
    assert h == {"edges": [0.0, 2.0, 4.0, 11.0], "counts": [1, 3, 1], "n": 5}


def test_length_histogram_equal_width():
    h = length_histogram([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], bins=5)
    assert h["edges"] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert h["counts"] == [2, 2, 2, 2, 2]  # the last bin [8, 10] is closed
    assert h["n"] == 10


def test_length_histogram_out_of_range_not_binned():
    h = length_histogram([1, 5, 100], bins=[0, 10])
    assert h["counts"] == [2]
    assert h["n"] == 3
