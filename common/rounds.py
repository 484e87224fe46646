"""A round's metrics row: the one contract between the ServerApp, which appends a row to
`metrics.jsonl` after every round (server/runlog.py), and everything that reads it (the
runner's progress lines, the report, TensorBoard, the benchmarks).

`RoundRow` names every key a row may hold and its type; a row written with any other key is
refused (`check_row`), so a new figure is declared here first. Every key is optional: round
0 has no training figures, validation runs every `evaluate-every` rounds, the test figures
come once, after the last round, and the privacy terms only under DP.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, TypedDict, cast

RoundRow = TypedDict(
    "RoundRow",
    {
        "round": int,  # global round; 0 is the initial model
        "elapsed_s": float,  # since this run of the ServerApp started
        "round_s": float,  # this round, end to end
        # central evaluation (simulation): every user's validation item, full ranking
        "popularity_val_ndcg@10": float,  # round 0: the baseline on the same users
        "val_hr@10": float,
        "val_ndcg@10": float,
        "val_mrr@10": float,
        # after the last round: the model selected on validation, tested once
        "best_round": int,
        "best_val_ndcg10": float,
        "test_hr@10": float,
        "test_ndcg@10": float,
        "test_mrr@10": float,
        # federated evaluation: the clients' own held-out items, averaged
        "fed_hr@10": float,
        "fed_ndcg@10": float,
        "fed_mrr@10": float,
        # the round's clients (server/strategy.py RoundStats)
        "clients_sampled": int,
        "clients_train": int,
        "clients_declined": int,
        "clients_rejected": int,
        "rejected_malformed": int,
        "rejected_non_finite": int,
        "rejected_over_norm": int,
        "clients_clipped": int,
        "clients_failed": int,
        "failed_nodes": list[int],
        "train_loss": float | None,
        # traffic, time and memory
        "bytes_down": int,
        "bytes_up": int,
        "bytes_per_client": float,  # down + up over the clients sampled
        "client_peak_rss_mb": float,
        "client_update_s_mean": float,
        "client_startup_s": float,  # where a client's update time went, averaged
        "client_cache_load_s": float,
        "client_model_load_s": float,
        "client_train_s": float,
        "client_reply_s": float,
        "server_peak_rss_mb": float,
        "push_installed": int,  # nodes that installed a pushed model this round
        "server_lr": float,  # the server optimizer's learning rate (server-lr-schedule)
        # privacy (server/server_app.py privacy_terms)
        "dp_mode": str,
        "epsilon": float | None,
        "dp_delta": float,
        "dp_unit": str,
        "dp_accountant": str,
        "dp_composition": str,
        "dp_noise_multiplier": float,
        "dp_sample_rate": float,
        "dp_clip_norm": float,
        "dp_target_epsilon": float,
        "dp_noise_std": float,
    },
    total=False,
)

ROUND_KEYS = frozenset(RoundRow.__annotations__)


def check_row(row: dict[str, Any]) -> RoundRow:
    """`row` as a RoundRow; a key RoundRow does not declare raises ValueError."""
    unknown = sorted(set(row) - ROUND_KEYS)
    if unknown:
        raise ValueError(
            f"Metrics row keys {unknown} are not declared: add them to RoundRow in "
            "common/rounds.py, the contract of metrics.jsonl."
        )
    return cast(RoundRow, row)


def parse_row(line: str, *, where: str = "metrics line") -> RoundRow:
    """One metrics.jsonl line; a line that is not a JSON object raises ValueError. Keys are
    not checked, so files written by other versions still read."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc.msg}): {line[:80]!r}") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(row).__name__}.")
    return cast(RoundRow, row)


def read_rows(path: str | Path) -> list[RoundRow]:
    """All rows of a metrics.jsonl file; an unfinished last line (no newline yet) is skipped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(parse_row(line, where=f"{path}, line {line_number},"))
        except ValueError:
            if line_number != len(lines):  # only the last line may be unfinished
                raise
            warnings.warn(f"{path}: skipping the unfinished last line {line_number}.", stacklevel=2)
    return rows
