"""Opacus wiring and the per-client privacy ledger (example-level DP-SGD).

The ledger is the accountant's history, [(noise multiplier, sample rate, steps), ...], kept
on disk next to the client's data. Every round composes onto it, a restart reloads it, and a
client refuses to train once the next round would take it past its budget.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANT = "rdp"
# Neighbouring datasets differ in one training window: up to history-len interactions of one
# user with their targets (common/records.py). Example-level, not user-level.
UNIT = "window"
COMPOSITION = "cumulative"  # over every round this client has trained in


class BudgetExceeded(RuntimeError):
    """Training would take the client past its privacy budget."""


@dataclass
class PrivacyLedger:
    """A client's cumulative DP-SGD history, persisted as JSON."""

    path: Path
    history: list[tuple[float, float, int]] = field(default_factory=list)
    noise_multiplier: float | None = None  # fixed at first use (calibrated or configured)

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """The ledger at `path`, or an empty one if the client never trained."""
        path = Path(path)
        if not path.exists():
            return cls(path=path)
        try:
            data = json.loads(path.read_text())
            history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
            sigma = data.get("noise_multiplier")
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"Privacy ledger {path} is unreadable ({err}). Refusing to train: restore the "
                "file from a backup; deleting it would reset the client's spent budget."
            ) from err
        return cls(path=path, history=history, noise_multiplier=sigma)

    def save(self) -> None:
        """Write atomically: a crash mid-write never loses the spent budget."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(
                {
                    "accountant": ACCOUNTANT,
                    "unit": UNIT,
                    "noise_multiplier": self.noise_multiplier,
                    "history": [list(h) for h in self.history],
                },
                fh,
            )
        os.replace(tmp, self.path)

    def epsilon(self, delta: float, extra: list[tuple[float, float, int]] = ()) -> float:
        """Cumulative epsilon at `delta` of the history (plus planned `extra` steps)."""
        return rdp_epsilon(tuple(self.history) + tuple(extra), delta)

    def record(self, accountant_history: list[tuple[float, float, int]]) -> None:
        """Append what an Opacus accountant recorded this round."""
        self.history.extend((float(s), float(q), int(n)) for s, q, n in accountant_history)


# Memoised pure functions: RDP accounting costs ~0.2 s a call, and clients with the same data
# size share the same histories, so a simulation worker computes each one once.
@functools.lru_cache(maxsize=4096)
def rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Epsilon at `delta` of a DP-SGD history [(noise multiplier, sample rate, steps), ...]."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is valid, only possibly loose.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose `steps` at `sample_rate` stay within the budget."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=ACCOUNTANT,
            )
        )


def choose_noise_multiplier(
    ledger: PrivacyLedger,
    *,
    configured: float,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    planned_steps: int,
) -> float:
    """The client's noise multiplier: configured, or (0) calibrated once so that the planned
    steps of the whole run spend exactly the budget; then kept for the client's lifetime."""
    if ledger.noise_multiplier is None:
        if configured > 0:
            ledger.noise_multiplier = configured
        else:
            ledger.noise_multiplier = calibrated_noise(
                target_epsilon, delta, sample_rate, max(planned_steps, 1)
            )
    return ledger.noise_multiplier


def guarantee(epsilon: float, delta: float) -> dict[str, object]:
    """An epsilon with everything needed to read it."""
    return {
        "epsilon": epsilon,
        "delta": delta,
        "unit": UNIT,
        "accountant": ACCOUNTANT,
        "composition": COMPOSITION,
    }
