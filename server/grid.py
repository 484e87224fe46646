"""A Grid that collects a round's replies as they arrive.

Flower 1.42's `GrpcGrid.send_and_receive` (the Grid a ServerApp gets from a SuperLink, in
deployment and in simulation alike) pulls replies and then sleeps 3 s before it looks again,
so every round waits on average 1.5 s after its last reply, and a round of a few fast clients
takes at least 3 s. `PromptGrid` wraps any Grid and does the same push and pull with a short,
growing pause (`first_pause_s`, doubling up to `max_pause_s`); everything else is the wrapped
Grid's. The pause stops growing at `reply-poll-s`, 50 ms by default: a pull is one small
local call, and a round of a few one-step clients lasts a few tenths of a second, so a longer
pause is idle time added to every round (5 clients a round: 0.32 s a round against 0.37 s with
a 250 ms cap, simulations/results/grid_pause.md).

With `max_in_flight` W > 0 it keeps at most W messages out at once and pushes the next as a
reply comes. That is for simulation: Flower's simulation engine asks its link state for each
node's next message every 0.1 s, and each ask checks every message that waits for a reply, so
with 943 nodes its cost grows with the messages out (with a round's 94 out at once it took
about as much CPU as all the clients together). Its few workers take only a few messages at a
time anyway. In deployment every device works at once: leave it at 0 (all at once).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_PAUSE_S = 0.02
MAX_PAUSE_S = 0.05


class PromptGrid(Grid):
    """`grid` with a `send_and_receive` that returns soon after the last reply arrives."""

    def __init__(
        self,
        grid: Grid,
        *,
        max_in_flight: int = 0,
        first_pause_s: float = FIRST_PAUSE_S,
        max_pause_s: float = MAX_PAUSE_S,
    ):
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight must be 0 (all at once) or more, got {max_in_flight}.")
        self.grid = grid
        self.max_in_flight = max_in_flight
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
        """Push `messages` (at most `max_in_flight` out at once), then pull replies until each
        has one or `timeout` s have passed (None: no limit), as Flower's Grid does. Messages
        still unsent at the timeout are never sent."""
        unsent = list(messages)
        window = self.max_in_flight or len(unsent)
        end = None if timeout is None else time.monotonic() + timeout
        waiting: set[str] = set()
        replies: list[Message] = []
        pause = self.first_pause_s
        while unsent or waiting:
            if unsent and len(waiting) < window:
                batch, unsent = unsent[: window - len(waiting)], unsent[window - len(waiting) :]
                waiting.update(self.push_messages(batch))
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not (unsent or waiting) or (end is not None and time.monotonic() >= end):
                break
            if got and unsent:
                continue  # refill the window at once
            time.sleep(pause if end is None else max(0.0, min(pause, end - time.monotonic())))
            pause = min(pause * 2, self.max_pause_s)
        return replies
