"""fedrec-benchmark: quality, speed and traffic on MovieLens-100K, written to simulations/results/.

Every row follows notes/protocol.md: per-user chronological leave-last-two split with a stable
tie-break, full ranking over all 1,682 items, items seen before the target excluded, ties
counted against the target, test split read once per row. Rows:

- popularity: items ranked by training-interaction count;
- central-k*: the same model trained centrally (no federation, no privacy), one epoch at a
  time, the epoch chosen on validation;
- every scenario in simulations/configs/bench-*.toml, run through Flower's simulation runtime
  with the real SuperLink (simulations/run.py); its final round's test metrics.

Results: `quality_ml100k.json` (one row per model), `quality_ml100k.md` (the table), and the
README's results block between its `<!-- results:quality -->` markers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from common.config import Config
from common.metrics import peak_rss_mb, rank_of_target, ranking_metrics
from common.task import build_model, eval_cases, item_states, load_data, train_examples
from common.train import evaluate, train
from common.weights import load_trainable_state, trainable_state
from simulations import report

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "simulations" / "configs"
RESULTS = ROOT / "simulations" / "results"
QUALITY_FILE = "quality_ml100k.json"
README = ROOT / "README.md"
MARK_BEGIN, MARK_END = "<!-- results:quality -->", "<!-- /results:quality -->"


def popularity_row(cfg: Config) -> dict:
    """Rank by how often each item appears in the interactions before the target."""
    start = time.perf_counter()
    dataset, splits = load_data(cfg)
    n = len(dataset.catalog)
    counts = np.zeros(n)
    for u in splits:  # test targets rank after train + valid: count both
        np.add.at(counts, u.train, 1.0)
        if u.valid >= 0:
            counts[u.valid] += 1.0
    # a tiny id-based jitter breaks count ties deterministically (ties would count against)
    scores = counts + np.linspace(0, 1e-3, n)
    ranks = [rank_of_target(scores, c.target, c.exclude) for c in eval_cases(list(splits), "test")]
    return _row(
        "popularity",
        federated=False,
        dp_epsilon=None,
        rounds=None,
        k=None,
        metrics=ranking_metrics(np.array(ranks)),
        wall_s=time.perf_counter() - start,
    )


def central_row(name: str, cfg: Config, *, epochs: int, time_budget_s: float | None) -> dict:
    """Train on every user's data at once; keep the epoch with the best validation NDCG@10."""
    start = time.perf_counter()
    dataset, splits = load_data(cfg)
    items = item_states(cfg, dataset.catalog)
    model = build_model(cfg, num_items=len(dataset.catalog))
    users = list(splits)
    examples = train_examples(cfg, users)
    valid = eval_cases(users, "valid")
    best, best_state, curve = -1.0, None, []
    for epoch in range(epochs):
        result = train(
            model=model,
            cfg=cfg,
            examples=examples,
            items=items,
            epochs=1,
            seed=cfg.seed + epoch,
            max_seconds=_left(start, time_budget_s),
        )
        metrics, _ = evaluate(model=model, cfg=cfg, items=items, cases=valid)
        curve.append(
            {
                "epoch": epoch + 1,
                "loss": result.loss,
                "steps": result.steps,
                "val_ndcg@10": metrics["ndcg@10"],
                "seconds": result.seconds,
            }
        )
        print(
            f"  {name} epoch {epoch + 1}: loss {result.loss:.4f} "
            f"val NDCG@10 {metrics['ndcg@10']:.4f} ({result.seconds:.0f} s)",
            flush=True,
        )
        if metrics["ndcg@10"] > best:
            best, best_state = metrics["ndcg@10"], trainable_state(model)
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
    load_trainable_state(model, best_state)
    test, _ = evaluate(model=model, cfg=cfg, items=items, cases=eval_cases(users, "test"))
    row = _row(
        name,
        federated=False,
        dp_epsilon=None,
        rounds=None,
        k=cfg.adapter_k,
        metrics=test,
        wall_s=time.perf_counter() - start,
    )
    row.update(
        epochs=len(curve),
        curve=curve,
        peak_rss_mb=peak_rss_mb(),
        val_ndcg_at_10=best,
        config=_config_diff(cfg),
    )
    return row


def _left(start: float, budget: float | None) -> float | None:
    return None if budget is None else max(budget - (time.perf_counter() - start), 1.0)


def federated_row(
    scenario: Path, *, output_root: Path, results_dir: Path = RESULTS, reuse: bool = False
) -> dict:
    """Run a scenario through simulations/run.py (real SuperLink) and read its final round.

    With `reuse`, a completed run already in the output directory whose last round is the
    scenario's last round is read instead of run again (e.g. one extended with resume=true).
    """
    with open(scenario, "rb") as fh:
        spec = tomllib.load(fh)
    name = spec.get("scenario", {}).get("name", scenario.stem)
    out = output_root / name
    cfg = Config().merged(spec.get("run", {}))
    if reuse and _completed_rounds(out) == cfg.num_server_rounds:
        print(f"\n== {name}: reusing the completed run in {out}", flush=True)
    else:
        _run_scenario(scenario, out)
    # the run's curves next to the results: per-round metrics and the plot
    results_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "metrics.jsonl", results_dir / f"{name}.metrics.jsonl")
    shutil.copyfile(out / "metrics.png", results_dir / f"{name}.png")
    return _read_federated(spec, out, name=name, cfg=cfg)


def _completed_rounds(out: Path) -> int | None:
    try:
        results = json.loads((out / "results.json").read_text())
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    if results.get("status") != "finished:completed" or not rows:
        return None
    return rows[-1].get("round")


def _run_scenario(scenario: Path, out: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        "--config",
        str(scenario),
        "--output",
        str(out),
        "--overwrite",
    ]
    print(f"\n== {out.name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def _read_federated(spec: dict, out: Path, *, name: str, cfg: Config) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    trained = [r for r in rows if r.get("round", 0) > 0]
    metrics = {k: final[f"test_{k}"] for k in ("hr@10", "ndcg@10", "mrr@10")}
    row = _row(
        name,
        federated=True,
        dp_epsilon=final.get("epsilon_max") if cfg.dp_enabled else None,
        rounds=final["round"],
        k=cfg.adapter_k,
        metrics=metrics,
        # the server's time summed over all rounds (a resumed run's parts included)
        wall_s=float(sum(r.get("round_s") or 0.0 for r in rows)),
    )
    row.update(
        clients=spec["federation"]["num-supernodes"],
        clients_per_round=float(np.mean([r.get("clients_train", 0) for r in trained])),
        seconds_per_round=float(np.mean([r["round_s"] for r in trained])),
        seconds_per_client_update=_mean(trained, "client_update_s_mean"),
        bytes_per_client_per_round=_mean(trained, "bytes_per_client"),
        client_peak_rss_mb=max((r.get("client_peak_rss_mb") or 0) for r in trained),
        server_peak_rss_mb=max((r.get("server_peak_rss_mb") or 0) for r in trained),
        val_ndcg_at_10=final.get("val_ndcg@10"),
        config=_config_diff(cfg),
    )
    if cfg.dp_enabled:
        row.update(
            dp_delta=cfg.dp_delta,
            dp_unit="record",
            dp_accountant="rdp",
            dp_composition="cumulative",
            dp_epsilon_mean=final.get("epsilon_mean"),
            dp_target_epsilon=cfg.dp_target_epsilon,
            clients_declined_last_round=final.get("clients_declined"),
        )
    return row


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _row(name, *, federated, dp_epsilon, rounds, k, metrics, wall_s) -> dict:
    return {
        "name": name,
        "federated": federated,
        "dp_epsilon": dp_epsilon,
        "split": "test",
        "hr@10": metrics["hr@10"],
        "ndcg@10": metrics["ndcg@10"],
        "mrr@10": metrics["mrr@10"],
        "rounds": rounds,
        "adapter_k": k,
        "wall_s": wall_s,
    }


def _config_diff(cfg: Config) -> dict:
    """The config keys that differ from the defaults."""
    default = Config().to_mapping()
    return {k: v for k, v in cfg.to_mapping().items() if default[k] != v}


def markdown_table(rows: list[dict]) -> str:
    """The results table, as the README shows it."""
    lines = [
        "| model | federated | DP (record-level ε, δ) | k | rounds | HR@10 | NDCG@10 | MRR@10 "
        "| s/round | s/client update | bytes/client/round | peak RSS MB | wall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        dp = (
            f"ε={r['dp_epsilon']:.2f}, δ={r['dp_delta']:g}"
            if r.get("dp_epsilon") is not None
            else "off"
        )
        lines.append(
            f"| {r['name']} | {'yes' if r['federated'] else 'no'} | {dp} "
            f"| {_fmt(r.get('adapter_k'), '{}')} | {_fmt(r.get('rounds'), '{}')} "
            f"| {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} "
            f"| {_fmt(r.get('seconds_per_round'), '{:.1f}')} "
            f"| {_fmt(r.get('seconds_per_client_update'), '{:.2f}')} "
            f"| {_fmt(r.get('bytes_per_client_per_round'), '{:,.0f}')} "
            f"| {_peak(r)} "
            f"| {_fmt(r.get('wall_s'), '{:.0f} s')} |"
        )
    return "\n".join(lines)


def _peak(row: dict) -> str:
    """Peak resident memory: the process for central rows, client / server for federated."""
    if row.get("client_peak_rss_mb"):
        return f"{row['client_peak_rss_mb']:.0f} / {row['server_peak_rss_mb']:.0f}"
    return _fmt(row.get("peak_rss_mb"), "{:.0f}")


def _fmt(value, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def write_results(rows: list[dict], results_dir: Path, readme: Path = README) -> None:
    """The JSON rows, the markdown table and the README's results block."""
    report.write_results(
        results_dir / QUALITY_FILE,
        rows,
        markdown_table(rows),
        readme=readme,
        begin=MARK_BEGIN,
        end=MARK_END,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-benchmark",
        description=__doc__.split("\n\n")[0],
        epilog="Rows: popularity, central-k0, central-k1 and every simulations/configs/"
        "bench-fed*.toml scenario. Takes about an hour on a 2-core CPU.",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="row names to (re)run; other rows are kept from the results file",
    )
    parser.add_argument(
        "--central-epochs",
        type=int,
        default=5,
        help="epochs of the central rows; the best on validation is tested (default: 5)",
    )
    parser.add_argument(
        "--central-k1-budget-s",
        type=float,
        default=300.0,
        help="wall-clock budget of the k=1 central row (it is ~50x costlier)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read completed federated runs already in --outputs instead of running them",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="rewrite the markdown table and README block from the results file; run nothing",
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help=f"where results go (default: {RESULTS})"
    )
    parser.add_argument(
        "--outputs",
        type=Path,
        default=ROOT / "outputs" / "benchmark",
        help="where the federated runs write their models and logs",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    path = args.results / QUALITY_FILE
    rows = {r["name"]: r for r in json.loads(path.read_text())} if path.exists() else {}

    if args.table_only:
        write_results(list(rows.values()), args.results)
        print(markdown_table(list(rows.values())))
        return 0

    def wanted(name: str) -> bool:
        return args.only is None or name in args.only

    base = Config.from_toml(CONFIGS / "bench-central.toml")
    jobs = [
        ("popularity", lambda: popularity_row(base)),
        (
            "central-k0",
            lambda: central_row("central-k0", base, epochs=args.central_epochs, time_budget_s=None),
        ),
        (
            "central-k1",
            lambda: central_row(
                "central-k1",
                Config.from_toml(CONFIGS / "bench-central-k1.toml"),
                epochs=args.central_epochs,
                time_budget_s=args.central_k1_budget_s,
            ),
        ),
    ]
    for scenario in sorted(CONFIGS.glob("bench-fed*.toml")):
        name = tomllib.loads(scenario.read_text()).get("scenario", {}).get("name", scenario.stem)
        jobs.append(
            (
                name,
                lambda s=scenario: federated_row(
                    s, output_root=args.outputs, results_dir=args.results, reuse=args.reuse
                ),
            )
        )
    for name, job in jobs:
        if not wanted(name):
            continue
        print(f"\n== {name}", flush=True)
        rows[name] = job()
        print(json.dumps({k: rows[name][k] for k in ("hr@10", "ndcg@10", "mrr@10", "wall_s")}))
        write_results(list(rows.values()), args.results)  # after every row: nothing is lost
    print("\n" + markdown_table(list(rows.values())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
