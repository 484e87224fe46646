"""Central training with model selection on validation, shared by the central rows of
fedrec-benchmark, the id-only baseline of fedrec-paired and the cold-item protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from common.config import Config

if TYPE_CHECKING:  # torch-backed types: imported where used, so --help answers at once
    from common.backbone import ItemStates
    from common.data import UserSplit
    from common.model import Recommender


def train_central(
    cfg: Config,
    *,
    items: ItemStates,
    users: list[UserSplit],
    num_items: int,
    epochs: int,
    patience: int,
    name: str,
) -> tuple[Recommender, dict]:
    """Train on every user's data at once, epoch by epoch, and load the epoch that scored best
    on the users' validation items (the test split is not read). Returns the model and the run's
    curve: model selection as the central rows and the cold-item protocol do it."""
    from common.task import build_model, eval_cases, train_records
    from common.train import evaluate, train
    from common.weights import load_trainable_state, trainable_state

    model = build_model(cfg, num_items=num_items)
    records = train_records(cfg, users)
    valid = eval_cases(users, "valid")
    best, best_state, best_epoch, curve = -1.0, None, 0, []
    for epoch in range(1, epochs + 1):
        result = train(
            model=model, cfg=cfg, records=records, items=items, epochs=1, seed=cfg.seed + epoch
        )
        metrics, _ = evaluate(model=model, cfg=cfg, items=items, cases=valid)
        curve.append(
            {
                "epoch": epoch,
                "loss": result.loss,
                "steps": result.steps,
                "val_ndcg@10": metrics["ndcg@10"],
                "seconds": result.seconds,
                "targets_per_s": result.num_targets / result.seconds,
            }
        )
        print(
            f"  {name} seed {cfg.seed} epoch {epoch}: loss {result.loss:.4f} "
            f"val NDCG@10 {metrics['ndcg@10']:.4f} ({result.seconds:.1f} s)",
            flush=True,
        )
        if metrics["ndcg@10"] > best:
            best, best_state, best_epoch = metrics["ndcg@10"], trainable_state(model), epoch
        elif epoch - best_epoch >= patience:
            break
    load_trainable_state(model, best_state)
    return model, {
        "val_ndcg@10": best,
        "best_epoch": best_epoch,
        "epochs": len(curve),
        "seconds_per_epoch": float(np.mean([c["seconds"] for c in curve])),
        "curve": curve,
    }
