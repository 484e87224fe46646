"""A run's output directory: per-round model checkpoints and the metrics JSON-lines file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from common.config import Config
from common.files import FINAL_MODEL, METRICS_FILE, MODELS_DIR, PUSH_FILE
from common.rounds import RoundRow, check_row, read_rows
from common.weights import load_model_dir, save_model_dir

LATEST = "LATEST"  # text file naming the newest round directory
BEST = "best"  # the model selected on validation (simulation with central evaluation)
AVERAGE = "average"  # in a round checkpoint: the server's moving average (server-ema)
KEEP_ROUNDS = 3  # round checkpoints kept: the newest few (resume needs only the last)


class RunLog:
    """Writes `models/round-NNN/`, `models/final/` and appends to `metrics.jsonl`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.models = self.root / MODELS_DIR
        self.models.mkdir(parents=True, exist_ok=True)

    def append_metrics(self, row: RoundRow) -> None:
        """Append one round's row (NaN/inf written as null); a key that RoundRow does not
        declare raises ValueError."""
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in check_row(dict(row)).items()
        }
        with open(self.root / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(clean, sort_keys=True) + "\n")

    def append_push(self, row: dict[str, Any]) -> None:
        """Record a model push."""
        with open(self.root / PUSH_FILE, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def save_round(
        self, round_: int, *, state, cfg: Config, metadata: dict[str, Any], average=None
    ) -> Path:
        """Checkpoint the global model of a round (and the server's moving average of it, when
        kept) and point LATEST at it."""
        metadata = {**metadata, "round": round_}
        path = save_model_dir(
            self.models / f"round-{round_:03d}", state=state, cfg=cfg, metadata=metadata
        )
        if average is not None:
            save_model_dir(path / AVERAGE, state=average, cfg=cfg, metadata=metadata)
        tmp = self.models / f".{LATEST}.tmp"
        tmp.write_text(path.name)
        tmp.replace(self.models / LATEST)
        rounds = sorted(self.models.glob("round-[0-9][0-9][0-9]*"))
        for old in rounds[:-KEEP_ROUNDS]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def save_best(self, round_: int, *, state, cfg: Config, metadata: dict[str, Any]) -> Path:
        """The model selected on validation so far."""
        return save_model_dir(
            self.models / BEST, state=state, cfg=cfg, metadata={**metadata, "round": round_}
        )

    def load_best(self) -> tuple[dict, dict]:
        """(state, metadata) of the model selected on validation."""
        return load_model_dir(self.models / BEST)

    def best_validation(self) -> tuple[int, float] | None:
        """(round, validation NDCG@10) of the selected model, from the metrics file."""
        if not (self.models / BEST).exists():
            return None
        chosen = int(self.load_best()[1]["round"])
        for row in self.metrics_rows():
            if row.get("round") == chosen and row.get("val_ndcg@10") is not None:
                return chosen, float(row["val_ndcg@10"])
        return None

    def metrics_rows(self) -> list[dict[str, Any]]:
        """Every row of the metrics file written so far."""
        path = self.root / METRICS_FILE
        return read_rows(path) if path.exists() else []

    def save_final(self, *, state, cfg: Config, metadata: dict[str, Any]) -> Path:
        """The run's final global model."""
        return save_model_dir(self.models / FINAL_MODEL, state=state, cfg=cfg, metadata=metadata)

    def latest(self) -> tuple[int, dict, dict] | None:
        """(round, state, metadata) of the newest checkpoint, or None."""
        pointer = self.models / LATEST
        if not pointer.exists():
            return None
        state, meta = load_model_dir(self.models / pointer.read_text().strip())
        return int(meta["round"]), state, meta

    def latest_average(self) -> dict | None:
        """The moving average saved with the newest checkpoint, or None."""
        pointer = self.models / LATEST
        if not pointer.exists():
            return None
        path = self.models / pointer.read_text().strip() / AVERAGE
        return load_model_dir(path)[0] if path.exists() else None

    def truncate_metrics_after(self, round_: int) -> None:
        """Drop rows of rounds after `round_` (left by a run that died before checkpointing)."""
        path = self.root / METRICS_FILE
        if not path.exists():
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line).get("round", 0) <= round_]
        path.write_text("".join(line + "\n" for line in kept))
