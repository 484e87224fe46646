"""fedrec-benchmark: quality, speed and traffic on MovieLens-100K, written to simulations/results/.

Every row follows notes/protocol.md: per-user chronological leave-last-two split with a stable
tie-break, full ranking over all 1,682 items, items seen before the target excluded, ties
counted against the target. Each seeded row selects its model on validation and reads the test
split once, for that model; a row reports the mean and standard deviation over its seeds.

- popularity: items ranked by training-interaction count (no seed);
- central-k*: the model trained centrally (no federation, no privacy), epoch by epoch, the
  epoch with the best validation NDCG@10 tested (simulations/configs/bench-central*.toml);
- every scenario in simulations/configs/bench-fed*.toml, run through Flower's simulation
  runtime with the real SuperLink (simulations/run.py), once per seed; the server keeps the
  round with the best validation NDCG@10 and tests it after the last round.

Results: `quality_ml100k.json` (one row per model, per-seed values inside), `quality_ml100k.md`
(the table), its block in docs/results.md (`<!-- results:quality -->` markers) and the
README's headline table (`<!-- results:headline -->`).
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

from common.config import Config
from common.metrics import peak_rss_mb
from common.rounds import read_rows
from simulations import report
from simulations.central import train_central
from simulations.report import CONFIGS, README, RESULTS, ROOT

QUALITY_FILE = "quality_ml100k.json"
MARK_BEGIN, MARK_END = "<!-- results:quality -->", "<!-- /results:quality -->"
HEADLINE_BEGIN, HEADLINE_END = "<!-- results:headline -->", "<!-- /results:headline -->"
METRICS = ("hr@10", "ndcg@10", "mrr@10")
SEEDS = (42, 43, 44)


def popularity_row(cfg: Config) -> dict:
    """Rank by how often each item appears in the interactions before the target."""
    from common.task import load_data, popularity_metrics

    start = time.perf_counter()
    dataset, splits = load_data(cfg)
    metrics = popularity_metrics(list(splits), len(dataset.catalog), "test")
    run = {"seed": None, **metrics, "wall_s": time.perf_counter() - start}
    return _row("popularity", [run], federated=False, k=None)


def central_run(cfg: Config, *, epochs: int, patience: int, name: str) -> dict:
    """One seed: train on every user's data at once, epoch by epoch; test the best epoch."""
    # torch, the model and the trainer: imported where used, so --help answers at once
    from common.task import eval_cases, item_states, load_data
    from common.train import evaluate

    start = time.perf_counter()
    dataset, splits = load_data(cfg)
    items = item_states(cfg, dataset.catalog)
    users = list(splits)
    model, run = train_central(
        cfg,
        items=items,
        users=users,
        num_items=len(dataset.catalog),
        epochs=epochs,
        patience=patience,
        name=name,
    )
    test, _ = evaluate(model=model, cfg=cfg, items=items, cases=eval_cases(users, "test"))
    curve = run.pop("curve")
    return {
        "seed": cfg.seed,
        **test,
        **run,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "curve": curve,
    }


def central_row(name: str, cfg: Config, *, seeds: list[int], epochs: int, patience: int) -> dict:
    """The central model, one run per seed."""
    runs = [
        central_run(cfg.replace(seed=s), epochs=epochs, patience=patience, name=name) for s in seeds
    ]
    row = _row(name, runs, federated=False, k=cfg.adapter_k)
    row.update(
        seconds_per_epoch=float(np.mean([r["seconds_per_epoch"] for r in runs])),
        peak_rss_mb=max(r["peak_rss_mb"] for r in runs),
        config=_config_diff(cfg),
    )
    return row


def federated_row(
    scenario: Path,
    *,
    seeds: list[int],
    output_root: Path,
    results_dir: Path = RESULTS,
    reuse: bool = False,
    stored: dict | None = None,
) -> dict:
    """A scenario through simulations/run.py (real SuperLink), once per seed; or, when its
    [scenario] says runtime = "in-process", through simulations/inprocess.py (Flower's runtime
    left out, the apps unchanged). [scenario] `seeds = N` keeps the first N seeds only.

    With `reuse`, a completed run already in a seed's output directory whose last round is the
    scenario's last round is read instead of run again (e.g. one extended with resume=true).
    `stored`, the row as the results file has it: its seeds not in `seeds` are kept when it
    was run with the same run config, so a row can be completed seed by seed.
    """
    spec = tomllib.loads(scenario.read_text())
    name = spec.get("scenario", {}).get("name", scenario.stem)
    cfg = Config().merged(spec.get("run", {}))
    runtime = spec.get("scenario", {}).get("runtime", "flower")
    seeds = seeds[: spec.get("scenario", {}).get("seeds", len(seeds))]
    runs = []
    for seed in seeds:
        out = output_root / name / f"seed-{seed}"
        if reuse and _completed_rounds(out) == cfg.num_server_rounds:
            print(f"\n== {name} seed {seed}: reusing the completed run in {out}", flush=True)
        else:
            _run_scenario(scenario, out, seed, runtime=runtime)
        runs.append(_read_federated(out, seed=seed))
    config = _config_diff(cfg)
    runs = report.merged_seeds(stored_runs(stored, config=config), runs)
    if kept := [str(r["seed"]) for r in runs if r["seed"] not in seeds]:
        print(f"\n== {name}: kept stored seeds {', '.join(kept)}", flush=True)
    # the lowest seed's curves next to the results (a kept seed's are there already)
    if runs[0]["seed"] in seeds:
        first = output_root / name / f"seed-{runs[0]['seed']}"
        results_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first / "metrics.jsonl", results_dir / f"{name}.metrics.jsonl")
        shutil.copyfile(first / "metrics.png", results_dir / f"{name}.png")
    row = _row(name, runs, federated=True, k=cfg.adapter_k)
    row["runtime"] = runtime
    trained_means = {
        key: _mean(runs, key)
        for key in (
            "seconds_per_round",
            "seconds_per_client_update",
            "bytes_per_client_per_round",
            "clients_per_round",
        )
    }
    row.update(
        rounds=cfg.num_server_rounds,
        clients=spec["federation"]["num-supernodes"],
        **trained_means,
        client_peak_rss_mb=max(r["client_peak_rss_mb"] for r in runs),
        server_peak_rss_mb=max(r["server_peak_rss_mb"] for r in runs),
        config=config,
    )
    if cfg.dp_enabled:
        from common.privacy import ACCOUNTANT, COMPOSITION, UNIT  # opacus: slow to import

        row.update(
            dp_mode=cfg.dp_mode,
            dp_epsilon=max(r["epsilon"] for r in runs),
            dp_delta=cfg.dp_delta,
            dp_unit=UNIT,
            dp_accountant=ACCOUNTANT,
            dp_composition=COMPOSITION[cfg.dp_mode],
            dp_noise_multiplier=runs[-1].get("dp_noise_multiplier"),
            dp_target_epsilon=cfg.dp_target_epsilon,
        )
    return row


def stored_runs(stored: dict | None, *, config: dict) -> list[dict]:
    """The stored row's per-seed runs, if it was run with this run `config`; else none."""
    if not stored or stored.get("config") != json.loads(json.dumps(config)):
        return []
    return stored.get("per_seed", [])


def _completed_rounds(out: Path) -> int | None:
    try:
        results = json.loads((out / "results.json").read_text())
        rows = read_rows(out / "metrics.jsonl")
    except (OSError, ValueError):
        return None
    if results.get("status") != "finished:completed" or not rows:
        return None
    return rows[-1].get("round")


def _run_scenario(scenario: Path, out: Path, seed: int, *, runtime: str = "flower") -> None:
    if runtime == "in-process":
        cmd = [sys.executable, "-m", "simulations.inprocess", "--seed", str(seed)]
        cmd += ["--config", str(scenario), "--output", str(out)]
    elif runtime == "flower":
        cmd = [sys.executable, "-m", "simulations.run", "--config", str(scenario)]
        cmd += ["--output", str(out), "--run-config", f"seed={seed}", "--overwrite"]
    else:
        raise ValueError(f"{scenario}: runtime must be 'flower' or 'in-process', got {runtime!r}")
    print(f"\n== {out.parent.name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def _read_federated(out: Path, *, seed: int) -> dict:
    rows = read_rows(out / "metrics.jsonl")
    final = rows[-1]
    trained = [r for r in rows if r.get("round", 0) > 0]
    return {
        "seed": seed,
        **{k: final[f"test_{k}"] for k in METRICS},
        "val_ndcg@10": final.get("best_val_ndcg10"),
        "best_round": final.get("best_round"),
        # the server's time summed over all rounds (a resumed run's parts included)
        "wall_s": float(sum(r.get("round_s") or 0.0 for r in rows)),
        "seconds_per_round": float(np.mean([r["round_s"] for r in trained])),
        "seconds_per_client_update": _mean(trained, "client_update_s_mean"),
        "bytes_per_client_per_round": _mean(trained, "bytes_per_client"),
        "clients_per_round": _mean(trained, "clients_train"),
        "client_peak_rss_mb": max((r.get("client_peak_rss_mb") or 0) for r in trained),
        "server_peak_rss_mb": max((r.get("server_peak_rss_mb") or 0) for r in trained),
        "epsilon": final.get("epsilon"),
        "dp_noise_multiplier": final.get("dp_noise_multiplier"),
    }


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _row(name: str, runs: list[dict], *, federated: bool, k: int | None) -> dict:
    """Mean and standard deviation over the seeds' test metrics, and each seed's own."""
    row: dict = {"name": name, "federated": federated, "adapter_k": k, "split": "test"}
    row["seeds"] = [r["seed"] for r in runs]
    for key in METRICS:
        values = np.array([r[key] for r in runs], dtype=float)
        row[key] = float(values.mean())
        row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
    vals = [r["val_ndcg@10"] for r in runs if r.get("val_ndcg@10") is not None]
    row["val_ndcg@10"] = float(np.mean(vals)) if vals else None
    row["wall_s"] = float(np.mean([r["wall_s"] for r in runs]))
    row["dp_epsilon"] = None
    row["per_seed"] = runs
    return row


def _config_diff(cfg: Config) -> dict:
    """The config keys that differ from the defaults."""
    default = Config().to_mapping()
    return {k: v for k, v in cfg.to_mapping().items() if default[k] != v}


def markdown_table(rows: list[dict]) -> str:
    """The whole results table, as docs/results.md shows it."""
    lines = [
        "| model | federated | DP (ε, δ, unit) | k | seeds | rounds | HR@10 | NDCG@10 | MRR@10 "
        "| s/round | bytes/client/round | peak RSS MB | wall per seed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        dp = (
            f"ε={r['dp_epsilon']:.2f}, δ={r['dp_delta']:g}, {r.get('dp_unit', '?')}"
            if r.get("dp_epsilon") is not None
            else "off"
        )
        lines.append(
            f"| {r['name']} | {_federated(r)} | {dp} "
            f"| {_fmt(r.get('adapter_k'), '{}')} | {_seeds(r)} | {_fmt(r.get('rounds'), '{}')} "
            f"| {_pm(r, 'hr@10')} | {_pm(r, 'ndcg@10')} | {_pm(r, 'mrr@10')} "
            f"| {_fmt(r.get('seconds_per_round'), '{:.1f}')} "
            f"| {_fmt(r.get('bytes_per_client_per_round'), '{:,.0f}')} "
            f"| {_peak(r)} "
            f"| {_fmt(r.get('wall_s'), '{:.0f} s')} |"
        )
    return "\n".join(lines)


def headline_table(rows: list[dict]) -> str:
    """The README's short table: what each row is and its test NDCG@10 and HR@10."""
    lines = [
        "| model | trained | privacy | seeds | test NDCG@10 | test HR@10 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        trained = "—" if r["name"] == "popularity" else _federated(r)
        if trained == "no":
            trained = "centrally"
        privacy = (
            f"user-level ε = {r['dp_epsilon']:.0f}" if r.get("dp_epsilon") is not None else "none"
        )
        lines.append(
            f"| {r['name']} | {trained} | {privacy} | {_seeds(r)} "
            f"| {_pm(r, 'ndcg@10')} | {_pm(r, 'hr@10')} |"
        )
    return "\n".join(lines)


def _seeds(row: dict) -> int | str:
    """How many seeds a row averages ("—" for an unseeded row such as popularity)."""
    return len(row.get("seeds") or []) if row.get("seeds") != [None] else "—"


def _pm(row: dict, key: str) -> str:
    std = row.get(f"{key}_std")
    return f"{row[key]:.4f}" if std is None else f"{row[key]:.4f} ± {std:.4f}"


def _peak(row: dict) -> str:
    """Peak resident memory: the process for central rows, client / server for federated."""
    if row.get("client_peak_rss_mb"):
        return f"{row['client_peak_rss_mb']:.0f} / {row['server_peak_rss_mb']:.0f}"
    return _fmt(row.get("peak_rss_mb"), "{:.0f}")


def _federated(row: dict) -> str:
    if not row["federated"]:
        return "no"
    return "yes, in-process" if row.get("runtime") == "in-process" else "yes, Flower runtime"


def _fmt(value, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def write_results(rows: list[dict], results_dir: Path, readme: Path = README) -> None:
    """The JSON rows, the markdown table, its block in the docs and the README's headline."""
    report.write_results(
        results_dir / QUALITY_FILE,
        rows,
        markdown_table(rows),
        readme=readme,
        begin=MARK_BEGIN,
        end=MARK_END,
    )
    report.replace_block(readme, HEADLINE_BEGIN, HEADLINE_END, headline_table(rows))


def scenarios(stem: str) -> list[Path]:
    """The scenario files of a kind: `stem`.toml first, then its variants by name."""
    return sorted(CONFIGS.glob(f"{stem}*.toml"), key=lambda p: (p.stem != stem, p.name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-benchmark",
        description=__doc__.split("\n\n")[0],
        epilog="Rows: popularity, central-k0, central-k1 and every simulations/configs/"
        "bench-fed*.toml scenario, each with three seeds. Takes several hours on a 2-core CPU; "
        "--only reruns some rows and keeps the others; a federated row rerun with --seeds "
        "keeps its stored seeds not named there when its run config is unchanged.",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="row names to (re)run; other rows are kept from the results file",
    )
    parser.add_argument(
        "--seeds",
        default=",".join(map(str, SEEDS)),
        help=f"comma-separated seeds of every seeded row (default: {','.join(map(str, SEEDS))})",
    )
    parser.add_argument(
        "--central-epochs",
        type=int,
        default=40,
        help="most epochs of a central run; the best on validation is tested (default: 40)",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=8,
        help="a central run stops after this many epochs without a better validation score",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read completed federated runs already in --outputs instead of running them",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="rewrite the markdown tables (docs, README) from the results file; run nothing",
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
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    path = args.results / QUALITY_FILE
    rows = report.rows_by_name(path)

    def wanted(name: str) -> bool:
        return args.only is None or name in args.only

    base = Config.from_toml(CONFIGS / "bench-central.toml")
    jobs = [("popularity", lambda: popularity_row(base))]
    for scenario in scenarios("bench-central"):
        name = tomllib.loads(scenario.read_text()).get("scenario", {}).get("name", scenario.stem)
        jobs.append(
            (
                name,
                lambda s=scenario, n=name: central_row(
                    n,
                    Config.from_toml(s),
                    seeds=seeds,
                    epochs=args.central_epochs,
                    patience=args.patience,
                ),
            )
        )
    for scenario in scenarios("bench-fed"):
        name = tomllib.loads(scenario.read_text()).get("scenario", {}).get("name", scenario.stem)
        jobs.append(
            (
                name,
                lambda s=scenario, n=name: federated_row(
                    s,
                    seeds=seeds,
                    output_root=args.outputs,
                    results_dir=args.results,
                    reuse=args.reuse,
                    stored=rows.get(n),
                ),
            )
        )
    order = {name: i for i, (name, _) in enumerate(jobs)}

    def ordered() -> list[dict]:  # the rows in the order of the jobs, unknown names last
        return sorted(rows.values(), key=lambda r: order.get(r["name"], len(order)))

    if args.table_only:
        write_results(ordered(), args.results)
        print(markdown_table(ordered()))
        return 0
    for name, job in jobs:
        if not wanted(name):
            continue
        print(f"\n== {name}", flush=True)
        row = job()
        rows.update(report.rows_by_name(path))  # another process may have written rows meanwhile
        rows[name] = row
        print(json.dumps({k: rows[name][k] for k in (*METRICS, "ndcg@10_std", "wall_s")}))
        write_results(ordered(), args.results)  # after every row: nothing is lost
    print("\n" + markdown_table(ordered()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
