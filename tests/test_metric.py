import numpy as np
import pytest

from lookalike.metric import Cosine, HardNegativeMiner, L1, L2, LearnedWeightedL2, WeightedL2Ranker, pair_features


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


def test_probability_is_calibrated_and_monotone():
    x, labels, X, y = toy_pairs(separation=0.3)
    r = WeightedL2Ranker().fit(X[:2000], y[:2000], X[2000:], y[2000:])
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


def test_hard_negative_mining_adds_negatives_and_keeps_quality():
    x, labels, X, y = toy_pairs()
    logs = []
    miner = HardNegativeMiner(iterations=2, max_per_iteration=100, sampling_rounds=2, pairs_per_round=2000)
    r = miner.fit_ranker(WeightedL2Ranker(), X, y, x, labels, log=logs.append)
    assert logs and "new negatives" in logs[0]
    assert (r.predict(X) == y).mean() > 0.85


@pytest.mark.parametrize("dist", [L1(), L2(), Cosine()])
def test_fixed_distances_matrix_matches_rows(dist):
    rng = np.random.default_rng(1)
    Q, X = rng.normal(size=(4, 8)), rng.normal(size=(7, 8))
    assert np.allclose(dist.matrix(Q, X), np.stack([dist(q, X) for q in Q]))
    assert np.allclose(np.diag(dist.matrix(X, X)), 0, atol=1e-6)
