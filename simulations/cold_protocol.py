"""The strict cold-item protocol (notes/protocol.md's split): its data and its measures.

With a fixed seed, a fraction of the catalog's items (10% by default) becomes *cold*: every
interaction with them is removed from the users' sequences before the leave-last-out split, so
no model trains on them, is selected with them, or keeps an id row for them (the models are built
over the warm items only; a cold item is a new item, scored from its text alone). Each removed
interaction is then one case: the user's warm interactions before it are the history, the cold
item the target, ranked

- among the cold items only (which new item suits this user?), and
- among every item (does a new item reach the top 10 at all?),

items the user interacted with before the target excluded in both. Metrics are averaged over
cases. Ties are broken uniformly at random, in expectation: a model that gives every cold item
the same score (the id-only model, popularity) scores exactly as a random ranking would, where
counting ties against the target would put it below random.

`fedrec-coldstart` (simulations/coldstart.py) trains and scores the models; `write_split` keeps
the split for the freshness harness (simulations/freshness.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch-backed types: imported where used
    from common.backbone import ItemStates
    from common.config import Config
    from common.data import Catalog, Dataset, UserSplit
    from common.model import Recommender

K = 10
SCOPES = ("cold", "all")  # ranked among the cold items only / among every item
# what `write_split` keeps for the freshness harness (simulations/freshness.py)
WARM_ITEMS, COLD_ITEMS, CASES_FILE = "warm_items.csv", "cold_items.csv", "cold_cases.jsonl"


@dataclass(frozen=True)
class ColdCase:
    """One interaction with a cold item, indices into the full (warm, then cold) catalog."""

    user: int  # internal user index
    history: np.ndarray  # the user's warm items before the target, oldest first
    target: int  # a cold item: index >= the number of warm items
    seen: np.ndarray  # every item the user interacted with before the target (warm and cold)


@dataclass(frozen=True)
class ColdSplit:
    """The data of the protocol: what models train on and the cases they are scored on."""

    warm: Catalog  # the warm items, in catalog order: what models are built over
    full: Catalog  # the warm items, then the cold ones (cold item c has index len(warm) + c)
    users: tuple[UserSplit, ...]  # leave-last-out splits of each user's warm sequence
    cases: tuple[ColdCase, ...]

    @property
    def num_warm(self) -> int:
        return len(self.warm)

    @property
    def num_cold(self) -> int:
        return len(self.full) - len(self.warm)


def cold_split(dataset: Dataset, *, fraction: float = 0.1, seed: int = 0) -> ColdSplit:
    """Make `fraction` of the items cold (chosen with `seed`) and split the rest as usual."""
    from common.data import Catalog, Interactions, split_by_user

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"The cold fraction must lie in (0, 1), got {fraction}.")
    catalog, inter = dataset.catalog, dataset.interactions
    n = len(catalog)
    num_cold = max(1, round(fraction * n))
    is_cold = np.zeros(n, dtype=bool)
    is_cold[np.random.default_rng(seed).choice(n, size=num_cold, replace=False)] = True
    # new index: warm items first, in catalog order, then the cold ones, in catalog order
    order = np.r_[np.flatnonzero(~is_cold), np.flatnonzero(is_cold)]
    new_index = np.empty(n, dtype=np.int64)
    new_index[order] = np.arange(n)
    full = Catalog(
        tuple(catalog.item_ids[i] for i in order), tuple(catalog.texts[i] for i in order)
    )
    num_warm = n - num_cold
    warm = Catalog(full.item_ids[:num_warm], full.texts[:num_warm])

    items = new_index[inter.item]
    keep = ~is_cold[inter.item]
    warm_inter = Interactions(
        user=inter.user[keep],
        item=items[keep],
        timestamp=inter.timestamp[keep],
        user_ids=inter.user_ids,
    )
    # each user's whole sequence in the split's order: (user, timestamp, row in the file)
    rows = np.arange(len(inter))
    chrono = np.lexsort((rows, inter.timestamp, inter.user))
    cases = []
    for user_rows in np.split(chrono, np.flatnonzero(np.diff(inter.user[chrono])) + 1):
        sequence = items[user_rows]
        cold_at = np.flatnonzero(sequence >= num_warm)
        for position in cold_at:
            before = sequence[:position]
            cases.append(
                ColdCase(
                    user=int(inter.user[user_rows[0]]),
                    history=before[before < num_warm],
                    target=int(sequence[position]),
                    seen=np.unique(before),
                )
            )
    return ColdSplit(warm, full, tuple(split_by_user(warm_inter)), tuple(cases))


class LeftOut:
    """(cases, items) scores read one case at a time: `counts`, less one at the case's own
    `targets[i]`, without holding the whole matrix."""

    def __init__(self, counts: np.ndarray, targets: np.ndarray):
        self.counts, self.targets = counts, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> np.ndarray:
        row = self.counts.copy()
        row[self.targets[i]] -= 1.0
        return row


CaseScores = np.ndarray | LeftOut  # what case_metrics reads: row i scores case i


def expected_metrics(greater: np.ndarray, ties: np.ndarray, k: int = K) -> dict[str, np.ndarray]:
    """Per case, HR@k / NDCG@k / MRR@k in expectation over a uniform order of the tied items.

    `greater`: candidates scoring above the target; `ties`: the others scoring exactly as it.
    The target's rank is then uniform on greater + 1 .. greater + ties + 1.
    """
    ranks = np.arange(1, k + 1, dtype=np.float64)  # only ranks <= k count
    gains = {"hr": np.ones(k), "ndcg": 1.0 / np.log2(ranks + 1.0), "mrr": 1.0 / ranks}
    # cum[r]: the gain of ranks 1..r together, so ranks a + 1 .. b gain cum[b] - cum[a]
    cum = {name: np.r_[0.0, np.cumsum(g)] for name, g in gains.items()}
    first = np.minimum(greater, k)  # ranks greater + 1 .. last, cut at k
    last = np.minimum(greater + ties + 1, k)
    width = ties + 1.0
    return {f"{name}@{k}": (c[last] - c[first]) / width for name, c in cum.items()}


def case_metrics(scores: CaseScores, split: ColdSplit, scope: str) -> dict[str, np.ndarray]:
    """Per-case metrics of (cases, full catalog) scores, ranked among `scope`'s candidates;
    `scores[i]` is case i's row over the full catalog."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}.")
    greater = np.zeros(len(split.cases), dtype=np.int64)
    ties = np.zeros(len(split.cases), dtype=np.int64)
    start = split.num_warm if scope == "cold" else 0
    for i, case in enumerate(split.cases):
        candidate = np.zeros(len(split.full), dtype=bool)
        candidate[start:] = True
        candidate[case.seen] = False
        candidate[case.target] = False
        row = np.asarray(scores[i])
        others = row[candidate]
        greater[i] = np.count_nonzero(others > row[case.target])
        ties[i] = np.count_nonzero(others == row[case.target])
    return expected_metrics(greater, ties)


def summary(per_case: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(values.mean()) for name, values in per_case.items()}


def reference_rows(split: ColdSplit) -> list[dict]:
    """Random ranking (every candidate tied), popularity (warm training counts; every cold item
    has none, so among the cold items popularity is random) and popularity-oracle.

    popularity-oracle is not a model: it reads the cold cases themselves. A cold item counts
    its cold interactions (the case's own left out), a warm one its training interactions: the
    ranking that knowing each new item's coming popularity exactly would give, to read a goal
    for the cold items against."""
    counts = np.zeros(len(split.full))
    for u in split.users:
        np.add.at(counts, u.train, 1.0)
    targets = np.array([c.target for c in split.cases], dtype=np.int64)
    shape = (len(split.cases), len(split.full))  # one row, read by every case: no copies
    references = {
        "random": np.broadcast_to(np.zeros(len(split.full)), shape),
        "popularity": np.broadcast_to(counts, shape),
        "popularity-oracle": LeftOut(counts + np.bincount(targets, minlength=shape[1]), targets),
    }
    return [
        {"name": name, "seeds": [], **scoped(scores, split)} for name, scores in references.items()
    ]


def scoped(scores: CaseScores, split: ColdSplit) -> dict[str, dict[str, float]]:
    return {scope: summary(case_metrics(scores, split, scope)) for scope in SCOPES}


def model_scores(model: Recommender, cfg: Config, items: ItemStates, split: ColdSplit):
    """Scores of every full-catalog item for every case: (cases, items), float64."""
    from common.records import left_pad
    from common.train import item_vectors, user_vectors

    vectors = item_vectors(model, items)  # (N, D): cold items past the id rows: text alone
    out = []
    for start in range(0, len(split.cases), 512):
        chunk = split.cases[start : start + 512]
        histories = np.stack([left_pad(c.history, cfg.history_len) for c in chunk])
        # item_vectors and user_vectors run without autograd: the product needs no no_grad
        out.append((user_vectors(model, vectors, histories) @ vectors.T).double().numpy())
    return np.concatenate(out)


def standardized(scores: np.ndarray) -> np.ndarray:
    """Each case's scores over the full catalog to mean 0 and standard deviation 1."""
    std = scores.std(axis=1, keepdims=True)
    return (scores - scores.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)


def write_split(split: ColdSplit, directory: Path) -> None:
    """The warm catalog (what the models know), the cold items (what a device adds later) and
    the cases by external ids, as the freshness harness reads them."""
    import csv

    from common.readers import load_catalog

    directory.mkdir(parents=True, exist_ok=True)
    cold = range(split.num_warm, len(split.full))
    for name, positions in ((WARM_ITEMS, range(split.num_warm)), (COLD_ITEMS, cold)):
        with open(directory / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["item_id", "text"])
            writer.writerows([split.full.item_ids[i], split.full.texts[i]] for i in positions)
    if load_catalog(directory / WARM_ITEMS).fingerprint() != split.warm.fingerprint():
        raise ValueError(f"{directory / WARM_ITEMS} does not read back as the warm catalog.")
    ids = split.full.item_ids
    with open(directory / CASES_FILE, "w", encoding="utf-8") as f:
        for c in split.cases:
            case = {
                "user": int(c.user),
                "history": [ids[i] for i in c.history],
                "target": ids[c.target],
                "seen": [ids[i] for i in c.seen],
            }
            f.write(json.dumps(case) + "\n")
