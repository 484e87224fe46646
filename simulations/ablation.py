"""fedrec-ablation: which federated levers matter, at equal rounds.

Runs variants of the federated benchmark scenario (simulations/configs/bench-fed.toml) for the
same number of rounds with the ServerApp, strategies and ClientApp in this process
(simulations/inprocess.py: Flower's runtime left out, the code the same), and records each
variant's validation NDCG@10 curve. The variants are data: simulations/configs/ablation-fed.toml,
one table per variant with the run-config keys it changes. The tables compare validation only
(the server's one test of its selected round is kept in the JSON, for fedrec-reliability).
`--variants simulations/configs/ablation-dp.toml --scenario
simulations/configs/bench-fed-dp-eps8.toml` compares the levers of private training the same
way.

Writes simulations/results/<variants file's name>.json and .md (ablation_fed.json, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from common.rounds import read_rows
from simulations import report
from simulations.report import CONFIGS, RESULTS, ROOT


def run_variant(name: str, overrides: dict, *, rounds: int, scenario: Path, work: Path) -> dict:
    """One variant in this process: its validation curve and timing."""
    import torch

    from common.config import Config
    from simulations.inprocess import run_inprocess

    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    spec = tomllib.loads(scenario.read_text())
    out = work / name
    cfg = Config().merged(
        {
            **spec.get("run", {}),
            "num-server-rounds": rounds,
            "fraction-evaluate": 0.0,
            **overrides,
            "output-dir": str(out),
        }
    )
    start = time.perf_counter()
    run_inprocess(cfg)
    rows = read_rows(out / "metrics.jsonl")
    curve = [(r["round"], r["val_ndcg@10"]) for r in rows if r.get("val_ndcg@10") is not None]
    trained = [r for r in rows if r.get("round", 0) > 0]
    counts = ("clients_train", "clients_clipped", "clients_rejected", "clients_failed")
    return {
        "name": name,
        "overrides": overrides,
        "rounds": rounds,
        "val_ndcg@10_final": curve[-1][1],
        "val_ndcg@10_best": max(v for _, v in curve),
        "curve": curve,
        "seconds": time.perf_counter() - start,
        "bytes_per_client": trained[-1].get("bytes_per_client"),
        # the server's own test of the round it selected on validation (the ablation's tables
        # show validation only; fedrec-reliability reports this)
        "best_round": rows[-1].get("best_round"),
        "test_ndcg@10": rows[-1].get("test_ndcg@10"),
        **{key: sum(r.get(key) or 0 for r in trained) for key in counts},
    }


def markdown(rows: list[dict], rounds: int) -> str:
    """The table; when variants ran different numbers of rounds (an equal budget of client
    updates), the last column gives each one's rounds and client updates."""
    last = {r["curve"][-1][0] for r in rows}
    budget = len(last) > 1
    at = "at its last round" if budget else f"at round {rounds}"
    lines = [
        f"| variant | changes from the benchmark scenario | val NDCG@10 {at} "
        "| best val NDCG@10 (round) |" + (" rounds | client updates |" if budget else ""),
        "| --- | --- | --- | --- |" + (" --- | --- |" if budget else ""),
    ]
    for r in rows:
        best_round = max(r["curve"], key=lambda c: c[1])[0]
        changes = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "—"
        line = (
            f"| {r['name']} | {changes} | {r['val_ndcg@10_final']:.4f} "
            f"| {r['val_ndcg@10_best']:.4f} ({best_round}) |"
        )
        if budget:
            line += f" {r['curve'][-1][0]} | {r.get('clients_train', 0):,} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedrec-ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100, help="rounds per variant (100)")
    parser.add_argument("--only", nargs="*", help="variant names to (re)run; others are kept")
    parser.add_argument("--jobs", type=int, default=2, help="variants run at once (2)")
    parser.add_argument(
        "--variants", type=Path, default=CONFIGS / "ablation-fed.toml", help="variants file"
    )
    parser.add_argument(
        "--scenario",
        type=Path,
        default=CONFIGS / "bench-fed.toml",
        help="the scenario the variants change (default: bench-fed.toml)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="the directory results go to")
    parser.add_argument(
        "--table-only", action="store_true", help="rewrite the markdown from the results file"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args(argv)
    variants = tomllib.loads(args.variants.read_text())
    scenario = args.scenario

    if args.one:  # a worker process
        with tempfile.TemporaryDirectory(prefix="fedrec-ablation-") as tmp:
            row = run_variant(
                args.one, variants[args.one], rounds=args.rounds, scenario=scenario, work=Path(tmp)
            )
        print(json.dumps(row))
        return 0

    if args.results.exists() and not args.results.is_dir():
        parser.error(f"--results {args.results} is a file; give the directory results go to.")
    path = args.results / (args.variants.stem.replace("-", "_") + ".json")
    done = report.rows_by_name(path)
    if args.table_only:
        rows = [done[n] for n in variants if n in done]
        report.write_results(path, rows, markdown(rows, rows[0]["rounds"] if rows else 0))
        return 0
    todo = [n for n in variants if args.only is None or n in args.only]
    running: list[tuple[str, subprocess.Popen]] = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def finish(name: str, proc: subprocess.Popen) -> None:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            print(f"variant {name} failed (exit {proc.returncode})", flush=True)
            return
        # another runner may have written rows (and variants added) since this one started
        done.update(report.rows_by_name(path))
        done[name] = json.loads(out.strip().splitlines()[-1])
        order = list(tomllib.loads(args.variants.read_text()))
        rows = [done[n] for n in order if n in done]
        report.write_results(path, rows, markdown(rows, args.rounds))
        print(f"{name}: val NDCG@10 {done[name]['val_ndcg@10_final']:.4f}", flush=True)

    for name in todo:
        while len(running) >= args.jobs:
            for item in list(running):
                if item[1].poll() is not None:
                    running.remove(item)
                    finish(*item)
            time.sleep(2)
        cmd = [
            sys.executable,
            "-m",
            "simulations.ablation",
            "--one",
            name,
            "--rounds",
            str(args.rounds),
            "--variants",
            str(args.variants),
            "--scenario",
            str(args.scenario),
        ]
        running.append(
            (
                name,
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                ),
            )
        )
    for item in running:
        finish(*item)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
