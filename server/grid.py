"""A Grid that collects a round's replies as they arrive.

Flower 1.42's `GrpcGrid.send_and_receive` (the Grid a ServerApp gets from a SuperLink, in
deployment and in simulation alike) pulls replies and then sleeps 3 s before it looks again,
so every round waits on average 1.5 s after its last reply, and a round of a few fast clients
takes at least 3 s. `PromptGrid` wraps any Grid and does the same push and pull with a short,
growing pause (`first_pause_s`, doubling up to `max_pause_s`); everything else is the wrapped
Grid's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_PAUSE_S = 0.02
MAX_PAUSE_S = 0.25


class PromptGrid(Grid):
    """`grid` with a `send_and_receive` that returns soon after the last reply arrives."""

    def __init__(
        self, grid: Grid, *, first_pause_s: float = FIRST_PAUSE_S, max_pause_s: float = MAX_PAUSE_S
    ):
        self.grid = grid
        self.first_pause_s = first_pause_s
        self.max_pause_s = max_pause_s

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push `messages`, then pull replies until each has one or `timeout` s have passed
        (None: no limit), as Flower's Grid does."""
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        pause = self.first_pause_s
        while waiting:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(pause if end is None else max(0.0, min(pause, end - time.monotonic())))
            pause = min(pause * 2, self.max_pause_s)
        return replies
