"""The ServerApp stops waiting for a node that left the federation (server/grid.py)."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

from server.grid import LivenessGrid


class SlowGrid:
    """Node 1 answers at once, node 2 never; node 2 goes offline after `leaves_after_s`."""

    def __init__(self, leaves_after_s: float):
        self.start = time.monotonic()
        self.leaves_after_s = leaves_after_s
        self.checks = 0

    def push_messages(self, messages):
        for n, msg in enumerate(messages):
            msg.metadata.message_id = f"m{n}"
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        meta = SimpleNamespace(reply_to_message_id="m0")
        return [SimpleNamespace(metadata=meta)] if "m0" in ids else []

    def get_node_ids(self):
        self.checks += 1
        gone = time.monotonic() - self.start > self.leaves_after_s
        return [1] if gone else [1, 2]


def messages():
    return [
        SimpleNamespace(metadata=SimpleNamespace(message_id="", dst_node_id=node))
        for node in (1, 2)
    ]


def test_a_node_that_left_is_not_waited_for(caplog):
    inner = SlowGrid(leaves_after_s=0.3)
    grid = LivenessGrid(inner, poll_s=0.05, check_every_s=0.1)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        replies = grid.send_and_receive(messages(), timeout=60.0)
    assert time.monotonic() - start < 5.0  # not the round's 60 s
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert grid.left == [2] and "Node 2 left the federation" in caplog.text


def test_an_online_node_is_waited_for_until_the_timeout():
    inner = SlowGrid(leaves_after_s=1e9)
    grid = LivenessGrid(inner, poll_s=0.05, check_every_s=0.1)
    start = time.monotonic()
    replies = grid.send_and_receive(messages(), timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 3.0
    assert len(replies) == 1 and grid.left == [] and inner.checks >= 2
