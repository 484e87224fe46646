"""Server-side schedules over a run's rounds: the server learning rate, the cohort's size and
the server optimizer's restarts. Shared by the ServerApp's strategy and fedrec-emulate."""

from __future__ import annotations

import math


def scheduled_rate(base: float, *, schedule: str, server_round: int, num_rounds: int) -> float:
    """The server learning rate of round `server_round` (1-based) of `num_rounds`: `base`
    throughout ("constant"), or "cosine": base x (1 + cos(pi r / R)) / 2, down to 0 at R."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(server_round, num_rounds) / num_rounds))
    raise ValueError(f"Unknown server learning-rate schedule {schedule!r}.")


def scheduled_fraction(first: float, final: float, *, server_round: int, num_rounds: int) -> float:
    """The fraction of nodes that train in round `server_round` (1-based) of `num_rounds`:
    `first` throughout when `final` is 0, else linear from `first` (round 1) to `final`."""
    if not final or num_rounds <= 1:
        return first
    progress = (min(server_round, num_rounds) - 1) / (num_rounds - 1)
    return first + (final - first) * progress


class RestartClock:
    """Restarts of a server optimizer every `every` rounds of the run (server-restart-every).

    `step(run_round)` is called once per optimizer step and says whether the state is to be
    zeroed before it (the step is the first of its period; a period whose first rounds had no
    step restarts at its first step all the same) and the step's number since the last
    restart, 1-based: the round FedOpt's bias correction counts.
    """

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"restarts need a period of at least 1 round, got {every}.")
        self.every = every
        self._period = -1  # the period the optimizer's state belongs to
        self._steps = 0  # steps since the state was last zeroed

    def step(self, run_round: int) -> tuple[bool, int]:
        period = (run_round - 1) // self.every
        restart = period != self._period
        if restart:
            self._period, self._steps = period, 0
        self._steps += 1
        return restart, self._steps
