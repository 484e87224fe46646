"""A Grid that stops waiting for nodes that left the federation.

Flower's `send_and_receive` waits for every reply until the round's timeout. A device that is
revoked mid-round (its node unregistered) never answers, and the SuperLink writes no error
reply for it, so the round held on for the whole `round-timeout-s`. `LivenessGrid` wraps the
grid Flower gives the ServerApp: while replies are pending it asks the SuperLink every
`check_every_s` which nodes are online (Flower's own node list: registered, heartbeating)
and stops waiting for those that are not. The strategy counts them as lost, as it counts a
node that timed out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

POLL_S = 3.0  # between pulls of replies (Flower's own grid pulls every 3 s)
CHECK_EVERY_S = 15.0  # between looks at which nodes are online


class LivenessGrid(Grid):
    """`grid` with a `send_and_receive` that gives up on nodes no longer online."""

    def __init__(self, grid: Grid, *, poll_s: float = POLL_S, check_every_s: float = CHECK_EVERY_S):
        self.grid = grid
        self.poll_s = poll_s
        self.check_every_s = check_every_s
        self.left: list[int] = []  # nodes given up on, over the whole run

    # --- Grid, delegated --------------------------------------------------------------------

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    # --- the one change ---------------------------------------------------------------------

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push the messages, then pull replies until all came, the timeout passed, or every
        node still owing one has left the federation."""
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        pending = set(ids)
        replies: list[Message] = []
        start = time.monotonic()
        end = start + timeout if timeout is not None else float("inf")
        next_check = start + self.check_every_s
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            now = time.monotonic()
            if not pending or now >= end:
                break
            if now >= next_check:
                online = set(self.grid.get_node_ids())
                gone = {i for i in pending if destination.get(i) not in online}
                for message_id in sorted(gone):
                    node = destination.get(message_id)
                    self.left.append(node)
                    log.warning(
                        "Node %s left the federation (revoked or disconnected) %.0f s into the "
                        "round; not waiting for its reply.",
                        node,
                        now - start,
                    )
                pending -= gone
                next_check = now + self.check_every_s
            if pending:
                time.sleep(min(self.poll_s, max(0.0, end - time.monotonic())))
        return replies
