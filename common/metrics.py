"""Full-ranking metrics (HR@K, NDCG@K, MRR@K) in numpy, and small measuring helpers."""

from __future__ import annotations

import math
import resource
import sys
from typing import Any

import numpy as np


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rank_of_target(scores: np.ndarray, target: int, exclude: np.ndarray | None = None) -> int:
    """1-based rank of `target` among all items, items in `exclude` removed.

    Ties count against the target (pessimistic): an item scoring exactly as high as the
    target ranks above it, so a model that scores everything equally earns nothing.
    """
    scores = np.asarray(scores, dtype=np.float64)
    keep = np.ones(scores.shape[0], dtype=bool)
    if exclude is not None and len(exclude):
        keep[np.asarray(exclude, dtype=np.int64)] = False
    keep[target] = False
    return 1 + int(np.count_nonzero(scores[keep] >= scores[target]))


def ranking_metrics(ranks: np.ndarray, k: int = 10) -> dict[str, float]:
    """HR@k, NDCG@k and MRR@k averaged over users, from 1-based ranks of the held-out item."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        return {f"hr@{k}": 0.0, f"ndcg@{k}": 0.0, f"mrr@{k}": 0.0}
    hit = ranks <= k
    return {
        f"hr@{k}": float(hit.mean()),
        f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean()),
        f"mrr@{k}": float(np.where(hit, 1.0 / ranks, 0.0).mean()),
    }


def finite_number(value: Any) -> float | None:
    """A finite float, or None for missing, null, non-numeric, NaN and infinite values."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
