"""Cohorts drawn as passes over the nodes (client-sampling = "shuffled").

Flower's strategies draw every round's cohort afresh, so over R rounds some nodes train
several times and others not at all; central training instead goes over its data in epochs.
`ShuffledPasses` gives a federation epochs: the connected nodes in a reshuffled order, the
next cohort the next nodes of that order, a new order once all have trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class ShuffledPasses:
    """Cohorts that go over the nodes pass by pass, each pass in a fresh shuffled order.

    `shuffle(nodes)` returns the nodes in a random order (the caller's seeded source). The
    passes form one stream, each cohort the next distinct nodes of it: a cohort that reaches
    the end of a pass goes on into the next one, skipping the nodes it already holds (they
    stay in place for the next cohort). Nodes that disconnect leave the stream; nodes that
    connect join with the next pass.
    """

    def __init__(self, shuffle: Callable[[list[int]], list[int]]):
        self.shuffle = shuffle
        self._order: list[int] = []  # the stream's nodes not yet drawn
        self.passes = 0  # passes begun

    def draw(self, nodes: Sequence[int], size: int) -> list[int]:
        """The next `size` distinct nodes of these (connected) ones, or all if fewer."""
        connected = set(nodes)
        self._order = [n for n in self._order if n in connected]
        cohort: list[int] = []
        i = 0  # the first entry of the stream not yet looked at
        while len(cohort) < min(size, len(connected)):
            if i == len(self._order):
                self._order += [int(n) for n in self.shuffle(list(nodes))]
                self.passes += 1
            if self._order[i] in cohort:
                i += 1
            else:
                cohort.append(self._order.pop(i))
        return cohort
