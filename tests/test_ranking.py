import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score

from lookalike.data.splits import ComparativeSet
from lookalike.data.dataset import ImageRecord
from lookalike.evaluation import gallery_metrics, negatives_above, positive_ranks, rank_summary
from lookalike.evaluation.misses import misses_of, photos_behind_misses
from lookalike.evaluation.ranking import average_precision
from lookalike.evaluation.calibration import pooled_bins, reliability
from lookalike.evaluation.lookalike import altered_copy, copy_ranks, copy_summary, nearest_neighbour_accuracy, tied_fraction
from lookalike.metric import L2


def test_ranks_on_hand_made_sets():
    # 1-d points: query at 0; positive at distance 0.5; negatives at 0.1, 0.3, 1, 2
    feats = np.array([[0.0], [0.5], [0.1], [0.3], [1.0], [2.0], [0.4]])
    sets = [ComparativeSet(0, 1, (2, 3, 4, 5)), ComparativeSet(0, 6, (4, 5)), ComparativeSet(0, 1, (6,))]
    row_of = {i: i for i in range(len(feats))}
    ranks = positive_ranks(L2(), feats, row_of, sets)
    assert ranks.tolist() == [3, 1, 2]
    s = rank_summary(ranks)
    assert s == {"top1": 1 / 3, "top5": 1.0, "mean_rank": 2.0, "median_rank": 2.0}


def test_ties_count_against_the_positive():
    feats = np.array([[0.0], [1.0], [1.0]])
    assert positive_ranks(L2(), feats, {0: 0, 1: 1, 2: 2}, [ComparativeSet(0, 1, (2,))]).tolist() == [2]


def test_the_negatives_above_each_positive_are_the_ones_its_rank_counts():
    feats = np.array([[0.0], [0.5], [0.1], [0.3], [1.0], [2.0], [0.5]])
    sets = [ComparativeSet(0, 1, (2, 3, 4, 5, 6)), ComparativeSet(0, 2, (4, 5))]
    row_of = {i: i for i in range(len(feats))}
    above = negatives_above(L2(), feats, row_of, sets)
    assert above == [[2, 3, 6], []]  # 6 ties with the positive, and a tie counts against it
    assert misses_of(sets, above) == [{"query": 0, "positive": 1, "above": [2, 3, 6]}]
    assert positive_ranks(L2(), feats, row_of, sets).tolist() == [1 + len(a) for a in above]


def test_the_photos_behind_the_misses_are_counted_in_every_role_over_every_split():
    images = [ImageRecord(f"{a}/{i}.jpg", a, "", "") for i, a in enumerate("aaabbbccc")]
    split_0 = [  # photo 4, a "b" photo, outranks the positive of three "a" queries and one "c" query
        {"query": 0, "positive": 1, "above": [4]},
        {"query": 1, "positive": 2, "above": [4, 7]},
        {"query": 2, "positive": 0, "above": [4]},
        {"query": 6, "positive": 8, "above": [4]},
    ]
    split_1 = [{"query": 4, "positive": 5, "above": [0]}, {"query": 3, "positive": 5, "above": [8]}, {"query": 3, "positive": 5, "above": [1]}]
    found = photos_behind_misses([split_0, split_1], images)
    assert found["misses"] == 7
    top = found["photos"][0]
    assert top == {
        "image": 4, "path": "b/4.jpg", "attribute": "b", "misses": 5, "as_query": 1, "as_positive": 0,
        "outranked": 4, "outranked_for": {"a": 3, "c": 1}, "splits": 2,
    }
    # then the photos in 3 misses, by path; photos in fewer (b/3.jpg, a/2.jpg, c/8.jpg: 2 each) are not listed
    assert [(p["path"], p["misses"]) for p in found["photos"]] == [("b/4.jpg", 5), ("a/0.jpg", 3), ("a/1.jpg", 3), ("b/5.jpg", 3)]
    assert found["covered"] == 7
    narrow = photos_behind_misses([split_0, split_1], images, limit=1)
    assert [p["path"] for p in narrow["photos"]] == ["b/4.jpg"] and narrow["covered"] == 5  # the two misses of b/3.jpg are not its
    assert photos_behind_misses([[]], images) == {"misses": 0, "covered": 0, "min_misses": 3, "photos": []}


def test_gallery_metrics_hand_made():
    # two tight clusters, except image 2 which sits nearer the other cluster
    feats = np.array([[0.0], [0.1], [0.9], [1.0], [1.1]])
    labels = np.array(["a", "a", "a", "b", "b"])
    g = gallery_metrics(L2(), feats, labels)
    assert g["recall_at_1"] == 0.8  # image 2's nearest neighbour is "b"
    # image 0: relevant 1 (rank 1) and 2 (rank 2) -> AP 1; image 2: relevant at ranks 3,4 -> (1/3 + 2/4)/2
    aps = [1.0, 1.0, (1 / 3 + 2 / 4) / 2, 1.0, 1.0]
    assert np.isclose(g["map"], np.mean(aps))


def test_average_precision_takes_equal_distances_as_one_step_like_scikit_learn():
    # hand-computed: relevant at distances 1 and 3, an irrelevant one tied with the first -> (1/2 * 1/2 + 1/2 * 2/3)
    assert np.isclose(average_precision(np.array([True, False, True, False]), np.array([1.0, 1.0, 3.0, 4.0])), 0.5 * 0.5 + 0.5 * 2 / 3)
    rng = np.random.default_rng(0)
    for n in rng.integers(2, 60, size=300):
        relevant = rng.random(n) < 0.4
        relevant[rng.integers(n)] = True
        distances = rng.integers(0, 6, size=n).astype(float)  # many ties
        assert np.isclose(average_precision(relevant, distances), average_precision_score(relevant, -distances), atol=1e-12)


def test_empty_inputs_summarise_to_nan_and_small_ones_do_not():
    empty = rank_summary(np.array([]))
    assert set(empty) == {"top1", "top5", "mean_rank", "median_rank"} and all(np.isnan(v) for v in empty.values())
    assert rank_summary(np.array([3])) == {"top1": 0.0, "top5": 1.0, "mean_rank": 3.0, "median_rank": 3.0}
    assert rank_summary(np.array([5, 6]))["top5"] == 0.5
    g = gallery_metrics(L2(), np.array([[0.0], [1.0]]), np.array(["a", "b"]))  # no image has a same-attribute partner
    assert all(np.isnan(v) for v in g.values())


def test_gallery_recall_at_other_k():
    feats = np.array([[0.0], [0.1], [0.2], [1.0], [3.0]])
    labels = np.array(["a", "b", "c", "a", "c"])
    g = gallery_metrics(L2(), feats, labels, ks=(1, 2, 3))
    # image 0: its "a" partner (3) is 3rd nearest; 2: partner 4 is last; 3: partner 0 is 3rd; 4: partner 2 is 2nd; 1 has none
    assert (g["recall_at_1"], g["recall_at_2"], g["recall_at_3"]) == (0.0, 0.25, 0.75)


def test_copy_ranks_count_ties_against_the_original():
    catalog = np.array([[0.0], [1.0], [2.0], [3.0]])
    copies = np.array([[0.1], [1.5], [2.1], [5.0]])  # copy 1 sits half-way: its original ties with row 2
    ranks = copy_ranks(L2(), catalog, copies)
    assert ranks.tolist() == [1, 2, 1, 1]
    assert copy_summary(ranks) == {"found_first": 0.75, "top5": 1.0, "mean_rank": 1.25, "n": 4}
    assert copy_summary(np.array([1, 6]))["top5"] == 0.5
    tied_catalog = np.array([[0.0], [1.0], [1.0]])  # two identical photos: neither copy can be said to find its own
    assert copy_ranks(L2(), tied_catalog, tied_catalog).tolist() == [1, 2, 2]


def test_nearest_neighbour_accuracy_by_group():
    vectors = np.array([[0.0], [0.1], [1.0], [1.05], [2.0], [0.2]])
    labels = np.array(["a", "a", "b", "b", "c", "c"])
    groups = {"seen": np.array([True, True, True, True, False, False]), "unseen": np.array([False] * 4 + [True, True]), "none": np.zeros(6, bool)}
    acc = nearest_neighbour_accuracy(L2(), vectors, labels, groups)
    # 4 (c) is nearest to 3 (b); 5 (c) is nearest to 1 (a): the unseen pattern never finds its own
    assert acc["seen"] == 1.0 and acc["unseen"] == 0.0 and np.isnan(acc["none"])


def test_tied_fraction_finds_orders_left_to_rounding():
    labels = np.array(["a"] * 4)
    spread = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert tied_fraction(L2(), spread, labels) == 0.0
    # 0 and 2 are equally far from 1 (and 3 is far from all): query 1's matches hold a tie
    tied = np.array([[0.0], [1.0], [2.0], [10.0]])
    assert tied_fraction(L2(), tied, labels) == 0.25
    assert tied_fraction(L2(), tied, labels, k=1) == 0.0, "a single match cannot tie"
    assert np.isnan(tied_fraction(L2(), np.array([[0.0]]), np.array(["a"])))


def test_altered_copy_is_a_smaller_brighter_crop_and_repeatable():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 200, (100, 80, 3), dtype=np.uint8), "RGB")
    a, b = altered_copy(img, seed=3), altered_copy(img, seed=3)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and a.mode == "RGB"
    assert not np.array_equal(np.asarray(a), np.asarray(altered_copy(img, seed=4)))
    # 70-85% of the area, then 60% of each side
    w, h = a.size
    assert 0.6**2 * 0.69 * 8000 <= w * h <= 0.6**2 * 0.86 * 8000 and w <= 48 and h <= 60
    assert np.asarray(a, np.float64).mean() > np.asarray(img, np.float64).mean() * 1.03
    assert altered_copy(Image.new("L", (2, 2), 128), seed=1).size == (1, 1)


def test_altered_copy_crop_keeps_its_area_and_aspect_bounds():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 200, (200, 300, 3), dtype=np.uint8), "RGB")
    original = np.asarray(img, np.float64).mean()
    for seed in range(20):
        w, h = altered_copy(img, seed).size
        crop_w, crop_h = w / 0.6, h / 0.6
        assert 0.66 <= crop_w * crop_h / (300 * 200) <= 0.88, seed  # 70-85% of the area, up to rounding
        assert 0.75 <= (crop_w / crop_h) / 1.5 <= 1.3, seed  # the photo's own aspect, changed by at most 0.8-1.25
        assert 1.03 < np.asarray(altered_copy(img, seed), np.float64).mean() / original < 1.2, seed  # 10% brighter


def test_reliability_weighs_unalike_pairs_to_the_prior_the_probabilities_are_calibrated_for():
    # two groups of pairs: given 0.2 (both unalike) and 0.8 (one alike, one not)
    p, same = [0.2, 0.2, 0.8, 0.8], [False, False, True, False]
    # at a ratio of 3 unalike to 1 alike, as these pairs are, every pair weighs 1
    r = reliability(p, same, negative_ratio=3)
    assert [(b["low"], b["probability"], b["frequency"], b["share"]) for b in r["bins"]] == [(0.2, 0.2, 0.0, 0.5), (0.8, 0.8, 0.5, 0.5)]
    assert r["ece"] == pytest.approx(0.2 * 0.5 + 0.3 * 0.5) and r["brier"] == pytest.approx((0.04 + 0.04 + 0.04 + 0.64) / 4)
    # at 6, each unalike pair weighs 2: the 0.8 group's frequency falls to 1/3 and its gap grows
    r = reliability(p, same, negative_ratio=6)
    assert r["bins"][1]["frequency"] == pytest.approx(1 / 3) and r["ece"] == pytest.approx(0.2 * 4 / 7 + (0.8 - 1 / 3) * 3 / 7)
    assert r["pairs"] == 4 and r["alike"] == 1
    # probabilities that are frequencies score near 0; the same pairs told the opposite score high
    rng = np.random.default_rng(0)
    given = rng.uniform(0, 1, 20000)
    alike = rng.uniform(0, 1, 20000) < given
    assert reliability(given, alike, negative_ratio=(~alike).sum() / alike.sum())["ece"] < 0.02
    assert reliability(1 - given, alike, negative_ratio=(~alike).sum() / alike.sum())["ece"] > 0.4
    # nothing to compare with when the pairs are all of one kind
    assert reliability([0.3, 0.9], [True, True], 10) is None


def test_pooled_reliability_counts_each_split_equally():
    a = reliability([0.2, 0.2, 0.8, 0.8], [False, False, True, False], 3)
    b = reliability([0.25, 0.85, 0.85, 0.85], [False, True, True, True], 1 / 3)
    pooled = pooled_bins([a, b])
    assert pooled_bins([a, a]) == [row | {"pairs": 2 * row["pairs"]} for row in a["bins"]] and [row["low"] for row in pooled] == [0.2, 0.8]
    low, high = pooled
    assert low["share"] == pytest.approx((0.5 + 0.25) / 2) and low["probability"] == pytest.approx((0.2 * 0.5 + 0.25 * 0.25) / 0.75)
    assert high["pairs"] == 5 and high["frequency"] == pytest.approx((0.5 * 0.5 + 1.0 * 0.75) / 1.25)
