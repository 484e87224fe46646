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
            self.pending[f"m{i}"] = (self.ready_at(), Message(RecordDict(), reply_to=msg))
            ids.append(f"m{i}")
        return ids

    def ready_at(self) -> float:
        return self.clock.now + self.delay_s * (len(self.pending) + 1)

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


def test_a_round_of_quick_clients_waits_at_most_50_ms_past_its_last_reply(clock):
    grid = PromptGrid(SlowRepliesGrid(clock, delay_s=0.1))
    list(grid.send_and_receive(_messages(grid, 4), timeout=60))
    assert 0.4 <= clock.now <= 0.45  # the last reply came at 0.4 s (a 250 ms cap: 0.55 s)


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


class WorkersGrid(SlowRepliesGrid):
    """Like a simulation: `workers` take the pushed messages in turn, `delay_s` each; it
    counts the messages out (pushed, reply not yet pulled) at every push."""

    def __init__(self, clock: FakeClock, delay_s: float, workers: int):
        super().__init__(clock, delay_s)
        self.free_at = [0.0] * workers
        self.pushed = 0
        self.out_at_push: list[int] = []

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            key = f"m{self.pushed}"
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = key
            self.pending[key] = (self.ready_at(), Message(RecordDict(), reply_to=msg))
            ids.append(key)
        self.out_at_push.append(len(self.pending))
        return ids

    def ready_at(self) -> float:
        worker = min(range(len(self.free_at)), key=self.free_at.__getitem__)
        self.free_at[worker] = max(self.free_at[worker], self.clock.now) + self.delay_s
        return self.free_at[worker]


def test_a_window_keeps_few_messages_out_and_still_collects_every_reply(clock):
    inner = WorkersGrid(clock, delay_s=1.0, workers=2)
    grid = PromptGrid(inner, max_in_flight=4)
    replies = list(grid.send_and_receive(_messages(grid, 20), timeout=None))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        f"m{i}" for i in range(20)
    )
    assert max(inner.out_at_push) == 4  # never more than the window out at once
    # two workers stay busy: 20 messages of 1 s take 10 s, plus at most one pause at the end
    assert 10.0 <= clock.now <= 10.0 + MAX_PAUSE_S


def test_without_a_window_everything_goes_out_at_once(clock):
    inner = WorkersGrid(clock, delay_s=1.0, workers=2)
    replies = list(PromptGrid(inner).send_and_receive(_messages(inner, 20), timeout=None))
    assert len(replies) == 20 and inner.out_at_push == [20]


def test_a_windowed_round_that_times_out_never_sends_the_rest(clock):
    inner = WorkersGrid(clock, delay_s=1.0, workers=2)
    grid = PromptGrid(inner, max_in_flight=2)
    replies = list(grid.send_and_receive(_messages(grid, 20), timeout=3.5))
    assert len(replies) == 6 and inner.pushed == 8  # 3 s of two workers; 2 out at the end
    assert clock.now == pytest.approx(3.5)
    with pytest.raises(ValueError, match="max_in_flight"):
        PromptGrid(inner, max_in_flight=-1)
