"""How cohorts are drawn: from the nodes ranked by partition, so that the seed fixes them
(Flower gives simulated nodes random ids every run), and as passes over the nodes
(client-sampling = "shuffled"), as epochs over a dataset."""

import random
from collections import Counter

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from client.client_app import create_app as create_client_app
from common.config import Config
from common.rounds import read_rows
from server.sampling import ShuffledPasses, node_ranks, ranked
from server.server_app import run_federation
from server.strategy import FedRecAvg
from simulations.inprocess import InProcessGrid
from tests.test_strategy import FakeGrid, arrays, sent
from tests.tiny import tiny_cfg


class RandomIdGrid(InProcessGrid):
    """In-process nodes under fresh random ids, listed in no set order, as Flower's simulation
    registers them; notes the partitions of every round's training messages."""

    def __init__(self, *args, id_seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        rng = random.Random(id_seed)
        contexts = list(self.contexts.values())
        rng.shuffle(contexts)
        self.contexts = {}
        for context in contexts:
            context.node_id = rng.getrandbits(63)
            self.contexts[context.node_id] = context
        self.trained: list[list[int]] = []
        self.id_seed = id_seed

    def push_messages(self, messages):
        messages = list(messages)
        for _ in range(self.id_seed):  # as Flower's runtime may: other draws from `random`
            random.random()
        partitions = [
            self.contexts[m.metadata.dst_node_id].node_config["partition-id"]
            for m in messages
            if m.metadata.message_type == "train"
        ]
        if partitions:
            self.trained.append(sorted(partitions))
        return super().push_messages(messages)


def test_the_census_gives_each_simulated_node_its_partition_and_a_device_declines(tmp_path):
    grid = RandomIdGrid(create_client_app(), num_nodes=5, id_seed=1)
    device = next(iter(grid.contexts))
    del grid.contexts[device].node_config["partition-id"]  # a real device has none
    ranks = node_ranks(grid, timeout_s=30)
    expected = {n: c.node_config["partition-id"] for n, c in grid.contexts.items() if n != device}
    assert ranks == expected and len(ranks) == 4
    assert ranked(grid.get_node_ids(), ranks)[-1] == device  # the unranked one last
    assert [ranks[n] for n in ranked(grid.get_node_ids(), ranks)[:-1]] == sorted(ranks.values())


def test_a_seed_trains_the_same_users_every_round_whatever_ids_flower_gives_the_nodes(
    tmp_path, tiny_world
):
    """Two runs of one seed whose nodes got different random ids train the same partitions in
    every round, and so repeat; Flower's own draw over its list of ids does not (the check
    below)."""
    cfg = tiny_cfg(tmp_path, *tiny_world, partition="user", fraction_train=0.25)
    grids = [RandomIdGrid(create_client_app(cfg), num_nodes=24, id_seed=s) for s in (1, 2)]
    for i, grid in enumerate(grids):
        run_federation(grid, cfg.replace(output_dir=str(tmp_path / f"run-{i}")))
    assert len(grids[0].trained) == cfg.num_server_rounds
    assert all(len(cohort) == 6 for cohort in grids[0].trained)
    assert grids[0].trained == grids[1].trained
    losses = [
        [r["train_loss"] for r in read_rows(tmp_path / f"run-{i}" / "metrics.jsonl") if r["round"]]
        for i in (0, 1)
    ]
    assert losses[0] == losses[1]  # the same users, so the same run

    def flowers_draw(grid: RandomIdGrid) -> list[int]:
        random.seed(cfg.seed)
        nodes = random.sample(list(grid.get_node_ids()), 6)
        return sorted(grid.contexts[n].node_config["partition-id"] for n in nodes)

    assert flowers_draw(grids[0]) != flowers_draw(grids[1])


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
            cohort_seed=7,
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
