"""A round's replies: what the strategy counts for the metrics file, why it rejects one, and
where it came from."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

# Keys of the client's reply MetricRecord (see client/client_app.py).
NUM_EXAMPLES = "num-examples"
DECLINED = "declined"
TRAIN_LOSS = "train-loss"  # absent under DP (NaN here then: the round reports no loss)
# Where a client's update time went (deployment: a fresh process per message)
CLIENT_TIMES = ("startup-s", "cache-load-s", "model-load-s", "train-s", "reply-s")


@dataclass
class RoundStats:
    """What one round of training looked like, for the metrics file."""

    started: float = field(default_factory=time.perf_counter)
    clients_sampled: int = 0
    clients_train: int = 0
    clients_declined: int = 0
    clients_rejected: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # why -> count (REJECTIONS)
    clients_clipped: int = 0  # updates scaled down to the round's norm limit
    clients_failed: int = 0
    train_loss: float | None = None
    noise_std: float | None = None  # DP-FedAvg: of the Gaussian noise on the mean update
    server_lr: float | None = None  # the server optimizer's learning rate this round
    update_seconds: list[float] = field(default_factory=list)
    client_seconds: dict[str, list[float]] = field(default_factory=dict)  # CLIENT_TIMES
    failed_nodes: list[int] = field(default_factory=list)
    client_peak_rss_mb: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    evaluate: dict[str, float] = field(default_factory=dict)


# Why a reply was rejected: the kinds counted in a round's row (rejected_<kind>)
MALFORMED = "malformed"  # names, shapes, dtypes or counts not what was sent
NON_FINITE = "non_finite"  # NaN or infinite values
OVER_NORM = "over_norm"  # norm over update-norm-limit x the round's median (action reject)
REJECTIONS = (MALFORMED, NON_FINITE, OVER_NORM)


class Rejected(Exception):
    """A reply that cannot be averaged: its kind (REJECTIONS) and why."""

    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind, self.why = kind, why


def update_norm(update: dict[str, np.ndarray]) -> float:
    """L2 norm over all tensors, in float64 (float32 squares of 1e20 overflow)."""
    return float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in update.values())))


def destinations(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of messages the grid has sent (it sets their ids)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages}


def reply_node(reply: Message, sent: dict[str, int]) -> int:
    """The node a reply is about. An error reply that the SuperLink wrote for a node that
    stopped answering comes from the SuperLink itself, so it is traced back to the node the
    original message went to."""
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def ask_nodes(
    grid: Grid, nodes: Iterable[int], content: RecordDict, message_type: str, timeout_s: float
) -> dict[int, Message]:
    """Send `content` to each node (a message of `message_type` that expires with the
    timeout) and return the replies that came within it, by node (errors included)."""
    messages = [
        Message(
            RecordDict(dict(content.items())),
            dst_node_id=node,
            message_type=message_type,
            ttl=timeout_s,
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    sent = destinations(messages)  # the grid has set the messages' ids
    return {reply_node(reply, sent): reply for reply in replies}


def array_bytes(arrays: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's tensor data."""
    return int(sum(len(a.data) for a in arrays.values()))
