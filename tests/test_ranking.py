import numpy as np

from lookalike.data.splits import ComparativeSet
from lookalike.evaluation import gallery_metrics, positive_ranks, rank_summary
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


def test_gallery_metrics_hand_made():
    # two tight clusters, except image 2 which sits nearer the other cluster
    feats = np.array([[0.0], [0.1], [0.9], [1.0], [1.1]])
    labels = np.array(["a", "a", "a", "b", "b"])
    g = gallery_metrics(L2(), feats, labels)
    assert g["recall_at_1"] == 0.8  # image 2's nearest neighbour is "b"
    # image 0: relevant 1 (rank 1) and 2 (rank 2) -> AP 1; image 2: relevant at ranks 3,4 -> (1/3 + 2/4)/2
    aps = [1.0, 1.0, (1 / 3 + 2 / 4) / 2, 1.0, 1.0]
    assert np.isclose(g["map"], np.mean(aps))
