"""client-sampling = "shuffled": cohorts as passes over the nodes, as epochs over a dataset."""

import random
from collections import Counter

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from common.config import Config
from server.sampling import ShuffledPasses
from server.strategy import FedRecAvg
from tests.test_strategy import FakeGrid, arrays, sent


def test_every_node_trains_once_a_pass_and_a_cohort_never_holds_a_node_twice():
    """7 nodes, cohorts of 3: cohorts straddle passes, yet over 21 draws no node trains more
    than once more than any other (fresh draws of 21 would spread them wider)."""
    passes = ShuffledPasses(lambda nodes: random.Random(len(nodes)).sample(nodes, len(nodes)))
    nodes = list(range(7))
    cohorts = [passes.draw(nodes, 3) for _ in range(7)]  # 21 draws: 3 passes
    assert all(len(set(c)) == 3 for c in cohorts)
    counts = Counter(n for c in cohorts for n in c)
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 7
    assert passes.passes in (3, 4)


def test_a_node_that_leaves_is_not_drawn_and_one_that_joins_waits_for_the_next_pass():
    passes = ShuffledPasses(lambda nodes: sorted(nodes))
    assert passes.draw([1, 2, 3, 4], 2) == [1, 2]
    assert passes.draw([1, 2, 4, 5], 1) == [4]  # 3 left; 5 joined after the pass began
    assert passes.draw([1, 2, 4, 5], 2) == [1, 2]  # a new pass, now with 5
    assert passes.draw([1, 2, 4, 5], 9) == [4, 5, 1, 2]  # on into the next pass, all connected


def test_shuffled_cohorts_in_the_strategy_cover_every_node_each_pass_and_repeat(monkeypatch):
    """6 nodes, 2 a round: rounds 1-3 and 4-6 each train all 6; fresh draws (Flower's) of 6
    rounds leave some node out with this seed. Seeded like the ServerApp, a run repeats."""
    monkeypatch.setattr(FedAvg, "_construct_messages", lambda self, rec, ids, mt: sent(ids, rec))
    model = arrays(w=np.zeros(3, np.float32))

    def cohorts(sampling: str) -> list[list[int]]:
        random.seed(7)
        s = FedRecAvg(
            fraction_train=2 / 6,
            min_train_nodes=1,
            min_available_nodes=1,
            client_sampling=sampling,
        )
        return [
            [
                m.metadata.dst_node_id
                for m in s.configure_train(r, model, ConfigRecord(), FakeGrid())
            ]
            for r in range(1, 7)
        ]

    shuffled = cohorts("shuffled")
    assert all(len(c) == 2 for c in shuffled)
    assert sorted(sum(shuffled[:3], [])) == sorted(sum(shuffled[3:], [])) == list(range(1, 7))
    assert cohorts("shuffled") == shuffled
    fresh = cohorts("random")
    assert len(set(sum(fresh[:3], []))) < 6 or len(set(sum(fresh[3:], []))) < 6


def test_dp_fedavg_keeps_poisson_sampling():
    with pytest.raises(ValueError, match="client-sampling = 'random'"):
        Config(dp_mode="fedavg", client_sampling="shuffled", fraction_evaluate=0.0)
    with pytest.raises(ValueError, match="client-sampling must be one of random, shuffled"):
        Config(client_sampling="epochs")
