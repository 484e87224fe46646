"""PromptGrid: replies collected as they arrive, not on Flower's 3 s polling beat."""

from __future__ import annotations

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

import server.grid
from server.grid import MAX_PAUSE_S, PromptGrid


class FakeClock:
    """time.monotonic and time.sleep on a clock that moves only when slept."""

    def __init__(self):
        self.now = 0.0
        self.pauses: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


class SlowRepliesGrid(Grid):
    """The i-th pushed message's reply is ready `delay_s * (i + 1)` after the push."""

    def __init__(self, clock: FakeClock, delay_s: float):
        self.clock, self.delay_s = clock, delay_s
        self.pending: dict[str, tuple[float, Message]] = {}

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return [1, 2, 3]

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            ready = self.clock.now + self.delay_s * (i + 1)
            self.pending[f"m{i}"] = (ready, Message(RecordDict(), reply_to=msg))
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        ready = [
            i for i in message_ids if i in self.pending and self.pending[i][0] <= self.clock.now
        ]
        return [self.pending.pop(i)[1] for i in ready]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("Flower's send_and_receive sleeps 3 s between pulls")


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(server.grid, "time", clock)
    for key, value in {"_task_id": 1, "_run_id": 1, "_node_id": 0}.items():  # a ServerApp's
        monkeypatch.setattr(TaskIdentity, key, value)
    return clock


def _messages(grid: Grid, n: int) -> list[Message]:
    return [grid.create_message(RecordDict(), "train", node, "1") for node in range(1, n + 1)]


def test_the_replies_are_collected_within_one_short_pause_of_the_last(clock):
    grid = PromptGrid(SlowRepliesGrid(clock, delay_s=1.0))
    replies = list(grid.send_and_receive(_messages(grid, 3), timeout=60))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert 3.0 <= clock.now <= 3.0 + MAX_PAUSE_S  # the last reply came at 3 s
    assert max(clock.pauses) <= MAX_PAUSE_S


def test_a_timeout_returns_the_replies_that_came(clock):
    grid = PromptGrid(SlowRepliesGrid(clock, delay_s=1.0))
    replies = list(grid.send_and_receive(_messages(grid, 3), timeout=1.5))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert clock.now == pytest.approx(1.5)


def test_no_messages_return_at_once_and_the_rest_is_the_wrapped_grids(clock):
    grid = PromptGrid(SlowRepliesGrid(clock, delay_s=1.0))
    assert list(grid.send_and_receive([], timeout=None)) == []
    assert clock.pauses == []
    assert list(grid.get_node_ids()) == [1, 2, 3]
