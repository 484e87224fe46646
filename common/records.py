"""Training records: one user's interaction sequence, cut into windows of the history length.

A window holds up to L inputs and, at each input position, the item that came next; the causal
user tower predicts every position's target in one pass (SASRec-style). A user's sequence is
cut from its end, so the most recent targets see the longest histories, and every interaction
after the user's first is a target exactly once:

    sequence  a b c d e f g h    (L = 3)
    window 0  . . a  ->  . . b   (left-padded with PAD)
    window 1  b c d  ->  c d e
    window 2  e f g  ->  f g h   (targets b..h, each once)

With a stride S < L, windows overlap: each still ends S targets after the previous one, but
reaches back L items, and only its last S positions carry targets (the others are context).
Every target then sees at least L - S items of history, not as few as one, at about L / S times
the cost:

    sequence  a b c d e f g h    (L = 4, S = 2)
    window 0  . . . a  ->  . . . b
    window 1  . a b c  ->  . . c d
    window 2  b c d e  ->  . . e f
    window 3  d e f g  ->  . . g h

A record is one user: all of that user's windows (`Records.user` says whose).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD = -1  # padding id in inputs and targets


@dataclass(frozen=True)
class Records:
    """Windows of users' sequences, with each window's owner."""

    inputs: np.ndarray  # (W, L) int64 item ids, left-padded with PAD
    targets: np.ndarray  # (W, L) int64 next item at each input position, PAD where none
    user: np.ndarray  # (W,) int64 index of the sequence (user) each window comes from

    def __len__(self) -> int:
        """Number of windows."""
        return int(self.inputs.shape[0])

    @property
    def num_targets(self) -> int:
        """Interactions predicted over all windows."""
        return int((self.targets != PAD).sum())

    @property
    def num_users(self) -> int:
        """Users with at least one window."""
        return int(np.unique(self.user).size)

    def select(self, windows: np.ndarray) -> Records:
        """The given windows (indices into this set), in that order."""
        return Records(self.inputs[windows], self.targets[windows], self.user[windows])


def build_records(sequences: list[np.ndarray], *, history_len: int, stride: int = 0) -> Records:
    """Windows of every sequence (oldest item first); sequences of 0 or 1 items give none.

    `stride`: targets per window (0 = `history_len`: windows do not overlap).
    """
    stride = stride or history_len
    if not 1 <= stride <= history_len:
        raise ValueError(f"window stride must lie in [1, {history_len}], got {stride}.")
    inputs, targets, owners = [], [], []
    for user, seq in enumerate(sequences):
        seq = np.asarray(seq, dtype=np.int64)
        for end in range(len(seq) - 1, 0, -stride):  # end: index of the window's last target
            start = max(end - history_len, 0)  # index of the window's first input
            window_in = np.full(history_len, PAD, dtype=np.int64)
            window_out = np.full(history_len, PAD, dtype=np.int64)
            n = end - start
            window_in[-n:] = seq[start:end]
            window_out[-n:] = seq[start + 1 : end + 1]
            window_out[: history_len - min(stride, n)] = PAD  # earlier targets: other windows
            inputs.append(window_in)
            targets.append(window_out)
            owners.append(user)
    if not inputs:
        empty = np.zeros((0, history_len), np.int64)
        return Records(empty, empty.copy(), np.zeros(0, np.int64))
    # oldest window first within a user (built newest first above)
    order = np.lexsort((-np.arange(len(owners)), np.asarray(owners)))
    return Records(
        np.stack(inputs)[order], np.stack(targets)[order], np.asarray(owners, np.int64)[order]
    )


def left_pad(items: np.ndarray, length: int) -> np.ndarray:
    """The last `length` items, left-padded with PAD: (len,) -> (length,)."""
    out = np.full(length, PAD, dtype=np.int64)
    tail = np.asarray(items, dtype=np.int64)[-length:]
    if len(tail):
        out[-len(tail) :] = tail
    return out
