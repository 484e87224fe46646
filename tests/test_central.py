"""simulations.central.train_central: the epoch kept is the best on validation."""

from __future__ import annotations

import numpy as np

from common.task import eval_cases, item_states, load_data
from common.train import evaluate
from simulations.central import train_central
from tests.tiny import world_config


def test_train_central_keeps_the_epoch_best_on_validation(tmp_path, tiny_world):
    cfg = world_config(tmp_path, *tiny_world, learning_rate=0.05, max_tokens=8)
    dataset, splits = load_data(cfg)
    users = list(splits)
    items = item_states(cfg, dataset.catalog)
    model, run = train_central(
        cfg,
        items=items,
        users=users,
        num_items=len(dataset.catalog),
        epochs=6,
        patience=2,
        name="tiny",
    )
    curve = [c["val_ndcg@10"] for c in run["curve"]]
    assert run["epochs"] == len(curve) <= 6
    assert run["best_epoch"] == int(np.argmax(curve)) + 1
    if run["epochs"] < 6:  # stopped early: `patience` epochs without a new best
        assert run["epochs"] - run["best_epoch"] == 2
    # the model returned is the kept epoch's, not the last one's
    again, _ = evaluate(model=model, cfg=cfg, items=items, cases=eval_cases(users, "valid"))
    assert again["ndcg@10"] == run["val_ndcg@10"] == max(curve)
