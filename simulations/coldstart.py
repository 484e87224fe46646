"""fedrec-coldstart: the strict cold-item protocol (notes/protocol.md's split, a tenth of the items
never seen in training or validation).

With a fixed seed, a fraction of the catalog's items (10% by default) becomes *cold*: every
interaction with them is removed from the users' sequences before the leave-last-out split, so
no model trains on them, is selected with them, or keeps an id row for them (the models are built
over the warm items only; a cold item is a new item, scored from its text alone). Each removed
interaction is then one case: the user's warm interactions before it are the history, the cold
item the target, ranked

- among the cold items only (which new item suits this user?), and
- among every item (does a new item reach the top 10 at all?),

items the user interacted with before the target excluded in both. Metrics are averaged over
cases. Ties are broken uniformly at random, in expectation: a model that gives every cold item
the same score (the id-only model, popularity) scores exactly as a random ranking would, where
counting ties against the target would put it below random.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.config import Config
from simulations.report import CONFIGS, RESULTS, markdown_table

if TYPE_CHECKING:  # torch-backed types: imported where used, so --help answers at once
    from common.backbone import ItemStates
    from common.data import Catalog, Dataset, UserSplit
    from common.model import Recommender

COLDSTART_FILE = "coldstart.json"
# what --models DIR holds for the freshness harness (simulations/freshness.py)
WARM_ITEMS, COLD_ITEMS, CASES_FILE = "warm_items.csv", "cold_items.csv", "cold_cases.jsonl"
K = 10
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
SCOPES = ("cold", "all")  # ranked among the cold items only / among every item


@dataclass(frozen=True)
class ColdCase:
    """One interaction with a cold item, indices into the full (warm, then cold) catalog."""

    user: int  # internal user index
    history: np.ndarray  # the user's warm items before the target, oldest first
    target: int  # a cold item: index >= the number of warm items
    seen: np.ndarray  # every item the user interacted with before the target (warm and cold)


@dataclass(frozen=True)
class ColdSplit:
    """The data of the protocol: what models train on and the cases they are scored on."""

    warm: Catalog  # the warm items, in catalog order: what models are built over
    full: Catalog  # the warm items, then the cold ones (cold item c has index len(warm) + c)
    users: tuple[UserSplit, ...]  # leave-last-out splits of each user's warm sequence
    cases: tuple[ColdCase, ...]

    @property
    def num_warm(self) -> int:
        return len(self.warm)

    @property
    def num_cold(self) -> int:
        return len(self.full) - len(self.warm)


def cold_split(dataset: Dataset, *, fraction: float = 0.1, seed: int = 0) -> ColdSplit:
    """Make `fraction` of the items cold (chosen with `seed`) and split the rest as usual."""
    from common.data import Catalog, Interactions, split_by_user

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"The cold fraction must lie in (0, 1), got {fraction}.")
    catalog, inter = dataset.catalog, dataset.interactions
    n = len(catalog)
    num_cold = max(1, round(fraction * n))
    is_cold = np.zeros(n, dtype=bool)
    is_cold[np.random.default_rng(seed).choice(n, size=num_cold, replace=False)] = True
    # new index: warm items first, in catalog order, then the cold ones, in catalog order
    order = np.r_[np.flatnonzero(~is_cold), np.flatnonzero(is_cold)]
    new_index = np.empty(n, dtype=np.int64)
    new_index[order] = np.arange(n)
    full = Catalog(
        tuple(catalog.item_ids[i] for i in order), tuple(catalog.texts[i] for i in order)
    )
    num_warm = n - num_cold
    warm = Catalog(full.item_ids[:num_warm], full.texts[:num_warm])

    items = new_index[inter.item]
    keep = ~is_cold[inter.item]
    warm_inter = Interactions(
        user=inter.user[keep],
        item=items[keep],
        timestamp=inter.timestamp[keep],
        user_ids=inter.user_ids,
    )
    # each user's whole sequence in the split's order: (user, timestamp, row in the file)
    rows = np.arange(len(inter))
    chrono = np.lexsort((rows, inter.timestamp, inter.user))
    cases = []
    for user_rows in np.split(chrono, np.flatnonzero(np.diff(inter.user[chrono])) + 1):
        sequence = items[user_rows]
        cold_at = np.flatnonzero(sequence >= num_warm)
        for position in cold_at:
            before = sequence[:position]
            cases.append(
                ColdCase(
                    user=int(inter.user[user_rows[0]]),
                    history=before[before < num_warm],
                    target=int(sequence[position]),
                    seen=np.unique(before),
                )
            )
    return ColdSplit(warm, full, tuple(split_by_user(warm_inter)), tuple(cases))


def expected_metrics(greater: np.ndarray, ties: np.ndarray, k: int = K) -> dict[str, np.ndarray]:
    """Per case, HR@k / NDCG@k / MRR@k in expectation over a uniform order of the tied items.

    `greater`: candidates scoring above the target; `ties`: the others scoring exactly as it.
    The target's rank is then uniform on greater + 1 .. greater + ties + 1.
    """
    ranks = np.arange(1, k + 1, dtype=np.float64)  # only ranks <= k count
    gains = {"hr": np.ones(k), "ndcg": 1.0 / np.log2(ranks + 1.0), "mrr": 1.0 / ranks}
    # cum[r]: the gain of ranks 1..r together, so ranks a + 1 .. b gain cum[b] - cum[a]
    cum = {name: np.r_[0.0, np.cumsum(g)] for name, g in gains.items()}
    first = np.minimum(greater, k)  # ranks greater + 1 .. last, cut at k
    last = np.minimum(greater + ties + 1, k)
    width = ties + 1.0
    return {f"{name}@{k}": (c[last] - c[first]) / width for name, c in cum.items()}


def case_metrics(scores: np.ndarray, split: ColdSplit, scope: str) -> dict[str, np.ndarray]:
    """Per-case metrics of (cases, full catalog) scores, ranked among `scope`'s candidates."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}.")
    greater = np.zeros(len(split.cases), dtype=np.int64)
    ties = np.zeros(len(split.cases), dtype=np.int64)
    start = split.num_warm if scope == "cold" else 0
    for i, case in enumerate(split.cases):
        candidate = np.zeros(len(split.full), dtype=bool)
        candidate[start:] = True
        candidate[case.seen] = False
        candidate[case.target] = False
        row = scores[i, candidate]
        greater[i] = np.count_nonzero(row > scores[i, case.target])
        ties[i] = np.count_nonzero(row == scores[i, case.target])
    return expected_metrics(greater, ties)


def summary(per_case: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(values.mean()) for name, values in per_case.items()}


def reference_rows(split: ColdSplit) -> list[dict]:
    """Random ranking (every candidate tied), popularity (warm training counts; every cold item
    has none, so among the cold items popularity is random) and popularity-oracle.

    popularity-oracle is not a model: it reads the cold cases themselves. A cold item counts
    its cold interactions (the case's own left out), a warm one its training interactions: the
    ranking that knowing each new item's coming popularity exactly would give, to read a goal
    for the cold items against."""
    counts = np.zeros(len(split.full))
    for u in split.users:
        np.add.at(counts, u.train, 1.0)
    targets = np.array([c.target for c in split.cases], dtype=np.int64)
    oracle = np.tile(counts + np.bincount(targets, minlength=len(split.full)), (len(targets), 1))
    oracle[np.arange(len(targets)), targets] -= 1.0  # (cases, items): the case's own left out
    references = {
        "random": np.zeros((len(split.cases), len(split.full))),
        "popularity": np.broadcast_to(counts, (len(split.cases), len(split.full))),
        "popularity-oracle": oracle,
    }
    return [
        {"name": name, "seeds": [], **scoped(scores, split)} for name, scores in references.items()
    ]


def scoped(scores: np.ndarray, split: ColdSplit) -> dict[str, dict[str, float]]:
    return {scope: summary(case_metrics(scores, split, scope)) for scope in SCOPES}


def model_scores(model: Recommender, cfg: Config, items: ItemStates, split: ColdSplit):
    """Scores of every full-catalog item for every case: (cases, items), float64."""
    from common.records import left_pad
    from common.train import item_vectors, user_vectors

    vectors = item_vectors(model, items)  # (N, D): cold items past the id rows: text alone
    out = []
    for start in range(0, len(split.cases), 512):
        chunk = split.cases[start : start + 512]
        histories = np.stack([left_pad(c.history, cfg.history_len) for c in chunk])
        # item_vectors and user_vectors run without autograd: the product needs no no_grad
        out.append((user_vectors(model, vectors, histories) @ vectors.T).double().numpy())
    return np.concatenate(out)


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


def standardized(scores: np.ndarray) -> np.ndarray:
    """Each case's scores over the full catalog to mean 0 and standard deviation 1."""
    std = scores.std(axis=1, keepdims=True)
    return (scores - scores.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)


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


def write_split(split: ColdSplit, directory: Path) -> None:
    """The warm catalog (what the models know), the cold items (what a device adds later) and
    the cases by external ids, as the freshness harness reads them."""
    import csv

    from common.data import load_catalog

    directory.mkdir(parents=True, exist_ok=True)
    cold = range(split.num_warm, len(split.full))
    for name, positions in ((WARM_ITEMS, range(split.num_warm)), (COLD_ITEMS, cold)):
        with open(directory / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["item_id", "text"])
            writer.writerows([split.full.item_ids[i], split.full.texts[i]] for i in positions)
    if load_catalog(directory / WARM_ITEMS).fingerprint() != split.warm.fingerprint():
        raise ValueError(f"{directory / WARM_ITEMS} does not read back as the warm catalog.")
    ids = split.full.item_ids
    with open(directory / CASES_FILE, "w", encoding="utf-8") as f:
        for c in split.cases:
            case = {
                "user": int(c.user),
                "history": [ids[i] for i in c.history],
                "target": ids[c.target],
                "seen": [ids[i] for i in c.seen],
            }
            f.write(json.dumps(case) + "\n")


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
        "--only", nargs="+", choices=list(ROWS), help="model rows to run (default: all)"
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
    states = {0: item_states(base, split.full)}  # by adapter-k: k > 0 needs token states
    write_split(split, args.models)
    rows = reference_rows(split)
    for name in args.only or list(ROWS):
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
