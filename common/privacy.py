"""User-level differential privacy: the two mechanisms, their accounting and their terms.

`dp-mode = "fedavg"` (cross-device, one user per client): DP-FedAvg (McMahan et al. 2018).
The server samples each client independently with probability q (Poisson), every client clips
its whole update to norm C (the server clips again: a client's word is not trusted), and the
server adds Gaussian noise of standard deviation sigma * C to the sum before dividing by the
expected cohort q * N. Neighbouring federations differ in one user. The server accounts
epsilon over rounds with Opacus's RDP accountant at sampling rate q (`fedavg_epsilon`). The
server sees each client's clipped update: it is trusted; whoever sees the models it releases
(devices, the public) is not.

`dp-mode = "sgd"` (cross-silo, many users per client): Opacus DP-SGD on the client with one
record = one user's sequence, so the guarantee is user-level inside the silo, and the noise is
added on the device: it holds against the server too. Each client keeps a ledger, the
accountant's history [(noise multiplier, sample rate, steps), ...], on disk next to its data;
every round composes onto it, a restart reloads it, and the client declines a round that would
take it past its budget.

Either way the noise comes from a generator seeded from the operating system's entropy where
the noise is added (`secure_generator`), never from the run seed, the round or anything the
server sends: nobody can replay it.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ACCOUNTANT = "rdp"
# Neighbouring datasets differ in all of one user's interactions (both modes).
UNIT = "user"
COMPOSITION = {  # what an epsilon composes over
    "fedavg": "cumulative over rounds",  # the federation's releases so far
    "sgd": "cumulative per client, capped",  # each client's rounds; it declines beyond the cap
}


def secure_generator() -> torch.Generator:
    """A torch generator for DP noise, seeded with 63 bits of the operating system's entropy.

    Not a cryptographic generator (Opacus's `secure_mode` needs torchcsprng, which has no build
    for this torch), but its seed is unknown to everyone else, so no one can replay the noise.
    """
    return torch.Generator().manual_seed(secrets.randbits(63))


def secure_numpy_rng() -> np.random.Generator:
    """A numpy generator seeded from the operating system's entropy (server-side DP noise and
    Poisson sampling of clients)."""
    return np.random.default_rng(secrets.randbits(128))


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
                    "composition": COMPOSITION["sgd"],
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
    from opacus.accountants import RDPAccountant  # seconds to import: only when DP is on

    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is valid, only possibly loose.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose `steps` at `sample_rate` stay within the budget."""
    from opacus.accountants.utils import get_noise_multiplier

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


def fedavg_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float):
    """DP-FedAvg's epsilon at `delta` after `rounds` releases, clients Poisson-sampled at
    `sample_rate` (RDP accountant)."""
    if rounds <= 0:
        return 0.0
    return rdp_epsilon(((float(noise_multiplier), float(sample_rate), int(rounds)),), delta)


def guarantee(epsilon: float | None, delta: float, mode: str) -> dict[str, object]:
    """An epsilon with everything needed to read it (the keys of a metrics row)."""
    return {
        "epsilon": epsilon,
        "dp_delta": delta,
        "dp_unit": UNIT,
        "dp_mode": mode,
        "dp_accountant": ACCOUNTANT,
        "dp_composition": COMPOSITION[mode],
    }
