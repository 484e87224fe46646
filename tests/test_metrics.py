"""Full-ranking metrics against hand-computed values."""

import math

import numpy as np
import pytest

from common.metrics import rank_of_target, ranking_metrics


def test_ranking_metrics_hand_computed():
    m = ranking_metrics(np.array([1, 3, 11]), k=10)
    assert m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(4)) / 3)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / 3)


def test_rank_excludes_seen_items_and_counts_ties_against_the_target():
    scores = np.array([0.9, 0.5, 0.7, 0.5, 0.1])
    assert rank_of_target(scores, target=1) == 4  # 0.9, 0.7 and the tie at item 3 rank above
    assert rank_of_target(scores, target=1, exclude=np.array([0, 2])) == 2
    assert rank_of_target(np.zeros(5), target=2) == 5  # a constant model earns nothing


def test_empty_input_gives_zeros():
    assert ranking_metrics(np.array([]), k=10) == {"hr@10": 0.0, "ndcg@10": 0.0, "mrr@10": 0.0}
