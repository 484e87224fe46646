"""How cohorts are drawn: from the nodes in an order the seed can rely on, and as passes.

Flower gives simulated nodes fresh random ids every run and lists them as a set, so a cohort
drawn with a seeded `random` from Flower's list trains different users in every run of the
same seed. `node_ranks` asks every simulated node for its partition id once, before round 1;
drawn from the nodes `ranked` by it, the seed fixes which users train in every round.

Flower's strategies draw every round's cohort afresh, so over R rounds some nodes train
several times and others not at all; central training instead goes over its data in epochs.
`ShuffledPasses` (client-sampling = "shuffled") gives a federation epochs: the connected nodes
in a reshuffled order, the next cohort the next nodes of that order, a new order once all have
trained.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from flwr.app import RecordDict
from flwr.serverapp import Grid

from server.replies import ask_nodes

log = logging.getLogger(__name__)

CENSUS = "query.census"  # answered by client/client_app.py
PARTITION_ID = "partition-id"


def node_ranks(grid: Grid, *, timeout_s: float) -> dict[int, int]:
    """Node id -> partition id of every connected simulated node that answers in time."""
    nodes = list(grid.get_node_ids())
    ranks = {}
    for node, reply in ask_nodes(grid, nodes, RecordDict(), CENSUS, timeout_s).items():
        if reply.has_error() or "metrics" not in reply.content:
            continue
        partition = reply.content["metrics"].get(PARTITION_ID)
        if isinstance(partition, int) and partition >= 0:
            ranks[node] = partition
    log.info("Census: %d of %d nodes ranked by partition id", len(ranks), len(nodes))
    if len(ranks) < len(nodes):
        log.warning(
            "%d of %d nodes gave no partition id; they are drawn after the others, by node id",
            len(nodes) - len(ranks),
            len(nodes),
        )
    return ranks


def ranked(nodes: Iterable[int], ranks: Mapping[int, int]) -> list[int]:
    """The nodes in an order that does not depend on their ids: by rank, then the unranked
    ones by id."""
    return sorted(nodes, key=lambda node: (0, ranks[node]) if node in ranks else (1, node))


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
