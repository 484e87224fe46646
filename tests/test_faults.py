"""Faulty and malicious simulated clients (client/faults.py): rounds complete with the others,
and the server counts, rejects or bounds what it got."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.faults import faulty_partitions, make_fault_mod
from common.config import Config
from common.wire import decode_update, encode_update, encode_weights
from simulations.inprocess import run_inprocess
from tests.tiny import tiny_cfg

NUM_CLIENTS = 4


@pytest.fixture(autouse=True)
def server_identity():
    """Messages are made by a ServerApp process; this one plays it (as InProcessGrid does)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def context(partition: int | None, **run) -> Context:
    node = {} if partition is None else {"partition-id": partition, "num-partitions": 10}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run)


def train_message(weights: dict) -> Message:
    record = RecordDict({"arrays": encode_weights(weights, "float32")})
    return Message(record, dst_node_id=7, message_type=MessageType.TRAIN)


def honest_reply(msg: Message, ctx: Context) -> Message:
    """Trains by adding 0.5 to every weight."""
    received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    trained = {k: v + 0.5 for k, v in received.items()}
    record = RecordDict(
        {
            "arrays": encode_update(trained, received, "float32"),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    return Message(record, reply_to=msg)


WEIGHTS = {"w": np.zeros((3, 2), np.float32)}
BASE = Config(wire_dtype="float32", seed=5)
BAD = sorted(faulty_partitions(10, 0.3, 5))
GOOD = sorted(set(range(10)) - set(BAD))


def test_the_faulty_share_is_a_fixed_set_of_partitions():
    assert len(BAD) == 3 and faulty_partitions(10, 0.3, 5) == frozenset(BAD)
    assert faulty_partitions(10, 0.3, 6) != faulty_partitions(10, 0.3, 5)


@pytest.mark.parametrize(("kind", "factor"), [("scale", 1000.0), ("sign-flip", -1000.0)])
def test_scaled_and_flipped_updates(kind, factor):
    mod = make_fault_mod(BASE)
    run = {"fault-share": 0.3, "fault-kind": kind, "fault-scale": 1000.0}
    bad = mod(train_message(WEIGHTS), context(BAD[0], **run), honest_reply)
    good = mod(train_message(WEIGHTS), context(GOOD[0], **run), honest_reply)
    shapes = {"w": (3, 2)}
    np.testing.assert_allclose(decode_update(bad.content["arrays"], shapes)["w"], 0.5 * factor)
    np.testing.assert_allclose(decode_update(good.content["arrays"], shapes)["w"], 0.5)


def test_nothing_happens_on_a_real_device_or_when_off():
    mod = make_fault_mod(BASE)
    run = {"fault-share": 1.0, "fault-kind": "raise"}
    reply = mod(train_message(WEIGHTS), context(None, **run), honest_reply)  # no partition id
    assert not reply.has_error()
    reply = mod(train_message(WEIGHTS), context(BAD[0]), honest_reply)  # fault-share 0
    assert not reply.has_error()
    with pytest.raises(RuntimeError, match="injected fault"):
        mod(train_message(WEIGHTS), context(BAD[0], **run), honest_reply)


@pytest.mark.parametrize("wire", ["float32", "half", "int8"])
def test_garbage_is_rejected_by_the_server_whatever_the_wire(wire):
    from server.strategy import FedRecAvg
    from tests.test_strategy import arrays, configure, reply

    mod = make_fault_mod(BASE.replace(wire_dtype=wire))
    run = {"fault-share": 1.0, "fault-kind": "garbage"}

    def reply_in(msg, ctx):
        received = {"w": np.zeros((3, 2), np.float32)}
        trained = {"w": received["w"] + 0.5}
        record = RecordDict(
            {
                "arrays": encode_update(trained, received, wire),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        return Message(record, reply_to=msg)

    s = FedRecAvg(min_available_nodes=1, min_train_nodes=1, wire_dtype=wire)
    configure(s, arrays(w=np.zeros((3, 2), np.float32)))
    replies = [  # partition 0 sends NaN, partition 1 a tensor of the wrong shape
        reply(node, mod(train_message(WEIGHTS), context(partition, **run), reply_in).content)
        for partition, node in ((0, 1), (1, 2))
    ]
    assert s.aggregate_train(1, replies) == (None, None)
    assert s.stats[1].rejected == {"non_finite": 1, "malformed": 1}


def run_with_faults(tmp_path, world, **faults) -> list[dict]:
    cfg = tiny_cfg(tmp_path, *world, fraction_evaluate=0.0, fault_share=0.25, **faults)
    run_inprocess(cfg, num_nodes=NUM_CLIENTS)
    return [
        json.loads(line) for line in (cfg.output_path / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize(
    ("kind", "counted"),
    [
        ("raise", "clients_failed"),
        ("hang", "clients_failed"),
        ("garbage", "clients_rejected"),
        ("scale", "clients_rejected"),  # over 3 x the median norm (the default bound)
    ],
)
def test_a_federation_completes_with_a_faulty_client(tmp_path, tiny_world, kind, counted):
    extra = {"round_timeout_s": 3.0} if kind == "hang" else {}
    if kind == "scale":
        extra = {"fault_scale": 1000.0}
    rows = run_with_faults(tmp_path, tiny_world, fault_kind=kind, **extra)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row[counted] == 1, row
        assert row["clients_train"] == NUM_CLIENTS - 1
    assert np.isfinite(rows[-1]["val_ndcg@10"])
