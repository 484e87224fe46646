"""The data's types (catalog, interactions, a user's split), the chronological per-user split
and the partitions of users into clients. Reading them from files: common/readers.py.

User indices follow the order of first appearance in the interactions file; item indices follow
the order of the items file (common/readers.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

PARTITION_SCHEMES = ("user", "iid")


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file and 1-based line."""


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """The public item catalog: external item id -> text; position = internal item index."""

    item_ids: tuple[str, ...]
    texts: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)
    _fingerprint: str | None = field(
        init=False, default=None, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "item_ids", tuple(str(i) for i in self.item_ids))
        object.__setattr__(self, "texts", tuple(self.texts))
        if len(self.item_ids) != len(self.texts):
            raise DataError(
                f"A catalog needs one text per item id, got {len(self.item_ids)} ids and "
                f"{len(self.texts)} texts."
            )
        index: dict[str, int] = {}
        for position, (item_id, text) in enumerate(zip(self.item_ids, self.texts, strict=True)):
            if item_id in index:
                raise DataError(f"Item id {item_id!r} appears twice in the catalog.")
            if not text.strip():
                raise DataError(f"Item {item_id!r} has an empty text; every item needs one.")
            index[item_id] = position
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        """Number of items."""
        return len(self.item_ids)

    def index_of(self, item_id: str) -> int:
        """The internal index of an external item id."""
        try:
            return self._index[item_id]
        except KeyError:
            raise KeyError(f"Item id {item_id!r} is not in the catalog.") from None

    def with_items(self, items: Mapping[str, str]) -> Catalog:
        """A catalog with new items (id -> text) appended; an empty text becomes the id."""
        for item_id in items:
            if str(item_id) in self._index:
                raise DataError(f"Item id {item_id!r} is already in the catalog.")
        new_ids = tuple(str(i) for i in items)
        new_texts = tuple(text if text.strip() else str(i) for i, text in items.items())
        return Catalog(self.item_ids + new_ids, self.texts + new_texts)

    def fingerprint(self) -> str:
        """A stable sha256 hex digest of the ids and texts, in order (a cache key)."""
        if self._fingerprint is None:  # computed once: the catalog is immutable
            object.__setattr__(self, "_fingerprint", self._digest())
        return self._fingerprint

    def _digest(self) -> str:
        digest = hashlib.sha256(b"fedrec-catalog-v1")
        for item_id, text in zip(self.item_ids, self.texts, strict=True):
            for part in (item_id, text):
                encoded = part.encode("utf-8")
                # Length prefixes make the encoding unambiguous (no separator can collide).
                digest.update(len(encoded).to_bytes(8, "little"))
                digest.update(encoded)
        return digest.hexdigest()


@dataclass(frozen=True)
class Interactions:
    """Private interactions, one entry per file row, in file order."""

    user: np.ndarray  # (N,) int64 internal user index
    item: np.ndarray  # (N,) int64 internal item index into the Catalog
    timestamp: np.ndarray  # (N,) float64 or int64, exact as read (never float32)
    user_ids: tuple[str, ...]  # external user ids; position = internal user index

    def __post_init__(self) -> None:
        user = np.asarray(self.user)
        item = np.asarray(self.item)
        timestamp = np.asarray(self.timestamp)
        if not (user.ndim == item.ndim == timestamp.ndim == 1):
            raise ValueError("Interactions need one-dimensional user, item and timestamp arrays.")
        if not (len(user) == len(item) == len(timestamp)):
            raise ValueError(
                f"Interactions need arrays of equal length, got user {len(user)}, "
                f"item {len(item)} and timestamp {len(timestamp)}."
            )
        if timestamp.dtype.kind in "iu":
            timestamp = timestamp.astype(np.int64, copy=False)
        elif timestamp.dtype != np.float64:
            raise ValueError(
                f"Timestamps must be float64 or integers, got {timestamp.dtype}: float32 "
                "rounds Unix seconds and reorders interactions."
            )
        for name, array in (("user", user), ("item", item)):
            if array.dtype.kind not in "iu" and array.size:
                raise ValueError(f"Interactions.{name} must hold integers, got {array.dtype}.")
        object.__setattr__(self, "user", user.astype(np.int64, copy=False))
        object.__setattr__(self, "item", item.astype(np.int64, copy=False))
        object.__setattr__(self, "timestamp", timestamp)
        object.__setattr__(self, "user_ids", tuple(str(u) for u in self.user_ids))
        if len(user) and (user.min() < 0 or user.max() >= len(self.user_ids)):
            raise ValueError(
                f"User indices must lie in [0, {len(self.user_ids)}), the range of user_ids."
            )

    def __len__(self) -> int:
        """Number of interactions."""
        return len(self.user)

    @property
    def num_users(self) -> int:
        """Number of users (including any without interactions)."""
        return len(self.user_ids)


@dataclass(frozen=True)
class Dataset:
    """A catalog with the interactions that refer to it."""

    catalog: Catalog
    interactions: Interactions
    name: str

    def __post_init__(self) -> None:
        item = self.interactions.item
        if len(item) and (item.min() < 0 or item.max() >= len(self.catalog)):
            raise ValueError(
                f"Interaction item indices must lie in [0, {len(self.catalog)}), the catalog size."
            )


@dataclass(frozen=True)
class UserSplit:
    """One user's chronological split; see :func:`split_by_user` for the rule."""

    user_id: str
    train: np.ndarray  # (n_train,) int64 item indices, oldest first
    valid: int  # item index, -1 when the user has fewer than 3 interactions
    test: int  # item index, -1 when the user has fewer than 2 interactions


# --------------------------------------------------------------------------------------------
# The evaluation protocol
# --------------------------------------------------------------------------------------------


def split_by_user(interactions: Interactions) -> list[UserSplit]:
    """Leave-last-out split per user, ordered by (timestamp, row position in the file).

    Each user's interactions are ordered by timestamp; equal timestamps keep their order in the
    file (the earlier row comes first), so the tie-break is exact and documented. Then, for a
    user with n interactions:

    - n >= 3: test = last, valid = second-to-last, train = the n - 2 before;
    - n == 2: test = last, train = the first, valid = -1;
    - n == 1: train = that one, valid = test = -1 (nothing to predict it from);
    - n == 0: train empty, valid = test = -1.

    The returned list is indexed by internal user index.
    """
    num_users = interactions.num_users
    rows = np.arange(len(interactions))
    # lexsort: the last key is the primary one -> (user, timestamp, row).
    order = np.lexsort((rows, interactions.timestamp, interactions.user))
    items = interactions.item[order]
    counts = np.bincount(interactions.user, minlength=num_users)
    ends = np.cumsum(counts)
    splits = []
    for user, (end, count) in enumerate(zip(ends.tolist(), counts.tolist(), strict=True)):
        history = items[end - count : end]
        if count >= 3:
            train, valid, test = history[:-2], int(history[-2]), int(history[-1])
        elif count == 2:
            train, valid, test = history[:1], -1, int(history[1])
        else:
            train, valid, test = history, -1, -1
        splits.append(UserSplit(interactions.user_ids[user], train, valid, test))
    _warn_unevaluated(counts)
    return splits


def _warn_unevaluated(counts: np.ndarray) -> None:
    """Count, in a warning, the users too short to be evaluated: they only train."""
    no_test = int(np.sum(counts < 2))
    no_valid = int(np.sum(counts == 2))
    if no_test or no_valid:
        log.warning(
            "%d of %d user(s) have fewer than 2 interactions and are skipped from evaluation "
            "(no test or validation item); %d more have 2 and are skipped from validation. "
            "They still train.",
            no_test,
            len(counts),
            no_valid,
        )


def partition_users(
    num_users: int, *, scheme: str, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """Group user indices into partitions (clients); each partition is a sorted int64 array.

    ``scheme="user"``: one user per partition, in user order (``num_partitions`` is ignored).
    ``scheme="iid"``: users shuffled with ``seed`` and split into ``num_partitions`` groups whose
    sizes differ by at most one.
    """
    if num_users < 0:
        raise ValueError(f"num_users must be 0 or more, got {num_users}.")
    if scheme == "user":
        return [np.array([user], dtype=np.int64) for user in range(num_users)]
    if scheme == "iid":
        if num_partitions < 1:
            raise ValueError(f"partition 'iid' needs num_partitions >= 1, got {num_partitions}.")
        if num_partitions > num_users:
            raise ValueError(
                f"partition 'iid' cannot deal {num_users} users into {num_partitions} "
                "partitions without leaving some empty; use fewer partitions."
            )
        shuffled = np.random.default_rng(seed).permutation(num_users).astype(np.int64)
        return [np.sort(group) for group in np.array_split(shuffled, num_partitions)]
    raise ValueError(f"Unknown partition scheme {scheme!r}; expected one of {PARTITION_SCHEMES}.")
