"""fedrec-coldstart: the strict cold-item protocol (simulations/cold_protocol.py: a tenth of the
items never seen in training or validation, each interaction with one ranked among the cold items
and among every item).

Rows: random ranking, popularity and popularity-oracle (references, computed exactly; the oracle
reads the cold cases' own counts, a yardstick and not a model), then models trained centrally on
the warm data (hybrid = text + id, text-only, id-only and variants), the epoch best on warm
validation kept, and an ensemble row that averages two of them. Results:
`simulations/results/coldstart.json` and `coldstart.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.config import Config
from simulations.cold_protocol import (
    SCOPES,
    ColdSplit,
    cold_split,
    model_scores,
    reference_rows,
    scoped,
    standardized,
    write_split,
)
from simulations.report import CONFIGS, RESULTS, markdown_table

if TYPE_CHECKING:  # torch-backed types: imported where used, so --help answers at once
    from common.backbone import ItemStates

COLDSTART_FILE = "coldstart.json"
SEEDS = (42, 43, 44)
EPOCHS, PATIENCE = 40, 8  # a run's budget: most epochs, and epochs without a better validation
# model rows: name -> run-config changes from bench-central.toml
VARIANTS = {
    "hybrid": {},
    "text-only": {"item-id-embedding": False},
    "id-only": {"item-text": False},
    # LoRA in the top MiniLM block, trained (central-k1's settings, bench-central-k1.toml):
    # does adapting the backbone itself place new items better than adapters on its output?
    "text-only-k1": {
        "item-id-embedding": False,
        "adapter-k": 1,
        "adapter-refresh-steps": 25,
        "adapter-rows": 256,
    },
    # text-only with twice the dropout in the trainable layers: does a more regularized map
    # from text to item vectors place unseen items better?
    "text-only-dropout-0.4": {"item-id-embedding": False, "dropout": 0.4},
    # and without dropout: 0.4 ranked cold items lower than 0.2 does
    "text-only-dropout-0": {"item-id-embedding": False, "dropout": 0.0},
}
# model rows that rank by their members' scores averaged, each member trained as its own row is
# (same seed), each member's scores standardized per case: do two models that place new items
# differently rank them better together? Not one servable model: a device serves one.
ENSEMBLES = {"hybrid+text-only": ("hybrid", "text-only")}
ROWS = (*VARIANTS, *ENSEMBLES)
REFERENCES = ("random", "popularity", "popularity-oracle")


def trained(
    cfg: Config, split: ColdSplit, items: ItemStates, *, epochs: int, patience: int, name: str
):
    """One model trained centrally on the warm data, its epoch best on warm validation kept:
    (model, run without its curve)."""
    from common.backbone import ItemStates
    from simulations.central import train_central

    warm_items = ItemStates(items.states[: split.num_warm], items.mask[: split.num_warm])
    model, run = train_central(
        cfg,
        items=warm_items,
        users=list(split.users),
        num_items=split.num_warm,
        epochs=epochs,
        patience=patience,
        name=name,
    )
    run.pop("curve")
    return model, run


def variant_run(
    cfg: Config,
    split: ColdSplit,
    items: ItemStates,
    *,
    epochs: int,
    patience: int,
    name: str,
    save_to: Path | None = None,
) -> dict:
    """Train one model centrally on the warm data and score it on the cold cases; with
    `save_to`, keep it there as a model directory over the warm catalog."""
    start = time.perf_counter()
    model, run = trained(cfg, split, items, epochs=epochs, patience=patience, name=name)
    scores = model_scores(model, cfg, items, split)
    if save_to is not None:
        from common.backbone import backbone_identity
        from common.weights import save_model_dir, trainable_state

        metadata = {
            "version": f"coldstart-{name}-seed{cfg.seed}",
            **backbone_identity(cfg.backbone),  # k > 0: peft names the LoRA layers by it
            "catalog_sha256": split.warm.fingerprint(),
            "catalog_items": split.num_warm,
        }
        save_model_dir(save_to, state=trainable_state(model), cfg=cfg, metadata=metadata)
    return {"seed": cfg.seed, **scoped(scores, split), **run, "wall_s": time.perf_counter() - start}


def ensemble_run(
    members: dict[str, Config],
    split: ColdSplit,
    states: dict[int, ItemStates],
    *,
    epochs: int,
    patience: int,
    name: str,
) -> dict:
    """Train each member as variant_run does (same seed) and rank by their standardized scores
    averaged; the members' own runs are kept under "members"."""
    start = time.perf_counter()
    total, runs = 0.0, {}
    for member, cfg in members.items():
        items = states[cfg.adapter_k]
        model, runs[member] = trained(
            cfg, split, items, epochs=epochs, patience=patience, name=f"{name}: {member}"
        )
        total = total + standardized(model_scores(model, cfg, items, split))
    seed = next(iter(members.values())).seed
    scores = total / len(members)
    return {
        "seed": seed,
        **scoped(scores, split),
        "members": runs,
        "wall_s": time.perf_counter() - start,
    }


def mean_row(name: str, runs: list[dict]) -> dict:
    """A model row: per scope and metric, the mean and standard deviation over seeds."""
    row: dict = {"name": name, "seeds": [r["seed"] for r in runs], "per_seed": runs}
    for scope in SCOPES:
        values = {m: [r[scope][m] for r in runs] for m in runs[0][scope]}
        row[scope] = {m: float(np.mean(v)) for m, v in values.items()}
        row[scope].update({f"{m}_std": float(np.std(v)) for m, v in values.items()})
    if all("val_ndcg@10" in r for r in runs):  # an ensemble's members validate, not it
        row["val_ndcg@10"] = float(np.mean([r["val_ndcg@10"] for r in runs]))
    return row


def markdown(result: dict) -> str:
    """The results as a markdown table, then the goal's ratios."""

    def cell(row: dict, scope: str, metric: str) -> str:
        value, std = row[scope][metric], row[scope].get(f"{metric}_std")
        return f"{value:.4f}" + (
            f" ± {std:.4f}" if std is not None and len(row["seeds"]) > 1 else ""
        )

    header = ["model", "seeds", "cold: HR@10", "cold: NDCG@10", "all: HR@10", "all: NDCG@10"]
    body = [
        [
            r["name"],
            str(len(r["seeds"])) if r["seeds"] else "—",
            cell(r, "cold", "hr@10"),
            cell(r, "cold", "ndcg@10"),
            cell(r, "all", "hr@10"),
            cell(r, "all", "ndcg@10"),
        ]
        for r in result["rows"]
    ]
    budget = (
        f"; each run at most {result['epochs']} epochs, stopped after {result['patience']} "
        "without a better warm validation score"
        if "epochs" in result
        else ""
    )
    lines = [
        f"Dataset {result['dataset']}{budget}.",
        "",
        f"Cold items: {result['cold_items']} of {result['items']} (split seed "
        f"{result['split_seed']}); {result['cases']} cold interactions of {result['users']} "
        "users. 'cold': ranked among the cold items only; 'all': among every item. Ties broken "
        "uniformly at random, in expectation.",
        "",
        markdown_table(header, body),
    ]
    rows = {r["name"]: r for r in result["rows"]}
    if "popularity-oracle" in rows:
        lines += [
            "",
            "popularity-oracle is not a model: it reads the cold cases themselves (a cold item's "
            "cold interactions, the case's own left out), the ranking that knowing each new "
            "item's coming popularity exactly would give.",
        ]
    if "hybrid" in rows:
        lines.append("")
        for ref in ("random", "id-only", "text-only"):
            if ref in rows and rows[ref]["cold"]["hr@10"] > 0:
                ratios = [
                    rows["hybrid"]["cold"][m] / rows[ref]["cold"][m] for m in ("hr@10", "ndcg@10")
                ]
                lines.append(
                    f"- hybrid / {ref}, among the cold items: HR@10 {ratios[0]:.2f}x, "
                    f"NDCG@10 {ratios[1]:.2f}x"
                )
    models = [r for r in result["rows"] if r["seeds"]]
    if models and "random" in rows:
        best = max(models, key=lambda r: r["cold"]["hr@10"])
        lines.append(
            f"- best model row among the cold items, {best['name']}: HR@10 "
            f"{best['cold']['hr@10'] / rows['random']['cold']['hr@10']:.2f}x random"
        )
    return "\n".join(lines) + "\n"


def kept_rows(path: Path, result: dict, names: set[str]) -> list[dict]:
    """Model rows of an earlier result on the same split that this run did not redo
    (`--only` reruns some rows and keeps the others)."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    # rows trained for another budget are not kept (files from before budgets were recorded
    # were all trained with the defaults)
    budget = {"epochs": EPOCHS, "patience": PATIENCE}
    same = all(
        old.get(key, budget.get(key)) == result[key]
        for key in ("fraction", "split_seed", "cases", "epochs", "patience")
    )
    return [r for r in old.get("rows", []) if same and r["name"] not in names]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-coldstart",
        description="The strict cold-item protocol on MovieLens-100K (or --data): a tenth of the "
        "items never seen in training or validation; each interaction with one ranked among the "
        "cold items and among every item. Writes simulations/results/coldstart.json and .md "
        "(coldstart-<name>.json and .md with --data).",
        epilog=f"Rows: {', '.join(REFERENCES)}, {', '.join(ROWS)}. Hybrid, text-only and "
        "id-only with three seeds took 64 minutes on 2 CPU cores, the other single-model rows 11 "
        "to 14 minutes each; hybrid+text-only, a hybrid and a text-only model a seed, 28 minutes.",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        choices=list(ROWS),
        help="model rows to run (default: all); the others are kept from the results file. "
        "With no names, only the reference rows are computed",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=list(SEEDS), help="training seeds (42 43 44)"
    )
    parser.add_argument("--fraction", type=float, default=0.1, help="share of cold items (0.1)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the cold items (0)")
    parser.add_argument(
        "--epochs", type=int, default=EPOCHS, help=f"most epochs of a run ({EPOCHS})"
    )
    parser.add_argument(
        "--patience", type=int, default=PATIENCE, help=f"epochs without gain ({PATIENCE})"
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="another dataset instead of MovieLens-100K: a directory or file that "
        "dataset = 'path' reads (GroupLens ml-1m, movies.csv + ratings.csv, or a generic CSV "
        "pair; docs/running.md); results then go to coldstart-<name>.json",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--models",
        type=Path,
        help="where the trained models, the warm and cold catalogs and the cases are kept for "
        "fedrec-freshness (default: outputs/coldstart, or outputs/coldstart-<name> with --data)",
    )
    args = parser.parse_args(argv)
    suffix = f"-{args.data.resolve().name}" if args.data else ""
    results_file = args.out / COLDSTART_FILE.replace(".json", f"{suffix}.json")
    args.models = args.models or Path(f"outputs/coldstart{suffix}")

    from common.task import item_states, load_data  # torch: after --help

    base = Config.from_toml(CONFIGS / "bench-central.toml")
    if args.data:
        base = base.merged({"dataset": "path", "data-path": str(args.data)})
    dataset, _ = load_data(base)
    split = cold_split(dataset, fraction=args.fraction, seed=args.split_seed)
    print(
        f"{split.num_cold} cold items of {len(split.full)}, {len(split.cases)} cold interactions",
        flush=True,
    )
    states = {}  # by adapter-k (k > 0 needs token states), encoded when a row needs them
    write_split(split, args.models)
    rows = reference_rows(split)
    for name in list(ROWS) if args.only is None else args.only:
        configs = {m: base.merged(VARIANTS[m]) for m in ENSEMBLES.get(name, (name,))}
        for cfg in configs.values():
            if cfg.adapter_k not in states:
                states[cfg.adapter_k] = item_states(cfg, split.full)
        if name in ENSEMBLES:
            runs = [
                ensemble_run(
                    {m: cfg.replace(seed=s) for m, cfg in configs.items()},
                    split,
                    states,
                    epochs=args.epochs,
                    patience=args.patience,
                    name=name,
                )
                for s in args.seeds
            ]
        else:
            cfg = configs[name]
            runs = [
                variant_run(
                    cfg.replace(seed=s),
                    split,
                    states[cfg.adapter_k],
                    epochs=args.epochs,
                    patience=args.patience,
                    name=name,
                    save_to=args.models / f"{name}-seed{s}",
                )
                for s in args.seeds
            ]
        rows.append(mean_row(name, runs))
        print(f"{name}: cold HR@10 {rows[-1]['cold']['hr@10']:.4f}", flush=True)
    result = {
        "protocol": "strict cold items",
        "dataset": args.data.resolve().name if args.data else "ml-100k",
        "epochs": args.epochs,
        "patience": args.patience,
        "items": len(split.full),
        "cold_items": split.num_cold,
        "fraction": args.fraction,
        "split_seed": args.split_seed,
        "cases": len(split.cases),
        "users": len({c.user for c in split.cases}),
        "rows": rows,
    }
    rows += kept_rows(results_file, result, {r["name"] for r in rows})
    order = [*REFERENCES, *ROWS]
    result["rows"] = sorted(rows, key=lambda r: order.index(r["name"]))
    args.out.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(result, indent=2) + "\n")
    results_file.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
