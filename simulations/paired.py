"""fedrec-paired: the headline federated row against baselines, user by user.

Per user, test NDCG@10 (full ranking, seen items excluded, ties against the target) of:

- the headline federated row (`--row`, fed-k0-text-restart-ema by default): each of its seeds'
  (`--seeds`, by default every seed the row has in quality_ml100k.json) model that the server
  selected on validation
  (`outputs/benchmark/<row>/seed-*/models/best`, written by `fedrec-benchmark`), scored again
  on the test split; the mean over users must equal the row in quality_ml100k.json, which
  checks that these are the models the row reported;
- popularity (training counts plus the validation item);
- an id-based sequential baseline trained here on the same split: the project's causal
  transformer over item ids alone (item-text = false, SASRec-style), trained centrally, each
  seed's epoch chosen on validation.

Each model's per-user NDCG@10 is averaged over its seeds; the difference to the federated row
is bootstrapped over users (10,000 resamples): mean, 95% interval and the share of resamples
at or below zero. Writes simulations/results/paired.json and paired.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.config import Config
from simulations.report import CONFIGS, RESULTS, ROOT, markdown_table

PAIRED_FILE = "paired.json"
HEADLINE = "fed-k0-text-restart-ema"
BASELINE_SEEDS = (42, 43, 44)
RESAMPLES = 10_000
K = 10


def ndcg_per_user(ranks: np.ndarray, k: int = K) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def bootstrap(diff: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Mean of per-user differences, its 95% percentile interval over users resampled with
    replacement, and the share of resamples whose mean is at or below zero."""
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):
        means[i] = diff[rng.integers(0, len(diff), len(diff))].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "mean": float(diff.mean()),
        "ci95": [float(low), float(high)],
        "share_at_or_below_zero": float(np.mean(means <= 0.0)),
        "users": len(diff),
        "resamples": resamples,
    }


def row_seeds(quality_file: Path, row: str) -> dict[int, float]:
    """Seed -> test NDCG@10 of a k = 0 row of the quality file; exits naming what is wrong."""
    quality = {r["name"]: r for r in json.loads(quality_file.read_text())}
    if row not in quality:
        raise SystemExit(f"{row!r} is not a row of {quality_file}.")
    if quality[row].get("adapter_k", 0) != 0:  # the item states fedrec-paired builds are k = 0's
        raise SystemExit(f"{row} has adapter-k > 0: fedrec-paired scores k = 0 rows only.")
    return {s["seed"]: s["ndcg@10"] for s in quality[row]["per_seed"]}


def saved_model_ranks(model_dir: Path, items, cases) -> tuple[np.ndarray, Config]:
    """Test ranks of a saved model directory."""
    from common.task import build_model
    from common.train import evaluate
    from common.weights import load_model_dir, load_trainable_state

    state, meta = load_model_dir(model_dir)
    cfg = Config.from_mapping(meta["config"])
    model = build_model(cfg, num_items=meta["catalog_items"])
    load_trainable_state(model, state)
    _, ranks = evaluate(model=model, cfg=cfg, items=items, cases=cases)
    return ranks, cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-paired",
        description="Per-user paired bootstrap of a federated row against popularity and an "
        "id-only sequential model trained here. Writes simulations/results/paired.json, .md.",
        epilog="Needs fedrec-benchmark's models of the row (outputs/benchmark/<row>). About 8 "
        "minutes a seed of the id-only model on 2 CPU cores.",
    )
    parser.add_argument(
        "--row", default=HEADLINE, help=f"the federated row of quality_ml100k.json ({HEADLINE})"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="the row's seeds (default: all the row has)"
    )
    parser.add_argument(
        "--baseline-seeds",
        type=int,
        nargs="+",
        default=list(BASELINE_SEEDS),
        help="seeds of the id-only model trained here (default: 42 43 44)",
    )
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs" / "benchmark")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=8)
    args = parser.parse_args(argv)

    from common.task import eval_cases, item_states, load_data, popularity_ranks
    from common.train import evaluate
    from simulations.benchmark import QUALITY_FILE
    from simulations.central import train_central

    started = time.perf_counter()
    row, reported = args.row, row_seeds(args.out / QUALITY_FILE, args.row)
    args.seeds = args.seeds or list(reported)
    models = {}
    for seed in args.seeds:
        models[seed] = args.outputs / row / f"seed-{seed}" / "models" / "best"
        if seed not in reported:
            raise SystemExit(f"{row} has no seed {seed} in {QUALITY_FILE}: {sorted(reported)}.")
        if not models[seed].is_dir():
            raise SystemExit(
                f"{row} seed {seed}: no saved model in {models[seed]}. Run `fedrec-benchmark "
                f"--only {row} --seeds {seed}`, or name the seeds that have one (--seeds)."
            )

    base = Config.from_toml(CONFIGS / "bench-central.toml")
    dataset, splits = load_data(base)
    users = list(splits)
    cases = eval_cases(users, "test")
    items = item_states(base, dataset.catalog)
    fed, checks = [], []
    for seed, best in models.items():
        ranks, _ = saved_model_ranks(best, items, cases)
        fed.append(ndcg_per_user(ranks))
        checks.append({"seed": seed, "reported": reported[seed], "rescored": float(fed[-1].mean())})
        if abs(reported[seed] - fed[-1].mean()) > 1e-6:
            raise SystemExit(
                f"{row} seed {seed}: the saved best model scores {fed[-1].mean():.6f} on test, "
                f"the results file says {reported[seed]:.6f}: these are not the row's models."
            )
    headline = np.mean(fed, axis=0)

    id_runs = []
    id_cfg = base.merged({"item-text": False})
    for seed in args.baseline_seeds:
        model, run = train_central(
            id_cfg.replace(seed=seed),
            items=items,
            users=users,
            num_items=len(dataset.catalog),
            epochs=args.epochs,
            patience=args.patience,
            name="id-only",
        )
        metrics, ranks = evaluate(model=model, cfg=id_cfg, items=items, cases=cases)
        id_runs.append(
            {
                "seed": seed,
                **metrics,
                "val_ndcg@10": run["val_ndcg@10"],
                "per_user": ndcg_per_user(ranks),
            }
        )
    baselines = {
        "popularity": ndcg_per_user(popularity_ranks(users, len(dataset.catalog), "test")),
        "central-id-only": np.mean([r.pop("per_user") for r in id_runs], axis=0),
    }
    result = {
        "headline": args.row,
        "seeds": args.seeds,
        "baseline_seeds": args.baseline_seeds,
        args.row: {"ndcg@10": float(headline.mean()), "rescored": checks},
        "central-id-only": {
            "ndcg@10": float(np.mean([r["ndcg@10"] for r in id_runs])),
            "ndcg@10_std": float(np.std([r["ndcg@10"] for r in id_runs]))
            if len(id_runs) > 1
            else None,
            "per_seed": id_runs,
        },
        "comparisons": {
            name: {"baseline_ndcg@10": float(b.mean()), **bootstrap(headline - b)}
            for name, b in baselines.items()
        },
        "wall_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / PAIRED_FILE).write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "paired.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    row = result["headline"]
    body = [
        [
            f"{row} − {name}",
            f"{result[row]['ndcg@10']:.4f}",
            f"{c['baseline_ndcg@10']:.4f}",
            f"{c['mean']:+.4f}",
            f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]",
            f"{c['share_at_or_below_zero']:.4f}",
        ]
        for name, c in result["comparisons"].items()
    ]
    header = ["pair", row, "baseline", "mean difference", "95% interval", "resamples ≤ 0"]
    users = next(iter(result["comparisons"].values()))["users"]
    return (
        f"Per-user test NDCG@10, {row} averaged over seeds {result['seeds']}, the id-only "
        f"model over {result['baseline_seeds']}; "
        f"{users} users resampled {RESAMPLES:,} times.\n\n" + markdown_table(header, body) + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
