"""fedrec-local: the local-only baseline, each client alone, no federation.

Every one of MovieLens-100K's 943 users trains the fed-k0 model (simulations/configs/
bench-fed.toml's model settings) from the same seeded initialisation on nothing but its own
training interactions, with Adam, and is tested on its own test item (full ranking, seen items
excluded, ties against the target). This is what a device could do without the federation.

Selection on validation: the learning rate and the number of local epochs are chosen from a
small grid by the mean validation NDCG@10 of a sample of users (seed 42); then, for each seed,
every user trains with the chosen setting and is tested once. Writes
simulations/results/local.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from common.config import Config
from simulations.report import CONFIGS, RESULTS

LOCAL_FILE = "local.json"
SEEDS = (42, 43, 44)
LEARNING_RATES = (0.002, 0.02)
EPOCHS = (1, 2, 4, 8, 16)  # checkpoints of one run: each continues the last


def progress(users: list, desc: str):
    """The users with a progress bar where someone watches (a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(users, desc=desc, unit="user", disable=None, leave=False)


def local_runs(cfg: Config, user, items, model, init: dict, upto: int) -> Iterator[int]:
    """Train `model` from `init` on one user's training windows; yield at each checkpoint of
    EPOCHS up to `upto` (the model then holds that checkpoint's weights)."""
    from common.task import train_records
    from common.train import train
    from common.weights import load_trainable_state

    load_trainable_state(model, init)
    records = train_records(cfg, [user])
    done = 0
    for epochs in EPOCHS:
        if epochs > upto:
            return
        train(
            model=model,
            cfg=cfg,
            records=records,
            items=items,
            epochs=epochs - done,
            seed=cfg.seed + epochs,
        )
        done = epochs
        yield epochs


def user_rank(model, cfg: Config, items, user, split: str) -> int:
    from common.task import eval_cases
    from common.train import evaluate

    _, ranks = evaluate(model=model, cfg=cfg, items=items, cases=eval_cases([user], split))
    return int(ranks[0])


def select(cfg: Config, users: list, items, num_items: int) -> tuple[dict, list[dict]]:
    """The (learning rate, epochs) with the best mean validation NDCG@10 over `users`."""
    from common.metrics import ranking_metrics
    from common.task import build_model
    from common.weights import trainable_state

    grid = []
    for lr in LEARNING_RATES:
        run_cfg = cfg.replace(learning_rate=lr)
        model = build_model(run_cfg, num_items=num_items)
        init = trainable_state(model)
        ranks: dict[int, list[int]] = {e: [] for e in EPOCHS}
        for user in progress(users, f"selection, lr {lr}"):
            for epochs in local_runs(run_cfg, user, items, model, init, EPOCHS[-1]):
                ranks[epochs].append(user_rank(model, run_cfg, items, user, "valid"))
        for epochs, values in ranks.items():
            ndcg = ranking_metrics(np.array(values))["ndcg@10"]
            grid.append({"learning_rate": lr, "epochs": epochs, "val_ndcg@10": ndcg})
        print(
            f"  lr {lr}: "
            + ", ".join(f"{g['epochs']}: {g['val_ndcg@10']:.4f}" for g in grid[-len(EPOCHS) :]),
            flush=True,
        )
    best = max(grid, key=lambda g: g["val_ndcg@10"])
    return best, grid


def run_seed(cfg: Config, users: list, items, num_items: int, epochs: int) -> dict:
    """Every user alone at the chosen setting, tested once."""
    from common.metrics import ranking_metrics
    from common.task import build_model
    from common.weights import trainable_state

    start = time.perf_counter()
    model = build_model(cfg, num_items=num_items)
    init = trainable_state(model)
    ranks = []
    for user in progress(users, f"seed {cfg.seed}"):
        if user.test < 0:
            continue
        for _ in local_runs(cfg, user, items, model, init, epochs):
            pass
        ranks.append(user_rank(model, cfg, items, user, "test"))
    row = {
        "seed": cfg.seed,
        **ranking_metrics(np.array(ranks)),
        "users": len(ranks),
        "wall_s": time.perf_counter() - start,
    }
    print(f"  seed {cfg.seed}: test NDCG@10 {row['ndcg@10']:.4f} ({row['wall_s']:.0f} s)")
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-local",
        description="The local-only baseline: each of the 943 users trains the fed-k0 model "
        "alone on its own data and is tested on its own test item. Writes "
        "simulations/results/local.json.",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--select-users", type=int, default=150, help="users of the selection")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from common.task import item_states, load_data

    started = time.perf_counter()
    cfg = Config.from_toml(CONFIGS / "bench-fed.toml").merged({"local-optimizer": "adam"})
    dataset, splits = load_data(cfg)
    users = list(splits)
    items = item_states(cfg, dataset.catalog)
    rng = np.random.default_rng(0)
    sample = [users[i] for i in rng.choice(len(users), args.select_users, replace=False)]
    sample = [u for u in sample if u.valid >= 0]
    best, grid = select(cfg.replace(seed=args.seeds[0]), sample, items, len(dataset.catalog))
    print(f"chosen: learning rate {best['learning_rate']}, {best['epochs']} epochs", flush=True)
    chosen = cfg.replace(learning_rate=best["learning_rate"])
    runs = [
        run_seed(chosen.replace(seed=s), users, items, len(dataset.catalog), best["epochs"])
        for s in args.seeds
    ]
    row = {
        "name": "local-only",
        "chosen": best,
        "grid": grid,
        "per_seed": runs,
        "wall_s": time.perf_counter() - started,
    }
    for metric in ("hr@10", "ndcg@10", "mrr@10"):
        values = [r[metric] for r in runs]
        row[metric], row[f"{metric}_std"] = float(np.mean(values)), float(np.std(values))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / LOCAL_FILE).write_text(json.dumps(row, indent=2) + "\n")
    print(f"local-only: test NDCG@10 {row['ndcg@10']:.4f} ± {row['ndcg@10_std']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
