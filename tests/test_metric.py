import copy
import json
import re

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from lookalike.errors import LookalikeError
from lookalike.metric import Cosine, HardNegativeMiner, L1, L2, LearnedWeightedL2, RandomDistance, WeightedL2Ranker, pair_features, standard_distances


def toy_pairs(seed=0, n=400, d=16, separation=2.0):
    """Unit vectors in 2 classes that differ in the first 4 dimensions only."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, d))
    x[:, :4] += np.where(labels[:, None] == 1, separation, -separation)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a, b = rng.integers(n, size=3000), rng.integers(n, size=3000)
    y = (labels[a] == labels[b]).astype(int)
    return x, labels, pair_features(x[a], x[b]), y


def test_weighted_l2_distance_is_the_decision_function_from_its_bias_down():
    x, labels, X, y = toy_pairs()
    r = WeightedL2Ranker().fit(X, y)
    q, refs = x[0], x[1:50]
    d = r.distance(q, refs)
    assert np.allclose(d, r.bias_ - r.decision_function(pair_features(q, refs)), atol=1e-10)
    assert np.allclose(LearnedWeightedL2(r).matrix(x[:5], refs), np.stack([r.distance(v, refs) for v in x[:5]]), atol=1e-8)
    # a distance users can read: never negative, 0 for the same image, and P(same) from the SVM's own score
    assert (r.weights_ <= 0).all() and d.min() >= 0 and r.distance(q, q[None])[0] == 0
    assert np.allclose(r.probability(d), r.predict_proba(pair_features(q, refs))[:, 1])


def test_learned_weights_find_informative_dimensions():
    x, labels, X, y = toy_pairs()
    r = WeightedL2Ranker(C=1.0).fit(X, y)
    # informative dimensions get large negative weights (a big difference there means "different")
    assert r.weights_[:4].mean() < 3 * r.weights_[4:].mean() and r.weights_[:4].max() < 0
    assert (r.predict(X) == y).mean() > 0.9


def reliability_gap(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the pair-weighted gap between mean probability and observed frequency per bin."""
    which = np.minimum((p * bins).astype(int), bins - 1)
    return sum(abs(p[which == b].mean() - y[which == b].mean()) * (which == b).mean() for b in range(bins) if (which == b).any())


def test_probability_is_calibrated_and_monotone():
    x, labels, X, y = toy_pairs(separation=0.5)
    # calibrated for the pairs' own ratio of negatives to positives, so its probabilities are frequencies
    ratio = (y[2000:] == 0).sum() / (y[2000:] == 1).sum()
    r = WeightedL2Ranker(platt_negative_ratio=ratio).fit(X[:2000], y[:2000], X[2000:], y[2000:])
    _, _, X_new, y_new = toy_pairs(seed=1, separation=0.5)  # held-out pairs of new vectors
    p = r.predict_proba(X_new)[:, 1]
    assert p.min() < 0.2 and p.max() > 0.8, "probabilities that say something, not the base rate"
    assert reliability_gap(p, y_new) < 0.06  # measured 0.042 (other seeds 0.016-0.069); Platt b off by 0.5: 0.09-0.18
    observed = r.decision_function(X)
    p = r.probability_from_score(np.linspace(observed.min(), observed.max(), 101))
    assert np.all(np.diff(p) > 0) and 0 < p.min() and p.max() < 1
    d = np.linspace(-3, 3, 50)
    assert np.all(np.diff(r.probability(d)) < 0), "more distant = less likely the same"
    proba = r.predict_proba(X[:10])
    assert proba.shape == (10, 2) and np.allclose(proba.sum(1), 1)


def test_platt_negative_ratio_shifts_probabilities_down():
    x, labels, X, y = toy_pairs()
    low = WeightedL2Ranker(platt_negative_ratio=10).fit(X, y)
    high = WeightedL2Ranker(platt_negative_ratio=0.1).fit(X, y)
    assert low.predict_proba(X)[:, 1].mean() < high.predict_proba(X)[:, 1].mean()


def test_model_round_trips_through_json(tmp_path):
    x, labels, X, y = toy_pairs()
    r = WeightedL2Ranker(C=0.3).fit(X, y)
    r.save(tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert '"weights"' in text and '"platt_a"' in text
    r2 = WeightedL2Ranker.load(tmp_path / "m.json")
    assert r2.C == 0.3
    assert np.array_equal(r.decision_function(X), r2.decision_function(X))
    assert np.array_equal(r.predict_proba(X), r2.predict_proba(X))


def test_mined_negatives_are_the_different_pairs_inside_the_margin_hardest_first():
    x, labels, X, y = toy_pairs(separation=0.5)
    ranker = WeightedL2Ranker().fit(X, y)
    miner = HardNegativeMiner(max_per_iteration=50, sampling_rounds=3, pairs_per_round=500)
    hard = miner.mine(ranker, x, labels, np.random.default_rng(0))
    scores = ranker.decision_function(hard)
    assert len(hard) == 50 and np.all(scores > -1) and np.all(np.diff(scores) <= 0)
    # every one is a different-attribute pair of the catalog
    different = pair_features(x[labels == 0][:, None], x[labels == 1][None]).reshape(-1, x.shape[1])
    assert all(np.abs(different - v).max(axis=1).min() < 1e-6 for v in hard)
    # without a limit it keeps every such pair of the rounds it drew, and stops drawing once it has enough
    everything = HardNegativeMiner(max_per_iteration=10**6, sampling_rounds=2, pairs_per_round=500).mine(ranker, x, labels, np.random.default_rng(0))
    assert len(everything) > 50 and np.all(ranker.decision_function(everything) > -1)
    assert HardNegativeMiner(max_per_iteration=1, sampling_rounds=5, pairs_per_round=500).mine(ranker, x, labels, np.random.default_rng(0)).shape == (1, x.shape[1])


def test_hard_negative_mining_refits_on_the_mined_pairs():
    x, labels, X, y = toy_pairs(separation=0.5)
    logs = []
    miner = HardNegativeMiner(iterations=2, max_per_iteration=100, sampling_rounds=2, pairs_per_round=2000)
    mined = miner.fit_ranker(WeightedL2Ranker(), X, y, x, labels, log=logs.append)
    plain = WeightedL2Ranker().fit(X, y)
    counts = [int(line.split(": ")[1].split()[0]) for line in logs]
    assert len(logs) == 2 and counts[0] == 100, logs
    assert not np.allclose(mined.weights_, plain.weights_), "the refit saw the mined negatives"
    # the mined negatives pull the same-attribute threshold up: fewer different pairs are called alike
    different = y == 0
    assert (mined.predict(X[different]) == 1).mean() < (plain.predict(X[different]) == 1).mean()
    assert (mined.predict(X) == y).mean() > (plain.predict(X) == y).mean() - 0.01  # measured 0.658 both


@pytest.mark.parametrize("dist", [L1(), L2(), Cosine()])
def test_fixed_distances_matrix_matches_rows(dist):
    rng = np.random.default_rng(1)
    Q, X = rng.normal(size=(4, 8)), rng.normal(size=(7, 8))
    assert np.allclose(dist.matrix(Q, X), np.stack([dist(q, X) for q in Q]))
    assert np.allclose(np.diag(dist.matrix(X, X)), 0, atol=1e-6)


def test_comparative_sets_flatten_into_labelled_row_pairs():
    from lookalike.data.splits import ComparativeSet
    from lookalike.metric import pairs_from_sets

    sets = [ComparativeSet(10, 11, (20, 21)), ComparativeSet(20, 21, (10,))]
    first, second, labels = pairs_from_sets(sets, {10: 0, 11: 1, 20: 2, 21: 3})
    assert first.tolist() == [0, 0, 0, 2, 2] and second.tolist() == [1, 2, 3, 3, 0] and labels.tolist() == [1, 0, 0, 1, 0]
    assert first.dtype == second.dtype == labels.dtype == np.int64
    # no sets (a part of a split too small to hold any): no pairs, but still row indices and integer labels, so
    # `features[first]` is an empty selection rather than an IndexError (an empty list becomes float64 by default)
    features = np.arange(8.0).reshape(4, 2)
    first, second, labels = pairs_from_sets([], {})
    assert features[first].shape == features[second].shape == (0, 2) and labels.size == 0 and labels.dtype == np.int64
    np.testing.assert_array_equal(pair_features(np.array([[1.0, 0.0]]), np.array([[0.5, 2.0]])), [[0.25, 4.0]])
    assert pair_features(np.zeros((1, 2), np.float64), np.zeros((1, 2))).dtype == np.float32


def test_standard_distances_and_chance_level():
    x, labels, X, y = toy_pairs()
    ranker = WeightedL2Ranker().fit(X, y)
    assert [d.name for d in standard_distances(None)] == ["random", "l1", "l2", "cosine"]
    learned = standard_distances(ranker, seed=3)
    assert [d.name for d in learned] == ["random", "l1", "l2", "cosine", "weighted_l2"]
    np.testing.assert_array_equal(learned[-1](x[0], x[1:9]), ranker.distance(x[0], x[1:9]))
    # chance is repeatable for a seed, and another seed draws other numbers
    assert np.array_equal(learned[0](x[0], x[:6]), RandomDistance(3)(x[0], x[:6])) and learned[0](x[0], x[:6]).shape == (6,)
    assert not np.array_equal(RandomDistance(3)(x[0], x[:6]), RandomDistance(4)(x[0], x[:6]))
    assert RandomDistance().matrix(x[:0], x[:6]).shape == (0, 6)


def test_cosine_ignores_length_even_for_short_vectors():
    rng = np.random.default_rng(2)
    Q, X = rng.normal(size=(3, 8)), rng.normal(size=(5, 8))
    short_q, short_x = 1e-3 * Q / np.linalg.norm(Q, axis=1, keepdims=True), 1e-3 * X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(Cosine().matrix(short_q, short_x), Cosine().matrix(Q, X), atol=1e-12)
    np.testing.assert_allclose(Cosine()(short_q[0], short_x), Cosine()(Q[0], X), atol=1e-12)


def test_mining_is_repeatable_and_calibrates_on_the_given_pairs():
    x, labels, X, y = toy_pairs(separation=0.5)
    miner = HardNegativeMiner(iterations=1, max_per_iteration=50, sampling_rounds=1, pairs_per_round=1000, seed=5)
    logs = []
    a = miner.fit_ranker(WeightedL2Ranker(), X[:2000], y[:2000], x, labels, X[2000:], y[2000:], log=logs.append)
    b = miner.fit_ranker(WeightedL2Ranker(), X[:2000], y[:2000], x, labels, X[2000:], y[2000:], log=lambda _: None)
    assert logs == ["hard-negative mining iteration 1/1: 50 new negatives"]
    assert np.array_equal(a.weights_, b.weights_) and a.platt_b_ == b.platt_b_
    # the refit after mining is calibrated on the calibration pairs too
    again = copy.deepcopy(a).calibrate(X[2000:], y[2000:])
    assert again.platt_b_ == pytest.approx(a.platt_b_) and again.platt_a_ == pytest.approx(a.platt_a_)
    # Platt scaling is fit on the calibration pairs given, not on the training pairs
    on_training = WeightedL2Ranker().fit(X[:2000], y[:2000])
    assert not np.isclose(HardNegativeMiner().fit_ranker(WeightedL2Ranker(), X[:2000], y[:2000], x, labels, X[2000:], y[2000:]).platt_b_, on_training.platt_b_)


def test_ranker_defaults_class_weights_visual_part_and_refusals():
    assert WeightedL2Ranker().get_params() == {
        "C": 0.1, "class_weight": "balanced", "max_iter": 10000, "platt_negative_ratio": 10.0, "visual_dims": 0, "visual_weight": 0.5,
    }
    x, labels, X, y = toy_pairs(separation=0.5)
    keep = (y == 0) | (np.arange(len(y)) % 4 == 0)  # a quarter of the positives: imbalanced
    balanced = WeightedL2Ranker().fit(X[keep], y[keep])
    for unweighted in ("none", None):
        plain = WeightedL2Ranker(class_weight=unweighted).fit(X[keep], y[keep])
        assert plain.predict(X[keep]).mean() < balanced.predict(X[keep]).mean(), "balancing calls more pairs alike"
    # the visual part: one shared negative weight, visual_weight x the mean magnitude of the learned ones
    r = WeightedL2Ranker(visual_dims=4, visual_weight=0.5).fit(X, y)
    assert r.n_features_in_ == X.shape[1] and np.allclose(r.weights_[-4:], -0.5 * np.abs(r.weights_[:-4]).mean())
    # its mean share of the training pairs' distance is in the bias: on average the margin is where the SVM put it
    assert r.decision_function(X).mean() == pytest.approx(WeightedL2Ranker().fit(X[:, :-4], y).decision_function(X[:, :-4]).mean(), abs=1e-6)
    with pytest.raises(LookalikeError, match="training pairs need both positive and negative examples"):
        WeightedL2Ranker().fit(X[y == 1], y[y == 1])
    with pytest.raises(LookalikeError, match="visual_dims = 16 leaves none of the 16 pair features"):
        WeightedL2Ranker(visual_dims=16).fit(X, y)
    with pytest.raises(LookalikeError, match="calibration pairs need both positive and negative examples"):
        WeightedL2Ranker().fit(X, y, X[y == 0], y[y == 0])
    # scores that say the opposite of the labels cannot make the probability rise with distance
    assert r.calibrate(X, 1 - y).platt_a_ == 1e-6


def test_a_heavy_visual_part_leaves_the_margin_telling_alike_from_unalike():
    x, labels, X, y = toy_pairs()
    pred = WeightedL2Ranker(visual_dims=4, visual_weight=20.0).fit(X, y).predict(X)
    # balanced pair accuracy 0.81; with the SVM's own bias (the visual part left out of it) 0.59, 91% called unalike
    assert ((pred[y == 1] == 1).mean() + (pred[y == 0] == 0).mean()) / 2 > 0.75 and pred.mean() > 0.3


def test_platt_scaling_on_pairs_the_scores_separate_stays_short_of_certainty():
    x, labels, X, y = toy_pairs(separation=4.0)
    r = WeightedL2Ranker().fit(X, y)
    calib = np.r_[np.flatnonzero(y == 1)[:10], np.flatnonzero(y == 0)[:100]]  # 10 alike pairs, 100 not
    X, y = X[calib], y[calib]
    scores = r.decision_function(X)
    assert scores[y == 1].min() > scores[y == 0].max(), "the calibration pairs are separable"
    p = r.calibrate(X, y).predict_proba(X)[:, 1]
    # 10 alike pairs cannot show a probability above Platt's target 11/12; a fit to 1 and 0 gave 1.0000 and 0.0000
    assert 0.8 < p[y == 1].min() and p.max() < 0.95 and p.min() > 1e-3, (p[y == 1].min(), p.max(), p.min())
    # so a constant added to every score (a different bias) moves only Platt's intercept, not one probability
    shifted = copy.deepcopy(r)
    shifted.bias_ += 3.0
    np.testing.assert_allclose(shifted.calibrate(X, y).predict_proba(X)[:, 1], p, atol=1e-6)


def test_ranker_refusals_name_the_problem_and_its_settings_reach_the_solver():
    x, labels, X, y = toy_pairs(separation=0.5)
    with pytest.raises(LookalikeError, match=r"^training pairs need both positive and negative examples; only one class was found$"):
        WeightedL2Ranker().fit(X[y == 1], y[y == 1])
    with pytest.raises(LookalikeError, match=r"^Only binary classification is supported: a pair is alike \(1\) or not \(0\), but the target is multiclass$"):
        WeightedL2Ranker().fit(X, y + (np.arange(len(y)) % 7 == 0))
    with pytest.raises(LookalikeError, match=r"^calibration pairs need both positive and negative examples$"):
        WeightedL2Ranker().fit(X, y, X[y == 1], y[y == 1])
    one_negative = np.r_[np.flatnonzero(y == 1)[:20], np.flatnonzero(y == 0)[:1]]
    assert WeightedL2Ranker().fit(X, y, X[one_negative], y[one_negative]).platt_a_ > 0  # few, but both kinds
    # a visual part may leave a single feature to learn from
    r = WeightedL2Ranker(visual_dims=X.shape[1] - 1).fit(X, y)
    assert r.weights_.shape == (X.shape[1],) and np.all(r.weights_[1:] == r.weights_[-1])
    # C is the SVM's: stronger regularisation, smaller weights
    assert np.abs(WeightedL2Ranker(C=0.001).fit(X, y).weights_).sum() < 0.5 * np.abs(WeightedL2Ranker(C=1.0).fit(X, y).weights_).sum()
    # so is max_iter: a solver stopped early says so
    with pytest.warns(ConvergenceWarning):
        assert WeightedL2Ranker(max_iter=2).fit(X, y).n_iter_ == 2


def test_a_weight_that_would_make_differences_alike_is_clipped_to_zero():
    """An SVM weight above 0 says "alike when they differ here": not a distance; the ranker sets it to 0, so every
    learned distance stays >= 0 and 0 means the same vector."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 600)
    X = rng.uniform(0, 0.05, (600, 3))
    X[:, 0] += np.where(y == 1, 0.0, 0.3)  # alike pairs differ little here
    X[:, 1] += np.where(y == 1, 0.3, 0.0)  # and a lot here: the SVM's weight is positive
    r = WeightedL2Ranker(C=1.0).fit(X, y)
    assert r.weights_[0] < 0 and r.weights_[1] == 0.0
    q = np.array([0.0, 0.0, 0.0])
    assert np.all(r.distance(q, rng.uniform(-1, 1, (50, 3))) >= 0)


def test_platt_scaling_is_the_weighted_maximum_likelihood_fit_even_on_few_pairs():
    """Negatives weigh `platt_negative_ratio` x n_pos / n_neg each, and (a, b) maximise that weighted likelihood of
    Platt's targets, (n_pos + 1) / (n_pos + 2) and 1 / (ratio x n_pos + 2), with no other shrinkage: the weighted
    mean probability is the weighted mean target, near 1 / (1 + ratio)."""
    x, labels, X, y = toy_pairs(separation=0.5)
    r = WeightedL2Ranker(platt_negative_ratio=10).fit(X[:2000], y[:2000])
    calib = np.r_[np.flatnonzero(y[2000:] == 1)[:10], np.flatnonzero(y[2000:] == 0)[:50]] + 2000  # 10 alike, 50 not
    r.calibrate(X[calib], y[calib])
    s, alike = r.decision_function(X[calib]), y[calib] == 1
    w = np.where(alike, 1.0, 10 * 10 / 50)
    target = np.where(alike, 11 / 12, 1 / 102)
    p = r.probability_from_score(s)
    gradient = np.array([np.sum(w * (target - p) * (s - s.mean()) / s.std()), np.sum(w * (target - p))]) / w.sum()
    assert np.abs(gradient).max() < 1e-3, gradient
    assert np.average(p, weights=w) == pytest.approx(np.average(target, weights=w), abs=1e-3)
    assert np.average(target, weights=w) == pytest.approx(0.0922, abs=1e-4)  # 1 / 11 = 0.0909 with hard targets


def test_probabilities_of_float32_distances_are_those_of_float64_ones():
    x, labels, X, y = toy_pairs()
    r = WeightedL2Ranker().fit(X, y)
    d = r.distance(x[0], x[1:200])
    d32 = d.astype(np.float32)
    np.testing.assert_allclose(r.probability(d32), r.probability(d32.astype(np.float64)), rtol=1e-13, atol=0)
    s32 = (r.bias_ - d).astype(np.float32)
    np.testing.assert_allclose(r.probability_from_score(s32), r.probability_from_score(s32.astype(np.float64)), rtol=1e-13, atol=0)


def test_a_model_file_that_cannot_be_used_is_refused_with_the_reason(tmp_path):
    x, labels, X, y = toy_pairs()
    r = WeightedL2Ranker(C=0.3).fit(X, y)
    r.save(tmp_path / "m.json")
    loaded = WeightedL2Ranker.load(tmp_path / "m.json")
    # the loaded model is the fitted one: its parameters, its yes/no answers, the pair features it takes
    assert loaded.get_params() == r.get_params() and loaded.predict(X).tolist() == r.predict(X).tolist()
    for model in (r, loaded):
        with pytest.raises(ValueError, match=f"X has 10 features, but WeightedL2Ranker is expecting {X.shape[1]} features"):
            model.decision_function(X[:, :10])
        assert model.decision_function(X[:3]).shape == (3,)  # and still takes the right ones

    missing = tmp_path / "none.json"
    with pytest.raises(LookalikeError, match=f"^{re.escape(str(missing))} not found; run `lookalike train-metric` first$"):
        WeightedL2Ranker.load(missing)
    text = (tmp_path / "m.json").read_text()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(LookalikeError, match=f"^{re.escape(str(tmp_path / 'cut.json'))} is not a valid lookalike model file \\((?:Unterminated|Expecting) "):
        WeightedL2Ranker.load(tmp_path / "cut.json")
    d = json.loads(text)
    del d["platt_a"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    with pytest.raises(LookalikeError, match=f"^{re.escape(str(tmp_path / 'old.json'))} is not a valid lookalike model file \\('platt_a'\\)$"):
        WeightedL2Ranker.load(tmp_path / "old.json")
    (tmp_path / "other.json").write_text(json.dumps({**d, "format": "lookalike.weighted_l2/9"}))
    with pytest.raises(LookalikeError, match=r"^not a lookalike weighted-L2 model \(format 'lookalike.weighted_l2/9', expected lookalike.weighted_l2/1\)$"):
        WeightedL2Ranker.load(tmp_path / "other.json")
