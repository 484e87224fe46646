"""The server keeps going when a client sends a bad update or declines: rejected and logged."""

import logging
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Metadata, MetricRecord, RecordDict
from flwr.app.message import make_message

from server.strategy import FedRecAdam, FedRecAvg, make_strategy


def arrays(**tensors) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, torch.as_tensor(v)) for k, v in tensors.items()))


def reply(node: int, content: RecordDict):
    meta = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="q",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return make_message(metadata=meta, content=content)


def update(node: int, n: int, **tensors):
    return reply(
        node,
        RecordDict(
            {
                "arrays": arrays(**tensors),
                "metrics": MetricRecord({"num-examples": n, "declined": 0, "train-loss": 1.0}),
            }
        ),
    )


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3, 4, 5, 6]


def configure(s, model):
    """Run configure_train without a Flower run (messages replaced by their node ids)."""
    s._construct_messages = lambda record, node_ids, message_type: node_ids
    return list(s.configure_train(1, model, ConfigRecord(), FakeGrid()))


@pytest.fixture
def strategy():
    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1)
    global_model = arrays(w=np.zeros((2, 3), np.float32), b=np.zeros(3, np.float32))
    configure(s, global_model)
    return s


def test_bad_updates_are_rejected_and_the_good_ones_averaged(strategy, caplog):
    ones, twos = np.ones((2, 3), np.float32), np.full((2, 3), 2.0, np.float32)
    b = np.zeros(3, np.float32)
    replies = [
        update(1, 10, w=ones, b=b),
        update(2, 30, w=twos, b=b),
        update(3, 10, w=np.ones((3, 2), np.float32), b=b),  # wrong shape
        update(4, 10, w=np.full((2, 3), np.nan, np.float32), b=b),  # NaN
        update(5, 10, w=ones),  # missing tensor
        reply(6, RecordDict({"metrics": MetricRecord({"num-examples": 0, "declined": 1})})),
    ]
    with caplog.at_level(logging.INFO):
        agg, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(agg["w"].numpy(), np.full((2, 3), 1.75))  # (10*1 + 30*2) / 40
    stats = strategy.stats[1]
    assert (stats.clients_train, stats.clients_rejected, stats.clients_declined) == (2, 3, 1)
    text = caplog.text
    assert "rejected the update of node 3" in text and "expected float32[2, 3]" in text
    assert "node 4" in text and "NaN" in text
    assert "node 5" in text and "missing ['b']" in text
    assert "node 6 declined" in text


def test_a_round_with_no_usable_update_keeps_the_model(strategy):
    bad = update(1, 10, w=np.ones((3, 2), np.float32), b=np.zeros(3, np.float32))
    assert strategy.aggregate_train(1, [bad]) == (None, None)


def test_fedadam_keeps_float32():
    s = make_strategy("fedadam", server_learning_rate=0.1, min_available_nodes=1, min_train_nodes=1)
    assert isinstance(s, FedRecAdam)
    model = arrays(w=np.zeros(3, np.float32))
    configure(s, model)
    agg, _ = s.aggregate_train(1, [update(1, 5, w=np.ones(3, np.float32))])
    assert agg["w"].numpy().dtype == np.float32 and np.all(agg["w"].numpy() > 0)
    with pytest.raises(ValueError, match="Unknown strategy"):
        make_strategy("fedsgd", server_learning_rate=1.0)
