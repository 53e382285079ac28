import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from tf_retrieval.evaluation.metrics import (RetrievalMetrics, average_precision, f1_at_k, map_at_r, pr_curve, precision_at_k,
                                  r_precision, recall_at, recall_at_k, relevance_matrix)

# One query, ranking: R N R N N R  (3 relevant in the database, all ranked).
REL = np.array([[1, 0, 1, 0, 0, 1]], bool)
NREL = np.array([3])


def test_relevance_matrix():
    rel = relevance_matrix(np.array([1, 2]), np.array([[1, 2, 1], [2, 2, 0]]))
    assert rel.tolist() == [[True, False, True], [True, True, False]]
    with pytest.raises(ValueError, match="expected query labels"):
        relevance_matrix(np.array([1]), np.array([1, 2]))


def test_precision_recall_f1_by_hand():
    assert precision_at_k(REL, 1)[0] == 1.0
    assert precision_at_k(REL, 4)[0] == 0.5           # 2 of 4
    assert recall_at_k(REL, NREL, 4)[0] == pytest.approx(2 / 3)
    # F1@4 = 2 * 0.5 * 2/3 / (0.5 + 2/3) = 4/7
    assert f1_at_k(REL, NREL, 4)[0] == pytest.approx(4 / 7)
    assert f1_at_k(np.zeros((1, 3), bool), np.array([2]), 3)[0] == 0.0


def test_average_precision_by_hand():
    # Precisions at the hits: 1/1, 2/3, 3/6 -> AP = (1 + 2/3 + 1/2) / 3 = 0.7222
    assert average_precision(REL, NREL)[0] == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    # AP@3: hits at 1 and 3 -> (1 + 2/3) / min(3, 3) = 0.5556; "retrieved" normalisation divides by 2 hits -> 0.8333
    assert average_precision(REL, NREL, k=3)[0] == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision(REL, NREL, k=3, normalize="retrieved")[0] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="normalize must be"):
        average_precision(REL, NREL, normalize="x")


def test_map_at_r_and_r_precision_by_hand():
    # R = 3: only ranks 1..3 count: hits at 1 and 3 -> (1/1 + 2/3) / 3 = 0.5556; R-precision = 2/3
    assert map_at_r(REL, NREL)[0] == pytest.approx((1 + 2 / 3) / 3)
    assert r_precision(REL, NREL)[0] == pytest.approx(2 / 3)
    # Musgrave et al.'s example: R = 10, relevant at ranks 1, 3 -> (1 + 2/3) / 10 = 0.1667
    rel = np.zeros((1, 12), bool)
    rel[0, [0, 2]] = True
    assert map_at_r(rel, np.array([10]))[0] == pytest.approx((1 + 2 / 3) / 10)
    with pytest.raises(ValueError, match="needs at least R = 10 ranked columns"):
        map_at_r(rel[:, :5], np.array([10]))


def test_recall_at_k_metric_learning():
    rel = np.array([[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], bool)
    values = recall_at(rel, (1, 2, 4))
    assert values[1].tolist() == [0, 0, 1, 0]
    assert values[2].tolist() == [1, 0, 1, 0]
    assert values[4].tolist() == [1, 0, 1, 1]
    with pytest.raises(ValueError, match=r"k must be in 1..4"):
        recall_at(rel, (8,))


def test_no_relevant_items_give_zero_not_nan():
    rel = np.zeros((2, 4), bool)
    nrel = np.zeros(2)
    for values in (recall_at_k(rel, nrel, 2), average_precision(rel, nrel), map_at_r(rel, nrel), r_precision(rel, nrel)):
        assert values.tolist() == [0.0, 0.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"k must be in 1..6"):
        precision_at_k(REL, 7)
    with pytest.raises(ValueError, match=r"k must be in 1..6"):
        precision_at_k(REL, 0)
    with pytest.raises(ValueError, match="one value per query"):
        recall_at_k(REL, np.array([1, 2]), 2)
    with pytest.raises(ValueError, match="matrix"):
        precision_at_k(np.ones(3, bool), 1)


def test_average_precision_matches_sklearn(rng):
    for _ in range(20):
        n = rng.integers(5, 60)
        truth = rng.random(n) < 0.3
        if not truth.any():
            truth[0] = True
        scores = rng.random(n)
        order = np.argsort(-scores)
        ours = average_precision(truth[order][None, :], np.array([truth.sum()]))[0]
        assert ours == pytest.approx(average_precision_score(truth, scores))


def test_pr_curve_end_points():
    precision, recall = pr_curve(REL, NREL, points=[1, 3, 6])
    assert precision.tolist() == pytest.approx([1.0, 2 / 3, 0.5])
    assert recall.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_streaming_accumulator_equals_one_shot(rng):
    rel = rng.random((50, 40)) < 0.2
    nrel = rel.sum(axis=1) + rng.integers(0, 3, 50)
    nrel[3] = 0  # a query with nothing relevant: skipped and counted
    rel[3] = False
    whole = RetrievalMetrics(map_k=10)
    whole.update(rel, nrel)
    chunked = RetrievalMetrics(map_k=10)
    for start in range(0, 50, 7):
        chunked.update(rel[start:start + 7], nrel[start:start + 7])
    a, b = whole.result(), chunked.result()
    assert a.keys() == b.keys() and a["queries"] == 49 and a["skipped_queries"] == 1
    for key in a:
        assert a[key] == pytest.approx(b[key])
    keep = nrel > 0
    assert a["mAP"] == pytest.approx(average_precision(rel[keep], nrel[keep]).mean())
    assert a["P@10"] == pytest.approx(precision_at_k(rel[keep], 10).mean())
    assert whole.pr_curve()["k"][0] == 1
